"""The admin HTTP port on real sockets (Hypercorn on trio), hit with a real HTTP client; `o7s ctl` against it.

The cluster behind it is `InProcessCluster`, a small implementation of our own ClusterView interface over real
WorkerMetrics objects (the real one, o7s_cluster/cluster.py, gathers the same snapshots from worker processes).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from o7s_cluster.admin.http import AdminApp, AdminAuth, serve_admin
from o7s_cluster.admin.metrics import WorkerMetrics
from o7s_cluster.cli import main as cli


class InProcessCluster:
    """ClusterView over WorkerMetrics objects living in this process."""

    def __init__(self, n: int = 2) -> None:
        self.is_alive = True
        self.control_plane = True
        self.metrics: dict[int, WorkerMetrics] = {}
        self.states: dict[int, str] = {}
        self.silent: set[int] = set()  # workers that do not answer snapshot requests
        self.next_pid = 40000
        self.scale_calls: list[int] = []
        for i in range(n):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        self.next_pid += 1
        self.metrics[index] = WorkerMetrics(index, self.next_pid)
        self.states[index] = "up"

    def kill(self, index: int) -> None:
        del self.metrics[index]
        del self.states[index]

    def alive(self) -> bool:
        return self.is_alive

    async def ready(self) -> tuple[bool, dict]:
        up = sum(1 for s in self.states.values() if s == "up")
        ok = up == len(self.states) and self.control_plane
        return ok, {"workers_up": up, "workers_wanted": len(self.states), "control_plane": self.control_plane}

    async def snapshots(self) -> list[dict]:
        await trio.sleep(0)
        return [m.snapshot() for i, m in sorted(self.metrics.items()) if i not in self.silent]

    def workers(self) -> list[dict]:
        return [{"index": i, "pid": m.pid, "state": self.states[i], "started_at": m.started_at,
                 "orgs": sorted({o.org for o in m.orgs()})} for i, m in sorted(self.metrics.items())]

    async def set_workers(self, n: int) -> dict:
        self.scale_calls.append(n)
        for i in range(n):
            if i not in self.metrics:
                self._spawn(i)
        for i in [i for i in self.metrics if i >= n]:
            self.kill(i)
        return {"workers": n, "members": sorted(self.metrics)}


@pytest.fixture
def view() -> InProcessCluster:
    v = InProcessCluster(2)
    acme = v.metrics[0].org("acme", "pro")
    for _ in range(40):
        acme.query_done(0.004, 0, True)
    acme.client_connections, acme.backend_connections = 3, 1
    acme.queries, acme.errors, acme.throttled, acme.refused = 40, 2, 5, 1
    acme.bytes_in, acme.bytes_out = 1234, 56789
    acme.handoffs_in = 3
    v.metrics[1].handoffs_out = 3
    v.metrics[0].pool_state = lambda: {"acme": {"pool_in_use": 1, "pool_idle": 4, "pool_waiting": 0}}
    globex = v.metrics[1].org("globex", "free")
    globex.client_connections, globex.queries = 1, 7
    return v


TOKEN = "test-admin-token-0123456789"


class Admin:
    def __init__(self, host: str, port: int, app: AdminApp, token: str | None = TOKEN) -> None:
        self.host, self.port, self.app = host, port, app
        self.url = f"http://{host}:{port}"
        self.token = token

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A request with the admin token unless the caller gives its own headers."""
        if self.token is not None and "headers" not in kw:
            kw["headers"] = {"authorization": f"Bearer {self.token}"}

        def go() -> httpx.Response:
            with httpx.Client(base_url=self.url, timeout=10) as c:
                return c.request(method, path, **kw)

        return await trio.to_thread.run_sync(go)

    async def get(self, path: str) -> httpx.Response:
        return await self.request("GET", path)

    async def metrics(self) -> dict[str, dict[tuple, float]]:
        r = await self.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        out: dict[str, dict[tuple, float]] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out


