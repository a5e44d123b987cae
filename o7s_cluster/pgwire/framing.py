"""Framing: split a byte stream into messages, with every length capped before it is buffered."""

from __future__ import annotations

import struct

from o7s_cluster.pgwire.errors import ProtocolViolation

# PostgreSQL's own MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET = 10000

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 196608
PROTOCOL_MAJOR = 3  # the only major version there is (2.0 is long gone from PostgreSQL too)
NEWEST_MINOR = 0  # the newest 3.x O7s speaks: a client asking for more is answered NegotiateProtocolVersion
NEWEST_PROTOCOL = (PROTOCOL_MAJOR << 16) | NEWEST_MINOR
PROTOCOL_OPTION_PREFIX = "_pq_."  # startup parameters that are protocol extensions, not settings

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")


class MessageReader:
    """Incremental reader of typed messages (`type byte + int32 length + payload`).

    `next()` returns offsets into `buf` instead of copies so that a relay can forward many
    messages with one slice; the caller must use them before the next `feed()`.
    """

    __slots__ = ("buf", "pos", "max_size", "types")

    def __init__(self, max_size: int, types: frozenset[int] | None = None) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.max_size = max_size
        self.types = types  # when set, any other type byte is refused before its body is awaited

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def next(self) -> tuple[int, int, int] | None:
        """(type, start, end) of the next whole message (buf[start:end]), or None if incomplete."""
        buf = self.buf
        pos = self.pos
        if len(buf) - pos < 5:
            if self.types is not None and len(buf) > pos and buf[pos] not in self.types:
                raise ProtocolViolation(f"invalid message type {buf[pos]:#04x}")
            return None
        if self.types is not None and buf[pos] not in self.types:
            raise ProtocolViolation(f"invalid message type {buf[pos]:#04x}")
        length = _I32.unpack_from(buf, pos + 1)[0]
        if length < 4 or length > self.max_size:
            raise ProtocolViolation(f"invalid message length {length} (limit {self.max_size})")
        end = pos + 1 + length
        if end > len(buf):
            return None
        self.pos = end
        return buf[pos], pos, end

    def payload(self, start: int, end: int) -> bytes:
        return bytes(self.buf[start + 5 : end])

    def pending(self) -> int:
        """Bytes buffered but not yet returned as messages."""
        return len(self.buf) - self.pos

    def take_rest(self) -> bytes:
        rest = bytes(self.buf[self.pos :])
        self.buf.clear()
        self.pos = 0
        return rest


# Every message type a frontend may send once started (PostgreSQL refuses others at once).
FRONTEND_TYPES = frozenset(b"QPBEDCSHFdcfXp")


def startup_length(head: bytes) -> int:
    """Length of an untyped startup-phase packet from its first four bytes, capped."""
    (length,) = _I32.unpack_from(head, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    return length


class StartupMessage:
    """A StartupMessage: its settings (`params`), the protocol 3.x minor version the client asked for, and the
    protocol options (`_pq_.*`) it sent, which are not settings and none of which O7s knows."""

    __slots__ = ("params", "minor", "protocol_options")

    def __init__(self, params: dict[str, str], minor: int = 0, protocol_options: dict[str, str] | None = None) -> None:
        self.params = params
        self.minor = minor
        self.protocol_options = protocol_options or {}

    @property
    def needs_negotiation(self) -> bool:
        """PostgreSQL answers NegotiateProtocolVersion when the client asked for a newer minor version or sent
        protocol options it does not know (ProcessStartupPacket); the session then goes on in 3.NEWEST_MINOR."""
        return self.minor > NEWEST_MINOR or bool(self.protocol_options)


class SSLRequest:
    __slots__ = ()


class GSSENCRequest:
    __slots__ = ()


class CancelRequest:
    __slots__ = ("pid", "secret")

    def __init__(self, pid: int, secret: int) -> None:
        self.pid = pid
        self.secret = secret


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup(packet: bytes) -> StartupPacket:
    """Parse a whole startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolViolation("startup packet too short")
    (code,) = _I32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE and len(packet) == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(packet) == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise ProtocolViolation("malformed cancel request")
        pid, secret = struct.unpack_from("!ii", packet, 8)
        return CancelRequest(pid, secret)
    major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
    if major != PROTOCOL_MAJOR:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    body = packet[8:]
    if not body.endswith(b"\x00"):
        raise ProtocolViolation("startup packet is not NUL-terminated")
    fields = body[:-1].split(b"\x00")
    if fields and fields[-1] == b"":
        fields.pop()
    if len(fields) % 2:
        raise ProtocolViolation("startup packet has a key without a value")
    params: dict[str, str] = {}
    options: dict[str, str] = {}
    try:
        for i in range(0, len(fields), 2):
            key = fields[i].decode()
            if not key:
                raise ProtocolViolation("empty startup parameter name")
            (options if key.startswith(PROTOCOL_OPTION_PREFIX) else params)[key] = fields[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("startup packet is not valid UTF-8") from None
    if "user" not in params or not params["user"]:
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return StartupMessage(params, minor, options)


def read_cstring(data: bytes, pos: int) -> tuple[bytes, int]:
    """NUL-terminated string at pos and the position after it."""
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("missing string terminator")
    return data[pos:end], end + 1
