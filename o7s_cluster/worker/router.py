"""Org affinity between the workers of one machine: hand-off of client sockets, and cancel forwarding.

Any worker may accept a connection. Once the startup packet names the org (or the TLS ClientHello's
SNI does), the connection goes to the org's home worker: the raw socket and the bytes already read
travel over a Unix datagram socket with SCM_RIGHTS. Cancel requests travel the same way to the
worker named in their key. The supervisor tells every worker who the live members are.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from o7s_cluster.admin.metrics import WorkerMetrics
from o7s_cluster.worker.affinity import home_worker



class CancelTarget(Protocol):
    """The worker's sessions, as far as a forwarded cancel is concerned (worker.server.Server)."""

    def cancel(self, pid: int, secret: int) -> None: ...


log = logging.getLogger("o7s.router")


def worker_socket_path(run_dir: str, index: int) -> str:
    return str(Path(run_dir) / f"w{index}.sock")


def supervisor_socket_path(run_dir: str) -> str:
    return str(Path(run_dir) / "supervisor.sock")


_HANDOFF, _CANCEL = b"H", b"C"
_MAX_DATAGRAM = 64 * 1024


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

    async def hand_off(self, org: str, sock: socket.socket, preread: bytes, *, tls_pending: bool = False) -> bool:
        """Give the client connection to the org's home worker; False: serve it here."""
        home = self.home(org)
        if home == self.index:
            return False
        payload = _HANDOFF + (b"\x01" if tls_pending else b"\x00") + preread
        fds = array.array("i", [sock.fileno()])
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

    async def receive(self, server: CancelTarget, serve: Callable[[socket.socket, bytes, bool], None]) -> None:
        """Cancels for this worker's sessions, and connections handed to it (given to `serve`)."""
        while True:
            data, ancdata, _flags, _addr = await self.sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(4))
            fds = [fd for level, kind, raw in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
            if data[:1] == _CANCEL and len(data) == 9:
                pid, secret = struct.unpack("!ii", data[1:])
                server.cancel(pid, secret)
            elif data[:1] == _HANDOFF and len(fds) == 1 and len(data) >= 2:
                serve(socket.socket(fileno=fds[0]), bytes(data[2:]), data[1] == 1)
                continue
            for fd in fds:  # anything malformed: do not leak descriptors
                os.close(fd)