@pytest.fixture
async def admin(view: InProcessCluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Admin]:
    monkeypatch.setenv("O7S_ADMIN_TOKEN", TOKEN)  # what `o7s ctl` sends
    app = AdminApp(view, rate_interval=0.3, auth=AdminAuth(TOKEN))
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: serve_admin(
            "127.0.0.1", 0, view, app=app, task_status=task_status))
        yield Admin(host, port, app)
        nursery.cancel_scope.cancel()


def acme_labels(**kw: str) -> tuple:
    return tuple(sorted({"org": "acme", "tier": "pro", **kw}.items()))


async def test_health(admin: Admin, view: InProcessCluster) -> None:
    r = await admin.get("/health")
    assert (r.status_code, r.text) == (200, "ok\n")
    assert r.headers["content-type"].startswith("text/plain")
    view.is_alive = False
    assert (await admin.get("/health")).status_code == 503


async def test_ready(admin: Admin, view: InProcessCluster) -> None:
    r = await admin.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "workers_up": 2, "workers_wanted": 2, "control_plane": True}
    view.control_plane = False
    r = await admin.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.json()["control_plane"] is False
    view.control_plane = True
    view.states[1] = "starting"
    r = await admin.get("/ready")
    assert r.status_code == 503 and r.json()["workers_up"] == 1


async def test_ready_times_out_as_not_ready(view: InProcessCluster) -> None:
    async def hangs() -> tuple[bool, dict]:
        await trio.sleep_forever()
        raise AssertionError

    view.ready = hangs  # type: ignore[method-assign]
    app = AdminApp(view, ready_timeout=0.2)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: serve_admin(
            "127.0.0.1", 0, view, app=app, task_status=task_status))
        r = await Admin(host, port, app).get("/ready")
        assert r.status_code == 503 and "timed out" in r.json()["error"]
        nursery.cancel_scope.cancel()


async def test_metrics_match_the_workers(admin: Admin, view: InProcessCluster) -> None:
    m = await admin.metrics()
    assert m["o7s_queries_total"] == {acme_labels(): 40, (("org", "globex"), ("tier", "free")): 7}
    assert m["o7s_query_errors_total"][acme_labels()] == 2
    assert m["o7s_queries_throttled_total"][acme_labels()] == 5
    assert m["o7s_queries_refused_total"][acme_labels()] == 1
    assert m["o7s_client_connections"][acme_labels()] == 3
    assert m["o7s_backend_connections"][acme_labels()] == 1
    assert m["o7s_bytes_received_total"][acme_labels()] == 1234
    assert m["o7s_bytes_sent_total"][acme_labels()] == 56789
    assert m["o7s_handoffs_total"][acme_labels()] == 3
    assert m["o7s_handoffs_sent_total"][()] == 3
    assert m["o7s_pool_connections"][acme_labels(state="idle")] == 4
    assert m["o7s_query_duration_seconds_count"][acme_labels()] == 40
    assert m["o7s_query_duration_seconds_bucket"][acme_labels(le="0.005")] == 40
    assert m["o7s_query_duration_seconds_bucket"][acme_labels(le="0.0025")] == 0
    assert m["o7s_worker_up"] == {(("worker", "0"),): 1, (("worker", "1"),): 1}
    assert m["o7s_workers"][(("state", "up"),)] == 2
    assert m["o7s_ready"][()] == 1

    # More queries: the counters follow. A worker that is killed keeps its counted queries in the total
    # (what it counted after the last gathering is lost with it).
    view.metrics[1].org("globex", "free").queries += 3
    assert (await admin.metrics())["o7s_queries_total"][(("org", "globex"), ("tier", "free"))] == 10
    view.metrics[1].org("globex", "free").queries += 1000
    view.kill(1)
    m = await admin.metrics()
    assert m["o7s_queries_total"][(("org", "globex"), ("tier", "free"))] == 10
    assert m["o7s_client_connections"][(("org", "globex"), ("tier", "free"))] == 0
    assert m["o7s_worker_up"] == {(("worker", "0"),): 1}
    # A live worker that does not answer is shown with its last figures and counted as stale.
    view.metrics[0].org("acme", "pro").queries += 1
    m = await admin.metrics()
    view.silent.add(0)
    view.metrics[0].org("acme", "pro").queries += 100  # not seen: the worker does not answer
    m = await admin.metrics()
    assert m["o7s_queries_total"][acme_labels()] == 41
    assert m["o7s_metrics_stale_workers"][()] == 1


