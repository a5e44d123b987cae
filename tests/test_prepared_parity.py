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
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from conftest import Org, direct_login, extra_tier, proxy_login, raw_session
from test_parity import B, C, E, P, Q, S, render

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
