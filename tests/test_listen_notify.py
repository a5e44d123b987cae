"""LISTEN/NOTIFY through a real `o7s serve` in both pool modes, with psycopg 3 (sync and async) and asyncpg.

In transaction mode a client that LISTENs holds no pooled backend: the worker's listener connection
serves it (README, "Session state in transaction mode"). Every wait here is bounded: a notification
that does not come fails the test, it never hangs it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import httpx
import psycopg
import pytest
from conftest import free_port, start_proxy, stop_proxy
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(90),
]

WAIT = 5.0        # seconds a notification may take to arrive
QUIET = 1.0       # seconds of silence that show a notification is not coming
FREE_POOL = 3     # the free tier's pool_size (and 5 connections at most)


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("lsn_pro", "pro")  # pool_size 20, max_connections 50


@pytest.fixture(scope="module")
def small(make_org):
    return make_org("lsn_free", "free")  # pool_size 3, max_connections 5


def connect(proxy, org, **kw) -> psycopg.Connection:
    kw.setdefault("connect_timeout", 10)
    kw.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn(org), **kw)


def payloads(conn: psycopg.Connection, n: int, timeout: float = WAIT) -> list[str]:
    return [note.payload for note in conn.notifies(timeout=timeout, stop_after=n)]


def test_notify_from_another_connection_with_payloads(proxy, org):
    with connect(proxy, org) as listener, connect(proxy, org) as sender:
        listener.execute("LISTEN lsn_chan")
        sender.execute("NOTIFY lsn_chan, 'hello'")
        sender.execute("SELECT pg_notify('lsn_chan', %s)", ["it's \"quoted\", ünïcødé\nand long " + "x" * 7000])
        sender.execute("SELECT pg_notify('lsn_chan', '')")
        got = payloads(listener, 3)
        assert got == ["hello", "it's \"quoted\", ünïcødé\nand long " + "x" * 7000, ""]
        sender.execute("NOTIFY lsn_chan, 'again'")
        [note] = list(listener.notifies(timeout=WAIT, stop_after=1))
        assert (note.channel, note.payload) == ("lsn_chan", "again")
        assert note.pid != listener.info.backend_pid  # another session's


def test_channel_names_that_need_quoting(proxy, org):
    with connect(proxy, org) as listener, connect(proxy, org) as sender:
        listener.execute('LISTEN "Weird Chan"')
        listener.execute('LISTEN "quo""te"')
        listener.execute("LISTEN UpperCase")  # folded to uppercase's lower case, as by the server
        sender.execute("SELECT pg_notify('Weird Chan', 'a')")
        sender.execute("SELECT pg_notify('quo\"te', 'b')")
        sender.execute("SELECT pg_notify('uppercase', 'c')")
        sender.execute("SELECT pg_notify('weird chan', 'not this one')")
        got = sorted((n.channel, n.payload) for n in listener.notifies(timeout=WAIT, stop_after=3))
        assert got == [("Weird Chan", "a"), ('quo"te', "b"), ("uppercase", "c")]
        assert list(listener.notifies(timeout=QUIET)) == []


def test_own_notify_comes_back_with_the_pid_the_client_was_given(proxy, org):
    with connect(proxy, org) as conn:
        conn.execute("LISTEN lsn_self")
        conn.execute("NOTIFY lsn_self, 'me'")
        [note] = list(conn.notifies(timeout=WAIT, stop_after=1))
        assert note.payload == "me"
        assert note.pid == conn.info.backend_pid


def test_own_notify_reaches_a_handler_within_the_notify_statement(proxy, org):
    """PostgreSQL sends a session its own notification before the ReadyForQuery of the NOTIFY's
    transaction, so a notify handler has run when execute() returns (psycopg's own tests rely on it)."""
    with connect(proxy, org) as conn:
        got: list[tuple[str, int]] = []
        conn.add_notify_handler(lambda n: got.append((n.payload, n.pid)))
        conn.execute("LISTEN lsn_handler")
        conn.execute("NOTIFY lsn_handler, 'n1'")
        assert got == [("n1", conn.info.backend_pid)]
        with conn.pipeline():  # a pipeline of notifying statements: each one's before its own result
            conn.execute("SELECT pg_notify('lsn_handler', 'p1')")
            conn.execute("SELECT pg_notify('lsn_handler', 'p2')")
        assert [p for p, _ in got] == ["n1", "p1", "p2"]


def test_copy_in_while_listening(proxy, org):
    """A statement whose text names "notify" (here a table) holds the client's next statements until it
    ends; never its own COPY data."""
    with connect(proxy, org) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notify_log (x int)")
        conn.execute("LISTEN lsn_copy")
        with conn.cursor().copy("COPY notify_log FROM STDIN") as copy:
            for i in range(3):
                copy.write_row((i,))
        assert conn.execute("SELECT count(*) >= 3 FROM notify_log").fetchone() == (True,)
        conn.execute("NOTIFY lsn_copy, 'after copy'")
        assert payloads(conn, 1) == ["after copy"]


def test_listen_inside_a_transaction_takes_effect_at_commit(proxy, org):
    with connect(proxy, org, autocommit=False) as listener, connect(proxy, org) as sender:
        listener.execute("LISTEN lsn_tx_rolled")
        listener.rollback()  # dropped, as by the server
        listener.execute("LISTEN lsn_tx")
        listener.execute("NOTIFY lsn_tx, 'own, in the block'")
        listener.commit()
        sender.execute("NOTIFY lsn_tx, 'after commit'")
        sender.execute("NOTIFY lsn_tx_rolled, 'never'")
        got = payloads(listener, 2)
        assert got == ["own, in the block", "after commit"]
        listener.execute("SELECT 1")  # a block again (psycopg's implicit BEGIN)
        listener.commit()
        assert list(listener.notifies(timeout=QUIET)) == []


def test_notifications_wait_until_the_listener_is_between_transactions(proxy, org):
    with connect(proxy, org, autocommit=False) as listener, connect(proxy, org) as sender:
        listener.execute("LISTEN lsn_wait")
        listener.commit()
        listener.execute("SELECT 1")  # in a block now
        sender.execute("NOTIFY lsn_wait, 'later'")
        time.sleep(0.3)
        assert listener.execute("SELECT 2").fetchone() == (2,)
        listener.commit()
        assert payloads(listener, 1) == ["later"]


def test_unlisten_and_unlisten_all(proxy, org, pool_mode):
    with connect(proxy, org) as listener, connect(proxy, org) as sender:
        listener.execute("LISTEN lsn_u1")
        listener.execute("LISTEN lsn_u2")
        channels = {r[0] for r in listener.execute("SELECT * FROM pg_listening_channels()")}
        # In transaction mode the listener connection listens, not the backend that runs the query.
        assert channels == (set() if pool_mode == "transaction" else {"lsn_u1", "lsn_u2"})
        listener.execute("UNLISTEN lsn_u1")
        sender.execute("NOTIFY lsn_u1, 'no'")
        sender.execute("NOTIFY lsn_u2, 'yes'")
        assert payloads(listener, 1) == ["yes"]
        listener.execute("UNLISTEN *")
        sender.execute("NOTIFY lsn_u2, 'no longer'")
        assert list(listener.notifies(timeout=QUIET)) == []


def test_many_listeners_on_one_channel(proxy, org, pool_mode):
    n = 30 if pool_mode == "transaction" else 10  # more than the pool's 20 backends in transaction mode
    listeners = [connect(proxy, org) for _ in range(n)]
    try:
        for conn in listeners:
            conn.execute("LISTEN lsn_many")
        with connect(proxy, org) as sender:
            sender.execute("NOTIFY lsn_many, 'all of you'")
        for conn in listeners:
            assert payloads(conn, 1) == ["all of you"]
    finally:
        for conn in listeners:
            conn.close()


def test_one_listener_leaving_does_not_stop_the_others(proxy, org):
    with connect(proxy, org) as stays, connect(proxy, org) as sender:
        stays.execute("LISTEN lsn_leave")
        with connect(proxy, org) as leaves:
            leaves.execute("LISTEN lsn_leave")
        sender.execute("NOTIFY lsn_leave, 'still here'")
        assert payloads(stays, 1) == ["still here"]
        with connect(proxy, org) as again:
            again.execute("LISTEN lsn_leave")
            sender.execute("NOTIFY lsn_leave, 'both'")
            assert payloads(again, 1) == ["both"]
        assert payloads(stays, 1) == ["both"]


def test_listeners_hold_no_pooled_backend(proxy, small, pool_mode):
    """More listeners than pool slots, and other clients of the org using every pooled backend at once:
    nobody waits for a backend, and the listeners still get what those clients send."""
    if pool_mode != "transaction":
        pytest.skip("session mode: each client has its own backend, listeners included")
    listeners = [connect(proxy, small) for _ in range(2)]
    busy = [connect(proxy, small, autocommit=False) for _ in range(FREE_POOL)]
    try:
        for conn in listeners:
            started = time.monotonic()
            conn.execute("LISTEN lsn_small")
            assert time.monotonic() - started < 2
        for conn in busy:  # every pooled backend held in a transaction
            started = time.monotonic()
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert time.monotonic() - started < 2, "a client waited for a backend a listener holds"
        busy[0].execute("NOTIFY lsn_small, 'from a busy one'")
        for conn in busy:
            conn.commit()
        for conn in listeners:
            assert payloads(conn, 1) == ["from a busy one"]
    finally:
        for conn in listeners + busy:
            conn.close()


def test_more_listeners_than_pool_slots(proxy, small, pool_mode):
    if pool_mode != "transaction":
        pytest.skip("session mode: each client has its own backend, listeners included")
    listeners = [connect(proxy, small) for _ in range(FREE_POOL + 1)]
    try:
        for conn in listeners:
            conn.execute("LISTEN lsn_slots")
        with connect(proxy, small) as other:
            for _ in range(3):
                other.execute("SELECT pg_sleep(0.01)")
            other.execute("NOTIFY lsn_slots, 'x'")
        for conn in listeners:
            assert payloads(conn, 1) == ["x"]
    finally:
        for conn in listeners:
            conn.close()


def test_a_slow_listener_is_closed_with_the_limit_named(proxy, org, pool_mode):
    if pool_mode != "transaction":
        pytest.skip("session mode: notifications wait in the listener's own backend, as directly")
    with connect(proxy, org, autocommit=False) as listener, connect(proxy, org) as sender:
        # The FATAL reaches libpq as the error of a query in flight, or, when it comes while the client is
        # idle, as a notice (then the connection is closed): either way the client is told the limit.
        notices: list[str] = []
        listener.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        listener.execute("LISTEN lsn_flood")
        listener.commit()
        listener.execute("SELECT 1")  # stays in a block: nothing is delivered meanwhile
        sender.execute("SELECT pg_notify('lsn_flood', i || repeat('x', 7000)) FROM generate_series(1, 700) i")
        with pytest.raises(psycopg.OperationalError) as failed:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                listener.execute("SELECT 1")
                time.sleep(0.02)
        assert "too many notifications" in " ".join([str(failed.value), *notices])
        with connect(proxy, org) as fresh:  # the worker is fine
            assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_the_listener_connection_comes_back_after_it_is_terminated(proxy, org, pool_mode):
    if pool_mode != "transaction":
        pytest.skip("session mode has no listener connection")
    with connect(proxy, org) as listener, connect(proxy, org) as sender, \
            psycopg.connect(org.backend_dsn, autocommit=True) as direct:
        listener.execute("LISTEN lsn_back")
        pids = [r[0] for r in direct.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'o7s listener' AND datname = current_database()")]
        assert pids
        for pid in pids:
            direct.execute("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + WAIT
        while True:
            sender.execute("NOTIFY lsn_back, 'after the gap'")
            got = payloads(listener, 1, timeout=0.5)
            if got:
                break
            assert time.monotonic() < deadline, "the listener connection did not come back"
        assert got == ["after the gap"]


def test_psycopg_async_notifies(proxy, org):
    async def body() -> None:
        async with await psycopg.AsyncConnection.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as ln, \
                await psycopg.AsyncConnection.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as snd:
            await ln.execute("LISTEN lsn_async")
            got: list[str] = []

            async def gather() -> None:
                async for note in ln.notifies(timeout=WAIT, stop_after=2):
                    got.append(note.payload)

            task = asyncio.create_task(gather())
            await asyncio.sleep(0.05)
            await snd.execute("NOTIFY lsn_async, 'one'")
            await snd.execute("SELECT pg_notify('lsn_async', 'two')")
            await asyncio.wait_for(task, WAIT + 5)
            assert got == ["one", "two"]
            # Between notifications the listener still runs queries.
            assert await (await ln.execute("SELECT 1")).fetchone() == (1,)

    asyncio.run(asyncio.wait_for(body(), 45))


def test_asyncpg_add_listener(proxy, org):
    async def body():
        kw = dict(host=proxy.host, port=proxy.port, user=org.name, password=org.password, database=org.dbname,
                  ssl=False, timeout=10)
        ln = await asyncpg.connect(**kw)
        snd = await asyncpg.connect(**kw)
        try:
            got: asyncio.Queue = asyncio.Queue()

            def callback(conn, pid, ch, payload) -> None:
                got.put_nowait((pid, ch, payload))

            await ln.add_listener("lsn_apg", callback)
            await snd.execute("NOTIFY lsn_apg, 'from asyncpg'")
            pid, ch, payload = await asyncio.wait_for(got.get(), WAIT)
            assert (ch, payload) == ("lsn_apg", "from asyncpg")
            assert pid != ln.get_server_pid()
            await ln.execute("NOTIFY lsn_apg, 'own'")
            pid, ch, payload = await asyncio.wait_for(got.get(), WAIT)
            assert payload == "own" and pid == ln.get_server_pid()
            async with ln.transaction():  # a transaction on the listening connection, then more
                await ln.execute("SELECT 1")
            await snd.execute("SELECT pg_notify('lsn_apg', 'after')")
            assert (await asyncio.wait_for(got.get(), WAIT))[2] == "after"
            await ln.remove_listener("lsn_apg", callback)  # its UNLISTEN
            await snd.execute("NOTIFY lsn_apg, 'gone'")
            await asyncio.sleep(QUIET)
            assert got.empty()
        finally:
            await ln.close()
            await snd.close()

    asyncio.run(asyncio.wait_for(body(), 45))


def test_asyncpg_listeners_hold_no_pooled_backend(proxy, small, pool_mode):
    """asyncpg LISTENs through the extended protocol (a prepared statement): more of its listeners than
    pool slots, and the org's last connection still gets a backend at once."""
    if pool_mode != "transaction":
        pytest.skip("session mode: each client has its own backend, listeners included")

    async def body() -> None:
        kw = dict(host=proxy.host, port=proxy.port, user=small.name, password=small.password,
                  database=small.dbname, ssl=False, timeout=10)
        listeners = [await asyncpg.connect(**kw) for _ in range(FREE_POOL + 1)]
        try:
            got: asyncio.Queue = asyncio.Queue()
            for conn in listeners:
                await conn.add_listener("lsn_apg_slots", lambda c, pid, ch, payload: got.put_nowait(payload))
            other = await asyncpg.connect(**kw)
            started = time.monotonic()
            await other.execute("NOTIFY lsn_apg_slots, 'x'")
            assert time.monotonic() - started < 2, "waited for a backend a listener holds"
            await other.close()
            assert [await asyncio.wait_for(got.get(), WAIT) for _ in listeners] == ["x"] * len(listeners)
        finally:
            for conn in listeners:
                await conn.close()

    asyncio.run(asyncio.wait_for(body(), 45))


def test_listen_through_the_extended_protocol(proxy, org):
    with connect(proxy, org) as listener, connect(proxy, org) as sender:
        listener.execute("LISTEN lsn_ext_unnamed", binary=True)  # Parse/Bind/Execute/Sync, unnamed
        listener.execute("LISTEN lsn_ext_named", prepare=True)   # a named, prepared statement
        sender.execute("NOTIFY lsn_ext_unnamed, 'u'")
        sender.execute("NOTIFY lsn_ext_named, 'n'")
        assert sorted(payloads(listener, 2)) == ["n", "u"]
        listener.execute("UNLISTEN *", prepare=True)
        sender.execute("NOTIFY lsn_ext_named, 'gone'")
        assert list(listener.notifies(timeout=QUIET)) == []


def test_listening_from_threads_while_others_query(proxy, org):
    """Listeners waiting in notifies() from threads while other clients run transactions: all return."""
    got: dict[int, list[str]] = {}
    ready = threading.Barrier(5)

    def listen(i: int) -> None:
        with connect(proxy, org) as conn:
            conn.execute("LISTEN lsn_threads")
            ready.wait(timeout=10)
            got[i] = payloads(conn, 3)

    threads = [threading.Thread(target=listen, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    ready.wait(timeout=10)
    with connect(proxy, org) as sender:
        for k in range(3):
            with sender.transaction():
                sender.execute("SELECT pg_sleep(0.01)")
                sender.execute("SELECT pg_notify('lsn_threads', %s)", [str(k)])
    for t in threads:
        t.join(timeout=WAIT + 5)
        assert not t.is_alive()
    assert got == {i: ["0", "1", "2"] for i in range(4)}


def test_the_listener_connection_is_counted_in_metrics(proxy, pool_mode, migrated, tmp_path_factory, org):
    """It is outside pool_size, so an operator sees it on its own: o7s_listener_connections, and what it
    relayed: o7s_notifications_total."""
    if pool_mode != "transaction":
        pytest.skip("session mode has no listener connection")
    admin = free_port()
    p = start_proxy(migrated, tmp_path_factory.mktemp("lsn-admin"), "--admin", f"127.0.0.1:{admin}")
    try:
        deadline = time.monotonic() + 20  # its workers take clients once the supervisor says they are all up
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the proxy did not get ready"
            time.sleep(0.1)

        def figures() -> dict[str, float]:
            text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
            return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.labels.get("org") == org.name and s.name in ("o7s_listener_connections", "o7s_notifications_total")}

        with psycopg.connect(p.dsn(org), autocommit=True, connect_timeout=10) as listener, \
                psycopg.connect(p.dsn(org), autocommit=True, connect_timeout=10) as sender:
            listener.execute("LISTEN lsn_metrics")
            listener.execute("LISTEN lsn_metrics_2")
            sender.execute("NOTIFY lsn_metrics, 'a'")
            sender.execute("NOTIFY lsn_metrics_2, 'b'")
            assert payloads(listener, 2) == ["a", "b"]
            deadline = time.monotonic() + 10
            while (seen := figures()) != {"o7s_listener_connections": 1, "o7s_notifications_total": 2}:
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
    finally:
        stop_proxy(p)
