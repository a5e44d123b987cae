"""Tiers operators define: `o7s tier list|show|create|set|delete` over platform.tier_limits.

Every column is checked here against its own limit before anything is written, so a typo is one clear
line naming the column and its range; an org can never be left on a tier that is gone (the delete is
refused while any org uses it, and the foreign key backs that up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg import errors as pgerr

from o7s_cluster.control_plane.db import ORG_RE, CatalogError, TierLimits
from o7s_cluster.control_plane.orgs import Admin

INT4_MAX = 2_147_483_647
_WORK_MEM = re.compile(r"^([0-9]+)(kB|MB|GB|TB)$")
_KB = {"kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}
WORK_MEM_MIN_KB = 64  # PostgreSQL's own bounds for work_mem
WORK_MEM_MAX_KB = INT4_MAX
MAX_ORGS_NAMED = 5  # a refused delete names this many of the orgs still on the tier


@dataclass(frozen=True)
class Column:
    """One column of platform.tier_limits: its kind and the range a value must fall in."""

    name: str
    kind: str  # int, bool, money2 (NUMERIC(10,2)), money4 (NUMERIC(10,4)), work_mem
    lo: int | Decimal = 0
    hi: int | Decimal = INT4_MAX
    help: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("rank", "int", 0, 1_000_000, "upgrade order, unique: a higher rank is a bigger tier"),
    Column("max_connections", "int", 1, 1_000_000, "client connections an org may hold at once"),
    Column("max_qps", "int", 1, 100_000_000, "queries per second"),
    Column("max_storage_gb", "int", 0, INT4_MAX, "storage an org may use (GB)"),
    Column("pool_size", "int", 1, 10_000, "backend connections per (org, database)"),
    Column("max_query_wait_ms", "int", 0, 3_600_000, "longest a throttled query waits for a token (ms)"),
    Column("statement_timeout_ms", "int", 0, INT4_MAX, "statement_timeout on the org's backends (ms, 0: none)"),
    Column("work_mem", "work_mem", help="work_mem on the org's backends (64kB to 2147483647kB, e.g. 16MB)"),
    Column("can_burst", "bool", help="whether the rate may burst to one second's worth of queries"),
    Column("base_fee_usd", "money2", Decimal(0), Decimal("99999999.99"), "monthly base fee (USD)"),
    Column("included_vcpu_hours", "money2", Decimal(0), Decimal("99999999.99"), "vCPU hours included"),
    Column("included_memory_gb_hours", "money2", Decimal(0), Decimal("99999999.99"), "memory GB hours included"),
    Column("overage_vcpu_usd", "money4", Decimal(0), Decimal("999999.9999"), "price of a vCPU hour over"),
    Column("overage_memory_gb_usd", "money4", Decimal(0), Decimal("999999.9999"), "price of a memory GB hour over"),
)
BY_NAME = {c.name: c for c in COLUMNS}
ALL_COLS = ("tier",) + tuple(c.name for c in COLUMNS)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def check_tier_name(name: str) -> None:
    if not ORG_RE.match(name or ""):
        raise CatalogError(
            f"invalid tier name {name!r}: 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit")


def parse_value(col: Column, raw: Any) -> Any:
    """A column's value from the CLI (text) or the API (JSON), checked against the column's range."""
    name = col.name
    if col.kind == "bool":
        if isinstance(raw, bool):
            return raw
        v = str(raw).strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        raise CatalogError(f"{name}: expected true or false, got {raw!r}")
    if col.kind == "work_mem":
        m = _WORK_MEM.match(str(raw).strip())
        if not m:
            raise CatalogError(f"work_mem: expected a size with a unit (kB, MB, GB, TB), e.g. 16MB, got {raw!r}")
        kb = int(m.group(1)) * _KB[m.group(2)]
        if not WORK_MEM_MIN_KB <= kb <= WORK_MEM_MAX_KB:
            raise CatalogError(f"work_mem: {raw} is outside {WORK_MEM_MIN_KB}kB..{WORK_MEM_MAX_KB}kB")
        return f"{m.group(1)}{m.group(2)}"
    if col.kind == "int":
        if isinstance(raw, bool) or not re.fullmatch(r"[0-9]+", str(raw).strip()):
            raise CatalogError(f"{name}: expected a whole number in {col.lo}..{col.hi}, got {raw!r}")
        v = int(str(raw).strip())
    else:
        places = 2 if col.kind == "money2" else 4
        try:
            v = Decimal(str(raw).strip())
        except InvalidOperation:
            raise CatalogError(f"{name}: expected a number in {col.lo}..{col.hi}, got {raw!r}") from None
        if not v.is_finite() or v != v.quantize(Decimal(1).scaleb(-places)):
            raise CatalogError(f"{name}: expected a number with at most {places} decimals, got {raw!r}")
    if not col.lo <= v <= col.hi:
        raise CatalogError(f"{name}: {raw} is outside {col.lo}..{col.hi}")
    return v


def parse_values(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        col = BY_NAME.get(key)
        if col is None:
            raise CatalogError(f"unknown tier column {key!r} (one of {', '.join(BY_NAME)})")
        out[key] = parse_value(col, value)
    return out


@dataclass(frozen=True)
class TierInfo:
    """A tier row and the orgs on it."""

    values: dict[str, Any]
    orgs: int

    @property
    def name(self) -> str:
        return self.values["tier"]

    def limits(self) -> TierLimits:
        return TierLimits(**{f: self.values[f] for f in TierLimits.__dataclass_fields__})


class TierAdmin(Admin):
    """Tier operations on the control plane; each method is one transaction."""

    _SELECT = ("SELECT " + ", ".join(f"t.{c}" for c in ALL_COLS) + ", (SELECT count(*) FROM platform.organizations o"
               " WHERE o.tier = t.tier) AS orgs FROM platform.tier_limits t")

    @staticmethod
    def _info(row: dict[str, Any]) -> TierInfo:
        return TierInfo({c: row[c] for c in ALL_COLS}, int(row["orgs"]))

    def list_tiers(self) -> list[TierInfo]:
        with self._tx() as cur:
            return [self._info(r) for r in cur.execute(self._SELECT + " ORDER BY t.rank")]

    def show_tier(self, name: str) -> TierInfo:
        with self._tx() as cur:
            return self._show(cur, name)

    def _show(self, cur: Any, name: str) -> TierInfo:
        row = cur.execute(self._SELECT + " WHERE t.tier = %s", (name,)).fetchone()
        if row is None:
            tiers = [r["tier"] for r in cur.execute("SELECT tier FROM platform.tier_limits ORDER BY rank")]
            raise CatalogError(f"unknown tier {name!r} (one of {', '.join(tiers)})")
        return self._info(row)

    @staticmethod
    def _rank_free(cur: Any, rank: int, tier: str) -> None:
        row = cur.execute("SELECT tier FROM platform.tier_limits WHERE rank = %s AND tier <> %s",
                          (rank, tier)).fetchone()
        if row is not None:
            raise CatalogError(f"rank {rank} is taken by tier {row['tier']!r}: ranks are unique (the upgrade order)")

    def create_tier(self, name: str, values: dict[str, Any], like: str | None = None) -> TierInfo:
        """A new tier: every column from `values`, else from the tier `like`; rank defaults to the top."""
        check_tier_name(name)
        values = parse_values(values)
        with self._tx() as cur:
            base = dict(self._show(cur, like).values) if like else {}
            base.pop("rank", None)
            base.update(values)
            if "rank" not in base:
                top = cur.execute("SELECT coalesce(max(rank), -1) + 1 AS r FROM platform.tier_limits").fetchone()
                base["rank"] = top["r"]
            missing = [c.name for c in COLUMNS if c.name not in base]
            if missing:
                raise CatalogError(f"tier {name!r} needs a value for: {', '.join(missing)} (or pass --like TIER)")
            self._rank_free(cur, base["rank"], name)
            base["tier"] = name
            cols = ", ".join(ALL_COLS)
            try:
                with cur.connection.transaction():
                    cur.execute(f"INSERT INTO platform.tier_limits ({cols}) VALUES"
                                f" ({', '.join(['%s'] * len(ALL_COLS))})", [base[c] for c in ALL_COLS])
            except pgerr.UniqueViolation:
                raise CatalogError(f"tier {name!r} already exists") from None
            return self._show(cur, name)

    def set_tier_values(self, name: str, values: dict[str, Any]) -> tuple[TierInfo, list[str]]:
        """Change columns of a tier; returns it and the names of the orgs on it (to tell the workers)."""
        values = parse_values(values)
        if not values:
            raise CatalogError("nothing to change: pass at least one column (e.g. --max-qps 500)")
        with self._tx() as cur:
            self._show(cur, name)
            if "rank" in values:
                self._rank_free(cur, values["rank"], name)
            sets = ", ".join(f"{k} = %s" for k in values)
            cur.execute(f"UPDATE platform.tier_limits SET {sets} WHERE tier = %s", [*values.values(), name])
            orgs = [r["name"] for r in cur.execute("SELECT name FROM platform.organizations WHERE tier = %s"
                                                   " ORDER BY name", (name,))]
            return self._show(cur, name), orgs

    def delete_tier(self, name: str) -> None:
        """Refused while any org is on the tier: move them first (`o7s org set-tier`)."""
        with self._tx() as cur:
            self._show(cur, name)
            cur.execute("SELECT 1 FROM platform.tier_limits WHERE tier = %s FOR UPDATE", (name,))
            rows = cur.execute("SELECT name FROM platform.organizations WHERE tier = %s ORDER BY name",
                               (name,)).fetchall()
            if rows:
                names = ", ".join(r["name"] for r in rows[:MAX_ORGS_NAMED]) + (", ..." if len(rows) > MAX_ORGS_NAMED else "")
                raise CatalogError(f"tier {name!r} is in use by {len(rows)} org(s) ({names}): move them to another"
                                   " tier first (`o7s org set-tier ORG TIER`)")
            try:
                with cur.connection.transaction():
                    cur.execute("DELETE FROM platform.tier_limits WHERE tier = %s", (name,))
            except pgerr.ForeignKeyViolation:  # an org moved onto it meanwhile
                raise CatalogError(f"tier {name!r} is in use: move its orgs to another tier first") from None
