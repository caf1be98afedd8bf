"""``spendgate prices check`` (and ``spendgate reconcile``): keeping the money numbers true."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from . import pricing
from .paths import config_path, db_path, no_ledger
from .policy import ConfigError, load_config
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
@click.option("--db", "db", default=None, help="Ledger (SQLite file).")
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
        raise click.ClickException(f"cannot read the ledger {path}: {e}") from None
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
