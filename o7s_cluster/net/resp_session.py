"""The trio shell of one Redis client: reads commands, applies the sans-IO core's decisions
(resp/session.py, resp/namespace.py), and moves bytes to and from the org's Redis backend.

Plain commands take a pooled backend connection for one batch (everything the client pipelined in one
read) and give it back when the replies are in; MULTI/WATCH keep one connection until EXEC, DISCARD or
UNWATCH; a client that subscribes gets a connection of its own for the rest of the session (or until
RESET), read by a second task so that messages flow while the client is idle.
"""

from __future__ import annotations

import datetime
import itertools
import math
import logging
import re
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from o7s_cluster.auth.apikeys import looks_like_key
from o7s_cluster.auth.tokens import TokenRejected
from o7s_cluster.limits.errors import LimitError
from o7s_cluster.net.login import TOKEN_USER, ControlPlaneDown, audit_trip, check_token
from o7s_cluster.net.resp_backend import RedisBackendError, RedisConn, RedisPool, error_reply
from o7s_cluster.pgwire.scram import check_password
from o7s_cluster.resp import codec
from o7s_cluster.resp.codec import PREAUTH_MAX_ARGS, PREAUTH_MAX_BULK, ProtocolError, Reply, RequestParser, encode_command
from o7s_cluster.resp.namespace import T_NONE, Answer, Namespace, is_pubsub_reply
from o7s_cluster.resp.session import (
    EXECABORT,
    EXPECT_CONFIRMATIONS,
    F_EXEC,
    F_EXECABORT,
    F_NONE,
    WRONGPASS,
    Close,
    Login,
    RespSession,
    Send,
    Step,
)

if TYPE_CHECKING:
    from o7s_cluster.usage.counters import OrgCounters
    from o7s_cluster.control_plane.catalog import OrgLogin
    from o7s_cluster.limits.bucket import Bucket
    from o7s_cluster.limits.gate import Ticket
    from o7s_cluster.net.resp_backend import OrgRedis
    from o7s_cluster.worker.server import Server

log = logging.getLogger("o7s.redis")
READ_SIZE = 65536
MAX_BATCH = 1024  # commands answered per backend round trip, at most
_ORG_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_CONFIRM_KINDS = frozenset((b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe",
                            b"sunsubscribe"))
_MESSAGE_KINDS = frozenset((b"message", b"pmessage", b"smessage"))
_ids = itertools.count(1)


def key_prefix(org_id: str) -> bytes:
    """Every key and channel of an org lives under this prefix on a shared backend."""
    return b"o7s:" + org_id.encode() + b":"


