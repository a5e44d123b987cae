"""Issue 14 group 7: prepared statements a client drops are dropped on the server, and what
`pg_prepared_statements` shows, directly and through a real `o7s serve` in both pool modes.

- Session mode: the client's statement names go to the server unchanged, so `pg_prepared_statements` shows
  exactly what it shows directly (names and statements), after psycopg's LRU eviction (protocol Close) and
  after `DEALLOCATE`.
- Transaction mode: the server knows a statement by O7s's name (`o7s_…`, shared by the clients of the pool
  that prepare the same text), so the names differ; the statements a backend holds for a client that is
  alone on it are the ones it holds directly: a Close or DEALLOCATE inside a transaction reaches the server
  at once, one outside a transaction at the latest when the backend is next attached, and nothing a client
  dropped (or left behind when it disconnected) stays prepared on a backend for ever.
- In both modes, after an error: a name whose Parse the server refused or skipped is undefined, a statement
  whose Close it skipped stays defined, as directly (raw protocol, and psycopg preparing everything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
from conftest import Org, direct_login, extra_tier, proxy_login, raw_session
from psycopg import pq
from test_parity import B, C, D, E, H, P, Q, S, render

pytestmark = pytest.mark.timeout(180)

# A tier of the module's own: one backend, so that a client's next transaction (and the next client) lands
# on the backend its statements are on.
ONE = ("prep-one", 98, 10, 1000, 1, 1, 20000, 60000, "4MB", False, 0, 0, 0, 0, 0)
PREPARED_MAX = 5   # psycopg's LRU of prepared statements
DISTINCT = 10      # distinct queries run, past PREPARED_MAX
MANY = 1100        # statements one client leaves behind (more than a backend keeps, 256, and O7s tracked, 1024)
LIST = "SELECT name, statement FROM pg_prepared_statements ORDER BY prepare_time, name"


@pytest.fixture(scope="module")
def one_org(make_org, migrated) -> Iterator[Org]:
    with extra_tier(migrated, ONE):
        yield make_org("prep_one", ONE[0])


def lru(dsn: str, autocommit: bool) -> list[tuple[str, str]]:
    """psycopg evicting its prepared statements (a protocol Close each), then what the server holds."""
    with psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10) as conn:
        conn.prepared_max = PREPARED_MAX
        conn.prepare_threshold = 0
        for i in range(DISTINCT):
            conn.execute("SELECT 'a'")
            conn.execute(f"SELECT {i}")
        rows = conn.execute(LIST, prepare=False).fetchall()
        conn.rollback()
        return rows


@pytest.mark.parametrize("autocommit", [False, True], ids=["in-a-transaction", "autocommit"])
def test_lru_eviction_of_prepared_statements(one_org, parity_proxy, autocommit):
    direct = lru(one_org.backend_dsn, autocommit)
    assert len(direct) == PREPARED_MAX, direct  # the harness: psycopg closed the ones it evicted
    through = lru(parity_proxy.dsn(one_org), autocommit)
    if parity_proxy.mode == "session":
        assert through == direct
    else:
        assert [s for _, s in through] == [s for _, s in direct]
        assert all(name.startswith("o7s_") for name, _ in through), through


# Raw protocol: DEALLOCATE and Close of statements that were used, inside and outside a transaction.
RAW_STEPS: list[tuple[bytes, int]] = [  # (what is sent, ReadyForQuery messages that end it)
    (P("SELECT 11", "d1") + S() + P("SELECT 12", "d2") + S() + P("SELECT 13", "d3") + S(), 3),
    (B(stmt="d1") + E() + B(stmt="d2") + E() + B(stmt="d3") + E() + S(), 1),  # used: on the server now
    (Q("DEALLOCATE d1"), 1),
    (C("S", "d2") + S(), 1),
    (Q(LIST), 1),
    (Q("BEGIN"), 1),
    (P("SELECT 14", "d4") + B(stmt="d4") + E() + S(), 1),
    (Q(LIST), 1),
    (Q("DEALLOCATE d3"), 1),
    (C("S", "d4") + S(), 1),
    (Q(LIST), 1),
    (Q("COMMIT"), 1),
    (B(stmt="d3") + E() + S(), 1),  # gone: the server's own error
    (Q(LIST), 1),
]


def run_raw(host: str, port: int, user: str, password: str, dbname: str) -> list[list[str]]:
    out = []
    with raw_session(host, port, user, password, dbname) as (pg, _):
        for data, readies in RAW_STEPS:
            pg.sendall(data)
            got: list[str] = []
            while readies:
                msg = pg.recv()
                assert msg is not None, got
                got.append(render(*msg, None))
                readies -= msg[0] == b"Z"
            out.append(got)
    return out


def names_masked(lines: list[str]) -> list[str]:
    """A DataRow of LIST without its first column (the statement's name on the server)."""
    return [line.split(" | ", 1)[1] if line.startswith("D ") and " | " in line else line for line in lines]


def test_deallocate_and_close_reach_the_server(one_org, parity_proxy):
    direct = run_raw(*direct_login(one_org))
    through = run_raw(*proxy_login(parity_proxy, one_org))
    if parity_proxy.mode == "transaction":
        direct = [names_masked(x) for x in direct]
        through = [names_masked(x) for x in through]
    problems = [f"step {i}: {RAW_STEPS[i][0][:40]!r}\n  direct: {want}\n  o7s:    {have}"
                for i, (want, have) in enumerate(zip(direct, through)) if want != have]
    assert not problems, "\n".join(problems)


def test_statements_left_behind_do_not_stay_prepared(one_org, parity_proxy):
    """A client prepares and runs many statements (more than a backend keeps), closes some, and goes away:
    the next client on that backend finds none of them prepared."""
    with psycopg.connect(parity_proxy.dsn(one_org), autocommit=True, connect_timeout=10) as conn:
        conn.prepare_threshold = 0
        conn.prepared_max = MANY + 10
        for i in range(MANY):
            conn.execute(f"SELECT {i} AS left_behind")
    with psycopg.connect(parity_proxy.dsn(one_org), autocommit=True, connect_timeout=10) as conn:
        left = conn.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%left_behind%'",
                            prepare=False).fetchone()[0]
        assert left == 0, f"{left} statements of a client that has gone are still prepared on its backend"


