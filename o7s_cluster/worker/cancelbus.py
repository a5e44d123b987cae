"""Cancel requests between machines that share a Redis (the local engine's path; Ray forwards itself).

A CancelRequest opens a new connection, so behind a load balancer it may reach another O7s instance
than the session it cancels. The key O7s handed out names its machine; the worker that receives a key
of another machine publishes it on that machine's channel, and the machine's workers (each listening)
let the one the key names cancel. Fire and forget, like PostgreSQL's own cancel.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import TYPE_CHECKING

import trio

from o7s_cluster import redisconn
from o7s_cluster.worker.affinity import key_worker

if TYPE_CHECKING:
    from o7s_cluster.worker.server import Server

log = logging.getLogger("o7s.cancelbus")
_KEY = struct.Struct("!ii")


def channel(machine: int) -> str:
    return f"o7s:cancel:{machine}"


class CancelBus:
    def __init__(self, url: str, server: Server) -> None:
        self.url = url
        self.server = server
        self.machine = server.settings.machine_id
        self.client = redisconn.client(url, timeout=1.0)

    def publish(self, machine: int, pid: int, secret: int) -> None:
        """Server.remote_cancel: never blocks the session that received the request."""
        self.server.spawn(trio.to_thread.run_sync, self._publish, machine, pid, secret)

    def _publish(self, machine: int, pid: int, secret: int) -> None:
        try:
            self.client.publish(channel(machine), _KEY.pack(pid, secret))
        except redisconn.REDIS_ERRORS as exc:
            log.warning("cancel not forwarded: Redis unreachable", extra={"error": str(exc)})

    def _deliver(self, data: bytes) -> None:
        if len(data) != _KEY.size:
            return
        pid, secret = _KEY.unpack(data)
        machine, worker = key_worker(secret)
        if machine == self.machine and worker == self.server.worker_index:
            self.server.cancel(pid, secret)

    async def run(self) -> None:
        """Listen on this machine's channel (in a thread), reconnecting with back-off."""
        stop = threading.Event()
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._listen, stop, token, abandon_on_cancel=True)
        finally:
            stop.set()

    def _listen(self, stop: threading.Event, token: trio.lowlevel.TrioToken) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                conn = redisconn.client(self.url, timeout=1.0)
                pubsub = conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel(self.machine))
                delay = 0.2
                while not stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        trio.from_thread.run_sync(self._deliver, msg["data"], trio_token=token)
            except redisconn.REDIS_ERRORS:
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except trio.RunFinishedError:
                return
