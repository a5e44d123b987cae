"""The client matrix: asyncpg through a real `o7s serve` in both pool modes. asyncpg prepares every
statement under its own name and caches it, uses the binary format, and cancels on a client-side
timeout: a workload of prepares, transactions, COPY both ways, errors, cancels and a pool."""

from __future__ import annotations

import asyncio
import io
import time

import asyncpg
import pytest

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(60),
]

WORKERS = 8  # pool size in the pool test (the enterprise tier's backend pool is 50)
ROUNDS = 25  # transactions per task in the pool test
RUN_LIMIT = 45  # seconds for one test's coroutine, below the pytest timeout
CANCELLED_WITHIN = 5.0  # a cancelled pg_sleep(10) must end well before its 10 seconds


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_apg", "enterprise")


def run(coro) -> None:
    """asyncpg runs on asyncio (the suite's async tests run on trio): one loop per test, bounded."""
    asyncio.run(asyncio.wait_for(coro, RUN_LIMIT))


async def connect(proxy, org, **kw) -> asyncpg.Connection:
    return await asyncpg.connect(host=proxy.host, port=proxy.port, user=org.name, password=org.password,
                                 database=org.dbname, ssl=False, timeout=10, **kw)


def test_prepared_statements_and_types(proxy, org):
    async def body():
        import datetime
        import decimal
        import uuid

        conn = await connect(proxy, org)
        try:
            u = uuid.uuid4()
            row = await conn.fetchrow(
                "SELECT $1::int, $2::text, $3::bytea, $4::int, $5::date, $6::numeric, $7::uuid, $8::int[], $9::jsonb",
                7, "héllo\nit's", bytes(range(256)), None, datetime.date(2024, 2, 29),
                decimal.Decimal("12345.6789"), u, [1, None, 3], '{"k": [1, 2]}')
            assert tuple(row) == (7, "héllo\nit's", bytes(range(256)), None, datetime.date(2024, 2, 29),
                                  decimal.Decimal("12345.6789"), u, [1, None, 3], '{"k": [1, 2]}')
            stmt = await conn.prepare("SELECT $1::int * 2 AS doubled, $2::text AS label")
            assert [a.name for a in stmt.get_attributes()] == ["doubled", "label"]
            for i in range(20):
                assert await stmt.fetchrow(i, f"l{i}") == (i * 2, f"l{i}")
            # The statement cache: the same text many times, prepared once per connection.
            for i in range(30):
                assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
            # More distinct statements than asyncpg's cache holds (100): evicted ones are closed.
            for i in range(130):
                assert await conn.fetchval(f"SELECT {i} + $1::int", 1) == i + 1
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            # A large result through the binary format.
            rows = await conn.fetch("SELECT i, repeat('x', 100) FROM generate_series(1, 20000) i")
            assert len(rows) == 20000 and rows[-1][0] == 20000
        finally:
            await conn.close()

    run(body())


def test_transactions(proxy, org, pool_mode):
    table = f"apg_tx_{pool_mode}"

    async def body():
        conn = await connect(proxy, org)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
                async with conn.transaction():  # a savepoint
                    await conn.execute(f"INSERT INTO {table} VALUES (2, 'savepoint')")
                with pytest.raises(RuntimeError):
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (3, 'inner rolled back')")
                        raise RuntimeError("roll the savepoint back")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (4, 'rolled back')")
                    await conn.execute(f"INSERT INTO {table} VALUES (1, 'dup')")
            tr = conn.transaction(isolation="serializable")
            await tr.start()
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"m{i}") for i in range(10, 60)])
            await tr.commit()
            tr = conn.transaction()
            await tr.start()
            await conn.execute(f"DELETE FROM {table}")
            await tr.rollback()
            # A server-side cursor, which only lives in a transaction.
            async with conn.transaction():
                got = [r[0] async for r in conn.cursor(f"SELECT id FROM {table} WHERE id >= 10 ORDER BY id",
                                                       prefetch=7)]
            assert got == list(range(10, 60))
            rows = await conn.fetch(f"SELECT id, v FROM {table} WHERE id < 10 ORDER BY id")
            assert [tuple(r) for r in rows] == [(1, "kept"), (2, "savepoint")]
        finally:
            await conn.close()

    run(body())