async def test_head_and_errors(admin: Admin) -> None:
    r = await admin.request("HEAD", "/health")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "3"
    r = await admin.get("/nope")
    assert r.status_code == 404 and r.json()["error"].startswith("no such endpoint")
    r = await admin.request("POST", "/metrics")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = await admin.get("/v1/workers")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await admin.request("DELETE", "/v1/orgs/acme")
    assert r.status_code == 405
    assert (await admin.get("/health/")).status_code == 200


async def test_cluster(admin: Admin, view: InProcessCluster) -> None:
    r = await admin.get("/v1/cluster")
    assert r.status_code == 200
    doc = r.json()
    assert doc["count"] == 2 and doc["states"] == {"up": 2}
    w0, w1 = doc["workers"]
    assert (w0["index"], w0["pid"], w0["state"]) == (0, view.metrics[0].pid, "up")
    assert w0["orgs"] == ["acme"] and w1["orgs"] == ["globex"]
    assert w0["orgs_connected"] == ["acme"]
    assert w0["client_connections"] == 3 and w1["client_connections"] == 1
    assert w1["handoffs_out"] == 3


async def test_org_figures_and_qps(admin: Admin, view: InProcessCluster) -> None:
    t0 = time.monotonic()
    r = await admin.get("/v1/orgs/acme")  # no earlier sample: waits out the rate interval (0.3 s here)
    assert r.status_code == 200
    assert time.monotonic() - t0 >= 0.25
    doc = r.json()
    assert doc["org"] == "acme" and doc["tier"] == "pro" and doc["home_worker"] == 0
    assert doc["client_connections"] == 3 and doc["backend_connections"] == 1
    assert doc["throttled"] == 5 and doc["refused"] == 1
    assert doc["totals"]["queries"] == 40 and doc["totals"]["bytes_out"] == 56789
    assert doc["pool"] == {"in_use": 1, "idle": 4, "waiting": 0}
    assert doc["qps"] == 0.0 and doc["rates"]["window_seconds"] >= 0.299
    assert doc["latency_ms"]["count"] == 40
    assert 2.5 <= doc["latency_ms"]["p50"] <= 5.0 and doc["latency_ms"]["mean"] == pytest.approx(4.0)
    assert doc["workers"] == [{"worker": 0, "pid": view.metrics[0].pid, "client_connections": 3,
                               "backend_connections": 1, "queries": 40}]

    # 60 queries and 6 refusals over at least 0.3 s, then ask again.
    await trio.sleep(0.35)
    before = time.monotonic()
    acme = view.metrics[0].org("acme", "pro")
    acme.queries += 60
    acme.refused += 6
    r = await admin.get("/v1/orgs/acme")
    doc = r.json()
    window = doc["rates"]["window_seconds"]
    assert window >= 0.3
    assert doc["qps"] == pytest.approx(60 / window, rel=0.01)
    assert doc["rates"]["refused_per_second"] == pytest.approx(6 / window, rel=0.01)
    assert time.monotonic() - before < 5

    # An org seen only on another worker, with no pool state.
    doc = (await admin.get("/v1/orgs/globex")).json()
    assert doc["home_worker"] == 1 and doc["pool"] is None and doc["tier"] == "free"


