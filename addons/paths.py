"""Where the policy file and the ledger are, resolved the same way by every command.

``--config``, else ``$SPENDGATE_CONFIG``, else ``policies/spendgate.yaml``;
``--db``, else ``$SPENDGATE_DB``, else ``data/spendgate.db``. (No mitmproxy import:
the CLI stays quick to start.)
"""

from __future__ import annotations

import os

DEFAULT_CONFIG = "policies/spendgate.yaml"
DEFAULT_DB = "data/spendgate.db"


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("SPENDGATE_CONFIG") or DEFAULT_CONFIG


def db_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("SPENDGATE_DB") or DEFAULT_DB
