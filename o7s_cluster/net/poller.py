"""One epoll set for the worker's busiest sockets, read by one task: no task switch per message.

Waiting on a socket with `trio.lowlevel.wait_readable` costs an `epoll_ctl` (trio arms each fd for
one event) and a trip through trio's scheduler for every message that arrives: on a proxy that moves
small messages, that is most of what a relay costs. Here each socket is registered once, level-
triggered; one task waits until the set is ready and calls each ready socket's handler right there,
synchronously. A handler does what it can without waiting (read, feed the session core, send what
the kernel takes) and, when something must wait, pauses its socket here and hands the rest to its own
task (which reads the socket itself until it resumes it here).

Every ready socket's handler runs once per pass, and the task waits for the set again before the next
pass: other tasks run in between, and a socket with more to read is simply ready again.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

MAX_EVENTS = 256  # ready sockets handled per pass
log = logging.getLogger("o7s.poller")
Handler = Callable[[], None]


class Poller:
    """File descriptors registered with a handler each; `run`, started in `nursery` at the first
    `add`, calls them. A handler never raises: what goes wrong is its socket's business."""

    __slots__ = ("_ep", "_handlers", "_nursery", "_running")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._nursery = nursery
        self._running = False

    def add(self, fd: int, handler: Handler) -> None:
        if self._ep.closed:
            raise RuntimeError("the worker's poller has ended (shutting down)")
        self._handlers[fd] = handler
        self._ep.register(fd, select.EPOLLIN)
        if not self._running:
            self._running = True
            self._nursery.start_soon(self.run)

    def pause(self, fd: int) -> None:
        """Stop calling the handler (its own task goes on with the socket) until `resume`."""
        if not self._ep.closed:  # else the worker is shutting down: nothing is called any more
            self._ep.modify(fd, 0)

    def resume(self, fd: int) -> None:
        if not self._ep.closed:
            self._ep.modify(fd, select.EPOLLIN)

    def remove(self, fd: int, handler: Handler) -> None:
        """Forget `fd` if `handler` is still its handler; call it before the socket is closed (a closed
        descriptor's number is soon another socket's)."""
        if self._handlers.get(fd) == handler:
            del self._handlers[fd]
            if self._ep.closed:  # the poller ended first (its nursery is shutting down)
                return
            try:
                self._ep.unregister(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._handlers)

    async def run(self) -> None:
        ep = self._ep
        handlers = self._handlers
        fd = ep.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                for ready, _ in ep.poll(0, MAX_EVENTS):
                    handler = handlers.get(ready)
                    if handler is not None:
                        try:
                            handler()
                        except Exception:  # a bug costs that socket, never the worker's poller
                            log.exception("socket handler failed")
                            self.pause(ready)
        finally:
            ep.close()
