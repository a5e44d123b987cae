"""`python -m loadtest pgbench --profile`: py-spy on a proxy during an extra, unmeasured pgbench run.

Two py-spy processes sample the target at once without stopping it (`--nonblocking`; O7s with
`--subprocesses`, so its workers are sampled): one writes a flame graph (SVG), the other the
collapsed stacks, which are summed here into "where the time goes" tables. Both sample only the
thread holding the GIL (`--gil`): the Python side of the proxy's CPU. A system call that drops the
GIL (`socket.send`, `epoll_wait`) is not in them; the report's *of which kernel* column (system
time from /proc) covers that side. The run's figures are not in the report's tables: py-spy's
own CPU competes with the run on the same cores.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

TOP_N = 25
PROFILE_RATE = 250  # samples per second per process
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frame(s: str) -> tuple[str, str]:
    m = _FRAME.match(s)
    return (m.group("func"), m.group("file")) if m else (s, "")


def _process_name(frame: str) -> str:
    """'process PID:"…python -m o7s_cluster.worker 0 /tmp/…"' -> 'PID o7s_cluster.worker 0'."""
    pid, _, cmd = frame.removeprefix("process ").partition(":")
    words = cmd.strip('"').split()
    if "-m" in words:
        words = words[words.index("-m") + 1:]
    return " ".join([pid, *[w for w in words if not w.startswith("/")][:2]])


def area(file: str) -> str:
    """A coarse owner for a frame's file: an O7s module, trio's core or its streams, the rest by package."""
    f = file.replace("\\", "/")
    if f.startswith("<attrs generated methods "):   # attrs' generated __init__ etc.: by their class's module
        f = f.removeprefix("<attrs generated methods ").rstrip(">").replace(".", "/")
    if "o7s_cluster/" in f or f.startswith("o7s_cluster"):
        return "o7s: " + f.split("o7s_cluster/", 1)[-1]
    if "trio/_core" in f:
        return "trio core (scheduler, epoll)"
    if f.startswith("trio/") or "/trio/" in f:
        return "trio (streams, sockets, sync)"
    if f.endswith("bare_relay.py"):
        return "bare_relay.py"
    if "/" in f:
        return f.split("/", 1)[0]
    return f or "?"


def summarize(collapsed: str) -> dict:
    """Self (leaf) and inclusive samples per function, and self samples per area, from py-spy's
    raw (collapsed) output: one `frame;frame;…;leaf COUNT` per line."""
    self_f: Counter = Counter()
    incl_f: Counter = Counter()
    self_area: Counter = Counter()
    per_process: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]   # with --subprocesses: parent;child
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += k
        per_process[_process_name(procs[-1]) if procs else "process"] += k
        func, file = _frame(frames[-1])
        self_f[f"{func} ({file})"] += k
        self_area[area(file)] += k
        for key in {f"{fn} ({fl})" for fn, fl in map(_frame, frames)}:
            incl_f[key] += k

    def top(c: Counter) -> list:
        return [(name, n, round(100 * n / total, 1)) for name, n in c.most_common(TOP_N)] if total else []

    return {"samples": total, "per_process": dict(per_process), "self": top(self_f),
            "inclusive": top(incl_f), "self_by_area": top(self_area)}


def profile_run(stack, target: str, mode: str, opts, workdir: Path, run_pgbench, stem: str,
                log=print) -> dict | None:
    """One pgbench run (`run_pgbench`, pgbench.py's) against `target` with py-spy attached; writes
    STEM.svg and STEM.collapsed.txt into opts.out and returns the summary."""
    exe = py_spy()
    if exe is None:
        log("py-spy is not installed (pip install -e '.[loadtest]'): no profile")
        return None
    out = Path(opts.out)
    svg, raw = out / f"{stem}.svg", out / f"{stem}.collapsed.txt"
    pid = stack.server_pids()[target]
    secs = max(1, round(opts.duration) - 1)

    def during(pgbench_proc):
        base = [exe, "record", "--pid", str(pid), "--nonblocking", "--gil", "--rate", str(PROFILE_RATE),
                "--duration", str(secs)]
        if target.startswith("o7s"):
            base.append("--subprocesses")
        logf = open(workdir / f"py-spy-{target}-{mode}.log", "w")
        spies = [subprocess.Popen(base + ["--format", "flamegraph", "--output", str(svg)], stdout=logf, stderr=logf),
                 subprocess.Popen(base + ["--format", "raw", "--output", str(raw)], stdout=logf, stderr=logf)]

        def finish() -> dict:
            for s in spies:
                try:
                    s.wait(timeout=secs + 60)
                except subprocess.TimeoutExpired:
                    s.kill()
            logf.close()
            if not raw.exists():
                return {"error": (workdir / f"py-spy-{target}-{mode}.log").read_text()[-1000:]}
            return {"svg": svg.name, "collapsed": raw.name, **summarize(raw.read_text())}
        return finish

    log(f"[{target} {mode}] profiling with py-spy ({secs} s at {PROFILE_RATE} Hz, not measured)")
    r = run_pgbench(stack, target, mode, opts.duration, workdir / "runs" / f"profile-{mode}-{target}",
                    0, log, during=during)
    p = r.pop("profile", None) or {}
    p.update(target=target, mode=mode, tps=r.get("tps"), proxy_cpu_us_per_tx=r.get("proxy_cpu_us_per_tx"),
             proxy_system_frac=r.get("proxy_system_frac"), other_cores=r.get("other_cores"))
    if p.get("self_by_area"):
        log(f"[{target} {mode}] GIL samples {p['samples']}: "
            + ", ".join(f"{a} {pct:.0f} %" for a, _, pct in p["self_by_area"][:5]))
    return p

