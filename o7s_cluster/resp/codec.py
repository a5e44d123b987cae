"""RESP2/RESP3 over bytes: client requests in, server replies in and out.

Pure code over bytes. Every length read from the wire is checked against a cap before anything is
buffered or allocated for it; malformed input yields a `ProtocolError` (the shell answers
`-ERR Protocol error: ...` and closes), never an exception from deep inside.

Replies are decoded losslessly into `Reply` values (the type byte and its payload) so that a reply the
proxy rewrites (key names, channels) is re-encoded exactly as the server sent it apart from that change;
replies the proxy passes through untouched are only delimited (`reply_end`), not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

CRLF = b"\r\n"
# Redis's own limits (proto-max-bulk-len 512 MiB, 1M-element multibulk for clients, 64 KiB inline).
MAX_BULK = 512 * 1024 * 1024
MAX_ARGS = 1024 * 1024
MAX_INLINE = 64 * 1024
# A length or number line is short; anything longer is garbage.
MAX_HEADER = 32
# Nested aggregates in server replies (EXEC of EXEC-like replies, RESP3 maps of arrays...).
MAX_DEPTH = 64
# Before AUTH a client needs a few short arguments (AUTH NAME.ORG PASSWORD, HELLO 3 AUTH ...).
PREAUTH_MAX_ARGS = 16
PREAUTH_MAX_BULK = 4096

AGGREGATES = frozenset(b"*%~>|")  # array, map, set, push, attribute
LINE_TYPES = frozenset(b"+-:,#(_")  # simple string, error, integer, double, boolean, big number, null
BLOB_TYPES = frozenset(b"$!=")  # bulk string, blob error, verbatim string


@dataclass(frozen=True)
class ProtocolError:
    """Malformed input: the reason, as Redis words it after `-ERR Protocol error: `."""

    reason: str

    def reply(self) -> bytes:
        return b"-ERR Protocol error: " + self.reason.encode() + CRLF


class NeedMore(Exception):
    """Not enough bytes yet for a whole value."""


class ReplyError(Exception):
    """A server reply that is not valid RESP (the backend is broken or is not Redis)."""


def _int(line: bytes | bytearray | memoryview) -> int | None:
    """A decimal integer as RESP writes it (optional '-', digits only), or None."""
    s = bytes(line)
    if not s or len(s) > MAX_HEADER:
        return None
    body = s[1:] if s[:1] == b"-" else s
    if not body.isdigit():
        return None
    return int(s)


class RequestParser:
    """Client commands from a byte stream: arrays of bulk strings (what every client library sends) and
    inline commands (what a person types into telnet). `next_command` returns one command (a list of
    bytes), None when it needs more bytes, or a ProtocolError (after which the parser stays broken)."""

    def __init__(self, max_args: int = MAX_ARGS, max_bulk: int = MAX_BULK, max_inline: int = MAX_INLINE) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.max_args = max_args
        self.max_bulk = max_bulk
        self.max_inline = max_inline
        self.error: ProtocolError | None = None

    def set_limits(self, max_args: int, max_bulk: int) -> None:
        self.max_args, self.max_bulk = max_args, max_bulk

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos > 65536 and self.pos * 2 > len(self.buf):
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    @property
    def buffered(self) -> int:
        """Bytes held and not yet parsed into commands."""
        return len(self.buf) - self.pos

    def _fail(self, reason: str) -> ProtocolError:
        self.error = ProtocolError(reason)
        return self.error

    def next_command(self) -> list[bytes] | ProtocolError | None:
        if self.error is not None:
            return self.error
        buf, pos = self.buf, self.pos
        while pos < len(buf) and buf[pos] in b"\r\n":  # empty lines between commands are allowed
            pos += 1
        self.pos = pos
        if pos >= len(buf):
            return None
        if buf[pos] != 0x2A:  # '*'
            return self._inline()
        eol = buf.find(CRLF, pos + 1, pos + 1 + MAX_HEADER + 2)
        if eol < 0:
            if len(buf) - pos > MAX_HEADER + 2:
                return self._fail("invalid multibulk length")
            return None
        n = _int(buf[pos + 1:eol])
        if n is None or n > self.max_args:
            return self._fail("invalid multibulk length")
        p = eol + 2
        args: list[bytes] = []
        for _ in range(max(n, 0)):
            if p >= len(buf):
                return None
            if buf[p] != 0x24:  # '$'
                return self._fail(f"expected '$', got '{chr(buf[p])}'")
            eol = buf.find(CRLF, p + 1, p + 1 + MAX_HEADER + 2)
            if eol < 0:
                if len(buf) - p > MAX_HEADER + 2:
                    return self._fail("invalid bulk length")
                return None
            size = _int(buf[p + 1:eol])
            if size is None or size < 0 or size > self.max_bulk:
                return self._fail("invalid bulk length")
            start = eol + 2
            end = start + size
            if end + 2 > len(buf):
                return None
            if buf[end:end + 2] != CRLF:
                return self._fail("bulk string not terminated by CRLF")
            args.append(bytes(buf[start:end]))
            p = end + 2
        self.pos = p
        if n <= 0:  # '*0' and '*-1' are no command at all, as in Redis
            return self.next_command()
        return args

    def _inline(self) -> list[bytes] | ProtocolError | None:
        buf, pos = self.buf, self.pos
        eol = buf.find(b"\n", pos, pos + self.max_inline + 1)
        if eol < 0:
            if len(buf) - pos > self.max_inline:
                return self._fail("too big inline request")
            return None
        line = bytes(buf[pos:eol]).rstrip(b"\r")
        self.pos = eol + 1
        args = split_inline(line)
        if args is None:
            return self._fail("unbalanced quotes in request")
        if len(args) > self.max_args or any(len(a) > self.max_bulk for a in args):
            return self._fail("invalid multibulk length")
        if not args:
            return self.next_command()
        return args


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes] | None:
    """An inline command's words, with Redis's quoting ("..." with escapes, '...'); None if unbalanced."""
    out: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\n\r\v\f":
            i += 1
        if i >= n:
            return out
        word = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    return None
                break
            c = line[i]
            if quote == 0x22:  # "
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    word.append(int(line[i + 2:i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    word += _ESCAPES.get(line[i], bytes([line[i]]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        return None  # closing quote must be followed by a space
                    i += 1
                    break
                else:
                    word.append(c)
            elif quote == 0x27:  # '
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    word.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in b" \t\n\r\v\f":
                        return None
                    i += 1
                    break
                else:
                    word.append(c)
            else:
                if c in b" \t\n\r\v\f":
                    break
                if c in (0x22, 0x27) and not word:
                    quote = c
                else:
                    word.append(c)
            i += 1
        out.append(bytes(word))


def encode_command(args: list[bytes]) -> bytes:
    """A command as an array of bulk strings (what the proxy sends to the backend)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(b"$%d\r\n" % len(a))
        parts.append(a)
        parts.append(CRLF)
    return b"".join(parts)


