"""``spendgate``: run the gateway, check policies, manage keys and approvals, read spend.

Every command resolves the policy file (``--config``), the ledger (``--db``) and the CA the
same way the gateway does, from any working directory (paths.py: ``$SPENDGATE_HOME``, else the
checkout, else ~/.spendgate).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from . import reports
from .keys import IssueError, key_spec, parse_labels
from .paths import CA_CERT, absolute, ca_dir, config_path, db_path, home, home_source, no_ledger, no_policy
from .policy import Config, ConfigError, Problem, load_config, locate, read_secret, resolve_credentials
from .store import (
    TOKEN_PREFIX,
    KeyRecord,
    SchemaError,
    Store,
    StoreUnavailable,
    hash_token,
    is_postgres,
    open_store,
    redact_url,
)
from .vendors import REGISTRY

GATEWAY = Path(__file__).resolve().parent / "gateway.py"

config_opt = click.option("--config", "config", default=None,
                          help="Policy file [default: $SPENDGATE_CONFIG, else SPENDGATE_HOME/policies/spendgate.yaml].")
db_opt = click.option("--db", "db", default=None,
                      help="Ledger: a SQLite file, or postgresql://user@host:5432/db (fleet mode) "
                           "[default: $SPENDGATE_DB, else SPENDGATE_HOME/data/spendgate.db].")
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


_GROUP_DB = "spendgate.db"  # ctx.meta: a --db given to a command group, for its subcommands


def _store(db: str | None, create: bool = False) -> Store:
    """The ledger (a SQLite file or a postgresql:// URL). Only commands that write keys create a
    SQLite file; readers say where they looked."""
    if db is None:  # given to the group (`spendgate approvals --db URL list`)
        current = click.get_current_context(silent=True)
        db = current.meta.get(_GROUP_DB) if current is not None else None
    path = db_path(db)
    if not create and not is_postgres(path) and path != ":memory:" and not Path(path).exists():
        raise click.ClickException(no_ledger(path, db))
    try:
        return open_store(path)
    except (SchemaError, StoreUnavailable) as e:
        raise click.ClickException(str(e)) from None


def _load(where: str, secrets: bool) -> Config:
    """Load a policy file; with ``secrets``, also read every credential it references. On
    failure every problem is in the one ConfigError: the file's own (fields, cross-references)
    and, even then, each secret that does not resolve, in file order."""
    try:
        cfg = load_config(where)
    except ConfigError as e:
        problems = e.problems + [p for p in (_raw_secret_problems(where) if secrets else []) if p not in e.problems]
        raise ConfigError(sorted(problems, key=lambda p: p.line or 0)) from None
    if secrets:
        resolve_credentials(cfg, where)
    return cfg


def _raw_secret_problems(where: str) -> list[Problem]:
    """Each env:/file: reference directly under ``vendors.<name>`` that does not resolve, read
    from the YAML as it is (for a file that does not load for other reasons)."""
    try:
        data = yaml.safe_load(Path(where).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    vendors = data.get("vendors") if isinstance(data, dict) else None
    base = Path(where).resolve().parent
    out = []
    for name, vc in vendors.items() if isinstance(vendors, dict) else ():
        for fld, ref in vc.items() if isinstance(vc, dict) else ():
            if isinstance(ref, str) and ref.startswith(("env:", "file:")):
                value, why = read_secret(ref, None, base)
                if not value:
                    out.append(Problem(where, locate(where, ("vendors", name, fld)), f"vendors.{name}.{fld}", why))
    return out


def _config(path: str | None, secrets: bool = False) -> tuple[Config, str]:
    """The policy file (and, with ``secrets``, proof that every credential resolves)."""
    where = config_path(path)
    if not Path(where).is_file():
        raise click.ClickException(no_policy(where, path))
    try:
        cfg = _load(where, secrets)
    except ConfigError as e:
        raise click.ClickException(f"{where} cannot be used:\n{e}") from None
    return cfg, where


def _open_egress(cfg: Config, where: str) -> str | None:
    """A warning when the policy leaves ``egress:`` out (then non-vendor hosts are tunnelled)."""
    if "egress" in cfg.model_fields_set:
        return None
    return (f"{where}: warning: no egress: section, so hosts that are not vendors are tunnelled untouched "
            "(default: allow) and the gateway is an open forward proxy for them; add "
            "`egress: {default: deny, allow: [...]}` to name what agents may reach")


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None: it can)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"{host} is not an address of this machine ({e.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mitmproxy binds (TIME_WAIT is not busy)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another gateway or proxy?)"
            return f"cannot listen on {host}:{port} ({e.strerror})"
    return None


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows))
              for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c])
                               for c in cols))
    return "\n".join(line.rstrip() for line in lines)


class _Main(click.Group):
    """The ``spendgate`` group: a ledger that stops answering mid-command (a PostgreSQL server
    going away, a lock held past the statement timeout) is one clear line and exit 1, not a
    traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (StoreUnavailable, SchemaError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Main)
@click.version_option(package_name="spendgate")
def main() -> None:
    """Spendgate: an egress gateway between AI agents and the paid APIs they call."""


# --------------------------------------------------------------------------- run / check / ca


@main.command(context_settings={"ignore_unknown_options": True})
@config_opt
@db_opt
@click.option("--port", default=8080, show_default=True, help="Proxy listen port.")
@click.option("--host", "listen_host", default="127.0.0.1", show_default=True,
              help="Proxy listen address. 0.0.0.0 serves other machines and containers: then make sure "
                   "only your agents can reach it (the proxy tunnels whatever the policy's egress allows).")
@click.option("--web", is_flag=True, help="Run mitmweb (live console on 127.0.0.1:8081).")
@click.option("--web-port", default=8081, show_default=True, help="mitmweb's port (on 127.0.0.1).")
@click.option("--admin-port", default=None, type=int,
              help="Admin API port on 127.0.0.1 (default 8082; needs SPENDGATE_ADMIN_TOKEN).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="One line per decision, as text or JSON.")
@click.option("--capture", "capture", default=None, metavar="DIR",
              help="Save the traffic as rotating flow files in DIR (for spendgate replay).")
@click.option("--capture-no-bodies", is_flag=True, help="Captures keep no request or response body.")
@click.option("--capture-redact", multiple=True, metavar="NAME",
              help="Mask this JSON key / form or query field / header in captures (repeatable).")
@click.option("--capture-max-size", default="100m", show_default=True, help="Rotate capture files at this size.")
@click.option("--capture-max-age", default="1h", show_default=True, help="Rotate capture files after this long.")
@click.option("--capture-keep", default=48, show_default=True, help="Capture files kept (0: all).")
@click.option("--replica", default=None,
              help="This gateway's name in a fleet (default: the hostname).")
@click.option("--lease", default=None, type=float,
              help="Seconds a silent gateway's holds are kept before another one recovers them (default 30).")
@click.option("--reconcile-every", "reconcile_every", default=None, type=click.IntRange(min=0),
              help="Seconds between the gateway's own `spendgate reconcile` runs (default 0: off).")
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def run(config: str | None, db: str | None, port: int, listen_host: str, web: bool,
        web_port: int, admin_port: int | None, log_format: str, capture: str | None, capture_no_bodies: bool,
        capture_redact: tuple[str, ...], capture_max_size: str, capture_max_age: str, capture_keep: int,
        replica: str | None, lease: float | None, reconcile_every: int | None,
        mitmproxy_args: tuple[str, ...]) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Extra args go to mitmproxy.

    Before anything listens, the policy is validated and every secret it references is
    read: any problem is reported (file:line each) and nothing starts."""
    policy, cfg = _config(config, secrets=True)
    if warning := _open_egress(policy, cfg):
        click.echo(warning, err=True)
    if admin_port and not any("spendgate_admin_token" in a for a in mitmproxy_args):
        from .admin import DEFAULT_TOKEN_ENV, MIN_TOKEN_LENGTH

        token = os.environ.get(DEFAULT_TOKEN_ENV, "")
        if len(token) < MIN_TOKEN_LENGTH:  # refused before anything listens, as the admin API would
            raise click.ClickException(
                f"--admin-port needs an admin token of at least {MIN_TOKEN_LENGTH} characters in "
                f"{DEFAULT_TOKEN_ENV} ({f'it has {len(token)} characters' if token else 'it is not set'}; "
                "e.g. export SPENDGATE_ADMIN_TOKEN=$(openssl rand -hex 32))")
    if admin_port is None and os.environ.get("SPENDGATE_ADMIN_TOKEN") and not any(
            "spendgate_admin_listen" in a for a in mitmproxy_args):
        admin_default = 8082  # the admin API listens there when a token is set (admin.py)
    else:
        admin_default = None
    problems = [f"{why}: {what} cannot start (choose another with {opt})" for what, opt, h, p in (
        ("the proxy", "--port", listen_host, port),
        *((("mitmweb", "--web-port", "127.0.0.1", web_port),) if web else ()),
        *((("the admin API", "--admin-port", "127.0.0.1", admin_port or admin_default),)
          if admin_port or admin_default else ()),
    ) if (why := _bind_problem(h, p))]  # fmt: skip
    if problems:
        raise click.ClickException("; ".join(problems))
    if not any(a.startswith("confdir") for a in mitmproxy_args):
        ensure_ca(ca_dir())  # before mitmproxy reads it: replicas sharing one CA create it once
    tool = "mitmweb" if web else "mitmdump"
    exe = Path(sys.executable).with_name(tool)
    if log_format == "json":  # JSON lines from mitmproxy's very first line on (launch.py)
        launcher = [sys.executable, "-m", "spendgate.launch", tool]
    else:
        launcher = [str(exe if exe.exists() else tool)]
    # Absolute paths: the gateway, `spendgate keys`/`report` and a restart from another
    # directory all mean the same files.
    args = [
        *launcher, "-s", str(GATEWAY),
        "--set", f"spendgate_config={absolute(cfg)}", "--set", f"spendgate_db={absolute(db_path(db))}",
        "--set", f"confdir={ca_dir()}", "--set", "connection_strategy=lazy",
        "--listen-host", listen_host, "--listen-port", str(port),
        "--set", f"spendgate_log_format={log_format}",
    ]
    if admin_port:
        args += ["--set", f"spendgate_admin_listen=127.0.0.1:{admin_port}"]
    if capture:
        args += ["--set", f"spendgate_capture={capture}", "--set", f"spendgate_capture_max_size={capture_max_size}",
                 "--set", f"spendgate_capture_max_age={capture_max_age}",
                 "--set", f"spendgate_capture_keep={capture_keep}"]
        if not any("store_streamed_bodies" in a for a in mitmproxy_args):  # (mitmproxy: one value per --set)
            # streamed (SSE) bodies kept, so replay can re-meter them
            args += ["--set", f"store_streamed_bodies={'false' if capture_no_bodies else 'true'}"]
        if capture_no_bodies:
            args += ["--set", "spendgate_capture_bodies=false"]
        for name in capture_redact:
            args += ["--set", f"spendgate_capture_redact={name}"]
    if replica:
        args += ["--set", f"spendgate_replica={replica}"]
    if lease is not None:
        args += ["--set", f"spendgate_lease={lease:g}"]
    if reconcile_every:
        args += ["--set", f"spendgate_reconcile_every={reconcile_every}"]
    if web:
        args += ["--set", "web_open_browser=false", "--set", f"web_port={web_port}",
                 "--set", "web_host=127.0.0.1"]
    # Line-buffered output even into a file or a pipe (`spendgate run > gw.log`): each decision,
    # and mitmweb's login URL, is there as soon as it happens.
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.execvp(args[0], [*args, *mitmproxy_args])


@main.command()
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--secrets/--no-secrets", default=True, show_default=True,
              help="Also check that every env:/file: credential resolves here (as `run` does).")
@click.option("--db", "db", default=None,
              help="Also check this ledger (a SQLite file or postgresql://user@host:5432/db) answers with a "
                   "schema this spendgate can run on [default: $SPENDGATE_DB when it is a postgresql:// URL].")
def check(file: str | None, secrets: bool, db: str | None) -> None:
    """Validate a policy file; print every problem with file, line and field.

    Every problem is reported at once: fields, cross-references (a policy naming a vendor
    without credentials, an unknown vendor, a bad rule) and, unless --no-secrets, every
    env:/file: secret that does not resolve in this environment. FILE defaults to the
    policy `run` would use ($SPENDGATE_CONFIG, else SPENDGATE_HOME/policies/spendgate.yaml)."""
    if not file and not Path(config_path(None)).is_file():
        raise click.ClickException(no_policy(config_path(None), None))
    file = file or config_path(None)
    try:
        cfg = _load(file, secrets)
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        raise SystemExit(1) from None
    if warning := _open_egress(cfg, file):
        click.echo(warning, err=True)
    click.echo(f"{file}: ok ({len(cfg.policies)} policies, {len(cfg.vendors)} vendors, "
               f"{len(cfg.keys)} static keys{', every secret resolves' if secrets else ', secrets not checked'})")
    env_db = os.environ.get("SPENDGATE_DB") or ""
    ledger = db or (env_db if is_postgres(env_db) else None)
    if ledger:
        ok, line = _check_ledger(ledger)
        click.echo(line, err=not ok)
        if not ok:
            raise SystemExit(1)


def _check_ledger(ledger: str) -> tuple[bool, str]:
    """Does the ledger answer, with a schema this spendgate can run on? Read only: nothing is
    created or migrated (the gateway does that when it starts)."""
    import sqlite3

    from .store.postgres import SCHEMA_VERSION as PG_VERSION
    from .store.sqlite import SCHEMA_VERSION as SQLITE_VERSION

    name = redact_url(ledger)
    try:
        if is_postgres(ledger):
            import psycopg

            knows = PG_VERSION
            with psycopg.connect(ledger, connect_timeout=3, autocommit=True) as conn:
                table = conn.execute("SELECT to_regclass('schema_version')").fetchone()
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] \
                    if table and table[0] else None
        else:
            knows = SQLITE_VERSION
            if not Path(ledger).is_file():
                return True, f"ledger {name}: none yet (the gateway creates it)"
            conn_ = sqlite3.connect(f"file:{Path(ledger).absolute()}?mode=ro", uri=True)
            try:
                has = conn_.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone()
                version = conn_.execute("SELECT max(version) FROM schema_version").fetchone()[0] if has else None
            finally:
                conn_.close()
    except Exception as e:  # unreachable, refused, not a ledger: the reason, never the password
        return False, f"ledger {name}: cannot be read: {redact_url(ledger, str(e).strip().splitlines()[0])}"
    if version is None:
        return True, f"ledger {name}: reachable, no schema yet (the first gateway to start creates it)"
    if version > knows:
        return False, (f"ledger {name}: its schema is version {version}, newer than this spendgate knows "
                       f"({knows}): upgrade spendgate")
    upgrade = f", migrated to {knows} when a gateway starts" if version < knows else ""
    return True, f"ledger {name}: ok (schema version {version}{upgrade})"


# Starter rules for `spendgate init`: credential env names, common endpoints, limits.
STARTER: dict[str, dict[str, object]] = {
    "stripe": {"env": {"secret": "STRIPE_SECRET_KEY"},
               "allow": ["POST /v1/payment_intents", "GET /v1/payment_intents/*", "POST /v1/payment_intents/*/confirm"],
               "approve": ["POST /v1/refunds"], "extra": ["max_request_usd: 100      # refused above this (402)"]},
    "openai": {"env": {"secret": "OPENAI_API_KEY"},
               "allow": ["POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings"],
               "extra": ["max_output_tokens: 4096   # per request (403 output_limit_exceeded)"]},
    "anthropic": {"env": {"secret": "ANTHROPIC_API_KEY"}, "allow": ["POST /v1/messages"],
                  "extra": ["max_output_tokens: 4096"]},
    "twilio": {"env": {"account_sid": "TWILIO_ACCOUNT_SID", "secret": "TWILIO_AUTH_TOKEN"},
               "allow": ["POST /2010-04-01/Accounts/*/Messages.json", "GET /2010-04-01/Accounts/*/Messages/*"]},
    "resend": {"env": {"secret": "RESEND_API_KEY"}, "allow": ["POST /emails"]},
    "postmark": {"env": {"secret": "POSTMARK_SERVER_TOKEN"}, "allow": ["POST /email"]},
    "shopify": {"env": {"secret": "SHOPIFY_ACCESS_TOKEN"}, "allow": ["POST /admin/api/*/graphql.json"]},
    "gemini": {"env": {"secret": "GEMINI_API_KEY"}, "allow": ["POST /v1beta/models/*"],
               "extra": ["max_output_tokens: 4096"]},
    "openrouter": {"env": {"secret": "OPENROUTER_API_KEY"}, "allow": ["POST /api/v1/chat/completions"]},
}


def starter_policy(vendors: list[str], command: str) -> str:
    """A commented starter policy for ``vendors`` (production-shaped: no upstream, egress denied)."""
    out = [
        f"# spendgate policy, written by `{command}`.",
        "# Check it (every secret must resolve here): spendgate check FILE",
        "# Run it:                                  spendgate run --config FILE",
        "# Reference: policies/example.yaml and the README's \"Policy file\".",
        "version: 1",
        "",
        "# Real vendor credentials, as references only (env:NAME or file:PATH), read by the gateway",
        "# at start and on every reload. Export them where the gateway runs, never for the agent.",
        "vendors:",
    ]
    for name in vendors:
        envs = dict(STARTER.get(name, {}).get("env", {}))  # type: ignore[call-overload]
        fields = ", ".join(f"{f}: env:{envs.get(f, f'{name.upper()}_{f.upper()}')}"
                           for f in REGISTRY[name].credential_fields)
        out.append(f"  {name}: {{{fields}}}")
    out += [
        "",
        "policies:",
        "  # One policy per kind of agent; each vault key is issued for one policy:",
        "  #   spendgate keys issue --policy agent --ttl 1h",
        "  agent:",
        "    vendors:",
    ]
    for name in vendors:
        spec = STARTER.get(name, {})
        out.append(f"      {name}:")
        allow = spec.get("allow") or []
        out.append(f"        allow: {json.dumps(allow)}" + ("" if allow else "   # add METHOD /path rules"))
        if spec.get("approve"):
            out.append(f"        approve: {json.dumps(spec['approve'])}   # held for a human: spendgate approvals")
        out += [f"        {line}" for line in spec.get("extra", [])]  # type: ignore[attr-defined]
    out[out.index("      " + vendors[0] + ":")] += ("   # METHOD /path: * one segment, a trailing ** any rest;"
                                                     " deny wins, anything else is refused")
    out += [
        "    budget: {key_usd: 50, key_daily_usd: 20}   # USD caps per key (estimated before, settled after)",
        "    rate: 60/minute                             # per key",
        "    ttl: 1h                                     # default lifetime of its keys",
        "    approval_timeout: 5m",
        "",
        "# Hosts that are not vendors are refused (the gateway is not an open proxy); list the ones",
        "# agents may reach untouched, e.g. allow: [\"pypi.org\"].",
        "egress: {default: deny, allow: [], deny: []}",
        "",
    ]
    return "\n".join(out)


@main.command()
@click.option("--vendor", "vendors", multiple=True, required=True, type=click.Choice(sorted(REGISTRY)),
              help="A vendor the agents will call (repeatable).")
@click.option("--output", "-o", default=None,
              help="Where to write it [default: where `run` looks, $SPENDGATE_CONFIG, else "
                   "SPENDGATE_HOME/policies/spendgate.yaml].")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(vendors: tuple[str, ...], output: str | None, force: bool) -> None:
    """Write a commented starter policy for the named vendors."""
    path = Path(absolute(output or config_path(None)))
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists: choose another --output, or --force to overwrite it")
    names = list(dict.fromkeys(vendors))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_policy(names, "spendgate init " + " ".join(f"--vendor {v}" for v in names)))
    env_names = [ref.split(":", 1)[1] for ref in _secret_refs(path) if ref.startswith("env:")]
    click.echo(f"wrote {path}")
    click.echo(f"next: export {', '.join(env_names)} (real keys, where the gateway runs),")
    if output is None and str(path) == absolute(config_path(None)):
        click.echo("      spendgate check && spendgate run      (they find it there, from any directory)")
    else:
        click.echo(f"      spendgate check {path} && spendgate run --config {path}")


def _secret_refs(path: Path) -> list[str]:
    cfg = load_config(path)
    return [getattr(vc, f) for n, vc in cfg.vendors.items() for f in REGISTRY[n].credential_fields]


@main.command()
@click.option("--dir", "directory", default=None,
              help="mitmproxy's confdir [default: SPENDGATE_HOME/certs, where `run` keeps it].")
def ca(directory: str | None) -> None:
    """Create the gateway's CA (if missing) and print the certificate clients trust."""
    where = Path(absolute(directory)) if directory else ca_dir()
    ensure_ca(where)
    click.echo(str(where / CA_CERT))


def ensure_ca(where: Path) -> None:
    """Create the CA in ``where`` unless it is there, under an exclusive lock on the directory.
    Replicas that share one CA (one volume) start together: without the lock each created its
    own key at the same moment, the last files written won, and the others signed with a CA no
    agent trusts (3 concurrent first starts: 2 or 3 different CAs in 4 runs of 5)."""
    import fcntl

    from mitmproxy.certs import CertStore

    where.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(where / ".spendgate-ca.lock", "a")  # noqa: SIM115 (held until the CA is there)
    except OSError:  # a read-only directory: its CA is there already (or nobody can create it)
        CertStore.from_store(str(where), "mitmproxy", 2048)
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        CertStore.from_store(str(where), "mitmproxy", 2048)


@main.command()
@click.option("--proxy", default="http://127.0.0.1:8080", show_default=True,
              help="The gateway address as the agent reaches it.")
@click.option("--ca", "ca_path", default=None,
              help="Where the agent sees the CA certificate [default: this gateway's, as an absolute path].")
def env(proxy: str, ca_path: str | None) -> None:
    """Print the environment variables an agent needs (shell syntax: eval "$(spendgate env)").

    Comment lines say where this gateway's files are (absolute paths; eval skips them)."""
    if not ca_path:
        ca_path = str(ca_dir() / CA_CERT)
        if not Path(ca_path).is_file():
            click.echo(f"note: no CA at {ca_path} yet: `spendgate ca` creates it (so does `spendgate run`)",
                       err=True)
    else:
        ca_path = ca_path if "://" in ca_path else str(Path(ca_path).expanduser().absolute())
    policy, ledger = absolute(config_path(None)), absolute(db_path(None))
    click.echo(f"# spendgate home {home()} ({home_source()})")
    click.echo(f"# policy without --config: {policy}"
               + ("" if Path(policy).is_file() else " (none yet: `spendgate init` writes one)"))
    click.echo(f"# ledger without --db:     {redact_url(ledger)}"
               + ("" if is_postgres(ledger) or Path(ledger).is_file() else " (none yet: the gateway creates it)"))
    click.echo(f"# gateway CA:              {ca_dir()}")
    lines = {
        "HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "SSL_CERT_FILE": ca_path,
        "REQUESTS_CA_BUNDLE": ca_path, "CURL_CA_BUNDLE": ca_path, "NODE_EXTRA_CA_CERTS": ca_path,
    }
    for k, v in lines.items():
        click.echo(f"export {k}={v}")


# --------------------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """Issue, list, show and revoke vault keys."""


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_labels(pairs)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--label") from None


def _print_key(rec: KeyRecord, as_json: bool, token: str | None = None) -> None:
    data = rec.public()
    if token:
        data = {"token": token, **data}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    width = max(map(len, data))
    for k, v in data.items():
        if k == "labels":
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        click.echo(f"{k.ljust(width)}  {v if v is not None else '-'}")


@keys.command("issue")
@click.option("--policy", required=True, help="The policy (in the policy file) the key is bound to.")
@click.option("--ttl", default=None, help="Lifetime, e.g. 10m, 1h (default: the policy's ttl).")
@click.option("--cap-usd", default=None, help="Lifetime spend cap; may only narrow the policy's.")
@click.option("--label", "labels", multiple=True, help="k=v, repeatable.")
@config_opt
@db_opt
@json_opt
@click.option("--token-only", is_flag=True, help="Print the token alone (export VAULT_KEY=$(...)).")
def keys_issue(policy: str, ttl: str | None, cap_usd: str | None, labels: tuple[str, ...],
               config: str | None, db: str | None, as_json: bool, token_only: bool) -> None:
    """Issue a key; its token is printed once and stored only as a hash."""
    cfg, _ = _config(config)
    try:
        spec = key_spec(cfg, policy, ttl, cap_usd, _labels(labels))
    except IssueError as e:  # the same rules as the admin API's POST /v1/keys (keys.py)
        if e.param in ("ttl", "cap_usd"):
            raise click.BadParameter(e.message, param_hint=f"--{e.param.replace('_', '-')}") from None
        raise click.ClickException(e.message) from None
    store = _store(db, create=True)
    rec, token = store.issue_key(spec.policy, spec.ttl_seconds, spec.cap_usd, spec.labels)
    store.close()
    if token_only:
        click.echo(token)
        return
    _print_key(rec, as_json, token)
    if not as_json:
        click.echo("\nThe token is shown once. Give it to the agent as its API key or X-Vault-Key.",
                   err=True)


@keys.command("list")
@db_opt
@json_opt
@click.option("--all", "show_all", is_flag=True, help="Include revoked and expired keys.")
def keys_list(db: str | None, as_json: bool, show_all: bool) -> None:
    """List keys (active ones unless --all)."""
    store = _store(db)
    recs = [k.public() for k in store.list_keys() if show_all or k.state() == "active"]
    store.close()
    if as_json:
        click.echo(json.dumps(recs, indent=2))
        return
    for r in recs:
        r["labels"] = ",".join(f"{k}={v}" for k, v in r["labels"].items())
    click.echo(_table(recs, ["id", "policy", "state", "labels", "expires_at", "cap_usd"]))


@keys.command("show")
@click.argument("key_id")
@db_opt
@json_opt
def keys_show(key_id: str, db: str | None, as_json: bool) -> None:
    """Show one key."""
    store = _store(db)
    rec = store.get_key(key_id)
    store.close()
    if rec is None:
        raise click.ClickException(f"no key {key_id!r}")
    _print_key(rec, as_json)


@keys.command("revoke")
@click.argument("key_id", required=False)
@click.option("--label", "labels", multiple=True, help="Revoke every active key with these labels.")
@db_opt
@json_opt
def keys_revoke(key_id: str | None, labels: tuple[str, ...], db: str | None, as_json: bool) -> None:
    """Revoke a key (effective on the gateway's next request), or all keys matching --label."""
    if bool(key_id) == bool(labels):
        raise click.UsageError("give a KEY_ID or --label k=v (not both)")
    store = _store(db)
    if key_id:
        if not store.revoke(key_id):
            store.close()
            raise click.ClickException(f"no key {key_id!r}")
        revoked = [key_id]
    else:
        revoked = store.revoke_by_labels(_labels(labels))
    store.close()
    if as_json:
        click.echo(json.dumps({"revoked": revoked}))
    else:
        click.echo(f"revoked {len(revoked)} key(s): {', '.join(revoked) or '-'}")


@keys.command("hash")
def keys_hash() -> None:
    """Read a token on stdin and print its token_sha256 (for static keys in the policy)."""
    token = sys.stdin.readline().strip()
    if not re.fullmatch(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{32,}}", token):
        raise click.ClickException(
            f"that is not a vault key: expected {TOKEN_PREFIX} followed by at least 32 URL-safe "
            "characters (as `spendgate keys issue` prints)"
        )
    click.echo(hash_token(token))


# --------------------------------------------------------------------------- approvals


@main.group(invoke_without_command=True)
@db_opt
@click.pass_context
def approvals(ctx: click.Context, db: str | None) -> None:
    """Requests held by approve: rules (alone: the pending ones, as `approvals list`)."""
    if db is not None:  # `approvals --db URL approve ID`: the subcommand uses it too
        ctx.meta[_GROUP_DB] = db
    if ctx.invoked_subcommand is None:
        ctx.invoke(approvals_list, db=db)


@approvals.command("list")
@db_opt
@json_opt
@click.option("--all", "show_all", is_flag=True, help="Include decided ones.")
def approvals_list(db: str | None, as_json: bool, show_all: bool) -> None:
    """List held requests (pending unless --all)."""
    store = _store(db)
    rows = store.list_approvals(None if show_all else "pending")
    store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(_table(rows, ["id", "status", "key_id", "vendor", "method", "path",
                                 "estimated_usd", "expires_at"]))


def _decide(approval_id: str, status: str, db: str | None) -> None:
    store = _store(db)
    ok = store.decide_approval(approval_id, status, "cli")
    current = store.approval_status(approval_id)
    store.close()
    if not ok:
        raise click.ClickException(
            f"no pending approval {approval_id!r}" + (f" (it is {current})" if current else "")
        )
    click.echo(f"{approval_id}: {status}")


@approvals.command("approve")
@click.argument("approval_id")
@db_opt
def approvals_approve(approval_id: str, db: str | None) -> None:
    """Approve a held request: it is forwarded."""
    _decide(approval_id, "approved", db)


@approvals.command("deny")
@click.argument("approval_id")
@db_opt
def approvals_deny(approval_id: str, db: str | None) -> None:
    """Deny a held request: the agent gets approval_denied."""
    _decide(approval_id, "denied", db)


@main.command()
@click.argument("approval_id")
@db_opt
def approve(approval_id: str, db: str | None) -> None:
    """Approve a held request (alias of `approvals approve`)."""
    _decide(approval_id, "approved", db)


@main.command()
@click.argument("approval_id")
@db_opt
def deny(approval_id: str, db: str | None) -> None:
    """Deny a held request (alias of `approvals deny`)."""
    _decide(approval_id, "denied", db)


# --------------------------------------------------------------------------- report


@main.command()
@click.option("--by", default="key", show_default=True,
              help="key | policy | vendor | day | model | tool | label:NAME")
@click.option("--since", default=None, help="A date (2026-11-01) or a duration back (24h, 7d).")
@db_opt
@click.option("--json", "fmt", flag_value="json", help="JSON output.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV output.")
def report(by: str, since: str | None, db: str | None, fmt: str | None) -> None:
    """Spend and call counts from the ledger."""
    store = _store(db)
    try:
        rows = reports.spend(store, by=by, since=since)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    finally:
        store.close()
    click.echo(reports.render(rows, fmt or "table"))


@main.command()
@click.option("--from", "src", default=None,
              help="The single-box ledger, a SQLite file [default: $SPENDGATE_DB if it is a file, else "
                   "SPENDGATE_HOME/data/spendgate.db].")
@click.option("--to", "dst", default=None,
              help="The fleet's ledger, postgresql://user@host:5432/db (default: $SPENDGATE_DB).")
def migrate(src: str | None, dst: str | None) -> None:
    """Copy a SQLite ledger (keys, counters, approvals, calls, reconciliations) into PostgreSQL; idempotent."""
    from .store.transfer import migrate as copy_ledger

    env_db = os.environ.get("SPENDGATE_DB") or ""
    dst = dst or env_db
    given = src
    if src is None:
        src = db_path(None) if env_db and not is_postgres(env_db) else str(home() / "data" / "spendgate.db")
    if not is_postgres(src) and not Path(src).is_file():
        raise click.ClickException(no_ledger(src, given).replace("pass --db FILE", "pass --from FILE"))
    bar: Any = None
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if not tty:  # a log (docker compose run, CI): click's bar would print its label alone
            click.echo(f"calls rows: {done}/{total} ({100 * done // max(total, 1)}%)", err=True)
            return
        if bar is None:
            bar = click.progressbar(length=total, label="calls rows", file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        out = copy_ledger(src, dst, progress)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except (SchemaError, StoreUnavailable) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(f"migrated {src} → {redact_url(dst)}: {out['keys']} keys, {out['approvals']} approvals, "
               f"{out['calls']} new calls rows, {out['reconciliations']} reconciliations, "
               f"${out['counter_nanos_added'] / 1e9:g} of budget counters added"
               + (f"; the stopped box's holds settled first: {out['holds_counted']} forwarded counted at their "
                  f"estimate (flagged rows), {out['holds_released']} never forwarded released"
                  if "holds_counted" in out else ""))

if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- replay (its own module)

from .replay_cli import replay as _replay  # noqa: E402

main.add_command(_replay)

# --------------------------------------------------------------------------- prices / reconcile (own module)

from .pricing_cli import prices as _prices  # noqa: E402
from .pricing_cli import reconcile_cmd as _reconcile  # noqa: E402

main.add_command(_prices)
main.add_command(_reconcile)
