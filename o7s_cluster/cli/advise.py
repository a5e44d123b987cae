"""`o7s org advise [--since WHEN] [--json]`: orgs that kept hitting their tier's ceilings, and the tier to offer."""

from __future__ import annotations

import argparse
from datetime import timezone
from typing import Any

from o7s_cluster.cli.audit import parse_when
from o7s_cluster.cli.common import add_command, platform_dsn, print_json
from o7s_cluster.control_plane.audit import advise


def cmd_advise(args: argparse.Namespace) -> int:
    found = advise(platform_dsn(args), parse_when(args.since))
    if args.json:
        print_json([{"org": a.org, "tier": a.tier, "suggested_tier": a.suggested_tier, "reason": a.reason,
                     "windows": a.windows, "counts": a.counts, "first": a.first.isoformat(),
                     "last": a.last.isoformat()} for a in found])
        return 0
    if not found:
        print(f"no org hit its ceilings since {args.since}")
        return 0
    rows = [("ORG", "TIER", "SUGGESTED", "REASON", "WINDOWS", "EVIDENCE", "LAST")]
    rows += [(a.org, a.tier, a.suggested_tier or "(top tier)", a.reason, str(a.windows),
              " ".join(f"{k}={v}" for k, v in sorted(a.counts.items())),
              a.last.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")) for a in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def register(org_sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `advise` under `o7s org`."""
    c = add_command(org_sub, "advise", cmd_advise, "list the orgs that would fit a higher tier, with the evidence"
                    " (refused connections, throttled and refused queries)", common)
    c.add_argument("--since", default="24h", metavar="WHEN", help="ISO date/date-time or a time ago (default 24h)")
    c.add_argument("--json", action="store_true")
