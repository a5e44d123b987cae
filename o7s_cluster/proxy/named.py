"""Named prepared statements in transaction mode, the session core's part (see `proxy.statements` for the
bookkeeping): prepare a client's statement on whichever backend serves it, under O7s's name, and answer or
forward the client's Parse, Close and DEALLOCATE of it.

A Close or DEALLOCATE reaches the server at once when the client's backend holds the statement and no other
client of the pool names it (the client gets the server's own answer); else O7s answers it, and the
statement is closed on every backend that holds it the next time that backend is attached, once no client
names it any more.

After an error the server skips the rest of the batch up to its Sync: a name whose Parse failed or was
skipped is left undefined, and one whose Close was skipped stays defined, as PostgreSQL leaves them.
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING

from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError
from o7s_cluster.proxy import owed
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.owed import Kind, Pending
from o7s_cluster.proxy.readback import prepared_may_change_state
from o7s_cluster.proxy.statements import (
    MAX_PREPARED_PER_BACKEND,
    MAX_PREPARED_PER_CLIENT,
    ClientStatements,
    PoolStatements,
    Statement,
    statement_key,
)

if TYPE_CHECKING:
    from o7s_cluster.proxy.relay import Counters

MAX_NAMED_PARSE = 1 << 20        # transaction mode keeps a named statement's text to prepare it anywhere
SYNTAX_ERROR = "42601"           # a text the server can never prepare, on any backend
_CLOSE = ord("C")
_STATEMENT = ord("S")
_DEALLOCATE_START = re.compile(rb"\s*deallocate\b", re.IGNORECASE)
DEALLOCATE_FIRST = frozenset(b"dD \t\n\r\f\v")  # the bytes `_DEALLOCATE_START` can start at: most Queries stop here
_DEALLOCATE = re.compile(rb"\s*deallocate\s+(?:prepare\s+)?(\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s*;?\s*\Z",
                         re.IGNORECASE)


class NamedStatements:
    """The session core's handling of named statements (its state is the core's, set up there)."""

    statements: ClientStatements
    pool_statements: PoolStatements
    backend: BackendState | None
    to_backend: bytearray
    owed: deque[Pending]
    unsynced: bool
    skip_until_sync: bool
    _sync_to_backend: bool
    _cbuf: bytearray
    _lazy_sync: bool
    _held: int
    counters: Counters
    tx_status: bytes

    if TYPE_CHECKING:  # the core's own
        def _note_state(self, sql: bytes | bytearray) -> None: ...

        def _fake(self, data: bytes, *, ready: bool = False) -> None: ...

        def _hold(self, data: bytes, parse: Statement | None = None, dropped: Statement | None = None) -> None: ...

    def _close_dropped(self, backend: BackendState) -> None:
        """Close on a backend just attached the statements it holds that no client names any more."""
        pool = self.pool_statements
        if backend.drops_seen == pool.log_end:
            return
        stale = pool.stale_on(backend.prepared, backend.drops_seen)
        backend.drops_seen = pool.log_end
        for key in stale:
            backend.prepared.forget(key)
            self.to_backend += m.close_statement(key)
            self.owed.append(owed.HIDDEN_CLOSE)
        if stale:
            self.to_backend += m.sync()
            self.owed.append(owed.HIDDEN_SYNC)

    def _held_to_server(self, backend: BackendState, p: Pending) -> None:
        """An answer O7s held from before the batch had a backend: a ParseComplete it made is replaced by
        the server's own (the Parse goes to the server in its place, a syntax error included)."""
        statement = p.parse
        if statement is not None and statement.key not in backend.prepared:
            self._held -= 1
            self._make_room(backend)
            self.to_backend += m.parse(statement.key, statement.parse_rest)
            self.owed.append(Pending(Kind.PARSE, statement=statement.key, parse=statement))
            backend.prepared.add(statement.key)
        else:
            self.owed.append(p)

    def _refused_as_duplicate(self, name: bytes) -> bool:
        """A Parse of a name the client already uses is refused as PostgreSQL refuses it (42P05), and the
        rest of its batch is skipped (O7s owns the names in transaction mode: the server never sees it).
        Not inside a transaction block, where PostgreSQL's error would also abort the server's transaction,
        which an answer of O7s's cannot do: there the new text replaces the old (a known difference)."""
        if self.tx_status != b"I" or self.statements.get(name) is None:
            return False
        self.counters.errors += 1
        self._fake(ClientError(codes.DUPLICATE_PREPARED_STATEMENT,
                               f'prepared statement "{name.decode("utf-8", "replace")}" already exists',
                               fatal=False).to_bytes())
        self.skip_until_sync = True
        self._sync_to_backend = self.backend is not None and self.unsynced
        return True

    def _parse_named(self, backend: BackendState, name: bytes, rest: bytes) -> None:
        if self._refused_as_duplicate(name):
            return
        if self.statements.full(name):
            raise ClientError(codes.PROGRAM_LIMIT_EXCEEDED,
                              f"too many prepared statements (limit {MAX_PREPARED_PER_CLIENT} per connection)")
        statement = Statement(statement_key(rest), rest, prepared_may_change_state(rest), name)
        if statement.stateful:
            self._note_state(rest)
        self.statements.define(name, statement)
        key = statement.key
        prepared = backend.prepared
        if key in prepared:
            prepared.touch(key)
            self._hold(m.parse_complete(), statement)
            return
        self._make_room(backend)
        self.to_backend += m.parse(key, rest)
        self.owed.append(Pending(Kind.PARSE, statement=key, parse=statement))
        prepared.add(key)

    def _prepare_on(self, backend: BackendState, statement: Statement) -> bytes:
        """Server-side name of a client's statement, injecting its Parse if this backend lacks it."""
        key = statement.key
        prepared = backend.prepared
        if key in prepared:
            prepared.touch(key)
            return key
        self._make_room(backend)
        self.to_backend += m.parse(key, statement.parse_rest)
        self.owed.append(Pending(Kind.PARSE, hidden=True, statement=key, parse=statement))
        prepared.add(key)
        return key

    def _make_room(self, backend: BackendState) -> None:
        if len(backend.prepared) >= MAX_PREPARED_PER_BACKEND:
            self.to_backend += m.close_statement(backend.prepared.oldest())
            self.owed.append(owed.HIDDEN_CLOSE)

    def _parse_locally(self, s: int, e: int) -> bool:
        if s + 5 < e and not self._cbuf[s + 5]:
            return False  # the unnamed statement is the server's business (an empty Parse is refused below)
        name, rest = m.split_parse(bytes(self._cbuf[s + 5:e]))
        if self._refused_as_duplicate(name):
            return True
        if len(rest) > MAX_NAMED_PARSE:
            raise ClientError(codes.PROGRAM_LIMIT_EXCEEDED,
                              f"prepared statement text too long (limit {MAX_NAMED_PARSE} bytes)")
        if self.statements.full(name):
            return False  # _parse_named refuses it with the limit's error
        statement = Statement(statement_key(rest), rest, prepared_may_change_state(rest), name)
        if statement.stateful:
            self._note_state(rest)
        self.statements.define(name, statement)
        self._lazy_sync = True
        self._hold(m.parse_complete(), statement)
        return True

    def _drop_on_server(self, statement: Statement) -> bytes | None:
        """The server-side name to close now on the client's backend, if it holds the statement and no
        other client of the pool names it (the client's own drop has been counted already)."""
        backend = self.backend
        key = statement.key
        if backend is None or key not in backend.prepared or key in self.pool_statements.refs:
            return None
        backend.prepared.forget(key)
        return key

    def _answer_locally(self, t: int, s: int, e: int, now: float) -> bool:
        """Close or DEALLOCATE of a protocol-level statement: O7s owns those names, so it answers, or sends
        it on under the server's name (True either way: the message is handled)."""
        buf = self._cbuf
        if t == _CLOSE:
            kind, name = m.split_describe_close(bytes(buf[s + 5:e]))
            statement = self.statements.get(name) if kind == _STATEMENT else None
            if statement is None:
                return False
            self.statements.drop(name)
            key = self._drop_on_server(statement)
            if key is not None:
                self.unsynced = True
                self.to_backend += m.close_statement(key)
                self.owed.append(Pending(Kind.CLOSE, dropped=statement))
                return True
            if self.backend is None:
                self._lazy_sync = True  # its Sync needs no backend either
            else:
                self.unsynced = True
            self._hold(m.close_complete(), dropped=statement)
            return True
        if s + 5 >= e or buf[s + 5] not in DEALLOCATE_FIRST or not _DEALLOCATE_START.match(buf, s + 5, e):
            return False
        match = _DEALLOCATE.match(buf, s + 5, e - 1)
        if not match:
            return False
        word = match.group(1)
        if word.lower() == b"all":
            self.statements.drop_all()
            return False  # the server drops its statements too; the relay sees the tag and forgets them
        name = bytes(word[1:-1].replace(b'""', b'"') if word.startswith(b'"') else word.lower())
        statement = self.statements.get(name)
        if statement is None:
            return False  # maybe an SQL-level PREPARE: the server knows it
        self.statements.drop(name)
        key = self._drop_on_server(statement)
        if key is not None:
            self.to_backend += m.query(f'DEALLOCATE "{key.decode()}"')
            self.owed.append(Pending(Kind.QUERY, now))
            return True
        self._fake(m.command_complete("DEALLOCATE"), ready=True)
        return True

    def _skip_batch(self, error: bytes) -> None:
        """The server answered the message at the front with an error (`error`: its payload) and skips the
        rest of the batch up to its Sync: so do the answers owed, and what those messages did to the
        client's names is undone. A Sync not sent yet: the client's messages up to it are skipped here."""
        owed_ = self.owed
        backend = self.backend
        statements = self.statements
        failed = True  # the front: the message the server refused; the rest it skips
        while owed_ and owed_[0].kind is not Kind.SYNC:
            p = owed_.popleft()
            if p.kind is Kind.FAKE and not p.due:
                self._held -= 1
            if p.kind is Kind.PARSE and p.statement and backend is not None:
                backend.prepared.forget(p.statement)
            statement = p.parse
            if statement is not None:
                # O7s's own Parse of the client's statement (where it is first used) defines no name; if
                # its text is not even valid, the statement is gone as it would have been directly.
                if not p.hidden or (failed and m.parse_error_fields(error).get("C") == SYNTAX_ERROR):
                    statements.undefine(statement)
            elif p.dropped is not None:
                statements.restore(p.dropped)
                if p.kind is Kind.CLOSE and backend is not None:
                    backend.prepared.add(p.dropped.key)  # the server did not close it
            failed = False
        if not owed_ and self.unsynced:
            self.skip_until_sync = True
            self._sync_to_backend = True
