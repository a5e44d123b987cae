"""One client session in a worker: login, then the session's task applies the core's decisions.

The session's task reads the client, feeds the session core and applies what it asks (attach a
backend, wait for a token). What a backend sends goes to the session attached (`backend_data`): the
session feeds the core and gives the backend back when the core says it is free. So attaching a
backend wakes nobody, no task is started per transaction, and every decision about the bytes is the
core's (`o7s_cluster.proxy.session`). Plain sockets are read by the worker's poller, which handles the
usual message in its own task (`net.polled`) and hands the rest to the session's task or to the
connection's pump (`BackendConn.pump`); TLS sockets are read by those tasks themselves.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING

import trio

from o7s_cluster.limits.errors import LimitError
from o7s_cluster.net.backend import BackendConn, BackendError, send_cancel
from o7s_cluster.net.channel import AnyChannel, Channel, Outbox
from o7s_cluster.net.attach import Attaching
from o7s_cluster.net.listener import Listener
from o7s_cluster.net.login import Login, limit_error
from o7s_cluster.net.polled import Polled
from o7s_cluster.net.pool import WaitCancelled
from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire import messages as m
from o7s_cluster.pgwire.errors import ClientError, ProtocolViolation
from o7s_cluster.proxy.relay import RELEASE
from o7s_cluster.proxy.session import (
    NEED_BACKEND,
    NEED_LISTEN,
    NEED_QUIET,
    NEED_TOKEN,
    PROCEED,
    TERMINATE,
    SessionCore,
)
from o7s_cluster.usage.counters import OrgCounters

if TYPE_CHECKING:
    from o7s_cluster.limits.bucket import Bucket
    from o7s_cluster.limits.gate import Ticket
    from o7s_cluster.net.pool import Pool
    from o7s_cluster.worker.server import Server

log = logging.getLogger("o7s.session")
_NOBODY = OrgCounters("_unauthenticated", "none")


class ClientSession(Polled, Attaching):
    def __init__(self, server: Server, sock: socket.socket, peer: str, *, preread: bytes = b"",
                 tls_pending: bool = False, handed_off: bool = False) -> None:
        self.server = server
        self.settings = server.settings
        self.peer = peer
        self.channel: AnyChannel = Channel(sock)
        self.login = Login(server, self.channel, peer, preread=preread, tls_pending=tls_pending,
                           handed_off=handed_off, owner=self)
        self.handed_off = handed_off
        self.scope = trio.CancelScope()
        self.draining = False
        self.logged_in = False
        self.org = ""
        self.db_name = ""
        self.pid = 0
        self.secret = 0
        self.core: SessionCore | None = None
        self.conn: BackendConn | None = None
        self.pool: Pool | None = None
        self.counters: OrgCounters = _NOBODY  # the org's, once logged in: metrics and usage read them
        self.bucket: Bucket | None = None
        self.ticket: Ticket | None = None
        self._attached_at = 0.0
        self._serve_scope = trio.CancelScope()
        self._failure: BaseException | None = None  # what ended the session in a backend's pump
        self._to_client = Outbox()
        self._to_backend = Outbox()
        self._waiting: trio.CancelScope | None = None  # a message's wait for a token
        self._pool_wait: trio.lowlevel.Task | None = None  # the task waiting for a backend for a message
        self._pool_wait_cancelled = False
        self._queued = False  # in the pool's queue: its grant goes on where the client task left off
        self._queued_at = 0.0
        self._helpers: trio.Nursery | None = None  # what goes on after a grant that must wait
        self._helping: trio.Event | None = None  # set when the helper that drives the core is done
        self._cancel_on_send = False  # a cancel came during a wait the message must end on its backend
        self._delivering = False  # a task is sending the client its notifications
        self._quiet: trio.Event | None = None  # set when the core is quiet again (NEED_QUIET)

    # --- top level ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
            if self.scope.cancelled_caught:  # drained (SIGTERM, or the drain timeout ran out)
                await self._send_final(m.error_response(
                    "FATAL", codes.ADMIN_SHUTDOWN, "terminating connection due to administrator command",
                    hint="O7s is restarting or scaling down; reconnect."))
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    def drain(self) -> None:
        """Stop this session once it is between transactions (now, if it already is)."""
        self.draining = True
        core = self.core
        if not self.logged_in or core is None or (core.idle() and (self.conn is None or not core.pinned)):
            self.scope.cancel()

    async def _run(self) -> None:
        login = self.login
        try:
            try:
                with trio.fail_after(self.settings.startup_timeout):
                    started = await login.run()
            except trio.TooSlowError:
                raise ClientError(codes.CONNECTION_FAILURE,
                                  f"start-up and authentication timed out after {self.settings.startup_timeout:g} s") from None
            finally:
                login.release_budget()
                self.channel = login.channel
                self.ticket = login.ticket
                if login.conn is not None:
                    self.pool = login.pool
                    self._attach_conn(login.conn)
            if started:
                self._logged_in()
                await self._serve()
        except ClientError as exc:
            await self._send_final(exc.to_bytes())
        except LimitError as exc:
            await self._send_final(limit_error(exc).to_bytes())
        except ProtocolViolation as exc:
            self.server.metrics.protocol_errors += 1
            await self._send_final(m.error_response("FATAL", codes.PROTOCOL_VIOLATION, f"protocol violation: {exc}"))
        except BackendError as exc:
            await self._lose_backend()
            await self._send_final(m.error_response(
                "FATAL", exc.sqlstate if exc.sqlstate.startswith("08") else codes.CONNECTION_FAILURE,
                f"lost the connection to database \"{self.db_name}\": {exc.reason}"))
        except _BackendGone:
            await self._lose_backend()
            await self._send_final(b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass  # the client went away
        except Exception:
            # A bug must cost one session, never the worker.
            log.exception("session failed", extra={"org": self.org, "peer": self.peer})
            await self._lose_backend()
            await self._send_final(m.error_response("FATAL", codes.INTERNAL_ERROR, "internal error in O7s"))

    def _logged_in(self) -> None:
        login = self.login
        assert login.login is not None and login.pool is not None
        self.logged_in = True
        self.org = login.org
        self.db_name = login.db_name
        self.pid, self.secret = login.pid, login.secret
        self.pool = login.pool
        self.bucket = login.bucket
        server = self.server
        self.counters = counters = server.metrics.org(login.login.name, login.login.tier, self.pool.db_type,
                                                      login.login.org_id)
        counters.connection_opened()
        server.metrics.sessions_total += 1
        if self.handed_off:
            counters.handoffs_in += 1
        if self.conn is not None:
            counters.backend_connections += 1
        bucket = self.bucket
        assert bucket is not None
        self.core = SessionCore(
            transaction_mode=self.settings.pool_mode == "transaction",
            counters=counters,
            pool_statements=self.pool.statements,
            client_params=login.client_params,
            take_token=bucket.try_admit,
            max_message=self.settings.max_message_size,
            client_pid=self.pid,
        )
        if self.conn is not None:
            self.core.attached(self.conn.state)

    async def _send_final(self, data: bytes) -> None:
        """Send a last error, then linger briefly so that unread client bytes do not turn our FIN
        into a reset that would discard the error before the client reads it."""
        channel = self.channel
        with trio.move_on_after(2):
            try:
                out = bytearray(self.core.to_client if self.core is not None else b"")
                out += data
                await channel.send(out)
                if isinstance(channel, Channel):
                    channel.sock.shutdown(socket.SHUT_WR)
                    with trio.move_on_after(0.5):
                        drained = 0
                        while drained < 1 << 20 and (chunk := await channel.receive()):
                            drained += len(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, ssl.SSLError, OSError):
                pass

    async def _cleanup(self) -> None:
        """Whatever goes wrong giving the backend back, the client's count and socket are released."""
        try:
            self.server.unregister(self)
            if self.pool is not None and self.pool.listener is not None:
                self.pool.listener.unsubscribe(self)
            self.server.input_budget.forget(self)
            conn, self.conn = self.conn, None
            if conn is not None and self.pool is not None:
                conn.sink = None
                self.counters.backend_connections -= 1
                await self._give_back(conn, self.pool)
        finally:
            if self.logged_in:
                self.counters.connection_closed()
                if self.core is not None:
                    self.core.statements.drop_all()
            if self.ticket is not None:
                self.ticket.release()
            self.channel.close()

    async def _give_back(self, conn: BackendConn, pool: Pool) -> None:
        """Return a connection at the end of a session: only clean and idle, else it is closed."""
        core = self.core
        if core is not None and core.idle() and not conn.dead:
            if not core.transaction_mode or core.pinned:
                try:
                    await conn.query_until_ready("DISCARD ALL")
                except (BackendError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await pool.discard(conn)
                    return
                conn.state.reset()
            pool.release(conn)
            return
        if core is not None and core.owed:  # a query is still running for a client that has gone: stop it
            await send_cancel(conn.target, conn.pid, conn.secret, timeout=2)
        await pool.discard(conn)

    async def _lose_backend(self) -> None:
        conn, self.conn = self.conn, None
        if self.core is not None:
            self.core.detach()
        if conn is not None and self.pool is not None:
            self.counters.backend_connections -= 1
            with trio.CancelScope(shield=True):
                await self.pool.discard(conn)

    # --- serving -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        error: Exception | None = None
        with self._serve_scope:
            async with trio.open_nursery() as self._helpers:
                try:
                    poller = self.server.poller
                    if type(self.channel) is Channel and poller is not None:
                        await self._client_loop_polled(poller)
                    else:
                        await self._client_loop()
                except Exception as exc:  # raised as it is, not in the nursery's exception group
                    error = exc
                finally:
                    self._leave_queue()
                    self._helpers.cancel_scope.cancel()
        if error is not None:
            raise error
        if self._failure is not None:
            raise self._failure

    def _leave_queue(self) -> None:
        if self._queued:
            self._queued = False
            assert self.pool is not None
            self.pool.cancel_wait(self)

    def _fail(self, exc: BaseException) -> None:
        """End the session from a task that is not its own (as if its own task had raised `exc`)."""
        if self._failure is None:
            self._failure = exc
        self._serve_scope.cancel()

    async def _client_loop(self) -> None:
        while (data := await self._receive_client()) and await self._take_client(data):
            pass

    async def _receive_client(self) -> memoryview | bytes:
        """The client's next bytes (b'' at its end); while a message is incomplete, and not queued whole
        for a backend, under the message timeout."""
        assert self.core is not None
        if not self.core.partial_input() or self._queued:
            return await self.channel.receive()
        timeout = self.settings.message_timeout
        with trio.move_on_after(timeout) as scope:
            data = await self.channel.receive()
        if scope.cancelled_caught:
            raise ClientError(codes.PROTOCOL_VIOLATION,
                              f"message not completed within {timeout:g} s (--message-timeout)")
        return data

    async def _take_client(self, data: memoryview | bytes) -> bool:
        """Feed the core what the client sent and apply its decisions; False when the client said goodbye."""
        while self._helping is not None:  # a helper drives the core after a grant: it goes first
            await self._helping.wait()
        assert self.core is not None
        return await self._drive(self.core.feed_client(data, time.perf_counter()))

    async def _drive(self, action: int) -> bool:
        """Apply what the core asks and send what it made; False when the client said goodbye."""
        core = self.core
        assert core is not None
        while action is not PROCEED:
            if action == NEED_BACKEND:
                if not await self._attach():
                    self.server.input_budget.check(self, core.input_buffered())
                    return True  # queued: the pool's grant goes on from here
            elif action == NEED_TOKEN:
                await self._wait_token()
            elif action == NEED_LISTEN:
                await self._listen()
            elif action == NEED_QUIET:
                await self._wait_quiet()
            elif action == TERMINATE:
                if core.to_backend:
                    await self._flush_backend()
                return False
            action = core.resume(time.perf_counter())
        self.server.input_budget.check(self, core.input_buffered())
        if core.listen_changed:
            await self._listen_changed()
        if core.to_backend:
            await self._flush_backend()
        if core.to_client:
            await self._flush_client()
        return True

    async def backend_data(self, data: memoryview | bytes) -> None:
        """What the attached backend sent (b'' when it closed), from its pump task.

        A failure here ends the session (as if its own task had raised), never the pump. A backend the
        core is done with leaves the core at once, so that nothing the client sends meanwhile can reach
        it, and goes back to the pool once this answer is on its way to the client: a slow client holds
        up only its own backend, never another session's.
        """
        core = self.core
        if core is None:
            return
        try:
            if not data:
                if core.backend_fatal:
                    # The server said why (e.g. 57P01 terminating connection): the client hears it as directly.
                    await self._flush_client()
                    raise _BackendGone()
                raise BackendError("the database server closed the connection")
            await self._after_backend(core.feed_backend(data, time.perf_counter()))
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _finish_backend(self, verdict: int) -> None:
        try:
            await self._after_backend(verdict)
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _after_backend(self, verdict: int) -> None:
        """Apply what the core said of the backend's answer (`verdict`) and send what it made."""
        core = self.core
        assert core is not None
        while True:
            if core.listen_changed:  # COMMIT/ROLLBACK of LISTENs: answered once the listener serves them
                await self._listen_changed()
            if not core.barrier_wanted:
                break
            # The client's own NOTIFY committed: relayed before its ReadyForQuery, as directly.
            if self.pool is not None and self.pool.listener is not None:
                await self.pool.listener.barrier()
            core.barrier_done()
            verdict = core.feed_backend(b"", time.perf_counter())
        if core.to_backend:
            await self._flush_backend()
        if verdict == RELEASE and self.conn is not None:
            conn = self._detach()
            try:
                if core.to_client:
                    await self._flush_client()
            finally:
                assert self.pool is not None
                self.pool.release(conn)
        elif core.to_client:
            await self._flush_client()
        self._after_answer()

    def _after_answer(self) -> None:
        core = self.core
        assert core is not None
        if self._quiet is not None and core.quiet():
            self._quiet.set()
        if self.draining and core.idle() and not core.pinned:
            self.scope.cancel()

    async def _flush_client(self) -> None:
        assert self.core is not None
        await self._to_client.flush(self.channel, self.core.to_client)

    async def _flush_backend(self) -> None:
        conn = self.conn
        assert conn is not None and self.core is not None
        try:
            await self._to_backend.flush(conn.channel, self.core.to_backend)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise BackendError("the database server closed the connection") from None
        if self._cancel_on_send:
            self._cancel_on_send = False
            self.cancel()

    # --- backends ------------------------------------------------------------------------------

    def _attach_conn(self, conn: BackendConn) -> None:
        self.conn = conn
        conn.sink = self
        conn.state.holder = self.pid
        self._attached_at = time.perf_counter()
        if self.core is not None:
            self.core.attached(conn.state)
            self.counters.backend_connections += 1

    def _detach(self) -> BackendConn:
        """The backend leaves the core (the caller gives it back to the pool)."""
        conn, self.conn = self.conn, None
        assert conn is not None and self.core is not None
        self.core.detach()
        counters = self.counters
        counters.backend_connections -= 1
        counters.backend_seconds += time.perf_counter() - self._attached_at
        return conn

    async def _wait_token(self) -> None:
        core = self.core
        bucket = self.bucket
        assert core is not None and bucket is not None
        if core.to_backend:
            await self._flush_backend()
        if core.to_client:
            await self._flush_client()
        throttled: bool | None = None
        with trio.CancelScope() as self._waiting:
            try:
                throttled = await bucket.admit(core.tx_status != b"I")
            except LimitError as exc:
                core.token_refused(limit_error(exc))
                return
            finally:
                self._waiting = None
        if throttled is None:  # the client cancelled its query while it waited
            if not core.wait_cancelled():
                self._cancel_on_send = True  # it runs, and the cancel follows it to its backend
            return
        core.token_granted(throttled)

    # --- LISTEN/NOTIFY (transaction mode) -------------------------------------------------------

    def _listener(self) -> Listener:
        pool = self.pool
        assert pool is not None
        if pool.listener is None:
            pool.listener = Listener(pool, self.counters)
        return pool.listener

    async def _listen(self) -> None:
        """A LISTEN/UNLISTEN outside a transaction block: answered once the listener serves it, as
        PostgreSQL listens when it answers; or the reason it cannot."""
        core = self.core
        assert core is not None
        if core.to_client:
            await self._flush_client()
        try:
            await self._listener().subscribe(self, core.listen_target(), timeout=self.settings.server_connect_timeout)
        except BackendError as exc:
            core.listen_done(ClientError(exc.sqlstate, f"could not listen on database \"{self.db_name}\": "
                                         f"{exc.reason}", fatal=False))
            return
        core.listen_done(None)

    async def _listen_changed(self) -> None:
        """LISTEN inside a block (the listener starts now), or its COMMIT/ROLLBACK: the statement is
        already answered, so a listener that cannot be reached costs notifications, not an error."""
        core = self.core
        assert core is not None
        core.listen_changed = False
        try:
            await self._listener().subscribe(self, core.listens.wanted(), timeout=self.settings.server_connect_timeout,
                                             undo=False)
        except BackendError as exc:
            log.warning("listener not ready", extra={"org": self.org, "reason": exc.reason})

    async def _wait_quiet(self) -> None:
        """Until the statement that may NOTIFY has ended (and its own notifications are relayed)."""
        core = self.core
        assert core is not None
        if core.to_backend:
            await self._flush_backend()
        if core.to_client:
            await self._flush_client()
        while not core.quiet():
            self._quiet = trio.Event()
            await self._quiet.wait()
        self._quiet = None

    def notify(self, message: bytes) -> None:
        """A notification on a channel this client listens on (from the listener's task: never waits)."""
        core = self.core
        if core is None or not core.notification(message):
            return
        self.counters.notifications += 1
        if core.listens.overflow:
            if self._failure is None:
                self._failure = ClientError(codes.OUT_OF_MEMORY, core.listens.overflow,
                                            hint="Read notifications as they come, and do not stay in a "
                                                 "transaction while many arrive.")
            self._serve_scope.cancel()
            return
        if core.to_client and not self._delivering:
            self._delivering = True
            self.server.spawn(self._deliver)

    async def _deliver(self) -> None:
        core = self.core
        assert core is not None
        try:
            while True:
                await self._flush_client()
                if not (core.listens.queue and core.idle() and core.listen_request is None):
                    break
                core.listens.take(core.to_client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, ssl.SSLError, OSError):
            pass  # the session's own task sees the client gone
        finally:
            self._delivering = False

    # --- cancel --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """A CancelRequest with this session's key: reach its backend while one of its queries runs,
        and keep that backend from anyone else until the cancel has landed."""
        if self._queued:  # the query waits for a backend: it ends the wait
            assert self.pool is not None
            if self.pool.cancel_wait(self):
                self._queued = False
                self.counters.pool_wait_seconds += time.perf_counter() - self._queued_at
                self._help(self._refuse_and_drive(WaitCancelled()))
            return
        if self._pool_wait is not None:  # ... (while a connection is opened for it)
            self._pool_wait_cancelled = True
            if self.pool is not None:
                self.pool.cancel_wait(self._pool_wait)
            return
        if self._waiting is not None:  # ... or for a token
            self._waiting.cancel()
            return
        conn = self.conn
        core = self.core
        if conn is None or core is None or self.pool is None or not core.query_running():
            return
        conn.cancels += 1
        self.server.spawn(self._cancel, conn, self.pool)

    async def _cancel(self, conn: BackendConn, pool: Pool) -> None:
        try:
            await send_cancel(conn.target, conn.pid, conn.secret)
        finally:
            pool.cancel_landed(conn)


class _BackendGone(Exception):
    """The backend closed after telling the client why (a FATAL error already relayed)."""
