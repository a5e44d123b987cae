"""Runs the Locust scenario against each target in turn and collects what the report needs."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from loadtest import infra
from loadtest.hdr import Histogram

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
STATEMENTS_PER_OP = {"read": 1, "update": 1, "txn": 6}  # txn: BEGIN, 4 statements, COMMIT


@dataclass
class Options:
    users: int = 1000
    rate: float = 1000.0            # offered requests/s, all users together
    duration: float = 60.0          # measured seconds per target
    warmup: float = 5.0             # after all users are connected and phased in
    spawn_rate: float = 0.0         # users/s (0: min(users, 100))
    locust_processes: int = 2       # Locust worker processes (1: a single local runner)
    orgs: int = 8
    tier: str = "enterprise"
    rows: int = 10000
    mix: dict = field(default_factory=lambda: {"read": 80, "update": 15, "txn": 5})
    workers: list = field(default_factory=lambda: [2])  # o7s serve --workers; several: one O7s target each
    targets: list = field(default_factory=lambda: ["direct", "pgbouncer", "o7s"])
    prepare_threshold: int | None = None
    locust_stats: bool = True
    phase_jitter: bool = True
    fast_wait: bool = True
    out: str = str(HERE / "results")
    keep: bool = False

    def spawn(self) -> float:
        return self.spawn_rate or float(min(self.users, 100))


CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat after the name, from its 3rd field: utime, stime, cutime, cstime are the 14th-17th
TICK_FIELDS = {"ticks": (11, 12, 13, 14), "user": (11, 13), "system": (12, 14)}


def _proc_table(clock: str = "schedstat") -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, name, CPU seconds). CPU comes from /proc/PID/schedstat (nanoseconds on a CPU,
    exact), not from utime/stime: this kernel does tick-based accounting with tickless idle, so a
    process that runs in short bursts after waking from idle (a Postgres backend answering one
    query) is mostly never charged a tick — 1,000 backends show almost no CPU that way.
    clock="ticks" reads utime + stime + cutime + cstime from /proc/PID/stat instead ("user":
    utime + cutime, "system": stime + cstime): every thread
    (schedstat counts only the main one), and the children it has reaped, so a tree's delta
    between two snapshots includes processes that came and went in between (PostgreSQL backends
    of a client that disconnected: the postmaster reaps them)."""
    out: dict[int, tuple[int, str, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
            if clock == "schedstat":
                with open(f"/proc/{d}/schedstat", "rb") as f:
                    ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        lp, rp = st.find(b"("), st.rfind(b")")
        name = st[lp + 1:rp].decode(errors="replace")
        fields = st[rp + 2:].split()
        ppid = int(fields[1])
        if clock in TICK_FIELDS:
            cpu = sum(int(fields[i]) for i in TICK_FIELDS[clock]) / CLK_TCK
        else:
            cpu = ns / 1e9
        out[int(d)] = (ppid, name, cpu)
    return out


def cpu_snapshot(roots: dict[str, int], clock: str = "schedstat") -> dict[str, dict[int, tuple[str, float]]]:
    """Per named root, CPU seconds of it and every descendant, per pid; plus the kernel's kdamond
    threads under "kdamond"."""
    info = _proc_table(clock)
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in info.items():
        kids.setdefault(ppid, []).append(pid)
    out: dict[str, dict[int, tuple[str, float]]] = {}
    for tag, root in roots.items():
        tree, todo = {}, [root]
        while todo:
            pid = todo.pop()
            if pid in info:
                tree[pid] = (info[pid][1], info[pid][2])
            todo.extend(kids.get(pid, ()))
        out[tag] = tree
    out["kdamond"] = {pid: (n, c) for pid, (_, n, c) in info.items() if n.startswith("kdamond")}
    return out


def cpu_delta(a: dict, b: dict) -> dict[int, tuple[str, float]]:
    """Per-pid CPU used between two snapshots (a pid that appeared in b counts from zero)."""
    return {pid: (name, sec - a.get(pid, (name, 0.0))[1]) for pid, (name, sec) in b.items()}


def machine_cpu() -> tuple[float, float, float]:
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
    return busy, busy + t.idle + getattr(t, "iowait", 0.0), t.softirq


@dataclass
class Stack:
    """The servers of one benchmark run: Postgres with the data set, PgBouncer, O7s."""

    opts: Options
    workdir: Path
    pg: infra.Postgres | None = None
    bouncer: infra.PgBouncer | None = None
    o7s: infra.O7s | None = None
    orgs: list = field(default_factory=list)
    o7s_note: str = ""
    o7s_env: dict = field(default_factory=dict)
    o7s_help: str = ""

    def start(self, log=print) -> "Stack":
        o = self.opts
        infra.raise_fd_limit()
        self.orgs = infra.make_orgs(o.orgs, o.tier)
        want_o7s = any(t.startswith("o7s") for t in o.targets)
        sizes = {"free": 3, "starter": 5, "pro": 20, "enterprise": 50}
        pool_total = sizes.get(o.tier, 50) * o.orgs
        maxconn = o.users + pool_total * (2 if want_o7s else 1) + 50
        log(f"starting PostgreSQL (max_connections={maxconn})")
        self.pg = infra.Postgres(self.workdir / "pg", max_connections=maxconn).start()
        log(f"loading {o.rows} accounts into each of {o.orgs} org databases")
        infra.load_dataset(self.pg, self.orgs, o.rows)
        if want_o7s:
            ok, help_text = infra.o7s_available()
            self.o7s_help = help_text
            if not ok:
                raise RuntimeError(f"o7s serve is not available in this checkout:\n{help_text[-2000:]}")
            log("provisioning orgs in the O7s control plane (o7s migrate, o7s org create)")
            self.o7s_env = infra.provision_o7s(self.pg, self.orgs)
            sizes = infra.tier_pool_sizes(self.pg, "o7s_platform")
        for org in self.orgs:
            org.pool_size = sizes[org.tier]
        if "pgbouncer" in o.targets:
            log(f"starting PgBouncer (transaction mode, pool_size {self.orgs[0].pool_size} per org)")
            self.bouncer = infra.PgBouncer(self.workdir / "pgbouncer", self.pg, self.orgs,
                                           max_client_conn=o.users + 100).start()
        return self

    def target_names(self) -> list[str]:
        """`o7s` becomes one target per worker count when several are asked for (o7s-w1, o7s-w2)."""
        out = []
        for t in self.opts.targets:
            if t == "o7s" and len(self.opts.workers) > 1:
                out += [f"o7s-w{w}" for w in self.opts.workers]
            else:
                out.append(t)
        return out

    def begin(self, target: str, log=print) -> None:
        """O7s starts fresh for its run (so it holds no idle pools during the others)."""
        if not target.startswith("o7s"):
            return
        w = int(target[5:]) if target.startswith("o7s-w") else (self.opts.workers[0] if self.opts.workers else 0)
        if w and "--workers" not in self.o7s_help:
            self.o7s_note = f"`o7s serve` has no --workers option in this checkout: ran its default (asked for {w})"
            w = 0
        log(f"starting o7s serve" + (f" --workers {w}" if w else ""))
        self.o7s = infra.O7s(self.workdir / target, self.o7s_env, workers=w).start()
        time.sleep(1.0)  # let every worker come up before the first connection

    def end(self, target: str) -> None:
        if target.startswith("o7s") and self.o7s is not None:
            self.o7s.stop()
            self.o7s = None

    def dsns(self, target: str) -> list[str]:
        if target == "direct":
            return [self.pg.url(g.name, g.password, g.dbname) for g in self.orgs]
        if target == "pgbouncer":
            return [self.bouncer.url(g) for g in self.orgs]
        if target.startswith("o7s"):
            return [self.o7s.url(g) for g in self.orgs]
        raise ValueError(target)

    def proxy_pid(self, target: str) -> int | None:
        if target == "pgbouncer":
            return self.bouncer.proc.pid
        if target.startswith("o7s"):
            return self.o7s.proc.pid
        return None

    def stop(self) -> None:
        for s in (self.o7s, self.bouncer, self.pg):
            if s is not None:
                try:
                    s.stop()
                except Exception as ex:  # noqa: BLE001
                    print(f"stopping {type(s).__name__}: {ex}", file=sys.stderr)


def run_target(stack: Stack, target: str, opts: Options, run_dir: Path, log=print) -> dict:
    """One Locust run against one target; returns the figures for the report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in run_dir.glob("hist-*.json"):
        f.unlink()
    period = opts.users / opts.rate
    spawn = opts.spawn()
    startup = 4.0 + 1.0 * max(1, opts.locust_processes)   # Locust start-up + green check per process
    ramp = opts.users / spawn + 2.0
    t0 = time.time()
    w_start = t0 + startup + ramp + (period if opts.phase_jitter else 0) + opts.warmup
    w_end = w_start + opts.duration
    run_time = int(w_end - t0 + 2.5) + 1
    cfg = {
        "targets": stack.dsns(target), "mix": opts.mix, "rate_per_user": opts.rate / opts.users,
        "rows": opts.rows, "window_start": w_start, "window_end": w_end, "out_dir": str(run_dir),
        "prepare_threshold": opts.prepare_threshold, "locust_stats": opts.locust_stats,
        "phase_jitter": opts.phase_jitter, "fast_wait": opts.fast_wait,
    }
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(opts.users), "-r", str(spawn), "-t", f"{run_time}s",
           "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5",
           "--csv", str(run_dir / "locust"), "--exit-code-on-error", "0"]
    if opts.locust_processes > 1:
        # a free port for the master, so a stray Locust on the default 5557 cannot break the run
        mport = infra.free_port()
        cmd += ["--processes", str(opts.locust_processes), "--master-bind-host", "127.0.0.1",
                "--master-bind-port", str(mport), "--master-host", "127.0.0.1", "--master-port", str(mport)]
    env = dict(os.environ, LT_CONFIG=str(run_dir / "config.json"),
               LT_PROCESSES=str(max(1, opts.locust_processes)), PYTHONPATH=str(HERE.parent))
    log(f"[{target}] {opts.users} users, {opts.rate:g} req/s offered, window {opts.duration:g}s "
        f"(starts after {w_start - t0:.0f}s), locust processes {opts.locust_processes}")
    with open(run_dir / "locust.log", "w") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=HERE.parent)
    snaps: dict[str, dict] = {}

    def snapshot(tag: str, at: float) -> None:
        while time.time() < at and proc.poll() is None:
            time.sleep(min(0.05, max(0.0, at - time.time())))
        roots = {"locust": proc.pid, "postgres": stack.pg.proc.pid}
        pp = stack.proxy_pid(target)
        if pp:
            roots["proxy"] = pp
        s = {"t": time.time(), "machine": machine_cpu(), **cpu_snapshot(roots)}
        s["kdamond"] = sum(c for _, c in s["kdamond"].values())
        snaps[tag] = s

    th = threading.Thread(target=lambda: (snapshot("start", w_start), snapshot("end", w_end)), daemon=True)
    th.start()
    # Locust's worker processes write their histograms when they quit, which can be after the
    # master has exited: remember them and wait for them too.
    workers: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + run_time + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    workers.setdefault(c.pid, c)
            except psutil.Error:
                pass
            time.sleep(0.5)
    except BaseException:
        for p in [*workers.values()]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait()
    _, alive = psutil.wait_procs(list(workers.values()), timeout=30)
    for p in alive:
        p.kill()
    th.join(5)
    return collect(target, opts, run_dir, snaps, rc, w_end - w_start)


def collect(target: str, opts: Options, run_dir: Path, snaps: dict, rc: int, window: float) -> dict:
    hists: dict[str, Histogram] = {}
    errors: dict[str, int] = {}
    samples: dict[str, int] = {}
    connected = connected_at_window = connect_failures = 0
    green = []
    files = sorted(run_dir.glob("hist-*.json"))
    for f in files:
        d = json.loads(f.read_text())
        for op, h in d["hist"].items():
            hists.setdefault(op, Histogram()).merge(Histogram.from_json(h))
        for k, v in d["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in d.get("error_samples", {}).items():
            samples[k] = samples.get(k, 0) + v
        connected += d.get("connected", 0)
        connected_at_window += d.get("connected_at_window") or 0
        connect_failures += d.get("connect_failures", 0)
        if d.get("green_check"):
            green.append(d["green_check"])
    allh = Histogram.merged(hists.values())
    ok_statements = sum(STATEMENTS_PER_OP[op] * h.n for op, h in hists.items())
    n_err = sum(v for k, v in errors.items())
    res = {
        "target": target, "o7s_workers": opts.workers if target == "o7s" else None, "users": opts.users, "offered_rps": opts.rate, "window_s": window,
        "locust_rc": rc, "locust_processes": opts.locust_processes, "hist_files": len(files),
        "connected": connected, "connected_at_window": connected_at_window,
        "connect_failures": connect_failures, "green_check": green[:1],
        "requests": allh.n, "errors": n_err, "error_samples": dict(sorted(samples.items(), key=lambda kv: -kv[1])[:8]),
        "achieved_rps": allh.n / window if window else 0.0,
        "statements": ok_statements, "achieved_qps": ok_statements / window if window else 0.0,
        "latency": allh.summary_ms(), "per_op": {op: h.summary_ms() for op, h in hists.items()},
        "hist": allh.to_json(),
    }
    if "start" in snaps and "end" in snaps:
        a, b = snaps["start"], snaps["end"]
        wall = b["t"] - a["t"]
        res["cpu_window_s"] = wall
        loc = cpu_delta(a["locust"], b["locust"])
        res["locust_cpu_s"] = sum(v for _, v in loc.values())
        pg = cpu_delta(a["postgres"], b["postgres"])
        res["postgres_cpu_s"] = sum(v for _, v in pg.values())
        mb, mt = b["machine"][0] - a["machine"][0], b["machine"][1] - a["machine"][1]
        res["softirq_cpu_s"] = b["machine"][2] - a["machine"][2]
        res["kdamond_cpu_s"] = b["kdamond"] - a["kdamond"]
        res["machine_busy_frac"] = mb / mt if mt else 0.0
        res["machine_busy_s"] = mb
        if "proxy" in a:
            px = cpu_delta(a["proxy"], b["proxy"])
            res["proxy_cpu_s"] = sum(v for _, v in px.values())
            res["proxy_cpu_per_process"] = sorted(((n, round(v, 3)) for n, v in px.values() if v > 0.001),
                                                  key=lambda x: -x[1])
        # CPU that no process of this benchmark used: other work on a shared machine.
        # (softirq: the kernel's loopback TCP work, charged to no process)
        res["other_cpu_s"] = max(0.0, mb - res["locust_cpu_s"] - res["postgres_cpu_s"] - res.get("proxy_cpu_s", 0.0)
                                 - res["softirq_cpu_s"] - res["kdamond_cpu_s"])
        k = ok_statements / 1000 if ok_statements else 0
        for key in ("proxy_cpu_s", "postgres_cpu_s", "locust_cpu_s"):
            if key in res and k:
                res[key.replace("_cpu_s", "_cpu_s_per_1k_q")] = res[key] / k
    return res


def _first_line(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "?"


def versions(stack: Stack | None = None) -> dict:
    """base_versions() plus Locust's and gevent's (importing locust monkey-patches this process)."""
    import gevent
    import locust

    return {**base_versions(), "locust": locust.__version__, "gevent": gevent.__version__}


def base_versions() -> dict:
    cmd = _first_line
    import psycopg

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # safe.directory: the benchmark runs as a user that does not own the checkout
    repo = ["git", "-c", f"safe.directory={HERE.parent}", "-C", str(HERE.parent)]
    git = cmd([*repo, "log", "-1", "--format=%h %s"])
    try:
        dirty = subprocess.run([*repo, "status", "--porcelain", "--", "o7s_cluster"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        dirty = ""
    if dirty:
        git += f" (o7s_cluster/ had uncommitted changes in the checkout: {len(dirty.splitlines())} files)"
    pgb = cmd([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "postgres": cmd([str(infra.pg_bindir() / "postgres"), "--version"]),
        "pgbouncer": pgb, "psycopg": psycopg.__version__, "libpq": psycopg.pq.version(),
        "o7s_commit": git,
    }


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def opts_dict(o: Options) -> dict:
    return asdict(o)
