"""Backend connection pools, one per (org, database): bounded, LIFO, with idle reaping."""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import outcome
import trio

from o7s_cluster.control_plane.dsn import BackendTarget
from o7s_cluster.net import backend
from o7s_cluster.net.backend import BackendConn, BackendError
from o7s_cluster.net.poller import Poller
from o7s_cluster.pgwire.errors import POOL_TIMEOUT
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.statements import PoolStatements

if TYPE_CHECKING:
    from o7s_cluster.net.listener import Listener

log = logging.getLogger("o7s.pool")


@dataclass
class PoolSettings:
    connect_timeout: float = 5.0
    acquire_timeout: float = 5.0
    idle_timeout: float = 300.0


class PoolTimeout(BackendError):
    def __init__(self, db_name: str, waited: float, size: int) -> None:
        super().__init__(
            f"no connection to database \"{db_name}\" became free within {waited:g} s (pool size {size})",
            POOL_TIMEOUT,
        )


class Grantee(Protocol):
    """A waiter called back in the giver's task rather than woken (a session, see `Pool.enqueue`)."""

    def granted(self, conn: BackendConn | None) -> None:
        """A connection, or None: a free slot to open one in (already counted as the grantee's)."""

    def wait_failed(self, error: BackendError) -> None:
        """The wait ran out of time."""


class WaitCancelled(Exception):
    """`Pool.cancel_wait` ended a wait for a connection (its client cancelled the query)."""


