"""The login circuit breaker's state machine: too many failed logins for an org from one address, then a block.

Sans-IO: no clock reads, no I/O; every call is handed `now` (seconds, any monotonic origin). The trio side
(`limits/logins.py`) owns the clock, the optional Redis sharing, logging and metrics.

Per key (org as the client named it, source address):

    open ──(failures_max failures within `window` s)──► blocked for `block` s ──(time passes)──► open, count 0

- While a key is blocked every login for it is refused at once, before any SCRAM work; failures are not
  counted then (there are none: nothing is tried).
- A successful login changes nothing: it neither lifts an active block nor forgets earlier failures (a guessed
  password must not buy more guesses).
- The org name is never looked up here: an org that does not exist is counted and blocked exactly like one
  that does, so the breaker is no oracle for which orgs exist.
- The table is bounded (`max_keys`): the least recently touched key is forgotten first, so a client spraying
  names or addresses costs a bounded amount of memory. Blocked keys are kept in preference to open ones.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

__all__ = ["BreakerPolicy", "LoginBreaker", "Trip"]

MAX_KEY_ORG = 64  # characters of the org name kept in a key: longer names cannot be real orgs anyway
DEFAULT_MAX_KEYS = 50_000
_EVICT_LOOK = 8  # keys looked at to find an unblocked one to forget when the table is full


@dataclass(frozen=True)
class BreakerPolicy:
    failures_max: int = 10  # failures within `window` that trip the breaker; 0 disables it
    window: float = 150.0  # seconds
    block: float = 120.0  # seconds a tripped key stays blocked

    @property
    def enabled(self) -> bool:
        return self.failures_max > 0


@dataclass(frozen=True)
class Trip:
    """A block that has just started: for the log line and the metrics."""

    org: str
    address: str
    failures: int
    until: float


class _Entry:
    __slots__ = ("failures", "blocked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.blocked_until = 0.0


def key(org: str, address: str) -> tuple[str, str]:
    """The breaker's key for a login: the org as the client spelled it (capped) and its source address."""
    return org[:MAX_KEY_ORG], address


class LoginBreaker:
    """Failed-login counts and blocks per (org, address), on a clock the caller hands in."""

    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.policy = policy
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def blocked_for(self, org: str, address: str, now: float) -> float:
        """Seconds left of the block on this org and address (0.0: a login may go ahead)."""
        entry = self._entries.get(key(org, address))
        if entry is None or entry.blocked_until <= now:
            return 0.0
        return entry.blocked_until - now

    def failure(self, org: str, address: str, now: float) -> Trip | None:
        """Count a failed login; the Trip when this one starts a block."""
        policy = self.policy
        if not policy.enabled:
            return None
        k = key(org, address)
        entry = self._touch(k, now)
        if entry.blocked_until > now:
            return None  # refused logins are not failures: nothing was tried
        fails = entry.failures
        fails.append(now)
        horizon = now - policy.window
        while fails and fails[0] <= horizon:
            fails.popleft()
        if len(fails) < policy.failures_max:
            return None
        count = len(fails)
        fails.clear()  # after the block the count starts again
        entry.blocked_until = now + policy.block
        return Trip(k[0], k[1], count, entry.blocked_until)

    def impose(self, org: str, address: str, until: float, now: float) -> None:
        """A block decided elsewhere (another worker or machine, through Redis): honour it here too."""
        if until <= now:
            return
        entry = self._touch(key(org, address), now)
        if until > entry.blocked_until:
            entry.blocked_until = until
            entry.failures.clear()

    def _touch(self, k: tuple[str, str], now: float) -> _Entry:
        entry = self._entries.get(k)
        if entry is not None:
            self._entries.move_to_end(k)
            return entry
        if len(self._entries) >= self.max_keys:
            self._evict(now)
        entry = self._entries[k] = _Entry()
        return entry

    def _evict(self, now: float) -> None:
        """Make room for one key: the least recently touched one that is not blocked, looking at a few at
        most (constant work per login however large the table), else the least recently touched of all."""
        entries = self._entries
        for _ in range(_EVICT_LOOK):
            k, entry = next(iter(entries.items()))
            if entry.blocked_until <= now:
                del entries[k]
                return
            entries.move_to_end(k)  # an active block: keep it, look at the next oldest
        entries.popitem(last=False)
