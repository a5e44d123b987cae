"""Memory budgets of one worker for what clients make it hold: before login, and after.

A client is allowed a small buffer of its own for free; past that, what it holds counts against a
budget shared by every client of the worker, and a client that would overrun it gets a clear error
rather than the worker growing without bound.
"""

from __future__ import annotations

from typing import Any

from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire.errors import ClientError

FREE_PER_CLIENT = 64 * 1024  # a logged-in client's partial message up to this size costs the budget nothing


class PreAuthBudget:
    """Bytes held for clients that have not logged in yet, over all of them."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise ClientError(codes.TOO_MANY_CONNECTIONS,
                              "too many connections are logging in to this O7s worker at once; try again shortly",
                              hint=f"O7s holds at most {self.limit} bytes for clients that have not logged in "
                                   "(--preauth-budget).")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


class InputBudget:
    """Bytes of partial client messages held past each client's free allowance, over all clients."""

    __slots__ = ("limit", "held", "_by_client")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._by_client: dict[Any, int] = {}

    def check(self, client: Any, buffered: int) -> None:
        """`client` now holds `buffered` bytes of a partial message; raises when that would overrun."""
        charge = buffered - FREE_PER_CLIENT if buffered > FREE_PER_CLIENT else 0
        before = self._by_client.get(client, 0)
        if charge == before:
            return
        if charge > before and self.held + charge - before > self.limit:
            self.forget(client)
            raise ClientError(codes.OUT_OF_MEMORY,
                              f"O7s worker's budget for client input is exhausted (limit {self.limit} bytes)",
                              hint="Send smaller messages, or try again when the worker is less busy "
                                   "(--input-budget).")
        self.held += charge - before
        if charge:
            self._by_client[client] = charge
        else:
            del self._by_client[client]

    def forget(self, client: Any) -> None:
        self.held -= self._by_client.pop(client, 0)