class Pool:
    """At most `size` server connections; a waiter gets one in FIFO order or a clear error in time.

    A connection given back goes straight to the oldest waiter (no semaphore, no liveness check: it
    was just in use); with nobody waiting it joins a LIFO stack of idle ones, so the busiest stay warm
    and the rest age out. Each connection's pump task runs in `nursery`, and so does one watchdog that
    ends the waits that ran out of time: waiters queue in FIFO order with the same timeout, so it only
    ever sleeps until the oldest one's deadline, and a wait costs no cancel scope of its own.
    """

    def __init__(self, db_name: str, target: BackendTarget, size: int, settings: PoolSettings,
                 startup_params: dict[str, str] | None = None, org_name: str = "", db_type: str = "postgres",
                 *, nursery: trio.Nursery, poller: Poller | None = None) -> None:
        self.org_name = org_name
        self.poller = poller  # reads this pool's plain connections (net.poller); None: each pump reads its own
        self.db_type = db_type
        self.db_name = db_name
        self.target = target
        self.size = size
        self.settings = settings
        self.startup_params = startup_params or {}
        self._nursery = nursery
        self._idle: deque[BackendConn] = deque()
        # (task or grantee, deadline, timeout), oldest first
        self._waiters: deque[tuple[trio.lowlevel.Task | Grantee, float, float]] = deque()
        self._mixed = False  # waiters with different timeouts (a reload changed it) are queued
        self._nap: trio.CancelScope | None = None  # the watchdog's sleep until the next deadline
        self._watchdog: trio.CancelScope | None = None
        self._watchdog_lot = trio.lowlevel.ParkingLot()  # the watchdog parks here while nobody waits
        self._waited = False  # someone queued since the watchdog last looked
        self.in_use = 0  # given out, parked or being opened
        self._dead: list[BackendConn] = []  # closed by the reaper
        self.opened_total = 0
        # What a fresh server connection reports at start-up (server_version, encodings...): enough to
        # log a client in without taking a backend.
        self.server_params: dict[str, str] | None = None
        self.statements = PoolStatements()  # which server-side statements this pool's clients name
        # The pool's connections by server process id: whose backend sent a notification.
        self.by_pid: weakref.WeakValueDictionary[int, BackendState] = weakref.WeakValueDictionary()
        self.listener: Listener | None = None  # LISTEN/NOTIFY in transaction mode (net.listener), made on demand

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a task of the pool's (its listener connection) in the pool's nursery."""
        self._nursery.start_soon(fn, *args)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def would_wait(self) -> bool:
        return not self._idle and self.in_use >= self.size

    def try_acquire(self) -> BackendConn | None:
        """An idle connection now, without yielding, or None (then `acquire` waits or opens one)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.looks_alive():
                self.in_use += 1
                return conn
            self._dead.append(conn)  # closed by the reaper, off the hot path
        return None

    async def acquire(self) -> BackendConn:
        start = time.monotonic()
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.in_use >= self.size or self._waiters:
            conn = await self._wait()  # raises PoolTimeout when the watchdog ends the wait
            if conn is not None:
                return conn
            # A slot came free (a connection was closed): open one in it.
        else:
            self.in_use += 1
        return await self._open(start)

    def enqueue(self, grantee: Grantee) -> bool:
        """Queue `grantee` for a hand-off when no connection can be had now (else False: `acquire`
        opens one). Its `granted` is called by whoever gives a connection back, in that task: the
        waiting session needs no task of its own woken to go on."""
        if self.in_use < self.size and not self._waiters:
            return False
        self._queue(grantee)
        return True

    def _queue(self, waiter: trio.lowlevel.Task | Grantee) -> tuple[trio.lowlevel.Task | Grantee, float, float]:
        timeout = self.settings.acquire_timeout  # read per wait: a reload (SIGHUP) may change it
        waiters = self._waiters
        if waiters and waiters[-1][2] != timeout:
            self._mixed = True  # deadlines are no longer in queue order
        entry = (waiter, trio.current_time() + timeout, timeout)
        waiters.append(entry)
        self._waited = True
        if self._watchdog is None:
            self._watchdog = trio.CancelScope()
            self._nursery.start_soon(self._watch_waiters, self._watchdog)
        elif self._watchdog_lot:
            self._watchdog_lot.unpark_all()
        elif self._nap is not None and entry[1] < self._nap.deadline:
            self._nap.cancel()  # this wait ends before the one the watchdog sleeps for
        return entry

    async def _wait(self) -> BackendConn | None:
        """Queue for a hand-off: a connection, or None for a free slot (counted as ours already)."""
        waiters = self._waiters
        entry = self._queue(trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            waiters.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def cancel_wait(self, waiter: trio.lowlevel.Task | Grantee) -> bool:
        """Take `waiter` out of the queue (a task's wait ends with WaitCancelled); False when it is not
        queued (it has a connection, or is opening one). Cheaper than a cancel scope around every wait."""
        for entry in self._waiters:
            if entry[0] is waiter:
                self._waiters.remove(entry)
                if type(waiter) is trio.lowlevel.Task:
                    trio.lowlevel.reschedule(waiter, outcome.Error(WaitCancelled()))
                return True
        return False

    def _time_out(self, entry: tuple[trio.lowlevel.Task | Grantee, float, float]) -> None:
        error = PoolTimeout(self.db_name, entry[2], self.size)
        waiter = entry[0]
        if type(waiter) is trio.lowlevel.Task:
            trio.lowlevel.reschedule(waiter, outcome.Error(error))
        else:
            waiter.wait_failed(error)

    @staticmethod
    def _hand(waiter: trio.lowlevel.Task | Grantee, conn: BackendConn | None) -> None:
        if type(waiter) is trio.lowlevel.Task:
            trio.lowlevel.reschedule(waiter, outcome.Value(conn))
        else:
            waiter.granted(conn)

    async def _watch_waiters(self, scope: trio.CancelScope) -> None:
        """End every wait at its deadline with PoolTimeout. Waiters share one timeout, so the oldest
        one's deadline comes first; only after a reload changed the timeout are all of them looked at."""
        with scope:
            while True:
                waiters = self._waiters
                if not waiters:
                    self._mixed = False
                    if not self._waited:  # nobody for a whole timeout: sleep until someone queues
                        await self._watchdog_lot.park()
                    self._waited = False
                    await self._sleep_until(trio.current_time() + self.settings.acquire_timeout)
                    continue
                now = trio.current_time()
                if self._mixed:
                    for entry in [e for e in waiters if e[1] <= now]:
                        waiters.remove(entry)
                        self._time_out(entry)
                    if waiters:
                        await self._sleep_until(min(e[1] for e in waiters))
                    continue
                while waiters and waiters[0][1] <= now:
                    self._time_out(waiters.popleft())
                if waiters:
                    await self._sleep_until(waiters[0][1])

    async def _sleep_until(self, deadline: float) -> None:
        """The watchdog's sleep, cut short by a wait that must end sooner."""
        with trio.CancelScope(deadline=deadline) as self._nap:
            await trio.sleep_forever()
        self._nap = None

    async def open_granted_slot(self) -> BackendConn:
        """Open a connection in the slot a grantee was granted (`granted(None)`)."""
        return await self._open(time.monotonic())

    async def _open(self, start: float) -> BackendConn:
        """Open a connection in a slot already counted in `in_use`; the slot is given on if that fails."""
        try:
            remaining = max(0.5, self.settings.connect_timeout - (time.monotonic() - start))
            conn = await backend.connect(self.target, timeout=remaining, extra_params=self.startup_params)
        except BaseException:
            self._free_slot()
            raise
        conn.poller = self.poller
        self._nursery.start_soon(conn.pump)
        self.by_pid[conn.pid] = conn.state
        if self.server_params is None:
            self.server_params = dict(conn.initial_params)
        self.opened_total += 1
        return conn

    def _free_slot(self) -> None:
        if self._waiters:
            self._hand(self._waiters.popleft()[0], None)
        else:
            self.in_use -= 1

    def release(self, conn: BackendConn) -> None:
        """Give back a clean, idle connection (the caller has made sure it is).

        While a cancel aimed at its last client's query may still land, nobody else gets it: it is
        parked until `cancel_landed`.
        """
        conn.sink = None
        if conn.cancels:
            conn.parked = True
            return
        if conn.dead:
            self._dead.append(conn)
            self._free_slot()
            return
        if self._waiters:
            self._hand(self._waiters.popleft()[0], conn)
            return
        self.in_use -= 1
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    def cancel_landed(self, conn: BackendConn) -> None:
        conn.cancels -= 1
        if conn.cancels == 0 and conn.parked:
            conn.parked = False
            self.release(conn)

    async def discard(self, conn: BackendConn) -> None:
        """Close a connection that must not be reused (dirty, broken, or mid-query)."""
        conn.sink = None
        conn.dead = True
        self._free_slot()
        await conn.aclose()

    async def reap(self) -> None:
        dead, self._dead = self._dead, []
        for conn in dead:
            await conn.aclose()
        now = time.monotonic()
        keep: deque[BackendConn] = deque()
        stale: list[BackendConn] = []
        for conn in self._idle:
            (stale if now - conn.last_used > self.settings.idle_timeout or not conn.looks_alive() else keep).append(conn)
        self._idle = keep
        for conn in stale:
            await conn.aclose()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.listener is not None:
            self.listener.close()
        idle, self._idle = list(self._idle), deque()
        for conn in idle:
            await conn.aclose()

    @property
    def idle(self) -> int:
        return len(self._idle)


class PoolManager:
    """All pools of a worker, keyed by (org id, database name)."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.pools: dict[tuple[str, str], Pool] = {}

    def get(self, key: tuple[str, str]) -> Pool | None:
        return self.pools.get(key)

    def add(self, key: tuple[str, str], pool: Pool) -> Pool:
        return self.pools.setdefault(key, pool)

    async def run_reaper(self, interval: float = 5.0) -> None:
        while True:
            await trio.sleep(interval)
            for pool in list(self.pools.values()):
                await pool.reap()

    async def close(self) -> None:
        for pool in list(self.pools.values()):
            await pool.close()
