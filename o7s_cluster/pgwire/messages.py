"""Messages O7s builds or looks inside; everything else is relayed untouched."""

from __future__ import annotations

import struct

from o7s_cluster.pgwire.errors import ProtocolViolation, encode_error
from o7s_cluster.pgwire.framing import CANCEL_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE, read_cstring

_I32 = struct.Struct("!i")
_H = struct.Struct("!h")

# Backend message types O7s reads itself (as the int a message's first byte is).
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
COMMAND_COMPLETE = ord("C")
ERROR_RESPONSE = ord("E")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NOTICE_RESPONSE = ord("N")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")


def _msg(mtype: bytes, payload: bytes) -> bytes:
    return mtype + _I32.pack(len(payload) + 4) + payload


def _cstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if b"\x00" in b:
        raise ValueError("NUL in protocol string")
    return b + b"\x00"


# --- backend → client -------------------------------------------------------------------------

def error_response(severity: str, code: str, message: str, *, hint: str | None = None,
                   detail: str | None = None, notice: bool = False) -> bytes:
    return encode_error(severity, code, message, hint=hint, detail=detail, notice=notice)


def auth_ok() -> bytes:
    return _msg(b"R", _I32.pack(0))


def auth_cleartext_password() -> bytes:
    """AuthenticationCleartextPassword: O7s asks for it only for token logins (JWT, API key)."""
    return _msg(b"R", _I32.pack(3))


def auth_sasl(mechanisms: list[str]) -> bytes:
    return _msg(b"R", _I32.pack(10) + b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(12) + data)


def negotiate_protocol_version(newest: int, unrecognised: list[str]) -> bytes:
    """NegotiateProtocolVersion ('v'): the newest protocol version the server speaks and the protocol options
    (`_pq_.*`) it did not recognise; the client goes on with that version, without those options.

    `newest` is the whole version code (major << 16 | minor): the documentation speaks of "the newest minor
    version", but PostgreSQL sends PG_PROTOCOL_LATEST, and libpq compares it as a whole version.
    """
    return _msg(b"v", _I32.pack(newest) + _I32.pack(len(unrecognised))
                + b"".join(_cstr(name) for name in unrecognised))


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return _msg(b"K", struct.pack("!ii", pid, secret))


def ready_for_query(status: bytes) -> bytes:
    return _msg(b"Z", status)


def parse_complete() -> bytes:
    return b"1\x00\x00\x00\x04"


def close_complete() -> bytes:
    return b"3\x00\x00\x00\x04"


def command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


# --- client → backend -------------------------------------------------------------------------

def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def password_message(data: bytes) -> bytes:
    return _msg(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _msg(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def terminate() -> bytes:
    return b"X\x00\x00\x00\x04"


def sync() -> bytes:
    return b"S\x00\x00\x00\x04"


def parse(name: bytes, query_and_types: bytes) -> bytes:
    """Parse with `name` and the rest of a client's Parse payload (query, type count, oids)."""
    return _msg(b"P", name + b"\x00" + query_and_types)


def close_statement(name: bytes) -> bytes:
    return _msg(b"C", b"S" + name + b"\x00")


# --- parsers ----------------------------------------------------------------------------------

def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload, keyed by their one-letter codes."""
    out: dict[str, str] = {}
    pos = 0
    n = len(payload)
    while pos < n and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = read_cstring(payload, pos + 1)
        out[code] = value.decode("utf-8", "replace")
    return out


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = read_cstring(payload, 0)
    value, _ = read_cstring(payload, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def split_parse(payload: bytes) -> tuple[bytes, bytes]:
    """A Parse payload as (statement name, rest: query + parameter types)."""
    name, pos = read_cstring(payload, 0)
    _query, qend = read_cstring(payload, pos)
    if len(payload) < qend + 2:
        raise ProtocolViolation("Parse message too short")
    (ntypes,) = _H.unpack_from(payload, qend)
    if ntypes < 0 or len(payload) != qend + 2 + 4 * ntypes:
        raise ProtocolViolation("Parse message has a wrong parameter type count")
    return name, payload[pos:]


def unnamed_parse_text_end(buf: bytes | bytearray, s: int, e: int) -> int:
    """Where the SQL text of the unnamed Parse at buf[s:e] ends (its NUL), checked as `split_parse`
    checks a payload, without copying it."""
    text_end = buf.find(b"\x00", s + 6, e)
    if text_end < 0 or text_end + 3 > e:
        raise ProtocolViolation("Parse message too short")
    (ntypes,) = _H.unpack_from(buf, text_end + 1)
    if e != text_end + 3 + 4 * ntypes:
        raise ProtocolViolation("Parse message has a wrong parameter type count")
    return text_end


def split_bind(payload: bytes) -> tuple[bytes, bytes, int]:
    """A Bind payload as (portal, statement name, offset of the rest)."""
    portal, pos = read_cstring(payload, 0)
    stmt, pos = read_cstring(payload, pos)
    return portal, stmt, pos


def split_describe_close(payload: bytes) -> tuple[int, bytes]:
    """Describe/Close payload as (kind 'S' or 'P', name)."""
    if len(payload) < 2 or payload[0] not in (0x53, 0x50) or payload[-1] != 0:
        raise ProtocolViolation("malformed Describe/Close message")
    name, _ = read_cstring(payload, 1)
    return payload[0], name


def command_tag(payload: bytes) -> str:
    return payload.rstrip(b"\x00").decode("ascii", "replace")


def rows_from_tag(tag: str) -> int:
    """Row count of a CommandComplete tag (`INSERT 0 5`, `SELECT 3`, `COPY 10`); 0 when none."""
    last = tag.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


def describe_statement(name: bytes) -> bytes:
    return _msg(b"D", b"S" + name + b"\x00")