# Named statements after an error (raw protocol): PostgreSQL leaves a name whose Parse it refused or skipped
# (an earlier message of the batch failed) undefined, and a statement whose Close it skipped defined.
# (A named Parse on its own outside a transaction is answered by O7s in transaction mode, a known difference:
# every Parse here reaches the server, in a batch with its Bind or inside a transaction.)
AFTER_ERROR_STEPS: list[tuple[bytes, bytes]] = [  # (what is sent, the message type that ends it)
    (P("SELEC 1", "e1") + B(stmt="e1") + E() + S(), b"Z"),         # the server refuses the Parse
    (B(stmt="e1") + E() + S(), b"Z"),                              # 26000
    (D("S", "e1") + S(), b"Z"),                                    # 26000
    (P("SELECT 1", "e1") + B(stmt="e1") + E() + S(), b"Z"),        # parsed again: fine
    (Q("BEGIN"), b"Z"),
    (P("SELECT 2", "e2") + P("SELEC 3", "e3") + S(), b"Z"),        # one parsed, one refused
    (Q("ROLLBACK"), b"Z"),
    (B(stmt="e2") + E() + S(), b"Z"),                              # defined
    (B(stmt="e3") + E() + S(), b"Z"),                              # 26000
    (P("SELECT 1/0", "e4") + B(stmt="e4") + E() + P("SELECT 5", "e5") + S(), b"Z"),  # e5's Parse is skipped
    (B(stmt="e5") + E() + S(), b"Z"),                              # 26000
    (P("SELECT 1/0") + B() + E() + C("S", "e2") + S(), b"Z"),      # the Close is skipped
    (B(stmt="e2") + E() + S(), b"Z"),                              # still defined
    (P("SELECT 1/0") + B() + E() + H(), b"E"),                     # the error comes back before the Sync
    (P("SELECT 6", "e6") + B(stmt="e6") + E() + C("S", "e1") + S(), b"Z"),  # all skipped up to the Sync
    (B(stmt="e6") + E() + S(), b"Z"),                              # 26000
    (B(stmt="e1") + E() + S(), b"Z"),                              # still defined
    (P("SELECT 6", "e6") + B(stmt="e6") + E() + S(), b"Z"),        # fine
]


