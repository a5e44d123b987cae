"""Named prepared statements in transaction mode: the client's names, the server's, and who holds what.

A client's statement is prepared on the server under a name derived from its text and parameter
types, so clients that prepare the same query share one server-side statement, and it is prepared
lazily on whichever backend serves the client next (as PgBouncer 1.21+ does).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict, deque

MAX_PREPARED_PER_BACKEND = 256   # server-side statements a backend keeps before O7s closes old ones
MAX_PREPARED_PER_CLIENT = 10000  # named statements one client may hold
MAX_DROPS_LOGGED = 4096          # dropped statements logged for the backends to close (then: full look)


def statement_key(parse_rest: bytes) -> bytes:
    """Server-side name of a statement: the same query text and types share one prepared statement."""
    return b"o7s_" + hashlib.blake2b(parse_rest, digest_size=12).hexdigest().encode()


class Statement:
    """One client-named statement: its server-side name, its Parse body, whether running it may change
    session state (then the session's state is read back after it), and the client's name for it (to
    leave that name as PostgreSQL does when the server refuses or skips the Parse or a Close of it)."""

    __slots__ = ("key", "parse_rest", "stateful", "name")

    def __init__(self, key: bytes, parse_rest: bytes, stateful: bool, name: bytes = b"") -> None:
        self.key = key
        self.parse_rest = parse_rest
        self.stateful = stateful
        self.name = name


class PoolStatements:
    """How many clients of one pool (on this worker) name each server-side statement, and a log of the
    statements no client names any more, in the order they were dropped.

    Each backend remembers how far into the log it has looked (`BackendState.drops_seen`); when it is next
    attached, the statements of the log since then that it holds and nobody names are closed on it. A
    backend that fell behind the part of the log still kept looks at every statement it holds instead, so
    a dropped statement never stays prepared for ever.
    """

    __slots__ = ("refs", "dropped", "dropped_base")

    def __init__(self) -> None:
        self.refs: dict[bytes, int] = {}
        self.dropped: deque[bytes] = deque()
        self.dropped_base = 0  # log position of dropped[0]

    @property
    def log_end(self) -> int:
        return self.dropped_base + len(self.dropped)

    def retain(self, key: bytes) -> None:
        self.refs[key] = self.refs.get(key, 0) + 1

    def release(self, key: bytes) -> None:
        n = self.refs.get(key, 0) - 1
        if n > 0:
            self.refs[key] = n
            return
        self.refs.pop(key, None)
        self.dropped.append(key)
        if len(self.dropped) > MAX_DROPS_LOGGED:
            self.dropped.popleft()
            self.dropped_base += 1

    def stale_on(self, held: ServerStatements, seen: int) -> list[bytes]:
        """What `held` (a backend's statements) holds that nobody names, dropped since log position `seen`."""
        refs = self.refs
        if seen < self.dropped_base:  # fell behind the log: everything it holds is looked at
            return [k for k in held.keys if k not in refs]
        stale: dict[bytes, None] = {}
        for key in itertools.islice(self.dropped, seen - self.dropped_base, None):
            if key in held and key not in refs:
                stale[key] = None
        return list(stale)


class ServerStatements:
    """The server-side statements one backend connection holds, least recently used first."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def touch(self, key: bytes) -> None:
        self.keys.move_to_end(key)

    def add(self, key: bytes) -> None:
        self.keys[key] = None

    def forget(self, key: bytes) -> None:
        self.keys.pop(key, None)

    def oldest(self) -> bytes:
        key, _ = self.keys.popitem(last=False)
        return key

    def clear(self) -> None:
        self.keys.clear()


class ClientStatements:
    """A client's named statements (transaction mode), each retained in its pool's counts."""

    __slots__ = ("by_name", "pool")

    def __init__(self, pool: PoolStatements) -> None:
        self.by_name: dict[bytes, Statement] = {}
        self.pool = pool

    def get(self, name: bytes) -> Statement | None:
        return self.by_name.get(name)

    def full(self, name: bytes) -> bool:
        return name not in self.by_name and len(self.by_name) >= MAX_PREPARED_PER_CLIENT

    def define(self, name: bytes, statement: Statement) -> None:
        old = self.by_name.get(name)
        if old is not None:
            self.pool.release(old.key)
        self.by_name[name] = statement
        self.pool.retain(statement.key)

    def drop(self, name: bytes) -> bool:
        statement = self.by_name.pop(name, None)
        if statement is None:
            return False
        self.pool.release(statement.key)
        return True

    def undefine(self, statement: Statement) -> None:
        """The server refused or skipped the Parse that defined it: PostgreSQL leaves the name undefined
        (unless the client has named another statement so since)."""
        if self.by_name.get(statement.name) is statement:
            self.drop(statement.name)

    def restore(self, statement: Statement) -> None:
        """The server skipped the Close that dropped it: PostgreSQL still has it (unless the client has
        used the name again since)."""
        if statement.name not in self.by_name:
            self.define(statement.name, statement)

    def drop_all(self) -> None:
        for statement in self.by_name.values():
            self.pool.release(statement.key)
        self.by_name.clear()
