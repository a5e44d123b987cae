"""The supervisor: starts the worker processes, restarts the ones that die, drains, scales.

Each worker connects back to the supervisor over a Unix socket (newline-delimited JSON): the
supervisor tells all of them who the live members are (org homes follow), asks them for their
figures (the admin port aggregates them), and tells them to retire or drain.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import psycopg
import trio

from o7s_cluster.worker.affinity import MAX_WORKERS
from o7s_cluster import logs
from o7s_cluster.config import Settings, parse_listen
from o7s_cluster.cluster.ports import PortError, check_ports, port_error
from o7s_cluster.limits.release import release_dead_worker
from o7s_cluster.usage.recorder import UsageRecorder
from o7s_cluster.worker.router import supervisor_socket_path

log = logging.getLogger("o7s.cluster")

MAX_STARTUP_FAILURES = 5  # a worker that dies this many times in a row before serving: give up


class ClusterError(Exception):
    """The cluster cannot run (its workers keep dying at start-up)."""


START_GRACE = 10.0  # s the first workers wait for each other before they take clients anyway


@dataclasses.dataclass
class WorkerHandle:
    index: int
    proc: trio.Process
    started_at: float
    state: str = "starting"  # starting, up, retiring, dead
    stream: trio.SocketStream | None = None
    send_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    waiting: dict[int, Any] = dataclasses.field(default_factory=dict)
    restarts: int = 0
    startup_failures: int = 0  # deaths in a row before ever being up


class Supervisor:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload
        self.target = settings.workers
        self.run_dir = settings.run_dir or tempfile.mkdtemp(prefix="o7s-run-")
        self.handles: dict[int, WorkerHandle] = {}
        self.stopping = False
        self.nursery: trio.Nursery | None = None
        self._request_id = 0
        self._last: dict[int, dict[str, Any]] = {}  # each worker's latest snapshot
        self._stopped = trio.Event()
        self.failure: str | None = None
        self._started = False  # the first workers are all up (or START_GRACE passed): members go out
        # The supervisor's own recorder: it has no usage, only the admin port's audit events.
        self.recorder = UsageRecorder(settings, worker=f"m{settings.machine_id}-supervisor")

    # --- life cycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        path = supervisor_socket_path(self.run_dir)
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(trio.serve_listeners, self._control, [trio.SocketListener(sock)])
                if self.settings.admin_listen and not await self._open_admin(nursery):
                    nursery.cancel_scope.cancel()
                    return
                if self.settings.admin_listen:
                    nursery.start_soon(self.recorder.run)  # the admin port's audit events, shipped like usage
                for index in range(self.target):
                    await self._spawn(index)
                nursery.start_soon(self._start_grace)
                nursery.start_soon(self._signals)
                await self._stopped.wait()
                if self.settings.admin_listen:
                    with trio.move_on_after(5):
                        await self.recorder.flush()
                nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True) if not self.settings.run_dir else None

    async def _open_admin(self, nursery: trio.Nursery) -> bool:
        """Open the admin port before any worker starts; False (and `failure` set) if it cannot be bound."""
        from o7s_cluster.admin.http import AdminAuth, serve_admin

        host, port = parse_listen(self.settings.admin_listen or "")
        auth = lambda: AdminAuth.from_settings(self.settings)  # noqa: E731 - SIGHUP rotates the token
        try:
            dsn = lambda: self.settings.platform_dsn  # noqa: E731 - the dashboard's account panel
            await nursery.start(partial(serve_admin, auth=auth, audit=self.recorder.audit, platform_dsn=dsn),
                                host, port, self)
        except OSError as e:  # taken since check_ports looked, or not resolvable
            self.failure = port_error("open the admin port on", host, port, "--admin HOST:PORT", e)
            return False
        return True

    async def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env["O7S_WORKER_SETTINGS"] = orjson.dumps(dataclasses.asdict(self.settings)).decode()
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "o7s_cluster.worker.process", str(index), self.run_dir], env=env)
        old = self.handles.get(index)
        handle = WorkerHandle(index, proc, time.time(), restarts=(old.restarts + 1) if old else 0,
                              startup_failures=old.startup_failures if old else 0)
        self.handles[index] = handle
        assert self.nursery is not None
        self.nursery.start_soon(self._watch, handle)
        log.info("worker started", extra={"worker": index, "pid": proc.pid})

    async def _watch(self, handle: WorkerHandle) -> None:
        code = await handle.proc.wait()
        if self.settings.redis_url:  # a killed worker cannot give its connection counts back itself
            self.nursery.start_soon(release_dead_worker, self.settings.redis_url,  # type: ignore[union-attr]
                                    self.settings.machine_id, handle.index, handle.proc.pid)
        retired = handle.state == "retiring"
        if handle.state == "starting" and not self.stopping:
            handle.startup_failures += 1
            if handle.startup_failures >= MAX_STARTUP_FAILURES:
                log.error("worker keeps dying at start-up; stopping", extra={"worker": handle.index, "code": code})
                self.failure = f"worker {handle.index} died {handle.startup_failures} times at start-up (see the log)"
                handle.state = "dead"
                self.nursery.start_soon(self.drain)  # type: ignore[union-attr]
                return
        handle.state = "dead"
        if self.handles.get(handle.index) is handle and (self.stopping or retired or handle.index >= self.target):
            del self.handles[handle.index]
        await self._broadcast_members()
        if self.stopping:
            if not self.handles:
                self._stopped.set()
            return
        if handle.index >= self.target:
            log.info("worker retired", extra={"worker": handle.index, "code": code})
            return
        if not retired:
            log.warning("worker died; restarting", extra={"worker": handle.index, "code": code})
            if time.time() - handle.started_at < 2:  # dying at start-up: back off instead of spinning
                await trio.sleep(min(10.0, 0.5 * 2 ** min(handle.restarts, 5)))
                if self.stopping or handle.index >= self.target:
                    return
        await self._spawn(handle.index)

    async def _start_grace(self) -> None:
        """A worker that never comes up must not keep the others from taking clients."""
        await trio.sleep(START_GRACE)
        if not self._started:
            log.warning("not every worker is up yet; taking clients with those that are",
                        extra={"up": self.members(), "wanted": self.target})
            self._started = True
            await self._broadcast_members()

    async def _signals(self) -> None:
        # The work runs in tasks so that this loop keeps taking signals: a second SIGTERM during a
        # drain is absorbed here rather than left pending (trio re-raises pending ones on exit).
        assert self.nursery is not None
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                self.nursery.start_soon(self.reload if signum == signal.SIGHUP else self.drain)

    async def drain(self) -> None:
        """Stop accepting everywhere, let transactions finish, then exit (the workers send 57P01)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("draining the cluster", extra={"workers": len(self.handles)})
        for handle in list(self.handles.values()):
            if handle.proc.returncode is None:
                handle.proc.send_signal(signal.SIGTERM)
        if not self.handles:
            self._stopped.set()
            return
        with trio.move_on_after(self.settings.drain_timeout + 10):
            await self._stopped.wait()
        for handle in list(self.handles.values()):
            if handle.proc.returncode is None:
                handle.proc.kill()
        self._stopped.set()

    async def reload(self) -> None:
        new = reread_settings(self.reload_settings)
        if new is None:
            return
        self.settings = dataclasses.replace(new, workers=self.target)
        log.info("configuration reloaded")
        payload = dataclasses.asdict(self.settings)
        for handle in self._up():
            await self._send(handle, {"cmd": "reload", "settings": payload})

    # --- control channel -----------------------------------------------------------------------

    async def _control(self, stream: trio.SocketStream) -> None:
        handle: WorkerHandle | None = None
        buf = b""
        try:
            while True:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = orjson.loads(line)
                    if "hello" in msg:
                        handle = self.handles.get(int(msg["hello"]))
                        if handle is None or handle.proc.pid != msg.get("pid"):
                            return
                        handle.stream = stream
                        if handle.state == "starting":
                            handle.state = "up"
                            handle.startup_failures = 0
                        await self._broadcast_members()
                    elif handle is not None and msg.get("id") in handle.waiting:
                        waiter = handle.waiting.pop(msg["id"])
                        waiter[1] = msg
                        waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, orjson.JSONDecodeError):
            pass
        finally:
            if handle is not None and handle.stream is stream:
                handle.stream = None

    async def _send(self, handle: WorkerHandle, msg: dict[str, Any]) -> bool:
        if handle.stream is None:
            return False
        try:
            async with handle.send_lock:
                await handle.stream.send_all(orjson.dumps(msg) + b"\n")
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False

    async def _ask(self, handle: WorkerHandle, cmd: str, timeout: float = 2.0) -> dict[str, Any] | None:
        self._request_id += 1
        rid = self._request_id
        waiter: list[Any] = [trio.Event(), None]
        handle.waiting[rid] = waiter
        if not await self._send(handle, {"cmd": cmd, "id": rid}):
            handle.waiting.pop(rid, None)
            return None
        with trio.move_on_after(timeout):
            await waiter[0].wait()
        handle.waiting.pop(rid, None)
        return waiter[1]

    def members(self) -> list[int]:
        return sorted(h.index for h in self.handles.values() if h.state == "up")

    def _up(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if h.state in ("up", "retiring") and h.stream is not None]

    async def _broadcast_members(self) -> None:
        members = self.members()
        if not self._started:
            # Until every first worker is up, none is told who the members are, so none serves a client
            # while it could take itself for an org's home and count its connections apart.
            if len(members) < self.target:
                return
            self._started = True
        for handle in self._up():
            await self._send(handle, {"members": members})

    # --- what the admin port sees (admin.ClusterView) ------------------------------------------

    def alive(self) -> bool:
        return not self.stopping

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        up = len(self.members())
        control_plane = await trio.to_thread.run_sync(self._ping_control_plane)
        ok = up >= self.target and control_plane and not self.stopping
        return ok, {"workers_up": up, "workers_wanted": self.target, "control_plane": control_plane,
                    "stopping": self.stopping}

    def _ping_control_plane(self) -> bool:
        return ping_control_plane(self.settings.platform_dsn)

    async def snapshots(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []

        async def one(handle: WorkerHandle) -> None:
            reply = await self._ask(handle, "stats")
            if reply is not None and "stats" in reply:
                results.append(reply["stats"])
                self._last[handle.index] = reply["stats"]

        async with trio.open_nursery() as nursery:
            for handle in self._up():
                nursery.start_soon(one, handle)
        results.sort(key=lambda s: s.get("worker", 0))
        return results

    def workers(self) -> list[dict[str, Any]]:
        """Workers and the orgs they hold (by their latest snapshots: open sessions or pooled backends)."""
        out = []
        for h in sorted(self.handles.values(), key=lambda h: h.index):
            snap = self._last.get(h.index)
            orgs = []
            if snap is not None and snap.get("pid") == h.proc.pid:
                orgs = sorted({o["org"] for o in snap.get("orgs", ()) if o.get("client_connections")
                               or o.get("pool_in_use") or o.get("pool_idle")})
            out.append({"index": h.index, "pid": h.proc.pid, "state": h.state, "started_at": h.started_at,
                        "restarts": h.restarts, "orgs": orgs})
        return out

    async def set_workers(self, n: int) -> dict[str, Any]:
        """Scale: new workers join the members; retired ones leave them at once (their orgs move)
        but keep their open sessions until those end."""
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}")
        self.target = n
        for index in range(n):
            if index not in self.handles:
                await self._spawn(index)
            # A worker still retiring from an earlier scale-down is replaced when it exits.
        for handle in list(self.handles.values()):
            if handle.index >= n and handle.state in ("up", "starting"):
                handle.state = "retiring"
                await self._send(handle, {"cmd": "retire"})
        await self._broadcast_members()
        log.info("workers scaled", extra={"workers": n})
        return {"workers": n, "members": self.members()}


def reread_settings(reload: Callable[[], Settings] | None) -> Settings | None:
    """SIGHUP: the settings read again, or None (logged) when that fails: a bad config file must not
    take the cluster down."""
    if reload is None:
        return None
    try:
        return reload()
    except Exception as exc:
        log.error("reload failed; keeping the old settings", extra={"error": str(exc)})
        return None


def ping_control_plane(dsn: str | None) -> bool:
    """Readiness: can the control plane be reached right now (a blocking call, for a thread)."""
    try:
        with psycopg.connect(dsn or "", connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


async def supervise(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    try:  # fail now, in the supervisor, rather than in every worker forever
        check_ports(settings)
    except PortError as e:
        raise ClusterError(str(e)) from None
    supervisor = Supervisor(settings, reload)
    await supervisor.run()
    if supervisor.failure:
        raise ClusterError(supervisor.failure)


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """`o7s serve`: a supervisor and its worker processes; `reload` re-reads settings on SIGHUP."""
    logs.setup(settings.log_level, role="supervisor")
    trio.run(supervise, settings, reload)
