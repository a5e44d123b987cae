"""What the data plane and the admin port audit: counted in memory, closed into records with the usage window.

The hot path only bumps a counter in a dict keyed by (kind, org, org id, actor, source, method, detail):
a login is one dict update, never a write. `UsageRecorder` takes the table at each window close and makes one
`AuditRecord` per key with its count, so a thousand logins of one client in a window are one row with
count 1000, and a storm of refused connections is one row per org. The table is bounded (`max_keys`): past
it, events are summed under org "*" (what was not kept is still counted).

Connection refusals are counted here per org; query (rate) refusals come from the usage counters, which
already count them per org, when the window is closed (`rate_refused` rows, with the throttled count).
"""

from __future__ import annotations

from typing import Any

MAX_KEYS = 1000  # distinct audit keys kept per window per worker; the rest are summed under org "*"
MAX_TEXT = 128  # characters kept of a client-given name (user, org, path)

LOGIN_OK = "login_ok"
LOGIN_FAILED = "login_failed"
CONNECTION_REFUSED = "connection_refused"
RATE_REFUSED = "rate_refused"
BREAKER_TRIP = "breaker_trip"
ADMIN_CALL = "admin_call"

_Key = tuple[str, str | None, str | None, str | None, str | None, str | None, tuple[tuple[str, Any], ...]]


def clean(text: str | None) -> str | None:
    """A client-given string as stored: capped, no NUL (PostgreSQL text cannot hold one)."""
    if text is None:
        return None
    return text[:MAX_TEXT].replace("\0", "")


class AuditBuffer:
    """One window's audit events of one process, aggregated by key (see the module docstring)."""

    __slots__ = ("events", "max_keys", "overflowed")

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.events: dict[_Key, int] = {}
        self.max_keys = max_keys
        self.overflowed = 0  # events summed under "*" since start (for the log and tests)

    def add(self, kind: str, org: str | None, *, org_id: str | None = None, actor: str | None = None,
            source: str | None = None, method: str | None = None, detail: dict[str, Any] | None = None,
            n: int = 1) -> None:
        key: _Key = (kind, clean(org), org_id, clean(actor), clean(source), method,
                     tuple(sorted(detail.items())) if detail else ())
        events = self.events
        if key not in events and len(events) >= self.max_keys:
            self.overflowed += n
            key = (kind, "*", None, None, None, method, ())
        events[key] = events.get(key, 0) + n

    def login(self, ok: bool, org: str, user: str, source: str, method: str, org_id: str | None = None) -> None:
        self.add(LOGIN_OK if ok else LOGIN_FAILED, org, org_id=org_id, actor=user, source=source, method=method)

    def connection_refused(self, org: str, org_id: str, tier: str | None) -> None:
        self.add(CONNECTION_REFUSED, org, org_id=org_id, detail={"tier": tier} if tier else None)

    def take(self) -> dict[_Key, int]:
        events, self.events = self.events, {}
        return events

    def connection_refusals(self, events: dict[_Key, int]) -> dict[str, int]:
        """org id -> connections refused, from a taken table (for the upgrade advice)."""
        out: dict[str, int] = {}
        for key, n in events.items():
            if key[0] == CONNECTION_REFUSED and key[2] is not None:
                out[key[2]] = out.get(key[2], 0) + n
        return out