async def test_every_org_at_once_matches_each_org(admin: Admin, view: InProcessCluster) -> None:
    """/v1/orgs (what the dashboard polls) gives every org as /v1/orgs/{org} does, with rates."""
    await admin.get("/v1/orgs/acme")  # a sample old enough for rates from now on
    await trio.sleep(0.35)
    acme = view.metrics[0].org("acme", "pro")
    for _ in range(30):  # slow ones now: the window's percentiles see them, the cumulative ones hardly
        acme.query_done(0.2, 0, True)
    r = await admin.get("/v1/orgs")
    assert r.status_code == 200
    doc = r.json()
    by_name = {o["org"]: o for o in doc["orgs"]}
    assert sorted(by_name) == ["acme", "globex"] and doc["count"] == 2
    assert by_name["acme"]["totals"]["queries"] == 70 and by_name["acme"]["qps"] > 0
    window, cumulative = by_name["acme"]["rates"]["latency_ms"], by_name["acme"]["latency_ms"]
    assert 100 <= window["p50"] <= 250 and window["p99"] <= 250  # all 30 took 200 ms
    assert cumulative["p50"] <= 5  # 40 of the 70 took 4 ms
    assert by_name["globex"]["rates"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert by_name["globex"]["tier"] == "free" and by_name["globex"]["qps"] == 0.0
    one = (await admin.get("/v1/orgs/globex")).json()
    for key in ("tier", "home_worker", "client_connections", "totals", "latency_ms", "workers"):
        assert by_name["globex"][key] == one[key], key


async def test_unknown_org_is_404(admin: Admin) -> None:
    r = await admin.get("/v1/orgs/initech")
    assert r.status_code == 404
    assert "initech" in r.json()["error"]
    r = await admin.get("/v1/orgs/a%2Fb")
    assert r.status_code == 404


async def test_set_workers(admin: Admin, view: InProcessCluster) -> None:
    r = await admin.request("POST", "/v1/workers", json={"count": 3})
    assert r.status_code == 200 and r.json() == {"workers": 3, "members": [0, 1, 2]}
    assert view.scale_calls == [3]
    bad = [{"count": 0}, {"count": 65}, {"count": "3"}, {"count": True}, {"count": 2.5}, {}, [3]]
    for body in bad:
        r = await admin.request("POST", "/v1/workers", json=body)
        assert r.status_code == 400, body
        assert "error" in r.json()
    r = await admin.request("POST", "/v1/workers", content=b"{not json")
    assert r.status_code == 400
    r = await admin.request("POST", "/v1/workers", content=b"x" * (70 * 1024))
    assert r.status_code == 413
    assert view.scale_calls == [3]
    assert (await admin.get("/v1/cluster")).json()["count"] == 3


async def test_a_failing_view_is_a_500_not_a_dead_port(admin: Admin, view: InProcessCluster) -> None:
    def broken() -> list[dict]:
        raise RuntimeError("boom")

    view.workers = broken  # type: ignore[method-assign]
    r = await admin.get("/v1/cluster")
    assert r.status_code == 500 and "boom" not in r.text
    assert (await admin.get("/health")).status_code == 200


async def test_busy_port_raises(admin: Admin, view: InProcessCluster) -> None:
    # A plain OSError (not hypercorn's exception groups), from nursery.start as from a direct call.
    with pytest.raises(OSError) as info:
        await serve_admin("127.0.0.1", admin.port, view)
    assert info.value.errno == errno.EADDRINUSE
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError):
            await nursery.start(serve_admin, "127.0.0.1", admin.port, view)


async def test_ipv6_loopback(view: InProcessCluster) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_admin, "::1", 0, view)
        assert host == "::1" and port > 0
        r = await trio.to_thread.run_sync(lambda: httpx.get(f"http://[::1]:{port}/health"))
        assert r.status_code == 200
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------- o7s ctl


