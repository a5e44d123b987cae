"""The backend → client half of the session core: relay what the backend says against the queue of
responses owed, swallow O7s's own, and tell when the backend is free (see `proxy.session`)."""

from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING, Protocol

from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ProtocolViolation
from o7s_cluster.proxy import owed
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.listen import ClientListens, ListenOp
from o7s_cluster.proxy.owed import Kind, Pending
from o7s_cluster.proxy.params import SYNCED_REPORTED
from o7s_cluster.proxy.readback import Readback, readback_sql
from o7s_cluster.proxy.statements import Statement

# What feed_backend tells the shell.
KEEP = 0
RELEASE = 1        # the backend is clean and idle: give it back to the pool

# Backend message types the core looks at; everything else (DataRow above all) passes untouched.
_READY, _PARSE_DONE, _BIND_DONE, _CLOSE_DONE, _ROW_DESC, _NO_DATA = b"Z123Tn"
_COMMAND_DONE, _EMPTY_QUERY, _SUSPENDED, _ERROR, _PARAMETER, _DATA_ROW, _NOTIFICATION = b"CIsESDA"
_INTERESTING = frozenset(b"Z123TnCIsESA")
_FATAL_SEVERITY = (b"SFATAL", b"SPANIC")
_IDLE = ord("I")
BACKEND_STREAM_AT = 256 * 1024   # backend messages larger than this (big rows) are relayed as they arrive
_I32 = struct.Struct("!i")
# Enum members as module globals: the per-message loops compare them often.
_K_DESCRIBE = Kind.DESCRIBE
_K_EXECUTE = Kind.EXECUTE
_K_FAKE = Kind.FAKE
_K_QUERY = Kind.QUERY
_K_READBACK = Kind.READBACK
_K_SYNC = Kind.SYNC


class Counters(Protocol):
    """The per-org counters a session feeds (metrics and usage records read the same ones)."""

    bytes_in: int
    bytes_out: int
    throttled: int
    refused: int
    errors: int

    def query_done(self, seconds: float, rows: int, ok: bool) -> None: ...


def _rows(buf: bytearray, start: int, end: int) -> int:
    """The row count that ends the command tag at buf[start:end] (`SELECT 3`, `INSERT 0 5`), else 0."""
    space = buf.rfind(b" ", start, end)
    if space < 0:
        return 0
    last = buf[space + 1:end]
    return int(last) if last.isdigit() else 0


_BYTE = tuple(bytes((i,)) for i in range(256))  # a transaction status byte as bytes, without a copy


