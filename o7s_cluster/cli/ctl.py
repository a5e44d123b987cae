"""`o7s ctl`: talk to a running cluster through its admin HTTP port.

    o7s ctl status [--json]          workers, their pids, states, connections and orgs; readiness
    o7s ctl workers [N]              show the worker count, or change it to N (1-64) while serving
    o7s ctl org ORG [--json]         one org's live figures: connections, qps, pool state, latency

The admin address is ``--admin HOST:PORT``, else ``$O7S_ADMIN_LISTEN``, else ``admin_listen`` from the TOML
settings file (``--config`` or ``$O7S_CONFIG``). A wildcard listen address (0.0.0.0, ::) is reached on
loopback. The admin token (``Authorization: Bearer``, needed for ``workers N`` and, with ``admin_auth_reads``, for
reads) is ``--admin-token``, else ``$O7S_ADMIN_TOKEN``, else ``admin_token`` from the settings file; it is sent with
every request. The client is the standard library's urllib: a CLI that runs a handful of requests needs nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from o7s_cluster.cli.common import CommandError, UsageError, print_json
from o7s_cluster.config import ConfigError, load_settings, parse_listen

MIN_WORKERS, MAX_WORKERS = 1, 64


def admin_address(args: argparse.Namespace) -> tuple[str, int]:
    raw = getattr(args, "admin", None) or os.environ.get("O7S_ADMIN_LISTEN")
    origin = "--admin" if getattr(args, "admin", None) else "O7S_ADMIN_LISTEN"
    if not raw:
        try:
            raw = load_settings(getattr(args, "config", None)).admin_listen
        except ConfigError as e:
            raise UsageError(f"no admin address: pass --admin HOST:PORT ({e})") from None
        origin = "admin_listen"
    if not raw:
        raise UsageError("no admin address: pass --admin HOST:PORT, or set O7S_ADMIN_LISTEN or admin_listen")
    try:
        host, port = parse_listen(raw)
    except ValueError as e:
        raise UsageError(f"{origin}: {e}") from None
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def admin_token(args: argparse.Namespace) -> str | None:
    """The token to send: --admin-token, $O7S_ADMIN_TOKEN, else admin_token of the settings file (if one is named)."""
    token = getattr(args, "admin_token", None) or os.environ.get("O7S_ADMIN_TOKEN")
    if token:
        return token.strip()
    if getattr(args, "config", None) or os.environ.get("O7S_CONFIG"):
        try:
            return load_settings(getattr(args, "config", None)).admin_token
        except ConfigError as e:
            raise UsageError(f"cannot read the admin token from the settings: {e}") from None
    return None


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}{path}"


def request(args: argparse.Namespace, method: str, path: str, body: Any = None,
            ok: tuple[int, ...] = (200,)) -> tuple[int, Any]:
    """One request to the admin port; (status, decoded JSON or text). One-line errors when it fails."""
    host, port = admin_address(args)
    url = _url(host, port, path)
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    token = admin_token(args)
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise CommandError(f"cannot reach the admin port at {_url(host, port, '')}: {reason}"
                           " (is `o7s serve --admin` running there?)") from None
    except (TimeoutError, OSError) as e:
        raise CommandError(f"the admin port at {_url(host, port, '')} did not answer: "
                           f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
    payload: Any = raw.decode("utf-8", "replace")
    if ctype.startswith("application/json"):
        try:
            payload = json.loads(raw)
        except ValueError:
            pass
    if status not in ok:
        msg = payload.get("error") if isinstance(payload, dict) and payload.get("error") else str(payload).strip()
        raise CommandError(f"{method} {path}: HTTP {status}: {msg}")
    return status, payload


def _uptime(started_at: Any) -> str:
    try:
        s = max(0, int(time.time() - float(started_at)))
    except (TypeError, ValueError):
        return "-"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cmd_status(args: argparse.Namespace) -> int:
    _, ready = request(args, "GET", "/ready", ok=(200, 503))
    _, cluster = request(args, "GET", "/v1/cluster")
    if args.json:
        print_json({"ready": ready, "cluster": cluster})
        return 0
    is_ready = isinstance(ready, dict) and ready.get("ready")
    reasons = {k: v for k, v in ready.items() if k != "ready"} if isinstance(ready, dict) else {}
    why = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    print(f"ready:    {'yes' if is_ready else 'no'}{f'  ({why})' if why else ''}")
    states = ", ".join(f"{n} {s}" for s, n in sorted(cluster.get("states", {}).items()))
    print(f"workers:  {cluster.get('count', 0)}{f'  ({states})' if states else ''}")
    rows = [("WORKER", "PID", "STATE", "UPTIME", "CLIENTS", "ORGS")]
    for w in cluster.get("workers", []):
        orgs = w.get("orgs") or []
        shown = ", ".join(orgs[:8]) + (f", … ({len(orgs)} in all)" if len(orgs) > 8 else "")
        rows.append((str(w.get("index", "?")), str(w.get("pid", "-")), str(w.get("state", "?")),
                     _uptime(w.get("started_at")), str(w.get("client_connections", "-")), shown or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    if args.count is None:
        _, cluster = request(args, "GET", "/v1/cluster")
        states = ", ".join(f"{n} {s}" for s, n in sorted(cluster.get("states", {}).items()))
        print(f"{cluster.get('count', 0)} workers{f' ({states})' if states else ''}")
        return 0
    if not MIN_WORKERS <= args.count <= MAX_WORKERS:
        raise UsageError(f"the worker count must be between {MIN_WORKERS} and {MAX_WORKERS}, not {args.count}")
    _, state = request(args, "POST", "/v1/workers", {"count": args.count})
    if args.json:
        print_json(state)
    else:
        print(f"worker count set to {args.count}")
    return 0


def cmd_org(args: argparse.Namespace) -> int:
    _, doc = request(args, "GET", f"/v1/orgs/{quote(args.org, safe='')}")
    if args.json:
        print_json(doc)
        return 0
    rates = doc.get("rates") or {}
    lat = doc.get("latency_ms") or {}
    pool = doc.get("pool") or {}
    totals = doc.get("totals") or {}
    home = doc.get("home_worker")
    print(f"org:          {doc.get('org')}  (tier {doc.get('tier')}, home worker {home if home is not None else '-'})")
    print(f"connections:  {doc.get('client_connections', 0)} client, {doc.get('backend_connections', 0)} backend")
    if rates:
        print(f"rates:        {rates.get('qps')} queries/s, {rates.get('throttled_per_second')} throttled/s,"
              f" {rates.get('refused_per_second')} refused/s, {rates.get('errors_per_second')} errors/s"
              f" (over {rates.get('window_seconds')} s)")
    print(f"totals:       {totals.get('queries', 0)} queries, {totals.get('errors', 0)} errors,"
          f" {totals.get('throttled', 0)} throttled, {totals.get('refused', 0)} refused")
    if pool:
        print(f"pool:         {pool.get('in_use', '-')} in use, {pool.get('idle', '-')} idle,"
              f" {pool.get('waiting', '-')} waiting")
    if lat.get("count"):
        print(f"latency:      p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, p99 {lat.get('p99')} ms"
              f" ({lat.get('count')} queries)")
    return 0


def register(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add `o7s ctl ...` to the `o7s` parser's subcommands."""
    ctl = subparsers.add_parser("ctl", help="control a running cluster through its admin port",
                                description="control a running cluster through its admin HTTP port")
    sub = ctl.add_subparsers(dest="ctl_command", metavar="CTL_COMMAND", required=True)

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--admin", metavar="HOST:PORT",
                      help="the admin port (default: $O7S_ADMIN_LISTEN, else admin_listen in the settings)")
    conn.add_argument("--config", metavar="PATH", help="TOML settings file to read admin_listen from"
                      " (default: $O7S_CONFIG)")
    conn.add_argument("--admin-token", metavar="TOKEN", help="the admin port's bearer token (default:"
                      " $O7S_ADMIN_TOKEN, else admin_token in the settings); prefer the environment")
    conn.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="default 30")

    def cmd(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common_parent, conn], help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    c = cmd("status", cmd_status, "show readiness and the workers: pids, states, connections, orgs they hold")
    c.add_argument("--json", action="store_true")
    c = cmd("workers", cmd_workers, "show the worker count, or change it to N while serving")
    c.add_argument("count", nargs="?", type=int, metavar="N", help=f"{MIN_WORKERS}-{MAX_WORKERS}")
    c.add_argument("--json", action="store_true", help="print the cluster state the supervisor returns")
    c = cmd("org", cmd_org, "show an org's live figures: connections, qps, pool state, latency")
    c.add_argument("org", metavar="ORG")
    c.add_argument("--json", action="store_true")
