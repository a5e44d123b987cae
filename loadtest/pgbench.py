"""`python -m loadtest pgbench`: pgbench select-only through every target, proxy CPU per transaction.

Issue 10's benchmark. All in one run, on loopback: a throwaway PostgreSQL, PgBouncer (transaction
mode), the bare trio relay (loadtest/bare_relay.py: 1:1, parses nothing, the floor for trio) and
`o7s serve` with 1 and 2 workers (transaction mode), PgBouncer and O7s with the same pool size. For
each pgbench protocol mode (`-M simple`, `-M extended`, `-M prepared`; PgBouncer 1.18 has no
prepared statements in transaction mode, so not there), each target gets one pgbench `-S` run of
the same clients, threads and duration. Around each run the CPU of the target's processes (O7s: the
supervisor and every worker) is read from /proc and divided by the transactions pgbench reports,
and the machine's idle and steal time from /proc/stat flag noisy runs. See loadtest/README.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from loadtest import bench, infra, pgbench_profile, pgbench_report
from loadtest.hdr import Histogram

MODES = ("simple", "extended", "prepared")
TARGETS = ("direct", "pgbouncer", "bare-relay", "poll-relay", "o7s-w1", "o7s-w2")
ONE_TO_ONE = frozenset({"direct", "bare-relay", "poll-relay"})  # a backend per client, gone when pgbench is
NO_PREPARED = frozenset({"pgbouncer"})   # PgBouncer 1.18: no named statements in transaction mode
ORG = "lt_bench"
BENCH_TIER = "bench"
# The bench tier's ceilings: far above what pgbench reaches, so the limiter counts but never throttles.
TIER_CEILINGS = {"max_connections": 10_000, "max_qps": 100_000_000}
BACKENDS_GONE_TIMEOUT_S = 5.0
SETTLE_S = 1.0          # pause between runs (sockets in TIME_WAIT, the backends' idle work)


@dataclass
class PgbenchOptions:
    duration: float = 15.0          # seconds of each measured pgbench run (-T)
    clients: int = 50               # -c
    threads: int = 2                # -j
    pool_size: int = 20             # PgBouncer's pool_size and the O7s tier's pool_size
    scale: int = 1                  # pgbench -i -s
    modes: list = field(default_factory=lambda: list(MODES))
    targets: list = field(default_factory=lambda: list(TARGETS))
    warmup: float = 2.0             # an unmeasured run per target first (fills pools); 0: none
    sampling_rate: float = 0.2      # share of transactions pgbench logs (-l) for latency percentiles
    rounds: int = 1                 # the whole matrix this many times (the report gives the median)
    profile: bool = False           # py-spy on O7s during extra, unmeasured runs
    profile_modes: list = field(default_factory=lambda: ["simple"])
    tag: str = ""                   # results/PGBENCH-<tag>.md, pgbench-<tag>.json
    out: str = str(bench.HERE / "results")
    keep: bool = False

    def modes_for(self, target: str) -> list[str]:
        return [m for m in self.modes if not (m == "prepared" and target in NO_PREPARED)]


def result_paths(out: Path, tag: str) -> tuple[Path, Path]:
    suffix = f"-{tag}" if tag else ""
    return out / f"PGBENCH{suffix}.md", out / f"pgbench{suffix}.json"


# -- the servers ------------------------------------------------------------------------------

@dataclass
class PgbenchStack:
    """PostgreSQL with pgbench's tables in one org's database, and every proxy in front of it."""

    opts: PgbenchOptions
    workdir: Path
    pg: infra.Postgres | None = None
    org: infra.OrgSpec | None = None
    bouncer: infra.PgBouncer | None = None
    relay: infra.BareRelay | None = None
    poll_relay: infra.BareRelay | None = None
    o7s: dict = field(default_factory=dict)      # target name -> infra.O7s

    def start(self, log=print) -> "PgbenchStack":
        o = self.opts
        infra.raise_fd_limit()
        self.org = infra.OrgSpec(ORG, secrets.token_urlsafe(12), BENCH_TIER, pool_size=o.pool_size)
        n_o7s = sum(1 for t in o.targets if t.startswith("o7s"))
        maxconn = 2 * o.clients + (2 + 2 * n_o7s) * o.pool_size + 30
        log(f"starting PostgreSQL (max_connections={maxconn})")
        self.pg = infra.Postgres(self.workdir / "pg", max_connections=maxconn).start()
        log(f"pgbench -i -s {o.scale} in database {ORG}")
        init_pgbench(self.pg, self.org, o.scale, self.workdir)
        if "pgbouncer" in o.targets:
            log(f"starting PgBouncer (transaction mode, pool_size {o.pool_size})")
            self.bouncer = infra.PgBouncer(self.workdir / "pgbouncer", self.pg, [self.org],
                                           max_client_conn=o.clients + 50).start()
        if "bare-relay" in o.targets:
            log("starting the bare trio relay (loadtest/bare_relay.py)")
            self.relay = infra.BareRelay(self.workdir / "relay", self.pg.host, self.pg.port).start()
        if "poll-relay" in o.targets:
            log("starting the bare relay on O7s's poller (loadtest/bare_relay.py --poller)")
            self.poll_relay = infra.BareRelay(self.workdir / "poll-relay", self.pg.host, self.pg.port,
                                              poller=True).start()
        if n_o7s:
            ok, help_text = infra.o7s_available()
            if not ok:
                raise RuntimeError(f"o7s serve is not available in this checkout:\n{help_text[-2000:]}")
            log(f"provisioning {ORG} in the O7s control plane (tier {BENCH_TIER!r}: pool_size {o.pool_size})")
            env = infra.provision_o7s(self.pg, [self.org], tiers={
                BENCH_TIER: {"like": "enterprise", "pool_size": o.pool_size, **TIER_CEILINGS}})
            for t in o.targets:
                if t.startswith("o7s"):
                    w = int(t.removeprefix("o7s-w"))
                    log(f"starting o7s serve --workers {w} --pool-mode transaction")
                    self.o7s[t] = infra.O7s(self.workdir / t, env, workers=w).start()
            time.sleep(1.0)  # let every worker come up before the first connection
        return self

    def address(self, target: str) -> tuple[str, int]:
        if target == "direct":
            return self.pg.host, self.pg.port
        if target == "pgbouncer":
            return self.bouncer.host, self.bouncer.port
        if target == "bare-relay":
            return self.relay.host, self.relay.port
        if target == "poll-relay":
            return self.poll_relay.host, self.poll_relay.port
        return self.o7s[target].host, self.o7s[target].port

    def server_pids(self) -> dict[str, int]:
        """Every server's root process (O7s: its supervisor; its workers are its children)."""
        out = {"postgres": self.pg.proc.pid}
        if self.bouncer:
            out["pgbouncer"] = self.bouncer.proc.pid
        if self.relay:
            out["bare-relay"] = self.relay.proc.pid
        if self.poll_relay:
            out["poll-relay"] = self.poll_relay.proc.pid
        out.update({t: s.proc.pid for t, s in self.o7s.items()})
        return out

    def stop(self) -> None:
        for s in [*self.o7s.values(), self.relay, self.poll_relay, self.bouncer, self.pg]:
            if s is not None:
                try:
                    s.stop()
                except Exception as ex:  # noqa: BLE001
                    print(f"stopping {type(s).__name__}: {ex}", file=sys.stderr)


