"""Invoices and cost attribution from usage records (seed 001 sections 4.3 and 6), in Decimal.

Invoice of an org for a month, at its tier's prices (platform.tier_limits):
    vCPU overage hours   = max(0, vCPU-hours used - included vCPU-hours)
    memory overage hours = max(0, memory-GB-hours used - included memory-GB-hours)
    each overage charge  = overage hours x the tier's rate, rounded to the cent (half up)
    total                = base fee + vCPU overage charge + memory overage charge
The free tier has no overage rates (0): past its included hours it still costs 0 and is flagged
`over_included` ("must upgrade", seed 001 section 4.3).

Cost attribution (seed 001 section 6), given the month's infrastructure bill:
    metered cost of an org = vCPU-hours x 3600 x $0.000002156 + memory-GB-hours x 3600 x $0.000001078
                             + bytes sent to clients / 1e9 x $0.10          (Railway's rates, seed 6.1)
    infrastructure share   = the bill split over the orgs in proportion to their metered cost (evenly
                             when nothing was metered), in cents, largest remainder, so shares add up
    cost = metered cost + infrastructure share;  profit = invoice total - cost
    gross margin of a tier (and in total) = (revenue - cost) / revenue   (none without revenue)
As in the seed's margin analysis, costs are the infrastructure bill plus the tenants' metered costs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")
HOURS = Decimal("0.000001")  # hours shown with 6 decimals (3.6 ms)
RAILWAY_VCPU_SECOND = Decimal("0.000002156")
RAILWAY_GB_SECOND = Decimal("0.000001078")
RAILWAY_EGRESS_GB = Decimal("0.10")
VCPU_HOUR_COST = RAILWAY_VCPU_SECOND * 3600  # $0.0077616
GB_HOUR_COST = RAILWAY_GB_SECOND * 3600  # $0.0038808


@dataclass(frozen=True)
class TierPrice:
    tier: str
    rank: int
    base_fee: Decimal
    included_vcpu_hours: Decimal
    included_memory_gb_hours: Decimal
    overage_vcpu_usd: Decimal
    overage_memory_gb_usd: Decimal


def _d(v: Any) -> Decimal:
    return v if isinstance(v, Decimal) else Decimal(str(v))


# Seed 001 section 4.3, as in migrations/001_platform.sql (used when no control plane is at hand: tests).
SEED_TIERS: dict[str, TierPrice] = {
    t.tier: t for t in (
        TierPrice("free", 0, _d(0), _d(5), _d(10), _d(0), _d(0)),
        TierPrice("starter", 1, _d(10), _d(25), _d(50), _d("0.15"), _d("0.05")),
        TierPrice("pro", 2, _d(50), _d(200), _d(500), _d("0.12"), _d("0.04")),
        TierPrice("enterprise", 3, _d(200), _d(1000), _d(2000), _d("0.10"), _d("0.03")),
    )
}


@dataclass(frozen=True)
class OrgUsage:
    org: str
    tier: str
    vcpu_hours: Decimal = Decimal(0)
    memory_gb_hours: Decimal = Decimal(0)
    queries: int = 0
    bytes_out: int = 0
    org_id: str | None = None


@dataclass(frozen=True)
class Invoice:
    org: str
    tier: str
    period: str
    base_fee: Decimal
    vcpu_hours: Decimal
    vcpu_included: Decimal
    vcpu_overage_hours: Decimal
    vcpu_rate: Decimal
    vcpu_overage_usd: Decimal
    memory_gb_hours: Decimal
    memory_included: Decimal
    memory_overage_hours: Decimal
    memory_rate: Decimal
    memory_overage_usd: Decimal
    total: Decimal
    over_included: bool  # used more than included (on the free tier: not billed, upgrade needed)
    queries: int = 0


def invoice(usage: OrgUsage, tier: TierPrice, period: str) -> Invoice:
    vcpu, mem = _d(usage.vcpu_hours), _d(usage.memory_gb_hours)
    v_over = max(Decimal(0), vcpu - tier.included_vcpu_hours)
    m_over = max(Decimal(0), mem - tier.included_memory_gb_hours)
    v_usd = (v_over * tier.overage_vcpu_usd).quantize(CENT, ROUND_HALF_UP)
    m_usd = (m_over * tier.overage_memory_gb_usd).quantize(CENT, ROUND_HALF_UP)
    base = tier.base_fee.quantize(CENT)
    return Invoice(
        org=usage.org, tier=tier.tier, period=period, base_fee=base,
        vcpu_hours=vcpu, vcpu_included=tier.included_vcpu_hours, vcpu_overage_hours=v_over,
        vcpu_rate=tier.overage_vcpu_usd, vcpu_overage_usd=v_usd,
        memory_gb_hours=mem, memory_included=tier.included_memory_gb_hours, memory_overage_hours=m_over,
        memory_rate=tier.overage_memory_gb_usd, memory_overage_usd=m_usd,
        total=base + v_usd + m_usd, over_included=bool(v_over or m_over), queries=usage.queries,
    )


def metered_cost(usage: OrgUsage) -> Decimal:
    """What the org's metered use costs at Railway's rates (seed 001 section 6.1), unrounded."""
    return (_d(usage.vcpu_hours) * VCPU_HOUR_COST + _d(usage.memory_gb_hours) * GB_HOUR_COST
            + Decimal(usage.bytes_out) / Decimal(10**9) * RAILWAY_EGRESS_GB)


def allocate(total: Decimal, weights: Sequence[Decimal]) -> list[Decimal]:
    """Split `total` (in cents) in proportion to `weights` (evenly if all are 0); the parts add up exactly."""
    if not weights:
        return []
    cents = int((total / CENT).to_integral_value(ROUND_HALF_UP))
    w = [max(Decimal(0), _d(x)) for x in weights]
    s = sum(w)
    if s == 0:
        w, s = [Decimal(1)] * len(weights), Decimal(len(weights))
    exact = [Decimal(cents) * x / s for x in w]
    floor = [int(e.to_integral_value(ROUND_DOWN)) for e in exact]
    left = cents - sum(floor)
    # the largest remainders get the leftover cents (ties: the earlier one)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floor[i]), i))
    for i in order[:left]:
        floor[i] += 1
    return [Decimal(c) * CENT for c in floor]


def gross_margin(revenue: Decimal, cost: Decimal) -> Decimal | None:
    """(revenue - cost) / revenue, as a percentage with 2 decimals; None without revenue."""
    if revenue <= 0:
        return None
    return ((revenue - cost) / revenue * 100).quantize(CENT, ROUND_HALF_UP)


@dataclass(frozen=True)
class CostLine:
    org: str
    tier: str
    revenue: Decimal
    metered_cost: Decimal  # micro-dollars
    infra_share: Decimal  # cents
    cost: Decimal
    profit: Decimal


@dataclass(frozen=True)
class TierSummary:
    tier: str
    orgs: int
    revenue: Decimal
    metered_cost: Decimal
    infra_share: Decimal
    cost: Decimal
    profit: Decimal
    margin_pct: Decimal | None


@dataclass
class Bill:
    period: str
    invoices: list[Invoice]
    infra_cost: Decimal | None = None
    costs: list[CostLine] = field(default_factory=list)
    tiers: list[TierSummary] = field(default_factory=list)
    total: TierSummary | None = None

    @property
    def revenue(self) -> Decimal:
        return sum((i.total for i in self.invoices), Decimal(0))


def build_bill(period: str, usages: Iterable[OrgUsage], tiers: dict[str, TierPrice],
               infra_cost: Decimal | None = None) -> Bill:
    usages = sorted(usages, key=lambda u: (tiers[u.tier].rank if u.tier in tiers else 99, u.org))
    invoices = [invoice(u, tiers[u.tier], period) for u in usages]
    bill = Bill(period, invoices)
    if infra_cost is None:
        return bill
    infra_cost = _d(infra_cost).quantize(CENT, ROUND_HALF_UP)
    bill.infra_cost = infra_cost
    metered = [metered_cost(u).quantize(MICRO, ROUND_HALF_UP) for u in usages]
    shares = allocate(infra_cost, [metered_cost(u) for u in usages])
    for u, inv, m, sh in zip(usages, invoices, metered, shares):
        cost = m + sh
        bill.costs.append(CostLine(u.org, u.tier, inv.total, m, sh, cost, inv.total - cost))

    def summary(name: str, lines: list[CostLine]) -> TierSummary:
        rev = sum((c.revenue for c in lines), Decimal(0))
        met = sum((c.metered_cost for c in lines), Decimal(0))
        sh = sum((c.infra_share for c in lines), Decimal(0))
        cost = met + sh
        return TierSummary(name, len(lines), rev, met, sh, cost, rev - cost, gross_margin(rev, cost))

    order = sorted({c.tier for c in bill.costs}, key=lambda t: tiers[t].rank if t in tiers else 99)
    bill.tiers = [summary(t, [c for c in bill.costs if c.tier == t]) for t in order]
    bill.total = summary("total", bill.costs)
    return bill


# ------------------------------------------------------------------------------------------- periods


def month_bounds(period: str) -> tuple[datetime, datetime]:
    m = re.fullmatch(r"(\d{4})-(\d{2})", period.strip())
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise ValueError(f"expected a month as YYYY-MM, got {period!r}")
    y, mo = int(m.group(1)), int(m.group(2))
    start = datetime(y, mo, 1, tzinfo=timezone.utc)
    end = datetime(y + (mo == 12), 1 if mo == 12 else mo + 1, 1, tzinfo=timezone.utc)
    return start, end


# ------------------------------------------------------------------------------------------- control plane


def load_tiers(conn: Any) -> dict[str, TierPrice]:
    rows = conn.execute(
        "SELECT tier, rank, base_fee_usd, included_vcpu_hours, included_memory_gb_hours,"
        " overage_vcpu_usd, overage_memory_gb_usd FROM platform.tier_limits ORDER BY rank").fetchall()
    return {r[0]: TierPrice(r[0], r[1], *(_d(x) for x in r[2:])) for r in rows}


def load_usage(conn: Any, period: str, org: str | None = None) -> list[OrgUsage]:
    """Every org (with or without usage) and its usage in the month, by its current tier."""
    start, end = month_bounds(period)
    rows = conn.execute(
        "SELECT o.id::text, o.name, o.tier, coalesce(sum(u.vcpu_hours), 0), coalesce(sum(u.memory_gb_hours), 0),"
        " coalesce(sum(u.query_count), 0), coalesce(sum(u.bytes_out), 0)"
        " FROM platform.organizations o LEFT JOIN platform.usage_metrics u"
        "   ON u.org_id = o.id AND u.period_start >= %s AND u.period_start < %s"
        " WHERE %s::text IS NULL OR o.name = %s"
        " GROUP BY o.id, o.name, o.tier ORDER BY o.name",
        (start, end, org, org)).fetchall()
    return [OrgUsage(r[1], r[2], _d(r[3]), _d(r[4]), int(r[5]), int(r[6]), r[0]) for r in rows]


def unattributed(conn: Any, period: str) -> tuple[int, Decimal]:
    """Records of the month with no org (deleted orgs, failed logins under unknown names): (rows, vCPU-hours)."""
    start, end = month_bounds(period)
    r = conn.execute("SELECT count(*), coalesce(sum(vcpu_hours), 0) FROM platform.usage_metrics"
                     " WHERE org_id IS NULL AND period_start >= %s AND period_start < %s", (start, end)).fetchone()
    return int(r[0]), _d(r[1])
