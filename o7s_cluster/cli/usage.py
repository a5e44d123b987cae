"""`o7s usage ORG` and `o7s bill --period YYYY-MM`: usage reports and invoices from platform.usage_metrics.

Registered into the `o7s` parser by `register(subparsers, common)` (called from cli.main.build_parser).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from o7s_cluster.cli.common import UsageError, platform_dsn
from o7s_cluster.control_plane.db import CatalogError
from o7s_cluster.control_plane.db import connect as connect_platform
from o7s_cluster.usage import billing

FORMATS = ("table", "json", "csv")
_BY = {"window": None, "hour": "hour", "day": "day", "month": "month"}


def _connect(args: argparse.Namespace) -> Any:
    return connect_platform(platform_dsn(args))


def parse_when(value: str, *, end: bool = False) -> datetime:
    """YYYY-MM-DD, YYYY-MM or an ISO timestamp; no zone means UTC. A bare date/month as --until is inclusive."""
    v = value.strip()
    try:
        if len(v) == 7 and v[4] == "-":
            start, nxt = billing.month_bounds(v)
            return nxt if end else start
        if len(v) == 10:
            d = datetime.combine(date.fromisoformat(v), datetime.min.time(), timezone.utc)
            return d + timedelta(days=1) if end else d
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except ValueError:
        raise UsageError(f"expected a date (YYYY-MM-DD, YYYY-MM or an ISO timestamp), got {value!r}") from None


def _num(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def _emit(rows: list[dict[str, Any]], fmt: str, out: Any = None, *, title: str | None = None) -> None:
    out = out or sys.stdout
    if fmt == "csv":
        if rows:
            w = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: _num(v) for k, v in r.items()})
        return
    if title:
        print(title, file=out)
    if not rows:
        print("  (none)", file=out)
        return
    cols = list(rows[0])
    cells = [[c.upper() for c in cols]] + [["" if r[c] is None else str(_num(r[c])) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip(),
              file=out)


# ---------------------------------------------------------------------------------------------- o7s usage


USAGE_COLUMNS = (
    "sum(query_count)::bigint AS queries, sum(error_count)::bigint AS errors,"
    " sum(throttled_count)::bigint AS throttled, sum(refused_count)::bigint AS refused,"
    " sum(row_count)::bigint AS rows, sum(bytes_in)::bigint AS bytes_in, sum(bytes_out)::bigint AS bytes_out,"
    " round(sum(query_seconds)::numeric, 3) AS query_s, round(sum(backend_seconds)::numeric, 3) AS backend_s,"
    " max(peak_connections) AS peak_conn, sum(auth_failures)::bigint AS auth_failures,"
    " round(sum(vcpu_hours), 6) AS vcpu_hours, round(sum(memory_gb_hours), 6) AS memory_gb_hours"
)


def usage_rows(conn: Any, org: str, since: datetime, until: datetime, by: str | None) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    cur = conn.cursor(row_factory=dict_row)
    found = cur.execute("SELECT id FROM platform.organizations WHERE name = %s", (org,)).fetchone()
    if found is None:
        raise CatalogError(f"no org named {org!r}")
    # per-worker rows of the same window are summed; peak connections are the highest one worker saw
    bucket = "period_start" if by is None else f"date_trunc('{by}', period_start AT TIME ZONE 'UTC')"
    rows = cur.execute(
        f"SELECT {bucket} AS period, database_type AS db_type, {USAGE_COLUMNS}"
        " FROM platform.usage_metrics WHERE org_id = %s AND period_start >= %s AND period_start < %s"
        " GROUP BY 1, 2 ORDER BY 1, 2", (found["id"], since, until)).fetchall()
    if rows:
        total = cur.execute(
            f"SELECT 'total' AS period, '' AS db_type, {USAGE_COLUMNS}"
            " FROM platform.usage_metrics WHERE org_id = %s AND period_start >= %s AND period_start < %s",
            (found["id"], since, until)).fetchone()
        rows.append(total)
    for r in rows:
        if isinstance(r["period"], datetime):
            p = r["period"]
            r["period"] = (p.replace(tzinfo=timezone.utc) if p.tzinfo is None else p).astimezone(
                timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ" if by in (None, "hour") else "%Y-%m-%d")
            if by == "month":
                r["period"] = r["period"][:7]
    return rows


def cmd_usage(args: argparse.Namespace) -> int:
    now = datetime.now(timezone.utc)
    since = parse_when(args.since) if args.since else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    until = parse_when(args.until, end=True) if args.until else now + timedelta(seconds=1)
    if until <= since:
        raise UsageError("--until must be after --since")
    with _connect(args) as conn:
        rows = usage_rows(conn, args.org, since, until, _BY[args.by])
    if args.format == "json":
        print(json.dumps({"org": args.org, "since": since.isoformat(), "until": until.isoformat(),
                          "rows": [{k: _num(v) for k, v in r.items()} for r in rows]}, indent=2))
        return 0
    title = (f"usage of org {args.org} from {since:%Y-%m-%d %H:%M:%S}Z to {until:%Y-%m-%d %H:%M:%S}Z"
             if args.format == "table" else None)
    _emit(rows, args.format, title=title)
    return 0


# ---------------------------------------------------------------------------------------------- o7s bill


def bill_document(bill: billing.Bill, unattributed: tuple[int, Decimal] = (0, Decimal(0))) -> dict[str, Any]:
    def inv(i: billing.Invoice) -> dict[str, Any]:
        return {
            "org": i.org, "tier": i.tier, "queries": i.queries, "base_fee": str(i.base_fee),
            "vcpu_hours": str(i.vcpu_hours.quantize(billing.HOURS)), "vcpu_included": str(i.vcpu_included),
            "vcpu_overage_hours": str(i.vcpu_overage_hours.quantize(billing.HOURS)),
            "vcpu_rate": str(i.vcpu_rate), "vcpu_overage_usd": str(i.vcpu_overage_usd),
            "memory_gb_hours": str(i.memory_gb_hours.quantize(billing.HOURS)),
            "memory_included": str(i.memory_included),
            "memory_overage_hours": str(i.memory_overage_hours.quantize(billing.HOURS)),
            "memory_rate": str(i.memory_rate), "memory_overage_usd": str(i.memory_overage_usd),
            "total": str(i.total), "over_included": i.over_included,
        }

    def tier(t: billing.TierSummary) -> dict[str, Any]:
        return {"tier": t.tier, "orgs": t.orgs, "revenue": str(t.revenue), "metered_cost": str(t.metered_cost),
                "infra_share": str(t.infra_share), "cost": str(t.cost), "profit": str(t.profit),
                "margin_pct": None if t.margin_pct is None else str(t.margin_pct)}

    doc: dict[str, Any] = {"period": bill.period, "revenue": str(bill.revenue),
                           "invoices": [inv(i) for i in bill.invoices],
                           "unattributed_records": unattributed[0]}
    if bill.infra_cost is not None:
        doc["infra_cost"] = str(bill.infra_cost)
        doc["costs"] = [{"org": c.org, "tier": c.tier, "revenue": str(c.revenue), "metered_cost": str(c.metered_cost),
                         "infra_share": str(c.infra_share), "cost": str(c.cost), "profit": str(c.profit)}
                        for c in bill.costs]
        doc["tiers"] = [tier(t) for t in bill.tiers]
        doc["total"] = tier(bill.total) if bill.total else None
    return doc


def print_bill(bill: billing.Bill, fmt: str, unattributed: tuple[int, Decimal] = (0, Decimal(0)),
               out: Any = None) -> None:
    out = out or sys.stdout
    doc = bill_document(bill, unattributed)
    if fmt == "json":
        print(json.dumps(doc, indent=2), file=out)
        return
    if fmt == "csv":  # one row per org: the invoice, then its cost attribution when there is one
        costs = {c["org"]: c for c in doc.get("costs", [])}
        rows = []
        for i in doc["invoices"]:
            row = {"period": bill.period, **i}
            if costs:
                c = costs[i["org"]]
                row.update(metered_cost=c["metered_cost"], infra_share=c["infra_share"], cost=c["cost"],
                           profit=c["profit"])
            rows.append(row)
        _emit(rows, "csv", out)
        return
    inv_rows = [{"org": i["org"], "tier": i["tier"], "queries": i["queries"], "base_fee": i["base_fee"],
                 "vcpu_h": i["vcpu_hours"], "incl": i["vcpu_included"], "over_h": i["vcpu_overage_hours"],
                 "vcpu_usd": i["vcpu_overage_usd"], "mem_gb_h": i["memory_gb_hours"],
                 "incl ": i["memory_included"], "over_h ": i["memory_overage_hours"],
                 "mem_usd": i["memory_overage_usd"], "total": i["total"],
                 "note": "over included: upgrade" if i["over_included"] and i["tier"] == "free"
                 else ("overage" if i["over_included"] else "")} for i in doc["invoices"]]
    _emit(inv_rows, "table", out, title=f"Invoices {bill.period} (USD; hours used, included and over)")
    print(f"revenue: ${doc['revenue']}", file=out)
    if unattributed[0]:
        print(f"unattributed usage records (no org): {unattributed[0]}", file=out)
    if bill.infra_cost is None:
        return
    print(file=out)
    _emit(doc["costs"], "table", out,
          title=f"Cost attribution {bill.period}: infrastructure ${bill.infra_cost} split by metered use")
    print(file=out)
    tiers = [*doc["tiers"], doc["total"]]
    for t in tiers:
        t["margin_pct"] = "n/a" if t["margin_pct"] is None else t["margin_pct"] + "%"
    _emit(tiers, "table", out, title="Gross margin per tier")


def _money(value: str) -> Decimal:
    try:
        d = Decimal(value.strip().lstrip("$"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {value!r}")
    return d


def cmd_bill(args: argparse.Namespace) -> int:
    try:
        billing.month_bounds(args.period)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with _connect(args) as conn:
        tiers = billing.load_tiers(conn)
        usages = billing.load_usage(conn, args.period)
        missing = billing.unattributed(conn, args.period)
    if args.org and not any(u.org == args.org for u in usages):
        raise CatalogError(f"no org named {args.org!r}")
    bill = billing.build_bill(args.period, usages, tiers, args.infra_cost)
    if args.org:  # the split and the tier margins stay those of every org; only the lines are filtered
        bill.invoices = [i for i in bill.invoices if i.org == args.org]
        bill.costs = [c for c in bill.costs if c.org == args.org]
    print_bill(bill, args.format, missing)
    return 0


# ---------------------------------------------------------------------------------------------- parser


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    u = sub.add_parser("usage", parents=[common], help="an org's usage (from platform.usage_metrics)",
                       description="Print an org's usage: queries, errors, throttled/refused, rows, bytes, "
                                   "time, peak connections, auth failures and the vCPU/memory estimates.")
    u.set_defaults(func=cmd_usage)
    u.add_argument("org", metavar="ORG")
    u.add_argument("--since", metavar="WHEN", help="YYYY-MM-DD, YYYY-MM or ISO time, UTC (default: this month)")
    u.add_argument("--until", metavar="WHEN", help="exclusive time, or an inclusive day/month (default: now)")
    u.add_argument("--by", choices=tuple(_BY), default="day", help="one row per window, hour, day (default), month")
    u.add_argument("--format", choices=FORMATS, default="table")

    b = sub.add_parser("bill", parents=[common], help="invoices, cost attribution and margins for a month",
                       description="Print each org's invoice for a month (base fee, included and overage "
                                   "vCPU-hours and memory-GB-hours at its tier's rates); with --infra-cost, the "
                                   "cost attribution per org and the gross margin per tier.")
    b.set_defaults(func=cmd_bill)
    b.add_argument("--period", required=True, metavar="YYYY-MM")
    b.add_argument("--infra-cost", type=_money, metavar="USD", help="the month's infrastructure bill")
    b.add_argument("--org", metavar="ORG", help="only this org's lines (shares and margins are still computed over every org)")
    b.add_argument("--format", choices=FORMATS, default="table")
