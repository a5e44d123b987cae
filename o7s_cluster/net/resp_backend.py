"""Backend connections to Redis for the RESP shell: connecting (TLS, login, database), reading whole
replies, a pool per (org, database, protocol) for plain commands, and the per-org ACL user that
confines every backend connection of an org to its prefix (keys and channels), scripts included."""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from o7s_cluster.control_plane.redis_dsn import RedisTarget
from o7s_cluster.resp import codec
from o7s_cluster.resp.codec import NeedMore, Reply, ReplyError, encode_command, parse_reply, reply_end
from o7s_cluster.resp.namespace import glob_escape

log = logging.getLogger("o7s.redis")
READ_SIZE = 65536
# What the per-org ACL user (the client's scripts) may run: everything but server administration, the
# commands Redis calls dangerous (KEYS, SORT, FLUSH*, ...) and those that list or count names beyond the
# key and channel rules (SCAN, RANDOMKEY, DBSIZE, PUBSUB).
ACL_RULES = (b"+@all", b"-@admin", b"-@dangerous", b"-scan", b"-randomkey", b"-dbsize", b"-pubsub")


class RedisBackendError(Exception):
    """The backend could not be reached or answered wrongly; `reason` holds no secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RedisConn:
    """One connection to a Redis backend."""

    def __init__(self, stream: trio.abc.Stream, proto: int) -> None:
        self.stream = stream
        self.proto = proto
        self.buf = bytearray()
        self.pos = 0
        self.broken = False
        self.idle_since = time.monotonic()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.broken = True
            raise RedisBackendError(f"connection lost ({type(e).__name__})") from None

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.broken = True
            raise RedisBackendError(f"connection lost ({type(e).__name__})") from None
        if not data:
            self.broken = True
            raise RedisBackendError("the server closed the connection")
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos > READ_SIZE:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    async def read_raw(self) -> bytes:
        """The next whole reply as the server sent it."""
        while True:
            try:
                end = reply_end(self.buf, self.pos)
            except NeedMore:
                await self._fill()
                continue
            except ReplyError as e:
                self.broken = True
                raise RedisBackendError(f"malformed reply: {e}") from None
            raw = bytes(self.buf[self.pos:end])
            self.pos = end
            return raw

    async def read(self) -> tuple[Reply, bytes]:
        """The next reply, decoded, and its bytes."""
        while True:
            try:
                r, end = parse_reply(self.buf, self.pos)
            except NeedMore:
                await self._fill()
                continue
            except ReplyError as e:
                self.broken = True
                raise RedisBackendError(f"malformed reply: {e}") from None
            raw = bytes(self.buf[self.pos:end])
            self.pos = end
            return r, raw

    async def call(self, *args: bytes) -> Reply:
        await self.send(encode_command(list(args)))
        r, _ = await self.read()
        return r

    async def aclose(self) -> None:
        self.broken = True
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


def acl_password(secret_key: str | None, org_id: str) -> bytes:
    """The per-org ACL user's password: derived from O7s's secret key, the same on every worker and machine."""
    key = (secret_key or "o7s-no-secret-key").encode()
    return hmac.new(key, b"o7s-redis-acl:" + org_id.encode(), hashlib.sha256).hexdigest().encode()


def acl_setuser(user: bytes, password: bytes, prefix: bytes, db: int) -> list[bytes]:
    pat = glob_escape(prefix)
    return [b"ACL", b"SETUSER", user, b"reset", b"on", b"#" + hashlib.sha256(password).hexdigest().encode(),
            b"~" + pat + b"*", b"&" + pat + b"*", b"&__keyspace@%d__:" % db + pat + b"*", *ACL_RULES]


async def open_conn(target: RedisTarget, proto: int, user: bytes | None, password: bytes | None,
                    timeout: float) -> RedisConn:
    """A logged-in connection on the target's database, speaking `proto`."""
    with trio.move_on_after(timeout) as scope:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(target.host, target.port)
        except OSError as e:
            raise RedisBackendError(f"connection refused or unreachable ({e.strerror or type(e).__name__})") from None
        if target.tls:
            ctx = ssl.create_default_context()
            stream = trio.SSLStream(stream, ctx, server_hostname=target.host)
        conn = RedisConn(stream, proto)
        try:
            hello = [b"HELLO", b"%d" % proto]
            if password is not None:
                hello += [b"AUTH", user or b"default", password]
            r = await conn.call(*hello)
            if r.is_error():
                text = (r.data or b"")[:80].decode("utf-8", "replace")
                raise RedisBackendError("login refused" if text.startswith(("WRONGPASS", "NOPERM")) else
                                        f"HELLO failed: {text}")
            if target.db:
                r = await conn.call(b"SELECT", b"%d" % target.db)
                if r.is_error():
                    raise RedisBackendError(f"database {target.db} is not available")
        except BaseException:
            await conn.aclose()
            raise
        return conn
    assert scope.cancelled_caught
    raise RedisBackendError(f"timeout after {timeout:g} s")


