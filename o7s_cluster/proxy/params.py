"""Parameter following: the session settings a client has, and how to make a backend's match them.

Reported parameters (GUC_REPORT) follow through ParameterStatus. Unreported ones are read back from
the server (see `proxy.readback`) after a statement that may change them, so that they follow the
client to its next backend and never leak to another client.
"""

from __future__ import annotations

import re

from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire.errors import ClientError

# Reported parameters a client may change, by lower-cased name -> the server's spelling.
SYNCED_PARAMS = {
    "application_name": "application_name",
    "client_encoding": "client_encoding",
    "datestyle": "DateStyle",
    "intervalstyle": "IntervalStyle",
    "timezone": "TimeZone",
    "standard_conforming_strings": "standard_conforming_strings",
    "default_transaction_read_only": "default_transaction_read_only",
    "search_path": "search_path",
}
SYNCED_REPORTED = frozenset(SYNCED_PARAMS.values())
GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,62}\Z")
# Startup parameters that are O7s's own business, never applied on a backend.
STARTUP_RESERVED = frozenset(("user", "database", "options", "replication"))

# PostgreSQL's encoding names by their normalized spelling (lower case, no '-' or '_'), as
# pg_char_to_encoding accepts them; the server reports client_encoding in its canonical form.
_ENCODINGS = {
    "utf8": "UTF8", "unicode": "UTF8", "sqlascii": "SQL_ASCII", "latin1": "LATIN1", "latin2": "LATIN2",
    "latin3": "LATIN3", "latin4": "LATIN4", "latin5": "LATIN5", "latin6": "LATIN6", "latin7": "LATIN7",
    "latin8": "LATIN8", "latin9": "LATIN9", "latin10": "LATIN10", "iso88591": "LATIN1", "iso88592": "LATIN2",
    "iso88593": "LATIN3", "iso88594": "LATIN4", "iso88599": "LATIN5", "iso885910": "LATIN6",
    "iso885913": "LATIN7", "iso885914": "LATIN8", "iso885915": "LATIN9", "iso885916": "LATIN10",
    "iso88595": "ISO_8859_5", "iso88596": "ISO_8859_6", "iso88597": "ISO_8859_7", "iso88598": "ISO_8859_8",
    "eucjp": "EUC_JP", "euccn": "EUC_CN", "euckr": "EUC_KR", "euctw": "EUC_TW", "eucjis2004": "EUC_JIS_2004",
    "sjis": "SJIS", "shiftjis": "SJIS", "mskanji": "SJIS", "windows932": "SJIS", "shiftjis2004": "SHIFT_JIS_2004",
    "big5": "BIG5", "windows950": "BIG5", "gbk": "GBK", "windows936": "GBK", "cp936": "GBK", "uhc": "UHC",
    "windows949": "UHC", "gb18030": "GB18030", "johab": "JOHAB", "mulecode": "MULE_INTERNAL",
    "muleinternal": "MULE_INTERNAL", "koi8": "KOI8R", "koi8r": "KOI8R", "koi8u": "KOI8U",
    "win866": "WIN866", "alt": "WIN866", "windows866": "WIN866", "win874": "WIN874", "windows874": "WIN874",
    "win1250": "WIN1250", "windows1250": "WIN1250", "win1251": "WIN1251", "windows1251": "WIN1251",
    "win": "WIN1251", "win1252": "WIN1252", "windows1252": "WIN1252", "win1253": "WIN1253",
    "windows1253": "WIN1253", "win1254": "WIN1254", "windows1254": "WIN1254", "win1255": "WIN1255",
    "windows1255": "WIN1255", "win1256": "WIN1256", "windows1256": "WIN1256", "win1257": "WIN1257",
    "windows1257": "WIN1257", "win1258": "WIN1258", "windows1258": "WIN1258", "abc": "WIN1258",
    "tcvn": "WIN1258", "tcvn5712": "WIN1258", "vscii": "WIN1258",
}


def param_key(name: str) -> str:
    """Reported parameters by the server's spelling, others lower-cased."""
    return SYNCED_PARAMS.get(name.lower(), name.lower())


def normalize_value(key: str, value: str) -> str:
    """The value as the server would report it, where O7s reports it without asking a server."""
    if key == "client_encoding":
        return _ENCODINGS.get(value.lower().replace("-", "").replace("_", ""), value)
    return value


def sql_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def parse_options(options: str) -> dict[str, str]:
    """`-c name=value` / `--name=value` settings from a startup `options` string (libpq escapes spaces with \\)."""
    words: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c"):
            setting = w[2:]
            i += 1
        elif w.startswith("--"):
            setting = w[2:]
            i += 1
        else:
            raise ClientError(codes.FEATURE_NOT_SUPPORTED, f"unsupported startup option \"{w}\"")
        name, sep, value = setting.partition("=")
        if not sep:
            raise ClientError(codes.PROTOCOL_VIOLATION, f"invalid startup option \"{setting}\": expected name=value")
        out[name.replace("-", "_")] = value
    return out


def wanted_settings(params: dict[str, str]) -> dict[str, str]:
    """The session settings a StartupMessage asks for (its parameters and `options`)."""
    wanted: dict[str, str] = {}
    if "options" in params:
        wanted.update(parse_options(params["options"]))
    for name, value in params.items():
        if name not in STARTUP_RESERVED and not name.startswith("_pq_."):
            wanted[name] = value
    for name in wanted:
        if not GUC_NAME.match(name):
            raise ClientError(codes.PROTOCOL_VIOLATION, "invalid startup parameter name")
    return wanted


class BackendSettings:
    """What O7s knows of one backend connection's session settings."""

    __slots__ = ("reported", "applied", "initial")

    def __init__(self) -> None:
        self.reported: dict[str, str] = {}  # name as the server reported it -> value
        self.applied: dict[str, str] = {}   # lower-cased name -> value O7s set that the server does not report
        self.initial: dict[str, str] = {}   # what the server reported at start-up


def sync_sql(client: dict[str, str], backend: BackendSettings) -> str:
    """SQL that makes a backend's settings the client's ('' when they already are).

    Updates `backend.applied` to what the SQL will leave; the caller clears it if the SQL fails.
    """
    if not backend.applied and client.items() <= backend.reported.items():
        return ""  # the usual case, every attach: one subset test in C
    calls: list[str] = []
    for name, value in client.items():
        reported = name in backend.reported
        current = backend.reported[name] if reported else backend.applied.get(name)
        if current != value:
            calls.append(f"pg_catalog.set_config('{name}', {sql_literal(value)}, false)")
            if not reported:
                backend.applied[name] = value
    resets = [name for name in backend.applied if name not in client]
    if not calls and not resets:
        return ""
    sql = ("SELECT " + ", ".join(calls) + ";") if calls else ""
    for name in resets:
        sql += "RESET ROLE;" if name == "role" else f"RESET {quote_guc(name)};"
        del backend.applied[name]
    return sql


def quote_guc(name: str) -> str:
    """A setting name as SQL (dotted custom names quoted part by part)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
