"""The listener connection of a pool (transaction mode): one server connection per worker and (org,
database) that LISTENs on its clients' channels and hands each notification to the sessions that
listen on its channel, so that a listener holds no pooled backend (decisions: `proxy.listen`).

It is opened with the first LISTEN, outside the pool's size, reconnects (and LISTENs again) when the
server drops it, and closes `LINGER` seconds after its last client stopped listening.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import trio

from o7s_cluster.control_plane.dsn import BackendTarget
from o7s_cluster.net import backend
from o7s_cluster.net.backend import BackendConn, BackendError
from o7s_cluster.pgwire.errors import ProtocolViolation
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.listen import ListenerCore

log = logging.getLogger("o7s.listener")
LINGER = 30.0             # seconds the connection stays open after its last client stopped listening
RETRY_FIRST = 0.1         # seconds before the first reconnect; doubled up to RETRY_MAX
RETRY_MAX = 5.0
APPLICATION_NAME = "o7s listener"
BARRIER_TIMEOUT = 1.0     # seconds a client's ReadyForQuery waits for its own notifications at most


class Counters(Protocol):
    """The org's counters (`usage.counters.OrgCounters`) the listener keeps its gauge in."""

    listener_connections: int


class Subscriber(Protocol):
    """A client session that listens: it takes notifications without waiting (it queues them)."""

    pid: int

    def notify(self, message: bytes) -> None: ...


class Pool(Protocol):
    """What the listener uses of its pool (`net.pool.Pool`)."""

    org_name: str
    target: BackendTarget
    settings: Any  # PoolSettings: connect_timeout
    startup_params: dict[str, str]
    by_pid: Mapping[int, BackendState]  # server pid -> its backend state (weak)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...


