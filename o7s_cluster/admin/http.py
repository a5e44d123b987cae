"""The admin HTTP port, served by the supervisor process: health, readiness, metrics, cluster and org figures.

Endpoints (JSON is orjson; errors are ``{"error": "..."}``)::

    GET  /health          200 "ok" while the supervisor is alive (503 "not alive" otherwise)
    GET  /ready           200 / 503, {"ready": bool, ...the view's reasons...}
    GET  /metrics         Prometheus text format 0.0.4, aggregated over all workers (see metrics.py)
    GET  /v1/cluster      workers: index, pid, state, started_at, the orgs each one holds (+ live connections)
    GET  /v1/orgs         every org the workers have seen, each as /v1/orgs/{org} gives it
    GET  /v1/orgs/{org}   live connections, qps and other rates, totals, latency, pool state; 404 if never seen
    POST /v1/workers      {"count": N} with 1 <= N <= 64: scale the cluster; 200 with the new state, 400 on bad input
    GET  /dashboard       the live dashboard (admin/dashboard/: its login, cookie and JSON reads are described there)

Every call but /health, /ready and /metrics is audited (``admin_call`` rows of platform.audit_log, counted per
window by the supervisor's recorder: method, path, status, client address).

Authentication (``AdminAuth``): every state-changing request (any method but GET/HEAD) needs
``Authorization: Bearer <admin_token>``, compared in constant time; 401 without it or with a wrong one. With no
token configured such requests are refused (403) wherever they come from: a loopback exception would open the
port to anything that proxies to it from the same host. Reads (/metrics, /v1/cluster, /v1/orgs) are open unless
``admin_auth_reads`` is set; /health and /ready are always open (liveness probes carry no credentials).

HTTP is served by Hypercorn's trio worker (``hypercorn.trio.serve``): it does the HTTP/1.1 parsing, keep-alive
and graceful shutdown, which are the parts worth not writing. The application on top is a small hand-routed
ASGI callable rather than Starlette: there are six fixed routes with no middleware, templates or forms, and
keeping the supervisor free of a web framework (and of the anyio layer Starlette needs on trio) leaves one
less thing between an SRE and the figures when the cluster is in trouble.

Rates (``qps`` and friends in ``/v1/orgs/{org}``) are computed in this process from the counters of two
gatherings at least ``rate_interval`` (1 s) apart: every gathering (any ``/metrics`` scrape, ``/v1/cluster``
or ``/v1/orgs`` request) keeps a small sample of per-org totals, at most one per second, the last 16. A
request that finds no sample old enough gathers, waits out the rest of the interval and gathers again, so the
first ``/v1/orgs`` call after a quiet spell takes up to a second and later ones answer at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import orjson
import trio

from o7s_cluster.config import parse_listen
from o7s_cluster.usage.audit import ADMIN_CALL, AuditBuffer
from o7s_cluster.admin.dashboard import PRIVATE_PREFIX, Dashboard, bearer_ok, cookie_ok
from o7s_cluster.admin.figures import fill_orgs, all_org_figures, org_figures, quantile_ms
from o7s_cluster.admin.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    CounterCarry,
    LabelBudget,
    DEFAULT_MAX_ORG_LABELS,
    render_prometheus,
)

log = logging.getLogger("o7s.admin")

MIN_WORKERS, MAX_WORKERS = 1, 64
MAX_BODY = 64 * 1024
_RATE_FIELDS = ("queries", "errors", "throttled", "refused")
_N_BUCKETS = len(LATENCY_BUCKETS) + 1  # the last counts observations above the highest bound
OPEN_PATHS = frozenset(("/health", "/ready"))  # never need a token: probes
UNAUDITED_PATHS = OPEN_PATHS | {"/metrics"}  # probes and scrapes are not admin actions
_READ_METHODS = frozenset(("GET", "HEAD"))
_CHALLENGE = [(b"www-authenticate", b'Bearer realm="o7s-admin"')]


@dataclass(frozen=True)
class AdminAuth:
    """Who may do what on the admin port (from the settings; read again on every request, so SIGHUP rotates it)."""

    token: str | None = None
    reads: bool = False  # /metrics and /v1/* reads need the token too

    @classmethod
    def from_settings(cls, settings: Any) -> AdminAuth:
        return cls(settings.admin_token, bool(settings.admin_auth_reads))


class ClusterView(Protocol):
    """What the supervisor gives the admin server (implemented by the cluster, o7s_cluster/cluster.py)."""

    def alive(self) -> bool: ...

    async def ready(self) -> tuple[bool, dict]: ...  # all workers up and control plane reachable; dict explains

    async def snapshots(self) -> list[dict]: ...  # WorkerMetrics.snapshot() of every live worker

    def workers(self) -> list[dict]: ...  # [{"index", "pid", "state", "started_at", "orgs": [...]}, ...]

    async def set_workers(self, n: int) -> dict: ...  # scale; returns the new state


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _Sample:
    __slots__ = ("t", "totals", "buckets")

    def __init__(self, t: float, totals: dict[str, list[float]], buckets: dict[str, list[int]] | None = None) -> None:
        self.t = t
        self.totals = totals  # org -> [queries, errors, throttled, refused, latency_sum, latency_count]
        self.buckets = buckets or {}  # org -> latency histogram counts (the window's percentiles)


class AdminApp:
    """The ASGI application. One per admin server; it keeps the state rates and stable labels need."""

    def __init__(self, view: ClusterView, *, max_org_labels: int = DEFAULT_MAX_ORG_LABELS,
                 gather_timeout: float = 5.0, ready_timeout: float = 5.0, rate_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 auth: AdminAuth | Callable[[], AdminAuth] = AdminAuth(), audit: AuditBuffer | None = None,
                 platform_dsn: Callable[[], str | None] | None = None) -> None:
        self.view = view
        self.audit = audit  # every call but probes and scrapes is counted here (usage/audit.py)
        self.dashboard = Dashboard(platform_dsn)
        self._auth = auth
        self.auth_failures = 0  # requests refused for a missing or wrong token
        self.gather_timeout = gather_timeout
        self.ready_timeout = ready_timeout
        self.rate_interval = rate_interval
        self.clock = clock
        self.carry = CounterCarry()
        self.budget = LabelBudget(max_org_labels)
        self.samples: deque[_Sample] = deque(maxlen=16)
        self._gather_lock = trio.Lock()
        self._latest = _Sample(clock(), {})
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[tuple[int, list, bytes]]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/v1/cluster"): self.cluster,
            ("GET", "/v1/orgs"): self.orgs,
            ("GET", "/v1/dashboard/account"): self.dashboard.account,
            ("GET", "/v1/dashboard/audit"): self.dashboard.audit,
            ("POST", "/v1/workers"): self.set_workers,
        }

    # ------------------------------------------------------------------------------------------ ASGI

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope["method"]
        head = method == "HEAD"
        try:
            path = scope["path"]
            if path == "/dashboard" or path.startswith("/dashboard/"):  # checks the token itself (cookie)
                status, headers, body = await self.dashboard.page(
                    "GET" if head else method, path, scope.get("query_string", b""), scope.get("headers") or (),
                    receive, self._current_auth().token)
            else:
                self._authorize(method, path, scope.get("headers") or (), scope.get("client"))
                status, headers, body = await self._dispatch("GET" if head else method, path, receive)
        except HTTPError as e:
            status, headers, body = e.status, [(b"content-type", b"application/json"), *e.headers], \
                orjson.dumps({"error": e.message})
        except Exception:  # noqa: BLE001 - one bad request must not take the admin port down
            log.exception("admin request failed", extra={"path": scope["path"], "method": method})
            status, headers, body = 500, [(b"content-type", b"application/json")], \
                orjson.dumps({"error": "internal error (see the supervisor's log)"})
        if self.audit is not None and not self._dashboard_poll(method, scope):
            self._audit(method, scope["path"], status, scope.get("client"))
        headers = [*headers, (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    def _audit(self, method: str, path: str, status: int, client: Any) -> None:
        """One admin call in the audit log (aggregated per window): not probes, not Prometheus scrapes."""
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        if path in UNAUDITED_PATHS:
            return
        org = None
        if path.startswith("/v1/orgs/"):
            org, path = unquote(path[len("/v1/orgs/"):]), "/v1/orgs/{org}"
        assert self.audit is not None
        self.audit.add(ADMIN_CALL, org, source=client[0] if client else None, method=method[:16],
                       detail={"path": path, "status": status})

    def _dashboard_poll(self, method: str, scope: dict) -> bool:
        """An open dashboard's reads (its static files, and GETs carrying its session cookie) are not admin
        actions: auditing them would add rows every window for every screen. Its logins are audited."""
        path = scope["path"]
        if path.startswith("/dashboard/") and path != "/dashboard/login":
            return True
        token = self._current_auth().token
        return method in _READ_METHODS and token is not None and cookie_ok(scope.get("headers") or (), token)

    def _current_auth(self) -> AdminAuth:
        return self._auth() if callable(self._auth) else self._auth

    def _authorize(self, method: str, path: str, headers: Any, client: Any) -> None:
        """Refuse (401/403) before routing, so an unauthenticated client learns nothing of the routes."""
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        if path in OPEN_PATHS:
            return
        auth = self._current_auth()
        write = method not in _READ_METHODS
        private = path.startswith(PRIVATE_PREFIX)  # the dashboard's billing and audit reads
        if not write and not auth.reads and not private:
            return
        if auth.token is None:
            raise HTTPError(403, ("the dashboard's reads are" if private else "state-changing admin requests are")
                            + " disabled: no admin token is configured (set O7S_ADMIN_TOKEN or admin_token on"
                              " `o7s serve`)")
        # The dashboard's session cookie counts for reads only: a cross-site form must not change anything.
        ok = bearer_ok(headers, auth.token) or (not write and cookie_ok(headers, auth.token))
        if not ok:
            self.auth_failures += 1
            log.warning("admin request refused: missing or wrong token",
                        extra={"path": path[:200], "method": method[:16],
                               "peer": f"{client[0]}:{client[1]}" if client else "?"})
            raise HTTPError(401, "this admin request needs the admin token: Authorization: Bearer <token>"
                                 " (o7s ctl sends $O7S_ADMIN_TOKEN)", _CHALLENGE)

    async def _dispatch(self, method: str, path: str, receive: Callable) -> tuple[int, list, bytes]:
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        handler = self._routes.get((method, path))
        if handler is not None:
            if method == "POST":
                return await handler(await self._body(receive))
            return await handler()
        if path.startswith("/v1/orgs/") and len(path) > len("/v1/orgs/"):
            if method != "GET":
                raise HTTPError(405, "method not allowed", [(b"allow", b"GET, HEAD")])
            return await self.org(unquote(path[len("/v1/orgs/"):]))
        allowed = [m for (m, p) in self._routes if p == path]
        if allowed:
            allow = ", ".join(sorted({*allowed, *(["HEAD"] if "GET" in allowed else [])}))
            raise HTTPError(405, "method not allowed", [(b"allow", allow.encode())])
        raise HTTPError(404, f"no such endpoint: {path}")

    @staticmethod
    async def _body(receive: Callable) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise HTTPError(413, f"request body over {MAX_BODY} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # ------------------------------------------------------------------------------------------ gathering

    async def gather(self) -> tuple[list[dict], list[dict]]:
        """Snapshots of every worker (with stale ones for live workers that did not answer and the
        carried-over counters of dead ones), and the view's worker list."""
        async with self._gather_lock:
            snaps: list[dict] = []
            with trio.move_on_after(self.gather_timeout) as scope:
                snaps = list(await self.view.snapshots())
            if scope.cancelled_caught:
                log.warning("workers' metrics snapshots timed out", extra={"timeout": self.gather_timeout})
            workers = [dict(w) for w in self.view.workers()]
            fill_orgs(workers, snaps)
            live = [int(w["pid"]) for w in workers if w.get("pid") and w.get("state", "up") not in ("dead", "down")]
            effective = self.carry.update(snaps, live)
            self._sample(effective)
            return effective, workers

    def _sample(self, snapshots: list[dict]) -> _Sample:
        totals: dict[str, list[float]] = {}
        buckets: dict[str, list[int]] = {}
        for snap in snapshots:
            for o in snap.get("orgs", ()):
                acc = totals.get(o["org"])
                if acc is None:
                    acc = totals[o["org"]] = [0, 0, 0, 0, 0.0, 0]
                    buckets[o["org"]] = [0] * _N_BUCKETS
                for i, name in enumerate(_RATE_FIELDS):
                    acc[i] += o.get(name, 0)
                acc[4] += o.get("latency_sum", 0.0)
                counts = o.get("latency_counts", ())
                acc[5] += sum(counts)
                b = buckets[o["org"]]
                for i, c in enumerate(counts[:_N_BUCKETS]):
                    b[i] += c
        sample = _Sample(self.clock(), totals, buckets)
        if not self.samples or sample.t - self.samples[-1].t >= self.rate_interval - 1e-3:
            self.samples.append(sample)
        self._latest = sample
        return sample

    def _baseline(self, now: float) -> _Sample | None:
        """The newest kept sample at least rate_interval older than `now`."""
        for s in reversed(self.samples):
            if now - s.t >= self.rate_interval - 1e-3:
                return s
        return None

    # ------------------------------------------------------------------------------------------ endpoints

    async def health(self) -> tuple[int, list, bytes]:
        ok = self.view.alive()
        return (200 if ok else 503), [(b"content-type", b"text/plain; charset=utf-8")], \
            (b"ok\n" if ok else b"not alive\n")

    async def _ready(self) -> tuple[bool, dict]:
        with trio.move_on_after(self.ready_timeout):
            ok, why = await self.view.ready()
            return bool(ok), dict(why or {})
        return False, {"error": f"readiness check timed out after {self.ready_timeout:g} s"}

    async def ready(self) -> tuple[int, list, bytes]:
        ok, why = await self._ready()
        return (200 if ok else 503), [(b"content-type", b"application/json")], \
            orjson.dumps({"ready": ok, **why}, default=str)

    async def metrics(self) -> tuple[int, list, bytes]:
        snaps, workers = await self.gather()
        ok, _ = await self._ready()
        cluster = {"workers": workers, "ready": ok, "stale_workers": self.carry.stale}
        target = getattr(self.view, "target", None)  # the supervisor's worker count, when it has one
        if isinstance(target, int):
            cluster["target_workers"] = target
        body = render_prometheus(snaps, cluster=cluster, budget=self.budget)
        return 200, [(b"content-type", CONTENT_TYPE.encode())], body

    async def cluster(self) -> tuple[int, list, bytes]:
        snaps, workers = await self.gather()
        by_pid = {int(s.get("pid", 0)): s for s in snaps if int(s.get("worker", -1)) >= 0}
        out = []
        states: dict[str, int] = {}
        for w in workers:
            w = dict(w)
            states[str(w.get("state"))] = states.get(str(w.get("state")), 0) + 1
            snap = by_pid.get(int(w.get("pid") or 0))
            if snap is not None:
                w["client_connections"] = sum(o.get("client_connections", 0) for o in snap.get("orgs", ()))
                w["backend_connections"] = sum(o.get("backend_connections", 0) for o in snap.get("orgs", ()))
                w["sessions_total"] = snap.get("sessions_total", 0)
                w["handoffs_out"] = snap.get("handoffs_out", 0)
            out.append(w)
        doc = {"workers": out, "count": len(out), "states": states, "stale_workers": self.carry.stale}
        return 200, [(b"content-type", b"application/json")], orjson.dumps(doc, default=str)

    async def _rated(self, present: bool) -> tuple[list[dict], list[dict], _Sample, _Sample | None]:
        """Gather, and when no kept sample is old enough for rates (and there is something to rate), wait
        out the rest of the interval and gather again."""
        snaps, workers = await self.gather()
        now = self._latest
        base = self._baseline(now.t)
        if base is None and (present or now.totals):
            oldest = self.samples[0].t if self.samples else now.t
            await trio.sleep(max(0.0, self.rate_interval - (now.t - oldest)))
            snaps, workers = await self.gather()
            now = self._latest
            base = self._baseline(now.t)
        return snaps, workers, now, base

    @staticmethod
    def _add_rates(doc: dict, name: str, now: _Sample, base: _Sample | None) -> dict:
        if base is None:
            doc["rates"], doc["qps"] = None, None
            return doc
        dt = now.t - base.t
        cur = now.totals.get(name, [0, 0, 0, 0, 0.0, 0])
        old = base.totals.get(name, [0, 0, 0, 0, 0.0, 0])
        d = [max(0.0, c - o) for c, o in zip(cur, old)]
        doc["rates"] = {
            "window_seconds": round(dt, 3),
            "qps": round(d[0] / dt, 3), "errors_per_second": round(d[1] / dt, 3),
            "throttled_per_second": round(d[2] / dt, 3), "refused_per_second": round(d[3] / dt, 3),
            "mean_latency_ms": round(d[4] / d[5] * 1000, 3) if d[5] else None,
        }
        zero = [0] * _N_BUCKETS
        window = [max(0, c - o) for c, o in zip(now.buckets.get(name, zero), base.buckets.get(name, zero))]
        doc["rates"]["latency_ms"] = {"p50": quantile_ms(0.50, window), "p95": quantile_ms(0.95, window),
                                      "p99": quantile_ms(0.99, window)}  # of the window's queries
        doc["qps"] = doc["rates"]["qps"]
        return doc

    async def org(self, name: str) -> tuple[int, list, bytes]:
        snaps, workers, now, base = await self._rated(name in self._latest.totals)
        doc = org_figures(name, snaps, workers)
        if doc is None:
            raise HTTPError(404, f"org {name!r} is not known to this cluster (no session since the workers started)")
        self._add_rates(doc, name, now, base)
        return 200, [(b"content-type", b"application/json")], orjson.dumps(doc, default=str)

    async def orgs(self) -> tuple[int, list, bytes]:
        """Every org the workers have seen, each as /v1/orgs/{org} gives it (the dashboard polls this)."""
        snaps, workers, now, base = await self._rated(False)
        docs = [self._add_rates(doc, name, now, base) for name, doc in all_org_figures(snaps, workers).items()]
        return 200, [(b"content-type", b"application/json")], \
            orjson.dumps({"orgs": docs, "count": len(docs)}, default=str)

    async def set_workers(self, body: bytes) -> tuple[int, list, bytes]:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HTTPError(400, 'expected a JSON body like {"count": 3}') from None
        count = req.get("count") if isinstance(req, dict) else None
        if isinstance(count, bool) or not isinstance(count, int):
            raise HTTPError(400, 'expected a JSON body like {"count": 3}, with a whole number')
        if not MIN_WORKERS <= count <= MAX_WORKERS:
            raise HTTPError(400, f"count must be between {MIN_WORKERS} and {MAX_WORKERS}, not {count}")
        try:
            state = await self.view.set_workers(count)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        log.info("worker count changed through the admin port", extra={"workers": count})
        return 200, [(b"content-type", b"application/json")], orjson.dumps(state, default=str)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve_admin(host: str, port: int, view: ClusterView, *,
                      task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
                      shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                      app: AdminApp | None = None,
                      auth: AdminAuth | Callable[[], AdminAuth] = AdminAuth(),
                      audit: AuditBuffer | None = None,
                      platform_dsn: Callable[[], str | None] | None = None) -> None:
    """Serve the admin HTTP port on host:port (port 0: a free one) until cancelled or `shutdown_trigger`
    returns. ``task_status.started((host, port))`` reports the address actually bound. An address that cannot
    be bound raises OSError before ``started``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [_bind(host, port)]
    config.accesslog = None
    http_log = logging.getLogger("o7s.admin.http")
    if http_log.level == logging.NOTSET:
        http_log.setLevel(logging.WARNING)  # not Hypercorn's "Running on ... (CTRL + C to quit)": we log our own
    config.errorlog = http_log
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    app = app or AdminApp(view, auth=auth, audit=audit, platform_dsn=platform_dsn)

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger or trio.sleep_forever, task_status=task_status)

    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(run)
            started = True
            bound = parse_listen(binds[0].split("://", 1)[1])
            log.info("admin HTTP port open", extra={"admin": f"http://{_bind(*bound)}"})
            task_status.started(bound)
    except BaseExceptionGroup as group:
        # Hypercorn's nurseries wrap a bind error (address in use, not ours...) in exception groups:
        # give the caller the plain OSError, as a socket bind would.
        leaves = list(_leaves(group))
        if not started and len(leaves) == 1 and isinstance(leaves[0], OSError):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> Any:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


__all__ = ["AdminApp", "AdminAuth", "ClusterView", "MAX_WORKERS", "MIN_WORKERS", "org_figures", "serve_admin"]
