"""REPORT.md and PNG plots from compare.json / sweep.json in a results directory."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.hdr import Histogram

TARGET_P95_MS = 15.0
COLORS = {"direct": "#444444", "pgbouncer": "#1f77b4", "o7s": "#d62728"}


def _f(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def passes(r: dict) -> bool:
    return r["errors"] == 0 and r["latency"]["p95_ms"] < TARGET_P95_MS and r["requests"] > 0 \
        and r.get("connected", 0) >= r["users"] and r.get("connect_failures", 0) == 0


def plot_distribution(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        h = Histogram.from_json(r["hist"])
        if not h.n:
            continue
        pts = h.cdf()
        xs = [max(v, 1) / 1000 for v, _ in pts]
        ys = [c for _, c in pts]
        c = COLORS.get(r["target"])
        ax1.step(xs, ys, where="post", label=r["target"], color=c)
        # tail view: 1 - CDF on a log scale, so P99 / P99.9 separate visibly
        ax2.step(xs, [max(1 - y, 1e-6) for y in ys], where="post", label=r["target"], color=c)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.axvline(TARGET_P95_MS, color="grey", ls=":", lw=1)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_ylabel("fraction of requests ≤ x")
    ax2.set_yscale("log")
    ax2.set_ylabel("fraction of requests > x")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by: dict[str, list] = {}
    for r in sweep["runs"]:
        by.setdefault(r["target"], []).append(r)
    for t, rs in by.items():
        rs.sort(key=lambda r: r["offered_rps"])
        ax.plot([r["offered_rps"] for r in rs], [r["latency"]["p95_ms"] for r in rs], "o-",
                label=t, color=COLORS.get(t))
        bad = [r for r in rs if r["errors"]]
        if bad:
            ax.plot([r["offered_rps"] for r in bad], [r["latency"]["p95_ms"] for r in bad], "x",
                    color="black", ms=10)
    ax.axhline(TARGET_P95_MS, color="grey", ls=":", lw=1, label="15 ms target")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, all users)")
    ax.set_ylabel("P95 latency (ms, log scale)")
    ax.set_title(f"P95 against offered rate, {sweep['options']['users']} connections")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: list[dict]) -> list[str]:
    lines = [
        "| target | P50 ms | P95 ms | P99 ms | max ms | offered req/s | achieved req/s | achieved queries/s "
        "| errors | proxy CPU s / 1k queries | Postgres CPU s / 1k queries | Locust CPU s / 1k queries "
        "| Locust CPU (cores) | machine busy | kernel softirq (cores) | kdamond (cores) | everything else (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        L = r["latency"]
        w = r.get("cpu_window_s") or r["window_s"]
        lines.append(
            f"| {r['target']} | {_f(L['p50_ms'])} | {_f(L['p95_ms'])} | {_f(L['p99_ms'])} | {_f(L['max_ms'], 1)} "
            f"| {r['offered_rps']:g} | {r['achieved_rps']:.0f} | {r['achieved_qps']:.0f} | {r['errors']} "
            f"| {_f(r.get('proxy_cpu_s_per_1k_q'), 3) if 'proxy_cpu_s' in r else 'n/a (no proxy)'} "
            f"| {_f(r.get('postgres_cpu_s_per_1k_q'), 3)} | {_f(r.get('locust_cpu_s_per_1k_q'), 3)} "
            f"| {_f(r.get('locust_cpu_s', 0) / w if w else None)} | {_f(100 * r.get('machine_busy_frac', 0), 0)} % "
            f"| {_f(r.get('softirq_cpu_s', 0) / w if w else None)} | {_f(r.get('kdamond_cpu_s', 0) / w if w else None)} "
            f"| {_f(r.get('other_cpu_s', 0) / w if w else None)} |"
        )
    return lines


def _per_op(results: list[dict]) -> list[str]:
    lines = ["| target | op | n | P50 ms | P95 ms | P99 ms | max ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for op, s in r["per_op"].items():
            if s["n"]:
                lines.append(f"| {r['target']} | {op} | {s['n']} | {_f(s['p50_ms'])} | {_f(s['p95_ms'])} "
                             f"| {_f(s['p99_ms'])} | {_f(s['max_ms'], 1)} |")
    return lines


def _sanity(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        notes = []
        if r.get("connected", 0) < r["users"]:
            notes.append(f"only {r.get('connected', 0)} of {r['users']} users connected")
        if r.get("connect_failures"):
            notes.append(f"{r['connect_failures']} failed connection attempts")
        if r["locust_rc"] not in (0, None):
            notes.append(f"Locust exited with {r['locust_rc']}")
        if r["hist_files"] < max(1, r["locust_processes"]):
            notes.append(f"histograms from {r['hist_files']} of {r['locust_processes']} Locust processes")
        if r["error_samples"]:
            notes.append("errors: " + "; ".join(f"{k} (×{v})" for k, v in r["error_samples"].items()))
        if r.get("proxy_cpu_per_process"):
            notes.append("proxy CPU by process: " + ", ".join(f"{n} {v:.2f}s" for n, v in r["proxy_cpu_per_process"]))
        if notes:
            out.append(f"- **{r['target']}**: " + "; ".join(notes))
    return out


def write_report(out: Path, notes_md: str = "") -> Path:
    out = Path(out)
    cmp_path, sweep_path = out / "compare.json", out / "sweep.json"
    cmp = json.loads(cmp_path.read_text()) if cmp_path.exists() else None
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    md = ["# O7s load test report", ""]
    meta = (cmp or sweep or {}).get("machine", {})
    if meta:
        md += ["## Machine and versions", ""]
        md += [f"- {k}: {v}" for k, v in meta.items()]
        md.append("")
    if cmp:
        o = cmp["options"]
        rs = cmp["results"]
        md += [
            "## Side by side (`python -m loadtest compare`)", "",
            f"{o['users']} connections (Locust users, one psycopg connection each) spread over {o['orgs']} "
            f"orgs of tier `{o['tier']}`, {o['rate']:g} requests/s offered in total "
            f"(`constant_throughput` {o['rate'] / o['users']:g}/s per user, each user at a random phase), "
            f"mix {o['mix']} (txn = BEGIN, SELECT … FOR UPDATE, 2 UPDATEs, INSERT, COMMIT), "
            f"{o['duration']:g} s measured per target after the connect ramp and {o['warmup']:g} s of warm-up, "
            f"{o['locust_processes']} Locust process(es), psycopg prepare_threshold={o['prepare_threshold']}. "
            "Latency is the client-side time of one request (a transaction counts as one request, six "
            "round trips), from the harness's own microsecond histogram merged over all Locust processes. "
            "Queries = statements sent (a transaction counts 6). CPU is measured from /proc over the "
            "measurement window for each process tree.",
            "",
        ]
        if cmp.get("o7s_note"):
            md += [f"Note: {cmp['o7s_note']}", ""]
        md += _table(rs) + [""]
        md += ["P95 target: " + ", ".join(
            f"{r['target']} {'meets' if passes(r) else 'misses'} it" for r in rs) + ".", ""]
        if len({r["target"] for r in rs}) > 1 and any(r["target"] == "direct" for r in rs):
            d = next(r for r in rs if r["target"] == "direct")["latency"]
            rat = [f"{r['target']} P50 ×{r['latency']['p50_ms'] / d['p50_ms']:.2f}, P95 ×{r['latency']['p95_ms'] / d['p95_ms']:.2f}"
                   for r in rs if r["target"] != "direct" and d["p50_ms"] and d["p95_ms"]]
            if rat:
                md += ["Against direct: " + "; ".join(rat) + ".", ""]
        md += ["![latency distribution](latency.png)", "", "### Per operation", ""] + _per_op(rs) + [""]
        san = _sanity(rs)
        if san:
            md += ["### Run notes", ""] + san + [""]
        plot_distribution(rs, out / "latency.png",
                          f"Latency, {o['users']} connections, {o['rate']:g} req/s offered")
    if sweep:
        o = sweep["options"]
        md += [
            "## Capacity sweep (`python -m loadtest sweep`)", "",
            f"{o['users']} connections, offered rate raised step by step ({', '.join(f'{r:g}' for r in sweep['rates'])} "
            f"requests/s), {o['duration']:g} s measured per step and target, same mix and orgs as above. "
            "A target is not run at higher rates once it has missed the target twice.",
            "",
            "| target | highest rate with P95 < 15 ms and no errors (req/s) | achieved queries/s there | P95 there (ms) |",
            "|---|---:|---:|---:|",
        ]
        for t in dict.fromkeys(r["target"] for r in sweep["runs"]):
            ok = [r for r in sweep["runs"] if r["target"] == t and passes(r)]
            best = max(ok, key=lambda r: r["offered_rps"]) if ok else None
            md.append(f"| {t} | {best['offered_rps']:g} | {best['achieved_qps']:.0f} | {_f(best['latency']['p95_ms'])} |"
                      if best else f"| {t} | none of the rates tried | – | – |")
        md += ["", "![P95 against offered rate](p95_vs_rate.png)", "", "### Every step", ""]
        md += _table(sorted(sweep["runs"], key=lambda r: (r["offered_rps"], r["target"]))) + [""]
        san = _sanity(sweep["runs"])
        if san:
            md += ["### Run notes", ""] + san + [""]
        plot_sweep(sweep, out / "p95_vs_rate.png")
    notes = out / "NOTES.md"
    if notes_md:
        md += [notes_md, ""]
    elif notes.exists():
        md += [notes.read_text(), ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(md))
    return path
