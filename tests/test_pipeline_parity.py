"""Issue 14 group 6: in pipeline mode the client must see exactly what PostgreSQL sends, and when it sends it.

The server holds its answers to extended-protocol messages until the client's Flush or Sync (or an error,
or a full output buffer). An answer O7s makes itself (a ParseComplete for a statement it prepares where the
statement is first used, a CloseComplete for a statement it owns) must be held the same way, or a pipelining
client (libpq's pipeline mode: psycopg 3's `executemany` and `pipeline()`) reads it early and behaves
differently: an extra round trip in its trace. Two views, directly and through `o7s serve` in both modes:
- a raw protocol client that checks, after each step, what arrives and that nothing arrives before it should;
- libpq's own trace of psycopg 3 (`PGconn.trace`), run three times with fresh connections (so that in
  transaction mode the pooled backends already hold the client's statements): the backend messages, the
  frontend messages and the order of the round trips must be the same as directly.
"""

from __future__ import annotations

import difflib
import os
import socket
import tempfile
from collections.abc import Callable
from itertools import groupby

import psycopg
import pytest
from conftest import Org, direct_login, proxy_login, raw_session
from psycopg import errors as pgerr
from psycopg import pq
from test_parity import B, C, E, H, P, Q, S, render

pytestmark = pytest.mark.timeout(180)

QUIET = 0.4   # seconds in which nothing may arrive after a message the server does not answer yet
ANSWER = 5.0  # seconds an expected answer may take
RUNS = 3      # fresh connections per workload: later ones find their statements on pooled backends
ROWS = [(i, f"v{i}") for i in range(6)]


