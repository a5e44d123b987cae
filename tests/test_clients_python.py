"""The client matrix, Python drivers on libpq and pure Python: psycopg2 and pg8000 through a real
`o7s serve` in both pool modes, each with a real workload (prepares, transactions, COPY, an error and
the connection staying usable, a cancel, a pool of connections used at once). psycopg 3's own workload
is tests/test_proxy_psycopg.py; here only what that file leaves out: its connection pool and its
asyncio connection."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pg8000.dbapi
import pg8000.native
import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extras
import psycopg2.pool
import psycopg_pool
import pytest

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(60),
]

WORKERS = 8  # connections used at once in the pool tests (the enterprise tier's pool is 50)
ROUNDS = 25  # transactions per connection in the pool tests
CANCEL_AFTER = 0.5  # seconds into a pg_sleep(10) before it is cancelled
CANCELLED_WITHIN = 5.0  # a cancelled pg_sleep(10) must end well before its 10 seconds



@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_py", "enterprise")


def kw(proxy, org) -> dict:
    """Keyword connection parameters for the drivers that take them (psycopg2, pg8000)."""
    return dict(host=proxy.host, port=proxy.port, user=org.name, password=org.password,
                database=org.dbname)


def run_threads(n: int, fn) -> list:
    """fn(i) for i in range(n) in n threads at once; the first failure is re-raised."""
    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(fn, i) for i in range(n)]
        return [f.result(timeout=50) for f in futs]


# ------------------------------------------------------------------------------------------- psycopg2


def pg2(proxy, org, **extra):
    args = kw(proxy, org)
    args["dbname"] = args.pop("database")
    return psycopg2.connect(connect_timeout=10, sslmode="disable", **args, **extra)


@pytest.fixture
def pg2conn(proxy, org):
    conn = pg2(proxy, org)
    yield conn
    conn.close()


def test_psycopg2_types_and_prepared_statements(pg2conn, pool_mode):
    import datetime
    import decimal

    cur = pg2conn.cursor()
    cur.execute("SELECT %s::int, %s::text, %s::bytea, %s::int, %s::date, %s::numeric",
                (7, "héllo\nit's", psycopg2.Binary(b"\x00\x01\xff"), None, datetime.date(2024, 2, 29),
                 decimal.Decimal("12345.6789")))
    row = cur.fetchone()
    assert row[:2] == (7, "héllo\nit's") and bytes(row[2]) == b"\x00\x01\xff"
    assert row[3:] == (None, datetime.date(2024, 2, 29), decimal.Decimal("12345.6789"))
    pg2conn.commit()
    # psycopg2 prepares with SQL PREPARE/EXECUTE: within a transaction that works in both modes.
    cur.execute("PREPARE twice (int) AS SELECT $1 * 2")
    assert [cur.execute("EXECUTE twice (%s)", (i,)) or cur.fetchone()[0] for i in range(5)] == [0, 2, 4, 6, 8]
    cur.execute("DEALLOCATE twice")
    pg2conn.commit()
    # Across transactions: session mode keeps the backend anyway; transaction mode keeps the client on
    # its backend while an SQL-level prepared statement exists (README, session state).
    cur.execute("PREPARE kept (text) AS SELECT upper($1)")
    pg2conn.commit()
    for word in ("abc", "def"):
        cur.execute("EXECUTE kept (%s)", (word,))
        assert cur.fetchone() == (word.upper(),)
        pg2conn.commit()
    cur.execute("DEALLOCATE kept")
    pg2conn.commit()


def test_psycopg2_transactions(pg2conn, pool_mode):
    table = f"pg2_tx_{pool_mode}"
    cur = pg2conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    pg2conn.commit()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    pg2conn.commit()
    cur.execute(f"INSERT INTO {table} VALUES (2, 'dropped')")
    pg2conn.rollback()
    with pg2conn:  # psycopg2's context manager: commit on success, rollback on an exception
        with pg2conn.cursor() as c:
            psycopg2.extras.execute_values(c, f"INSERT INTO {table} VALUES %s",
                                           [(i, f"v{i}") for i in range(10, 110)])
    with pytest.raises(RuntimeError), pg2conn:
        with pg2conn.cursor() as c:
            c.execute(f"INSERT INTO {table} VALUES (3, 'rolled back')")
            raise RuntimeError("roll back")
    # A savepoint rolled back inside a transaction that commits.
    cur.execute(f"INSERT INTO {table} VALUES (4, 'outer')")
    cur.execute("SAVEPOINT s")
    cur.execute(f"INSERT INTO {table} VALUES (5, 'inner')")
    cur.execute("ROLLBACK TO SAVEPOINT s")
    pg2conn.commit()
    # A named (server-side) cursor fetched in batches within its transaction.
    named = pg2conn.cursor(name="batches")
    named.itersize = 7
    named.execute(f"SELECT id FROM {table} WHERE id >= 10 ORDER BY id")
    assert [r[0] for r in named] == list(range(10, 110))
    named.close()
    pg2conn.commit()
    with pg2conn.cursor() as c:
        c.execute(f"SELECT id, v FROM {table} WHERE id < 10 ORDER BY id")
        assert c.fetchall() == [(1, "kept"), (4, "outer")]
    pg2conn.commit()


def test_psycopg2_copy_in_and_out(pg2conn, pool_mode):
    table = f"pg2_copy_{pool_mode}"
    pg2conn.autocommit = True
    cur = pg2conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {table}")
    cur.execute(f"CREATE TABLE {table} (id int, payload text)")
    n = 20_000
    data = "".join(f"{i}\tpayload-{i}\n" for i in range(n))
    cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO(data))
    assert cur.rowcount == n
    cur.copy_from(io.StringIO("-1\t\\N\n-2\ttab\\there\n"), table, columns=("id", "payload"))
    out = io.StringIO()
    cur.copy_expert(f"COPY (SELECT * FROM {table} WHERE id >= 0 ORDER BY id) TO STDOUT", out)
    assert out.getvalue() == data
    cur.execute(f"SELECT payload FROM {table} WHERE id < 0 ORDER BY id DESC")
    assert cur.fetchall() == [(None,), ("tab\there",)]
    # Bad data: the server fails the COPY, the connection goes on.
    with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
        cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO("1\tok\nnot-a-number\tx\n"))
    cur.execute(f"SELECT count(*) FROM {table}")
    assert cur.fetchone() == (n + 2,)


def test_psycopg2_copy_after_set_in_a_transaction(pg2conn, pool_mode):
    """O7s's settings read-back after a SET must never land inside the client's COPY (issue 14, group 1:
    the server said 'unexpected message type 0x51 during COPY from stdin' and closed the connection)."""
    table = f"pg2_setcopy_{pool_mode}"
    cur = pg2conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int)")
    pg2conn.commit()
    cur.execute("SET LOCAL synchronous_commit TO off")  # the classic bulk load
    cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO("1\n2\n3\n"))
    pg2conn.commit()
    cur.execute(f"SELECT count(*) FROM {table}")
    assert cur.fetchone() == (3,)
    pg2conn.commit()
    # Outside a transaction, back to back: the read-back races the client's COPY.
    pg2conn.autocommit = True
    for i in range(10):
        cur.execute(f"SET work_mem = '{8 + i}MB'")
        cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO("4\n"))
    cur.execute("SHOW work_mem")
    assert cur.fetchone() == ("17MB",)


def test_psycopg2_error_then_usable(pg2conn):
    cur = pg2conn.cursor()
    with pytest.raises(psycopg2.errors.DivisionByZero) as ei:
        cur.execute("SELECT 1 / 0")
    assert ei.value.pgcode == "22012"
    with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
        cur.execute("SELECT 1")
    pg2conn.rollback()
    cur.execute("SELECT 'after'")
    assert cur.fetchone() == ("after",)
    pg2conn.commit()
    pg2conn.autocommit = True
    with pytest.raises(psycopg2.errors.UndefinedTable):
        cur.execute("SELECT * FROM no_such_table")
    with pytest.raises(psycopg2.errors.SyntaxError):
        cur.execute("SELEC 1")
    cur.execute("SELECT 2")
    assert cur.fetchone() == (2,)


def test_psycopg2_cancel(proxy, org, pg2conn):
    with pg2(proxy, org) as bystander:
        pg2conn.autocommit = True
        bystander.autocommit = True
        out: dict = {}

        def victim():
            t0 = time.monotonic()
            try:
                pg2conn.cursor().execute("SELECT pg_sleep(10)")
            except Exception as e:  # noqa: BLE001
                out["error"] = e
            out["elapsed"] = time.monotonic() - t0

        def other():
            t0 = time.monotonic()
            bystander.cursor().execute("SELECT pg_sleep(1.5)")
            out["bystander"] = time.monotonic() - t0

        threads = [threading.Thread(target=victim), threading.Thread(target=other)]
        for t in threads:
            t.start()
        time.sleep(CANCEL_AFTER)
        pg2conn.cancel()
        for t in threads:
            t.join(15)
        assert isinstance(out.get("error"), psycopg2.errors.QueryCanceled), out
        assert out["elapsed"] < CANCELLED_WITHIN
        assert out["bystander"] >= 1.4  # the other client's query ran to its end
        cur = pg2conn.cursor()
        cur.execute("SELECT 'after cancel'")
        assert cur.fetchone() == ("after cancel",)
    bystander.close()
    # statement_timeout set by the session, in a transaction with SET LOCAL and at session level.
    pg2conn.autocommit = False
    cur = pg2conn.cursor()
    cur.execute("SET LOCAL statement_timeout = '200ms'")
    with pytest.raises(psycopg2.errors.QueryCanceled):
        cur.execute("SELECT pg_sleep(5)")
    pg2conn.rollback()
    pg2conn.autocommit = True
    cur.execute("SET statement_timeout = '200ms'")
    with pytest.raises(psycopg2.errors.QueryCanceled):
        cur.execute("SELECT pg_sleep(5)")
    cur.execute("RESET statement_timeout")
    cur.execute("SELECT pg_sleep(0.3), 'slow but fine'")
    assert cur.fetchone()[1] == "slow but fine"


def test_psycopg2_pool_concurrent(proxy, org, pool_mode):
    table = f"pg2_pool_{pool_mode}"
    args = kw(proxy, org)
    args["dbname"] = args.pop("database")
    pool = psycopg2.pool.ThreadedConnectionPool(1, WORKERS, connect_timeout=10, sslmode="disable", **args)
    try:
        conn = pool.getconn()
        with conn, conn.cursor() as c:
            c.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (w int PRIMARY KEY, n int)")
            c.executemany(f"INSERT INTO {table} VALUES (%s, 0)", [(w,) for w in range(WORKERS)])
        pool.putconn(conn)

        def work(w: int) -> int:
            conn = pool.getconn()
            try:
                for _ in range(ROUNDS):
                    with conn, conn.cursor() as c:
                        c.execute(f"UPDATE {table} SET n = n + 1 WHERE w = %s", (w,))
                        c.execute(f"SELECT n FROM {table} WHERE w = %s", (w,))
                        last = c.fetchone()[0]
                return last
            finally:
                pool.putconn(conn)

        assert run_threads(WORKERS, work) == [ROUNDS] * WORKERS
    finally:
        pool.closeall()


# --------------------------------------------------------------------------------------------- pg8000


@pytest.fixture
def p8(proxy, org):
    conn = pg8000.native.Connection(**kw(proxy, org), timeout=30)
    yield conn
    conn.close()


def test_pg8000_prepared_statements(p8):
    import datetime

    # pg8000 sends everything through the extended protocol; prepare() is a named server statement.
    assert p8.run("SELECT :a::int + 1, :b::text, :c::bytea, :d::int", a=41, b="it's", c=b"\x00\xff", d=None) == [
        [42, "it's", b"\x00\xff", None]
    ]
    ps = p8.prepare("SELECT :x::int * 3, :when::date")
    for i in range(10):
        assert ps.run(x=i, when=datetime.date(2024, 1, 1 + i)) == [[i * 3, datetime.date(2024, 1, 1 + i)]]
    ps.close()
    # The same statement prepared again after its Close works (named statements are re-created).
    ps = p8.prepare("SELECT :x::int * 3, :when::date")
    assert ps.run(x=5, when=datetime.date(2024, 5, 5)) == [[15, datetime.date(2024, 5, 5)]]
    ps.close()


def test_pg8000_transactions(p8, pool_mode):
    table = f"p8_tx_{pool_mode}"
    p8.run(f"DROP TABLE IF EXISTS {table}")
    p8.run(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    p8.run("START TRANSACTION")
    p8.run(f"INSERT INTO {table} VALUES (1, 'kept')")
    p8.run("COMMIT")
    p8.run("START TRANSACTION")
    p8.run(f"INSERT INTO {table} VALUES (2, 'dropped')")
    p8.run("ROLLBACK")
    # A savepoint rolled back within a committed transaction.
    p8.run("START TRANSACTION")
    p8.run(f"INSERT INTO {table} VALUES (3, 'outer')")
    p8.run("SAVEPOINT s")
    p8.run(f"INSERT INTO {table} VALUES (4, 'inner')")
    p8.run("ROLLBACK TO SAVEPOINT s")
    p8.run("COMMIT")
    assert p8.run(f"SELECT id, v FROM {table} ORDER BY id") == [[1, "kept"], [3, "outer"]]


def test_pg8000_dbapi_transactions(proxy, org, pool_mode):
    table = f"p8_dbapi_{pool_mode}"
    conn = pg8000.dbapi.connect(**kw(proxy, org), timeout=30)
    try:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.commit()
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"v{i}") for i in range(50)])
        conn.commit()
        cur.execute(f"DELETE FROM {table}")
        conn.rollback()
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone() == [50]
        conn.commit()
    finally:
        conn.close()


def test_pg8000_copy_in_and_out(p8, pool_mode):
    table = f"p8_copy_{pool_mode}"
    p8.run(f"DROP TABLE IF EXISTS {table}")
    p8.run(f"CREATE TABLE {table} (id int, payload text)")
    n = 10_000
    data = "".join(f"{i}\tp-{i}\n" for i in range(n))
    p8.run(f"COPY {table} FROM STDIN", stream=io.StringIO(data))
    assert p8.row_count == n
    out = io.StringIO()
    p8.run(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT", stream=out)
    assert out.getvalue() == data
    # CSV with a header, both ways.
    p8.run(f"COPY {table} FROM STDIN WITH (FORMAT csv, HEADER)", stream=io.StringIO('id,payload\n-1,"a,b"\n'))
    out = io.StringIO()
    p8.run(f"COPY (SELECT * FROM {table} WHERE id < 0) TO STDOUT WITH (FORMAT csv)", stream=out)
    assert out.getvalue() == '-1,"a,b"\n'


def test_pg8000_copy_after_set_in_a_transaction(p8, pool_mode):
    table = f"p8_setcopy_{pool_mode}"
    p8.run(f"DROP TABLE IF EXISTS {table}")
    p8.run(f"CREATE TABLE {table} (id int)")
    p8.run("START TRANSACTION")
    p8.run("SET LOCAL synchronous_commit TO off")
    p8.run(f"COPY {table} FROM STDIN", stream=io.StringIO("1\n2\n3\n"))
    p8.run("COMMIT")
    assert p8.run(f"SELECT count(*) FROM {table}") == [[3]]


def test_pg8000_error_then_usable(p8):
    with pytest.raises(pg8000.native.DatabaseError) as ei:
        p8.run("SELECT 1 / 0")
    assert ei.value.args[0]["C"] == "22012"
    assert p8.run("SELECT 'after'") == [["after"]]
    p8.run("START TRANSACTION")
    with pytest.raises(pg8000.native.DatabaseError):
        p8.run("SELECT * FROM no_such_table")
    with pytest.raises(pg8000.native.DatabaseError) as ei:
        p8.run("SELECT 1")
    assert ei.value.args[0]["C"] == "25P02"  # in a failed transaction
    p8.run("ROLLBACK")
    assert p8.run("SELECT 2") == [[2]]


def test_pg8000_cancel_by_statement_timeout(p8):
    # pg8000 has no cancel call: a statement timeout, set in a transaction and for the session.
    p8.run("START TRANSACTION")
    p8.run("SET LOCAL statement_timeout = '200ms'")
    with pytest.raises(pg8000.native.DatabaseError) as ei:
        p8.run("SELECT pg_sleep(5)")
    assert ei.value.args[0]["C"] == "57014"
    p8.run("ROLLBACK")
    p8.run("SET statement_timeout = '200ms'")
    for _ in range(3):  # each time on whichever backend serves the session
        t0 = time.monotonic()
        with pytest.raises(pg8000.native.DatabaseError) as ei:
            p8.run("SELECT pg_sleep(5)")
        assert ei.value.args[0]["C"] == "57014"
        assert time.monotonic() - t0 < CANCELLED_WITHIN
    p8.run("RESET statement_timeout")
    assert p8.run("SELECT pg_sleep(0.3), 'fine'")[0][1] == "fine"


def test_pg8000_concurrent_connections(proxy, org, pool_mode):
    table = f"p8_pool_{pool_mode}"
    with pg8000.native.Connection(**kw(proxy, org), timeout=30) as c:
        c.run(f"DROP TABLE IF EXISTS {table}")
        c.run(f"CREATE TABLE {table} (w int PRIMARY KEY, n int)")
        for w in range(WORKERS):
            c.run(f"INSERT INTO {table} VALUES (:w, 0)", w=w)

    def work(w: int) -> int:
        with pg8000.native.Connection(**kw(proxy, org), timeout=30) as c:
            ps = c.prepare(f"UPDATE {table} SET n = n + 1 WHERE w = :w RETURNING n")
            for _ in range(ROUNDS):
                c.run("START TRANSACTION")
                last = ps.run(w=w)[0][0]
                c.run("COMMIT")
            return last

    assert run_threads(WORKERS, work) == [ROUNDS] * WORKERS


# ------------------------------------------------------------------ psycopg 3: its pool and asyncio


def test_psycopg_pool_concurrent(proxy, org, pool_mode):
    table = f"psy_pool_{pool_mode}"
    with psycopg_pool.ConnectionPool(proxy.dsn(org), min_size=2, max_size=WORKERS, open=True,
                                     timeout=20, kwargs={"connect_timeout": 10}) as pool:
        with pool.connection() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (w int PRIMARY KEY, n int)")
            for w in range(WORKERS):
                conn.execute(f"INSERT INTO {table} VALUES (%s, 0)", (w,))

        def work(w: int) -> int:
            for _ in range(ROUNDS):
                with pool.connection() as conn:  # a transaction per checkout
                    last = conn.execute(f"UPDATE {table} SET n = n + 1 WHERE w = %s RETURNING n", (w,),
                                        prepare=True).fetchone()[0]
            return last

        assert run_threads(WORKERS, work) == [ROUNDS] * WORKERS
        with pool.connection() as conn:
            assert conn.execute(f"SELECT sum(n) FROM {table}").fetchone() == (WORKERS * ROUNDS,)


def test_psycopg_async_workload(proxy, org, pool_mode):
    """psycopg's AsyncConnection, on asyncio as most of its users run it."""
    asyncio.run(asyncio.wait_for(_psycopg_async(proxy, org, pool_mode), 50))


