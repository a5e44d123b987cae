"""LISTEN/NOTIFY in transaction mode, without a pooled backend per listener (as PgDog does it).

A client's `LISTEN`/`UNLISTEN` never reaches a pooled backend: O7s answers it, and one listener
connection per worker and (org, database) listens on the union of its clients' channels and fans
each notification out to the clients that listen on its channel. This module holds the decisions,
no I/O:
- `parse_listen`: which client statements O7s takes over (one LISTEN/UNLISTEN per Query message);
- `ClientListens`: one client's channels, what its open transaction block will change at COMMIT (and
  drop at ROLLBACK, as PostgreSQL does), and its notifications waiting until it is between
  transactions, capped;
- `ListenerCore`: the listener connection's side: which channels to LISTEN/UNLISTEN, which are
  confirmed, and who gets each notification (with the sender pid the client was given, when it came
  from that client's own backend).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError, ProtocolViolation
from o7s_cluster.pgwire.framing import MessageReader
from o7s_cluster.proxy.owed import Kind, Pending

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes (with a NOTICE): longer names are left to
# the server (the client then keeps its backend, as for any LISTEN O7s does not take over).
MAX_CHANNEL = 63
# A client's notifications wait while it is in a transaction or its socket is full; past either cap
# it is closed with an error naming the limit (PostgreSQL's own queue holds 8 GB on disk; a worker
# must not hold that much in memory for one slow client).
MAX_QUEUED_NOTIFICATIONS = 10_000
MAX_QUEUED_NOTIFY_BYTES = 4 * 1024 * 1024
# Notifications are at most ~8 kB of payload: anything much larger from the listener is not one.
MAX_LISTENER_MESSAGE = 64 * 1024
# Channels one client may listen on (each costs the worker a little memory for as long as it listens).
MAX_CHANNELS_PER_CLIENT = 10_000

MAX_UNSENT = 256 * 1024  # bytes already waiting for the client past which notifications queue (capped)

ALL = b"*"  # UNLISTEN *
IN_FAILED_TRANSACTION = "25P02"
_I32 = struct.Struct("!i")
_NOTIFICATION, _READY, _ERROR = b"AZE"

_LISTEN = re.compile(
    rb'\s*(listen|unlisten)\s+(\*|"(?:[^"\x00]|"")+"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)\s*;?\s*\Z',
    re.IGNORECASE,
)
_HEAD = re.compile(rb"\s*(?:un)?listen\b", re.IGNORECASE)
# What a LISTEN/UNLISTEN text can start with: one byte look rules out nearly every other Query cheaply.
LISTEN_FIRST = frozenset(b"lLuU \t\n\r\f\v")  # the bytes a LISTEN or UNLISTEN text can start with
_PARSE, _BIND, _DESCRIBE, _EXECUTE, _SYNC, _FLUSH, _CLOSE = b"PBDESHC"
_STATEMENT = ord("S")
_BIND_COMPLETE = b"2\x00\x00\x00\x04"
_NO_DATA = b"n\x00\x00\x00\x04"
_NO_PARAMETERS = b"t\x00\x00\x00\x06\x00\x00"  # ParameterDescription of none
_NOTIFY = re.compile(rb"notify", re.IGNORECASE)


def speaks_utf8(params: dict[str, str]) -> bool:
    """The client's encoding is UTF8 (as the listener connection's is), however the client spelled it
    (asyncpg sends `'utf-8'`, quotes included)."""
    name = params.get("client_encoding", "UTF8").strip("'\" ").replace("-", "").replace("_", "").upper()
    return name in ("UTF8", "UNICODE")


def may_notify(sql: bytes | bytearray) -> bool:
    """The text may send a notification (NOTIFY, pg_notify); one a trigger sends is not seen."""
    return _NOTIFY.search(sql) is not None


class ListenOp:
    """One LISTEN (`listen=True`) or UNLISTEN of `channel` (ALL for UNLISTEN *)."""

    __slots__ = ("listen", "channel")

    def __init__(self, listen: bool, channel: bytes) -> None:
        self.listen = listen
        self.channel = channel

    @property
    def tag(self) -> str:
        return "LISTEN" if self.listen else "UNLISTEN"

    def __repr__(self) -> str:
        return f"<{self.tag} {self.channel!r}>"


def parse_listen(buf: bytes | bytearray, start: int, end: int) -> ListenOp | None:
    """The LISTEN/UNLISTEN that is the whole of the SQL text buf[start:end], or None.

    Anything else (several statements, comments, a name the server would truncate) is not taken
    over: it goes to the backend as before.
    """
    if start >= end or buf[start] not in LISTEN_FIRST or not _HEAD.match(buf, start, end):
        return None
    match = _LISTEN.match(buf, start, end)
    if match is None:
        return None
    listen = match.group(1).lower() == b"listen"
    word = bytes(match.group(2))
    if word == ALL:
        return None if listen else ListenOp(False, ALL)
    if word[:1] == b'"':
        name = word[1:-1].replace(b'""', b'"')
    else:
        name = bytes(word.lower()) if word.isascii() else _ascii_lower(word)
    if len(name) > MAX_CHANNEL:
        return None
    return ListenOp(listen, name)


def _ascii_lower(word: bytes) -> bytes:
    """PostgreSQL folds only ASCII letters of an unquoted identifier in a multi-byte encoding."""
    return bytes(b + 32 if 65 <= b <= 90 else b for b in word)


def quote_channel(name: bytes) -> bytes:
    """The channel as a quoted identifier (any byte but NUL may be in a name)."""
    return b'"' + name.replace(b'"', b'""') + b'"'


def notification_channel(message: bytes | bytearray) -> bytes:
    """The channel of a whole NotificationResponse message."""
    end = message.find(b"\x00", 9)
    if end < 0:
        raise ProtocolViolation("malformed NotificationResponse")
    return bytes(message[9:end])


def with_sender(message: bytes, pid: int) -> bytes:
    """A NotificationResponse with another sender process id."""
    return message[:5] + _I32.pack(pid) + message[9:]


class ClientListens:
    """One client's channels (`active`), the changes its open transaction block makes at COMMIT
    (`pending`), and its notifications waiting for it to be between transactions (`queue`)."""

    __slots__ = ("active", "pending", "queue", "queued_bytes", "overflow")

    def __init__(self) -> None:
        self.active: set[bytes] = set()
        self.pending: list[ListenOp] = []
        self.queue: deque[tuple[bytes, bytes]] = deque()  # (channel, NotificationResponse)
        self.queued_bytes = 0
        self.overflow = ""  # why the client must be closed ('' while under the caps)

    @staticmethod
    def _apply(channels: set[bytes], op: ListenOp) -> None:
        if op.listen:
            channels.add(op.channel)
        elif op.channel == ALL:
            channels.clear()
        else:
            channels.discard(op.channel)

    def after(self, op: ListenOp | None = None) -> set[bytes]:
        """The channels once the pending changes (and `op`) are applied."""
        channels = set(self.active)
        for p in self.pending:
            self._apply(channels, p)
        if op is not None:
            self._apply(channels, op)
        return channels

    def wanted(self, op: ListenOp | None = None) -> set[bytes]:
        """The channels the listener connection must listen on for this client: those it listens on
        and those a pending LISTEN adds (a pending UNLISTEN takes effect at COMMIT only)."""
        channels = set(self.active)
        channels.update(p.channel for p in self.pending if p.listen)
        if op is not None:
            if op.listen:
                channels.add(op.channel)
            else:
                channels = self.after(op) | {p.channel for p in self.pending if p.listen}
        return channels

    def apply(self, op: ListenOp) -> None:
        """A LISTEN/UNLISTEN outside a transaction block: it takes effect now."""
        self._apply(self.active, op)
        self._purge()

    def commit(self) -> None:
        self.active = self.after()
        self.pending.clear()
        self._purge()

    def rollback(self) -> None:
        self.pending.clear()
        self._purge()

    def listening(self) -> bool:
        return bool(self.active or self.pending)

    def accepts(self, channel: bytes) -> bool:
        """A notification on `channel` may still reach the client (now or once its block commits)."""
        return channel in self.active or any(p.listen and p.channel == channel for p in self.pending)

    def add(self, channel: bytes, message: bytes) -> bool:
        """Queue a notification for the client; False when it does not listen on its channel."""
        if not self.accepts(channel):
            return False
        self.queue.append((channel, message))
        self.queued_bytes += len(message)
        if len(self.queue) > MAX_QUEUED_NOTIFICATIONS or self.queued_bytes > MAX_QUEUED_NOTIFY_BYTES:
            self.overflow = (f"too many notifications waiting for this client ({len(self.queue)}, "
                             f"{self.queued_bytes} bytes; limit {MAX_QUEUED_NOTIFICATIONS} notifications or "
                             f"{MAX_QUEUED_NOTIFY_BYTES} bytes)")
        return True

    def take(self, out: bytearray) -> None:
        """Every queued notification the client still listens on, to send now (it is between transactions)."""
        active = self.active
        queue = self.queue
        while queue:
            channel, message = queue.popleft()
            if channel in active:
                out += message
        self.queued_bytes = 0

    def _purge(self) -> None:
        """Drop what waits on channels the client no longer listens on (PostgreSQL checks at delivery)."""
        if self.queue:
            kept = deque(item for item in self.queue if self.accepts(item[0]))
            self.queue = kept
            self.queued_bytes = sum(len(msg) for _, msg in kept)


class Listening:
    """The session core's LISTEN/UNLISTEN and notification decisions (its state is set up there)."""

    _cbuf: bytearray
    _cpos: int
    _granted: bool
    owed: deque[Pending]
    _listen_fakes: deque[tuple[Pending, ListenOp]]
    _notify_ends: deque[Pending]
    _listen_statements: dict[bytes, ListenOp]
    _listen_unnamed: ListenOp | None
    _listen_portal: ListenOp | None
    _listen_in_batch: bool
    _local_batch: bool
    _lazy_sync: bool
    skip_until_sync: bool
    _sync_to_backend: bool
    unsynced: bool
    tx_status: bytes
    to_client: bytearray
    client_params: dict[str, str]
    counters: Any
    listens: ClientListens
    listen_request: ListenOp | None
    listen_changed: bool
    barrier_wanted: bool

    if TYPE_CHECKING:  # the core's own
        def idle(self) -> bool: ...

        def _fake(self, data: bytes, *, ready: bool = False) -> None: ...

        def _due(self) -> None: ...

    def _init_listen(self) -> None:
        """The client's channels, served by the worker's listener (transaction mode)."""
        self.listens = ClientListens()
        self.listen_request = None  # the LISTEN/UNLISTEN at the front (NEED_LISTEN)
        self.listen_changed = False  # the channels the listener must serve changed: tell it
        self._notified = False      # the client listens and its batch since the last Sync may NOTIFY
        self._notify_ends = deque()  # owed Query/Sync answers that end a statement that may NOTIFY
        self._block_notified = False  # such a statement ran in the open transaction block
        self._listen_fakes = deque()  # LISTENs answered in order
        self._listen_statements = {}  # the client's named statements that LISTEN
        self._listen_unnamed = None  # the unnamed statement O7s answered: a LISTEN
        self._listen_portal = None   # the unnamed portal bound to one
        self._listen_in_batch = False  # listen_request comes from an Execute (no ReadyForQuery of its own)
        self._local_batch = False      # the extended-protocol batch so far is O7s's (a LISTEN's)

    def listen_target(self) -> set[bytes]:
        """The channels the client will listen on once the LISTEN/UNLISTEN at the front is done."""
        return self.listens.after(self.listen_request)

    def listen_done(self, error: ClientError | None) -> None:
        """The listener serves `listen_target()` (or could not: `error`): answer the statement at the front."""
        op, self.listen_request = self.listen_request, None
        assert op is not None
        self._granted = False
        self._cpos += 1 + _I32.unpack_from(self._cbuf, self._cpos + 1)[0]
        batch, self._listen_in_batch = self._listen_in_batch, False
        if error is None:
            self.listens.apply(op)
            self._fake(m.command_complete(op.tag), ready=not batch)
        else:
            self.counters.errors += 1
            self._fake(error.to_bytes(), ready=not batch)
            if batch:  # as after any error in a batch: the rest of it is skipped, its Sync answered here
                self._local_batch = self.unsynced = False  # nothing of it went to a backend
                self.skip_until_sync = True
                self._sync_to_backend = False

    def notification(self, message: bytes) -> bool:
        """A notification from the listener: sent now if the client is between transactions, else queued
        until it is (as PostgreSQL delivers them). False when the client does not listen on its channel."""
        if not self.listens.add(notification_channel(message), message):
            return False
        if self.idle() and self.listen_request is None and len(self.to_client) < MAX_UNSENT:
            self.listens.take(self.to_client)
        return True

    def _batch_local(self) -> bool:
        """The extended-protocol batch so far is O7s's own (or none has started), outside a failed block."""
        return ((self._local_batch or (not self.unsynced and not any(not p.hidden and p.kind is not Kind.FAKE
                                                                      for p in self.owed)))
                and self.tx_status != b"E"
                and speaks_utf8(self.client_params))

    def _listen_ext(self, t: int, s: int, e: int) -> bool | None:
        """LISTEN/UNLISTEN through the extended protocol (asyncpg's `add_listener` prepares it; pgjdbc and
        pgx send Parse/Bind/Execute/Sync): a batch that only runs such a statement is answered here, as
        `_listen` does for a Query. None: not such a message (it goes the usual way)."""
        buf = self._cbuf
        if t == _PARSE:
            name_end = buf.find(b"\x00", s + 5, e)
            if name_end < 0 or not _HEAD.match(buf, name_end + 1, e):
                if self._listen_statements and name_end > s + 5:
                    self._listen_statements.pop(bytes(buf[s + 5:name_end]), None)
                return None
            name = bytes(buf[s + 5:name_end])
            text_end = buf.find(b"\x00", name_end + 1, e)
            op = None
            if text_end > 0 and buf[text_end + 1:text_end + 3] == b"\x00\x00":  # no parameter types
                op = parse_listen(buf, name_end + 1, text_end)
            if name:
                if op is not None and len(self._listen_statements) < MAX_CHANNELS_PER_CLIENT:
                    self._listen_statements[name] = op
                else:
                    self._listen_statements.pop(name, None)
                return None  # a named statement like any other, so that every other use of it works
            if op is None or not self._batch_local():
                self._listen_unnamed = None
                return None
            self._listen_unnamed = op
            self._local_batch = self.unsynced = True
            self._fake(m.parse_complete())
            return True
        if t == _BIND:
            portal, stmt, _ = m.split_bind(bytes(buf[s + 5:e]))
            op = self._listen_statements.get(stmt) if stmt else self._listen_unnamed
            if op is None or portal or not self._batch_local():
                return None
            self._listen_portal = op
            self._local_batch = self.unsynced = True
            self._fake(_BIND_COMPLETE)
            return True
        if t == _DESCRIBE:
            kind, name = m.split_describe_close(bytes(buf[s + 5:e]))
            if kind == _STATEMENT:
                op = self._listen_statements.get(name) if name else self._listen_unnamed
                if op is None or not self._batch_local():
                    return None
                self._local_batch = self.unsynced = True
                self._fake(_NO_PARAMETERS + _NO_DATA)
                return True
            if name or self._listen_portal is None or not self._local_batch:
                return None
            self._fake(_NO_DATA)
            return True
        if not self._local_batch:
            if t == _CLOSE and self._listen_statements:
                kind, name = m.split_describe_close(bytes(buf[s + 5:e]))
                if kind == _STATEMENT:
                    self._listen_statements.pop(name, None)
            return None
        if t == _EXECUTE:
            op = self._listen_portal
            if op is None or buf[s + 5] != 0:
                return None
            self._listen_portal = None
            self._granted = False
            if self.tx_status == b"I":
                self.listen_request = op
                self._listen_in_batch = True
                return False
            self.listens.pending.append(op)
            self.listen_changed = op.listen
            self._fake(m.command_complete(op.tag))
            return True
        if t == _SYNC:
            self._local_batch = self.unsynced = self._lazy_sync = False
            self._listen_portal = None
            self._fake(m.ready_for_query(self.tx_status))
            return True
        if t == _FLUSH:
            self._due()  # what O7s holds goes out, as the server's would
            return True
        return None

    def _listen_in_order(self, op: ListenOp, out: bytearray) -> None:
        """A pipelined LISTEN/UNLISTEN reached the front: it takes effect as the transaction status now
        says (the shell brings the listener along before this answer goes out)."""
        status = self.tx_status
        if status == b"E":
            out += m.error_response("ERROR", IN_FAILED_TRANSACTION, "current transaction is aborted, "
                                    "commands ignored until end of transaction block")
        else:
            if status == b"I":
                self.listens.apply(op)
            else:
                self.listens.pending.append(op)
            self.listen_changed = True
            out += m.command_complete(op.tag)
        out += m.ready_for_query(status)

    def quiet(self) -> bool:
        """No statement that may NOTIFY is still running for a listening client. Until then its next
        statements wait, so that what the listener relays before a ReadyForQuery is that statement's
        own, as PostgreSQL sends it (pipelines of notifying statements lose their overlap)."""
        return not self._notify_ends and not self.barrier_wanted

    def barrier_done(self) -> None:
        """The listener has relayed what the client's own transaction sent: those notifications go out
        before its ReadyForQuery, as directly (the shell then feeds the backend's bytes on)."""
        self.barrier_wanted = False
        self.listens.take(self.to_client)

    def _listen(self, s: int, e: int) -> bool | None:
        """A Query that is one LISTEN/UNLISTEN, with nothing else in flight, is served by the worker's
        listener rather than the backend (which would then have to stay with the client). None: not one;
        True: answered here; False: the listener must serve it first (NEED_LISTEN, then `listen_done`)."""
        op = parse_listen(self._cbuf, s + 5, e - 1)
        if (op is None or self.unsynced
                or not speaks_utf8(self.client_params)):  # the listener speaks UTF8
            return None
        if any(not p.hidden for p in self.owed):
            # Behind answers still owed (a pipeline): it takes effect, and is answered, in its turn.
            self._granted = False
            pending = Pending(Kind.FAKE)
            self.owed.append(pending)
            self._listen_fakes.append((pending, op))
            return True
        if op.listen and op.channel not in self.listens.active and len(self.listens.wanted()) >= MAX_CHANNELS_PER_CLIENT:
            self._granted = False
            self.counters.errors += 1
            self._fake(ClientError(codes.PROGRAM_LIMIT_EXCEEDED, f"too many channels LISTENed on one connection (limit "
                                   f"{MAX_CHANNELS_PER_CLIENT} in transaction mode)", fatal=False).to_bytes(),
                       ready=True)
            return True
        if self.tx_status == b"I":
            self.listen_request = op
            return False
        if self.tx_status != b"T":
            return None  # a failed transaction block: the server refuses it, as directly (nothing owed)
        # Inside a transaction block it takes effect at COMMIT and is dropped at ROLLBACK; the listener
        # starts listening now, so that what the block's own NOTIFY sends is not missed.
        self._granted = False
        self.listens.pending.append(op)
        self.listen_changed = op.listen
        self._fake(m.command_complete(op.tag), ready=True)
        return True


