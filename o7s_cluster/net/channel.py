"""A byte channel over a raw non-blocking socket (or a TLS stream), as cheap as trio allows.

trio's `SocketStream` yields to the scheduler twice per call; a proxy moving small messages pays that
on every one. Here a receive tries the socket first and waits for readiness only after
`BlockingIOError`, into a preallocated buffer; a send tries first too and waits only when the kernel's
buffer is full. A channel yields at least every `_YIELD_EVERY` receives so that one busy peer cannot
starve the other sessions of its worker.
"""

from __future__ import annotations

import socket
import ssl

import trio

RECEIVE_SIZE = 65536
HIGH_WATER = 256 * 1024  # bytes queued for one peer before the task producing more waits
_YIELD_EVERY = 16


class Channel:
    """One peer of a session. `receive` returns b'' at end of stream; `send` empties the buffer it is given."""

    __slots__ = ("sock", "_buf", "_view", "_streak", "_drained")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buf)
        self._streak = 0
        self._drained = False  # the last read emptied the socket

    async def receive(self) -> memoryview | bytes:
        """The next bytes the peer sent (a view valid until the next receive), or b'' at its end."""
        if self._drained:
            # A peer that waits for our answer has sent nothing since the socket was emptied: a recv
            # now would only fail (a system call and an exception), so wait for readiness first. A peer
            # that sends faster than we read fills the buffer, and then the next read comes at once.
            self._drained = False
            self._streak = 0
            await trio.lowlevel.wait_readable(self.sock)
        else:
            self._streak += 1
            if self._streak >= _YIELD_EVERY:
                self._streak = 0
                await trio.lowlevel.checkpoint()
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except (ConnectionResetError, BrokenPipeError):
                return b""
            self._drained = n < RECEIVE_SIZE
            return self._view[:n]

    def receive_now(self) -> memoryview | bytes | None:
        """What the peer sent, without waiting (the poller saw it ready): None when nothing is there
        after all, b'' at its end or on an error."""
        try:
            n = self.sock.recv_into(self._buf)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        return self._view[:n]

    async def send(self, data: bytearray) -> None:
        """Send all of `data`, deleting what went out; bytes appended meanwhile go out too."""
        sock = self.sock
        while data:
            try:
                n = sock.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            del data[:n]

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


class TLSChannel:
    """The same over trio's SSLStream (TLS costs more than the scheduler does)."""

    __slots__ = ("stream", "sock")

    def __init__(self, stream: trio.SSLStream, sock: socket.socket) -> None:
        self.stream = stream
        self.sock = sock

    async def receive(self) -> memoryview | bytes:
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, ssl.SSLError):
            return b""

    async def send(self, data: bytearray) -> None:
        while data:
            chunk = bytes(data)
            data.clear()
            await self.stream.send_all(chunk)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


AnyChannel = Channel | TLSChannel


class Outbox:
    """One direction's send, shared by the session's task and its backend's pump task: whichever finds
    it idle sends everything queued, including what the other adds meanwhile; the other only waits when
    too much is queued."""

    __slots__ = ("busy", "lot")

    def __init__(self) -> None:
        self.busy = False
        self.lot = trio.lowlevel.ParkingLot()

    async def flush(self, channel: AnyChannel, buf: bytearray) -> None:
        if self.busy:
            if len(buf) > HIGH_WATER:
                await self.lot.park()
            return
        self.busy = True
        try:
            await channel.send(buf)
        finally:
            self.busy = False
            if self.lot:
                self.lot.unpark_all()


def send_now(outbox: Outbox, channel: AnyChannel, buf: bytearray) -> bool:
    """Send `buf` from a task that must not wait (a pool's grant): True when the kernel took it all;
    else the caller flushes the rest in a task that may wait."""
    if outbox.busy or type(channel) is not Channel:
        return False
    try:
        n = channel.sock.send(buf)
    except OSError:  # BlockingIOError, or an error the flush reports as it always does
        return False
    del buf[:n]
    return not buf
