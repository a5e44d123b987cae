"""Upgrade advice (issue 13.5): an org that keeps hitting its ceilings in a window gets an analytics event.

At each window close the recorder looks at what it took: connections refused (audit.py) and queries throttled
or refused by the rate (the usage counters), per org. `ADVICE_MIN` or more of either in one window of one
worker make an `upgrade_suggested` event with the reason (`exceeded_connection_limit`, `exceeded_qps_limit`),
the counts, the org's tier and the tier to suggest: the next one up in platform.tier_limits (rank order)
whose limit for that reason is higher. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from o7s_cluster.usage.audit import CONNECTION_REFUSED

ADVICE_MIN = 5  # ceiling hits of one kind in one window of one worker that make an upgrade suggestion
UPGRADE_SUGGESTED = "upgrade_suggested"
CONNECTIONS = "exceeded_connection_limit"
QPS = "exceeded_qps_limit"
_LIMIT = {CONNECTIONS: "max_connections", QPS: "max_qps"}

Candidate = tuple[str, str, str | None, str, dict[str, int]]  # org id, org, tier, reason, counts


def candidates(taken: Sequence[tuple], audit: dict[tuple, int]) -> list[Candidate]:
    """The orgs over ADVICE_MIN in this window, from the recorder's snapshot (usage deltas, audit table)."""
    rate: dict[str, list[Any]] = {}  # org id -> [org, tier, throttled, refused]
    for org_id, org, _db_type, tier, snap in taken:
        if org_id is None:
            continue
        r = rate.setdefault(org_id, [org, tier, 0, 0])
        r[2] += snap[2]
        r[3] += snap[3]
    conns: dict[str, list[Any]] = {}  # org id -> [org, tier, refused connections]
    for key, n in audit.items():
        kind, org, org_id, _actor, _source, _method, detail = key
        if kind == CONNECTION_REFUSED and org_id is not None:
            c = conns.setdefault(org_id, [org, dict(detail).get("tier"), 0])
            c[2] += n
    out: list[Candidate] = []
    for org_id, (org, tier, n) in conns.items():
        if n >= ADVICE_MIN:
            out.append((org_id, org, tier, CONNECTIONS, {"refused_connections": n}))
    for org_id, (org, tier, throttled, refused) in rate.items():
        if throttled + refused >= ADVICE_MIN:
            out.append((org_id, org, tier, QPS, {"throttled_queries": throttled, "refused_queries": refused}))
    return out


def suggest(tiers: Sequence[Any], tier: str | None, reason: str) -> str | None:
    """The next tier up (rank order) with a higher limit for `reason`; None on the top one or an unknown tier."""
    attr = _LIMIT[reason]
    for i, t in enumerate(tiers):
        if t.tier == tier:
            for up in tiers[i + 1:]:
                if getattr(up, attr) > getattr(t, attr):
                    return up.tier
            return None
    return None


def records(found: list[Candidate], tiers: Sequence[Any], make_id: Any, worker: str, start: datetime,
            end: datetime) -> list[Any]:
    from o7s_cluster.usage.records import AnalyticsRecord

    return [AnalyticsRecord(id=make_id(f"advice:{org_id}:{reason}"), at=end, kind=UPGRADE_SUGGESTED, org=org,
                            org_id=org_id, from_tier=tier, suggested_tier=suggest(tiers, tier, reason),
                            reason=reason, counts=counts, worker=worker, period_start=start)
            for org_id, org, tier, reason, counts in found]
