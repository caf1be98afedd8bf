"""``spendgate replay``: the command around :mod:`spendgate.replay` (table, JSON, CSV, exit codes).

Imports mitmproxy only when it runs, so ``spendgate --help`` stays quick.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

FAIL_ON = ("new-refusals", "any-change")


def _cell(d: Any) -> str:
    return f"{d.decision} {d.reason}" if d.reason else d.decision


def table_header() -> str:
    return (f"  {'#':>5}  {'TIME (UTC)':19}  {'KEY':16}  {'CALL':44}  {'THEN':30} {'COST':>10}  "
            f"{'NOW':30} {'COST':>10}")


def table_line(row: Any) -> str:
    from .replay import clock_iso, money

    call = f"{row.method} {row.host}{row.path}"
    call = call if len(call) <= 44 else call[:43] + "…"
    mark = "*" if row.changed else " "
    line = (f"{mark} {row.n:>5}  {clock_iso(row.time)[:19].replace('T', ' '):19}  {row.key[:16]:16}  {call:44}  "
            f"{_cell(row.then)[:30]:30} {money(row.then.cost):>10}  {_cell(row.now)[:30]:30} {money(row.now.cost):>10}")
    if row.now.note and row.changed:
        line += f"  ({row.now.note})"
    return line.rstrip()


CSV_FIELDS = ["n", "time", "key", "method", "host", "path", "changed", "then_decision", "then_reason",
              "then_cost_usd", "now_decision", "now_reason", "now_cost_usd", "now_cost_status", "note", "source"]


def csv_row(row: Any) -> dict[str, Any]:
    from .replay import clock_iso

    return {"n": row.n, "time": clock_iso(row.time), "key": row.key, "method": row.method, "host": row.host,
            "path": row.path, "changed": int(row.changed), "then_decision": row.then.decision,
            "then_reason": row.then.reason or "", "then_cost_usd": str(row.then.cost),
            "now_decision": row.now.decision, "now_reason": row.now.reason or "",
            "now_cost_usd": str(row.now.cost), "now_cost_status": row.now.cost_status or "",
            "note": row.now.note, "source": row.source}


class Progress:
    """One self-overwriting line on stderr: flows replayed, share of the input read, rate."""

    def __init__(self, enabled: bool, out: IO[str] = sys.stderr) -> None:
        self.enabled, self.out = enabled, out
        self.started = self.last = time.monotonic()

    def update(self, n: int, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        share = done / total if total else 1.0
        width = 30
        bar = "#" * int(share * width)
        rate = n / max(now - self.started, 1e-9)
        self.out.write(f"\r[{bar:<{width}}] {share:5.1%}  {n:,} flows  {rate:,.0f}/s ")
        self.out.flush()

    def done(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


@click.command("replay")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--config", "config", default=None, help="The candidate policy file.")
@click.option("--diff", "diff", nargs=2, default=None, metavar="OLD NEW",
              help="Compare two policy files on the same traffic (instead of the capture's decisions).")
@click.option("--policy", "policy", default=None,
              help="Policy for flows captured without spendgate (default: the file's only policy).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: rows, summary, problems.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV rows (the summary goes to stderr).")
@click.option("--only-changed", is_flag=True, help="Show only the rows whose decision changed.")
@click.option("--fail-on", "fail_on", type=click.Choice(FAIL_ON), default=None,
              help="Exit 1 if a call would newly be refused, or if any decision changed.")
@click.option("--progress/--no-progress", default=None, help="A progress line on stderr (default: on a terminal).")
def replay(inputs: tuple[str, ...], config: str | None, diff: tuple[str, str] | None, policy: str | None,
           as_json: bool, as_csv: bool, only_changed: bool, fail_on: str | None, progress: bool | None) -> None:
    """Replay captured traffic (flow files, HAR, directories) against a policy.

    Every request runs through the real pipeline in process, in captured order, against a
    throwaway ledger; nothing is sent. Prints each call then and now, and a summary.
    """
    from .paths import config_path, no_policy
    from .policy import ConfigError
    from .replay import Replay

    if as_json and as_csv:
        raise click.UsageError("--json and --csv are exclusive")
    if diff and config:
        raise click.UsageError("--diff OLD NEW replaces --config")
    old, new = diff if diff else (None, config_path(config))
    if not diff and not Path(new).is_file():
        raise click.ClickException(no_policy(new, config))
    try:
        session = Replay(new, old=old, policy=policy)
    except ConfigError as e:
        raise click.ClickException(f"invalid policy\n{e}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    bar = Progress(sys.stderr.isatty() if progress is None else progress)
    out = sys.stdout
    writer: Any = None
    first = True
    with session:
        rows = session.run(inputs)
        if as_json:
            out.write('{"rows": [')
        elif as_csv:
            writer = csv.DictWriter(out, CSV_FIELDS)
            writer.writeheader()
        else:
            out.write(table_header() + "\n")
        for row in rows:
            reader = session.reader
            if reader is not None:
                bar.update(row.n, reader.bytes_read, reader.bytes_total)
            if only_changed and not row.changed:
                continue
            if as_json:
                out.write(("\n" if first else ",\n") + json.dumps(row.public()))
                first = False
            elif writer is not None:
                writer.writerow(csv_row(row))
            else:
                out.write(table_line(row) + "\n")
        if session.reader is not None:
            bar.update(session.summary.replayed, session.reader.bytes_total, session.reader.bytes_total, force=True)
        bar.done()
        summary = session.summary
        if as_json:
            out.write(f'\n], "summary": {json.dumps(summary.public())}}}\n')
        else:
            dest = sys.stderr if as_csv else out
            lines = [summary.line(),
                     f"replayed {summary.replayed} calls, {summary.changed} changed"
                     + (f", {summary.flagged} counted at an estimate" if summary.flagged else "")]
            if summary.skipped:
                lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped.items())))
            lines += [f"problem: {p}" for p in summary.problems]
            dest.write(("" if as_csv else "\n") + "\n".join(lines) + "\n")
    if fail_on == "new-refusals" and summary.newly_refused:
        raise SystemExit(1)
    if fail_on == "any-change" and summary.changed:
        raise SystemExit(1)
