"""The Ray engine on a real two-node Ray cluster on this host (two "machines"): `o7s serve --engine ray`.

Each Ray node is its own machine id; both nodes' workers share the public port through SO_REUSEPORT, so the
kernel spreads connections (and CancelRequests) over both machines, as a load balancer would. Skipped when
Ray is not installed (`pip install 'o7s-cluster[ray]'`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import free_port, run_o7s, start_proxy, stop_proxy
from o7s_cluster.worker.affinity import MAX_WORKERS, home_worker, split_session_pid
from o7s_cluster.config import ConfigError, load_settings

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install 'o7s-cluster[ray]')")

ORGS = [f"ray{i}" for i in range(6)]
PER_NODE = 2


def test_engine_settings_are_checked():
    assert load_settings(env={}).engine == "local"
    s = load_settings(env={"O7S_ENGINE": "ray", "O7S_WORKERS_PER_NODE": "3", "O7S_RAY_ADDRESS": "10.0.0.1:6379"})
    assert (s.engine, s.workers_per_node, s.ray_address) == ("ray", 3, "10.0.0.1:6379")
    with pytest.raises(ConfigError, match="engine"):
        load_settings(env={}, overrides={"engine": "k8s"})
    with pytest.raises(ConfigError, match="workers_per_node"):
        load_settings(env={}, overrides={"workers_per_node": "65"})


def test_local_engine_does_not_import_ray():
    code = ("import sys; from o7s_cluster.cli import main as cli; from o7s_cluster.worker import server, process; from o7s_cluster.cluster import supervisor; "
            "cli.build_parser().parse_args(['serve', '--engine', 'local']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------- the cluster


class RayNodes:
    """`ray start --block` head and worker node, each in its own session, so that teardown ends exactly them."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's Unix socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_TMPDIR": self.tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen] = []
        self.log = Path(self.tmp) / "ray-start.log"

    def _start(self, *args: str) -> None:
        exe = str(Path(sys.executable).with_name("ray"))
        with open(self.log, "a") as fh:
            self.procs.append(subprocess.Popen(
                [exe, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                 "--min-worker-port=0", "--max-worker-port=0", *args],  # not 10002-19999, where our ports may be
                env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        self._start("--head", f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats")
        deadline = time.monotonic() + 60
        while True:  # the GCS port answers
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    raise RuntimeError(f"ray head did not start:\n{self.log.read_text()}")
                time.sleep(0.1)
        self._start(f"--address={self.address}")

    def stop(self) -> None:
        for proc in self.procs:  # a throwaway cluster: nothing in it to save
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait()
        # Anything Ray started under our temp dir that outlived its session (by pid, only ours).
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.tmp.encode() in cmd:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def orgs(make_org):
    return {name: make_org(name, "pro") for name in ORGS}


@pytest.fixture(scope="module")
def ray_proxy(migrated, orgs, tmp_path_factory):
    if not HAVE_RAY:
        pytest.skip("Ray is not installed (pip install 'o7s-cluster[ray]')")
    nodes = RayNodes()
    proxy = None
    try:
        nodes.start()
        admin = free_port()
        env = {**migrated, "RAY_TMPDIR": nodes.tmp, "RAY_USAGE_STATS_ENABLED": "0",
               "O7S_ADMIN_TOKEN": "ray-test-admin-token"}  # `o7s ctl workers` sends it
        proxy = start_proxy(env, tmp_path_factory.mktemp("ray"), "--engine", "ray", "--ray-address", nodes.address,
                            "--workers-per-node", str(PER_NODE), "--admin", f"127.0.0.1:{admin}",
                            "--drain-timeout", "3")
        proxy.admin = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
        proxy.env = env  # type: ignore[attr-defined]
        # The second node may join a moment after the driver started: wait for both machines' workers.
        wait_for(lambda: sorted((w["machine"], w["machine_worker"]) for w in up_workers(proxy))
                 == [(m, i) for m in (0, 1) for i in range(PER_NODE)], 40, "two machines of two workers each",
                 proxy)
        yield proxy
    finally:
        if proxy is not None:
            stop_proxy(proxy)
        nodes.stop()


def cluster_state(p) -> list[dict]:
    return httpx.get(f"{p.admin}/v1/cluster", timeout=10).json()["workers"]


def up_workers(p) -> list[dict]:
    return [w for w in cluster_state(p) if w["state"] == "up"]


def wait_for(cond, timeout: float, what: str, p=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            extra = "" if p is None else f"\n{p.log.read_text()[-4000:]}"
            raise TimeoutError(f"timed out waiting for {what}{extra}")
        time.sleep(0.2)


def session_worker(conn: psycopg.Connection) -> tuple[int, int]:
    """(machine, worker) that holds a session, from the BackendKeyData O7s handed out."""
    machine, worker, _ = split_session_pid(conn.info.backend_pid)
    return machine, worker


@needs_ray
def test_every_machine_serves_and_orgs_live_on_their_home_worker_per_node(ray_proxy, orgs):
    conns = []
    try:
        for org in orgs.values():
            for _ in range(3):
                c = psycopg.connect(ray_proxy.dsn(org), autocommit=True)
                assert c.execute("select current_database()").fetchone() == (org.dbname,)
                conns.append((org.name, c))
        members = list(range(PER_NODE))
        machines_used = set()
        for name, c in conns:
            machine, worker = session_worker(c)
            machines_used.add(machine)
            assert worker == home_worker(name, members), (name, machine, worker)  # affinity is per node
        assert machines_used == {0, 1}  # 18 connections spread by the kernel over both nodes' sockets
        held = {}
        for w in cluster_state(ray_proxy):
            assert w["index"] == w["machine"] * MAX_WORKERS + w["machine_worker"]
            for org in w["orgs"]:
                held.setdefault(org, set()).add(w["machine_worker"])
        for name in orgs:
            assert held[name] == {home_worker(name, members)}
    finally:
        for _, c in conns:
            c.close()


@needs_ray
def test_cancel_reaches_the_session_whichever_machine_accepts_it(ray_proxy, orgs):
    org = orgs[ORGS[0]]
    for _ in range(12):  # the cancel connection lands on either machine (half of them on the other one)
        with psycopg.connect(ray_proxy.dsn(org), autocommit=True) as c:
            timer = threading.Timer(0.3, c.cancel_safe)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("select pg_sleep(10)")
            timer.join()
            assert time.monotonic() - t0 < 3
            assert c.execute("select 1").fetchone() == (1,)
    metrics = httpx.get(f"{ray_proxy.admin}/metrics", timeout=10).text
    forwarded = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("o7s_cancels_forwarded_total"))
    assert forwarded > 0


@needs_ray
def test_a_killed_actor_is_restarted_by_ray_while_the_others_keep_serving(ray_proxy, orgs):
    conns = []
    try:
        for org in orgs.values():
            for _ in range(2):
                c = psycopg.connect(ray_proxy.dsn(org), autocommit=True)
                c.execute("select 1")
                conns.append(c)
        workers = {(w["machine"], w["machine_worker"]): w for w in up_workers(ray_proxy)}
        holding = {session_worker(c) for c in conns}
        victim_key = sorted(holding)[0]
        victim = workers[victim_key]
        os.kill(victim["pid"], signal.SIGKILL)
        survivors = [c for c in conns if session_worker(c) != victim_key]
        assert survivors
        for c in survivors:  # sessions of the other workers (and machines) are untouched
            assert c.execute("select 2").fetchone() == (2,)

        def restarted():
            w = {(w["machine"], w["machine_worker"]): w for w in cluster_state(ray_proxy)}.get(victim_key)
            return w if w and w["state"] == "up" and w["pid"] != victim["pid"] and w["restarts"] >= 1 else None

        wait_for(restarted, 30, "Ray to restart the killed worker actor", ray_proxy)
        for org in orgs.values():  # every org is served again, on its home worker
            with psycopg.connect(ray_proxy.dsn(org), autocommit=True) as c:
                assert c.execute("select 3").fetchone() == (3,)
                assert session_worker(c)[1] == home_worker(org.name, list(range(PER_NODE)))
    finally:
        for c in conns:
            c.close()


@needs_ray
def test_ctl_workers_scales_every_node(ray_proxy, orgs):
    out = run_o7s(ray_proxy.env, "ctl", "workers", "1", "--admin", ray_proxy.admin.removeprefix("http://"))
    assert out.returncode == 0
    wait_for(lambda: sorted((w["machine"], w["machine_worker"], w["state"]) for w in cluster_state(ray_proxy))
             == [(0, 0, "up"), (1, 0, "up")], 30, "one worker per machine", ray_proxy)
    for org in orgs.values():
        with psycopg.connect(ray_proxy.dsn(org), autocommit=True) as c:
            assert c.execute("select 4").fetchone() == (4,)
            assert session_worker(c)[1] == 0