def pgbench_env(password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    return env


def init_pgbench(pg: infra.Postgres, org: infra.OrgSpec, scale: int, workdir: Path) -> None:
    """The org's role and database, owned by it, and pgbench's tables in it (loaded directly)."""
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {org.name} LOGIN PASSWORD '{org.password}'")
        conn.execute(f"CREATE DATABASE {org.dbname} OWNER {org.name}")
    proc = subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(scale), "-h", pg.host, "-p", str(pg.port), "-U", org.name, org.dbname],
        env=pgbench_env(org.password), capture_output=True, text=True, timeout=300, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench -i failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


# -- one run ----------------------------------------------------------------------------------

_PATTERNS = {
    "transactions": r"number of transactions actually processed: (\d+)",
    "failed": r"number of failed transactions: (\d+)",
    "latency_avg_ms": r"latency average = ([\d.]+) ms",
    "latency_stddev_ms": r"latency stddev = ([\d.]+) ms",
    "connection_ms": r"initial connection time = ([\d.]+) ms",
    "tps": r"tps = ([\d.]+) \(without initial connection time\)",
}
_PROGRESS = re.compile(r"progress: ([\d.]+) s, ([\d.]+) tps, lat ([\d.]+) ms stddev ([\d.NaN]+)")


def parse_pgbench(stdout: str, stderr: str) -> dict:
    out: dict = {}
    for key, pat in _PATTERNS.items():
        m = re.search(pat, stdout)
        if m:
            out[key] = int(m.group(1)) if key in ("transactions", "failed") else float(m.group(1))
    out["progress_tps"] = [float(m.group(2)) for m in _PROGRESS.finditer(stderr)]
    return out


