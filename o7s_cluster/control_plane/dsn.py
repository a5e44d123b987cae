"""Backend connection strings: parsed once, validated up front, never shown with their password."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class BackendTarget:
    host: str
    port: int
    user: str
    password: str | None
    dbname: str
    sslmode: str = "prefer"
    options: str | None = None

    def __repr__(self) -> str:  # keeps the password out of tracebacks and logs
        return f"BackendTarget({self.redacted()})"

    __str__ = __repr__

    def redacted(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host.startswith("/"):
            s = f"postgresql://{quote(self.user, safe='')}@/{quote(self.dbname, safe='')}?host={quote(self.host)}&port={self.port}&"
        else:
            s = f"postgresql://{quote(self.user, safe='')}@{host}:{self.port}/{quote(self.dbname, safe='')}?"
        s += f"sslmode={self.sslmode}"
        if self.options:
            s += f"&options={quote(self.options, safe='')}"
        return s

    def conninfo(self) -> str:
        """The full key=value string (with the password): what the vault encrypts."""
        kw: dict[str, str | int] = {
            "host": self.host, "port": self.port, "user": self.user, "dbname": self.dbname, "sslmode": self.sslmode,
        }
        if self.password is not None:
            kw["password"] = self.password
        if self.options:
            kw["options"] = self.options
        return make_conninfo("", **kw)


def scrub_libpq_error(msg: str) -> str:
    """libpq quotes fragments of the input in its errors, and a fragment may hold the password."""
    return re.sub(r'"[^"]*"', lambda m: m.group(0) if re.fullmatch(r'"[=\W]{0,3}"', m.group(0)) else '"…"',
                  msg.strip().splitlines()[0] if msg.strip() else "parse error")


def parse_dsn(s: str) -> BackendTarget:
    """Accept a postgresql:// URI or libpq key=value pairs; raise ValueError (password-free) if unusable."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", s.strip())
    if m and m.group(1) not in ("postgresql", "postgres"):
        raise ValueError(f"malformed backend DSN: scheme must be postgresql://, not {m.group(1)}://")
    try:
        d = conninfo_to_dict(s.strip())
    except psycopg.Error as e:
        raise ValueError(f"malformed backend DSN: {scrub_libpq_error(str(e))}") from None
    if not s.strip():
        raise ValueError("malformed backend DSN: empty")
    host = (d.get("host") or "").strip()
    if not host:
        raise ValueError("malformed backend DSN: no host")
    if "," in host:
        raise ValueError("malformed backend DSN: multiple hosts are not supported")
    port_s = (d.get("port") or "5432").strip()
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError("malformed backend DSN: port must be a number from 1 to 65535")
    user = d.get("user") or ""
    if not user:
        raise ValueError("malformed backend DSN: no user")
    dbname = d.get("dbname") or ""
    if not dbname:
        raise ValueError("malformed backend DSN: no database name")
    sslmode = d.get("sslmode") or "prefer"
    if sslmode not in SSLMODES:
        raise ValueError(f"malformed backend DSN: sslmode must be one of {', '.join(SSLMODES)}")
    return BackendTarget(
        host=host, port=int(port_s), user=user, password=d.get("password"), dbname=dbname,
        sslmode=sslmode, options=d.get("options") or None,
    )