@dataclass
class RedisPool:
    """Idle backend connections of one (org, database, protocol), at most `size` open at once."""

    target: RedisTarget
    proto: int
    size: int
    user: bytes | None
    password: bytes | None
    connect_timeout: float
    acquire_timeout: float
    idle: deque[RedisConn] = field(default_factory=deque)
    open: int = 0
    _waiters: deque[trio.Event] = field(default_factory=deque)

    async def acquire(self) -> RedisConn:
        with trio.move_on_after(self.acquire_timeout):
            while True:
                while self.idle:
                    conn = self.idle.pop()
                    if not conn.broken:
                        return conn
                    self.open -= 1
                if self.open < self.size:
                    self.open += 1
                    try:
                        return await open_conn(self.target, self.proto, self.user, self.password, self.connect_timeout)
                    except BaseException:
                        self.open -= 1
                        raise
                ev = trio.Event()
                self._waiters.append(ev)
                try:
                    await ev.wait()
                except BaseException:
                    if ev in self._waiters:
                        self._waiters.remove(ev)
                    elif ev.is_set():
                        self._wake()  # woken and leaving: pass the turn on
                    raise
        raise RedisBackendError(f"no backend connection free within {self.acquire_timeout:g} s (pool of {self.size})")

    def release(self, conn: RedisConn) -> None:
        if conn.broken or conn.pos != len(conn.buf):  # unread bytes: its replies are out of step
            self.open -= 1
            trio.lowlevel.spawn_system_task(conn.aclose)
        else:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()

    async def dedicated(self) -> RedisConn:
        """A connection of the client's own (Pub/Sub), outside the pool's count."""
        return await open_conn(self.target, self.proto, self.user, self.password, self.connect_timeout)

    async def reap(self, idle_timeout: float) -> None:
        now = time.monotonic()
        keep: deque[RedisConn] = deque()
        while self.idle:
            conn = self.idle.popleft()
            if now - conn.idle_since > idle_timeout:
                self.open -= 1
                await conn.aclose()
            else:
                keep.append(conn)
        self.idle = keep

    async def close(self) -> None:
        while self.idle:
            self.open -= 1
            await self.idle.pop().aclose()


@dataclass
class OrgRedis:
    """What one worker knows of an org's Redis database: its pools per protocol and its ACL user."""

    target: RedisTarget
    prefix: bytes
    user: bytes | None = None
    password: bytes | None = None
    acl: bool = False  # the per-org ACL user exists (scripts are allowed only then)
    pools: dict[tuple[int, bool], RedisPool] = field(default_factory=dict)


class RedisPools:
    """Every org's Redis pools in this worker."""

    def __init__(self, *, secret_key: str | None, connect_timeout: float, acquire_timeout: float,
                 idle_timeout: float) -> None:
        self.secret_key = secret_key
        self.connect_timeout = connect_timeout
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self.orgs: dict[tuple[str, str], OrgRedis] = {}
        self._setup: dict[tuple[str, str], trio.Lock] = {}

    async def org(self, org_id: str, db_name: str, target: RedisTarget, prefix: bytes) -> OrgRedis:
        """The org's database state, creating its ACL user on the backend the first time."""
        key = (org_id, db_name)
        got = self.orgs.get(key)
        if got is not None and got.target == target:
            return got
        lock = self._setup.setdefault(key, trio.Lock())
        async with lock:
            got = self.orgs.get(key)
            if got is not None and got.target == target:
                return got
            org = OrgRedis(target, prefix)
            user = b"o7s-" + org_id.encode()
            password = acl_password(self.secret_key, org_id)
            conn = await open_conn(target, 2, target.username.encode() if target.username else None,
                                   target.password.encode() if target.password is not None else None,
                                   self.connect_timeout)
            try:
                r = await conn.call(*acl_setuser(user, password, prefix, target.db))
            finally:
                await conn.aclose()
            if r.is_error():
                log.warning("redis: no per-org ACL user (scripts refused for this org)",
                            extra={"org_id": org_id, "error": (r.data or b"")[:120].decode("utf-8", "replace")})
            else:
                org.user, org.password, org.acl = user, password, True
            self.orgs[key] = org
            return org

    def pool(self, org: OrgRedis, proto: int, size: int, script: bool = False) -> RedisPool:
        """The pool for plain commands (the registered URL's credentials) or for the client's scripts
        (the org's ACL user)."""
        key = (proto, script)
        p = org.pools.get(key)
        if p is None:
            t = org.target
            user, password = (org.user, org.password) if script else (
                t.username.encode() if t.username else None, t.password.encode() if t.password is not None else None)
            p = org.pools[key] = RedisPool(t, proto, size, user, password, self.connect_timeout, self.acquire_timeout)
        p.size = size
        return p

    async def run_reaper(self) -> None:
        while True:
            await trio.sleep(max(1.0, min(30.0, self.idle_timeout / 4)))
            for org in list(self.orgs.values()):
                for p in list(org.pools.values()):
                    await p.reap(self.idle_timeout)

    async def close(self) -> None:
        for org in self.orgs.values():
            for p in org.pools.values():
                await p.close()


def error_reply(what: str) -> bytes:
    return codec.error(f"ERR O7s: {what}")