def run_after_error(host: str, port: int, user: str, password: str, dbname: str) -> list[list[str]]:
    out = []
    with raw_session(host, port, user, password, dbname) as (pg, _):
        for data, end in AFTER_ERROR_STEPS:
            pg.sendall(data)
            got: list[str] = []
            while not got or got[-1][0] != end.decode():
                msg = pg.recv()
                assert msg is not None, got
                got.append(render(*msg, None))
            out.append(got)
    return out


def test_names_after_an_error_are_left_as_postgresql_leaves_them(one_org, parity_proxy):
    direct = run_after_error(*direct_login(one_org))
    assert any("C='26000'" in line for step in direct for line in step), direct  # the harness
    through = run_after_error(*proxy_login(parity_proxy, one_org))
    problems = [f"step {i}: {AFTER_ERROR_STEPS[i][0][:60]!r}\n  direct: {want}\n  o7s:    {have}"
                for i, (want, have) in enumerate(zip(direct, through)) if want != have]
    assert not problems, "\n".join(problems)


PSYCOPG_NAMES = 8  # `_pg3_0` … `_pg3_7`: more than bad_then_good makes psycopg prepare


def _outcome(run: Callable[[], object]) -> object:
    try:
        return run()
    except psycopg.Error as exc:
        return exc.sqlstate


def _result(res: pq.abc.PGresult) -> tuple[str, bytes | None, bytes | None]:
    value = res.get_value(0, 0) if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples else None
    return pq.ExecStatus(res.status).name, res.error_field(pq.DiagnosticField.SQLSTATE), value


def bad_then_good(dsn: str, autocommit: bool) -> list[object]:
    """psycopg preparing everything (`_pg3_N`): a query the server cannot parse, good ones, a pipeline whose
    first statement fails; then the names psycopg gave them used again, and a name of the client's own
    refused, then parsed again, then parsed once more under the name it now has."""
    with psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10) as conn:
        conn.prepare_threshold = 0
        out: list[object] = []
        for sql in ("SELEC 1", "SELECT 1", "SELECT 2", "SELEC 1", "SELECT 1"):
            out.append(_outcome(lambda: conn.execute(sql).fetchall()))
            if not autocommit:
                conn.rollback()
        try:
            with conn.pipeline():  # the second Parse is skipped: the first statement fails
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 8")
        except psycopg.Error as exc:
            out.append(exc.sqlstate)
        if not autocommit:
            conn.rollback()
        pg = conn.pgconn
        for i in range(PSYCOPG_NAMES):  # every name psycopg gave: those it could not define are not defined
            out.append(_result(pg.exec_prepared(f"_pg3_{i}".encode(), [])))
        out.append(_result(pg.exec_(b"BEGIN")))
        out.append(_result(pg.prepare(b"mine", b"SELEC 1")))  # in a transaction: the server answers
        out.append(_result(pg.exec_(b"ROLLBACK")))
        out.append(_result(pg.exec_prepared(b"mine", [])))
        out.append(_result(pg.describe_prepared(b"mine")))
        out.append(_result(pg.prepare(b"mine", b"SELECT 7")))
        out.append(_result(pg.exec_prepared(b"mine", [])))
        out.append(_result(pg.prepare(b"mine", b"SELECT 8")))  # a name in use: 42P05
        out.append(_result(pg.exec_prepared(b"mine", [])))     # still the first text
        return out


@pytest.mark.parametrize("autocommit", [False, True], ids=["in-a-transaction", "autocommit"])
def test_psycopg_after_a_statement_the_server_cannot_prepare(one_org, parity_proxy, autocommit):
    direct = bad_then_good(one_org.backend_dsn, autocommit)
    assert direct[0] == "42601" and direct[5] == "22012" and direct[-2][1] == b"42P05", direct  # the harness
    names = [r[1] for r in direct[6:6 + PSYCOPG_NAMES]]
    assert names[0] == b"26000" and names.count(b"22012") == 1 and names.count(b"26000") >= 3, direct
    assert bad_then_good(parity_proxy.dsn(one_org), autocommit) == direct
