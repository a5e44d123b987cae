"""A relay that parses nothing: the floor for a proxy written on trio (`python -m loadtest pgbench`).

It accepts TCP connections and, for each client, opens one connection to the backend and copies
bytes both ways, one task per direction. It is 1:1, not pooled: every client gets its own backend
connection, so it does none of a pooler's work; what it costs per transaction is what moving the
bytes through trio costs at the least. It is written the way issue 10 says the lean shell must be:
raw non-blocking sockets from `trio.lowlevel`, `recv_into` a buffer allocated once per direction,
`send` first, and `wait_readable` / `wait_writable` only after `BlockingIOError`; TCP_NODELAY on
both sides.

    python loadtest/bare_relay.py --listen 127.0.0.1:7000 --backend 127.0.0.1:5432 [--poller]

With `--poller` (the `poll-relay` target) it reads every socket through O7s's own worker poller
(`o7s_cluster.net.poller`: one epoll set, each socket registered once, one task calling handlers),
which O7s itself uses for plain sockets: the floor for a relay built the way O7s now is, so that
"O7s ÷ relay" compares like with like. A send the kernel does not take at once is finished by the
connection's own task, while its source socket is paused.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from collections.abc import Callable

import trio

from o7s_cluster.net.poller import Poller

BUFFER_SIZE = 64 * 1024     # bytes per direction per connection, allocated once
FAIR_STREAK = 32            # reads in a row without waiting before yielding to other tasks
LISTEN_BACKLOG = 4096
ACCEPT_ERROR_PAUSE = 0.05   # seconds to back off when accept fails (out of file descriptors)


def _nodelay(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _send_all(sock: socket.socket, data: memoryview) -> None:
    """Send first; wait for the socket to drain only when the kernel says it would block."""
    while data:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        data = data[sent:]


async def _pump(src: socket.socket, dst: socket.socket, scope: trio.CancelScope) -> None:
    """Copy src to dst until src's end of file, then half-close dst. An error ends both ways."""
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    streak = 0
    try:
        while True:
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                streak = 0
                await trio.lowlevel.wait_readable(src)
                continue
            if n == 0:
                break
            await _send_all(dst, view[:n])
            streak += 1
            if streak >= FAIR_STREAK:
                # a peer that always has more to send must not starve the other connections
                streak = 0
                await trio.lowlevel.checkpoint()
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            scope.cancel()
    except OSError:
        scope.cancel()


async def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _nodelay(sock)
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


async def _backend_for(client: socket.socket, backend_addr: tuple[str, int]) -> socket.socket | None:
    """The client's own backend connection; None (and the client closed) when it cannot be had."""
    try:
        return await _connect(backend_addr)
    except OSError as ex:
        print(f"bare_relay: backend connect failed: {ex}", file=sys.stderr, flush=True)
        _close(client)
        return None


async def _serve_client(client: socket.socket, backend_addr: tuple[str, int]) -> None:
    if (backend := await _backend_for(client, backend_addr)) is None:
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, backend, nursery.cancel_scope)
            nursery.start_soon(_pump, backend, client, nursery.cancel_scope)
    finally:
        _close(client)
        _close(backend)


async def _serve_client_polled(client: socket.socket, backend_addr: tuple[str, int], poller: Poller) -> None:
    if (backend := await _backend_for(client, backend_addr)) is None:
        return
    lot = trio.lowlevel.ParkingLot()
    rests: list[tuple[socket.socket, socket.socket, memoryview]] = []  # sends to finish, by the task
    ended = False

    def handler(src: socket.socket, dst: socket.socket) -> Callable[[], None]:
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        fd = src.fileno()

        def on_readable() -> None:
            nonlocal ended
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            sent = 0
            if n:
                try:
                    sent = dst.send(view[:n])
                except BlockingIOError:
                    pass
                except OSError:
                    n = 0
            if n == 0:
                ended = True
            elif sent == n:
                return
            else:
                poller.pause(fd)  # buf holds the rest until the task has sent it
                rests.append((src, dst, view[sent:n]))
            lot.unpark_all()
        return on_readable

    on_client, on_backend = handler(client, backend), handler(backend, client)
    poller.add(client.fileno(), on_client)
    poller.add(backend.fileno(), on_backend)
    try:
        while not ended:
            if not rests:
                await lot.park()
                continue
            src, dst, rest = rests.pop()
            await _send_all(dst, rest)
            poller.resume(src.fileno())
    except OSError:
        pass
    finally:
        poller.remove(client.fileno(), on_client)
        poller.remove(backend.fileno(), on_backend)
        _close(client)
        _close(backend)


async def serve(listen: tuple[str, int], backend: tuple[str, int], polled: bool = False) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(listen)
    ls.listen(LISTEN_BACKLOG)
    ls.setblocking(False)
    print(f"bare_relay: listening on {listen[0]}:{listen[1]}, backend {backend[0]}:{backend[1]}", flush=True)
    async with trio.open_nursery() as nursery:
        poller = Poller(nursery) if polled else None
        while True:
            try:
                client, _ = ls.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(ls)
                continue
            except OSError as ex:
                print(f"bare_relay: accept failed: {ex}", file=sys.stderr, flush=True)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            _nodelay(client)
            if poller is not None:
                nursery.start_soon(_serve_client_polled, client, backend, poller)
            else:
                nursery.start_soon(_serve_client, client, backend)


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=_addr, required=True, help="HOST:PORT to accept clients on")
    ap.add_argument("--backend", type=_addr, required=True, help="HOST:PORT of the server to relay to")
    ap.add_argument("--poller", action="store_true", help="read the sockets through O7s's worker poller")
    a = ap.parse_args(argv)
    try:
        trio.run(serve, a.listen, a.backend, a.poller)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
