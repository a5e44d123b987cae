"""PGBENCH.md from the JSON that `python -m loadtest pgbench` writes (issue 10's benchmark)."""

from __future__ import annotations

import statistics
from pathlib import Path

# Issue 10's targets for O7s.
CPU_VS_PGBOUNCER = 2.5      # O7s CPU per transaction at most this × PgBouncer's
CPU_VS_BARE = 1.5           # … and at most this × the bare trio relay's
TPS_VS_PGBOUNCER = 0.8      # O7s with 2 workers: at least this × PgBouncer's tps
NOISY_OTHER_CORES = 0.25    # work outside the benchmark above this flags a run as noisy
NOISY_STEAL = 0.05          # … as does more steal than this share of the machine's time

_MEDIAN_KEYS = ("tps", "latency_avg_ms", "latency_stddev_ms", "proxy_cpu_us_per_tx", "proxy_cores", "proxy_system_frac",
                "postgres_cpu_us_per_tx", "pgbench_cpu_us_per_tx", "machine_idle_frac", "machine_steal_frac",
                "other_cores", "transactions")


def _f(x, nd: int = 1, unit: str = "") -> str:
    return "–" if x is None else f"{x:,.{nd}f}{unit}"


def aggregate(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(mode, target) -> median over rounds of each figure (one round: that run's figures)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error") and r.get("tps")]
        a: dict = {"mode": key[0], "target": key[1], "n": len(ok), "failed_runs": len(rs) - len(ok),
                   "errors": [r["error"] for r in rs if r.get("error")]}
        for k in _MEDIAN_KEYS:
            vals = [r[k] for r in ok if r.get(k) is not None]
            a[k] = statistics.median(vals) if vals else None
            if len(vals) > 1:
                a[k + "_range"] = (min(vals), max(vals))
        lat = [r["latency_sampled"] for r in ok if r.get("latency_sampled")]
        for p in ("p50_ms", "p95_ms", "p99_ms"):
            a[p] = statistics.median(x[p] for x in lat) if lat else None
        out[key] = a
    return out


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def checks(agg: dict) -> list[dict]:
    """Issue 10's targets, per O7s target and mode."""
    rows = []
    modes = list(dict.fromkeys(m for m, _ in agg))
    for mode in modes:
        pgb, bare = agg.get((mode, "pgbouncer")), agg.get((mode, "bare-relay"))
        polled = agg.get((mode, "poll-relay"))
        for (m, t), a in agg.items():
            if m != mode or not t.startswith("o7s"):
                continue
            cpu = a["proxy_cpu_us_per_tx"]
            if pgb:
                r = _ratio(cpu, pgb["proxy_cpu_us_per_tx"])
                rows.append({"mode": mode, "target": t, "check": f"CPU/tx ≤ {CPU_VS_PGBOUNCER:g}× PgBouncer",
                             "value": r, "ok": r is not None and r <= CPU_VS_PGBOUNCER})
            elif mode == "prepared":
                rows.append({"mode": mode, "target": t, "check": f"CPU/tx ≤ {CPU_VS_PGBOUNCER:g}× PgBouncer",
                             "value": None, "ok": None})
            if bare:
                r = _ratio(cpu, bare["proxy_cpu_us_per_tx"])
                rows.append({"mode": mode, "target": t, "check": f"CPU/tx ≤ {CPU_VS_BARE:g}× bare relay",
                             "value": r, "ok": r is not None and r <= CPU_VS_BARE})
            if polled:
                r = _ratio(cpu, polled["proxy_cpu_us_per_tx"])
                rows.append({"mode": mode, "target": t, "check": f"CPU/tx ≤ {CPU_VS_BARE:g}× relay on the poller",
                             "value": r, "ok": r is not None and r <= CPU_VS_BARE})
            if t == "o7s-w2" and pgb:
                r = _ratio(a["tps"], pgb["tps"])
                rows.append({"mode": mode, "target": t, "check": f"tps ≥ {TPS_VS_PGBOUNCER:g}× PgBouncer",
                             "value": r, "ok": r is not None and r >= TPS_VS_PGBOUNCER})
    return rows


def _mode_table(mode: str, agg: dict) -> list[str]:
    pgb, bare = agg.get((mode, "pgbouncer")), agg.get((mode, "bare-relay"))
    polled = agg.get((mode, "poll-relay"))
    lines = [
        "| target | tps | latency avg ms | stddev ms | P50 / P95 / P99 ms (sampled) | proxy CPU µs/tx "
        "| proxy cores | of which kernel | CPU/tx × PgBouncer | CPU/tx × bare relay | CPU/tx × poll relay "
        "| tps × PgBouncer | PostgreSQL CPU µs/tx | pgbench CPU µs/tx | machine idle | steal | other work (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (m, t), a in agg.items():
        if m != mode:
            continue
        if not a["n"]:
            lines.append(f"| {t} | failed: {'; '.join(' '.join(e) for e in a['errors'])[:200]} |" + " |" * 16)
            continue
        cpu = a["proxy_cpu_us_per_tx"]
        tps_s = _f(a["tps"], 0)
        if "tps_range" in a:
            tps_s += f" ({a['tps_range'][0]:,.0f}–{a['tps_range'][1]:,.0f})"
        cpu_s = _f(cpu, 1) if t != "direct" else "n/a (no proxy)"
        if "proxy_cpu_us_per_tx_range" in a:
            cpu_s += f" ({a['proxy_cpu_us_per_tx_range'][0]:.1f}–{a['proxy_cpu_us_per_tx_range'][1]:.1f})"
        pct = (f"{_f(a['p50_ms'], 2)} / {_f(a['p95_ms'], 2)} / {_f(a['p99_ms'], 2)}" if a["p50_ms"] is not None else "–")
        lines.append(
            f"| {t} | {tps_s} | {_f(a['latency_avg_ms'], 3)} | {_f(a['latency_stddev_ms'], 3)} | {pct} | {cpu_s} "
            f"| {_f(a['proxy_cores'], 2)} | {_f(a['proxy_system_frac'] and 100 * a['proxy_system_frac'], 0, ' %')} "
            f"| {_f(_ratio(cpu, pgb and pgb['proxy_cpu_us_per_tx']), 2, '×') if t != 'pgbouncer' else '1×'} "
            f"| {_f(_ratio(cpu, bare and bare['proxy_cpu_us_per_tx']), 2, '×') if t != 'bare-relay' else '1×'} "
            f"| {_f(_ratio(cpu, polled and polled['proxy_cpu_us_per_tx']), 2, '×') if t != 'poll-relay' else '1×'} "
            f"| {_f(_ratio(a['tps'], pgb and pgb['tps']), 2, '×')} "
            f"| {_f(a['postgres_cpu_us_per_tx'], 1)} | {_f(a['pgbench_cpu_us_per_tx'], 1)} "
            f"| {_f(100 * a['machine_idle_frac'], 0, ' %')} | {_f(100 * a['machine_steal_frac'], 1, ' %')} "
            f"| {_f(a['other_cores'], 2)} |")
    return lines


def _noise(runs: list[dict]) -> list[str]:
    out = []
    for r in runs:
        notes = []
        if r.get("error"):
            notes.append(f"failed (pgbench exit {r['rc']}): {' | '.join(r['error'])}")
        if r.get("failed"):
            notes.append(f"{r['failed']} failed transactions")
        if r.get("other_cores", 0) > NOISY_OTHER_CORES:
            notes.append(f"**noisy**: work outside the benchmark used {r['other_cores']:.2f} cores")
        if r.get("machine_steal_frac", 0) > NOISY_STEAL:
            notes.append(f"**noisy**: steal {100 * r['machine_steal_frac']:.1f} %")
        sched, ticks = r.get("proxy_cpu_s_schedstat_main_thread"), r.get("proxy_cpu_s")
        if sched is not None and ticks and r["target"] in ("pgbouncer", "bare-relay", "poll-relay") and abs(sched - ticks) > 0.1 * ticks:
            notes.append(f"utime+stime {ticks:.2f} s but schedstat {sched:.2f} s")
        if r["target"].startswith("o7s") and r.get("proxy_cpu_per_process"):
            notes.append("by process: " + ", ".join(f"{n}[{p}] {v:.2f} s" for n, p, v in r["proxy_cpu_per_process"]))
        if notes:
            out.append(f"- {r['mode']} / {r['target']} (round {r.get('round', 0) + 1}): " + "; ".join(notes))
    return out


def _profiles(profiles: list[dict], machine: dict | None = None) -> list[str]:
    md = ["## Where the time goes (py-spy)", "",
          "An extra, unmeasured pgbench run per target with two py-spy samplers attached "
          "(`--nonblocking --gil`, 250 Hz; O7s with `--subprocesses`): samples of the thread holding "
          "the GIL, i.e. the proxy's Python time. A system call that releases the GIL (`socket.send` "
          "into loopback TCP, which also runs the receiver's side of the stack; `epoll_wait`) is not in "
          "these samples: the tables' *of which kernel* column (system time from /proc) is that side. "
          "A process that is preempted while running Python still counts, so on a busy machine the "
          "sample count runs above the CPU used; read shares. *Self* is the innermost Python frame "
          "(a C function it calls is charged to it). Sampling without stopping the process yields some "
          "partial stacks (not reaching the module's top frame), so inclusive shares of outer frames "
          "are low; self shares are not affected.", ""]
    if machine:
        md += [f"Profiled in a separate run, {machine.get('date', '?')}, O7s at `{machine.get('o7s_commit', '?')}`.", ""]
    for p in profiles:
        if p.get("error"):
            md += [f"### {p['target']}, -M {p['mode']}: py-spy failed", "", "```", p["error"], "```", ""]
            continue
        kern = p.get("proxy_system_frac")
        md += [f"### {p['target']}, -M {p['mode']} ({p['samples']:,} samples)", "",
               f"Under the profiler: {_f(p.get('tps'), 0)} tps, proxy CPU {_f(p.get('proxy_cpu_us_per_tx'), 1)} µs/tx"
               + (f", {100 * kern:.0f} % of it kernel" if kern is not None else "")
               + (f", other work {p['other_cores']:.2f} cores" if p.get("other_cores") is not None else "") + ".", "",
               f"Flame graph: [{p['svg']}]({p['svg']}); collapsed stacks: `{p['collapsed']}`. Samples by process: "
               + ", ".join(f"{k} {v:,}" for k, v in p.get("per_process", {}).items()) + ".", "",
               "| self time by area | samples | share |", "|---|---:|---:|"]
        md += [f"| {a} | {n} | {pct:.1f} % |" for a, n, pct in p["self_by_area"][:12]]
        md += ["", "| function (self) | samples | share |", "|---|---:|---:|"]
        md += [f"| `{fn}` | {n} | {pct:.1f} % |" for fn, n, pct in p["self"][:15]]
        md += ["", "| function (inclusive) | samples | share |", "|---|---:|---:|"]
        md += [f"| `{fn}` | {n} | {pct:.1f} % |" for fn, n, pct in p["inclusive"][:15]]
        md.append("")
    return md


NOTES = """## How it is measured

- **Targets.** `direct`: pgbench to PostgreSQL itself (50 backends, no proxy). `pgbouncer`: Debian's
  PgBouncer, `pool_mode = transaction`, `pool_size` = the pool size above, the role's SCRAM verifier
  in `auth_file`. `bare-relay`: `loadtest/bare_relay.py`, a trio.lowlevel relay that parses nothing
  (raw non-blocking sockets, `recv_into` a preallocated buffer, `send` first, `wait_readable` /
  `wait_writable` only after `BlockingIOError`, two tasks per connection, TCP_NODELAY). **It is
  1:1, not pooled**: each client has its own PostgreSQL backend, so it does none of a pooler's
  work; it is the floor for moving bytes through trio, not a peer. `poll-relay`: the same relay
  reading its sockets through O7s's own worker poller (`o7s_cluster.net.poller`: one epoll set,
  each socket registered once, one task calling the ready sockets' handlers), the floor for a relay
  built as O7s now is; O7s ÷ poll relay compares like with like. `o7s-wN`: `o7s serve --workers N
  --pool-mode transaction`; the org is on a tier `bench` added to the throwaway control plane as a
  copy of `enterprise` with `pool_size` = the pool size above and connection and query-rate ceilings
  no run reaches (so the limiter counts every query but never throttles). With 2 workers the org
  has one home worker; the other accepts connections and hands them over (see *by process* below).
- **pgbench.** `pgbench -n -S -M MODE -c C -j J -T D -P 1` against each target in turn, all servers
  up for the whole run, a short unmeasured warm-up run per target first (fills the pools). tps is
  pgbench's (without the initial connection time); latency average and stddev are pgbench's;
  P50/P95/P99 come from pgbench's per-transaction log (`-l --sampling-rate`), bucketed by
  `loadtest/hdr.py`. `-M prepared` is not run against PgBouncer 1.18 (no prepared statements in
  transaction mode), so that mode has no PgBouncer ratio.
- **Proxy CPU per transaction** = utime + stime of the target's processes from `/proc/PID/stat`
  (O7s: the supervisor and every worker, all descendants; PgBouncer and the relay: their process),
  read right before pgbench starts and right after it exits, divided by the transactions pgbench
  reports. So it includes the 50 logins and the pool filling (a few ms of CPU against seconds).
  utime + stime counts every thread of a process; `/proc/PID/schedstat`, which the Locust harness
  reads, counts only the main thread (it is kept in the JSON as a check for the single-threaded
  targets). PostgreSQL's and pgbench's CPU are given per transaction too (pgbench's from
  `getrusage(RUSAGE_CHILDREN)`).
- **Noise.** The machine (2 cores) is shared with other sessions. For each run, *machine idle* and
  *steal* come from `/proc/stat`; *other work* is the machine's busy time less everything this
  benchmark ran (the target, PostgreSQL, pgbench, the idle servers, kernel softirq), in cores. A run
  with other work over 0.25 cores or steal over 5 % is flagged as noisy below. The proxy, PostgreSQL
  and pgbench share the 2 cores, so tps is bounded by the sum of their CPU per transaction: a
  proxy that costs more lowers tps for everyone. Compare targets within one table.
"""


def write(data: dict, path: Path) -> Path:
    o, m, runs = data["options"], data["machine"], data["runs"]
    agg = aggregate(runs)
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    md = [f"# pgbench select-only through every target{' (' + o['tag'] + ')' if o.get('tag') else ''}", "",
          f"`python -m loadtest pgbench` — {m.get('date', '?')}, O7s at `{m.get('o7s_commit', '?')}`. "
          f"pgbench `-S`, {o['clients']} clients, `-j {o['threads']}`, {o['duration']:g} s per run, "
          f"scale {o['scale']}, pool size {o['pool_size']} (PgBouncer and O7s), "
          f"{o['rounds']} round(s){' (medians; ranges in brackets)' if o['rounds'] > 1 else ''}, "
          "all targets in one run on loopback.", ""]
    rows = checks(agg)
    if rows:
        md += ["## Issue 10's targets", "", "| mode | O7s | target | measured | result |", "|---|---|---|---:|---|"]
        for c in rows:
            res = "n/a (no PgBouncer figure in this mode)" if c["ok"] is None else ("pass" if c["ok"] else "**miss**")
            md.append(f"| {c['mode']} | {c['target']} | {c['check']} | {_f(c['value'], 2, '×')} | {res} |")
        md.append("")
    notes = path.with_name(path.stem + ".notes.md")
    if notes.exists():
        md += [notes.read_text().rstrip(), ""]
    for mode in modes:
        md += [f"## -M {mode}", ""] + _mode_table(mode, agg) + [""]
    load = [r for r in runs if r.get("machine_idle_frac") is not None]
    if load:
        others = [r["other_cores"] for r in load]
        md += ["## Machine load during the runs", "",
               f"Other work (outside this benchmark) per run: median {statistics.median(others):.2f} cores, "
               f"max {max(others):.2f} cores; steal max {100 * max(r['machine_steal_frac'] for r in load):.1f} %.",
               ""]
        noise = _noise(runs)
        if noise:
            md += noise + [""]
    if data.get("profiles"):
        md += _profiles(data["profiles"], data.get("profile_machine"))
    md += ["## Machine and versions", ""] + [f"- {k}: {v}" for k, v in m.items()] + [""]
    md += [NOTES]
    path.write_text("\n".join(md))
    return path
