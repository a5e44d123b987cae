"""The queue of responses still owed to the client: what PgBouncer calls outstanding requests.

Every message O7s sends a backend that the backend answers gets one entry, in order; so do answers
O7s makes itself (fake responses) that must reach the client between the backend's. Reading the
backend's messages against this queue tells, for each one, whether it is the client's (forward it),
O7s's own (swallow it), and when a query ended.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from o7s_cluster.proxy.statements import Statement


class Kind(IntEnum):
    PARSE = 1        # ParseComplete
    BIND = 2         # BindComplete
    DESCRIBE = 3     # [ParameterDescription] RowDescription | NoData
    EXECUTE = 4      # ... CommandComplete | EmptyQueryResponse | PortalSuspended
    CLOSE = 5        # CloseComplete
    SYNC = 6         # ReadyForQuery
    QUERY = 7        # a simple Query or FunctionCall: everything up to ReadyForQuery
    READBACK = 8     # O7s's own settings read-back: every message up to its ReadyForQuery is O7s's
    FAKE = 9         # bytes O7s answers itself, sent when they reach the front


class Pending:
    """One response owed. `hidden`: the backend's answer to a message O7s sent of its own accord."""

    __slots__ = ("kind", "hidden", "started", "statement", "reply", "ready", "due", "parse", "dropped")

    def __init__(self, kind: Kind, started: float = 0.0, *, hidden: bool = False, statement: bytes = b"",
                 reply: bytes = b"", ready: bool = False, due: bool = True, parse: Statement | None = None,
                 dropped: Statement | None = None) -> None:
        self.kind = kind
        self.hidden = hidden
        self.started = started      # when the client's message was forwarded (EXECUTE, SYNC, QUERY)
        self.statement = statement  # PARSE: the server-side statement, forgotten if the Parse fails
        self.reply = reply          # FAKE: what to send
        self.ready = ready          # FAKE: followed by ReadyForQuery with the session's status
        # FAKE: False while it is held as the server holds its answers to extended-protocol messages (until
        # the client's Flush or Sync, an error, or an answer after it).
        self.due = due
        # PARSE, or FAKE of a ParseComplete: the client's statement it defines, undefined again if the server
        # refuses or skips that Parse (a held answer is replaced by the server's own if the batch reaches a
        # backend first). CLOSE, or FAKE of a CloseComplete: the client's statement it drops, defined again
        # if the server skips the Close.
        self.parse = parse
        self.dropped = dropped

    def __repr__(self) -> str:
        return f"<Pending {self.kind.name}{' hidden' if self.hidden else ''}>"


# Entries that carry nothing of their own are shared.
BIND = Pending(Kind.BIND)
DESCRIBE = Pending(Kind.DESCRIBE)
CLOSE = Pending(Kind.CLOSE)
PARSE = Pending(Kind.PARSE)
HIDDEN_CLOSE = Pending(Kind.CLOSE, hidden=True)
SYNC = Pending(Kind.SYNC)
HIDDEN_SYNC = Pending(Kind.SYNC, hidden=True)
READBACK = Pending(Kind.READBACK, hidden=True)
