"""The state of one worker: its sessions, pools, cancel routing, memory budgets and drain."""

from __future__ import annotations

import logging
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from o7s_cluster.admin.metrics import WorkerMetrics
from o7s_cluster.auth.jwks import KeySet
from o7s_cluster.auth.tokens import JWTPolicy, JWTVerifier
from o7s_cluster.config import Settings
from o7s_cluster.control_plane.catalog import OrgLogin, TrioCatalog
from o7s_cluster.limits.logins import policy_from
from o7s_cluster.net.budget import InputBudget, PreAuthBudget
from o7s_cluster.net.poller import Poller
from o7s_cluster.net.pool import Pool, PoolManager, PoolSettings
from o7s_cluster.net.resp_backend import RedisPools
from o7s_cluster.pgwire import errors as codes
from o7s_cluster.pgwire.errors import ClientError
from o7s_cluster.pgwire.scram import tls_server_end_point
from o7s_cluster.worker.affinity import key_secret, key_worker, session_pid

if TYPE_CHECKING:
    from o7s_cluster.limits.service import Limits
    from o7s_cluster.usage.recorder import UsageRecorder
    from o7s_cluster.worker.router import Router


class Session(Protocol):
    """What the worker needs of a session (o7s_cluster.net.session.ClientSession)."""

    pid: int
    secret: int

    async def run(self) -> None: ...

    def drain(self) -> None: ...

    def cancel(self) -> None: ...

log = logging.getLogger("o7s.server")


class Server:
    """State shared by the sessions of one worker."""

    # Set by an engine that spans machines (engine_ray): fn(machine, pid, secret), must not block.
    remote_cancel: Callable[[int, int, int], None] | None = None

    def __init__(self, settings: Settings, catalog: TrioCatalog, nursery: trio.Nursery, *, limits: Limits,
                 usage: UsageRecorder, worker_index: int = 0, router: Router | None = None) -> None:
        self.limits = limits
        self.usage = usage
        self.settings = settings
        self.worker_index = worker_index
        self.router = router
        self.all_sessions: set[Session] = set()
        self.draining = False
        self.metrics = WorkerMetrics(worker_index, os.getpid(), book=usage.book)
        self.metrics.pool_state = self._pool_state
        self.catalog = catalog
        self.nursery = nursery
        self.poller = Poller(nursery)  # reads the backends' plain sockets (net.poller)
        self.pools = PoolManager(PoolSettings(
            connect_timeout=settings.server_connect_timeout,
            acquire_timeout=settings.pool_timeout,
            idle_timeout=settings.server_idle_timeout,
        ))
        self.redis_pools = RedisPools(secret_key=settings.secret_key, connect_timeout=settings.server_connect_timeout,
                                      acquire_timeout=settings.pool_timeout, idle_timeout=settings.server_idle_timeout)
        self.tls_context = _tls_context(settings)
        self.tls_end_point = _tls_end_point(settings)  # SCRAM-SHA-256-PLUS binds to this certificate
        # Keys the mock SCRAM exchange for unknown orgs; random per process is enough.
        self.mock_secret = secrets.token_bytes(32)
        self.sessions: dict[tuple[int, int], Session] = {}  # by the BackendKeyData O7s gave them
        self._next_pid = 0
        self.preauth = PreAuthBudget(settings.preauth_budget)
        self.jwks = KeySet(_jwks_sources(settings), settings.jwks_refresh)  # kept current by jwks.run()
        self.jwt = JWTVerifier(JWTPolicy.from_settings(settings), self.jwks)
        self.input_budget = InputBudget(settings.input_budget)

    # --- sessions ------------------------------------------------------------------------------

    def reload(self, settings: Settings) -> None:
        """SIGHUP: timeouts, TLS certificate and log level take effect now; the listen address and
        the worker count are the supervisor's (the address needs a restart)."""
        self.settings = settings
        ps = self.pools.settings
        ps.connect_timeout = settings.server_connect_timeout
        ps.acquire_timeout = settings.pool_timeout
        ps.idle_timeout = settings.server_idle_timeout
        try:
            self.tls_context, self.tls_end_point = _tls_context(settings), _tls_end_point(settings)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate reload failed; keeping the old one", extra={"error": str(exc)})
        self.limits.logins.set_policy(policy_from(settings))
        self.jwt.policy = JWTPolicy.from_settings(settings)
        self.jwks.reload(_jwks_sources(settings), settings.jwks_refresh)
        logging.getLogger().setLevel(settings.log_level.upper())
        self.catalog.invalidate()
        log.info("configuration reloaded")

    def _pool_state(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for pool in self.pools.pools.values():
            o = out.setdefault(pool.org_name, {"pool_in_use": 0, "pool_idle": 0, "pool_waiting": 0})
            o["pool_in_use"] += pool.in_use
            o["pool_idle"] += pool.idle
            o["pool_waiting"] += pool.waiting
        return out

    async def run_session(self, session: Session) -> None:
        if self.draining:
            session.drain()
        self.all_sessions.add(session)
        try:
            await session.run()
        finally:
            self.all_sessions.discard(session)

    def drain(self) -> None:
        """Every session ends at its next transaction boundary (idle ones now)."""
        self.draining = True
        for session in list(self.all_sessions):
            session.drain()

    def register(self, session: Any, backend_pid: int | None) -> tuple[int, int]:
        """A BackendKeyData for this session. Its secret names this machine and worker (so a cancel
        reaching any of them finds the session); its pid is the backend's own when the session keeps
        one backend (session mode), else one no PostgreSQL process can have."""
        while True:
            secret = key_secret(self.settings.machine_id, self.worker_index, secrets.randbits(32))
            if backend_pid is not None:
                pid = backend_pid
            else:
                self._next_pid += 1
                pid = session_pid(self.settings.machine_id, self.worker_index, self._next_pid)
            if (pid, secret) not in self.sessions:
                break
        self.sessions[(pid, secret)] = session
        return pid, secret

    def unregister(self, session: Any) -> None:
        key = (session.pid, session.secret)
        if session.pid and self.sessions.get(key) is session:
            del self.sessions[key]

    def cancel(self, pid: int, secret: int) -> None:
        machine, worker = key_worker(secret)
        if machine != self.settings.machine_id:  # another machine's key: its engine forwards it, if it can
            if self.remote_cancel is not None:
                self.remote_cancel(machine, pid, secret)
                self.metrics.cancels_forwarded += 1
            return
        if worker != self.worker_index and self.router is not None:
            self.router.forward_cancel(worker, pid, secret)
            self.metrics.cancels_forwarded += 1
            return
        session = self.sessions.get((pid, secret))
        if session is not None:
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
        target, db_type = found
        limits = login.limits
        tier_settings = {"statement_timeout": str(limits.statement_timeout_ms), "work_mem": limits.work_mem}
        return self.pools.add(key, Pool(db_name, target, limits.pool_size, self.pools.settings, tier_settings,
                                        org_name=login.name, db_type=db_type, nursery=self.nursery,
                                        poller=self.poller))


def _jwks_sources(settings: Settings) -> list[str]:
    return [src for src in (settings.jwks_file, settings.jwks_url) if src]


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_end_point(settings: Settings) -> bytes | None:
    """tls-server-end-point channel binding data of the certificate clients see: the first one of the file,
    computed once per TLS context (None without TLS, or for a certificate whose signature has no hash)."""
    if not settings.tls_cert:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    with open(settings.tls_cert, "rb") as f:
        cert = x509.load_pem_x509_certificates(f.read())[0]
    return tls_server_end_point(cert.public_bytes(Encoding.DER))
