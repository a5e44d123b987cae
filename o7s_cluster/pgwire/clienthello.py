"""The server name (SNI) of a TLS ClientHello, read from raw bytes before any handshake."""

from __future__ import annotations

MAX_CLIENT_HELLO = 16384 + 5  # one TLS record


class NeedMore(Exception):
    """Not enough bytes yet to find the server name."""


def server_name(data: bytes) -> str | None:
    """The SNI host name in a ClientHello record, None if there is none or it is not a ClientHello.

    Raises NeedMore when the record is incomplete. Never raises anything else on any input.
    """
    if len(data) < 5:
        raise NeedMore
    if data[0] != 0x16:  # handshake record
        return None
    record_len = int.from_bytes(data[3:5], "big")
    if record_len > 16384:
        return None
    if len(data) < 5 + record_len:
        raise NeedMore
    body = data[5:5 + record_len]
    try:
        return _parse(body)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _parse(hs: bytes) -> str | None:
    if hs[0] != 0x01:  # ClientHello
        return None
    pos = 4 + 2 + 32  # handshake header, client version, random
    pos += 1 + hs[pos]  # session id
    pos += 2 + int.from_bytes(hs[pos:pos + 2], "big")  # cipher suites
    pos += 1 + hs[pos]  # compression methods
    if pos + 2 > len(hs):
        return None
    end = min(len(hs), pos + 2 + int.from_bytes(hs[pos:pos + 2], "big"))
    pos += 2
    while pos + 4 <= end:
        ext_type = int.from_bytes(hs[pos:pos + 2], "big")
        ext_len = int.from_bytes(hs[pos + 2:pos + 4], "big")
        pos += 4
        if ext_type == 0:  # server_name
            lst = hs[pos:pos + ext_len]
            i = 2
            while i + 3 <= len(lst):
                name_type = lst[i]
                name_len = int.from_bytes(lst[i + 1:i + 3], "big")
                name = lst[i + 3:i + 3 + name_len]
                if name_type == 0 and len(name) == name_len:
                    return name.decode("ascii").lower()
                i += 3 + name_len
            return None
        pos += ext_len
    return None


def org_from_server_name(name: str | None) -> str | None:
    """`ORG.db.example.com` → `ORG` (the first label)."""
    if not name or "." not in name:
        return None
    return name.split(".", 1)[0]