async def _psycopg_async(proxy, org, pool_mode) -> None:
    table = f"psy_async_{pool_mode}"
    async with await psycopg.AsyncConnection.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        async with conn.transaction():
            for i in range(20):
                await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (100, 'x')")
                await conn.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (20,)
        async with conn.cursor() as cur:
            async with cur.copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(200, 300):
                    await copy.write_row((i, f"b{i}"))
            rows = []
            async with cur.copy(f"COPY (SELECT id, v FROM {table} WHERE id >= 200) TO STDOUT (FORMAT binary)") as copy:
                copy.set_types(["int4", "text"])
                async for row in copy.rows():
                    rows.append(row)
        assert rows == [(i, f"b{i}") for i in range(200, 300)]
        # Cancel through the async API while a statement runs.
        async def cancel_soon():
            await asyncio.sleep(CANCEL_AFTER)
            await conn.cancel_safe(timeout=5)

        canceller = asyncio.create_task(cancel_soon())
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - t0 < CANCELLED_WITHIN
        await canceller
        cur = await conn.execute("SELECT 'after cancel'")
        assert await cur.fetchone() == ("after cancel",)


def test_psycopg_copy_after_set_in_a_transaction(proxy, org, pool_mode):
    table = f"psy_setcopy_{pool_mode}"
    with psycopg.connect(proxy.dsn(org), connect_timeout=10) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int)")
        conn.commit()
        conn.execute("SET LOCAL synchronous_commit TO off")
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for i in range(3):
                copy.write_row((i,))
        conn.commit()
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (3,)
