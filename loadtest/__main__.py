"""`python -m loadtest compare | sweep | report | pgbench | core` — see loadtest/README.md."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from loadtest import bench, core_bench, infra, pgbench, report


def _mix(s: str) -> dict:
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("read", "update", "txn"):
            raise argparse.ArgumentTypeError(f"unknown operation {k!r} (read, update, txn)")
        out[k.strip()] = float(v)
    if sum(out.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return out


def _common(p: argparse.ArgumentParser, rate: float, duration: float) -> None:
    d = bench.Options()
    p.add_argument("--users", type=int, default=d.users, help="Locust users = client connections (%(default)s)")
    p.add_argument("--rate", type=float, default=rate, help="offered requests/s, all users together (%(default)s)")
    p.add_argument("--duration", type=float, default=duration, help="measured seconds per target (%(default)s)")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds after the ramp before measuring (%(default)s)")
    p.add_argument("--spawn-rate", type=float, default=0, help="users connected per second (default min(users, 100))")
    p.add_argument("--locust-processes", type=int, default=d.locust_processes,
                   help="Locust worker processes; 1 = one local runner (%(default)s)")
    p.add_argument("--orgs", type=int, default=d.orgs, help="orgs (databases) the users are spread over (%(default)s)")
    p.add_argument("--tier", default=d.tier, choices=["free", "starter", "pro", "enterprise"],
                   help="tier of every org; sets the pool size for O7s and PgBouncer (%(default)s)")
    p.add_argument("--rows", type=int, default=d.rows, help="accounts per org (%(default)s)")
    p.add_argument("--mix", type=_mix, default=d.mix, help="weights, e.g. read=80,update=15,txn=5")
    p.add_argument("--workers", default=",".join(map(str, d.workers)),
                   help="o7s serve --workers; a comma-separated list runs one O7s target per count, "
                        "e.g. 1,2 (%(default)s; 0: its default)")
    p.add_argument("--targets", default=",".join(d.targets),
                   help="comma-separated subset of direct,pgbouncer,o7s (%(default)s)")
    p.add_argument("--prepare-threshold", type=int, default=None,
                   help="psycopg prepare_threshold (default: never prepare; PgBouncer < 1.21 cannot relay "
                        "named prepared statements in transaction mode)")
    p.add_argument("--no-locust-stats", action="store_true",
                   help="take Locust's own per-request statistics off the request event")
    p.add_argument("--no-phase-jitter", action="store_true",
                   help="do not spread users' start phases (shows the burst artefact)")
    p.add_argument("--gevent-poll-wait", action="store_true",
                   help="let psycopg wait through gevent's select.poll emulation (its default under gevent) "
                        "instead of loadtest/gwait.py")
    p.add_argument("--out", default=str(bench.HERE / "results"), help="results directory (%(default)s)")
    p.add_argument("--workdir", default=None, help="parent of the throwaway servers' directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the throwaway servers' directory")


def _options(a) -> bench.Options:
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ("direct", "pgbouncer", "o7s"):
            raise SystemExit(f"unknown target {t!r}")
    return bench.Options(
        users=a.users, rate=a.rate, duration=a.duration, warmup=a.warmup, spawn_rate=a.spawn_rate,
        locust_processes=a.locust_processes, orgs=a.orgs, tier=a.tier, rows=a.rows, mix=a.mix,
        workers=[int(w) for w in str(a.workers).split(",") if w.strip()], targets=targets, prepare_threshold=a.prepare_threshold,
        locust_stats=not a.no_locust_stats, phase_jitter=not a.no_phase_jitter,
        fast_wait=not a.gevent_poll_wait, out=a.out, keep=a.keep,
    )


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _summary(r: dict) -> str:
    L = r["latency"]
    s = (f"[{r['target']}] P50 {L['p50_ms']:.2f} ms, P95 {L['p95_ms']:.2f} ms, P99 {L['p99_ms']:.2f} ms, "
         f"max {L['max_ms']:.1f} ms, {r['achieved_rps']:.0f} req/s ({r['achieved_qps']:.0f} queries/s), "
         f"errors {r['errors']}, connected {r['connected']}/{r['users']}")
    if "locust_cpu_s" in r:
        s += f", Locust CPU {r['locust_cpu_s'] / r['cpu_window_s']:.2f} cores"
    if "proxy_cpu_s_per_1k_q" in r:
        s += f", proxy CPU {r['proxy_cpu_s_per_1k_q']:.3f} s/1k queries"
    return s


def compare(a) -> int:
    opts = _options(a)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    wd = infra.make_workdir(a.workdir)
    stack = bench.Stack(opts, wd)
    try:
        stack.start(log)
        machine = bench.versions(stack)
        results = []
        for t in stack.target_names():
            stack.begin(t, log)
            try:
                r = bench.run_target(stack, t, opts, wd / "runs" / t, log)
            finally:
                stack.end(t)
            log(_summary(r))
            results.append(r)
        bench.save(out / "compare.json", {"options": bench.opts_dict(opts), "machine": machine,
                                          "o7s_note": stack.o7s_note, "results": results})
    finally:
        stack.stop()
        if not opts.keep:
            shutil.rmtree(wd, ignore_errors=True)
        else:
            log(f"kept {wd}")
    path = report.write_report(out)
    log(f"wrote {path}")
    failed = [r["target"] for r in results if not r["requests"] or r["connected"] < r["users"]]
    if failed:
        log(f"no usable measurement for: {', '.join(failed)} (see the run notes in the report)")
        return 1
    return 0


def sweep(a) -> int:
    opts = _options(a)
    rates = [float(x) for x in a.rates.split(",")]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    wd = infra.make_workdir(a.workdir)
    stack = bench.Stack(opts, wd)
    runs: list[dict] = []
    misses = {t: 0 for t in stack.target_names()}
    try:
        stack.start(log)
        machine = bench.versions(stack)
        for rate in rates:
            for t in stack.target_names():
                if misses[t] >= 2:
                    continue
                o = bench.Options(**{**bench.opts_dict(opts), "rate": rate})
                stack.begin(t, log)
                try:
                    r = bench.run_target(stack, t, o, wd / "runs" / f"{t}-{rate:g}", log)
                finally:
                    stack.end(t)
                log(_summary(r))
                runs.append(r)
                misses[t] = 0 if report.passes(r) else misses[t] + 1
                r["o7s_note"] = stack.o7s_note
                bench.save(out / "sweep.json", {"options": bench.opts_dict(opts), "machine": machine,
                                                "rates": rates, "o7s_note": stack.o7s_note, "runs": runs})
    finally:
        stack.stop()
        if not opts.keep:
            shutil.rmtree(wd, ignore_errors=True)
    path = report.write_report(out)
    log(f"wrote {path}")
    return 0


def _on_term(signum, frame):
    # SIGTERM (and SIGINT, which a background shell job ignores) unwind through the `finally`
    # blocks, so Locust and the throwaway servers are stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="same Locust scenario against direct, PgBouncer and O7s; writes REPORT.md")
    _common(c, rate=500.0, duration=60.0)
    s = sub.add_parser("sweep", help="raise the offered rate step by step; highest rate per target with P95 < 15 ms")
    _common(s, rate=0.0, duration=30.0)
    s.add_argument("--rates", default="250,500,1000,1500,2000,3000",
                   help="offered requests/s to try, comma-separated (%(default)s)")
    r = sub.add_parser("report", help="rewrite REPORT.md and the plots from the JSON in --out")
    r.add_argument("--out", default=str(bench.HERE / "results"))
    pb = sub.add_parser("pgbench", help="pgbench -S against direct, PgBouncer, a bare trio relay and O7s; "
                                          "proxy CPU per transaction; writes PGBENCH.md")
    pgbench.add_arguments(pb)
    cb = sub.add_parser("core", help="the sans-IO session core alone, µs per pgbench -S transaction (no sockets)")
    core_bench.add_arguments(cb)
    a = ap.parse_args(argv)
    if a.cmd == "pgbench":
        return pgbench.main(a)
    if a.cmd == "core":
        return core_bench.main(a)
    if a.cmd == "compare":
        return compare(a)
    if a.cmd == "sweep":
        return sweep(a)
    print(report.write_report(Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
