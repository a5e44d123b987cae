"""Pools against a real PostgreSQL: bounded, fair, timed out clearly, broken connections replaced."""

from __future__ import annotations

import select
import socket

import psycopg
import pytest
import trio

from conftest import admin_dsn, create_backend_db
from o7s_cluster.control_plane.dsn import parse_dsn
from o7s_cluster.net import backend
from o7s_cluster.net.backend import BackendError
from o7s_cluster.net.pool import Pool, PoolSettings, PoolTimeout


@pytest.fixture(scope="module")
def target(pg_server):
    return parse_dsn(create_backend_db(pg_server, "pooltest_db", "pooltest_owner", "pool-pw"))


async def _pid(conn) -> int:
    tag = await conn.query_until_ready("select 1 from pg_stat_activity where pid = pg_backend_pid()")
    assert tag == "SELECT 1"
    return conn.pid


async def test_pool_is_bounded_and_fifo(target, nursery):
    pool = Pool("pooltest_db", target, 2, PoolSettings(acquire_timeout=5), nursery=nursery)
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


async def test_pool_timeout_names_the_database_not_the_dsn(target, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=0.3), nursery=nursery)
    conn = await pool.acquire()
    with pytest.raises(PoolTimeout) as info:
        await pool.acquire()
    assert 'database "pooltest_db"' in info.value.reason and "pool size 1" in info.value.reason
    assert "pool-pw" not in info.value.reason and str(target.port) not in info.value.reason
    assert info.value.sqlstate == "53P01"
    pool.release(conn)
    await pool.close()


async def test_waiters_time_out_at_their_own_deadlines_and_a_cancelled_one_leaves_the_queue(target, nursery):
    """One watchdog ends the waits in order; a waiter that gave up is not handed a connection later."""
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=0.4), nursery=nursery)
    conn = await pool.acquire()
    ended: dict[str, float] = {}

    async def wait(name: str, delay: float) -> None:
        await trio.sleep(delay)
        started = trio.current_time()
        with pytest.raises(PoolTimeout):
            await pool.acquire()
        ended[name] = trio.current_time() - started

    async with trio.open_nursery() as n:
        n.start_soon(wait, "a", 0.0)
        n.start_soon(wait, "b", 0.15)
        with trio.CancelScope() as gave_up:
            gave_up.deadline = trio.current_time() + 0.1
            await pool.acquire()  # cancelled after 0.1 s: it must leave the queue
        assert gave_up.cancelled_caught
    assert set(ended) == {"a", "b"} and all(0.39 <= t < 1.5 for t in ended.values()), ended
    assert pool.waiting == 0
    pool.release(conn)  # nobody is waiting: it goes idle, not to a task that gave up
    assert pool.idle == 1 and pool.in_use == 0
    again = await pool.acquire()  # and after an idle spell, the watchdog still ends waits
    await trio.sleep(0.5)
    with pytest.raises(PoolTimeout):
        with trio.fail_after(3):
            await pool.acquire()
    pool.release(again)
    await pool.close()


async def test_a_timeout_changed_by_a_reload_applies_to_the_next_waits(target, nursery):
    """A reload may shorten the timeout while older, longer waits are queued: the new wait still ends first."""
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=3), nursery=nursery)
    conn = await pool.acquire()
    ended: list[str] = []

    async def wait_long() -> None:
        with pytest.raises(PoolTimeout):
            await pool.acquire()
        ended.append("long")

    async with trio.open_nursery() as n:
        n.start_soon(wait_long)
        await trio.sleep(0.05)
        pool.settings.acquire_timeout = 0.3  # what a SIGHUP does to the pool's settings
        started = trio.current_time()
        with pytest.raises(PoolTimeout) as info:
            await pool.acquire()
        assert trio.current_time() - started < 2 and "within 0.3 s" in info.value.reason
        assert ended == []  # the older, longer wait is still queued
        n.cancel_scope.cancel()
    pool.release(conn)
    await pool.close()


async def test_broken_idle_connection_is_replaced_not_handed_out(target, pg_server, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(), nursery=nursery)
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


async def _readable(conn) -> None:
    with trio.fail_after(5):
        while not select.select([conn.raw], [], [], 0)[0]:
            await trio.sleep(0.01)


async def test_an_idle_connection_the_server_ended_does_not_look_alive_before_anyone_read_it(target, pg_server):
    conn = await backend.connect(target, timeout=5)  # no pump, no poller: only the check sees the socket
    pid = conn.pid
    assert pid and conn.looks_alive() and conn.looks_alive()  # asking reads nothing
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (pid,))
    await _readable(conn)
    assert not conn.looks_alive() and not conn.dead
    conn.channel.close()


