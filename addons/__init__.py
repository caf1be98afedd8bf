"""spendgate: an egress gateway for AI agents, built as mitmproxy addons.

The source of the ``spendgate`` package lives in ``addons/`` so that
``mitmdump -s addons/gateway.py`` works from a checkout. ``gateway.py`` holds
the ordered addon list; read it first.
"""

__version__ = "0.1.0"
