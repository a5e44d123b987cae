"""Helpers for the regression tests of issues 11 and 14 (test_regress_*.py): a tier whose pool holds one
backend, so that two clients of an org are sure to share a backend, and bounded waits for client threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

# A tier of our own: a pool of ONE backend per (org, database), generous rates so no query is throttled.
# Columns of platform.tier_limits, in order (migrations/001_platform.sql).
POOL_OF_ONE = ("regress-pool1", 91, 20, 100000, 1, 1, 5000, 60000, "4MB", True, 0, 0, 0, 0, 0)
POOL_OF_ONE_TIER = POOL_OF_ONE[0]


@pytest.fixture(scope="module")
def pool_of_one_tier(migrated) -> Iterator[str]:
    """Create the pool-of-one tier on the control plane; afterwards move its orgs to `free` and drop it
    (other tests list exactly the seed's four tiers)."""
    dsn = migrated["O7S_PLATFORM_DSN"]
    cols = ", ".join(["%s"] * len(POOL_OF_ONE))
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"INSERT INTO platform.tier_limits VALUES ({cols}) ON CONFLICT DO NOTHING", POOL_OF_ONE)
    yield POOL_OF_ONE_TIER
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("UPDATE platform.organizations SET tier = 'free' WHERE tier = %s", (POOL_OF_ONE_TIER,))
        conn.execute("DELETE FROM platform.tier_limits WHERE tier = %s", (POOL_OF_ONE_TIER,))


class Background:
    """Run `fn` in a daemon thread; `.result(timeout)` re-raises its exception, or raises TimeoutError
    if it has not finished (the thread is a daemon: a wedged client cannot keep the suite alive)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the test's thread by result()
            self._exc = exc

    def done(self, timeout: float = 0.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float) -> Any:
        if not self.done(timeout):
            raise TimeoutError(f"client thread still running after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._value