def latency_histogram(log_dir: Path) -> Histogram:
    """pgbench -l lines: client_id transaction_no time_us script_no epoch epoch_us (time: "failed" /
    "skipped" for those)."""
    h = Histogram()
    for f in sorted(log_dir.glob("lat.*")):
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and parts[2].isdigit():
                    h.record(int(parts[2]))
    return h


def _org_backends(postmaster: int) -> int:
    """The postmaster's children serving the bench org (their process title: `postgres: USER DB …`);
    pooled ones of PgBouncer and O7s among them."""
    try:
        with open(f"/proc/{postmaster}/task/{postmaster}/children") as f:
            kids = f.read().split()
    except OSError:
        return 0
    n = 0
    for pid in kids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                n += f.read().startswith(f"postgres: {ORG} {ORG} ".encode())
        except OSError:
            pass
    return n


def _wait_backends_gone(postmaster: int, before: int, timeout: float = BACKENDS_GONE_TIMEOUT_S) -> None:
    """Wait until the backends of pgbench's own connections (direct, bare relay) have exited, so
    the postmaster has reaped them and their CPU is in its cutime/cstime at the last snapshot."""
    deadline = time.monotonic() + timeout
    while _org_backends(postmaster) > before and time.monotonic() < deadline:
        time.sleep(0.02)