class Listener:
    """One pool's listener connection and its subscribers (see the module docstring)."""

    def __init__(self, pool: Pool, counters: Counters) -> None:
        self.pool = pool
        self.counters = counters  # the org's (its listener_connections gauge)
        self.core = ListenerCore()
        self.sessions: dict[int, Subscriber] = {}  # id(session) -> session
        self.error: BackendError | None = None    # why the last connect failed (while not connected)
        self.connected = False
        self.opened_total = 0
        self._running = False
        self._closed = False
        self._wake = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()  # subscribers waiting for a confirmation
        self._scope: trio.CancelScope | None = None

    # --- the sessions' side ------------------------------------------------------------------

    async def subscribe(self, session: Subscriber, channels: Iterable[bytes], *, timeout: float,
                        undo: bool = True) -> None:
        """Make `session` listen on exactly `channels`; return once the server listens on all of them.

        Raises BackendError if the server cannot be reached or refuses in time; the session's
        subscription is then left as it was (`undo`), or kept for the reconnects to serve.
        """
        key = id(session)
        wanted = set(channels)
        before = self.core.subscribers.get(key, (0, frozenset()))[1]
        self.core.want(key, session.pid, wanted)
        if wanted:
            self.sessions[key] = session
        else:
            self.sessions.pop(key, None)
        self._kick()
        if self.core.confirmed(wanted):
            return
        try:
            with trio.fail_after(timeout):
                while not self.core.confirmed(wanted):
                    failed = self.core.error_for(wanted)
                    if failed:
                        raise BackendError(f"the database server refused LISTEN: {failed}")
                    if self.error is not None and not self.connected:
                        raise self.error
                    await self._changed.park()
        except trio.TooSlowError:
            if undo:
                self._undo(session, before)
            raise BackendError(f"the listener connection did not confirm LISTEN within {timeout:g} s") from None
        except BackendError:
            if undo:
                self._undo(session, before)
            raise

    async def barrier(self) -> None:
        """Return once the listener has relayed every notification committed before now (or it is not
        connected, or BARRIER_TIMEOUT passed)."""
        if not self.connected:
            return
        core = self.core
        seq = core.barrier()
        self._kick()
        with trio.move_on_after(BARRIER_TIMEOUT):
            while core.barriers_done < seq and self.connected:
                await self._changed.park()

    def _undo(self, session: Subscriber, channels: frozenset[bytes]) -> None:
        self.core.want(id(session), session.pid, channels)
        if not channels:
            self.sessions.pop(id(session), None)
        self._kick()

    def unsubscribe(self, session: Subscriber) -> None:
        """The session has gone: its channels are UNLISTENed unless another session listens on them."""
        key = id(session)
        if self.sessions.pop(key, None) is not None or key in self.core.subscribers:
            self.core.drop(key)
            self._kick()

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    # --- the connection ------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closed:
            return
        if not self._running:
            if self.core.subscribers:
                self._running = True
                self.pool.spawn(self._run)
            return
        self._wake.set()

    async def _run(self) -> None:
        """Connect, LISTEN, relay; reconnect while anyone listens; close once nobody has for LINGER s."""
        delay = RETRY_FIRST
        try:
            with trio.CancelScope() as self._scope:
                while self.core.subscribers and not self._closed:
                    try:
                        conn = await backend.connect(
                            self.pool.target, timeout=self.pool.settings.connect_timeout,
                            extra_params={**self.pool.startup_params, "client_encoding": "UTF8",
                                          "application_name": APPLICATION_NAME})
                    except BackendError as exc:
                        self.error = exc
                        self._changed.unpark_all()
                        log.warning("listener connection failed", extra={"org": self.pool.org_name,
                                                                         "reason": exc.reason})
                        await trio.sleep(delay)
                        delay = min(RETRY_MAX, delay * 2)
                        continue
                    delay = RETRY_FIRST
                    self.error = None
                    self.opened_total += 1
                    self.core.reset()
                    self.connected = True
                    self.counters.listener_connections += 1
                    try:
                        await self._serve(conn)
                    except (BackendError, ProtocolViolation, trio.BrokenResourceError, trio.ClosedResourceError,
                            OSError) as exc:
                        log.warning("listener connection lost; listening again",
                                    extra={"org": self.pool.org_name, "reason": str(exc)})
                    finally:
                        self.connected = False
                        self.counters.listener_connections -= 1
                        self.core.reset()
                        self._changed.unpark_all()
                        with trio.CancelScope(shield=True):
                            await conn.aclose()
        except Exception:
            # A bug must cost the listener connection, never the worker whose nursery it runs in.
            log.exception("listener failed", extra={"org": self.pool.org_name})
            self.error = BackendError("the listener connection failed")
            self._changed.unpark_all()
        finally:
            self._running = False
            self._scope = None

    async def _serve(self, conn: BackendConn) -> None:
        """Read and write the connection until nobody has listened for LINGER s (or it fails)."""
        lost: list[Exception] = []

        async def guarded(part: Callable[[BackendConn], Awaitable[None]]) -> None:
            try:
                await part(conn)
            except (BackendError, ProtocolViolation, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError) as exc:
                lost.append(exc)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, self._read)
            nursery.start_soon(guarded, self._write)
        if lost:
            raise lost[0]

    async def _write(self, conn: BackendConn) -> None:
        """Send the LISTEN/UNLISTEN statements the subscribers' changes call for; return once nobody
        has listened for LINGER seconds."""
        core = self.core
        while True:
            self._wake = trio.Event()  # before looking: a change made while sending wakes the next wait
            sql = core.statements()
            if sql:
                await conn.send(sql)
            if core.idle():
                with trio.move_on_after(LINGER):
                    await self._wake.wait()
                if core.idle():
                    return
                continue
            await self._wake.wait()

    async def _read(self, conn: BackendConn) -> None:
        core = self.core
        by_pid = self.pool.by_pid
        sessions = self.sessions
        while True:
            data = await conn.channel.receive()
            if not data:
                raise BackendError("the database server closed the listener connection")
            confirmed = len(core.listening)
            inflight = len(core.inflight)
            for message, sender in core.feed(data):
                state = by_pid.get(sender)
                for key, out in core.route(message, state.holder if state is not None else 0):
                    session = sessions.get(key)  # type: ignore[call-overload]
                    if session is not None:
                        session.notify(out)
            if len(core.listening) != confirmed or len(core.inflight) != inflight:
                self._changed.unpark_all()
                self._wake.set()  # the writer may have more to send, or may close
