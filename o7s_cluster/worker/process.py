"""A worker process: accepts on the shared port (SO_REUSEPORT) and serves its orgs' sessions."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from typing import Any

import orjson
import trio

from o7s_cluster import logs
from o7s_cluster.control_plane.catalog import TrioCatalog
from o7s_cluster.config import Settings, parse_listen
from o7s_cluster.limits.keys import worker_key
from o7s_cluster.limits.service import Limits
from o7s_cluster.net.resp_session import RespClient
from o7s_cluster.net.session import ClientSession
from o7s_cluster.usage.recorder import UsageRecorder
from o7s_cluster.control_plane.vault import Vault
from o7s_cluster.worker.cancelbus import CancelBus
from o7s_cluster.worker.router import Router, supervisor_socket_path, worker_socket_path
from o7s_cluster.worker.server import Server

log = logging.getLogger("o7s.worker")
# accept() errors that mean "out of resources for now": wait a little, as trio.serve_listeners does.
_ACCEPT_PAUSE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _peer(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except (OSError, TypeError):
        return "?"


# Longest a new worker waits for the members list before it takes clients anyway (the supervisor sends it
# once all its first workers are up, or after its START_GRACE).
MEMBERS_WAIT = 15.0
LISTEN_BACKLOG = 4096


def _listen_socket(settings: Settings, address: tuple[str, int] | None = None) -> socket.socket:
    host, port = address or (settings.listen_host, settings.listen_port)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)  # listen() comes once the worker takes clients: until then the kernel routes none here
    sock.setblocking(False)
    return sock


class Worker:
    def __init__(self, settings: Settings, index: int, run_dir: str) -> None:
        self.settings = settings
        self.index = index
        self.run_dir = run_dir
        self.router = Router(index, run_dir)
        self.accepting = trio.CancelScope()
        self.accepting_redis = trio.CancelScope()
        self.server: Server | None = None
        self.retiring = False
        self.stopping = trio.Event()
        self.members_known = trio.Event()  # the supervisor told us who the machine's workers are

    async def run(self) -> None:
        settings = self.settings
        catalog = TrioCatalog(settings.platform_dsn or "", Vault(settings.secret_key), ttl=settings.catalog_ttl)
        worker_id = f"m{settings.machine_id}-w{self.index}"
        limits = Limits(settings, worker_key=worker_key(settings.machine_id, self.index, os.getpid()))
        limits.on_invalidate(catalog.invalidate)
        usage = UsageRecorder(settings, worker=worker_id)
        listen_sock = _listen_socket(settings)
        redis_sock = _listen_socket(settings, parse_listen(settings.redis_listen)) if settings.redis_listen else None
        await self.router.bind()
        try:
            async with trio.open_nursery() as nursery:
                self.server = server = Server(settings, catalog, nursery, limits=limits, usage=usage,
                                              worker_index=self.index, router=self.router)
                self.router.metrics = server.metrics
                usage.metrics = server.metrics
                usage.tiers = limits.tier_cache.tiers  # upgrade advice names the next tier up
                await nursery.start(limits.run)
                nursery.start_soon(usage.run)
                if settings.redis_url and server.remote_cancel is None:
                    bus = CancelBus(settings.redis_url, server)
                    server.remote_cancel = bus.publish
                    nursery.start_soon(bus.run)
                nursery.start_soon(server.pools.run_reaper)
                nursery.start_soon(server.jwks.run)  # JWT keys: read in the background, never per login
                if redis_sock is not None:
                    nursery.start_soon(server.redis_pools.run_reaper)
                    nursery.start_soon(self._accept_redis, redis_sock, server)
                nursery.start_soon(self.router.receive, server, self._serve_handed)
                nursery.start_soon(self._signals)
                control = await trio.open_unix_socket(supervisor_socket_path(self.run_dir))
                await control.send_all(orjson.dumps({"hello": self.index, "pid": os.getpid()}) + b"\n")
                nursery.start_soon(self._control, control)
                log.info("worker up", extra={"listen": settings.listen})
                with self.accepting:
                    # Each org's home must be known before a first client is served here: a worker that
                    # took itself for the only one would count an org's connections apart from its home's.
                    with trio.move_on_after(MEMBERS_WAIT):
                        await self.members_known.wait()
                    listen_sock.listen(LISTEN_BACKLOG)
                    await self._accept(listen_sock, server)
                trio.lowlevel.notify_closing(listen_sock)
                listen_sock.close()
                await self._drain(server)
                with trio.move_on_after(10):
                    await usage.flush()  # the last window is in the spool before we exit
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self.server is not None:
                    await self.server.pools.close()
                    await self.server.redis_pools.close()
            catalog.close()
            try:
                os.unlink(worker_socket_path(self.run_dir, self.index))
            except OSError:
                pass

    async def _accept(self, listen_sock: socket.socket, server: Server) -> None:
        """Accept connections until cancelled; each one's session runs in the server's nursery."""
        while True:
            try:
                sock, _addr = listen_sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listen_sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRORS:
                    log.warning("accept failed; pausing", extra={"error": str(exc)})
                    await trio.sleep(0.1)
                    continue
                raise
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.nursery.start_soon(server.run_session, ClientSession(server, sock, _peer(sock)))
            await trio.lowlevel.checkpoint()

    async def _accept_redis(self, sock: socket.socket, server: Server) -> None:
        """Redis clients (--redis-listen): served by the worker that accepts them (the org is known only
        after AUTH, so there is no hand-off); TLS only when a certificate is configured."""
        sock.listen(LISTEN_BACKLOG)
        with self.accepting_redis:
            while True:
                try:
                    conn, _addr = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_PAUSE_ERRORS:
                        await trio.sleep(0.1)
                        continue
                    raise
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = _peer(conn)
                stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                if server.tls_context is not None:
                    stream = trio.SSLStream(stream, server.tls_context, server_side=True)
                server.nursery.start_soon(server.run_session, RespClient(server, stream, peer))
                await trio.lowlevel.checkpoint()
        trio.lowlevel.notify_closing(sock)
        sock.close()

    def _serve_handed(self, sock: socket.socket, preread: bytes, tls_pending: bool) -> None:
        """A connection another worker handed to this one, its org's home."""
        assert self.server is not None
        session = ClientSession(self.server, sock, _peer(sock), preread=preread, tls_pending=tls_pending,
                                handed_off=True)
        self.server.nursery.start_soon(self.server.run_session, session)

    async def _drain(self, server: Server) -> None:
        """Sessions end at their next transaction boundary; past the drain timeout, all of them."""
        server.drain()
        log.info("draining", extra={"sessions": len(server.all_sessions)})
        with trio.move_on_after(self.settings.drain_timeout):
            while server.all_sessions:
                await trio.sleep(0.05)
        for session in list(server.all_sessions):
            session.scope.cancel()
        with trio.move_on_after(5):
            while server.all_sessions:
                await trio.sleep(0.05)

    def stop(self) -> None:
        self.accepting.cancel()
        self.accepting_redis.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                log.info("SIGTERM: draining")
                self.stop()

    async def _retire(self) -> None:
        """Scaled away: keep accepting (every new connection is handed to its home elsewhere, so
        none is lost in this socket's queue) until the sessions already here have ended."""
        assert self.server is not None
        while self.server.all_sessions:
            await trio.sleep(0.1)
        self.stop()

    async def _control(self, control: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                chunk = await control.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    reply = await self._command(orjson.loads(line))
                    if reply is not None:
                        await control.send_all(orjson.dumps(reply) + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        log.warning("supervisor gone: draining")
        self.stop()

    async def _command(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        assert self.server is not None
        if "members" in msg:
            self.router.members = [int(m) for m in msg["members"]] or [self.index]
            self.members_known.set()
            return None
        cmd = msg.get("cmd")
        if cmd == "stats":
            self.server.metrics.limits_degraded = int(self.server.limits.degraded)
            snap = self.server.metrics.snapshot()
            snap["retiring"] = self.retiring
            snap["draining"] = self.server.draining
            snap["sessions"] = len(self.server.all_sessions)
            return {"id": msg.get("id"), "stats": snap}
        if cmd == "retire" and not self.retiring:
            self.retiring = True
            self.server.nursery.start_soon(self._retire)
        elif cmd == "drain":
            self.stop()
        elif cmd == "reload":
            self.server.reload(Settings(**msg["settings"]))
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    index, run_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; a terminal's ^C reaches it
    settings = Settings(**orjson.loads(os.environ["O7S_WORKER_SETTINGS"]))
    logs.setup(settings.log_level, worker=index)
    trio.run(Worker(settings, index, run_dir).run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
