"""API keys: their shape, how they are made and how one is checked against its stored hash (pure).

A key is `o7s_<prefix>_<secret>`: the prefix (12 lowercase hex) is its public handle, stored as is; the
secret (32 random bytes, url-safe base64) is never stored, only SHA-256 of the whole key. With 256 bits
of randomness a plain hash is enough (nothing to brute-force), and it keeps a key login to one hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

KEY_PREFIX = "o7s_"
PREFIX_HEX = 12
_KEY = re.compile(rf"o7s_([0-9a-f]{{{PREFIX_HEX}}})_[A-Za-z0-9_-]{{43}}\Z")


def looks_like_key(text: str) -> bool:
    return text.startswith(KEY_PREFIX) and _KEY.match(text) is not None


def key_prefix(key: str) -> str | None:
    m = _KEY.match(key)
    return m.group(1) if m else None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str, bytes]:
    """(key, prefix, hash): the key is shown once and never stored."""
    prefix = secrets.token_hex(PREFIX_HEX // 2)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, hash_key(key)


@dataclass(frozen=True)
class StoredKey:
    """A key's row as a worker caches it."""

    id: str
    org_id: str
    name: str
    key_hash: bytes
    expires_at: datetime | None
    revoked: bool


def check_key(key: str, stored: StoredKey | None, org_id: str | None, now: datetime) -> str | None:
    """None when `key` logs in to `org_id`, else the reason (for the log only)."""
    if stored is None:
        return "no such key"
    if not hmac.compare_digest(hash_key(key), stored.key_hash):
        return "wrong secret"
    if org_id is None or stored.org_id != org_id:
        return "key of another org"
    if stored.revoked:
        return "revoked"
    if stored.expires_at is not None and stored.expires_at <= now:
        return "expired"
    return None