@pytest.fixture(scope="module")
def porg(make_org) -> Org:
    org = make_org("pipe_parity", "pro")
    with psycopg.connect(org.backend_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("DROP TABLE IF EXISTS pipe_t")
        conn.execute("CREATE TABLE pipe_t (id int PRIMARY KEY, v text)")
    return org


# --------------------------------------------------------------------------------- raw protocol client

# (what it checks, what is sent, what to read: 'quiet' = nothing may arrive within QUIET; n = n messages;
# 'Z' = up to the next ReadyForQuery)
RAW_STEPS: list[tuple[str, bytes, object]] = [
    ("a named Parse alone is not answered", P("SELECT 1", "q1"), "quiet"),
    ("…until the client's Flush", H(), 1),
    ("Bind and Execute without a Sync are not answered", B(stmt="q1") + E(), "quiet"),
    ("…until the Sync", S(), "Z"),
    ("the same text under another name, alone", P("SELECT 1", "q2"), "quiet"),
    ("…Flush", H(), 1),
    ("in a transaction", Q("BEGIN"), "Z"),
    ("a Parse of a text this backend has, alone", P("SELECT 1", "q3"), "quiet"),
    ("a Close of a named statement, alone", C("S", "q3"), "quiet"),
    ("…Flush returns both", H(), 2),
    ("…Sync", S(), "Z"),
    ("commit", Q("COMMIT"), "Z"),
    ("a Close outside a transaction, alone", C("S", "q2"), "quiet"),
    ("…Sync", S(), "Z"),
    ("a bad statement in a pipeline: its error, as the server says it", P("SELEC 1", "q4") + B(stmt="q4") + E() + S(),
     "Z"),
    ("after it, a good one", P("SELECT 2", "q5") + B(stmt="q5") + E() + P("SELECT 3", "q6") + B(stmt="q6") + E() + S(),
     "Z"),
    ("a Parse answered before an error in the same batch", P("SELECT 4", "q7") + P("SELECT 1/0", "q8")
     + B(stmt="q8") + E() + S(), "Z"),
    ("named statements in a pipeline of several Syncs with an error in the middle",
     P("SELECT 1", "q9") + B(stmt="q9") + E() + S() + P("SELECT 1/0", "q10") + B(stmt="q10") + E()
     + B(stmt="q9") + E() + S() + B(stmt="q9") + E() + C("S", "q10") + S(), "Z"),
    ("…", b"", "Z"),
    ("…", b"", "Z"),
    ("statements used across transactions", B(stmt="q7") + E() + S() + B(stmt="q1") + E() + S(), "Z"),
    ("…", b"", "Z"),
]


def run_raw(host: str, port: int, user: str, password: str, dbname: str) -> list[tuple[str, list[str]]]:
    with raw_session(host, port, user, password, dbname, timeout=ANSWER) as (pg, _):
        out = []
        for name, data, until in RAW_STEPS:
            if data:
                pg.sendall(data)
            got: list[str] = []
            if until == "quiet":
                pg.sock.settimeout(QUIET)
                try:
                    msg = pg.recv()
                    got.append(f"early: {render(*msg, None)}" if msg else "closed")
                except (socket.timeout, TimeoutError):
                    got.append("<nothing>")
                pg.sock.settimeout(ANSWER)
            else:
                while True:
                    try:
                        msg = pg.recv()
                    except (socket.timeout, TimeoutError):
                        got.append("<no answer>")
                        out.append((name, got))
                        return out
                    assert msg is not None, f"{name}: connection closed after {got}"
                    got.append(render(*msg, None))
                    if (until == "Z" and msg[0] == b"Z") or (isinstance(until, int) and len(got) == until):
                        break
            out.append((name, got))
    return out


def test_raw_pipeline_timing_and_answers(porg, parity_proxy):
    direct = run_raw(*direct_login(porg))
    assert direct[0][1] == ["<nothing>"], direct  # the harness itself: the server holds its answer
    for run in range(RUNS):  # later runs find "SELECT 1" prepared on the pooled backends
        through = run_raw(*proxy_login(parity_proxy, porg))
        problems = [f"{name}:\n  direct: {want}\n  o7s:    {have}"
                    for (name, want), (_, have) in zip(direct, through) if want != have]
        assert not problems, f"o7s {parity_proxy.mode}, run {run + 1}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------- libpq's trace


def traced(dsn: str, work: Callable[[psycopg.Connection], None]) -> list[str]:
    """libpq's trace of `work` (without timestamps; OIDs and error positions masked by its regress mode)."""
    fd, path = tempfile.mkstemp(prefix="o7s-trace-")
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("TRUNCATE pipe_t")
            conn.pgconn.trace(fd)
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                work(conn)
                conn.execute("SELECT 'end'")  # whatever the work left unread is read inside the trace
            finally:
                conn.pgconn.untrace()
        with open(path) as f:
            return f.read().splitlines()
    finally:
        os.close(fd)
        os.unlink(path)


def executemany(conn: psycopg.Connection) -> None:
    with conn.pipeline(), conn.cursor() as cur:
        cur.executemany("INSERT INTO pipe_t VALUES (%s, %s)", ROWS)
        cur.executemany("INSERT INTO pipe_t VALUES (%s, %s)", [(i + 100, v) for i, v in ROWS])


def executemany_returning(conn: psycopg.Connection) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pipe_t VALUES (%s, %s) RETURNING id", ROWS, returning=True)


def pipeline_syncs(conn: psycopg.Connection) -> None:
    with conn.pipeline() as p:
        for i in range(9):
            conn.execute("SELECT %s::int * 2", (i,))
            if i % 3 == 2:
                p.sync()


def pipeline_error(conn: psycopg.Connection) -> None:
    with pytest.raises(pgerr.UniqueViolation):
        with conn.pipeline() as p:
            conn.execute("INSERT INTO pipe_t VALUES (1, 'x')")
            p.sync()
            conn.execute("INSERT INTO pipe_t VALUES (2, 'x')")
            conn.execute("INSERT INTO pipe_t VALUES (2, 'dup')")
            conn.execute("SELECT 1")
            p.sync()
            conn.execute("SELECT 2")


def until_error(trace: list[str]) -> list[str]:
    """The trace up to its first ErrorResponse: after it, what libpq reads before psycopg raises (and
    leaves unread when it leaves pipeline mode) depends on timing, directly too."""
    for i, line in enumerate(trace):
        if "\tErrorResponse\t" in line:
            return trace[:i + 1]
    return trace


def frontend(trace: list[str]) -> list[str]:
    """The client's messages but its Flushes."""
    return [line for line in trace if line[0] == "F" and "\tFlush" not in line]


def rounds(trace: list[str]) -> list[str]:
    """Who spoke in turn: 'F' (client) and 'B' (server) runs of the trace."""
    return [k for k, _ in groupby(line[0] for line in trace)]


@pytest.mark.parametrize("work", [executemany, executemany_returning, pipeline_syncs, pipeline_error],
                         ids=lambda w: w.__name__)
def test_libpq_trace_of_pipelines(porg, parity_proxy, work):
    direct = traced(porg.backend_dsn, work)
    assert direct, "no trace"
    for run in range(RUNS):
        through = traced(parity_proxy.dsn(porg), work)
        want = [line for line in direct if line[0] == "B"]
        have = [line for line in through if line[0] == "B"]
        if work is pipeline_error:
            want, have = until_error(want), until_error(have)
            assert want and want[-1].split("\t")[2] == "ErrorResponse", want
        assert have == want, f"o7s {parity_proxy.mode}, run {run + 1}: the client received other messages:\n" + "\n".join(
            difflib.unified_diff(want, have, "direct", "o7s", lineterm=""))
        if work is executemany:
            # No Flush until the end: the same messages from the client, in one round trip. (When libpq
            # sends a Flush depends on what it has read, so Flushes vary, directly too: one run of some dozens
            # through O7s showed one more, with the same backend messages and round trips.)
            assert frontend(through) == frontend(direct)
            assert rounds(direct) == ["F", "B", "F", "B"], direct  # the work, then the closing query
            assert rounds(through) == rounds(direct), f"o7s {parity_proxy.mode}, run {run + 1}:\n" + "\n".join(through)
