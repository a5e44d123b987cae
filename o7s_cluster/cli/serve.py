"""`o7s serve`: run the proxy, against a control plane or a throwaway local one (embedded mode)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from o7s_cluster.cli.common import CommandError, add_command
from o7s_cluster.config import POOL_MODES, load_settings
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.control_plane.vault import Vault


def cmd_serve(args: argparse.Namespace) -> int:
    flags = {
        "listen": args.listen, "pool_mode": args.pool_mode, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
        "platform_dsn": getattr(args, "platform_dsn", None), "startup_timeout": args.startup_timeout,
        "pool_timeout": args.pool_timeout, "server_idle_timeout": args.server_idle_timeout,
        "server_connect_timeout": args.server_connect_timeout, "max_message_size": args.max_message_size,
        "message_timeout": args.message_timeout, "input_budget": args.input_budget,
        "preauth_budget": args.preauth_budget,
        "log_level": args.log_level, "workers": args.workers, "admin_listen": args.admin,
        "redis_listen": args.redis_listen,
        "drain_timeout": args.drain_timeout, "machine_id": args.machine_id, "redis_url": args.redis_url,
        "engine": args.engine, "ray_address": args.ray_address, "workers_per_node": args.workers_per_node,
        "admin_token": args.admin_token, "admin_auth_reads": True if args.admin_auth_reads else None,
        "jwks_file": args.jwks_file, "jwks_url": args.jwks_url,
        "token_login_plaintext": True if args.token_login_plaintext else None,
    }
    settings = load_settings(args.config, overrides=flags)
    if settings.platform_dsn is None:
        from o7s_cluster.cluster import supervisor as server  # the data path; imported only when serving
        from o7s_cluster.control_plane.embedded import banner, default_admin, embedded_platform

        if settings.admin_listen is None:
            settings = dataclasses.replace(settings, admin_listen=default_admin(settings))
        _check_ports(settings)  # before the throwaway server starts and anything is printed
        key_given = settings.secret_key is not None
        with embedded_platform(settings) as (settings, psql_line):
            print(banner(settings, psql_line, key_given=key_given, venv=_venv()), flush=True)
            _run_server(_engine(settings, server), settings, None)
        return 0
    Admin(settings.platform_dsn).verify(Vault(settings.secret_key))
    _check_ports(settings)
    from o7s_cluster.cluster import supervisor as server

    _run_server(_engine(settings, server), settings, lambda: load_settings(args.config, overrides=flags))
    return 0


def _check_ports(settings: Any) -> None:
    """A taken listen or admin port is an error naming it and its flag, before anything starts. With
    --engine ray the ports are bound on the Ray nodes, not necessarily here: not checked."""
    if settings.engine == "ray":
        return
    from o7s_cluster.cluster.ports import PortError, check_ports

    try:
        check_ports(settings)
    except PortError as e:
        raise CommandError(str(e)) from None


def _venv() -> str | None:
    """The virtualenv this `o7s` runs from (its `bin/activate`), to tell a newcomer how to reach `o7s`."""
    activate = os.path.join(sys.prefix, "bin", "activate")
    return activate if sys.prefix != sys.base_prefix and os.path.exists(activate) else None


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


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve` to the `o7s` parser's subcommands."""
    s = add_command(sub, "serve", cmd_serve, "run the proxy (a throwaway control plane when none is configured)",
                    common)
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
                   "(default: none; embedded mode: 127.0.0.1 and the listen port + 1)")
    s.add_argument("--redis-listen", metavar="HOST:PORT", help="also serve Redis clients (RESP2/RESP3) here,"
                   " for orgs with a Redis database (default: off)")
    s.add_argument("--admin-token", metavar="TOKEN", help="bearer token the admin port requires for changes"
                   " (default: $O7S_ADMIN_TOKEN; none: changes are refused); prefer the environment: flags show in ps")
    s.add_argument("--admin-auth-reads", action="store_true", help="/metrics and /v1/* reads need the admin token"
                   " too (/health and /ready stay open)")
    s.add_argument("--jwks-file", metavar="PATH", help="RS256/ES256 JWT logins: the issuer's public keys (JWKS)")
    s.add_argument("--jwks-url", metavar="URL", help="RS256/ES256 JWT logins: a JWKS URL, fetched in the background"
                   " (every jwks_refresh, 300 s)")
    s.add_argument("--token-login-plaintext", action="store_true", help="accept JWT and API-key logins without TLS"
                   " (the token travels in clear text: trusted networks only)")
    s.add_argument("--drain-timeout", metavar="SECONDS", help="SIGTERM: time open transactions get (default 30)")
    s.add_argument("--machine-id", metavar="N", help="0-127, distinguishes machines in cancel keys (default 0)")
    s.add_argument("--redis-url", metavar="URL", help="shared limits state (default: $REDIS_URL; none: node-local)")
    s.add_argument("--engine", choices=("local", "ray"), help="local: worker processes on this machine (default);"
                   " ray: worker actors on every node of a Ray cluster (docs/SCALING.md)")
    s.add_argument("--ray-address", metavar="ADDR", help="--engine ray: the Ray cluster to join (default:"
                   " $RAY_ADDRESS, else a new local Ray instance)")
    s.add_argument("--workers-per-node", metavar="N", help="--engine ray: workers on each node, 1-64 (default:"
                   " the node's CPUs)")