# --- replies -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """One decoded RESP value: `kind` is its type byte as a one-character str, `data` its payload:
    bytes for line and blob types (numbers keep their text, so re-encoding is exact), None for null
    bulk/array ('$-1', '*-1') and RESP3 null ('_'), a list of Replies for aggregates (maps and
    attributes flattened: key, value, key, value ...)."""

    kind: str
    data: bytes | list[Reply] | None

    def is_error(self) -> bool:
        return self.kind in "-!"

    def text(self) -> bytes | None:
        """The payload of a string-like reply, else None."""
        return self.data if isinstance(self.data, bytes) and self.kind in "+$=" else None


def reply_end(buf: bytes | bytearray, pos: int = 0, *, max_bulk: int = MAX_BULK) -> int:
    """Where the reply starting at `pos` ends, without decoding it. Raises NeedMore or ReplyError."""
    pending = 1  # values still to skip
    stack: list[int] = []
    n = len(buf)
    while pending:
        if pos >= n:
            raise NeedMore
        t = buf[pos]
        eol = buf.find(CRLF, pos + 1)
        if eol < 0:
            if n - pos > MAX_INLINE + MAX_HEADER:
                raise ReplyError("reply line too long")
            raise NeedMore
        pending -= 1
        if t in LINE_TYPES:
            pos = eol + 2
        elif t in BLOB_TYPES:
            size = _int(buf[pos + 1:eol])
            if size is None or size > max_bulk or size < -1:
                raise ReplyError("invalid bulk length in reply")
            if size == -1:
                pos = eol + 2
            else:
                end = eol + 2 + size
                if end + 2 > n:
                    raise NeedMore
                if buf[end:end + 2] != CRLF:
                    raise ReplyError("bulk reply not terminated by CRLF")
                pos = end + 2
        elif t in AGGREGATES:
            count = _int(buf[pos + 1:eol])
            if count is None or count > MAX_ARGS or count < -1:
                raise ReplyError("invalid aggregate length in reply")
            pos = eol + 2
            if t in b"%|" and count > 0:
                count *= 2
            if t == 0x7C:  # an attribute precedes the value it describes
                count += 1
            if count > 0:
                stack.append(pending)
                if len(stack) > MAX_DEPTH:
                    raise ReplyError("reply nested too deeply")
                pending = count
                continue
        else:
            raise ReplyError(f"unknown reply type byte {t!r}")
        while not pending and stack:
            pending = stack.pop()
    return pos


def parse_reply(buf: bytes | bytearray, pos: int = 0, *, max_bulk: int = MAX_BULK,
                _depth: int = 0) -> tuple[Reply, int]:
    """One reply decoded from `pos`: (value, end). Raises NeedMore or ReplyError."""
    if _depth > MAX_DEPTH:
        raise ReplyError("reply nested too deeply")
    n = len(buf)
    if pos >= n:
        raise NeedMore
    t = buf[pos]
    eol = buf.find(CRLF, pos + 1)
    if eol < 0:
        if n - pos > MAX_INLINE + MAX_HEADER:
            raise ReplyError("reply line too long")
        raise NeedMore
    kind = chr(t)
    if t in LINE_TYPES:
        return Reply(kind, None if t == 0x5F else bytes(buf[pos + 1:eol])), eol + 2
    if t in BLOB_TYPES:
        size = _int(buf[pos + 1:eol])
        if size is None or size > max_bulk or size < -1:
            raise ReplyError("invalid bulk length in reply")
        if size == -1:
            return Reply(kind, None), eol + 2
        end = eol + 2 + size
        if end + 2 > n:
            raise NeedMore
        if buf[end:end + 2] != CRLF:
            raise ReplyError("bulk reply not terminated by CRLF")
        return Reply(kind, bytes(buf[eol + 2:end])), end + 2
    if t in AGGREGATES:
        count = _int(buf[pos + 1:eol])
        if count is None or count > MAX_ARGS or count < -1:
            raise ReplyError("invalid aggregate length in reply")
        p = eol + 2
        if count == -1:
            return Reply(kind, None), p
        if t in b"%|":
            count *= 2
        items: list[Reply] = []
        for _ in range(count):
            item, p = parse_reply(buf, p, max_bulk=max_bulk, _depth=_depth + 1)
            items.append(item)
        if t == 0x7C:  # attribute: its map, then the value it is attached to (kept as the last item)
            item, p = parse_reply(buf, p, max_bulk=max_bulk, _depth=_depth + 1)
            items.append(item)
        return Reply(kind, items), p
    raise ReplyError(f"unknown reply type byte {t!r}")


def encode_reply(r: Reply) -> bytes:
    out = bytearray()
    _encode_into(r, out)
    return bytes(out)


def _encode_into(r: Reply, out: bytearray) -> None:
    t = r.kind.encode()
    d = r.data
    if r.kind == "_":
        out += b"_\r\n"
    elif d is None:
        out += t + b"-1\r\n"
    elif isinstance(d, list):
        count = len(d)
        if r.kind in "%|":
            count = (count - (1 if r.kind == "|" else 0)) // 2
        out += t + b"%d\r\n" % count
        for item in d:
            _encode_into(item, out)
    elif t[0] in BLOB_TYPES:
        out += t + b"%d\r\n" % len(d) + d + CRLF
    else:
        out += t + d + CRLF


# --- replies the proxy makes itself --------------------------------------------------------------


def simple(s: bytes) -> bytes:
    return b"+" + s + CRLF


def error(msg: str) -> bytes:
    """An error reply; CR/LF in the message would break framing, so they become spaces."""
    return b"-" + msg.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(b: bytes | None) -> bytes:
    if b is None:
        return b"$-1\r\n"
    return b"$%d\r\n" % len(b) + b + CRLF


def null(resp3: bool) -> bytes:
    return b"_\r\n" if resp3 else b"$-1\r\n"


def array(items: list[bytes]) -> bytes:
    """An array of already-encoded values."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def map_(pairs: list[tuple[bytes, bytes]], resp3: bool) -> bytes:
    """A map of already-encoded keys and values: '%' in RESP3, a flat array in RESP2."""
    flat = [x for kv in pairs for x in kv]
    if resp3:
        return b"%%%d\r\n" % len(pairs) + b"".join(flat)
    return array(flat)
