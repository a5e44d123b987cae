"""What every `o7s` subcommand module shares: the error types `main` maps to exit codes, the parser class,
and the control-plane DSN, key and JSON output helpers. Imports nothing else of cli/."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, NoReturn

from o7s_cluster.control_plane.vault import Vault


def audit(args: argparse.Namespace, kind: str, org: str | None, **detail: Any) -> None:
    """Write the audit row of a change this command made (a warning on stderr if it could not be written)."""
    import sys

    from o7s_cluster.control_plane.audit import cli_event, write_event

    warning = write_event(platform_dsn(args), cli_event(kind, org, detail))
    if warning:
        print(f"o7s: warning: {warning}", file=sys.stderr)


class UsageError(Exception):
    """Bad invocation: exit 2."""


class CommandError(Exception):
    """A failure outside the control plane (e.g. the listen address): exit 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_command(parent: Any, name: str, fn: Any, help: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand `name` under `parent` (a subparsers object) that runs `fn(args)`."""
    sp = parent.add_parser(name, parents=[common], help=help, description=help)
    sp.set_defaults(func=fn)
    return sp


def platform_dsn(args: argparse.Namespace) -> str:
    dsn = getattr(args, "platform_dsn", None) or os.environ.get("O7S_PLATFORM_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise UsageError("no control-plane DSN: pass --platform-dsn, or set O7S_PLATFORM_DSN or DATABASE_URL")
    return dsn


def open_vault() -> Vault:
    return Vault(os.environ.get("O7S_SECRET_KEY"))


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
