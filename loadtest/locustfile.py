"""Locust scenario: users that each hold one psycopg connection to a PostgreSQL-wire target.

Run by `python -m loadtest` (which writes the JSON config named by LT_CONFIG), or by hand:

    LT_CONFIG=run.json locust -f loadtest/locustfile.py --headless -u 1000 -r 100 -t 60s --processes 2

Config (JSON): targets (one DSN per org; users are spread over them round-robin), mix (weights of
read / update / txn), rate_per_user (tasks/s per user, via `constant_throughput`), rows (account ids
are drawn from 1..rows), window_start / window_end (Unix times: only requests started inside the
window go into our histogram, so the connect ramp is left out), out_dir (where each process writes
its histogram as hist-<pid>.json), fast_wait (default true: psycopg waits through
loadtest/gwait.py instead of gevent's select.poll emulation), prepare_threshold (psycopg's; null = never prepare, which
PgBouncer < 1.21 needs in transaction mode), locust_stats (false = skip Locust's per-request
statistics bookkeeping, see README).

Every request is reported through `environment.events.request.fire`. Next to Locust's statistics
(which round to whole milliseconds) every process keeps an HDR-style microsecond histogram
(loadtest/hdr.py) per operation; the harness merges them across Locust's worker processes.
"""

from __future__ import annotations

# `import locust` runs gevent's monkey.patch_all(); psycopg must be imported after it, or psycopg
# picks its C wait function (a blocking poll() that stalls every greenlet in the process).
import locust  # noqa: I001  (must come first)
from locust import User, constant_throughput, events, task

import gc
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import gevent
from gevent import monkey

import psycopg
from psycopg import waiting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.hdr import Histogram  # noqa: E402

# When the run stops, Locust kills users in the middle of a query; psycopg then logs a warning per
# connection about the rollback it could not send. Those are after the measurement window.
logging.getLogger("psycopg").setLevel(logging.ERROR)

CONFIG: dict = json.loads(Path(os.environ["LT_CONFIG"]).read_text()) if os.environ.get("LT_CONFIG") else {
    "targets": [os.environ.get("LT_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")],
    "mix": {"read": 80, "update": 15, "txn": 5},
    "rate_per_user": 1.0, "rows": 10000, "window_start": 0, "window_end": 1e12,
    "out_dir": None, "prepare_threshold": None, "locust_stats": True,
}

if CONFIG.get("fast_wait", True):
    from loadtest import gwait

    gwait.install()

OPS = ("read", "update", "txn")
_MIX = CONFIG.get("mix", {"read": 80, "update": 15, "txn": 5})
_WEIGHTS = [float(_MIX.get(op, 0)) for op in OPS]
_CUM = [sum(_WEIGHTS[: i + 1]) / sum(_WEIGHTS) for i in range(len(OPS))]
ROWS = int(CONFIG.get("rows", 10000))
W_START = float(CONFIG.get("window_start", 0))
W_END = float(CONFIG.get("window_end", 1e12))
PREPARE = CONFIG.get("prepare_threshold")
PERIOD = 1.0 / float(CONFIG.get("rate_per_user", 1.0))

# Our own measurements, per process.
HIST = {op: Histogram() for op in OPS}
ERRORS: dict[str, int] = {op: 0 for op in (*OPS, "connect")}
ERROR_SAMPLES: dict[str, int] = {}
STATE = {"connected": 0, "connected_at_window": None, "connect_failures": 0, "green_check": None,
         "statements": 0}
CONNECT_HIST = Histogram()


