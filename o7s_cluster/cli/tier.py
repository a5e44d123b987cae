"""`o7s tier list|show|create|set|delete`: tiers operators define, live on every worker through Redis."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from o7s_cluster.cli.common import add_command, audit, platform_dsn, print_json
from o7s_cluster.control_plane.tiers import COLUMNS, TierAdmin, TierInfo

_LIST_COLS = ("tier", "rank", "max_connections", "max_qps", "pool_size", "max_query_wait_ms", "statement_timeout_ms",
              "work_mem", "can_burst", "base_fee_usd")


def _values(args: argparse.Namespace) -> dict[str, Any]:
    """The column flags given on the command line (None: not given)."""
    return {c.name: getattr(args, c.name) for c in COLUMNS if getattr(args, c.name) is not None}


def _json(t: TierInfo) -> dict[str, Any]:
    return {**{k: (str(v) if not isinstance(v, (bool, int, str)) else v) for k, v in t.values.items()}, "orgs": t.orgs}


def _print_tier(t: TierInfo) -> None:
    width = max(len(c) for c in t.values)
    for k, v in t.values.items():
        print(f"{k + ':':<{width + 2}}{str(v).lower() if isinstance(v, bool) else v}")
    print(f"{'orgs:':<{width + 2}}{t.orgs}")


def _tell_workers(orgs: dict[str, Any]) -> None:
    """Every worker of every machine re-reads the tier table and the orgs' limits within a second."""
    redis_url = os.environ.get("O7S_REDIS_URL") or os.environ.get("REDIS_URL")
    if not redis_url:
        return
    from o7s_cluster.limits.tiers import publish_tier_table_change
    from o7s_cluster.redisconn import REDIS_ERRORS

    try:
        publish_tier_table_change(redis_url, orgs)
    except REDIS_ERRORS as e:
        print(f"o7s: warning: could not tell the workers through Redis ({type(e).__name__}); they pick the"
              " change up when their cache expires", file=sys.stderr)


def cmd_tier_list(args: argparse.Namespace) -> int:
    tiers = TierAdmin(platform_dsn(args)).list_tiers()
    if args.json:
        print_json([_json(t) for t in tiers])
        return 0
    rows = [tuple(c.upper() for c in _LIST_COLS) + ("ORGS",)]
    rows += [tuple(str(t.values[c]).lower() if isinstance(t.values[c], bool) else str(t.values[c])
                   for c in _LIST_COLS) + (str(t.orgs),) for t in tiers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_tier_show(args: argparse.Namespace) -> int:
    t = TierAdmin(platform_dsn(args)).show_tier(args.tier)
    if args.json:
        print_json(_json(t))
    else:
        _print_tier(t)
    return 0


def cmd_tier_create(args: argparse.Namespace) -> int:
    admin = TierAdmin(platform_dsn(args))
    t = admin.create_tier(args.tier, _values(args), like=args.like)
    print(f"created tier {t.name} (rank {t.values['rank']})")
    audit(args, "tier_created", None, tier=t.name, like=args.like, **{k: str(v) for k, v in _values(args).items()})
    _tell_workers({})  # the tier table (hints name the next tier up) changed
    return 0


def cmd_tier_set(args: argparse.Namespace) -> int:
    admin = TierAdmin(platform_dsn(args))
    t, orgs = admin.set_tier_values(args.tier, _values(args))
    print(f"tier {t.name} changed ({len(orgs)} org(s) on it)")
    audit(args, "tier_changed", None, tier=t.name, orgs=len(orgs), **{k: str(v) for k, v in _values(args).items()})
    limits = t.limits()
    _tell_workers({o: limits for o in orgs})
    return 0


def cmd_tier_delete(args: argparse.Namespace) -> int:
    TierAdmin(platform_dsn(args)).delete_tier(args.tier)
    print(f"deleted tier {args.tier}")
    audit(args, "tier_deleted", None, tier=args.tier)
    _tell_workers({})
    return 0


def _add_columns(p: argparse.ArgumentParser) -> None:
    for c in COLUMNS:
        rng = "" if c.kind in ("bool", "work_mem") else f" ({c.lo}..{c.hi})"
        p.add_argument(f"--{c.name.replace('_', '-')}", dest=c.name, metavar="true|false" if c.kind == "bool" else "N",
                       help=f"{c.help}{rng}")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `tier ...` to the `o7s` parser's subcommands."""
    tier = sub.add_parser("tier", help="manage tiers", description="manage tiers").add_subparsers(
        dest="tier_command", metavar="TIER_COMMAND", required=True)
    c = add_command(tier, "list", cmd_tier_list, "list tiers in upgrade order, with the orgs on each", common)
    c.add_argument("--json", action="store_true")
    c = add_command(tier, "show", cmd_tier_show, "show every column of a tier", common)
    c.add_argument("tier", metavar="TIER")
    c.add_argument("--json", action="store_true")
    c = add_command(tier, "create", cmd_tier_create,
                    "create a tier: every column given, or copied from --like TIER (rank: the top by default)", common)
    c.add_argument("tier", metavar="TIER")
    c.add_argument("--like", metavar="TIER", help="copy the columns not given from this tier")
    _add_columns(c)
    c = add_command(tier, "set", cmd_tier_set, "change columns of a tier; live on every worker", common)
    c.add_argument("tier", metavar="TIER")
    _add_columns(c)
    c = add_command(tier, "delete", cmd_tier_delete, "delete a tier (refused while an org is on it)", common)
    c.add_argument("tier", metavar="TIER")
