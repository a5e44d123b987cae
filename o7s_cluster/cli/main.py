"""The `o7s` command: control-plane administration and `o7s serve`.

Errors are one line on stderr (`o7s: error: ...`), exit 2 for usage and 1 for the rest, with no
traceback and never a password, key or DSN secret in them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NoReturn

from o7s_cluster import __version__
from o7s_cluster.control_plane.catalog import DB_TYPES, Admin, CatalogError, migrate
from o7s_cluster.config import POOL_MODES, ConfigError, load_settings
from o7s_cluster.control_plane.embedded import EmbeddedError
from o7s_cluster.control_plane.vault import Vault, VaultError, generate_key


class UsageError(Exception):
    """Bad invocation: exit 2."""


class CommandError(Exception):
    """A failure outside the control plane (e.g. the listen address): exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _platform_dsn(args: argparse.Namespace) -> str:
    dsn = getattr(args, "platform_dsn", None) or os.environ.get("O7S_PLATFORM_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise UsageError("no control-plane DSN: pass --platform-dsn, or set O7S_PLATFORM_DSN or DATABASE_URL")
    return dsn


def _vault() -> Vault:
    return Vault(os.environ.get("O7S_SECRET_KEY"))


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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    applied = migrate(_platform_dsn(args))
    print("\n".join(f"applied {name}" for name in applied) if applied else "control plane is up to date")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_key())
    return 0


def cmd_org_create(args: argparse.Namespace) -> int:
    admin, vault = Admin(_platform_dsn(args)), _vault()
    password = _password(args)
    admin.create_org(args.org, args.tier, args.backend, args.type, password, vault, db_name=args.db_name)
    print(f"created org {args.org} (tier {args.tier})")
    return 0


def cmd_org_add_db(args: argparse.Namespace) -> int:
    admin, vault = Admin(_platform_dsn(args)), _vault()
    name = admin.add_db(args.org, args.dsn, args.type, vault, db_name=args.db_name)
    print(f"added database {name} to org {args.org}")
    return 0


def cmd_org_set_tier(args: argparse.Namespace) -> int:
    admin = Admin(_platform_dsn(args))
    admin.set_tier(args.org, args.tier)
    print(f"org {args.org} is now on tier {args.tier}")
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
    admin = Admin(_platform_dsn(args))
    admin.set_password(args.org, _password(args))
    print(f"password of org {args.org} changed")
    return 0