class _Stop(Exception):
    """End the session after what has been sent (QUIT, a protocol error, a lost dedicated connection)."""


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _client_gone(exc: BaseException) -> bool:
    """The client went away or was stopped (a TLS handshake cut off, a reset), however the nursery wraps it."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split((*_GONE, _Stop))[1] is None
    return isinstance(exc, (*_GONE, _Stop))


class RespClient:
    """One Redis client connection (the worker's `Session` protocol: run, drain, cancel)."""

    pid = 0
    secret = 0

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.settings = server.settings
        self.stream = stream
        self.peer = peer
        self.core = RespSession(next(_ids))
        self.parser = RequestParser(PREAUTH_MAX_ARGS, PREAUTH_MAX_BULK)
        self.login: OrgLogin | None = None
        self.org: OrgRedis | None = None
        self.db_name = ""
        self.ticket: Ticket | None = None
        self.bucket: Bucket | None = None
        self.counters: OrgCounters | None = None  # the org's (database type redis): metrics and usage read them
        self.pinned: RedisConn | None = None  # MULTI/WATCH or Pub/Sub: the client's own backend connection
        self.pinned_pool: RedisPool | None = None
        self.streaming = False  # subscribed: a reader task relays the pinned connection
        self.fifo: deque[Send | bytes] = deque()  # streaming: what the client is owed, in order
        self.fifo_empty = trio.Event()
        self.write_lock = trio.Lock()
        self.backend_subs = 0  # the backend's own count of this client's subscriptions (RESP2 messages)
        self.draining = False
        self.scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._reader_scope = trio.CancelScope()

    # --- the Session protocol --------------------------------------------------------------------

    def drain(self) -> None:
        self.draining = True
        if not self.core.pinned:
            self.scope.cancel()

    def cancel(self) -> None:
        """Postgres cancel requests do not apply to Redis clients."""

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._serve()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - a client gone (also inside the nursery's group) is no failure
            if not _client_gone(exc):
                log.exception("redis session failed", extra={"peer": self.peer})
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _cleanup(self) -> None:
        if self.pinned is not None:
            await self.pinned.aclose()
            self.pinned = None
        if self.ticket is not None:
            self.ticket.release()
        if self.counters is not None:
            self.counters.connection_closed()
        try:
            await self.stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass

    # --- reading the client ----------------------------------------------------------------------

    async def _write(self, data: bytes | bytearray) -> None:
        if not data:
            return
        async with self.write_lock:
            await self.stream.send_all(data)
        if self.counters is not None:
            self.counters.bytes_out += len(data)

    async def _serve(self) -> None:
        deadline = trio.current_time() + self.settings.startup_timeout
        while True:
            if self.core.authed:
                data = await self.stream.receive_some(READ_SIZE)
            else:
                with trio.move_on_at(deadline):
                    data = await self.stream.receive_some(READ_SIZE)
                    deadline = None
                if deadline is not None:
                    await self._write(codec.error("ERR O7s: authenticate within "
                                                  f"{self.settings.startup_timeout:g} s (AUTH ORG PASSWORD)"))
                    return
                deadline = trio.current_time() + self.settings.startup_timeout
            if not data:
                return
            if self.counters is not None:
                self.counters.bytes_in += len(data)
            self.parser.feed(data)
            batch: list[Step] = []
            while True:
                cmd = self.parser.next_command()
                if cmd is None:
                    break
                if isinstance(cmd, ProtocolError):
                    await self._run(batch)
                    self.server.metrics.protocol_errors += 1
                    await self._write(cmd.reply())
                    return
                if cmd[0].upper() == b"RESET":  # what came before runs first, on the connection it needs
                    await self._run(batch)
                    batch = []
                step = await self._step(cmd)
                if isinstance(step, Login):
                    await self._run(batch)
                    batch = []
                    await self._write(await self._log_in(step))
                    continue
                if isinstance(step, Close):
                    await self._run(batch)
                    await self._write(step.reply)
                    return
                if self.core.ever_subscribed and not self.streaming:
                    await self._run(batch)
                    batch = []
                    await self._start_streaming()
                if self.streaming:
                    await self._stream_step(step)
                    continue
                batch.append(step)
                if len(batch) >= MAX_BATCH:
                    await self._run(batch)
                    batch = []
            await self._run(batch)
            if self.draining and not self.core.pinned:
                return

    async def _step(self, cmd: list[bytes]) -> Step:
        """One command through the rate limit and the core."""
        core = self.core
        if core.authed and self.bucket is not None:
            bucket = self.bucket
            if not bucket.try_admit():
                try:
                    throttled = await bucket.admit(core.in_multi)
                except LimitError as exc:
                    self.counters.refused += 1
                    return Answer(codec.error(f"ERR O7s: {exc.message}; {exc.hint}"))
                if throttled:
                    self.counters.throttled += 1
        name = cmd[0].upper()
        if name == b"RESET" and core.authed:
            await self._reset()
        return core.handle(cmd)

    # --- batches on a pooled (or pinned) connection ------------------------------------------------

    def _pool(self, script: bool = False) -> RedisPool:
        assert self.org is not None and self.login is not None
        return self.server.redis_pools.pool(self.org, self.core.proto, self.login.limits.pool_size, script)

    async def _run(self, batch: list[Step]) -> None:
        """Run a batch, the client's scripts on the org's confined connections and the rest on plain ones,
        each consecutive run in one round trip."""
        start = 0
        kind = None
        for i, step in enumerate(batch):
            if isinstance(step, Send):
                if kind is not None and step.script != kind:
                    await self._run_on(batch[start:i], kind)
                    start = i
                kind = step.script
        await self._run_on(batch[start:], bool(kind))

    async def _run_on(self, batch: list[Step], script: bool) -> None:
        sends = [s for s in batch if isinstance(s, Send)]
        if not sends:
            await self._write(b"".join(s.reply for s in batch if isinstance(s, Answer)))
            return
        conn = None if script else self.pinned  # the core allows no script while pinned
        pool = self._pool(True) if script else (self.pinned_pool or self._pool())
        out = bytearray()
        started = time.perf_counter()
        try:
            if conn is None:
                conn = await pool.acquire()
            await conn.send(b"".join(encode_command(s.args) for s in sends))
        except RedisBackendError as e:
            if conn is not None:
                conn.broken = True
            await self._lost(batch, e, conn, pool)
            return
        blocking = any(s.blocking for s in sends)
        done = 0
        try:
            with trio.fail_after(math.inf if blocking else self.settings.message_timeout):
                for step in batch:
                    if isinstance(step, Answer):
                        out += step.reply
                        continue
                    raw = await conn.read_raw()
                    out += self._finish(step, raw)
                    done += 1
                    self._count(started, raw)
                    if len(out) > READ_SIZE:
                        await self._write(out)
                        out = bytearray()
        except (RedisBackendError, trio.TooSlowError) as e:
            conn.broken = True
            await self._write(out)
            err = e if isinstance(e, RedisBackendError) else RedisBackendError(
                f"no reply within {self.settings.message_timeout:g} s")
            await self._lost(batch[batch.index(step):], err, conn, pool)
            return
        except BaseException:
            conn.broken = True  # cancelled or the client went away mid-batch: replies are out of step
            if conn is not self.pinned or script:
                pool.release(conn)
            raise
        await self._write(out)
        if script:
            pool.release(conn)
        else:
            self._settle(conn, pool)

    def _settle(self, conn: RedisConn, pool: RedisPool) -> None:
        """After a batch: keep the connection while the client needs its own, else give it back."""
        if self.core.pinned:
            if self.pinned is None:
                self.pinned, self.pinned_pool = conn, pool
                pool.open -= 1  # a pinned connection is the client's, outside the pool's count
                pool._wake()
            return
        if self.pinned is conn:
            self.pinned = self.pinned_pool = None
            pool.open += 1
        pool.release(conn)

    async def _lost(self, rest: list[Step], e: RedisBackendError, conn: RedisConn | None, pool: RedisPool) -> None:
        """The backend failed mid-batch: every command still owed gets an error naming the database."""
        msg = error_reply(f'database "{self.db_name}": {e.reason}')
        out = bytearray()
        for step in rest:
            if isinstance(step, Answer):
                out += step.reply
            else:
                out += msg
                if self.counters is not None:
                    self.counters.errors += 1
        was_pinned = self.core.pinned or conn is self.pinned
        if conn is not None:
            if conn is self.pinned:
                self.pinned = self.pinned_pool = None
                await conn.aclose()
            else:
                pool.release(conn)
        await self._write(out)
        if was_pinned:  # MULTI/WATCH state is gone with the connection: as when Redis itself goes away
            raise _Stop

    def _count(self, started: float, raw: bytes) -> None:
        ok = raw[:1] not in (b"-", b"!")
        self.counters.query_done(time.perf_counter() - started, 0, ok)

    def _finish(self, step: Send, raw: bytes) -> bytes:
        """The backend's reply as the client must see it."""
        ns = self.core.ns
        assert ns is not None
        if step.finish == F_EXECABORT:
            return EXECABORT
        if raw[:1] == b"-":
            return ns.error_text(raw)
        if step.transform == T_NONE and step.finish == F_NONE:
            return raw
        r, _ = codec.parse_reply(raw)
        if step.finish == F_EXEC:
            if isinstance(r.data, list) and r.kind == "*":
                items = []
                for t, item in zip(step.queued + [T_NONE] * (len(r.data) - len(step.queued)), r.data):
                    if item.is_error() and isinstance(item.data, bytes):
                        item = Reply(item.kind, ns.error_text(item.data))
                    items.append(ns.apply(t, item))
                r = Reply(r.kind, items)
            return codec.encode_reply(r)
        return codec.encode_reply(ns.apply(step.transform, r))

    # --- streaming (subscribed clients) ------------------------------------------------------------

    async def _start_streaming(self) -> None:
        if self.pinned is None:
            pool = self._pool()
            try:
                self.pinned = await pool.dedicated()
            except RedisBackendError as e:
                await self._write(error_reply(f'database "{self.db_name}": {e.reason}'))
                raise _Stop from None
            self.pinned_pool = pool
        self.streaming = True
        self.fifo_empty = trio.Event()
        self.fifo_empty.set()
        assert self._nursery is not None
        self._reader_scope = trio.CancelScope()
        self._nursery.start_soon(self._reader, self.pinned, self._reader_scope)

    async def _stream_step(self, step: Step) -> None:
        if isinstance(step, Answer):
            if self.fifo:
                self.fifo.append(step.reply)
            else:
                await self._write(step.reply)
            return
        assert isinstance(step, Send) and self.pinned is not None
        self.fifo.append(step)
        self.fifo_empty = trio.Event() if self.fifo_empty.is_set() else self.fifo_empty
        try:
            await self.pinned.send(encode_command(step.args))
        except RedisBackendError as e:
            await self._write(error_reply(f'database "{self.db_name}": {e.reason}'))
            raise _Stop from None

    async def _reader(self, conn: RedisConn, scope: trio.CancelScope) -> None:
        """Relay the dedicated connection: confirmations and replies in order, messages as they come."""
        with scope:
            await self._relay(conn)

    async def _relay(self, conn: RedisConn) -> None:
        ns = self.core.ns
        assert ns is not None
        started = time.perf_counter()
        try:
            while True:
                r, raw = await conn.read()
                head = self.fifo[0] if self.fifo else None
                kind = r.data[0].data.lower() if is_pubsub_reply(r) else None
                if (isinstance(head, Send) and head.expect == EXPECT_CONFIRMATIONS and kind in _CONFIRM_KINDS):
                    self._note_count(r)
                    out = ns.pubsub(r)
                    await self._write(codec.encode_reply(out) if out is not None else b"")
                    head.confirmations -= 1
                    if head.confirmations <= 0:
                        self._pop()
                    await self._flush_locals()
                    continue
                if kind in _MESSAGE_KINDS and (r.kind == ">" or self.backend_subs > 0):
                    out = ns.pubsub(r)
                    if out is not None:
                        await self._write(codec.encode_reply(out))
                    continue
                if r.kind == ">":  # another push (none expected): passed on unchanged
                    await self._write(raw)
                    continue
                if not isinstance(head, Send):
                    log.warning("redis: unexpected reply on a subscribed connection", extra={"peer": self.peer})
                    continue
                await self._write(self._finish(head, raw))
                self._count(started, raw)
                self._pop()
                await self._flush_locals()
        except RedisBackendError as e:
            await self._write(error_reply(f'database "{self.db_name}": {e.reason}'))
            self.scope.cancel()

    def _note_count(self, r: Reply) -> None:
        items = r.data
        if isinstance(items, list) and len(items) > 2 and items[2].kind == ":" and isinstance(items[2].data, bytes):
            self.backend_subs = int(items[2].data)

    def _pop(self) -> None:
        self.fifo.popleft()
        if not self.fifo:
            self.fifo_empty.set()

    async def _flush_locals(self) -> None:
        while self.fifo and isinstance(self.fifo[0], bytes):
            data = self.fifo[0]
            await self._write(data)
            self._pop()

    async def _reset(self) -> None:
        """RESET: the client's own backend connection (and its state) is dropped, after what it owes."""
        if self.streaming:
            await self.fifo_empty.wait()
            self.streaming = False
            self._reader_scope.cancel()
        if self.pinned is not None:
            conn = self.pinned
            self.pinned = self.pinned_pool = None
            await conn.aclose()
        self.backend_subs = 0
        self.fifo.clear()

    # --- login -------------------------------------------------------------------------------------

    async def _token_ok(self, method: str, token: str, org: str, login: OrgLogin | None) -> bool:
        """A JWT or API key of `org` (the checks of net/login.py); why one fails goes to the log only."""
        try:
            await check_token(self.server, method, token, org, login)  # a role claim has no meaning for Redis
        except TokenRejected as exc:
            log.info("token login refused", extra={"org": org, "method": method, "reason": exc.reason})
            return False
        return True

    async def _log_in(self, step: Login) -> bytes:
        server = self.server
        user = step.user.decode("utf-8", "replace")
        org = user.rpartition(".")[2]
        wanted_db = user.rpartition(".")[0]
        address = self.peer.rpartition(":")[0] or self.peer
        guard = server.limits.logins
        left = await guard.blocked_for(org, address)
        if left > 0:
            server.metrics.logins_blocked += 1
            return codec.error(f"ERR O7s: too many failed logins for this org from {address}; retry after "
                               f"{max(1, round(left))} s")
        login = None
        if _ORG_NAME.match(org):
            try:
                login = await server.catalog.login(org)
            except Exception:
                log.exception("control plane lookup failed", extra={"org": org})
                return codec.error("ERR O7s cannot reach its control plane to authenticate you; try again shortly")
        try:
            password = step.password.decode("utf-8")
        except UnicodeDecodeError:
            password = None
        method = "password"
        if wanted_db == TOKEN_USER:  # AUTH token.ORG <jwt-or-api-key>, as for Postgres: on TLS unless allowed
            if not isinstance(self.stream, trio.SSLStream) and not self.settings.token_login_plaintext:
                return codec.error(f'ERR O7s: token logins (user "{TOKEN_USER}.ORG") need TLS (rediss://)')
            wanted_db = ""
            method = "apikey" if password and looks_like_key(password) else "jwt"
            try:
                ok = password is not None and await self._token_ok(method, password, org, login)
            except ControlPlaneDown:
                return codec.error("ERR O7s cannot reach its control plane to authenticate you; try again shortly")
        else:
            ok = password is not None and await trio.to_thread.run_sync(
                check_password, login.verifier if login else None, password)
        if not ok or login is None:
            server.metrics.auth_failures += 1
            server.usage.auth_failure(org)
            server.usage.audit.login(False, org, user, address, method)
            with trio.CancelScope(shield=True):
                trip = await guard.failed(org, address)
                if trip is not None:
                    server.metrics.login_blocks += 1
                    audit_trip(server, trip)
            return WRONGPASS
        server.usage.audit.login(True, login.name, user, address, method, login.org_id)
        if self.login is not None:  # a second AUTH on a logged-in connection: same org only
            return self.core.logged_in(step, login.name, self.core.ns)  # type: ignore[arg-type]
        try:
            dbs = await server.catalog.redis_databases(login.org_id)
        except Exception:
            log.exception("control plane lookup failed", extra={"org": org})
            return codec.error("ERR O7s cannot reach its control plane; try again shortly")
        if not dbs:
            return codec.error(f'ERR O7s: org "{login.name}" has no Redis database (o7s org add-db ... --type redis)')
        db_name, target = next(((n, t) for n, t in dbs if n == wanted_db), dbs[0])
        try:
            self.ticket = await server.limits.open_connection(login.org_id, login.name, login.limits)
        except LimitError as exc:
            server.usage.audit.connection_refused(login.name, login.org_id, login.tier)
            await self._write(codec.error(f"ERR O7s: {exc.message}. {exc.hint or ''}".strip()))
            raise _Stop from None
        try:
            self.org = await server.redis_pools.org(login.org_id, db_name, target, key_prefix(login.org_id))
        except RedisBackendError as e:
            self.ticket.release()
            self.ticket = None
            return error_reply(f'could not connect to database "{db_name}": {e.reason}')
        self.login, self.db_name = login, db_name
        self.bucket = server.limits.bucket(login.org_id, login.name, login.limits)
        self.counters = server.metrics.org(login.name, login.tier, "redis", login.org_id)
        self.counters.connection_opened()
        self.core.scripts = self.org.acl
        self.parser.set_limits(codec.MAX_ARGS, min(codec.MAX_BULK, self.settings.max_message_size))
        log.info("redis client logged in", extra={"org": login.name, "db": db_name})
        return self.core.logged_in(step, login.name, Namespace(self.org.prefix, target.db))
