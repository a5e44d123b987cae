"""`o7s org apikey create|list|revoke`: an org's API keys in platform.api_keys (hashes only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from psycopg import errors as pgerr

from o7s_cluster.auth.apikeys import new_key
from o7s_cluster.control_plane.db import CatalogError
from o7s_cluster.control_plane.orgs import Admin

MAX_NAME = 63


@dataclass(frozen=True)
class KeyInfo:
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(timezone.utc):
            return "expired"
        return "active"


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """--expires: an ISO date (midnight UTC) or date-time (UTC unless it says otherwise), in the future."""
    now = now or datetime.now(timezone.utc)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CatalogError(f"--expires: expected a date (2027-01-31) or date-time (2027-01-31T12:00:00Z),"
                           f" got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if when <= now:
        raise CatalogError(f"--expires: {text} is not in the future")
    return when


class KeyAdmin(Admin):
    """API-key operations; each method is one transaction."""

    def create_key(self, org: str, name: str | None, expires_at: datetime | None) -> tuple[str, KeyInfo]:
        """A new key for the org: (the key, shown once; its row)."""
        key, prefix, digest = new_key()
        name = name if name is not None else prefix
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise CatalogError(f"invalid key name {name!r}: 1-{MAX_NAME} printable characters")
        with self._tx() as cur:
            org_id = self._org_id(cur, org)
            try:
                with cur.connection.transaction():
                    row = cur.execute(
                        "INSERT INTO platform.api_keys (org_id, name, prefix, key_hash, expires_at)"
                        " VALUES (%s, %s, %s, %s, %s)"
                        " RETURNING name, prefix, created_at, last_used_at, expires_at, revoked_at",
                        (org_id, name, prefix, digest, expires_at)).fetchone()
            except pgerr.UniqueViolation:
                raise CatalogError(f"org {org!r} already has a key named {name!r}") from None
        return key, KeyInfo(**row)

    def list_keys(self, org: str) -> list[KeyInfo]:
        with self._tx() as cur:
            org_id = self._org_id(cur, org)
            rows = cur.execute("SELECT name, prefix, created_at, last_used_at, expires_at, revoked_at"
                               " FROM platform.api_keys WHERE org_id = %s ORDER BY created_at, name",
                               (org_id,)).fetchall()
        return [KeyInfo(**r) for r in rows]

    def revoke_key(self, org: str, name_or_prefix: str) -> KeyInfo:
        """Revoke by name or prefix; revoking twice is an error that says so."""
        with self._tx() as cur:
            org_id = self._org_id(cur, org)
            row = cur.execute(
                "SELECT id, revoked_at FROM platform.api_keys WHERE org_id = %s AND (name = %s OR prefix = %s)"
                " FOR UPDATE", (org_id, name_or_prefix, name_or_prefix)).fetchone()
            if row is None:
                raise CatalogError(f"org {org!r} has no key {name_or_prefix!r}")
            if row["revoked_at"] is not None:
                raise CatalogError(f"key {name_or_prefix!r} of org {org!r} is already revoked")
            info = cur.execute(
                "UPDATE platform.api_keys SET revoked_at = now() WHERE id = %s"
                " RETURNING name, prefix, created_at, last_used_at, expires_at, revoked_at", (row["id"],)).fetchone()
        return KeyInfo(**info)
