"""``spendgate``: run the gateway, check policies, manage keys and approvals, read spend.

Every command that touches keys or the ledger resolves ``--config`` (else
$SPENDGATE_CONFIG, else policies/spendgate.yaml) and ``--db`` (else $SPENDGATE_DB,
else data/spendgate.db) the same way the gateway does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import reports
from .keys import IssueError, key_spec, parse_labels
from .paths import config_path, db_path
from .policy import Config, ConfigError, load_config, resolve_credentials
from .store import KeyRecord, Store, hash_token, open_store

GATEWAY = Path(__file__).resolve().parent / "gateway.py"
CERTS = "certs"

config_opt = click.option("--config", "config", default=None, help="Policy file.")
db_opt = click.option("--db", "db", default=None, help="Ledger (SQLite file).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _store(db: str | None) -> Store:
    return open_store(db_path(db))


def _config(path: str | None) -> Config:
    try:
        return load_config(config_path(path))
    except ConfigError as e:
        raise click.ClickException(f"invalid policy\n{e}") from None


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


@click.group()
@click.version_option(package_name="spendgate")
def main() -> None:
    """Spendgate: an egress gateway between AI agents and the paid APIs they call."""


# --------------------------------------------------------------------------- run / check / ca


@main.command(context_settings={"ignore_unknown_options": True})
@config_opt
@db_opt
@click.option("--port", default=8080, show_default=True, help="Proxy listen port.")
@click.option("--host", "listen_host", default="", help="Proxy listen address (default: all).")
@click.option("--web", is_flag=True, help="Run mitmweb (live console on 127.0.0.1:8081).")
@click.option("--web-port", default=8081, show_default=True)
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
@click.argument("mitmproxy_args", nargs=-1, type=click.UNPROCESSED)
def run(config: str | None, db: str | None, port: int, listen_host: str, web: bool,
        web_port: int, log_format: str, capture: str | None, capture_no_bodies: bool,
        capture_redact: tuple[str, ...], capture_max_size: str, capture_max_age: str, capture_keep: int,
        mitmproxy_args: tuple[str, ...]) -> None:
    """Run the gateway (mitmdump, or mitmweb with --web). Extra args go to mitmproxy."""
    cfg = config_path(config)
    _config(cfg)  # fail fast with file:line errors before mitmproxy starts
    tool = "mitmweb" if web else "mitmdump"
    exe = Path(sys.executable).with_name(tool)
    args = [
        str(exe if exe.exists() else tool), "-s", str(GATEWAY),
        "--set", f"spendgate_config={cfg}", "--set", f"spendgate_db={db_path(db)}",
        "--set", f"confdir={CERTS}", "--set", "connection_strategy=lazy",
        "--listen-port", str(port), "--set", f"spendgate_log_format={log_format}",
    ]
    if listen_host:
        args += ["--listen-host", listen_host]
    if capture:
        args += ["--set", f"spendgate_capture={capture}", "--set", f"spendgate_capture_max_size={capture_max_size}",
                 "--set", f"spendgate_capture_max_age={capture_max_age}",
                 "--set", f"spendgate_capture_keep={capture_keep}",
                 # streamed (SSE) bodies kept, so replay can re-meter them
                 "--set", f"store_streamed_bodies={'false' if capture_no_bodies else 'true'}"]
        if capture_no_bodies:
            args += ["--set", "spendgate_capture_bodies=false"]
        for name in capture_redact:
            args += ["--set", f"spendgate_capture_redact={name}"]
    if web:
        args += ["--set", "web_open_browser=false", "--set", f"web_port={web_port}",
                 "--set", "web_host=127.0.0.1"]
    os.execvp(args[0], [*args, *mitmproxy_args])


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--secrets/--no-secrets", default=False,
              help="Also check that every env:/file: credential resolves here.")
def check(file: str, secrets: bool) -> None:
    """Validate a policy file; print every problem with file, line and field."""
    try:
        cfg = load_config(file)
        if secrets:
            resolve_credentials(cfg, file)
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        raise SystemExit(1) from None
    click.echo(f"{file}: ok ({len(cfg.policies)} policies, {len(cfg.vendors)} vendors, "
               f"{len(cfg.keys)} static keys)")


@main.command()
@click.option("--dir", "directory", default=CERTS, show_default=True)
def ca(directory: str) -> None:
    """Create the gateway's CA in ./certs (if missing) and print the cert clients trust."""
    from mitmproxy.certs import CertStore

    Path(directory).mkdir(parents=True, exist_ok=True)
    CertStore.from_store(directory, "mitmproxy", 2048)
    click.echo(str(Path(directory) / "mitmproxy-ca-cert.pem"))


@main.command()
@click.option("--proxy", default="http://127.0.0.1:8080", show_default=True,
              help="The gateway address as the agent reaches it.")
@click.option("--ca", "ca_path", default=f"{CERTS}/mitmproxy-ca-cert.pem", show_default=True,
              help="Where the agent sees the CA certificate.")
def env(proxy: str, ca_path: str) -> None:
    """Print the environment variables an agent needs (shell syntax)."""
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
@click.option("--policy", required=True)
@click.option("--ttl", default=None, help="Lifetime, e.g. 10m, 1h (default: the policy's ttl).")
@click.option("--cap-usd", default=None, help="Lifetime spend cap; may only narrow the policy's.")
@click.option("--label", "labels", multiple=True, help="k=v, repeatable.")
@config_opt
@db_opt
@json_opt
def keys_issue(policy: str, ttl: str | None, cap_usd: str | None, labels: tuple[str, ...],
               config: str | None, db: str | None, as_json: bool) -> None:
    """Issue a key; its token is printed once and stored only as a hash."""
    cfg = _config(config)
    try:
        spec = key_spec(cfg, policy, ttl, cap_usd, _labels(labels))
    except IssueError as e:  # the same rules as the admin API's POST /v1/keys (keys.py)
        if e.param in ("ttl", "cap_usd"):
            raise click.BadParameter(e.message, param_hint=f"--{e.param.replace('_', '-')}") from None
        raise click.ClickException(e.message) from None
    store = _store(db)
    rec, token = store.issue_key(spec.policy, spec.ttl_seconds, spec.cap_usd, spec.labels)
    store.close()
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
    click.echo(hash_token(token))


# --------------------------------------------------------------------------- approvals


@main.group()
def approvals() -> None:
    """Requests held by approve: rules."""


@approvals.command("list")
@db_opt
@json_opt
@click.option("--all", "show_all", is_flag=True, help="Include decided ones.")
def approvals_list(db: str | None, as_json: bool, show_all: bool) -> None:
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


@main.command()
@click.argument("approval_id")
@db_opt
def approve(approval_id: str, db: str | None) -> None:
    """Approve a held request: it is forwarded."""
    _decide(approval_id, "approved", db)


@main.command()
@click.argument("approval_id")
@db_opt
def deny(approval_id: str, db: str | None) -> None:
    """Deny a held request: the agent gets approval_denied."""
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
        rows = reports.spend(store.path, by=by, since=since)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    finally:
        store.close()
    click.echo(reports.render(rows, fmt or "table"))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- replay (its own module)

from .replay_cli import replay as _replay  # noqa: E402

main.add_command(_replay)
