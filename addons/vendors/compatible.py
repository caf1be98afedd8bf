"""The OpenAI-compatible providers shipped as built-ins (see ``_compatible``): Mistral, Groq,
DeepSeek, xAI, Together, Fireworks and OpenRouter. Each has its hosts, its key pattern (a
real key sent by an agent is refused as ``raw_credential``) and its price table
``prices/<name>.yaml``. Keys go in ``Authorization: Bearer`` (X-Vault-Key works too).
Note the base paths: Groq ``/openai/v1``, Fireworks ``/inference/v1``, OpenRouter ``/api/v1``.
"""

from __future__ import annotations

from ._compatible import openai_compatible
from .base import load_prices

VENDORS = (
    openai_compatible("mistral", ("api.mistral.ai",), r"^(?![0-9a-f]{32}$)[A-Za-z0-9]{32}$", load_prices("mistral")),
    openai_compatible("groq", ("api.groq.com",), r"^gsk_[A-Za-z0-9]{20,}$", load_prices("groq")),
    openai_compatible("deepseek", ("api.deepseek.com",), r"^sk-[0-9a-f]{32}$", load_prices("deepseek")),
    openai_compatible("xai", ("api.x.ai",), r"^xai-[A-Za-z0-9]{20,}$", load_prices("xai")),
    openai_compatible("together", ("api.together.xyz", "api.together.ai"),
                      r"^(tgp_v1_[A-Za-z0-9_-]{20,}|[0-9a-f]{64})$", load_prices("together")),
    openai_compatible("fireworks", ("api.fireworks.ai",), r"^fw_[A-Za-z0-9]{20,}$", load_prices("fireworks")),
    openai_compatible("openrouter", ("openrouter.ai",), r"^sk-or-(v1-)?[0-9a-f]{32,}$", load_prices("openrouter")),
)
