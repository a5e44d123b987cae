"""A session's sockets read by the worker's poller (`net.poller`): the usual message is handled right
in the poller's task, without waking the session's own.

What the client or the backend sent is fed to the session core there, and what it made goes out if
the kernel takes it all (`send_now`); a query that needs a backend gets an idle one or a place in the
pool's queue. Anything that must wait (a full socket, a connection to open or settle, a rate-limit
token, a LISTEN, an incomplete message under its timeout, the goodbye) is handed, with the socket, to
the task that owns it: the session's task for the client, the connection's pump for the backend.
Those tasks then run the same code as without a poller (`net.session`), and give the socket back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import trio

from o7s_cluster.net.channel import Channel, Outbox, send_now
from o7s_cluster.proxy.params import sync_sql
from o7s_cluster.proxy.relay import RELEASE
from o7s_cluster.proxy.session import NEED_BACKEND, PROCEED, SessionCore

if TYPE_CHECKING:
    from o7s_cluster.config import Settings
    from o7s_cluster.net.backend import BackendConn
    from o7s_cluster.net.channel import AnyChannel
    from o7s_cluster.net.poller import Poller
    from o7s_cluster.net.pool import Pool
    from o7s_cluster.usage.counters import OrgCounters
    from o7s_cluster.worker.server import Server


class Polled:
    """The poller's half of `net.session.ClientSession` (whose state it reads, as set up there)."""

    server: Server
    settings: Settings
    core: SessionCore | None
    conn: BackendConn | None
    pool: Pool | None
    counters: OrgCounters
    channel: AnyChannel
    _to_client: Outbox
    _to_backend: Outbox
    _queued: bool
    _queued_at: float
    _helping: trio.Event | None
    _cancel_on_send: bool

    if TYPE_CHECKING:  # ClientSession's and Attaching's
        def _attach_conn(self, conn: BackendConn) -> None: ...
        def _detach(self) -> BackendConn: ...
        def _fail(self, exc: BaseException) -> None: ...
        def _after_answer(self) -> None: ...
        async def _drive(self, action: int) -> bool: ...
        async def _finish_backend(self, verdict: int) -> None: ...
        async def _settle(self, conn: BackendConn, sql: str) -> None: ...
        async def _receive_client(self) -> memoryview | bytes: ...
        async def _take_client(self, data: memoryview | bytes) -> bool: ...

    # --- the client's socket ---------------------------------------------------------------------

    async def _client_loop_polled(self, poller: Poller) -> None:
        """The session's task while the poller reads its client: it finishes what the handler handed
        it, reads on by itself while a message is incomplete, then gives the socket back."""
        channel = self.channel
        assert type(channel) is Channel
        fd = channel.sock.fileno()
        lot = trio.lowlevel.ParkingLot()
        handed: list[Awaitable[bool]] = []

        def on_readable() -> None:
            data = channel.receive_now()
            if data is None:
                return
            rest = self._client_now(data)
            if rest is not None:
                poller.pause(fd)
                handed.append(rest)
                lot.unpark_all()

        poller.add(fd, on_readable)
        try:
            while True:
                while not handed:
                    await lot.park()
                if not await handed.pop() or not await self._read_on():
                    return
                poller.resume(fd)
        finally:
            poller.remove(fd, on_readable)
            for rest in handed:  # handed over as the session ended
                rest.close()  # type: ignore[attr-defined]

    def _client_now(self, data: memoryview | bytes) -> Awaitable[bool] | None:
        """Handle what the client sent without waiting; else what the session's task is to finish."""
        if not data:
            return _said_goodbye()
        if self._helping is not None:  # a helper drives the core after a grant: it goes first
            return self._take_client(data)
        core = self.core
        assert core is not None
        try:
            now = time.perf_counter()
            action = core.feed_client(data, now)
            while action is not PROCEED:
                if action != NEED_BACKEND:
                    return self._drive(action)
                attached = self._attach_now()
                if attached is None:  # queued: the pool's grant goes on from here
                    self.server.input_budget.check(self, core.input_buffered())
                    return None
                if attached is not True:
                    return attached
                action = core.resume(now)
            self.server.input_budget.check(self, core.input_buffered())
            if core.listen_changed or self._cancel_on_send:
                return self._drive(action)
            conn = self.conn
            if core.to_backend and (conn is None or not send_now(self._to_backend, conn.channel, core.to_backend)):
                return self._drive(action)
            if core.to_client and not send_now(self._to_client, self.channel, core.to_client):
                return self._drive(action)
            if core.partial_input() and not self._queued:
                return _carry_on()  # the rest of the message is read under its timeout (`_read_on`)
        except BaseException as exc:  # noqa: BLE001 - it ends this session, never the poller
            self._fail(exc)
            return _said_goodbye()
        return None

    def _attach_now(self) -> bool | Awaitable[bool] | None:
        """A backend for the message at the front without waiting: True when attached, None when
        queued for one, else the wait the session's task is to finish (opening or settling one)."""
        core = self.core
        pool = self.pool
        assert core is not None and pool is not None
        if self._queued:
            return None
        if core.to_client and not send_now(self._to_client, self.channel, core.to_client):
            return self._drive(NEED_BACKEND)
        conn = pool.try_acquire()
        if conn is None:
            if pool.would_wait():
                self.counters.pool_waits += 1
            if pool.enqueue(self):  # type: ignore[arg-type]
                self._queued = True
                self._queued_at = time.perf_counter()
                return None
            return self._drive(NEED_BACKEND)  # a connection is opened for it
        sql = sync_sql(core.client_params, conn.state.settings)
        if sql:
            return self._settle_then_drive(conn, sql)
        self._attach_conn(conn)
        return True

    async def _settle_then_drive(self, conn: BackendConn, sql: str) -> bool:
        assert self.core is not None
        await self._settle(conn, sql)
        return await self._drive(self.core.resume(time.perf_counter()))

    async def _read_on(self) -> bool:
        """While a message is incomplete (and not queued whole for a backend), read the client here,
        each read under the message timeout; False when the client said goodbye."""
        core = self.core
        assert core is not None
        while core.partial_input() and not self._queued:
            data = await self._receive_client()
            if not data or not await self._take_client(data):
                return False
        return True

    # --- the backend's socket (from its connection's handler, `BackendConn`) -------------------------

    def backend_data_now(self, data: memoryview | bytes) -> Awaitable[None] | None:
        """`backend_data` without waiting: the usual answer (relayed, the kernel takes it all, the
        backend goes back to the pool) is done here; else the rest is returned for the pump to finish."""
        core = self.core
        if core is None:
            return None
        if not data:
            return self.backend_data(data)  # type: ignore[attr-defined]
        try:
            verdict = core.feed_backend(data, time.perf_counter())
            conn = self.conn
            if (core.listen_changed or core.barrier_wanted or self._cancel_on_send or conn is None
                    or (core.to_backend and not send_now(self._to_backend, conn.channel, core.to_backend))
                    or (core.to_client and not send_now(self._to_client, self.channel, core.to_client))):
                return self._finish_backend(verdict)
            if verdict == RELEASE:
                conn = self._detach()
                assert self.pool is not None
                self.pool.release(conn)
            self._after_answer()
        except BaseException as exc:  # noqa: BLE001 - it ends this session, never the poller
            self._fail(exc)
        return None


async def _said_goodbye() -> bool:
    return False


async def _carry_on() -> bool:
    return True
