"""The trio server of one worker: listeners, sessions, pools, and cancel routing."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from o7s_cluster import logs
from o7s_cluster.catalog import OrgLogin, TrioCatalog
from o7s_cluster.config import Settings
from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pool import Pool, PoolManager, PoolSettings
from o7s_cluster.session import ClientError, Session
from o7s_cluster.vault import Vault

log = logging.getLogger("o7s.server")


class Server:
    """State shared by the sessions of one worker."""

    def __init__(self, settings: Settings, catalog: TrioCatalog, nursery: trio.Nursery) -> None:
        self.settings = settings
        self.catalog = catalog
        self.nursery = nursery
        self.pools = PoolManager(PoolSettings(
            connect_timeout=settings.server_connect_timeout,
            acquire_timeout=settings.pool_timeout,
            idle_timeout=settings.server_idle_timeout,
        ))
        self.tls_context = _tls_context(settings)
        # Keys the mock SCRAM exchange for unknown orgs; random per process is enough.
        self.mock_secret = secrets.token_bytes(32)
        self.sessions: dict[int, Session] = {}
        self._next_pid = 0

    # --- sessions ------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        await Session(self, stream, peer).run()

    def register(self, session: Session) -> tuple[int, int]:
        """A BackendKeyData of O7s's own for this session (the backend's never leaves O7s)."""
        for _ in range(1 << 20):
            self._next_pid = (self._next_pid + 1) & 0x3FFFFFFF or 1
            if self._next_pid not in self.sessions:
                break
        pid = self._next_pid
        self.sessions[pid] = session
        return pid, int.from_bytes(os.urandom(4), "big", signed=True)

    def unregister(self, session: Session) -> None:
        if session.pid and self.sessions.get(session.pid) is session:
            del self.sessions[session.pid]

    def cancel(self, pid: int, secret: int) -> None:
        session = self.sessions.get(pid)
        if session is not None and hmac.compare_digest(secret.to_bytes(4, "big", signed=True),
                                                      session.secret.to_bytes(4, "big", signed=True)):
            session.cancel()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.nursery.start_soon(fn, *args)

    # --- pools ---------------------------------------------------------------------------------

    async def pool_for(self, login: OrgLogin, db_name: str) -> Pool:
        key = (login.org_id, db_name)
        pool = self.pools.get(key)
        if pool is not None:
            return pool
        try:
            found = await self.catalog.backend(login.org_id, db_name)
        except Exception:
            log.exception("control plane lookup failed", extra={"org": login.name})
            raise ClientError(codes.CONTROL_PLANE_UNAVAILABLE,
                              "O7s cannot reach its control plane; try again shortly") from None
        if found is None:
            raise ClientError(codes.INVALID_CATALOG_NAME, f"database \"{db_name}\" does not exist")
        target, _db_type = found
        limits = login.limits
        tier_settings = {"statement_timeout": str(limits.statement_timeout_ms), "work_mem": limits.work_mem}
        return self.pools.add(key, Pool(db_name, target, limits.pool_size, self.pools.settings, tier_settings))


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def serve(settings: Settings, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
    assert settings.platform_dsn and settings.secret_key
    catalog = TrioCatalog(settings.platform_dsn, Vault(settings.secret_key), ttl=settings.catalog_ttl)
    await catalog.check_key()
    listeners = await trio.open_tcp_listeners(settings.listen_port, host=settings.listen_host, backlog=4096)
    try:
        async with trio.open_nursery() as nursery:
            server = Server(settings, catalog, nursery)
            nursery.start_soon(server.pools.run_reaper)
            nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
            log.info("listening", extra={"listen": settings.listen, "pool_mode": settings.pool_mode})
            task_status.started(listeners)
            await trio.serve_listeners(server.handle, listeners, handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            await server.pools.close()
        catalog.close()


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            scope.cancel()
            return


def run(settings: Settings) -> None:
    logs.setup(settings.log_level)
    trio.run(serve, settings)
