"""``spendgate prices check`` (and ``spendgate reconcile``): keeping the money numbers true."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import click

from . import pricing
from .money import fmt_usd
from .paths import config_path, db_path, no_ledger
from .policy import ConfigError, load_config
from .store import redact_url
from .vendors.base import Prices


def _prices(config: str | None) -> Prices:
    """The policy's overrides and fx when a policy file is given or found, else the shipped tables."""
    path = config_path(config)
    if not config and not Path(path).exists():
        return Prices()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise click.ClickException(f"invalid policy\n{e}") from None
    return Prices(fx=dict(cfg.fx), overrides=dict(cfg.prices))


@click.group()
def prices() -> None:
    """Price tables: where they come from, how old they are, what they miss."""


@prices.command("check")
@click.option("--config", "config", default=None, help="Policy file (its prices: overrides count).")
@click.option("--db", "db", default=None,
              help="Ledger: a SQLite file, or postgresql://user@host:5432/db (default: $SPENDGATE_DB).")
@click.option("--max-age", "max_age", default=90, show_default=True, help="Days before a table is stale.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(config: str | None, db: str | None, max_age: int, as_json: bool) -> None:
    """Report models seen in the ledger without a price row, and tables older than --max-age days.

    Exits 1 when there is anything to fix."""
    path, table = db_path(db), _prices(config)
    if "://" not in path and not Path(path).is_file():
        raise click.ClickException(no_ledger(path, db))
    try:
        result = pricing.report(path, table, datetime.now(UTC).date(), max_age)
    except Exception as e:  # sqlite3.OperationalError: no ledger yet, not SQLite
        raise click.ClickException(f"cannot read the ledger {redact_url(path)}: {redact_url(path, str(e))}") from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo("Price tables:")
        for t in result["tables"]:
            state = t["problem"] or "ok"
            age = f"{t['age_days']} days" if t["age_days"] is not None else "-"
            click.echo(f"  {t['vendor']:<11} as_of {t['as_of'] or '-':<10}  {age:>9}  {state}"
                       f"  ({t['source'] or 'no source'})"[:200])
        missing = result["models_without_a_row"]
        click.echo("Models seen in the ledger without a price row" + (":" if missing else ": none"))
        for m in missing:
            click.echo(f"  {m['vendor']}/{m['model']}: {m['calls']} calls, last {m['last_seen']} "
                       "(priced at the vendor's highest listed rates, flagged estimated)")
    if not result["ok"]:
        raise SystemExit(1)


@click.command("reconcile")
@click.option("--db", "db", default=None,
              help="Ledger: a SQLite file, or postgresql://user@host:5432/db (default: $SPENDGATE_DB).")
@click.option("--config", "config", default=None,
              help="Policy file: each vendor's real credential and upstream (default: $SPENDGATE_CONFIG).")
@click.option("--since", default="30d", show_default=True,
              help="Revisit calls recorded since this date (2026-11-01) or duration back (24h, 7d).")
@click.option("--limit", default=1000, show_default=True, help="At most this many calls per run.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds for each request to a vendor.")
@click.option("--dry-run", is_flag=True, help="Ask the vendors and print what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reconcile_cmd(db: str | None, config: str | None, since: str, limit: int, timeout: float, dry_run: bool,
                  as_json: bool) -> None:
    """Settle later the costs that arrive later.

    Revisits calls recorded `estimated` or `unknown` that name a vendor object (a Twilio message
    or call, a Stripe PaymentIntent that was processing, an OpenAI or Anthropic batch), asks the
    vendor for the final figure with the policy's real credential, and corrects the call and every
    budget counter it counted in, in one transaction. Prints what changed. Exits 1 if a vendor
    could not be asked (the other calls are still settled)."""
    from . import reconcile
    from .cli import _config, _store
    from .policy import resolve_credentials
    from .store import StoreUnavailable

    cfg, where = _config(config)
    try:
        creds = resolve_credentials(cfg, where)
    except ConfigError as e:
        raise click.ClickException(f"the policy's credentials do not resolve\n{e}") from None
    ctx = reconcile.context_of(cfg, creds, Prices(fx=dict(cfg.fx), overrides=dict(cfg.prices)))
    store = _store(db)
    try:
        result = reconcile.run(store, ctx, since=since, dry_run=dry_run, limit=limit, timeout=timeout)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except StoreUnavailable as e:
        raise click.ClickException(str(e)) from None
    finally:
        store.close()
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        for outcome in result.outcomes:
            click.echo(outcome.line())
        done = summary.get("would_reconcile" if dry_run else "reconciled", 0)
        delta = Decimal(summary["delta_usd"])
        click.echo(f"{summary['examined']} calls examined: {done} {'would be ' if dry_run else ''}reconciled "
                   f"(delta {'-' if delta < 0 else '+'}{fmt_usd(abs(delta))}), {summary.get('pending', 0)} still pending, "
                   f"{summary.get('error', 0)} errors; {summary['still_estimated_without_object']} other "
                   "estimated/unknown calls name no vendor object to ask about"
                   + (" (dry run: nothing changed)" if dry_run else ""))
    if summary.get("error"):
        raise SystemExit(1)