def _machine_stat() -> list[int]:
    """/proc/stat's cpu line: user nice system idle iowait irq softirq steal … (ticks)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _snapshot(roots: dict[str, int]) -> dict:
    return {"t": time.monotonic(), "machine": _machine_stat(),
            "children": resource.getrusage(resource.RUSAGE_CHILDREN),
            "ticks": bench.cpu_snapshot(roots, clock="ticks"),
            "system": bench.cpu_snapshot({"target": roots["target"]}, clock="system") if "target" in roots else {},
            "schedstat": bench.cpu_snapshot(roots, clock="schedstat")}


def _tree_cpu(a: dict, b: dict, tag: str) -> tuple[float, list]:
    d = bench.cpu_delta(a.get(tag, {}), b.get(tag, {}))
    return sum(v for _, v in d.values()), sorted(((n, p, round(v, 4)) for p, (n, v) in d.items() if v > 0.0005),
                                                 key=lambda x: -x[2])


def cpu_figures(a: dict, b: dict, target: str, root: int, transactions: int) -> dict:
    """Proxy CPU per transaction (both clocks), PostgreSQL's and pgbench's, and the machine's idle,
    steal and other work over the run."""
    wall = b["t"] - a["t"]
    proxy, per_proc = _tree_cpu(a["ticks"], b["ticks"], "target")
    if target.startswith("o7s"):  # the tree's root is the supervisor, the others its workers
        per_proc = [("supervisor" if p == root else "worker", p, v) for n, p, v in per_proc]
    proxy_sched, _ = _tree_cpu(a["schedstat"], b["schedstat"], "target")
    proxy_sys, _ = _tree_cpu(a["system"], b["system"], "target")
    postgres, _ = _tree_cpu(a["ticks"], b["ticks"], "postgres")
    idle_servers = sum(_tree_cpu(a["ticks"], b["ticks"], t)[0] for t in a["ticks"] if t.startswith("idle:"))
    ca, cb = a["children"], b["children"]
    client = (cb.ru_utime - ca.ru_utime) + (cb.ru_stime - ca.ru_stime)
    m = [y - x for x, y in zip(a["machine"], b["machine"])]
    total = sum(m[:8]) or 1
    idle_t, steal_t, softirq_t = m[3] + m[4], m[7], m[6]
    busy_s = (total - idle_t) / bench.CLK_TCK
    other = busy_s - proxy - postgres - client - idle_servers - softirq_t / bench.CLK_TCK
    has_proxy = target != "direct"
    k = transactions or 0
    return {
        "cpu_window_s": wall,
        "proxy_cpu_s": proxy if has_proxy else None,
        "proxy_cpu_s_schedstat_main_thread": proxy_sched if has_proxy else None,
        "proxy_cpu_us_per_tx": (1e6 * proxy / k) if has_proxy and k else None,
        "proxy_system_frac": (proxy_sys / proxy) if has_proxy and proxy else None,
        "proxy_cpu_per_process": per_proc if has_proxy else [],
        "proxy_cores": proxy / wall if has_proxy and wall else None,
        "postgres_cpu_us_per_tx": (1e6 * postgres / k) if k else None,
        "pgbench_cpu_us_per_tx": (1e6 * client / k) if k else None,
        "postgres_cores": postgres / wall if wall else 0.0,
        "pgbench_cores": client / wall if wall else 0.0,
        "other_servers_cores": idle_servers / wall if wall else 0.0,
        "machine_idle_frac": idle_t / total,
        "machine_steal_frac": steal_t / total,
        "softirq_cores": softirq_t / bench.CLK_TCK / wall if wall else 0.0,
        "other_cores": max(0.0, other) / wall if wall else 0.0,
    }


def run_pgbench(stack: PgbenchStack, target: str, mode: str, duration: float, run_dir: Path,
                sampling_rate: float, log=print, during=None) -> dict:
    """One pgbench -S run against one target; CPU read from /proc right before and after it.
    `during(proc)` is called once pgbench has started (the profiler hooks in there)."""
    o = stack.opts
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in run_dir.glob("lat.*"):
        f.unlink()
    host, port = stack.address(target)
    cmd = ["pgbench", "-n", "-S", "-M", mode, "-c", str(o.clients), "-j", str(o.threads),
           "-T", str(max(1, round(duration))), "-P", "1", "-h", host, "-p", str(port), "-U", stack.org.name]
    if sampling_rate > 0:
        cmd += ["-l", f"--sampling-rate={sampling_rate:g}", f"--log-prefix={run_dir / 'lat'}"]
    cmd.append(stack.org.dbname)
    roots = {("target" if t == target else "postgres" if t == "postgres" else f"idle:{t}"): pid
             for t, pid in stack.server_pids().items()}
    backends_before = _org_backends(stack.pg.proc.pid)
    a = _snapshot(roots)
    started = time.time()
    proc = subprocess.Popen(cmd, env=pgbench_env(stack.org.password), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir)
    extra = during(proc) if during else None
    try:
        stdout, stderr = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    if target in ONE_TO_ONE:
        _wait_backends_gone(stack.pg.proc.pid, backends_before)
    b = _snapshot(roots)
    (run_dir / "pgbench.out").write_text(stdout + "\n--- stderr ---\n" + stderr)
    res = {"target": target, "mode": mode, "rc": proc.returncode, "started": started,
           "command": " ".join(cmd), **parse_pgbench(stdout, stderr)}
    if proc.returncode != 0 or not res.get("transactions"):
        res["error"] = (stderr.strip().splitlines() or ["(no output)"])[-3:]
    h = latency_histogram(run_dir)
    res["latency_sampled"] = h.summary_ms() if h.n else None
    res.update(cpu_figures(a, b, target, stack.server_pids().get(target, 0), res.get("transactions", 0)))
    if extra:
        res["profile"] = extra() if callable(extra) else extra
    return res


def summary_line(r: dict) -> str:
    if r.get("error"):
        return f"[{r['target']} {r['mode']}] FAILED rc={r['rc']}: {' | '.join(r['error'])}"
    s = (f"[{r['target']} {r['mode']}] {r.get('tps', 0):.0f} tps, latency {r.get('latency_avg_ms', 0):.3f} ms "
         f"(stddev {r.get('latency_stddev_ms', 0):.3f})")
    if r.get("proxy_cpu_us_per_tx") is not None:
        s += f", proxy CPU {r['proxy_cpu_us_per_tx']:.1f} µs/tx ({r['proxy_cores']:.2f} cores)"
    s += f", machine idle {100 * r['machine_idle_frac']:.0f} %, other work {r['other_cores']:.2f} cores"
    return s


# -- the whole benchmark ----------------------------------------------------------------------

def run(opts: PgbenchOptions, workdir: Path, log=print, profile_only: bool = False) -> dict:
    """The warm-up, then every (round, mode, target) run, then the profiled runs (only those with
    profile_only)."""
    stack = PgbenchStack(opts, workdir)
    runs: list[dict] = []
    profiles: list[dict] = []
    try:
        stack.start(log)
        machine = bench.base_versions()
        if opts.warmup > 0:
            for t in opts.targets:
                r = run_pgbench(stack, t, "simple", opts.warmup, workdir / "runs" / f"warmup-{t}", 0, log)
                log(f"warm-up {summary_line(r)}")
        for rnd in range(0 if profile_only else opts.rounds):
            for mode in opts.modes:
                for t in opts.targets:
                    if mode not in opts.modes_for(t):
                        continue
                    time.sleep(SETTLE_S)
                    r = run_pgbench(stack, t, mode, opts.duration, workdir / "runs" / f"{rnd}-{mode}-{t}",
                                    opts.sampling_rate, log)
                    r["round"] = rnd
                    log(summary_line(r))
                    runs.append(r)
        if opts.profile or profile_only:
            for mode in opts.profile_modes:
                for t in [t for t in opts.targets if t.startswith("o7s") or t.endswith("relay")]:
                    time.sleep(SETTLE_S)
                    stem = result_paths(Path(opts.out), opts.tag)[1].stem + f"-profile-{t}-{mode}"
                    p = pgbench_profile.profile_run(stack, t, mode, opts, workdir, run_pgbench, stem, log)
                    if p:
                        profiles.append(p)
    finally:
        stack.stop()
    return {"options": asdict(opts), "machine": machine, "runs": runs, "profiles": profiles}


def main(a) -> int:
    """The `pgbench` subcommand (arguments from __main__)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = result_paths(out, a.tag)
    if a.report_only:
        print(pgbench_report.write(json.loads(json_path.read_text()), md_path))
        return 0
    opts = options_from_args(a)
    log = bench_log
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not installed (scripts/install installs it)")
    wd = infra.make_workdir(a.workdir)
    try:
        data = run(opts, wd, log, profile_only=a.profile_only)
    finally:
        if opts.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    if a.profile_only:
        # new profiles beside the measured runs already in the JSON (when there is one)
        old = json.loads(json_path.read_text()) if json_path.exists() else {**data, "runs": []}
        old["profiles"] = data["profiles"]
        old["profile_machine"] = data["machine"]
        data = old
    bench.save(json_path, data)
    log(f"wrote {json_path}")
    log(f"wrote {pgbench_report.write(data, md_path)}")
    bad = [f"{r['target']} {r['mode']}" for r in data["runs"] if r.get("error") or not r.get("tps")]
    if bad:
        log(f"runs without a measurement: {', '.join(bad)}")
        return 1
    return 0


