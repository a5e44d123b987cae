"""Redis backend URLs (redis://[user:password@]host[:port][/db], rediss:// for TLS): parsed once,
validated up front, never shown with their password."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

DEFAULT_DB_NAME = "redis"  # the client-facing name of a Redis database registered without --db-name
MAX_DB = 1_000_000


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    tls: bool = False

    def __repr__(self) -> str:
        return f"RedisTarget({self.redacted()})"

    __str__ = __repr__

    @property
    def dbname(self) -> str:
        """The default client-facing name (Redis databases are numbers)."""
        return DEFAULT_DB_NAME

    def redacted(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{user}{host}:{self.port}/{self.db}"

    def conninfo(self) -> str:
        """The full URL (with the password): what the vault encrypts."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        cred = ""
        if self.username or self.password:
            cred = quote(self.username or "", safe="")
            if self.password is not None:
                cred += ":" + quote(self.password, safe="")
            cred += "@"
        return f"{'rediss' if self.tls else 'redis'}://{cred}{host}:{self.port}/{self.db}"


def parse_redis_dsn(s: str) -> RedisTarget:
    """Accept redis:// or rediss://; raise ValueError (password-free) if unusable."""
    s = s.strip()
    try:
        u = urlsplit(s)
        port = u.port or 6379
    except ValueError:
        raise ValueError("malformed Redis URL: bad port") from None
    if u.scheme not in ("redis", "rediss"):
        raise ValueError("malformed Redis URL: scheme must be redis:// or rediss://")
    if not u.hostname:
        raise ValueError("malformed Redis URL: no host")
    path = u.path.lstrip("/")
    if path and (not path.isdigit() or int(path) > MAX_DB):
        raise ValueError("malformed Redis URL: the path must be a database number")
    if u.query or u.fragment:
        raise ValueError("malformed Redis URL: no query or fragment is understood")
    return RedisTarget(
        host=u.hostname, port=port, username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password is not None else None, db=int(path or 0),
        tls=u.scheme == "rediss",
    )
