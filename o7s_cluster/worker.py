"""A worker process: listens on the shared port (SO_REUSEPORT), hands each org to its home worker.

Any worker may accept a connection. Once the startup packet names the org (or the TLS ClientHello's
SNI does), the connection goes to the org's home worker: the raw socket and the bytes already read
travel over a Unix datagram socket with SCM_RIGHTS. Cancel requests travel the same way to the
worker named in their key. The supervisor tells every worker who the live members are.
"""

from __future__ import annotations

import array
import logging
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import orjson
import trio

from o7s_cluster import logs
from o7s_cluster.affinity import home_worker
from o7s_cluster.cancelbus import CancelBus
from o7s_cluster.control_plane.catalog import TrioCatalog
from o7s_cluster.config import Settings
from o7s_cluster.limits import Limits, worker_key
from o7s_cluster.usage import UsageRecorder
from o7s_cluster.admin.metrics import WorkerMetrics
from o7s_cluster.server import Server
from o7s_cluster.session import Session
from o7s_cluster.control_plane.vault import Vault

log = logging.getLogger("o7s.worker")

_HANDOFF, _CANCEL = b"H", b"C"
_MAX_DATAGRAM = 64 * 1024


def worker_socket_path(run_dir: str, index: int) -> str:
    return str(Path(run_dir) / f"w{index}.sock")


def supervisor_socket_path(run_dir: str) -> str:
    return str(Path(run_dir) / "supervisor.sock")


class Router:
    """Org affinity and the hand-off channel between the workers of one machine."""

    def __init__(self, index: int, run_dir: str) -> None:
        self.index = index
        self.run_dir = run_dir
        self.members: list[int] = [index]
        self.sock: trio.socket.SocketType = None  # type: ignore[assignment]
        self.metrics: WorkerMetrics | None = None
        self.send_lock = trio.Lock()

    async def bind(self) -> None:
        path = worker_socket_path(self.run_dir, self.index)
        if os.path.exists(path):
            os.unlink(path)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await self.sock.bind(path)

    def home(self, org: str) -> int:
        home = home_worker(org, self.members)
        return self.index if home is None else home

    async def hand_off(self, org: str, stream: trio.abc.Stream, preread: bytes, *, tls_pending: bool = False) -> bool:
        """Give the client connection to the org's home worker; False: serve it here."""
        home = self.home(org)
        if home == self.index or not isinstance(stream, trio.SocketStream):
            return False
        payload = _HANDOFF + (b"\x01" if tls_pending else b"\x00") + preread
        fds = array.array("i", [stream.socket.fileno()])
        try:
            # One sender at a time: a burst can fill the receiver's datagram queue, and trio lets only
            # one task wait on a socket.
            async with self.send_lock:
                await self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0,
                                        worker_socket_path(self.run_dir, home))
        except OSError as exc:  # the home worker is gone or restarting: serve here
            log.warning("hand-off failed; serving locally", extra={"org": org, "to": home, "error": str(exc)})
            return False
        if self.metrics is not None:
            self.metrics.handoffs_out += 1
        return True

    def forward_cancel(self, worker: int, pid: int, secret: int) -> None:
        """Best effort, like PostgreSQL's own cancel: never blocks the caller."""
        try:
            self.sock._sock.sendto(_CANCEL + struct.pack("!ii", pid, secret),  # type: ignore[attr-defined]
                                   worker_socket_path(self.run_dir, worker))
        except OSError:
            pass

    async def receive(self, server: Server) -> None:
        while True:
            data, ancdata, _flags, _addr = await self.sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(4))
            fds = [fd for level, kind, raw in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
            if data[:1] == _CANCEL and len(data) == 9:
                pid, secret = struct.unpack("!ii", data[1:])
                server.cancel(pid, secret)
            elif data[:1] == _HANDOFF and len(fds) == 1 and len(data) >= 2:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fds[0])))
                session = Session(server, stream, _peer(stream), preread=bytes(data[2:]),
                                  tls_pending=data[1] == 1, handed_off=True)
                server.nursery.start_soon(server.run_session, session)
                continue
            for fd in fds:  # anything malformed: do not leak descriptors
                os.close(fd)


def _peer(stream: trio.SocketStream) -> str:
    try:
        return "%s:%s" % stream.socket.getpeername()[:2]
    except (OSError, TypeError):
        return "?"


def _listen_socket(settings: Settings) -> trio.socket.SocketType:
    infos = socket.getaddrinfo(settings.listen_host, settings.listen_port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    sock.listen(4096)
    sock.setblocking(False)
    return trio.socket.from_stdlib_socket(sock)


class Worker:
    def __init__(self, settings: Settings, index: int, run_dir: str) -> None:
        self.settings = settings
        self.index = index
        self.run_dir = run_dir
        self.router = Router(index, run_dir)
        self.accepting = trio.CancelScope()
        self.server: Server | None = None
        self.retiring = False
        self.stopping = trio.Event()

    async def run(self) -> None:
        settings = self.settings
        catalog = TrioCatalog(settings.platform_dsn or "", Vault(settings.secret_key), ttl=settings.catalog_ttl)
        worker_id = f"m{settings.machine_id}-w{self.index}"
        limits = Limits(settings, worker_key=worker_key(settings.machine_id, self.index, os.getpid()))
        limits.on_invalidate(catalog.invalidate)
        usage = UsageRecorder(settings, worker=worker_id)
        listen_sock = _listen_socket(settings)
        await self.router.bind()
        try:
            async with trio.open_nursery() as nursery:
                self.server = server = Server(settings, catalog, nursery, limits=limits, usage=usage,
                                              worker_index=self.index, router=self.router)
                self.router.metrics = server.metrics
                usage.metrics = server.metrics
                await nursery.start(limits.run)
                nursery.start_soon(usage.run)
                if settings.redis_url and server.remote_cancel is None:
                    bus = CancelBus(settings.redis_url, server)
                    server.remote_cancel = bus.publish
                    nursery.start_soon(bus.run)
                nursery.start_soon(server.pools.run_reaper)
                nursery.start_soon(self.router.receive, server)
                nursery.start_soon(self._signals)
                control = await trio.open_unix_socket(supervisor_socket_path(self.run_dir))
                await control.send_all(orjson.dumps({"hello": self.index, "pid": os.getpid()}) + b"\n")
                nursery.start_soon(self._control, control)
                log.info("worker up", extra={"listen": settings.listen})
                with self.accepting:
                    await trio.serve_listeners(server.handle, [trio.SocketListener(listen_sock)],
                                               handler_nursery=nursery)
                listen_sock.close()
                await self._drain(server)
                with trio.move_on_after(10):
                    await usage.flush()  # the last window is in the spool before we exit
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self.server is not None:
                    await self.server.pools.close()
            catalog.close()
            try:
                os.unlink(worker_socket_path(self.run_dir, self.index))
            except OSError:
                pass

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
