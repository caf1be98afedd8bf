"""Where the policy file, the ledger and the CA are: one answer for every command, from any
working directory.

Everything lives under the spendgate *home*:

1. ``$SPENDGATE_HOME`` when set;
2. else the source checkout spendgate runs from (``./scripts/demo`` installs it editable from
   the clone, so a clone keeps its policies, ledger and CA to itself);
3. else ``~/.spendgate`` (an installed package).

Then, each one overridable on its own:

- policy file: ``--config``, else ``$SPENDGATE_CONFIG``, else ``HOME/policies/spendgate.yaml``;
- ledger: ``--db``, else ``$SPENDGATE_DB``, else ``HOME/data/spendgate.db``;
- CA (mitmproxy's confdir): ``HOME/certs``.

A path given on the command line or in a variable is relative to the working directory, as
usual. (No mitmproxy import: the CLI stays quick to start.)
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

HOME_ENV = "SPENDGATE_HOME"
CONFIG_ENV = "SPENDGATE_CONFIG"
DB_ENV = "SPENDGATE_DB"
CA_CERT = "mitmproxy-ca-cert.pem"


@cache
def checkout() -> Path | None:
    """The repository this package is imported from (an editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    try:
        project = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if 'name = "spendgate"' in project and (root / "addons" / "paths.py").is_file() else None


def home() -> Path:
    """The spendgate home, always absolute (see the module docstring)."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return checkout() or Path.home() / ".spendgate"


def home_source() -> str:
    """Why :func:`home` is what it is, in a few words (for ``spendgate env`` and messages)."""
    if os.environ.get(HOME_ENV):
        return f"${HOME_ENV}"
    return "the checkout spendgate runs from" if checkout() else "the default, ~/.spendgate"


def config_path(explicit: str | None = None) -> str:
    """The policy file: as given (``--config``/``$SPENDGATE_CONFIG``), else the home's."""
    given = explicit or os.environ.get(CONFIG_ENV)
    return given if given else str(home() / "policies" / "spendgate.yaml")


def db_path(explicit: str | None = None) -> str:
    """The ledger: as given (``--db``/``$SPENDGATE_DB``, a file or a URL), else the home's."""
    given = explicit or os.environ.get(DB_ENV)
    return given if given else str(home() / "data" / "spendgate.db")


def ca_dir() -> Path:
    """mitmproxy's confdir: the CA (private key included) the gateway signs with."""
    return home() / "certs"


def absolute(path: str) -> str:
    """``path`` made absolute against the working directory (URLs and :memory: unchanged)."""
    if path == ":memory:" or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _default_note(given: str | None, env: str) -> str:
    if given:
        return ""
    if os.environ.get(env):
        return f" (${env})"
    return f" (the default under {home_source()}, {home()})"


def no_policy(where: str, given: str | None) -> str:
    """What to say when the policy file a command needs is not there."""
    return (f"no policy file at {absolute(where)}{_default_note(given, CONFIG_ENV)}: pass --config FILE, "
            f"or set {CONFIG_ENV} or {HOME_ENV} (`spendgate init --vendor NAME` writes a starter policy there)")


def no_ledger(where: str, given: str | None) -> str:
    """What to say when the ledger a command reads is not there (readers never create one)."""
    return (f"no ledger at {absolute(where)}{_default_note(given, DB_ENV)}: pass --db FILE, or set {DB_ENV} "
            f"or {HOME_ENV} (the gateway and `spendgate keys issue` create it)")