async def test_a_connection_closed_without_a_word_does_not_look_alive(target):
    conn = await backend.connect(target, timeout=5)
    assert conn.looks_alive()
    conn.raw.shutdown(socket.SHUT_WR)  # the server answers our goodbye with its own: end of stream
    await _readable(conn)
    assert not conn.looks_alive()
    conn.channel.close()


async def test_failed_connect_gives_the_slot_back(target, nursery):
    bad = parse_dsn("postgresql://pooltest_owner:pool-pw@127.0.0.1:1/pooltest_db")
    pool = Pool("pooltest_db", bad, 1, PoolSettings(connect_timeout=2), nursery=nursery)
    for _ in range(3):
        with pytest.raises(BackendError, match="connection refused"):
            await pool.acquire()
    assert pool.in_use == 0 and pool.waiting == 0


async def test_idle_connections_are_reaped(target, nursery):
    pool = Pool("pooltest_db", target, 2, PoolSettings(idle_timeout=0.1), nursery=nursery)
    a, b = await pool.acquire(), await pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.idle == 2
    await trio.sleep(0.2)
    await pool.reap()
    assert pool.idle == 0


async def test_discarded_connection_frees_its_slot_for_a_waiter(target, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=5), nursery=nursery)
    conn = await pool.acquire()
    got: list[int] = []

    async def waiter() -> None:
        c = await pool.acquire()
        got.append(await _pid(c))
        pool.release(c)

    async with trio.open_nursery() as inner:
        inner.start_soon(waiter)
        await trio.sleep(0.05)
        assert pool.waiting == 1
        old = conn.pid
        await pool.discard(conn)
    assert got and got[0] != old and pool.opened_total == 2 and pool.in_use == 0
    await pool.close()


async def test_pump_feeds_housekeeping_and_sees_the_server_go(target, pg_server, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(), nursery=nursery)
    conn = await pool.acquire()
    assert await conn.query_until_ready("set application_name = 'pumped'") == "SET"
    assert conn.params["application_name"] == "pumped"
    with pytest.raises(BackendError, match="42601"):
        await conn.query_until_ready("selec 1")
    assert await conn.query_until_ready("select 1") == "SELECT 1"  # still usable after an error
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (conn.pid,))
    with trio.fail_after(5):
        while not conn.dead:
            await trio.sleep(0.01)
    with pytest.raises(BackendError, match="closed"):
        await conn.query_until_ready("select 1")
    await pool.discard(conn)


class _Grantee:
    """A waiter called back in the giver's task (as a session queued with `Pool.enqueue` is)."""

    def __init__(self) -> None:
        self.got: list[object] = []

    def granted(self, conn) -> None:
        self.got.append(conn)

    def wait_failed(self, error) -> None:
        self.got.append(error)


async def test_a_queued_grantee_is_handed_a_connection_in_the_givers_task_in_fifo_order(target, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=5), nursery=nursery)
    first, second = _Grantee(), _Grantee()
    assert not pool.enqueue(first)  # a slot is free: the caller opens a connection instead
    conn = await pool.acquire()
    assert pool.enqueue(first) and pool.enqueue(second) and pool.waiting == 2
    pool.release(conn)
    assert first.got == [conn] and second.got == [] and pool.waiting == 1  # before release returned
    assert pool.cancel_wait(second) and pool.waiting == 0 and not pool.cancel_wait(second)
    pool.release(conn)
    assert second.got == [] and pool.idle == 1
    await pool.close()


async def test_a_queued_grantee_times_out_and_is_granted_a_freed_slot(target, nursery):
    pool = Pool("pooltest_db", target, 1, PoolSettings(acquire_timeout=0.2), nursery=nursery)
    conn = await pool.acquire()
    late, freed = _Grantee(), _Grantee()
    assert pool.enqueue(late)
    with trio.fail_after(5):
        while not late.got:
            await trio.sleep(0.05)
    assert isinstance(late.got[0], PoolTimeout) and pool.waiting == 0
    assert pool.enqueue(freed)
    await pool.discard(conn)  # its slot goes to the grantee, which opens a connection in it
    assert freed.got == [None] and pool.in_use == 1
    fresh = await pool.open_granted_slot()
    assert await _pid(fresh)
    pool.release(fresh)
    assert pool.in_use == 0
    await pool.close()
