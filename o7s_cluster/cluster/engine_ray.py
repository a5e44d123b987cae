"""The Ray engine: `o7s serve --engine ray` runs the workers as Ray actors on every node of a Ray cluster.

Shape (docs/SCALING.md has the operator's view):

* The driver (this module's ``run``) joins the Ray cluster (``--ray-address``, else ``$RAY_ADDRESS``, else a
  new local Ray instance), gives every alive node its own machine id (``machine_id``, ``machine_id + 1``, ...
  in the order it first sees them) and starts ``workers_per_node`` actors on each node, pinned there with a
  hard node-affinity strategy. It is the supervisor of the local engine, spread over machines: it implements
  ``admin.ClusterView`` for the admin port, tells each node's workers who the node's live members are,
  gathers their figures, scales, reloads and drains, all through actor method calls instead of the Unix
  control socket.
* Every actor (``WorkerHost``) runs the unchanged ``worker.Worker`` in ``trio.run`` on a thread of its own
  (a threaded actor: the Ray method calls arrive on other threads and enter trio with ``trio.from_thread``).
  The worker listens on the public port with ``SO_REUSEPORT``, so the workers of one node share it, and hands
  connections to the org's home worker over the node-local run_dir's Unix datagram sockets, exactly as under
  the local engine: org affinity is per node. The worker's control connection is kept inside the actor (it
  connects to a socket the actor itself holds); the commands it would read there are called directly.
* Ray restarts an actor whose process dies (``max_restarts=-1``); the actor also exits its process when the
  worker inside fails, so that a crash is a restart too. The driver notices a new pid at its next poll
  (every half second) and sends the node's members to it; meanwhile hand-offs to the dead worker fail and
  are served by the worker that accepted them.
* Cancel: the BackendKeyData O7s hands out names the machine and the worker (affinity.py). A CancelRequest
  that lands on another worker of the same node goes over the run_dir socket (Router.forward_cancel); one
  that lands on another machine goes through ``Server.remote_cancel``, which this engine sets: a fire-and-
  forget call of ``cancel`` on the named actor ``o7s-m<machine>-w<worker>`` (looked up once, then cached),
  which cancels locally. No Redis is needed for it, and the key never leaves the Ray cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import ray
import trio
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from o7s_cluster import logs
from o7s_cluster.worker.affinity import MACHINE_BITS, MAX_WORKERS, key_worker
from o7s_cluster.cluster.supervisor import ping_control_plane, reread_settings
from o7s_cluster.config import Settings, parse_listen
from o7s_cluster.worker.process import Worker
from o7s_cluster.worker.router import supervisor_socket_path, worker_socket_path
from o7s_cluster.worker.router import Router

log = logging.getLogger("o7s.ray")

MAX_MACHINES = 1 << MACHINE_BITS
POLL_INTERVAL = 0.5  # seconds between the driver's pings of every actor
NODE_INTERVAL = 2.0  # seconds between looks for nodes that joined or left
CALL_TIMEOUT = 2.0  # an actor that does not answer a ping in this long counts as restarting
MAX_STARTUP_FAILURES = 5  # incarnations in a row that died before serving: stop, like the local supervisor
ACTOR_CONCURRENCY = 8  # threads of a worker actor for the driver's calls and cancels from other machines


def actor_name(machine: int, index: int) -> str:
    return f"o7s-m{machine}-w{index}"


def global_index(machine: int, index: int) -> int:
    """The worker's index in the admin port's figures and metric labels: unique across machines."""
    return machine * MAX_WORKERS + index


def node_run_dir(base: str, machine: int) -> str:
    """The run_dir the workers of one machine share (distinct per machine, even on one host)."""
    return os.path.join(base, f"m{machine}")


# ---------------------------------------------------------------------------------------------- the actor


class _ActorWorker(Worker):
    """The worker, unchanged but for where its control connection and hand-off sockets live, and signals
    (there are none off the main thread: the driver drains it through a method call)."""

    def __init__(self, settings: Settings, index: int, run_dir: str, control_dir: str) -> None:
        super().__init__(settings, index, control_dir)  # self.run_dir: only the control socket is looked up there
        self.router = Router(index, run_dir)  # hand-offs and cancels between the workers of this node

    async def _signals(self) -> None:
        await trio.sleep_forever()


class WorkerHost:
    """One worker in a Ray actor (see the module docstring). Made a Ray actor by ``WorkerActor`` below."""

    def __init__(self, settings: dict[str, Any], index: int, machine: int, run_dir: str, namespace: str) -> None:
        self.settings = Settings(**settings)
        self.index, self.machine, self.run_dir, self.namespace = index, machine, run_dir, namespace
        self.state = "starting"  # starting, up, finished
        self.started_at = time.time()
        self.worker: _ActorWorker | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._handles: dict[tuple[int, int], Any] = {}  # other machines' workers, for cancels
        threading.Thread(target=self._thread, name=f"o7s-worker-{index}", daemon=True).start()

    # --- the trio side -------------------------------------------------------------------------

    def _thread(self) -> None:
        try:
            trio.run(self._main)
        except BaseException:  # noqa: BLE001 - the worker failed: die, so that Ray restarts the actor
            log.exception("worker failed; exiting the actor so that Ray restarts it")
            logging.shutdown()
            os._exit(1)
        self.state = "finished"
        log.info("worker finished")

    async def _main(self) -> None:
        logs.setup(self.settings.log_level, worker=global_index(self.machine, self.index), machine=self.machine)
        self.token = trio.lowlevel.current_trio_token()
        os.makedirs(self.run_dir, exist_ok=True)
        control_dir = os.path.join(self.run_dir, f"c{self.index}")
        os.makedirs(control_dir, exist_ok=True)
        path = supervisor_socket_path(control_dir)
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(1)
        self.worker = _ActorWorker(self.settings, self.index, self.run_dir, control_dir)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hold_control, sock)
                await self.worker.run()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            for p in (path, worker_socket_path(self.run_dir, self.index)):
                try:
                    os.unlink(p)
                except OSError:
                    pass

    async def _hold_control(self, sock: trio.socket.SocketType) -> None:
        """Accept the worker's control connection and keep it open (closing it would drain the worker)."""
        conn, _ = await sock.accept()
        try:
            await conn.recv(65536)  # its hello; the worker is serving from here on
            assert self.worker is not None and self.worker.server is not None
            self.worker.server.remote_cancel = self._remote_cancel
            self.state = "up"
            log.info("worker actor up", extra={"machine": self.machine, "index": self.index})
            await trio.sleep_forever()
        finally:
            conn.close()

    def _remote_cancel(self, machine: int, pid: int, secret: int) -> None:
        """Server.remote_cancel: a key of another machine. Never blocks the session that accepted it."""
        assert self.worker is not None and self.worker.server is not None
        self.worker.server.nursery.start_soon(trio.to_thread.run_sync, self._send_cancel, machine, pid, secret)

    def _send_cancel(self, machine: int, pid: int, secret: int) -> None:
        worker = key_worker(secret)[1]
        key = (machine, worker)
        try:
            handle = self._handles.get(key)
            if handle is None:
                handle = self._handles[key] = ray.get_actor(actor_name(machine, worker), namespace=self.namespace)
            handle.cancel.remote(pid, secret)  # fire and forget, like PostgreSQL's own cancel
        except (ValueError, RayError) as exc:  # no such worker (any more): nothing to cancel
            self._handles.pop(key, None)
            log.info("cancel for another machine dropped", extra={"to_machine": machine, "to_worker": worker,
                                                                  "error": type(exc).__name__})

    # --- Ray methods (called on the actor's other threads) -------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "state": self.state, "started_at": self.started_at}

    def command(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """One of the local supervisor's control messages: members, stats, retire, drain, reload."""
        if self.state != "up" or self.worker is None or self.token is None:
            return None
        try:
            return trio.from_thread.run(self.worker._command, msg, trio_token=self.token)
        except trio.RunFinishedError:
            return None

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest that another machine accepted for one of this worker's sessions."""
        if self.state != "up" or self.worker is None or self.worker.server is None or self.token is None:
            return
        try:
            trio.from_thread.run_sync(self.worker.server.cancel, pid, secret, trio_token=self.token)
        except trio.RunFinishedError:
            pass


WorkerActor = ray.remote(max_concurrency=ACTOR_CONCURRENCY)(WorkerHost)


# ---------------------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class ActorRecord:
    machine: int
    index: int
    node_id: str
    handle: Any
    pid: int | None = None
    state: str = "starting"  # starting, up, retiring, restarting
    started_at: float = dataclasses.field(default_factory=time.time)
    restarts: int = 0
    startup_failures: int = 0
    ever_up: bool = False  # this incarnation (pid) reached "up"
    retiring: bool = False
    members_sent: list[int] | None = None  # what this incarnation was last told

    @property
    def gindex(self) -> int:
        return global_index(self.machine, self.index)


class RayCluster:
    """The driver: places, watches, scales and drains the worker actors; the admin port's ClusterView."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None, *,
                 namespace: str | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload
        self.per_node = settings.workers_per_node  # None: each node's CPU count
        self.namespace = namespace or f"o7s-{uuid.uuid4().hex[:10]}"
        self.base_dir = settings.run_dir or os.path.join(tempfile.gettempdir(), self.namespace)
        self.machines: dict[str, int] = {}  # Ray node id -> machine id
        self.node_cpus: dict[str, int] = {}
        self.dead_nodes: set[str] = set()
        self.actors: dict[tuple[int, int], ActorRecord] = {}
        self.stopping = False
        self.failure: str | None = None
        self._last: dict[tuple[int, int], dict[str, Any]] = {}
        self._stopped = trio.Event()
        self._next_node_look = 0.0
        self._nursery: trio.Nursery | None = None

    # --- life cycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._look_for_nodes()
            if not self.machines:
                raise RuntimeError("the Ray cluster has no alive node")
            if self.settings.admin_listen:
                from o7s_cluster.admin.http import AdminAuth, serve_admin

                host, port = parse_listen(self.settings.admin_listen)
                auth = lambda: AdminAuth.from_settings(self.settings)  # noqa: E731 - SIGHUP rotates the token
                dsn = lambda: self.settings.platform_dsn  # noqa: E731 - the dashboard's account panel
                await nursery.start(partial(serve_admin, auth=auth, platform_dsn=dsn), host, port, self)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._monitor)
            await self._stopped.wait()
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._kill_all()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    await self.drain()

    async def drain(self) -> None:
        """Every worker stops accepting and ends its sessions at their next transaction boundary, flushes
        usage and finishes; then the actors are killed (without restart)."""
        if self.stopping:
            return
        self.stopping = True
        log.info("draining the cluster", extra={"workers": len(self.actors)})
        for rec in list(self.actors.values()):
            self._fire(rec, {"cmd": "drain"})
        with trio.move_on_after(self.settings.drain_timeout + 10):
            while any(rec.state not in ("finished", "restarting") for rec in self.actors.values()):
                await trio.sleep(0.1)
        log.info("workers drained", extra={"left": sum(r.state != "finished" for r in self.actors.values())})
        self._stopped.set()

    async def _kill_all(self) -> None:
        recs = list(self.actors.values())
        self.actors.clear()
        for rec in recs:
            await trio.to_thread.run_sync(_kill, rec.handle)

    async def reload(self) -> None:
        new = reread_settings(self.reload_settings)
        if new is None:
            return
        self.settings = dataclasses.replace(new, workers_per_node=self.per_node)
        log.info("configuration reloaded")
        for rec in self._serving():
            self._fire(rec, {"cmd": "reload", "settings": dataclasses.asdict(self._settings_for(rec.machine))})

    # --- placement -----------------------------------------------------------------------------

    async def _look_for_nodes(self) -> None:
        nodes = await trio.to_thread.run_sync(ray.nodes)
        alive = {n["NodeID"]: n for n in nodes if n.get("Alive")}
        here = await trio.to_thread.run_sync(_driver_node)
        for node_id in sorted(alive, key=lambda n: (n != here, n)):  # the driver's node first
            if node_id in self.machines or node_id in self.dead_nodes:
                continue
            machine = self.settings.machine_id + len(self.machines) + len(self.dead_nodes)
            if machine >= MAX_MACHINES:
                log.error("no machine id left for a node (machine ids are 0-127); it gets no workers",
                          extra={"node": node_id})
                self.dead_nodes.add(node_id)
                continue
            self.machines[node_id] = machine
            self.node_cpus[node_id] = int(alive[node_id].get("Resources", {}).get("CPU", 1) or 1)
            log.info("node joined", extra={"node": node_id, "machine": machine,
                                           "address": alive[node_id].get("NodeManagerAddress")})
        for node_id, machine in list(self.machines.items()):
            if node_id not in alive:
                log.warning("node left; its workers are gone", extra={"node": node_id, "machine": machine})
                del self.machines[node_id]
                self.dead_nodes.add(node_id)  # a node that comes back joins with a new id
                for key in [k for k in self.actors if k[0] == machine]:
                    rec = self.actors.pop(key)
                    await trio.to_thread.run_sync(_kill, rec.handle)
        self._next_node_look = time.monotonic() + NODE_INTERVAL

    def _wanted(self, node_id: str) -> int:
        n = self.per_node if self.per_node is not None else self.node_cpus.get(node_id, 1)
        return max(1, min(MAX_WORKERS, n))

    def _settings_for(self, machine: int) -> Settings:
        spool = self.settings.spool_dir
        if not os.path.isabs(spool):  # an actor's working directory is Ray's, not ours
            spool = os.path.abspath(spool)
        return dataclasses.replace(self.settings, machine_id=machine, spool_dir=spool, run_dir=None)

    async def _ensure(self) -> None:
        """Start the workers each node should have and does not (a retired one is replaced once it is gone)."""
        for node_id, machine in list(self.machines.items()):
            for index in range(self._wanted(node_id)):
                if (machine, index) not in self.actors:
                    await self._spawn(node_id, machine, index)

    async def _spawn(self, node_id: str, machine: int, index: int) -> None:
        settings = dataclasses.asdict(self._settings_for(machine))
        run_dir = node_run_dir(self.base_dir, machine)

        def create() -> Any:
            return WorkerActor.options(
                name=actor_name(machine, index), namespace=self.namespace, max_restarts=-1, max_task_retries=0,
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(settings, index, machine, run_dir, self.namespace)

        try:
            handle = await trio.to_thread.run_sync(create)
        except (ValueError, RayError) as exc:  # e.g. the name of a just-killed actor is not free yet
            log.info("worker actor not started yet; retrying", extra={"machine": machine, "index": index,
                                                                       "error": str(exc)})
            return
        self.actors[(machine, index)] = ActorRecord(machine, index, node_id, handle)
        log.info("worker actor started", extra={"machine": machine, "index": index, "node": node_id})

    # --- watching ------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            if not self.stopping and time.monotonic() >= self._next_node_look:
                try:
                    await self._look_for_nodes()
                except RayError as exc:
                    log.warning("cannot list the Ray nodes", extra={"error": str(exc)})
            if not self.stopping:
                await self._ensure()
            async with trio.open_nursery() as nursery:
                for rec in list(self.actors.values()):
                    nursery.start_soon(self._check, rec)
            if not self.stopping:
                await self._send_members()
            await trio.sleep(POLL_INTERVAL)

    async def _check(self, rec: ActorRecord) -> None:
        info = await self._call(rec.handle.ping.remote())
        if info is None:  # dead and being restarted by Ray (or its node is gone)
            if rec.state in ("up", "starting"):
                log.warning("worker actor not answering; Ray restarts it",
                            extra={"machine": rec.machine, "index": rec.index, "pid": rec.pid})
                rec.state = "restarting"
            return
        if rec.pid is not None and info["pid"] != rec.pid:
            rec.restarts += 1
            rec.members_sent = None
            if not rec.ever_up:
                rec.startup_failures += 1
            rec.ever_up = False
            log.warning("worker actor restarted by Ray", extra={"machine": rec.machine, "index": rec.index,
                                                                 "pid": info["pid"], "old_pid": rec.pid})
            if rec.startup_failures >= MAX_STARTUP_FAILURES and not self.stopping:
                self.failure = (f"worker {rec.index} of machine {rec.machine} died {rec.startup_failures} times"
                                " at start-up (see the log)")
                log.error("worker keeps dying at start-up; stopping", extra={"machine": rec.machine})
                assert self._nursery is not None
                self._nursery.start_soon(self.drain)
        rec.pid, rec.started_at = info["pid"], info["started_at"]
        state = info["state"]
        if state == "up":
            if self.stopping and rec.state != "up":  # came up (again) after the drain began
                self._fire(rec, {"cmd": "drain"})
            rec.ever_up = True
            rec.startup_failures = 0
            rec.state = "retiring" if rec.retiring else "up"
        elif state == "starting":
            rec.state = "starting"
        elif state == "finished":
            rec.state = "finished"
            if self.stopping:
                return
            self.actors.pop((rec.machine, rec.index), None)
            await trio.to_thread.run_sync(_kill, rec.handle)
            log.info("worker retired" if rec.retiring else "worker finished; replacing it",
                     extra={"machine": rec.machine, "index": rec.index})

    def members(self, machine: int) -> list[int]:
        return sorted(r.index for r in self.actors.values() if r.machine == machine and r.state == "up")

    def _serving(self) -> list[ActorRecord]:
        return [r for r in self.actors.values() if r.state in ("up", "retiring")]

    async def _send_members(self) -> None:
        for rec in self._serving():
            members = self.members(rec.machine)
            if rec.members_sent != members:
                rec.members_sent = members
                self._fire(rec, {"members": members})

    def _fire(self, rec: ActorRecord, msg: dict[str, Any]) -> None:
        try:
            rec.handle.command.remote(msg)
        except RayError:
            rec.members_sent = None

    async def _call(self, ref: Any, timeout: float = CALL_TIMEOUT) -> Any:
        def get() -> Any:
            try:
                return ray.get(ref, timeout=timeout)
            except (GetTimeoutError, RayError):
                return None

        return await trio.to_thread.run_sync(get)

    # --- what the admin port sees (admin.ClusterView) ------------------------------------------

    def alive(self) -> bool:
        return not self.stopping

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        wanted = sum(self._wanted(n) for n in self.machines)
        up = sum(1 for r in self.actors.values() if r.state == "up")
        control_plane = await trio.to_thread.run_sync(self._ping_control_plane)
        ok = up >= wanted and control_plane and not self.stopping
        return ok, {"workers_up": up, "workers_wanted": wanted, "machines": len(self.machines),
                    "control_plane": control_plane, "stopping": self.stopping, "engine": "ray"}

    def _ping_control_plane(self) -> bool:
        return ping_control_plane(self.settings.platform_dsn)

    async def snapshots(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []

        async def one(rec: ActorRecord) -> None:
            reply = await self._call(rec.handle.command.remote({"cmd": "stats", "id": 0}))
            if reply and "stats" in reply:
                snap = reply["stats"]
                snap["worker"], snap["machine"], snap["machine_worker"] = rec.gindex, rec.machine, rec.index
                self._last[(rec.machine, rec.index)] = snap
                results.append(snap)

        async with trio.open_nursery() as nursery:
            for rec in self._serving():
                nursery.start_soon(one, rec)
        results.sort(key=lambda s: s.get("worker", 0))
        return results

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for rec in sorted(self.actors.values(), key=lambda r: r.gindex):
            snap = self._last.get((rec.machine, rec.index))
            orgs: list[str] = []
            if snap is not None and snap.get("pid") == rec.pid:
                orgs = sorted({o["org"] for o in snap.get("orgs", ()) if o.get("client_connections")
                               or o.get("pool_in_use") or o.get("pool_idle")})
            out.append({"index": rec.gindex, "machine": rec.machine, "machine_worker": rec.index,
                        "node": rec.node_id, "pid": rec.pid or 0, "state": rec.state, "started_at": rec.started_at,
                        "restarts": rec.restarts, "orgs": orgs})
        return out

    async def set_workers(self, n: int) -> dict[str, Any]:
        """`o7s ctl workers N` under the Ray engine: N workers on every node. New ones join their node's
        members when up; retired ones leave them at once and finish when their sessions have ended."""
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"workers per node must be between 1 and {MAX_WORKERS}")
        self.per_node = n
        for rec in list(self.actors.values()):
            if rec.index >= n and not rec.retiring:
                rec.retiring = True
                if rec.state == "up":
                    rec.state = "retiring"
                self._fire(rec, {"cmd": "retire"})
        await self._send_members()
        await self._ensure()
        log.info("workers scaled", extra={"workers_per_node": n})
        return {"workers": n, "workers_per_node": n, "machines": sorted(self.machines.values()),
                "members": {str(m): self.members(m) for m in sorted(self.machines.values())}}


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except (ValueError, RayError):
        pass


def _driver_node() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - Ray client mode has no local node
        return None


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """`o7s serve --engine ray`: join (or start) a Ray cluster and serve from actors on all its nodes."""
    from o7s_cluster.cluster.supervisor import ClusterError

    logs.setup(settings.log_level, role="supervisor", engine="ray")
    namespace = f"o7s-{uuid.uuid4().hex[:10]}"
    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"namespace": namespace, "logging_level": logging.WARNING, "configure_logging": False}
    if address is None:  # a new local Ray instance, only for this serve
        kwargs.update(include_dashboard=False)
    ray.init(address=address, **kwargs)
    cluster = RayCluster(settings, reload, namespace=namespace)
    try:
        trio.run(cluster.run)
    finally:
        ray.shutdown()
        log.info("Ray engine stopped")
    if cluster.failure:
        raise ClusterError(cluster.failure)