def cmd_org_list(args: argparse.Namespace) -> int:
    orgs = Admin(_platform_dsn(args)).list_orgs()
    if args.json:
        _print_json([asdict(o) for o in orgs])
        return 0
    rows = [("ORG", "TIER", "DATABASES", "CREATED")]
    rows += [(o.name, o.tier, str(o.databases), o.created_at.strftime("%Y-%m-%d %H:%M:%S%z")) for o in orgs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_org_show(args: argparse.Namespace) -> int:
    vault = _vault() if os.environ.get("O7S_SECRET_KEY") else None  # without a key, DSNs stay hidden
    org = Admin(_platform_dsn(args)).show_org(args.org, vault)
    if args.json:
        _print_json(asdict(org))
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
    Admin(_platform_dsn(args)).delete_org(args.org)
    print(f"deleted org {args.org}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    flags = {
        "listen": args.listen, "pool_mode": args.pool_mode, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
        "platform_dsn": getattr(args, "platform_dsn", None), "startup_timeout": args.startup_timeout,
        "pool_timeout": args.pool_timeout, "server_idle_timeout": args.server_idle_timeout,
        "server_connect_timeout": args.server_connect_timeout, "max_message_size": args.max_message_size,
        "message_timeout": args.message_timeout, "input_budget": args.input_budget,
        "preauth_budget": args.preauth_budget,
        "log_level": args.log_level, "workers": args.workers, "admin_listen": args.admin,
        "drain_timeout": args.drain_timeout, "machine_id": args.machine_id, "redis_url": args.redis_url,
        "engine": args.engine, "ray_address": args.ray_address, "workers_per_node": args.workers_per_node,
        "admin_token": args.admin_token, "admin_auth_reads": True if args.admin_auth_reads else None,
    }
    settings = load_settings(args.config, overrides=flags)
    if settings.platform_dsn is None:
        from o7s_cluster.cluster import supervisor as server  # the data path; imported only when serving
        from o7s_cluster.control_plane.embedded import embedded_platform

        with embedded_platform(settings) as (settings, psql_line):
            print(f"O7s embedded mode: a throwaway control plane and a demo org. Connect with:\n  {psql_line}",
                  flush=True)
            _run_server(_engine(settings, server), settings, None)
        return 0
    Admin(settings.platform_dsn).verify(Vault(settings.secret_key))
    from o7s_cluster.cluster import supervisor as server

    _run_server(_engine(settings, server), settings, lambda: load_settings(args.config, overrides=flags))
    return 0


def _engine(settings: Any, server: Any) -> Any:
    """The module whose run(settings, reload) serves: server (local processes) or engine_ray (Ray actors).
    Ray is imported only here, and only for --engine ray."""
    if settings.engine != "ray":
        return server
    try:
        from o7s_cluster.cluster import engine_ray
    except ImportError as e:
        raise CommandError(f"--engine ray needs Ray ({e.name or e}): pip install 'o7s-cluster[ray]'") from None
    return engine_ray


def _run_server(server: Any, settings: Any, reload: Any) -> None:
    try:
        server.run(settings, reload)
    except OSError as e:  # typically the listen address: in use, not ours, not resolvable
        raise CommandError(f"cannot serve on {settings.listen}: {e.strerror or e}") from None
    except Exception as e:
        from o7s_cluster.cluster.supervisor import ClusterError

        if isinstance(e, ClusterError):
            raise CommandError(str(e)) from None
        raise


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--platform-dsn", default=argparse.SUPPRESS, metavar="DSN",
                        help="control-plane Postgres (default: $O7S_PLATFORM_DSN, else $DATABASE_URL)")

    p = _Parser(prog="o7s", parents=[common], description="O7s: a multi-tenant PostgreSQL-wire proxy.")
    p.add_argument("--version", action="version", version=f"o7s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(parent: Any, name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    cmd(sub, "migrate", cmd_migrate, "create or upgrade the platform schema (idempotent)")
    cmd(sub, "keygen", cmd_keygen, "print a new O7S_SECRET_KEY")

    org = sub.add_parser("org", help="manage orgs", description="manage orgs").add_subparsers(
        dest="org_command", metavar="ORG_COMMAND", required=True)
    c = cmd(org, "create", cmd_org_create, "create an org with its login password and first backend database")
    c.add_argument("org", metavar="ORG")
    c.add_argument("--tier", required=True, metavar="TIER", help="free, starter, pro or enterprise")
    c.add_argument("--backend", required=True, metavar="DSN", help="the backend database (URI or key=value)")
    c.add_argument("--password", help="login password (default: $O7S_ORG_PASSWORD, else prompted)")
    c.add_argument("--type", default="postgres", choices=DB_TYPES)
    c.add_argument("--db-name", metavar="NAME", help="database name clients use (default: the DSN's dbname)")

    c = cmd(org, "add-db", cmd_org_add_db, "register another backend database for an org")
    c.add_argument("org", metavar="ORG")
    c.add_argument("dsn", metavar="DSN")
    c.add_argument("--type", default="postgres", choices=DB_TYPES)
    c.add_argument("--db-name", metavar="NAME", help="database name clients use (default: the DSN's dbname)")

    c = cmd(org, "set-tier", cmd_org_set_tier, "move an org to another tier")
    c.add_argument("org", metavar="ORG")
    c.add_argument("tier", metavar="TIER", help="free, starter, pro or enterprise")

    c = cmd(org, "passwd", cmd_org_passwd, "set an org's login password")
    c.add_argument("org", metavar="ORG")
    c.add_argument("--password", help="new password (default: $O7S_ORG_PASSWORD, else prompted twice)")

    c = cmd(org, "list", cmd_org_list, "list orgs")
    c.add_argument("--json", action="store_true")
    c = cmd(org, "show", cmd_org_show, "show an org, its limits and databases (no secrets)")
    c.add_argument("org", metavar="ORG")
    c.add_argument("--json", action="store_true")
    c = cmd(org, "delete", cmd_org_delete, "delete an org, its login and its database registrations")
    c.add_argument("org", metavar="ORG")

    s = cmd(sub, "serve", cmd_serve, "run the proxy (a throwaway control plane when none is configured)")
    s.add_argument("--config", metavar="PATH", help="TOML settings file (default: $O7S_CONFIG)")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:6432")
    s.add_argument("--pool-mode", choices=POOL_MODES, help="default transaction")
    s.add_argument("--tls-cert", metavar="PATH")
    s.add_argument("--tls-key", metavar="PATH")
    s.add_argument("--startup-timeout", metavar="SECONDS")
    s.add_argument("--pool-timeout", metavar="SECONDS")
    s.add_argument("--server-idle-timeout", metavar="SECONDS")
    s.add_argument("--server-connect-timeout", metavar="SECONDS")
    s.add_argument("--max-message-size", metavar="BYTES")
    s.add_argument("--message-timeout", metavar="SECONDS",
                   help="give up a client message that stops arriving mid-way after this (30)")
    s.add_argument("--input-budget", metavar="BYTES",
                   help="a worker's bytes of partial client messages, past 64 KiB each (256MiB)")
    s.add_argument("--preauth-budget", metavar="BYTES",
                   help="a worker's bytes held for clients that have not logged in (32MiB)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    s.add_argument("--workers", metavar="N", help="worker processes (default: one per core)")
    s.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP port: /health /ready /metrics /v1/... "
                   "(default: none)")
    s.add_argument("--admin-token", metavar="TOKEN", help="bearer token the admin port requires for changes"
                   " (default: $O7S_ADMIN_TOKEN; none: changes are refused); prefer the environment: flags show in ps")
    s.add_argument("--admin-auth-reads", action="store_true", help="/metrics and /v1/* reads need the admin token"
                   " too (/health and /ready stay open)")
    s.add_argument("--drain-timeout", metavar="SECONDS", help="SIGTERM: time open transactions get (default 30)")
    s.add_argument("--machine-id", metavar="N", help="0-127, distinguishes machines in cancel keys (default 0)")
    s.add_argument("--redis-url", metavar="URL", help="shared limits state (default: $REDIS_URL; none: node-local)")
    s.add_argument("--engine", choices=("local", "ray"), help="local: worker processes on this machine (default);"
                   " ray: worker actors on every node of a Ray cluster (docs/SCALING.md)")
    s.add_argument("--ray-address", metavar="ADDR", help="--engine ray: the Ray cluster to join (default:"
                   " $RAY_ADDRESS, else a new local Ray instance)")
    s.add_argument("--workers-per-node", metavar="N", help="--engine ray: workers on each node, 1-64 (default:"
                   " the node's CPUs)")

    from o7s_cluster.cli.ctl import register as register_ctl  # `o7s ctl ...`: the admin port's client

    register_ctl(sub, common)
    from o7s_cluster.cli.usage import register as register_usage  # `o7s usage ORG`, `o7s bill --period`

    register_usage(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"o7s: error: {e}", file=sys.stderr)
        return 2
    except (CatalogError, VaultError, ConfigError, CommandError, EmbeddedError) as e:
        print(f"o7s: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("o7s: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:  # noqa: BLE001 - last resort; the message may hold secrets, so only its type
        if os.environ.get("O7S_DEBUG"):
            raise
        print(f"o7s: error: unexpected {type(e).__name__} (set O7S_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
