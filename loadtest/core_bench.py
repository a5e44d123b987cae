"""`python -m loadtest core`: the sans-IO session core alone, per pgbench `-S` transaction, no sockets.

The core is fed what pgbench sends in each `-M` mode and what PostgreSQL answers, the way the shell
does (attach a backend when asked, release it at ReadyForQuery), in a hot loop. It isolates the
core's share of O7s's CPU per transaction from the kernel's and trio's, and shows a change to the core
in seconds rather than in a pgbench run. In the worker the same code costs about twice as much: there
50 sessions and 20 backends take turns, and their objects and the interpreter's caches are cold for each.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable

from o7s_cluster.pgwire import messages as m
from o7s_cluster.proxy.backend import BackendState
from o7s_cluster.proxy.params import sync_sql
from o7s_cluster.proxy.relay import RELEASE
from o7s_cluster.proxy.session import NEED_BACKEND, PROCEED, SessionCore
from o7s_cluster.proxy.statements import PoolStatements

SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
MODES = ("simple", "extended", "prepared")


class _Counters:
    bytes_in = bytes_out = throttled = refused = errors = queries = 0

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        self.queries += 1


def _msg(t: bytes, payload: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(payload) + 4) + payload


def _bind(statement: bytes) -> bytes:
    value = b"12345"
    return _msg(b"B", b"\0" + statement + b"\0" + b"\0\0" + b"\0\1" + struct.pack("!i", len(value)) + value + b"\0\0")


_ROW_DESC = _msg(b"T", struct.pack("!h", 1) + b"abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
_ROW = _msg(b"D", struct.pack("!hi", 1, 1) + b"0")
_DONE = m.command_complete("SELECT 1") + m.ready_for_query(b"I")
_BIND_DONE = _msg(b"2")
_EXTENDED = _bind(b"") + _msg(b"D", b"P\0") + _msg(b"E", b"\0\0\0\0\0") + m.sync()

# What the client sends and what the server answers, per transaction.
TRAFFIC = {
    "simple": (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"), _ROW_DESC + _ROW + _DONE),
    "extended": (m.parse(b"", SQL + b"\0\0\0") + _EXTENDED, m.parse_complete() + _BIND_DONE + _ROW_DESC + _ROW + _DONE),
    "prepared": (_bind(b"P0_1") + _EXTENDED[len(_bind(b"")):], _BIND_DONE + _ROW_DESC + _ROW + _DONE),
}


def _session(mode: str) -> tuple[SessionCore, BackendState, Callable[[], None]]:
    core = SessionCore(transaction_mode=True, counters=_Counters(), pool_statements=PoolStatements(),
                       client_params={"client_encoding": "UTF8"}, take_token=lambda: True)
    backend = BackendState()
    backend.settings.reported["client_encoding"] = "UTF8"
    sent, answer = TRAFFIC[mode]

    def transaction(first_answer: bytes = answer) -> None:
        action = core.feed_client(sent, 1.0)
        while action is not PROCEED:
            if action != NEED_BACKEND:
                raise RuntimeError(f"the core asked for {action}")
            sync_sql(core.client_params, backend.settings)
            core.attached(backend)
            action = core.resume(1.0)
        core.to_backend.clear()
        verdict = core.feed_backend(first_answer, 2.0)
        core.to_client.clear()
        if verdict != RELEASE:
            raise RuntimeError("the backend was not released at the end of the transaction")
        core.detach()

    if mode == "prepared":  # pgbench prepares once; the first Bind prepares it on the backend too
        core.feed_client(m.parse(b"P0_1", SQL + b"\0\0\0") + m.sync(), 0.0)
        core.to_client.clear()
        transaction(m.parse_complete() + answer)
    return core, backend, transaction


def measure(mode: str, transactions: int, repeats: int) -> float:
    """Fastest of `repeats` loops of `transactions`, in µs per transaction."""
    core, _, transaction = _session(mode)
    for _ in range(transactions // 10):
        transaction()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(transactions):
            transaction()
        best = min(best, time.perf_counter() - start)
    if core.counters.queries < transactions * repeats:
        raise RuntimeError("the core did not finish every query")
    return best / transactions * 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes (%(default)s)")
    p.add_argument("--transactions", type=int, default=20000, help="transactions per loop (%(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="loops per mode; the fastest counts (%(default)s)")


def main(a: argparse.Namespace) -> int:
    for mode in a.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r} ({', '.join(MODES)})")
        print(f"{mode:9s} {measure(mode, a.transactions, a.repeats):6.2f} µs of the session core per transaction")
    return 0
