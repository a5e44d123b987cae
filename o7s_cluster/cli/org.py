"""`o7s migrate`, `o7s keygen` and `o7s org ...`: control-plane administration."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import asdict
from typing import Any

from o7s_cluster.cli.common import UsageError, add_command, audit, open_vault, platform_dsn, print_json
from o7s_cluster.control_plane.db import DB_TYPES, CatalogError
from o7s_cluster.control_plane.migrate import migrate
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.control_plane.vault import generate_key


def _password(args: argparse.Namespace) -> str:
    """--password, else O7S_ORG_PASSWORD, else asked twice on a terminal."""
    pw = args.password or os.environ.get("O7S_ORG_PASSWORD")
    if pw:
        return pw
    if not sys.stdin.isatty():
        raise UsageError("no org password: pass --password, set O7S_ORG_PASSWORD, or run in a terminal")
    first = getpass.getpass(f"Password for org {args.org}: ")
    if first != getpass.getpass("Repeat it: "):
        raise UsageError("the passwords do not match")
    if not first:
        raise UsageError("the org password must not be empty")
    return first


# ---------------------------------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    applied = migrate(platform_dsn(args))
    print("\n".join(f"applied {name}" for name in applied) if applied else "control plane is up to date")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_key())
    return 0


def cmd_org_create(args: argparse.Namespace) -> int:
    admin, vault = Admin(platform_dsn(args)), open_vault()
    password = _password(args)
    admin.create_org(args.org, args.tier, args.backend, args.type, password, vault, db_name=args.db_name)
    print(f"created org {args.org} (tier {args.tier})")
    audit(args, "org_created", args.org, tier=args.tier, database_type=args.type)
    return 0


def cmd_org_add_db(args: argparse.Namespace) -> int:
    admin, vault = Admin(platform_dsn(args)), open_vault()
    name = admin.add_db(args.org, args.dsn, args.type, vault, db_name=args.db_name)
    print(f"added database {name} to org {args.org}")
    audit(args, "org_db_added", args.org, db_name=name, database_type=args.type)
    return 0


def cmd_org_set_tier(args: argparse.Namespace) -> int:
    admin = Admin(platform_dsn(args))
    try:
        before = admin.show_org(args.org).tier
    except CatalogError:  # set_tier says what is wrong (an unknown tier first)
        before = None
    admin.set_tier(args.org, args.tier)
    print(f"org {args.org} is now on tier {args.tier}")
    audit(args, "org_tier_changed", args.org, from_tier=before, to_tier=args.tier)
    redis_url = os.environ.get("O7S_REDIS_URL") or os.environ.get("REDIS_URL")
    if redis_url:  # every worker of every machine applies it within a second (issue 4)
        from o7s_cluster.redisconn import REDIS_ERRORS
        from o7s_cluster.limits.tiers import publish_tier_change

        try:
            publish_tier_change(redis_url, args.org, admin.show_org(args.org).limits)
        except REDIS_ERRORS as e:
            print(f"o7s: warning: could not tell the workers through Redis ({type(e).__name__}); they pick the"
                  " new tier up when their cache expires", file=sys.stderr)
    return 0


def cmd_org_passwd(args: argparse.Namespace) -> int:
    admin = Admin(platform_dsn(args))
    admin.set_password(args.org, _password(args))
    print(f"password of org {args.org} changed")
    audit(args, "org_password_changed", args.org)
    return 0


def cmd_org_list(args: argparse.Namespace) -> int:
    orgs = Admin(platform_dsn(args)).list_orgs()
    if args.json:
        print_json([asdict(o) for o in orgs])
        return 0
    rows = [("ORG", "TIER", "DATABASES", "CREATED")]
    rows += [(o.name, o.tier, str(o.databases), o.created_at.strftime("%Y-%m-%d %H:%M:%S%z")) for o in orgs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_org_show(args: argparse.Namespace) -> int:
    vault = open_vault() if os.environ.get("O7S_SECRET_KEY") else None  # without a key, DSNs stay hidden
    org = Admin(platform_dsn(args)).show_org(args.org, vault)
    if args.json:
        print_json(asdict(org))
        return 0
    lim = org.limits
    print(f"org:         {org.name}\nid:          {org.id}\ntier:        {org.tier}\ncreated:     {org.created_at}")
    print(f"password:    {'set (SCRAM-SHA-256)' if org.has_password else 'not set'}")
    print(f"limits:      {lim.max_connections} connections, {lim.max_qps} queries/s, pool {lim.pool_size},"
          f" statement_timeout {lim.statement_timeout_ms} ms, work_mem {lim.work_mem}")
    print("databases:" if org.databases else "databases:   none")
    for d in org.databases:
        state = "" if d.is_active else " (inactive)"
        print(f"  {d.db_name}  [{d.database_type}]{state}  {d.target or '(set O7S_SECRET_KEY to show the backend)'}")
    return 0


def cmd_org_delete(args: argparse.Namespace) -> int:
    Admin(platform_dsn(args)).delete_org(args.org)
    print(f"deleted org {args.org}")
    audit(args, "org_deleted", args.org)
    return 0


# ---------------------------------------------------------------------------------------------- parser


def register(sub: Any, common: argparse.ArgumentParser) -> Any:
    """Add `migrate`, `keygen` and `org ...` to the `o7s` parser's subcommands; returns `org`'s subcommands."""
    add_command(sub, "migrate", cmd_migrate, "create or upgrade the platform schema (idempotent)", common)
    add_command(sub, "keygen", cmd_keygen, "print a new O7S_SECRET_KEY", common)

    org = sub.add_parser("org", help="manage orgs", description="manage orgs").add_subparsers(
        dest="org_command", metavar="ORG_COMMAND", required=True)
    c = add_command(org, "create", cmd_org_create, "create an org with its login password and first backend database",
                    common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("--tier", required=True, metavar="TIER", help="a tier (`o7s tier list`; seeded: free, starter, pro, enterprise)")
    c.add_argument("--backend", required=True, metavar="DSN", help="the backend database (URI or key=value)")
    c.add_argument("--password", help="login password (default: $O7S_ORG_PASSWORD, else prompted)")
    c.add_argument("--type", default="postgres", choices=DB_TYPES)
    c.add_argument("--db-name", metavar="NAME", help="database name clients use (default: the DSN's dbname)")

    c = add_command(org, "add-db", cmd_org_add_db, "register another backend database for an org", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("dsn", metavar="DSN")
    c.add_argument("--type", default="postgres", choices=DB_TYPES)
    c.add_argument("--db-name", metavar="NAME", help="database name clients use (default: the DSN's dbname)")

    c = add_command(org, "set-tier", cmd_org_set_tier, "move an org to another tier", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("tier", metavar="TIER", help="a tier (`o7s tier list`; seeded: free, starter, pro, enterprise)")

    c = add_command(org, "passwd", cmd_org_passwd, "set an org's login password", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("--password", help="new password (default: $O7S_ORG_PASSWORD, else prompted twice)")

    c = add_command(org, "list", cmd_org_list, "list orgs", common)
    c.add_argument("--json", action="store_true")
    c = add_command(org, "show", cmd_org_show, "show an org, its limits and databases (no secrets)", common)
    c.add_argument("org", metavar="ORG")
    c.add_argument("--json", action="store_true")
    c = add_command(org, "delete", cmd_org_delete, "delete an org, its login and its database registrations", common)
    c.add_argument("org", metavar="ORG")
    return org
