"""How a session gets a backend for the message at the front: an idle one now, one opened for it, or
a place in the pool's queue, from which it goes on in the task that gives one back (`Pool.enqueue`).

Handing the connection to a waiting task would wake it: one more trip through trio's scheduler per
transaction when every backend is busy, which a plain relay never makes. So the pool calls the queued
session's `granted` in the giver's task (a backend's pump, having just relayed its last answer): the
core takes the backend and what it queued goes out at once, while the session's own task stays parked
on its client socket. Whatever must wait (settings to apply first, a connection to open, a full socket,
a rate-limit token, the goodbye) goes on in a helper task in the session's nursery; the session's task
lets that helper finish before it hands the core anything more.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import trio

from o7s_cluster.net.backend import BackendConn, BackendError
from o7s_cluster.net.channel import AnyChannel, Outbox, send_now
from o7s_cluster.net.pool import WaitCancelled
from o7s_cluster.pgwire.errors import ClientError
from o7s_cluster.proxy.params import SYNCED_REPORTED, sync_sql
from o7s_cluster.proxy.session import PROCEED, SessionCore

if TYPE_CHECKING:
    from o7s_cluster.net.pool import Pool
    from o7s_cluster.usage.counters import OrgCounters
    from o7s_cluster.config import Settings
    from o7s_cluster.worker.server import Server


class Attaching:
    """The backend-attaching half of `net.session.ClientSession` (whose state it reads, as set up there)."""

    server: Server
    settings: Settings
    core: SessionCore | None
    conn: BackendConn | None
    pool: Pool | None
    counters: OrgCounters
    channel: AnyChannel
    db_name: str
    _to_client: Outbox
    _to_backend: Outbox
    _pool_wait: trio.lowlevel.Task | None
    _pool_wait_cancelled: bool
    _queued: bool
    _queued_at: float
    _helpers: trio.Nursery | None
    _helping: trio.Event | None
    _cancel_on_send: bool
    _serve_scope: trio.CancelScope

    if TYPE_CHECKING:  # ClientSession's
        def _attach_conn(self, conn: BackendConn) -> None: ...
        async def _flush_client(self) -> None: ...
        async def _drive(self, action: int) -> bool: ...
        def _fail(self, exc: BaseException) -> None: ...

    async def _attach(self) -> bool:
        """A backend for the message at the front, with the client's settings; or the error instead.
        False when the session is queued for one instead (`granted` goes on)."""
        core = self.core
        pool = self.pool
        assert core is not None and pool is not None
        if self._queued:
            return False
        if core.to_client:
            await self._flush_client()
        conn = pool.try_acquire()
        if conn is None:
            if pool.would_wait():
                self.counters.pool_waits += 1
            if pool.enqueue(self):
                self._queued = True
                self._queued_at = time.perf_counter()
                return False
            started = time.perf_counter()
            # A cancel ends this wait through the pool (`cancel`): no cancel scope per wait.
            self._pool_wait = trio.lowlevel.current_task()
            self._pool_wait_cancelled = False
            try:
                conn = await pool.acquire()
            except WaitCancelled:
                conn = None
            except BackendError as exc:
                core.attach_failed(ClientError(exc.sqlstate, f"could not connect to database \"{self.db_name}\": "
                                               f"{exc.reason}", fatal=False))
                return True
            finally:
                self._pool_wait = None
                self.counters.pool_wait_seconds += time.perf_counter() - started
            if conn is None or self._pool_wait_cancelled:  # the client cancelled its query while it waited
                if conn is not None:  # handed over or opened as the cancel came: unused, clean and idle
                    pool.release(conn)
                core.wait_cancelled()
                return True
        await self._settle(conn, sync_sql(core.client_params, conn.state.settings))
        return True

    async def _settle(self, conn: BackendConn, sql: str) -> None:
        """Give `conn` the client's settings (`sql`) and attach it; or the error instead."""
        core = self.core
        pool = self.pool
        assert core is not None and pool is not None
        if sql:
            try:
                await conn.query_until_ready(sql, timeout=self.settings.server_connect_timeout)
            except BackendError as exc:
                conn.state.settings.applied.clear()
                await pool.discard(conn)
                # Most likely a start-up setting of the client's that the server refuses: drop the client's
                # settings so that the session stays usable, and say so.
                known = pool.server_params or {}
                core.client_params.clear()
                core.client_params.update((k, v) for k, v in known.items() if k in SYNCED_REPORTED)
                core.attach_failed(ClientError(
                    exc.sqlstate, f"could not apply your session settings on database \"{self.db_name}\": "
                    f"{exc.reason.partition(' ')[2] or exc.reason}",
                    hint="Your settings were reset to the server's defaults; SET them again.", fatal=False))
                return
            except BaseException:
                conn.state.settings.applied.clear()
                await pool.discard(conn)
                raise
        self._attach_conn(conn)

    def granted(self, conn: BackendConn | None) -> None:
        """The pool hands this queued session a connection. Usually the core goes on right here, in the
        giver's task, and the query goes out without waking the session's task; whatever must wait
        (settings to apply, a connection to open, a full socket, a token) goes on in a helper task."""
        self._queued = False
        self.counters.pool_wait_seconds += time.perf_counter() - self._queued_at
        core = self.core
        assert core is not None
        if conn is None:
            self._help(self._open_granted())
            return
        sql = sync_sql(core.client_params, conn.state.settings)
        if sql:
            self._help(self._settle_and_drive(conn, sql))
            return
        self._attach_conn(conn)
        try:
            action = core.resume(time.perf_counter())
            if action is PROCEED and not self._cancel_on_send and not core.listen_changed:
                self.server.input_budget.check(self, core.input_buffered())
                assert self.conn is not None
                if ((not core.to_backend or send_now(self._to_backend, self.conn.channel, core.to_backend))
                        and (not core.to_client or send_now(self._to_client, self.channel, core.to_client))):
                    return
        except BaseException as exc:  # noqa: BLE001 - it ends this session, never the giver's task
            self._fail(exc)
            return
        self._help(self._drive_or_end(action))

    def wait_failed(self, error: BackendError) -> None:
        self._queued = False
        self.counters.pool_wait_seconds += time.perf_counter() - self._queued_at
        self._help(self._refuse_and_drive(error))

    def _help(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a helper task; the session's task lets it drive the core until it is done."""
        assert self._helpers is not None
        self._helping = trio.Event()
        self._helpers.start_soon(self._helper, work)

    async def _helper(self, work: Coroutine[Any, Any, None]) -> None:
        helping = self._helping
        try:
            await work
        except trio.Cancelled:
            raise
        except BaseException as exc:  # noqa: BLE001 - as if the session's own task had raised it
            self._fail(exc)
        finally:
            if self._helping is helping:
                self._helping = None
            if helping is not None:
                helping.set()

    async def _drive_or_end(self, action: int) -> None:
        if not await self._drive(action):
            self._serve_scope.cancel()  # the client said goodbye

    async def _open_granted(self) -> None:
        assert self.pool is not None and self.core is not None
        try:
            conn = await self.pool.open_granted_slot()
        except BackendError as exc:
            await self._refuse_and_drive(exc)
            return
        await self._settle_and_drive(conn, sync_sql(self.core.client_params, conn.state.settings))

    async def _settle_and_drive(self, conn: BackendConn, sql: str) -> None:
        assert self.core is not None
        await self._settle(conn, sql)
        await self._drive_or_end(self.core.resume(time.perf_counter()))

    async def _refuse_and_drive(self, error: BackendError | WaitCancelled) -> None:
        core = self.core
        assert core is not None
        if isinstance(error, WaitCancelled):
            core.wait_cancelled()
        else:
            core.attach_failed(ClientError(error.sqlstate, f"could not connect to database \"{self.db_name}\": "
                                           f"{error.reason}", fatal=False))
        await self._drive_or_end(core.resume(time.perf_counter()))