def test_copy_in_and_out(proxy, org, pool_mode):
    table = f"apg_copy_{pool_mode}"

    async def body():
        conn = await connect(proxy, org)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, payload text)")
            n = 20_000
            data = "".join(f"{i}\tp-{i}\n" for i in range(n)).encode()
            status = await conn.copy_to_table(table, source=io.BytesIO(data))
            assert status == f"COPY {n}"
            # Binary COPY of records.
            status = await conn.copy_records_to_table(table, records=[(-i, f"r{i}") for i in range(1, 101)])
            assert status == "COPY 100"
            out = io.BytesIO()
            await conn.copy_from_query(f"SELECT * FROM {table} WHERE id >= 0 ORDER BY id", output=out)
            assert out.getvalue() == data
            out = io.BytesIO()
            await conn.copy_from_table(table, output=out, format="csv", columns=["id"])
            assert len(out.getvalue().splitlines()) == n + 100
            # Bad data: the server fails the COPY and the connection goes on.
            with pytest.raises(asyncpg.InvalidTextRepresentationError):
                await conn.copy_to_table(table, source=io.BytesIO(b"1\tok\nnope\tx\n"))
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == n + 100
        finally:
            await conn.close()

    run(body())


def test_copy_after_set_in_a_transaction(proxy, org, pool_mode):
    """issue 14, group 1: O7s's settings read-back after a SET once landed inside the COPY that followed."""
    table = f"apg_setcopy_{pool_mode}"

    async def body():
        conn = await connect(proxy, org)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int)")
            async with conn.transaction():  # the classic bulk load: no fsync wait for this transaction
                await conn.execute("SET LOCAL synchronous_commit TO off")
                await conn.copy_records_to_table(table, records=[(i,) for i in range(100)])
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100
        finally:
            await conn.close()

    run(body())


def test_error_then_usable(proxy, org):
    async def body():
        conn = await connect(proxy, org)
        try:
            with pytest.raises(asyncpg.DivisionByZeroError) as ei:
                await conn.fetchval("SELECT 1 / $1::int", 0)
            assert ei.value.sqlstate == "22012"
            assert await conn.fetchval("SELECT 'after'") == "after"
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table")
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.prepare("SELEC 1")
            tr = conn.transaction()
            await tr.start()
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1 / 0")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()
            assert await conn.fetchval("SELECT $1::int", 5) == 5
        finally:
            await conn.close()

    run(body())


def test_cancel(proxy, org):
    async def body():
        conn = await connect(proxy, org)
        bystander = await connect(proxy, org)
        try:
            # A client-side timeout: asyncpg sends a CancelRequest and waits for the query to end.
            other = asyncio.create_task(bystander.fetchval("SELECT pg_sleep(1.5)::text || 'done'"))
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(10)", timeout=0.5)
            assert time.monotonic() - t0 < CANCELLED_WITHIN
            assert await conn.fetchval("SELECT 'after cancel'") == "after cancel"
            assert await other == "done"  # the other client's query was not cancelled
            # The same inside a transaction: the transaction is aborted, a rollback recovers.
            tr = conn.transaction()
            await tr.start()
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(10)", timeout=0.5)
            await tr.rollback()
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()
            await bystander.close()
        # statement_timeout given at startup (server_settings), which follows the session on every backend.
        conn = await connect(proxy, org, server_settings={"statement_timeout": "1000"})
        try:
            for _ in range(3):
                with pytest.raises(asyncpg.QueryCanceledError):
                    await conn.fetchval("SELECT pg_sleep(5)")
            assert await conn.fetchval("SHOW statement_timeout") == "1s"
        finally:
            await conn.close()

    run(body())


def test_pool_concurrent(proxy, org, pool_mode):
    table = f"apg_pool_{pool_mode}"

    async def body():
        async with asyncpg.create_pool(host=proxy.host, port=proxy.port, user=org.name, password=org.password,
                                       database=org.dbname, ssl=False, min_size=2, max_size=WORKERS,
                                       timeout=10) as pool:
            await pool.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (w int PRIMARY KEY, n int)")
            await pool.executemany(f"INSERT INTO {table} VALUES ($1, 0)", [(w,) for w in range(WORKERS)])

            async def work(w: int) -> int:
                for _ in range(ROUNDS):
                    async with pool.acquire() as conn, conn.transaction():
                        last = await conn.fetchval(f"UPDATE {table} SET n = n + 1 WHERE w = $1 RETURNING n", w)
                return last

            assert await asyncio.gather(*(work(w) for w in range(WORKERS))) == [ROUNDS] * WORKERS
            assert await pool.fetchval(f"SELECT sum(n) FROM {table}") == WORKERS * ROUNDS

    run(body())