async def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await trio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_ctl_status(admin: Admin, view: InProcessCluster, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await ctl(capsys, "ctl", "status", "--admin", f"127.0.0.1:{admin.port}")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("ready:    yes")
    assert lines[1].startswith("workers:  2")
    assert lines[2].split() == ["WORKER", "PID", "STATE", "UPTIME", "CLIENTS", "ORGS"]
    assert lines[3].split()[:3] == ["0", str(view.metrics[0].pid), "up"] and lines[3].endswith("acme")
    assert lines[4].split()[4:] == ["1", "globex"]
    view.control_plane = False
    rc, out, err = await ctl(capsys, "ctl", "status", "--json", "--admin", f"127.0.0.1:{admin.port}")
    assert rc == 0
    import json

    doc = json.loads(out)
    assert doc["ready"]["ready"] is False and doc["cluster"]["count"] == 2


async def test_ctl_workers(admin: Admin, view: InProcessCluster, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("O7S_ADMIN_LISTEN", f"0.0.0.0:{admin.port}")  # a wildcard listen address: loopback
    rc, out, err = await ctl(capsys, "ctl", "workers", "3")
    assert (rc, out, err) == (0, "worker count set to 3\n", "")
    assert view.scale_calls == [3]
    rc, out, _ = await ctl(capsys, "ctl", "workers")
    assert rc == 0 and out == "3 workers (3 up)\n"
    rc, out, err = await ctl(capsys, "ctl", "workers", "65")
    assert rc == 2 and out == "" and err == "o7s: error: the worker count must be between 1 and 64, not 65\n"
    rc, out, err = await ctl(capsys, "ctl", "workers", "two")
    assert rc == 2 and err.startswith("o7s: error: argument N: invalid int value")
    assert view.scale_calls == [3]


async def test_ctl_org(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await ctl(capsys, "ctl", "org", "acme", "--admin", f"127.0.0.1:{admin.port}")
    assert rc == 0, err
    assert out.startswith("org:          acme  (tier pro, home worker 0)\n")
    assert "connections:  3 client, 1 backend" in out
    assert "pool:         1 in use, 4 idle, 0 waiting" in out
    rc, out, err = await ctl(capsys, "ctl", "org", "initech", "--admin", f"127.0.0.1:{admin.port}")
    assert rc == 1 and err.startswith("o7s: error: GET /v1/orgs/initech: HTTP 404: org 'initech' is not known")


async def test_ctl_admin_address_from_the_settings_file(admin: Admin, capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("O7S_ADMIN_LISTEN", raising=False)
    conf = tmp_path / "o7s.toml"
    conf.write_text(f'admin_listen = "127.0.0.1:{admin.port}"\n')
    rc, out, err = await ctl(capsys, "ctl", "workers", "--config", str(conf))
    assert rc == 0 and out == "2 workers (2 up)\n", err


async def test_ctl_unreachable_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await trio.run_process(
        [sys.executable, "-m", "o7s_cluster", "ctl", "status", "--admin", f"127.0.0.1:{port}"],
        capture_stdout=True, capture_stderr=True, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("O7S_")})
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err == (f"o7s: error: cannot reach the admin port at http://127.0.0.1:{port}: Connection refused"
                   " (is `o7s serve --admin` running there?)\n")
    monkeypatch.delenv("O7S_ADMIN_LISTEN", raising=False)
    monkeypatch.delenv("O7S_CONFIG", raising=False)
    rc, out, err = await ctl(capsys, "ctl", "status")
    assert rc == 2 and err == ("o7s: error: no admin address: pass --admin HOST:PORT, or set O7S_ADMIN_LISTEN"
                               " or admin_listen\n")
    rc, out, err = await ctl(capsys, "ctl", "workers", "--admin", "nonsense")
    assert rc == 2 and err == "o7s: error: --admin: expected HOST:PORT, got 'nonsense'\n"


# ---------------------------------------------------------------------------------------------- authentication


async def test_changes_need_the_bearer_token(admin: Admin, view: InProcessCluster) -> None:
    for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token"}, {"authorization": TOKEN},
                    {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"}):
        r = await admin.request("POST", "/v1/workers", json={"count": 3}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == 'Bearer realm="o7s-admin"'
        assert "admin token" in r.json()["error"] and TOKEN not in r.text
    # Refused before routing: an unknown path or method tells an anonymous client nothing either.
    assert (await admin.request("POST", "/v1/nothing", headers={})).status_code == 401
    assert (await admin.request("DELETE", "/v1/orgs/acme", headers={})).status_code == 401
    assert view.scale_calls == [] and admin.app.auth_failures == 7
    r = await admin.request("POST", "/v1/workers", json={"count": 3}, headers={"authorization": f"bearer  {TOKEN}"})
    assert r.status_code == 200 and view.scale_calls == [3]
    # Reads stay open (admin_auth_reads is off), probes always.
    for path in ("/health", "/ready", "/metrics", "/v1/cluster", "/v1/orgs/acme"):
        assert (await admin.request("GET", path, headers={})).status_code == 200, path


async def test_without_a_token_changes_are_refused(view: InProcessCluster) -> None:
    app = AdminApp(view)  # no token configured
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: serve_admin(
            "127.0.0.1", 0, view, app=app, task_status=task_status))
        client = Admin(host, port, app)  # sends TOKEN: no token is accepted when none is configured
        r = await client.request("POST", "/v1/workers", json={"count": 3})
        assert r.status_code == 403 and "no admin token is configured" in r.json()["error"]
        r = await client.request("POST", "/v1/workers", json={"count": 3}, headers={})
        assert r.status_code == 403
        assert view.scale_calls == []
        assert (await client.get("/v1/cluster")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_auth_reads_protects_metrics_but_not_probes(view: InProcessCluster) -> None:
    auth = AdminAuth(TOKEN, reads=True)
    app = AdminApp(view, auth=lambda: auth)  # a callable: read on every request (SIGHUP rotation)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(lambda task_status: serve_admin(
            "127.0.0.1", 0, view, app=app, task_status=task_status))
        client = Admin(host, port, app)
        for path in ("/metrics", "/v1/cluster", "/v1/orgs/acme"):
            assert (await client.request("GET", path, headers={})).status_code == 401, path
            assert (await client.request("HEAD", path, headers={})).status_code == 401, path
            assert (await client.get(path)).status_code == 200, path
        for path in ("/health", "/ready", "/health/"):
            assert (await client.request("GET", path, headers={})).status_code == 200, path
        auth = AdminAuth("a-rotated-token-0123456789", reads=True)
        assert (await client.get("/metrics")).status_code == 401
        nursery.cancel_scope.cancel()


def test_admin_token_settings() -> None:
    from o7s_cluster.config import ConfigError, load_settings

    s = load_settings(env={"O7S_ADMIN_TOKEN": TOKEN, "O7S_ADMIN_AUTH_READS": "true"})
    assert (s.admin_token, s.admin_auth_reads) == (TOKEN, True)
    assert TOKEN not in repr(s)
    assert load_settings(env={}, overrides={"admin_token": TOKEN}).admin_auth_reads is False
    with pytest.raises(ConfigError, match="at least 16") as info:
        load_settings(env={"O7S_ADMIN_TOKEN": "short"})
    assert "short" not in str(info.value)
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings(env={"O7S_ADMIN_TOKEN": "sixteen chars with spaces"})
    with pytest.raises(ConfigError, match="needs an admin_token"):
        load_settings(env={"O7S_ADMIN_AUTH_READS": "1"})


async def test_ctl_sends_the_token(admin: Admin, view: InProcessCluster, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    where = ("--admin", f"127.0.0.1:{admin.port}")
    monkeypatch.delenv("O7S_ADMIN_TOKEN")
    monkeypatch.delenv("O7S_CONFIG", raising=False)
    rc, out, err = await ctl(capsys, "ctl", "workers", "3", *where)
    assert rc == 1 and err.startswith("o7s: error: POST /v1/workers: HTTP 401: this admin request needs the admin token")
    rc, out, err = await ctl(capsys, "ctl", "workers", "3", "--admin-token", "not-the-token-0123456789", *where)
    assert rc == 1 and "HTTP 401" in err and view.scale_calls == []
    conf = tmp_path / "o7s.toml"
    conf.write_text(f'admin_token = "{TOKEN}"\n')
    rc, out, err = await ctl(capsys, "ctl", "workers", "3", "--config", str(conf), *where)
    assert (rc, out, err) == (0, "worker count set to 3\n", "")
    rc, out, err = await ctl(capsys, "ctl", "workers", "2", "--admin-token", TOKEN, *where)
    assert rc == 0 and view.scale_calls == [3, 2]


# ---------------------------------------------------------------------------------------------- a real `o7s serve`


def _http(method: str, url: str, token: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url, headers=headers, timeout=10, **kw)


def _ctl_env(env: dict[str, str], admin: int, token: str | None) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k not in ("O7S_ADMIN_TOKEN", "O7S_CONFIG")}
    out["O7S_ADMIN_LISTEN"] = f"127.0.0.1:{admin}"
    if token:
        out["O7S_ADMIN_TOKEN"] = token
    return out


def _wait_workers(url: str, n: int, token: str | None = None) -> None:
    deadline = time.monotonic() + 20
    while sum(w["state"] == "up" for w in _http("GET", f"{url}/v1/cluster", token).json()["workers"]) != n:
        assert time.monotonic() < deadline, "workers did not come up"
        time.sleep(0.1)


def test_serve_admin_token_scaling_scrape_and_rotation(migrated, tmp_path) -> None:
    from conftest import free_port, run_o7s, start_proxy, stop_proxy

    admin = free_port()
    url = f"http://127.0.0.1:{admin}"
    config = tmp_path / "o7s.toml"
    old, new = "first-admin-token-0123456789", "rotated-admin-token-9876543210"
    config.write_text(f'admin_token = "{old}"\nadmin_auth_reads = true\n')
    p = start_proxy(migrated, tmp_path, "--workers", "1", "--admin", f"127.0.0.1:{admin}", "--config", str(config))
    try:
        deadline = time.monotonic() + 20
        while _http("GET", f"{url}/ready").status_code != 200:  # probes need no token
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _http("GET", f"{url}/health").status_code == 200
        # Prometheus with `authorization: {credentials: ...}` in its scrape config: a bearer token.
        assert _http("GET", f"{url}/metrics").status_code == 401
        scrape = _http("GET", f"{url}/metrics", old)
        assert scrape.status_code == 200 and "o7s_workers_target" in scrape.text
        r = _http("POST", f"{url}/v1/workers", json={"count": 2})
        assert r.status_code == 401
        out = run_o7s(_ctl_env(migrated, admin, None), "ctl", "workers", "2", check=False)
        assert out.returncode == 1 and "HTTP 401" in out.stderr and old not in out.stderr
        out = run_o7s(_ctl_env(migrated, admin, old), "ctl", "workers", "2")
        assert out.stdout == "worker count set to 2\n"
        _wait_workers(url, 2, old)
        # SIGHUP rotates the token: the old one stops working, the new one works.
        config.write_text(f'admin_token = "{new}"\nadmin_auth_reads = true\n')
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _http("GET", f"{url}/v1/cluster", old).status_code != 401:
            assert time.monotonic() < deadline, "the token was not rotated"
            time.sleep(0.1)
        assert run_o7s(_ctl_env(migrated, admin, new), "ctl", "workers", "1").returncode == 0
        _wait_workers(url, 1, new)
    finally:
        stop_proxy(p)


def test_serve_without_a_token_refuses_changes(migrated, tmp_path) -> None:
    from conftest import free_port, run_o7s, start_proxy, stop_proxy

    admin = free_port()
    url = f"http://127.0.0.1:{admin}"
    p = start_proxy(_ctl_env(migrated, admin, None), tmp_path, "--workers", "1", "--admin", f"127.0.0.1:{admin}")
    try:
        deadline = time.monotonic() + 20
        while _http("GET", f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _http("GET", f"{url}/metrics").status_code == 200  # reads are open by default
        out = run_o7s(_ctl_env(migrated, admin, "any-token-at-all-0123456789"), "ctl", "workers", "2", check=False)
        assert out.returncode == 1 and "HTTP 403" in out.stderr and "no admin token is configured" in out.stderr
        assert len(_http("GET", f"{url}/v1/cluster").json()["workers"]) == 1
    finally:
        stop_proxy(p)