def bench_log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _list(s: str, allowed: tuple[str, ...], what: str) -> list[str]:
    xs = [x.strip() for x in s.split(",") if x.strip()]
    for x in xs:
        if x not in allowed:
            raise SystemExit(f"unknown {what} {x!r} (one of {', '.join(allowed)})")
    return xs


def options_from_args(a) -> PgbenchOptions:
    d = PgbenchOptions()
    duration = a.duration if a.duration is not None else (3.0 if a.quick else d.duration)
    warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else d.warmup)
    return PgbenchOptions(
        duration=duration, clients=a.clients, threads=a.threads, pool_size=a.pool_size, scale=a.scale,
        modes=_list(a.modes, MODES, "mode"), targets=_list(a.targets, TARGETS, "target"), warmup=warmup,
        sampling_rate=a.sampling_rate, rounds=a.rounds, profile=a.profile,
        profile_modes=_list(a.profile_modes, MODES, "mode"), tag=a.tag, out=a.out, keep=a.keep,
    )


def add_arguments(p) -> None:
    d = PgbenchOptions()
    p.add_argument("--duration", type=float, default=None, help=f"seconds per measured run (default {d.duration:g}; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="3-second runs and a 1-second warm-up (the smoke test)")
    p.add_argument("--clients", type=int, default=d.clients, help="pgbench -c (%(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="pgbench -j (%(default)s)")
    p.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="backend connections per pool, PgBouncer's and the O7s tier's (%(default)s)")
    p.add_argument("--scale", type=int, default=d.scale, help="pgbench -i -s (%(default)s)")
    p.add_argument("--modes", default=",".join(d.modes), help="pgbench -M modes (%(default)s)")
    p.add_argument("--targets", default=",".join(d.targets), help="subset of %(default)s")
    p.add_argument("--warmup", type=float, default=None,
                   help=f"seconds of an unmeasured run per target first (default {d.warmup:g}; --quick: 1; 0: none)")
    p.add_argument("--sampling-rate", type=float, default=d.sampling_rate,
                   help="share of transactions pgbench logs for latency percentiles; 0: no log (%(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="run the whole matrix this many times (%(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="after the measured runs, py-spy on each O7s target and the bare relay during an extra run")
    p.add_argument("--profile-only", action="store_true",
                   help="only the profiled runs; their results replace the profiles in the tag's JSON")
    p.add_argument("--profile-modes", default=",".join(d.profile_modes), help="modes to profile (%(default)s)")
    p.add_argument("--tag", default="", help="results/PGBENCH-TAG.md and pgbench-TAG.json (default: no tag)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON in --out")
    p.add_argument("--out", default=str(bench.HERE / "results"), help="results directory (%(default)s)")
    p.add_argument("--workdir", default=None, help="parent of the throwaway servers' directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the throwaway servers' directory")
