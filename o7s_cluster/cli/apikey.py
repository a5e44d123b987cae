"""`o7s org apikey create|list|revoke`: an org's API keys (the key is printed once, stored hashed)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from o7s_cluster.cli.common import add_command, audit, platform_dsn, print_json
from o7s_cluster.control_plane.apikeys import KeyAdmin, KeyInfo, parse_expiry


def _when(t: Any) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S%z")


def _row(k: KeyInfo) -> dict[str, Any]:
    return {"name": k.name, "prefix": k.prefix, "state": k.state, "created_at": k.created_at,
            "last_used_at": k.last_used_at, "expires_at": k.expires_at, "revoked_at": k.revoked_at}


def cmd_create(args: argparse.Namespace) -> int:
    expires = parse_expiry(args.expires) if args.expires else None
    key, info = KeyAdmin(platform_dsn(args)).create_key(args.org, args.name, expires)
    print(key)  # the only time it is shown: only its hash is stored
    audit(args, "apikey_created", args.org, name=info.name, prefix=info.prefix,
          expires_at=info.expires_at.isoformat() if info.expires_at else None)
    print(f"created API key {info.name} (prefix {info.prefix}) for org {args.org}"
          f"{', expires ' + _when(info.expires_at) if info.expires_at else ''}; it is not shown again."
          f" Log in as user token.{args.org} with the key as the password.", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys = KeyAdmin(platform_dsn(args)).list_keys(args.org)
    if args.json:
        print_json([_row(k) for k in keys])
        return 0
    rows = [("NAME", "PREFIX", "STATE", "CREATED", "LAST USED", "EXPIRES")]
    rows += [(k.name, k.prefix, k.state, _when(k.created_at), _when(k.last_used_at), _when(k.expires_at)) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    info = KeyAdmin(platform_dsn(args)).revoke_key(args.org, args.key)
    print(f"revoked API key {info.name} (prefix {info.prefix}) of org {args.org}")
    audit(args, "apikey_revoked", args.org, name=info.name, prefix=info.prefix)
    redis_url = os.environ.get("O7S_REDIS_URL") or os.environ.get("REDIS_URL")
    if redis_url:  # every worker drops its cached keys now, not at the end of its cache time
        from o7s_cluster.limits.tiers import publish_tier_change
        from o7s_cluster.redisconn import REDIS_ERRORS

        try:
            publish_tier_change(redis_url, args.org, None)  # "look this org up again", as after a tier change
        except REDIS_ERRORS as e:
            print(f"o7s: warning: could not tell the workers through Redis ({type(e).__name__}); the key stops"
                  " working when their cache expires (catalog_ttl)", file=sys.stderr)
    return 0


def register(org_sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `apikey ...` under `o7s org`."""
    ak = org_sub.add_parser("apikey", help="manage an org's API keys", description="manage an org's API keys"
                            ).add_subparsers(dest="apikey_command", metavar="APIKEY_COMMAND", required=True)
    c = add_command(ak, "create", cmd_create, "create an API key and print it (once)", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("--name", metavar="NAME", help="a name unique in the org (default: the key's prefix)")
    c.add_argument("--expires", metavar="DATE", help="ISO date or date-time (UTC unless given), e.g. 2027-01-31")
    c = add_command(ak, "list", cmd_list, "list an org's keys: name, prefix, state, creation, last use, expiry", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("--json", action="store_true")
    c = add_command(ak, "revoke", cmd_revoke, "revoke a key (by name or prefix); live on every worker", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("key", metavar="NAME|PREFIX")