class BackendRelay:
    """Backend → client. The state it reads and keeps is the session core's (set up there)."""

    transaction_mode: bool
    client_pid: int
    counters: Counters
    client_params: dict[str, str]
    to_backend: bytearray
    to_client: bytearray
    owed: deque[Pending]
    backend: BackendState | None
    tx_status: bytes
    unsynced: bool
    pinned: str
    backend_fatal: bool
    _bbuf: bytearray
    _bpos: int
    _bstream_left: int
    _query_rows: int
    _query_ok: bool
    _readback_due: bool
    _held: int
    _readback: Readback | None
    _custom: list[str]
    listens: ClientListens
    listen_changed: bool
    _notify_ends: deque[Pending]
    _block_notified: bool
    _listen_fakes: deque[tuple[Pending, ListenOp]]
    barrier_wanted: bool

    def feed_backend(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Relay what the backend said; RELEASE when the backend may go back to the pool."""
        buf = self._bbuf
        if self._bpos:
            del buf[: self._bpos]
            self._bpos = 0
        buf += data
        out = self.to_client
        start_out = len(out)
        pos = 0
        seg = 0  # start of the bytes to forward as they are
        end_of_data = len(buf)
        owed_ = self.owed
        interesting = _INTERESTING
        if self._bstream_left:  # the rest of a large message, relayed as it arrives
            pos = min(end_of_data, self._bstream_left)
            self._bstream_left -= pos
        front = owed_[0].kind if owed_ else None  # read again whenever the queue may have changed
        while not self._bstream_left:
            if end_of_data - pos < 5:
                break
            t = buf[pos]
            length = _I32.unpack_from(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"invalid backend message length {length}")
            stop = pos + 1 + length
            if stop > end_of_data:
                if length > BACKEND_STREAM_AT and t not in interesting and not (owed_ and owed_[0].hidden):
                    self._bstream_left = stop - end_of_data
                    pos = end_of_data
                break
            if front is _K_FAKE or front is _K_READBACK:
                if front is _K_FAKE:  # held answers of O7s's own go out before the server's next
                    out += buf[seg:pos]
                    seg = pos
                    self._release_before_answer(out)
                    front = owed_[0].kind if owed_ else None
                if front is _K_READBACK:
                    if t == _NOTIFICATION:  # asynchronous: the client's, even during O7s's own query
                        self._own_notification(buf, pos)
                        pos = stop
                        continue
                    out += buf[seg:pos]
                    seg = stop
                    if self._readback_message(t, pos, stop):
                        self._after_pop(out)
                        front = owed_[0].kind if owed_ else None
                    pos = stop
                    continue
            if t not in interesting:
                pos = stop
                continue
            popped = False
            hidden = False
            if t == _READY:
                if length != 5:
                    raise ProtocolViolation(f"invalid ReadyForQuery length {length}")
                ends = self._notify_ends
                if (ends or self._block_notified) and owed_:
                    if ends and owed_[0] is ends[0]:
                        ends.popleft()
                        self._block_notified = True
                    if self._block_notified and buf[pos + 5] == _IDLE:
                        # The client's own NOTIFY has committed: PostgreSQL sends it the notification before
                        # this ReadyForQuery, which waits until the listener has relayed it (`barrier_done`).
                        self._block_notified = False
                        self.barrier_wanted = True
                        break
                self.tx_status = _BYTE[buf[pos + 5]]
                if self.listens.pending and self.tx_status == b"I":  # the block ended without COMMIT
                    self.listens.rollback()
                    self.listen_changed = True
                if owed_:
                    p = owed_.popleft()
                    popped = True
                    hidden = p.hidden
                    if p.kind is _K_QUERY:
                        self.counters.query_done(now - p.started, self._query_rows, self._query_ok)
                        self._query_rows = 0
                        self._query_ok = True
            elif t == _PARSE_DONE or t == _BIND_DONE or t == _CLOSE_DONE:
                if owed_:
                    hidden = owed_.popleft().hidden
                    popped = True
            elif t == _ROW_DESC or t == _NO_DATA:
                if owed_ and owed_[0].kind is _K_DESCRIBE:
                    owed_.popleft()
                    popped = True
            elif t == _COMMAND_DONE or t == _EMPTY_QUERY or t == _SUSPENDED:
                rows = _rows(buf, pos + 5, stop - 1) if t == _COMMAND_DONE else 0
                if t == _COMMAND_DONE and rows == 0:
                    self._on_tag(buf[pos + 5:stop - 1])
                if owed_:
                    front = owed_[0]
                    if front.kind is _K_EXECUTE:
                        owed_.popleft()
                        popped = True
                        self.counters.query_done(now - front.started, rows, True)
                    elif front.kind is _K_QUERY:
                        self._query_rows += rows
            elif t == _ERROR:
                if buf[pos + 5:pos + 11] in _FATAL_SEVERITY:
                    self.backend_fatal = True
                if owed_ and owed_[0].kind is _K_FAKE:
                    # The server flushes what it holds with an error: so does O7s (they answer messages
                    # before the one that failed, even when that one is O7s's own).
                    out += buf[seg:pos]
                    seg = pos
                    self._after_pop(out, force=True)
                # Errors always reach the client, even one answering a statement O7s prepared for it
                # (a lazily prepared statement's syntax error shows at its first use).
                if owed_:
                    front = owed_[0]
                    if front.kind is _K_QUERY:
                        self._query_ok = False
                    elif front.kind is not _K_SYNC:
                        if front.kind is _K_EXECUTE:
                            self.counters.query_done(now - front.started, 0, False)
                        self._skip_batch(bytes(buf[pos + 5:stop]))
                        popped = True
            elif t == _PARAMETER:
                name, value = m.parse_parameter_status(bytes(buf[pos + 5:stop]))
                if self.backend is not None:
                    self.backend.settings.reported[name] = value
                if name in SYNCED_REPORTED:
                    self.client_params[name] = value
            elif t == _NOTIFICATION:
                self._own_notification(buf, pos)
            if hidden:
                out += buf[seg:pos]
                seg = stop
            pos = stop
            front = owed_[0].kind if owed_ else None
            if popped and front is _K_FAKE:
                out += buf[seg:pos]
                seg = pos
                self._after_pop(out)
                front = owed_[0].kind if owed_ else None
        out += buf[seg:pos]
        self._bpos = pos
        self.counters.bytes_out += len(out) - start_out
        if self.owed or self.tx_status != b"I" or self.unsynced or self._bstream_left or pos != end_of_data:
            return KEEP
        if self.listens.queue:  # between transactions: notifications that waited go out now
            self.listens.take(self.to_client)
        return self._at_rest()

    def _own_notification(self, buf: bytearray, pos: int) -> None:
        """A notification the client's own backend sent names the process id the client was given (in
        transaction mode that is not the backend's), so that a client can tell its own notifications."""
        backend = self.backend
        if (self.transaction_mode and backend is not None and backend.pid and self.client_pid
                and _I32.unpack_from(buf, pos + 5)[0] == backend.pid):
            _I32.pack_into(buf, pos + 5, self.client_pid)

    if TYPE_CHECKING:
        def _listen_in_order(self, op: ListenOp, out: bytearray) -> None: ...  # the core's (proxy.listen)

        def _skip_batch(self, error: bytes) -> None: ...  # the core's (proxy.named)

    def _fake(self, data: bytes, *, ready: bool = False) -> None:
        """Answer the client ourselves, after every response still owed to it. An error or ReadyForQuery:
        the server sends everything it holds with it, so do the answers O7s holds."""
        if self.owed:
            self.owed.append(Pending(_K_FAKE, reply=data, ready=ready))
            self._due()
        else:
            self.to_client += data
            if ready:
                self.to_client += m.ready_for_query(self.tx_status)

    def _hold(self, data: bytes, parse: Statement | None = None, dropped: Statement | None = None) -> None:
        """Answer an extended-protocol message ourselves as the server would: its answer waits in the queue
        until the client's Flush or Sync (or until the server answers something after it), so that a
        pipelining client reads it when it would read the server's (libpq decides what to send next by it)."""
        self.owed.append(Pending(_K_FAKE, reply=data, due=False, parse=parse, dropped=dropped))
        self._held += 1

    def _due(self) -> None:
        """The client's Flush or Sync, or an error: every answer O7s holds is due; those at the front go out."""
        owed_ = self.owed
        if self._held:
            for p in owed_:
                p.due = True
            self._held = 0
        if owed_ and owed_[0].kind is _K_FAKE:
            self._after_pop(self.to_client)

    def _after_pop(self, out: bytearray, force: bool = False) -> None:
        """Answers O7s made itself go out as soon as everything before them has (held ones once due)."""
        owed_ = self.owed
        while owed_ and owed_[0].kind is _K_FAKE and (force or owed_[0].due):
            p = owed_.popleft()
            if not p.due:
                self._held -= 1
            if self._listen_fakes and p is self._listen_fakes[0][0]:
                self._listen_in_order(self._listen_fakes.popleft()[1], out)
                continue
            out += p.reply
            if p.ready:
                out += m.ready_for_query(self.tx_status)

    def _release_before_answer(self, out: bytearray) -> None:
        """The backend answers a client message queued after held answers of O7s's: the server has flushed
        past them, so they go out first. (Not for O7s's own hidden messages: the client has not flushed.)"""
        for p in self.owed:
            if p.kind is not _K_FAKE:
                if not p.hidden:
                    self._after_pop(out, force=True)
                return

    def _at_rest(self) -> int:
        """The backend is idle and owes nothing: read session state back, or give it back."""
        if not self.transaction_mode or self.backend is None:
            return KEEP
        if self._readback_due:
            self._readback_due = False
            self._readback = Readback()
            self.to_backend += m.query(readback_sql(self._custom))
            self.owed.append(owed.READBACK)
            return KEEP
        if self.pinned:
            return KEEP
        return RELEASE

    def _readback_message(self, t: int, s: int, e: int) -> bool:
        """One message of the read-back; True at its end (ReadyForQuery)."""
        buf = self._bbuf
        result = self._readback
        assert result is not None
        backend = self.backend
        if t == _DATA_ROW:
            result.row(memoryview(buf)[s + 5:e], backend.settings.reported if backend else {})
        elif t == _ERROR:
            result.failed = True
        elif t == _PARAMETER and backend is not None:
            name, value = m.parse_parameter_status(bytes(buf[s + 5:e]))
            backend.settings.reported[name] = value
        elif t == _READY:
            if e != s + 6:
                raise ProtocolViolation(f"invalid ReadyForQuery length {e - s - 1}")
            self.owed.popleft()
            self._readback = None
            if result.failed:
                # Cannot tell what the session holds: keep the client on this backend.
                self.pinned = "session state O7s could not read"
            else:
                self._apply_readback(result)
            self.tx_status = _BYTE[buf[s + 5]]
            return True
        return False

    def _apply_readback(self, result: Readback) -> None:
        backend = self.backend
        reported = backend.settings.reported if backend is not None else {}
        for name in [n for n in self.client_params if n not in reported]:
            del self.client_params[name]
        self.client_params.update(result.settings)
        if backend is not None:
            backend.settings.applied = dict(result.settings)
        self.pinned = result.state

    def _on_tag(self, tag: bytes | bytearray) -> None:
        if tag == b"COMMIT" and self.listens.pending:  # LISTEN/UNLISTEN of the block take effect
            self.listens.commit()
            self.listen_changed = True
        if tag == b"DISCARD ALL" or tag == b"DEALLOCATE ALL":
            if self.backend is not None:
                self.backend.prepared.clear()
            if tag == b"DISCARD ALL" and self.transaction_mode:
                self._readback_due = True