class ListenerCore:
    """The listener connection's side: one server connection LISTENs on every channel any of its
    subscribers (client sessions, by any hashable key) listens on.

    `statements()` says what to send it; `feed()` reads what it says and returns the notifications
    routed to their subscribers. `server` is what the server will listen on once everything sent has
    run; `listening` what it has confirmed (ReadyForQuery of each statement).
    """

    def __init__(self) -> None:
        self.subscribers: dict[Hashable, tuple[int, frozenset[bytes]]] = {}  # key -> (client pid, channels)
        self.by_channel: dict[bytes, dict[Hashable, int]] = {}  # channel -> {key: client pid}
        self.server: set[bytes] = set()
        self.listening: set[bytes] = set()
        self.inflight: deque[tuple[bool, bytes]] = deque()  # (LISTEN?, channel) of each Query sent
        self.failed: dict[bytes, str] = {}  # channel -> the server's error for its LISTEN
        self.reader = MessageReader(MAX_LISTENER_MESSAGE)
        # Barriers: an empty query whose ReadyForQuery comes after every notification the server had
        # signalled to this connection when it read the query.
        self.barriers_asked = 0
        self.barriers_sent = 0
        self.barriers_done = 0

    def want(self, key: Hashable, pid: int, channels: Iterable[bytes]) -> None:
        """Subscriber `key` (whose client was given `pid`) listens on exactly `channels` now."""
        new = frozenset(channels)
        old = self.subscribers.get(key, (pid, frozenset()))[1]
        for channel in old - new:
            subs = self.by_channel.get(channel)
            if subs is not None:
                subs.pop(key, None)
                if not subs:
                    del self.by_channel[channel]
        for channel in new:
            self.by_channel.setdefault(channel, {})[key] = pid
            if channel not in self.server:
                self.failed.pop(channel, None)
        if new:
            self.subscribers[key] = (pid, new)
        else:
            self.subscribers.pop(key, None)

    def drop(self, key: Hashable) -> None:
        self.want(key, 0, ())

    def idle(self) -> bool:
        """Nobody subscribes and the server listens on nothing: the connection may close."""
        return (not self.subscribers and not self.server and not self.inflight
                and self.barriers_sent == self.barriers_asked)

    def statements(self) -> bytes:
        """The Query messages that bring the server's channels to what the subscribers want (one
        statement a message, so that one failure cannot undo the others)."""
        out = bytearray()
        wanted = self.by_channel
        for channel in [c for c in wanted if c not in self.server and c not in self.failed]:
            out += m.query("LISTEN " + quote_channel(channel).decode("utf-8", "surrogateescape"))
            self.server.add(channel)
            self.inflight.append((True, channel))
        for channel in [c for c in self.server if c not in wanted]:
            out += m.query("UNLISTEN " + quote_channel(channel).decode("utf-8", "surrogateescape"))
            self.server.discard(channel)
            self.inflight.append((False, channel))
        while self.barriers_sent < self.barriers_asked:
            out += m.query("")
            self.barriers_sent += 1
            self.inflight.append((False, b""))
        return bytes(out)

    def barrier(self) -> int:
        """Ask for a barrier; it is passed once `barriers_done` reaches the number returned."""
        self.barriers_asked += 1
        return self.barriers_asked

    def confirmed(self, channels: Iterable[bytes]) -> bool:
        return all(c in self.listening for c in channels)

    def error_for(self, channels: Iterable[bytes]) -> str:
        for c in channels:
            if c in self.failed:
                return self.failed[c]
        return ""

    def reset(self) -> None:
        """The connection was lost: a new one listens on nothing yet."""
        self.server.clear()
        self.listening.clear()
        self.inflight.clear()
        self.failed.clear()
        self.reader = MessageReader(MAX_LISTENER_MESSAGE)
        self.barriers_sent = self.barriers_done = self.barriers_asked  # nothing to wait for on a new one

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, int]]:
        """What the listener connection said: its notifications, each as (message, sender pid)."""
        reader = self.reader
        reader.feed(bytes(data))
        notes: list[tuple[bytes, int]] = []
        while (msg := reader.next()) is not None:
            t, s, e = msg
            if t == _NOTIFICATION:
                if e - s < 11:
                    raise ProtocolViolation("malformed NotificationResponse")
                notes.append((bytes(reader.buf[s:e]), _I32.unpack_from(reader.buf, s + 5)[0]))
            elif t == _ERROR and self.inflight and self.inflight[0][1]:
                listen, channel = self.inflight[0]
                fields = m.parse_error_fields(reader.payload(s, e))
                if listen:
                    self.failed[channel] = f"{fields.get('M', '')} ({fields.get('C', '')})"
                    self.server.discard(channel)
            elif t == _READY and self.inflight:
                listen, channel = self.inflight.popleft()
                if not channel:
                    self.barriers_done += 1
                elif listen and channel in self.server:
                    self.listening.add(channel)
                elif not listen:
                    self.listening.discard(channel)
        return notes

    def route(self, message: bytes, holder_pid: int) -> list[tuple[Hashable, bytes]]:
        """Who gets a notification, and what: a subscriber whose own backend sent it (its client was
        `holder_pid`) sees the pid it was given, as directly; others see the sender's."""
        channel = notification_channel(message)
        subs = self.by_channel.get(channel)
        if not subs:
            return []
        own = with_sender(message, holder_pid) if holder_pid and holder_pid in subs.values() else message
        return [(key, own if pid == holder_pid and holder_pid else message) for key, pid in subs.items()]
