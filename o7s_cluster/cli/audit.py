"""`o7s audit [ORG] [--since --until] [--kind ...]`: what platform.audit_log holds, oldest first."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from o7s_cluster.cli.common import UsageError, add_command, platform_dsn, print_json
from o7s_cluster.control_plane.audit import MAX_ROWS, query

_AGO = re.compile(r"(\d+)([smhd])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO date or date-time (UTC unless given), or a time ago: 30m, 2h, 7d."""
    now = now or datetime.now(timezone.utc)
    m = _AGO.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"bad time {text!r}: use an ISO date or date-time (2026-12-01, 2026-12-01T10:00)"
                         " or a time ago (30m, 2h, 7d)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _detail(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(d.items()) if v is not None)


def cmd_audit(args: argparse.Namespace) -> int:
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until) if args.until else None
    kinds = [k for group in (args.kind or []) for k in group.split(",") if k]
    rows = query(platform_dsn(args), args.org, since, until, kinds or None, args.limit)
    if args.json:
        print_json([{"at": r.at.isoformat(), "kind": r.kind, "org": r.org, "actor": r.actor, "source": r.source,
                     "method": r.method, "count": r.count, "detail": r.detail} for r in rows])
        return 0
    table = [("AT", "KIND", "ORG", "ACTOR", "SOURCE", "METHOD", "COUNT", "DETAIL")]
    table += [(r.at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), r.kind, r.org or "-", r.actor or "-",
               r.source or "-", r.method or "-", str(r.count), _detail(r.detail) or "-") for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `audit` to the `o7s` parser's subcommands."""
    c = add_command(sub, "audit", cmd_audit, "print the audit log (logins, refusals, breaker trips, admin calls,"
                    " org, tier and API-key changes), oldest first", common)
    c.add_argument("org", metavar="ORG", nargs="?", help="only this org's events")
    c.add_argument("--since", metavar="WHEN", help="ISO date/date-time (UTC unless given) or a time ago: 30m, 2h, 7d")
    c.add_argument("--until", metavar="WHEN", help="same forms as --since (exclusive)")
    c.add_argument("--kind", metavar="KIND", action="append",
                   help="only these kinds (repeat or comma-separate): login_ok, login_failed, connection_refused,"
                        " rate_refused, breaker_trip, admin_call, org_*, tier_*, apikey_*")
    c.add_argument("--limit", type=int, default=1000, metavar="N", help=f"the newest N rows (1..{MAX_ROWS})")
    c.add_argument("--json", action="store_true")
