"""Pools against a real PostgreSQL: bounded, fair, timed out clearly, broken connections replaced."""

from __future__ import annotations

import psycopg
import pytest
import trio

from conftest import admin_dsn, create_backend_db
from o7s_cluster.control_plane.dsn import parse_dsn
from o7s_cluster.net.backend import BackendError
from o7s_cluster.net.pool import Pool, PoolSettings, PoolTimeout


@pytest.fixture(scope="module")
def target(pg_server):
    return parse_dsn(create_backend_db(pg_server, "pooltest_db", "pooltest_owner", "pool-pw"))


async def _pid(conn) -> int:
    await conn.send(b"Q\x00\x00\x00\x22select pg_backend_pid()::text\x00")
    pid = None
    while True:
        msg = conn.reader.next()
        if msg is None:
            await conn.receive_messages()
            continue
        t, s, e = msg
        if t == ord("D"):
            pid = int(bytes(conn.reader.buf[s + 11:e]))
        if t == ord("Z"):
            return pid


async def test_pool_is_bounded_and_fifo(target):
    pool = Pool("pooltest_db", target, 2, PoolSettings(acquire_timeout=5))
    a = await pool.acquire()
    b = await pool.acquire()
    assert pool.in_use == 2
    order: list[str] = []

    async def waiter(name: str) -> None:
        conn = await pool.acquire()
        order.append(name)
        pool.release(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "first")
        await trio.sleep(0.05)
        nursery.start_soon(waiter, "second")
        await trio.sleep(0.05)
        assert pool.waiting == 2 and order == []
        pool.release(a)
    assert order == ["first", "second"]
    pool.release(b)
    assert pool.opened_total == 2  # the waiters reused the released connection
    await pool.close()


async def test_pool_timeout_names_the_database_not_the_dsn(target):
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=0.3))
    conn = await pool.acquire()
    with pytest.raises(PoolTimeout) as info:
        await pool.acquire()
    assert 'database "pooltest_db"' in info.value.reason and "pool size 1" in info.value.reason
    assert "pool-pw" not in info.value.reason and str(target.port) not in info.value.reason
    assert info.value.sqlstate == "53P01"
    pool.release(conn)
    await pool.close()


async def test_broken_idle_connection_is_replaced_not_handed_out(target, pg_server):
    pool = Pool("pooltest_db", target, 1, PoolSettings())
    conn = await pool.acquire()
    old_pid = await _pid(conn)
    pool.release(conn)
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (old_pid,))
    await trio.sleep(0.3)
    conn = await pool.acquire()
    new_pid = await _pid(conn)
    assert new_pid != old_pid and pool.opened_total == 2
    pool.release(conn)
    await pool.close()


async def test_failed_connect_gives_the_slot_back(target):
    bad = parse_dsn("postgresql://pooltest_owner:pool-pw@127.0.0.1:1/pooltest_db")
    pool = Pool("pooltest_db", bad, 1, PoolSettings(connect_timeout=2))
    for _ in range(3):
        with pytest.raises(BackendError, match="connection refused"):
            await pool.acquire()
    assert pool.in_use == 0 and pool.waiting == 0


async def test_idle_connections_are_reaped(target):
    pool = Pool("pooltest_db", target, 2, PoolSettings(idle_timeout=0.1))
    a, b = await pool.acquire(), await pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.idle == 2
    await trio.sleep(0.2)
    await pool.reap()
    assert pool.idle == 0
