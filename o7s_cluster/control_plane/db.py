"""The control-plane database as every part of O7s meets it: how to connect, the one error type
(one line, no secrets), the org-name rule and database types, and the tier limits row."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg

from o7s_cluster.control_plane.dsn import scrub_libpq_error

DB_TYPES = ("postgres", "neon", "redis")
ORG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class CatalogError(Exception):
    """A one-line, secret-free reason an admin or read operation failed."""


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def connect(dsn: str, **kw: Any) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kw)
    except psycopg.ProgrammingError as e:  # libpq could not parse it; its message may quote the password
        raise CatalogError(f"malformed control-plane DSN: {scrub_libpq_error(str(e))}") from None
    except psycopg.Error as e:
        raise CatalogError(f"cannot connect to the control plane: {one_line(e)}") from None


@dataclass(frozen=True)
class TierLimits:
    """One row of platform.tier_limits: what an org on this tier may use."""

    tier: str
    max_connections: int
    max_qps: int
    max_storage_gb: int
    pool_size: int
    max_query_wait_ms: int
    statement_timeout_ms: int
    work_mem: str
    can_burst: bool


LIMIT_COLS = ", ".join(f"t.{f}" for f in TierLimits.__dataclass_fields__)