def assert_green() -> dict:
    """psycopg must wait through gevent: the patch is in place, psycopg did not pick its C wait
    function, and a slow query on one greenlet lets another greenlet run meanwhile."""
    if not (monkey.is_module_patched("select") and monkey.is_module_patched("socket")):
        raise RuntimeError("gevent monkey-patching is not in effect")
    wait_c = getattr(waiting, "wait_c", None)
    if CONFIG.get("fast_wait", True) and waiting.wait.__name__ != "wait_gevent":
        raise RuntimeError("the gevent wait function for psycopg is not installed")
    if wait_c is not None and waiting.wait is wait_c:
        raise RuntimeError("psycopg uses its blocking C wait function: it was imported before gevent patched")
    ticks = [0]

    def ticker():
        while True:
            gevent.sleep(0.01)
            ticks[0] += 1

    g = gevent.spawn(ticker)
    try:
        with psycopg.connect(CONFIG["targets"][0], autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT pg_sleep(0.3)")
    finally:
        g.kill()
    if ticks[0] < 10:
        raise RuntimeError(f"psycopg blocked the gevent hub: only {ticks[0]} ticks during a 0.3 s query")
    return {"wait": waiting.wait.__name__, "ticks_during_0.3s_query": ticks[0]}


@events.init.add_listener
def _on_init(environment, **_kw):
    from locust.runners import MasterRunner

    if isinstance(environment.runner, MasterRunner):
        return
    try:
        STATE["green_check"] = assert_green()
    except Exception as ex:  # noqa: BLE001 - report it and stop this process loudly
        STATE["green_check"] = {"error": str(ex)}
        _dump()
        print(f"loadtest: start-up check failed: {ex}", file=sys.stderr, flush=True)
        os._exit(3)
    if not CONFIG.get("locust_stats", True):
        # Keep the request event (anything else listening still hears every request), but take
        # Locust's own per-request statistics bookkeeping off it: our histogram replaces it.
        ev = environment.events.request
        ev._handlers = [h for h in ev._handlers
                        if "Runner.__init__.<locals>.on_request" not in getattr(h, "__qualname__", "")]


def _dump() -> None:
    out = CONFIG.get("out_dir")
    if not out:
        return
    data = {
        "pid": os.getpid(),
        "hist": {op: h.to_json() for op, h in HIST.items()},
        "errors": ERRORS, "error_samples": ERROR_SAMPLES,
        "connect_hist": CONNECT_HIST.to_json(), **STATE,
    }
    p = Path(out) / f"hist-{os.getpid()}.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(p)


@events.test_stop.add_listener
def _on_stop(environment, **_kw):
    _dump()


@events.quitting.add_listener
def _on_quit(environment, **_kw):
    _dump()


@events.spawning_complete.add_listener
def _on_spawned(user_count, **_kw):
    # Everything allocated so far (connections, users) lives to the end: keep the cyclic GC from
    # walking it again and again during the measurement.
    gc.collect()
    gc.freeze()


_user_seq = [0]


class PgUser(User):
    """One psycopg connection per user; one task that draws read / update / txn from the mix."""

    wait_time = constant_throughput(float(CONFIG.get("rate_per_user", 1.0)))

    def on_start(self):
        env = self.environment
        idx = getattr(env.runner, "worker_index", 0) or 0
        nproc = max(1, int(os.environ.get("LT_PROCESSES", "1")))
        n = _user_seq[0] * nproc + idx
        _user_seq[0] += 1
        targets = CONFIG["targets"]
        self.dsn = targets[n % len(targets)]
        self.rng = random.Random(n * 7919 + os.getpid())
        self.conn = None
        self._connect()
        # Locust starts users in batches (spawn rate per second, all at once) and
        # constant_throughput keeps each user's phase, so without this every batch would fire its
        # queries at the same instant, every period, for the whole run: bursts that queue behind
        # each other and look like tens of milliseconds of latency. Start each user at a random
        # phase in its period instead, so the offered load is spread evenly over time.
        if CONFIG.get("phase_jitter", True):
            gevent.sleep(self.rng.random() * PERIOD)
        # constant_throughput measures from the user's creation (in the batch); restart its clock
        # here so the phase chosen above sticks.
        from time import perf_counter

        self._cp_last_run = perf_counter()
        self._cp_last_wait_time = 0

    def _connect(self):
        delay = 0.2
        while self.conn is None:
            t0 = time.perf_counter()
            try:
                self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=30,
                                            prepare_threshold=PREPARE)
                CONNECT_HIST.record(int((time.perf_counter() - t0) * 1e6))
                STATE["connected"] += 1
            except Exception as ex:  # noqa: BLE001
                STATE["connect_failures"] += 1
                self._report("connect", t0, time.perf_counter(), 0, ex, time.time())
                gevent.sleep(delay + self.rng.random() * delay)
                delay = min(delay * 2, 5.0)

    def on_stop(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _report(self, op, t0, t1, rows, exc, wall):
        us = int((t1 - t0) * 1e6)
        if W_START <= wall < W_END:
            if exc is None:
                HIST[op].record(us)
            else:
                ERRORS[op] = ERRORS.get(op, 0) + 1
                key = f"{op}: {type(exc).__name__}: {str(exc).strip()[:160]}"
                ERROR_SAMPLES[key] = ERROR_SAMPLES.get(key, 0) + 1
            if STATE["connected_at_window"] is None:
                STATE["connected_at_window"] = STATE["connected"]
        self.environment.events.request.fire(
            request_type="pg", name=op, response_time=us / 1000, response_length=rows,
            exception=exc, context=None,
        )

    @task
    def one(self):
        r = self.rng.random()
        op = "read" if r < _CUM[0] else ("update" if r < _CUM[1] else "txn")
        wall = time.time()
        t0 = time.perf_counter()
        exc = None
        rows = 0
        conn = self.conn
        try:
            if op == "read":
                cur = conn.execute("SELECT id, balance, name FROM accounts WHERE id = %s",
                                   (self.rng.randint(1, ROWS),))
                rows = len(cur.fetchall())
                STATE["statements"] += 1
            elif op == "update":
                cur = conn.execute("UPDATE accounts SET balance = balance + 1, updated_at = now() "
                                   "WHERE id = %s", (self.rng.randint(1, ROWS),))
                rows = cur.rowcount
                STATE["statements"] += 1
            else:
                a, b = self.rng.sample(range(1, ROWS + 1), 2)
                amount = self.rng.randint(1, 100)
                with conn.transaction():
                    conn.execute("SELECT balance FROM accounts WHERE id IN (%s, %s) ORDER BY id FOR UPDATE",
                                 (a, b))
                    conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                    conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                    conn.execute("INSERT INTO history (src, dst, amount) VALUES (%s, %s, %s)", (a, b, amount))
                rows = 4
                STATE["statements"] += 6  # BEGIN, 4 statements, COMMIT
        except Exception as ex:  # noqa: BLE001
            exc = ex
        t1 = time.perf_counter()
        self._report(op, t0, t1, rows, exc, wall)
        if exc is not None and (conn.closed or conn.broken):
            self.conn = None
            self._connect()
