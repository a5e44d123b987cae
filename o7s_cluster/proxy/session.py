"""The core of one logged-in session: what to send each way, and when a backend is needed or free.

`SessionCore` takes the bytes a client sent (`feed_client`) and the bytes its backend sent
(`feed_backend`), and leaves what to send in `to_backend` and `to_client`. It tells the shell when
it needs a backend (`NEED_BACKEND`), a rate-limit token (`NEED_TOKEN`), and when the backend may go
back to the pool (`RELEASE`). Times are handed in; counters are fed once per event.

Transaction mode keeps, besides the queue of responses owed (`proxy.owed`), the client's named
statements (`proxy.statements`), its session settings (`proxy.params`) and the read-back of session
state (`proxy.readback`). Session mode relays the client's messages as they are.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError, ProtocolViolation
from o7s_cluster.proxy import owed
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.listen import LISTEN_FIRST, Listening, may_notify
from o7s_cluster.proxy.named import DEALLOCATE_FIRST, MAX_NAMED_PARSE, NamedStatements
from o7s_cluster.proxy.owed import Kind, Pending
from o7s_cluster.proxy.readback import Readback, custom_names, may_change_state, prepared_may_change_state
from o7s_cluster.proxy.relay import BackendRelay, Counters
from o7s_cluster.proxy.statements import ClientStatements, PoolStatements

# What feed_client / resume ask of the shell.
PROCEED = 0        # all complete messages handled: send the output, read more from the client
NEED_BACKEND = 1   # attach a backend (then `attached`) or report why not (`attach_failed`)
NEED_TOKEN = 2     # wait for a rate-limit token (then `token_granted` or `token_refused`)
TERMINATE = 3      # the client said goodbye
NEED_LISTEN = 4    # transaction mode: bring the listener to `listen_target()` (then `listen_done`)
NEED_QUIET = 5     # wait until `quiet()`: a statement that may NOTIFY ends before the next one starts


# Frontend message types.
_QUERY, _PARSE, _BIND, _EXECUTE, _DESCRIBE, _CLOSE, _SYNC, _FLUSH, _FUNCTION, _TERMINATE = b"QPBEDCSHFX"
_COPY_DATA, _COPY_DONE, _COPY_FAIL = b"dcf"
_COPY_MESSAGES = frozenset(b"dcf")
_FRONTEND = frozenset(b"QPBEDCSHFXdcf")
_STATEMENT = ord("S")
_DESCRIBE_KINDS = frozenset(b"SP")  # a prepared statement, a portal
# Messages whose routing is only forwarding while `_plain_backend` says so; a Query or an unnamed Parse
# too unless its text starts like one O7s takes over (LISTEN, UNLISTEN, DEALLOCATE).
_PLAIN = frozenset(b"BEDS")
_TAKEN_OVER_FIRST = LISTEN_FIRST | DEALLOCATE_FIRST

# Client messages larger than this pass through to the backend as they arrive rather than being
# buffered whole (PostgreSQL itself caps a message at 1 GiB; `max_message` caps it here).
STREAM_AT = 256 * 1024
_STREAM_PREFIX = 4096            # bytes of a streamed message read before it starts (names, SQL head)
_STREAMABLE = frozenset(b"QPBFd")
MAX_CONTROL_MESSAGE = 64 * 1024  # Execute, Describe, Close, Sync, Flush, CopyDone, CopyFail, Terminate

_I32 = struct.Struct("!i")
# Enum members as module globals: the per-message loops compare them often.
_K_EXECUTE = Kind.EXECUTE
_K_FAKE = Kind.FAKE
_K_PARSE = Kind.PARSE
_K_QUERY = Kind.QUERY
_K_SYNC = Kind.SYNC
_HEADER = struct.Struct("!ci")
# What PostgreSQL says of a cancelled statement.
QUERY_CANCELED = ClientError(codes.QUERY_CANCELED, "canceling statement due to user request", fatal=False)


class SessionCore(NamedStatements, Listening, BackendRelay):
    """The decisions of one client session between login and goodbye (see the module docstring)."""

    def __init__(self, *, transaction_mode: bool, counters: Counters, pool_statements: PoolStatements,
                 client_params: dict[str, str], take_token: Callable[[], bool],
                 max_message: int = 1 << 30, client_pid: int = 0) -> None:
        self.transaction_mode = transaction_mode
        self.client_pid = client_pid            # the process id the client was given (BackendKeyData)
        self.counters = counters
        self.take_token = take_token
        self.max_message = max_message
        self.client_params = client_params      # the client's session settings (follow it across backends)
        self.statements = ClientStatements(pool_statements)
        self.pool_statements = pool_statements
        self.to_backend = bytearray()
        self.to_client = bytearray()
        self.owed: deque[Pending] = deque()
        self.backend: BackendState | None = None
        self.tx_status = b"I"
        # Client side.
        self._cbuf = bytearray()
        self._cpos = 0
        self._stream_left = 0       # bytes of a large client message still to pass through
        self._discard_left = 0      # bytes of a refused large client message still to drop
        self._granted = False       # the message at the front already has its token
        self._routed = False        # ... and was routed: it waits only for a backend
        self.unsynced = False       # extended-protocol messages sent since the last Sync
        self.skip_until_sync = False
        self._sync_to_backend = False  # the Sync that ends a skipped batch still goes to the backend
        self._lazy_sync = False     # a batch answered here (named Parse) awaits its Sync
        self._held = 0              # answers of O7s's own held until the client's Flush or Sync
        # Backend side.
        self._bbuf = bytearray()
        self._bpos = 0
        self._bstream_left = 0      # bytes of a large backend message still to relay
        self._query_rows = 0        # rows of the simple query in progress (its CommandCompletes)
        self._query_ok = True
        # Session state (transaction mode).
        self._readback_due = False  # a statement may have changed session state since the last read-back
        self._readback: Readback | None = None
        self._custom: list[str] = []  # custom settings the client named: read back by name
        self.pinned = ""            # why the client keeps its backend ('' when it does not)
        self.backend_fatal = False  # the backend said it is terminating the session
        self.draining = False
        self._init_listen()  # LISTEN/NOTIFY in transaction mode (proxy.listen)
        self.barrier_wanted = False  # hold the ReadyForQuery until the listener relayed what they sent

    # --- the shell's view -------------------------------------------------------------------

    def idle(self) -> bool:
        """Nothing owed, no batch or transaction open: a backend here may go back to the pool."""
        return (not self.owed and not self.unsynced and self.tx_status == b"I" and not self._stream_left
                and self._bpos == len(self._bbuf))

    def query_running(self) -> bool:
        """A cancel now would reach one of this session's queries."""
        return self.backend is not None and any(p.kind in (_K_EXECUTE, _K_QUERY, _K_SYNC) and not p.hidden
                                                for p in self.owed)

    def input_buffered(self) -> int:
        """Client bytes held here (a partial message)."""
        return len(self._cbuf) - self._cpos

    def partial_input(self) -> bool:
        return self._cpos < len(self._cbuf) or self._stream_left > 0 or self._discard_left > 0

    # --- client → backend -------------------------------------------------------------------

    def feed_client(self, data: bytes | bytearray | memoryview, now: float) -> int:
        self.counters.bytes_in += len(data)
        buf = self._cbuf
        if self._cpos:
            del buf[: self._cpos]
            self._cpos = 0
        buf += data
        return self.resume(now)

    def resume(self, now: float) -> int:
        """Handle client messages until one needs something of the shell."""
        buf = self._cbuf
        pos = self._cpos
        out = self.to_backend
        end_of_data = len(buf)
        backend = self._plain_backend()
        while True:
            avail = end_of_data - pos
            if self._stream_left:
                n = min(avail, self._stream_left)
                out += buf[pos:pos + n]
                pos += n
                self._stream_left -= n
                if self._stream_left:
                    break
                continue
            if self._discard_left:
                n = min(avail, self._discard_left)
                pos += n
                self._discard_left -= n
                if self._discard_left:
                    break
                continue
            if avail < 5:
                if avail and buf[pos] not in _FRONTEND:
                    raise ProtocolViolation(f"invalid message type {buf[pos]:#04x}")
                break
            t = buf[pos]
            if t not in _FRONTEND:
                raise ProtocolViolation(f"invalid message type {t:#04x}")
            length = _I32.unpack_from(buf, pos + 1)[0]
            if length < 4 or length > self.max_message:
                raise ProtocolViolation(f"invalid message length {length} (limit {self.max_message})")
            stop = pos + 1 + length
            if stop > end_of_data:
                if t not in _STREAMABLE:
                    if length > MAX_CONTROL_MESSAGE:
                        raise ProtocolViolation(f"invalid message length {length} for message type {chr(t)!r}")
                    break
                if length <= STREAM_AT or avail < _STREAM_PREFIX:
                    break
                if t == _PARSE and self.transaction_mode and buf[pos + 5] != 0 and length <= MAX_NAMED_PARSE:
                    break  # a named statement is kept whole (up to its cap) to prepare it on any backend
                self._cpos = pos
                action = self._stream_head(t, pos, stop, now)
                pos = self._cpos
                if action is not PROCEED:
                    return action
                backend = self._plain_backend()
                continue
            if backend is not None and (t in _PLAIN or (stop - pos > 7 and (
                    (t == _QUERY and buf[pos + 5] not in _TAKEN_OVER_FIRST)
                    or (t == _PARSE and not buf[pos + 5] and buf[pos + 6] not in LISTEN_FIRST)))):
                # What `_message` would decide for it, in short: nothing is taken over, waits, or is skipped.
                if (t == _EXECUTE or t == _QUERY) and not self._granted and not self.take_token():
                    self._cpos = pos
                    return NEED_TOKEN
                self._granted = self._routed = self._lazy_sync = False
                self._forward(backend, t, pos, stop, now)
                pos = stop
                if (t == _SYNC or t == _QUERY) and self._notify_ends:  # the next one waits for their end
                    backend = None
                continue
            self._cpos = pos
            action = self._message(t, pos, stop, now)
            if action is not PROCEED:
                return action
            pos = self._cpos = stop
            backend = self._plain_backend()
        self._cpos = pos
        if self.listens.queue and self.idle():
            self.listens.take(self.to_client)
        return PROCEED

    def _plain_backend(self) -> BackendState | None:
        """The backend, when nothing makes the next message's routing more than forwarding it there
        (`resume` then skips `_message`): no batch to skip or answered here, no LISTEN statement to take
        over, no notification to wait for, no pin. Else None."""
        backend = self.backend
        if (backend is None or self.skip_until_sync or self._local_batch or self._listen_statements
                or self._listen_unnamed or self._notify_ends or self.barrier_wanted or self.pinned):
            return None
        return backend

    def _message(self, t: int, s: int, e: int, now: float) -> int:
        """One whole client message at buf[s:e]. PROCEED once it is handled; else the shell's turn
        (the message stays at the front and is handled again on `resume`)."""
        buf = self._cbuf
        if not self._routed:  # (else it was routed before the shell attached a backend)
            if t == _TERMINATE:
                return TERMINATE
            if self.skip_until_sync:  # after an error, O7s's or the server's
                if t != _SYNC:
                    self._granted = False
                    return PROCEED
                self.skip_until_sync = False
                if not self._sync_to_backend:
                    self._fake(m.ready_for_query(self.tx_status))
                    return PROCEED
                self._sync_to_backend = False  # earlier messages of the batch went to the backend
            elif (t == _QUERY or t == _EXECUTE or t == _FUNCTION) and not self._granted:
                if not self.take_token():
                    return NEED_TOKEN
                self._granted = True
            backend = self.backend
            if self.transaction_mode:
                # A Query's first byte rules out most take-overs (an empty one has none: e == s + 5).
                first = buf[s + 5] if e > s + 5 else -1
                if t == _QUERY and first in LISTEN_FIRST and (taken := self._listen(s, e)) is not None:
                    return PROCEED if taken else NEED_LISTEN
                if ((t == _PARSE or self._local_batch or ((t == _BIND or t == _DESCRIBE or t == _CLOSE)
                                                          and (self._listen_statements or self._listen_unnamed)))
                        and (taken := self._listen_ext(t, s, e)) is not None):
                    return PROCEED if taken else NEED_LISTEN
                if (((t == _QUERY and first in DEALLOCATE_FIRST) or t == _CLOSE)
                        and self._answer_locally(t, s, e, now)):
                    self._granted = False
                    return PROCEED
                if backend is None and self.tx_status == b"I":
                    # A named Parse outside a transaction needs no backend yet: it is prepared where its
                    # Bind or Describe lands, so that clients preparing with a blocking call (PQprepare)
                    # never wait for a backend just to prepare.
                    if t == _PARSE and self._parse_locally(s, e):
                        return PROCEED
                    if self._lazy_sync and (t == _SYNC or t == _FLUSH):
                        if t == _SYNC:
                            self._lazy_sync = False
                            self.unsynced = False
                            self._fake(m.ready_for_query(self.tx_status))
                        else:
                            self._due()
                        return PROCEED
            if backend is None:
                self._routed = True  # token and routing settled: it waits for a backend only
                return NEED_BACKEND
        else:
            backend = self.backend
            if backend is None:
                return NEED_BACKEND
            self._routed = False
        if (self._notify_ends or self.barrier_wanted) and t not in _COPY_MESSAGES:  # COPY data: the running query's
            return NEED_QUIET  # its own notifications come first, as directly: see `Listening.quiet`
        self._granted = False
        self._lazy_sync = False
        if self.pinned:
            self._readback_due = True  # is the state that pins it gone yet? asked once it is at rest
        self._forward(backend, t, s, e, now)
        return PROCEED

    def _stream_head(self, t: int, s: int, stop: int, now: float) -> int:
        """The start of a large message: bookkeeping on its head, then its bytes pass through."""
        buf = self._cbuf
        avail_end = len(buf)
        if self.skip_until_sync:
            self._discard_left = stop - s
            self._cpos = s
            return PROCEED
        if (t == _QUERY or t == _FUNCTION) and not self._granted:
            if not self.take_token():
                return NEED_TOKEN
            self._granted = True
        if self.backend is None:
            return NEED_BACKEND
        backend = self.backend
        self._granted = False
        self._lazy_sync = False
        head_end = min(avail_end, stop)
        if t == _QUERY:
            self.owed.append(Pending(_K_QUERY, now))
            self._readback_due = True  # too large to scan: assume it may change state
            self.to_backend += buf[s:head_end]
        elif t == _FUNCTION:
            self.owed.append(Pending(_K_QUERY, now))
            self._readback_due = True
            self.to_backend += buf[s:head_end]
        elif t == _COPY_DATA:
            self.to_backend += buf[s:head_end]
        elif t == _PARSE:
            name_end = buf.find(b"\x00", s + 5, s + 5 + _STREAM_PREFIX)
            if name_end < 0:
                raise ProtocolViolation("statement name too long")
            if name_end > s + 5 and self.transaction_mode:
                # A named statement's text is kept to prepare it on other backends: capped.
                self._refuse_streamed(ClientError(
                    codes.PROGRAM_LIMIT_EXCEEDED,
                    f"prepared statement text too long ({stop - s} bytes; limit {MAX_NAMED_PARSE} for a named "
                    "statement in transaction mode)", fatal=False), s, stop)
                return PROCEED
            self.unsynced = True
            self.owed.append(owed.PARSE)
            self._readback_due = True
            self.to_backend += buf[s:head_end]
        else:  # Bind
            portal_end = buf.find(b"\x00", s + 5, s + 5 + _STREAM_PREFIX)
            stmt_end = buf.find(b"\x00", portal_end + 1, s + 5 + _STREAM_PREFIX) if portal_end >= 0 else -1
            if stmt_end < 0:
                raise ProtocolViolation("portal or statement name too long")
            self.unsynced = True
            name = bytes(buf[portal_end + 1:stmt_end])
            statement = self.statements.get(name) if (name and self.transaction_mode) else None
            if statement is not None:
                if statement.stateful:
                    self._readback_due = True
                key = self._prepare_on(backend, statement)
                body_len = (stop - s - 1) - len(name) + len(key)
                self.to_backend += b"B" + _I32.pack(body_len) + buf[s + 5:portal_end + 1] + key
                self.to_backend += buf[stmt_end:head_end]
            else:
                self.to_backend += buf[s:head_end]
            self.owed.append(owed.BIND)
        self._stream_left = stop - head_end
        self._cpos = head_end
        return PROCEED

    def _refuse_streamed(self, error: ClientError, s: int, stop: int) -> None:
        """Drop a large message the client is still sending, answer it with `error`, skip its batch."""
        self.counters.errors += 1
        self._fake(error.to_bytes())
        self.skip_until_sync = True
        self._sync_to_backend = self.backend is not None and self.unsynced
        self._discard_left = stop - s
        self._cpos = s

    # --- the shell's answers ----------------------------------------------------------------

    def attached(self, backend: BackendState) -> None:
        """A backend now serves this client (its settings already match the client's)."""
        self.backend = backend
        held = list(self.owed) if self.owed else ()  # answers O7s holds: the batch only now reaches a backend
        self.owed.clear()
        if self.transaction_mode:
            self._close_dropped(backend)
        for p in held:
            self._held_to_server(backend, p)

    def attach_failed(self, error: ClientError) -> None:
        """No backend could be had: the message at the front gets the error, its batch is skipped."""
        self.counters.errors += 1
        self._refuse_front(error)

    def token_granted(self, waited: bool) -> None:
        if waited:
            self.counters.throttled += 1
        self._granted = True

    def token_refused(self, error: ClientError) -> None:
        """Over the rate limit: the query at the front is answered with `error` and not run."""
        self.counters.refused += 1
        self._refuse_front(error)

    def wait_cancelled(self) -> bool:
        """A cancel reached the message at the front while it waited for a backend or a token.

        True: nothing of its batch or transaction is on a backend, so it is answered with the server's
        own cancel error and never runs. False: it must run (it is granted) and be cancelled on its
        backend, as directly; a local error would leave the server's transaction or batch going on."""
        if self.backend is not None and (self.tx_status != b"I" or self.unsynced):
            self._granted = True
            return False
        self.counters.errors += 1
        self._refuse_front(QUERY_CANCELED)
        return True

    def _refuse_front(self, error: ClientError) -> None:
        """The message at the front is answered with `error` and not run; the rest of its batch is skipped."""
        self._granted = self._routed = False
        buf = self._cbuf
        t = buf[self._cpos]
        length = _I32.unpack_from(buf, self._cpos + 1)[0]
        stop = self._cpos + 1 + length
        if t == _QUERY or t == _FUNCTION or t == _SYNC:
            self._fake(error.to_bytes(), ready=True)
        else:  # the rest of its batch is skipped, as after any error
            self._fake(error.to_bytes())
            self.skip_until_sync = True
            self._sync_to_backend = self.backend is not None and self.unsynced
        if stop <= len(buf):
            self._cpos = stop
        else:  # a large message: drop the rest of it as it arrives
            self._discard_left = stop - len(buf)
            self._cpos = len(buf)

    def detach(self) -> BackendState | None:
        """The shell takes the backend away (given back, or lost)."""
        backend, self.backend = self.backend, None
        return backend

    # --- forwarding -------------------------------------------------------------------------

    def _forward(self, backend: BackendState, t: int, s: int, e: int, now: float) -> None:
        buf = self._cbuf
        out = self.to_backend
        owed_ = self.owed
        if t == _QUERY:
            owed_.append(Pending(_K_QUERY, now))
            out += buf[s:e]
            if self.transaction_mode:
                sql = buf[s + 5:e - 1]
                if may_change_state(sql):
                    self._note_state(sql)
                if self.listens.listening() and may_notify(sql):
                    self._notify_ends.append(owed_[-1])
        elif t == _BIND:
            self.unsynced = True
            if self.transaction_mode:
                portal_end = buf.find(b"\x00", s + 5, e)
                stmt_end = buf.find(b"\x00", portal_end + 1, e) if portal_end >= 0 else -1
                if stmt_end < 0:
                    raise ProtocolViolation("malformed Bind message")
                if stmt_end > portal_end + 1:
                    statement = self.statements.get(bytes(buf[portal_end + 1:stmt_end]))
                    if statement is not None:
                        if statement.stateful:
                            self._readback_due = True
                        if self.listens.listening() and may_notify(statement.parse_rest):
                            self._notified = True
                        key = self._prepare_on(backend, statement)
                        body_len = (e - s - 1) - (stmt_end - portal_end - 1) + len(key)
                        out += b"B" + _I32.pack(body_len) + buf[s + 5:portal_end + 1] + key + buf[stmt_end:e]
                        owed_.append(owed.BIND)
                        return
            out += buf[s:e]
            owed_.append(owed.BIND)
        elif t == _EXECUTE:
            self.unsynced = True
            owed_.append(Pending(_K_EXECUTE, now))
            out += buf[s:e]
        elif t == _SYNC:
            self.unsynced = False
            out += buf[s:e]
            if self._notified:  # the batch's end is the one its notifications wait for
                self._notified = False
                owed_.append(Pending(_K_SYNC))
                self._notify_ends.append(owed_[-1])
            else:
                owed_.append(owed.SYNC)
            if self._held:
                self._due()
        elif t == _PARSE:
            self.unsynced = True
            if self.transaction_mode:
                if e > s + 5 and buf[s + 5]:
                    name, rest = m.split_parse(bytes(buf[s + 5:e]))
                    self._parse_named(backend, name, rest)
                    return
                text = bytes(buf[s + 6:m.unnamed_parse_text_end(buf, s, e)])
                if prepared_may_change_state(text):
                    self._note_state(text)
                if self.listens.listening() and may_notify(text):
                    self._notified = True
            owed_.append(owed.PARSE)
            out += buf[s:e]
        elif t == _DESCRIBE:
            self.unsynced = True
            if e - s < 7 or buf[e - 1] or buf[s + 5] not in _DESCRIBE_KINDS:
                raise ProtocolViolation("malformed Describe/Close message")
            if self.transaction_mode and buf[s + 5] == _STATEMENT and e - s > 7:
                statement = self.statements.get(bytes(buf[s + 6:buf.find(b"\x00", s + 6, e)]))
                if statement is not None:
                    key = self._prepare_on(backend, statement)
                    out += m.describe_statement(key)
                    owed_.append(owed.DESCRIBE)
                    return
            out += buf[s:e]
            owed_.append(owed.DESCRIBE)
        elif t == _CLOSE:  # of a portal, or (session mode) of any statement
            self.unsynced = True
            owed_.append(owed.CLOSE)
            out += buf[s:e]
        elif t == _FLUSH:
            self.unsynced = True
            out += buf[s:e]
            if self._held:
                self._due()
        elif t == _FUNCTION:
            owed_.append(Pending(_K_QUERY, now))
            self._readback_due = self.transaction_mode
            out += buf[s:e]
        else:  # CopyData, CopyDone, CopyFail
            out += buf[s:e]

    def _note_state(self, sql: bytes | bytearray) -> None:
        self._readback_due = True
        for name in custom_names(sql):
            if name not in self._custom:
                self._custom.append(name)
