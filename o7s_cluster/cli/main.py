"""The `o7s` command: the parser and `main`, which maps errors to exit codes.

Errors are one line on stderr (`o7s: error: ...`), exit 2 for usage and 1 for the rest, with no
traceback and never a password, key or DSN secret in them. Each subcommand module (org, serve, ctl,
usage) adds its commands with `register(subparsers, common)`; they share only cli/common.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from o7s_cluster import __version__
from o7s_cluster.cli import advise, apikey, audit, ctl, org, serve, tier, usage
from o7s_cluster.cli.common import CommandError, Parser, UsageError
from o7s_cluster.config import ConfigError
from o7s_cluster.control_plane.db import CatalogError
from o7s_cluster.control_plane.embedded import EmbeddedError
from o7s_cluster.control_plane.vault import VaultError

MAX_REPORTED_ERRORS = 4  # of an exception group's leaves, in the last-resort message


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--platform-dsn", default=argparse.SUPPRESS, metavar="DSN",
                        help="control-plane Postgres (default: $O7S_PLATFORM_DSN, else $DATABASE_URL)")

    p = Parser(prog="o7s", parents=[common], description="O7s: a multi-tenant PostgreSQL-wire proxy.")
    p.add_argument("--version", action="version", version=f"o7s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    org_sub = org.register(sub, common)  # migrate, keygen, org ...
    apikey.register(org_sub, common)  # org apikey ...
    advise.register(org_sub, common)  # org advise
    tier.register(sub, common)  # tier list|show|create|set|delete
    serve.register(sub, common)
    ctl.register(sub, common)  # `o7s ctl ...`: the admin port's client
    usage.register(sub, common)  # `o7s usage ORG`, `o7s bill --period`
    audit.register(sub, common)  # `o7s audit [ORG]`
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
        print(f"o7s: error: unexpected {describe_unexpected(e)} (set O7S_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def describe_unexpected(exc: BaseException) -> str:
    """Each leaf exception's type and the place it was raised: enough to find the bug, and no message
    (which may hold a DSN or a password). An ExceptionGroup alone says nothing about what failed."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    parts = []
    for leaf in leaves[:MAX_REPORTED_ERRORS]:
        where = ""
        if leaf.__traceback__ is not None:
            frame = traceback.extract_tb(leaf.__traceback__)[-1]
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
        parts.append(f"{type(leaf).__name__}{where}")
    return "; ".join(parts) or type(exc).__name__
