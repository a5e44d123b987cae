"""psycopg through a real `o7s serve`, in both pool modes: everything works as it does against Postgres."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import errors as pgerr

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(90),
]


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("psy_pro", "pro")  # pool_size 20, max_connections 50


def connect(proxy, org, **kw) -> psycopg.Connection:
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn(org), **kw)


def run_threads(n: int, fn) -> list:
    """Run fn(i) for i in range(n) in n threads; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(fn, i) for i in range(n)]
        return [f.result(timeout=80) for f in futs]


# ------------------------------------------------------------------------------------------ basics


def test_connect_and_routing(proxy, org):
    with connect(proxy, org, autocommit=True) as conn:
        db, user = conn.execute("SELECT current_database(), current_user").fetchone()
        assert db == org.dbname
        assert user == f"{org.name}_owner"


def test_user_dot_org_form(proxy, org):
    dsn = proxy.dsn(org, user=f"alice.{org.name}")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == org.dbname


def test_simple_protocol(proxy, org):
    with connect(proxy, org, autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        # Several statements in one string only work with the simple query protocol.
        cur.execute("SELECT 1 AS a, 'x'::text AS b; SELECT 2")
        assert cur.fetchall() == [(1, "x")]
        assert cur.nextset()
        assert cur.fetchall() == [(2,)]
        # ClientCursor merges params client-side and still uses simple Query.
        cur.execute("SELECT %s::int + 1, %s::text", (41, "it's"))
        assert cur.fetchone() == (42, "it's")
        assert conn.execute("SELECT 'simple'", prepare=False).fetchone() == ("simple",)
        # Empty query and a comment-only query.
        cur.execute("")
        cur.execute("-- nothing")


def test_extended_protocol_params(proxy, org):
    import datetime
    import decimal
    import json

    from psycopg.types.json import Jsonb

    with connect(proxy, org, autocommit=True) as conn:
        row = conn.execute(
            "SELECT %s::int, %s::text, %s::bytea, %s::int, %s::date, %s::numeric, %s::jsonb, %s::int[]",
            (7, "héllo\nworld", b"\x00\x01\xff", None, datetime.date(2024, 2, 29),
             decimal.Decimal("12345.6789"), Jsonb({"k": [1, 2]}), [1, 2, 3]),
        ).fetchone()
        assert row == (7, "héllo\nworld", b"\x00\x01\xff", None, datetime.date(2024, 2, 29),
                       decimal.Decimal("12345.6789"), {"k": [1, 2]}, [1, 2, 3])
        # Binary results.
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %s::bigint * 2, %b::bytea", (2**40, b"abc"))
        assert cur.fetchone() == (2**41, b"abc")
        # Many rows with params.
        rows = conn.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) i", (1000,)).fetchall()
        assert len(rows) == 1000 and rows[-1][0] == 1000
        assert json.dumps(rows[0][1])  # str


def test_auto_prepare_after_threshold(proxy, org, pool_mode):
    with connect(proxy, org, autocommit=True) as conn:
        assert conn.prepare_threshold == 5
        for i in range(12):
            got = conn.execute("SELECT %s::int * 3, 'auto-prep'", (i,)).fetchone()
            assert got == (i * 3, "auto-prep")
        if pool_mode == "session":
            # The statement really was prepared by name on the backend.
            names = conn.execute(
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%auto-prep%'"
            ).fetchall()
            assert names, "psycopg should have prepared the statement after 5 runs"
        # Explicit preparation, then many runs.
        for i in range(8):
            assert conn.execute("SELECT %s::text || '-explicit'", (str(i),), prepare=True).fetchone() == (
                f"{i}-explicit",
            )


def test_prepare_everything_like_asyncpg(proxy, org):
    with connect(proxy, org, autocommit=True) as conn:
        conn.prepare_threshold = 0  # prepare every statement on first use
        for i in range(10):
            assert conn.execute("SELECT %s::int + 100", (i,)).fetchone() == (i + 100,)
            assert conn.execute(f"SELECT {i} AS literal_{i % 3}").fetchone() == (i,)
        with conn.transaction():
            assert conn.execute("SELECT %s::text", ("in-tx",)).fetchone() == ("in-tx",)


def test_prepared_statement_eviction(proxy, org):
    """psycopg deallocates statements it evicts from its cache (DEALLOCATE or Close): that must work
    through the proxy too, and the names must be reusable afterwards."""
    with connect(proxy, org, autocommit=True) as conn:
        conn.prepared_max = 3
        for rnd in range(3):
            for q in range(10):
                for i in range(2):
                    r = conn.execute(f"SELECT %s::int + {q}", (i,), prepare=True).fetchone()
                    assert r == (i + q,)
        conn.execute("DEALLOCATE ALL")
        for q in range(4):
            assert conn.execute(f"SELECT %s::int + {q}", (1,), prepare=True).fetchone() == (1 + q,)


def test_many_clients_prepared_statements(proxy, org, pool_mode):
    """More clients than the pool has backend connections, each with its own statements under the
    same psycopg names (_pg3_0, ...), so a backend serving one client next serves another."""
    n = 40 if pool_mode == "transaction" else 15  # session mode: one backend each, pool_size 20

    def client(tid: int) -> int:
        with connect(proxy, org, autocommit=True) as conn:
            conn.prepare_threshold = 0 if tid % 2 else 2
            for i in range(15):
                # Per-client SQL text: the same statement name means different SQL on each client.
                r = conn.execute(f"SELECT %s::int * %s::int + {tid}", (tid, i)).fetchone()
                assert r == (tid * i + tid,), (tid, i, r)
                r = conn.execute("SELECT %s::text || %s::text", (f"c{tid}-", str(i)), prepare=True).fetchone()
                assert r == (f"c{tid}-{i}",)
                if i % 5 == 0:
                    with conn.transaction():
                        r = conn.execute(f"SELECT %s::int - {tid}", (i,)).fetchone()
                        assert r == (i - tid,)
                        conn.execute("SELECT pg_sleep(0.005)")
        return tid

    assert run_threads(n, client) == list(range(n))


# ------------------------------------------------------------------------------- transactions


@pytest.fixture
def table(proxy, org, pool_mode):
    name = f"t_{pool_mode}"
    with connect(proxy, org, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    return name


def test_commit_and_rollback(proxy, org, table):
    with connect(proxy, org) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'committed')")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (2, 'rolled back')")
        conn.rollback()
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (3, 'ctx')")
            with conn.transaction():  # savepoint
                conn.execute(f"INSERT INTO {table} VALUES (4, 'savepoint')")
            try:
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (5, 'inner rolled back')")
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
        conn.commit()
    with connect(proxy, org, autocommit=True) as other:
        rows = other.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall()
    assert rows == [(1, "committed"), (3, "ctx"), (4, "savepoint")]


def test_uncommitted_is_invisible_to_others(proxy, org, table):
    with connect(proxy, org) as a, connect(proxy, org, autocommit=True) as b:
        a.execute(f"INSERT INTO {table} VALUES (10, 'pending')")
        assert b.execute(f"SELECT count(*) FROM {table} WHERE id = 10").fetchone() == (0,)
        a.commit()
        assert b.execute(f"SELECT count(*) FROM {table} WHERE id = 10").fetchone() == (1,)


def test_error_in_transaction_then_rollback(proxy, org, table):
    with connect(proxy, org) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (20, 'x')")
        with pytest.raises(pgerr.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pgerr.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 42").fetchone() == (42,)
        conn.commit()
        # Errors in the extended protocol and in prepared statements, then recovery.
        with pytest.raises(pgerr.UniqueViolation):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (21, "a"))
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (21, "b"))
        conn.rollback()
        for d in (1, 0, 2, 0, 4):
            try:
                r = conn.execute("SELECT 8 / %s::int", (d,), prepare=True).fetchone()
                assert r == (8 // d,)
                conn.commit()
            except pgerr.DivisionByZero:
                assert d == 0
                conn.rollback()
        with pytest.raises(pgerr.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_anywhere")
        conn.rollback()
        with pytest.raises(pgerr.SyntaxError):
            conn.execute("SELEC 1")
        conn.rollback()
    with connect(proxy, org, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE id IN (20, 21)").fetchone() == (0,)
        with pytest.raises(pgerr.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)


# ------------------------------------------------------------------------------------------- COPY


def test_copy_in_and_out(proxy, org, pool_mode):
    name = f"copy_{pool_mode}"
    n = 100_000
    data = "".join(f"{i}\t{'p' * 40}-{i}\n" for i in range(n)).encode()  # ~5 MB
    with connect(proxy, org, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id int, payload text)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {name} (id, payload) FROM STDIN") as copy:
                for off in range(0, len(data), 65536):
                    copy.write(data[off : off + 65536])
            assert cur.rowcount == n
        assert conn.execute(f"SELECT count(*), max(id) FROM {name}").fetchone() == (n, n - 1)
        out = bytearray()
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, payload FROM {name} ORDER BY id) TO STDOUT") as copy:
                for chunk in copy:
                    out += chunk
        assert bytes(out) == data
        # Row-wise copy with types.
        with conn.cursor() as cur:
            with cur.copy(f"COPY {name} (id, payload) FROM STDIN") as copy:
                copy.write_row((-1, "tab\there"))
                copy.write_row((-2, None))
        assert conn.execute(f"SELECT payload FROM {name} WHERE id < 0 ORDER BY id").fetchall() == [
            (None,), ("tab\there",)
        ]


def test_copy_errors_and_recovery(proxy, org, pool_mode):
    name = f"copyerr_{pool_mode}"
    with connect(proxy, org, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id int)")
        # Bad data: the server fails the COPY.
        with pytest.raises(pgerr.InvalidTextRepresentation):
            with conn.cursor().copy(f"COPY {name} FROM STDIN") as copy:
                copy.write(b"1\n2\nnot-a-number\n3\n")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # The client aborts the COPY (CopyFail).
        with pytest.raises(ZeroDivisionError):
            with conn.cursor().copy(f"COPY {name} FROM STDIN") as copy:
                copy.write(b"1\n")
                1 / 0  # noqa: B018
        assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)
        # COPY inside a transaction that is then rolled back.
        with pytest.raises(RuntimeError):
            with conn.transaction():
                with conn.cursor().copy(f"COPY {name} FROM STDIN") as copy:
                    copy.write(b"7\n8\n")
                raise RuntimeError("rollback")
        assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)


# ------------------------------------------------------------------------------ NOTICE, ParameterStatus


def test_notice(proxy, org):
    notices = []
    with connect(proxy, org, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        conn.execute("DROP TABLE IF EXISTS surely_not_here_123")  # server NOTICE: does not exist
    assert ("NOTICE", "hello 42") in notices
    assert ("WARNING", "careful") in notices
    assert any("surely_not_here_123" in m for _, m in notices)


def test_parameter_status(proxy, org):
    with connect(proxy, org, autocommit=True, application_name="startup-app") as conn:
        assert conn.info.parameter_status("application_name") == "startup-app"
        assert conn.execute("SHOW application_name").fetchone() == ("startup-app",)
        for sql, param, value in [
            ("SET application_name = 'psy-app'", "application_name", "psy-app"),
            ("SET TimeZone = 'America/Chicago'", "TimeZone", "America/Chicago"),
            ("SET DateStyle = 'SQL, DMY'", "DateStyle", "SQL, DMY"),
            ("SET IntervalStyle = 'iso_8601'", "IntervalStyle", "iso_8601"),
        ]:
            conn.execute(sql)
            assert conn.info.parameter_status(param) == value
            assert conn.execute(f"SHOW {param}").fetchone() == (value,)
        for p in ("server_version", "server_encoding", "client_encoding", "integer_datetimes",
                  "standard_conforming_strings"):
            assert conn.info.parameter_status(p), p


def test_session_settings_follow_the_client(proxy, org, pool_mode):
    """A sets session settings; many other clients churn the pool; A still has its settings and
    the others never see A's."""
    with connect(proxy, org, autocommit=True, application_name="client-a") as a:
        default_tz = a.info.parameter_status("TimeZone")
        a.execute("SET TimeZone = 'Asia/Kathmandu'")
        a.execute("SET DateStyle = 'German, DMY'")
        # SET LOCAL does not outlive its transaction.
        with a.transaction():
            a.execute("SET LOCAL TimeZone = 'UTC'")
            assert a.execute("SHOW TimeZone").fetchone() == ("UTC",)
        assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Kathmandu",)

        def other(tid: int) -> None:
            with connect(proxy, org, autocommit=True) as b:
                for _ in range(8):
                    with b.transaction():
                        tz, ds, app = b.execute(
                            "SELECT current_setting('TimeZone'), current_setting('DateStyle'),"
                            " current_setting('application_name')"
                        ).fetchone()
                        assert tz == default_tz, f"client {tid} sees another client's TimeZone {tz}"
                        assert ds != "German, DMY"
                        assert app != "client-a"
                        b.execute("SELECT pg_sleep(0.002)")

        run_threads(30 if pool_mode == "transaction" else 12, other)

        assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Kathmandu",)
        assert a.execute("SHOW DateStyle").fetchone() == ("German, DMY",)
        assert a.execute("SHOW application_name").fetchone() == ("client-a",)
        assert a.execute("SELECT '2024-01-02'::date::text").fetchone() == ("02.01.2024",)
        assert a.info.parameter_status("TimeZone") == "Asia/Kathmandu"
        a.execute("RESET TimeZone")
        assert a.execute("SHOW TimeZone").fetchone() == (default_tz,)


def test_unreported_settings_follow_the_client(proxy, org, pool_mode):
    """Settings the server does not report in ParameterStatus (search_path, statement_timeout, work_mem):
    set by one client, they must neither be lost when its backend changes nor leak to other clients."""
    with connect(proxy, org, autocommit=True) as a:
        a.execute("SET search_path = pg_catalog, public")
        a.execute("SET statement_timeout = '123s'")

        def other(tid: int) -> None:
            with connect(proxy, org, autocommit=True) as b:
                for _ in range(8):
                    with b.transaction():
                        path, st = b.execute(
                            "SELECT current_setting('search_path'), current_setting('statement_timeout')"
                        ).fetchone()
                        assert path == '"$user", public', f"client {tid} got another client's search_path"
                        assert st != "123s", f"client {tid} got another client's statement_timeout"
                        b.execute("SELECT pg_sleep(0.002)")

        run_threads(30 if pool_mode == "transaction" else 12, other)
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog, public",)
        assert a.execute("SHOW statement_timeout").fetchone() == ("123s",)


def test_startup_options_follow_the_client(proxy, org, pool_mode):
    """Settings given at start-up (options=-c ...) hold for the whole session, whichever backend serves it."""
    with connect(proxy, org, autocommit=True, options="-c search_path=pg_catalog,public -c work_mem=7MB") as a:

        def other(tid: int) -> None:
            with connect(proxy, org, autocommit=True) as b:
                for _ in range(5):
                    with b.transaction():
                        wm = b.execute("SELECT current_setting('work_mem')").fetchone()[0]
                        assert wm != "7MB", f"client {tid} got another client's start-up work_mem"
                        b.execute("SELECT pg_sleep(0.002)")

        for _ in range(3):
            assert a.execute("SHOW work_mem").fetchone() == ("7MB",)
            assert a.execute("SHOW search_path").fetchone() == ("pg_catalog,public",)
            run_threads(25 if pool_mode == "transaction" else 10, other)


def test_session_state_does_not_reach_the_next_client(proxy, make_org, pool_mode):
    """Session mode: when a client leaves, its backend connection is reset before anyone else gets it
    (settings, temp tables, prepared statements, advisory locks, LISTEN)."""
    if pool_mode != "session":
        pytest.skip("session-level state (temp tables, advisory locks) is unsupported in transaction mode")
    small = make_org("psy_reuse", "free")
    with connect(proxy, small, autocommit=True) as a:
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        a.execute("SET search_path = pg_catalog")
        a.execute("SET statement_timeout = '77s'")
        a.execute("CREATE TEMP TABLE a_temp (x int)")
        a.execute("PREPARE a_stmt AS SELECT 1")
        a.execute("SELECT pg_advisory_lock(4242)")
        a.execute("LISTEN a_channel")
    seen = False
    for _ in range(10):
        with connect(proxy, small, autocommit=True) as b:
            if b.execute("SELECT pg_backend_pid()").fetchone()[0] != pid:
                continue
            seen = True
            path, st, temp, prepared, locks, chans = b.execute(
                "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
                " to_regclass('pg_temp.a_temp'), (SELECT count(*) FROM pg_prepared_statements),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),"
                " (SELECT count(*) FROM pg_listening_channels())"
            ).fetchone()
            assert st != "77s"  # the tier's statement_timeout, not the previous client's
            assert (path, temp, prepared, locks, chans) == ('"$user", public', None, 0, 0, 0)
    if not seen:
        pytest.skip("the pool never handed out the same backend connection again: nothing to check")


# ------------------------------------------------------------------------------------ large results


def test_large_result(proxy, org):
    n = 200_000
    with connect(proxy, org, autocommit=True) as conn:
        cur = conn.cursor()
        t0 = time.monotonic()
        cur.execute("SELECT i, repeat('x', 250) FROM generate_series(1, %s) i", (n,))
        count = total = last = 0
        for i, s in cur:
            count += 1
            total += len(s)
            last = i
        assert (count, total, last) == (n, n * 250, n)  # ~50 MB
        assert time.monotonic() - t0 < 60
        # One 20 MB value in a single DataRow, and an 8 MB parameter from the client.
        assert conn.execute("SELECT length(repeat('y', 20 * 1024 * 1024))").fetchone() == (20 * 1024 * 1024,)
        big = conn.execute("SELECT repeat('z', 20 * 1024 * 1024)").fetchone()[0]
        assert len(big) == 20 * 1024 * 1024
        s = "q" * (8 * 1024 * 1024)
        assert conn.execute("SELECT length(%s::text)", (s,)).fetchone() == (len(s),)
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ----------------------------------------------------------------------------------------- cancel


def test_cancel(proxy, org):
    with connect(proxy, org, autocommit=True) as conn, connect(proxy, org, autocommit=True) as bystander:
        result: dict = {}

        def victim():
            t0 = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(10)")
            except Exception as e:  # noqa: BLE001
                result["error"] = e
            result["elapsed"] = time.monotonic() - t0

        def innocent():
            t0 = time.monotonic()
            bystander.execute("SELECT pg_sleep(2)")
            result["bystander"] = time.monotonic() - t0

        t1 = threading.Thread(target=victim)
        t2 = threading.Thread(target=innocent)
        t1.start()
        t2.start()
        time.sleep(0.8)
        conn.cancel_safe(timeout=5)
        t1.join(15)
        t2.join(15)
        assert isinstance(result.get("error"), pgerr.QueryCanceled), result
        assert result["elapsed"] < 5
        assert 1.9 < result["bystander"] < 8  # the other client's query was not cancelled
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
        # Cancel inside a transaction: the transaction is aborted, rollback recovers.
        conn.autocommit = False
        t1 = threading.Thread(target=victim)
        result.clear()
        t1.start()
        time.sleep(0.8)
        conn.cancel_safe(timeout=5)
        t1.join(15)
        assert isinstance(result.get("error"), pgerr.QueryCanceled), result
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.commit()


def test_cancel_of_an_idle_client_spares_others_on_its_last_backend(proxy, make_org, pool_mode):
    """In transaction mode a backend a client used is soon serving others: that client's cancel, sent
    while it is idle, must not cancel their queries."""
    small = make_org("psy_free", "free")  # pool_size 3: every backend is busy below
    with connect(proxy, small, autocommit=True) as a:
        a.execute("SELECT 1")
        n = 3 if pool_mode == "transaction" else 2
        outcomes = []

        def sleeper(i: int) -> None:
            with connect(proxy, small, autocommit=True) as b:
                try:
                    b.execute("SELECT pg_sleep(1.5)")
                    outcomes.append("ok")
                except pgerr.QueryCanceled:
                    outcomes.append("cancelled")

        threads = [threading.Thread(target=sleeper, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        time.sleep(0.6)
        a.cancel_safe(timeout=5)
        for t in threads:
            t.join(15)
        assert outcomes == ["ok"] * n
        assert a.execute("SELECT 'a ok'").fetchone() == ("a ok",)


def test_pipeline_and_executemany(proxy, org, pool_mode):
    name = f"pipe_{pool_mode}"
    with connect(proxy, org, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {name} VALUES (%s, %s)", [(i, f"v{i}") for i in range(500)])
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
            bad = conn.cursor()
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(50)]
        # An error in the middle of a pipeline aborts the rest of it (one implicit transaction up to the
        # Sync, so the first insert is rolled back too); then the connection works.
        with pytest.raises(pgerr.UniqueViolation):
            with conn.pipeline():
                conn.execute(f"INSERT INTO {name} VALUES (1000, 'x')")
                conn.execute(f"INSERT INTO {name} VALUES (1, 'dup')")
                bad.execute("SELECT 1")
        assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (500,)
        # A transaction inside a pipeline.
        with conn.pipeline(), conn.transaction():
            for i in range(600, 620):
                conn.execute(f"INSERT INTO {name} VALUES (%s, 'tx')", (i,))
        assert conn.execute(f"SELECT count(*) FROM {name} WHERE v = 'tx'").fetchone() == (20,)


def test_cancel_when_idle_is_harmless(proxy, org):
    with connect(proxy, org, autocommit=True) as conn:
        conn.cancel_safe(timeout=5)
        time.sleep(0.3)
        assert conn.execute("SELECT pg_sleep(0.3), 1").fetchone()[1] == 1


# -------------------------------------------------------------------------------------- LISTEN/NOTIFY


def test_listen_notify(proxy, org, pool_mode):
    # In transaction mode the worker's listener connection serves it (more in tests/test_listen_notify.py).
    with connect(proxy, org, autocommit=True) as listener, connect(proxy, org, autocommit=True) as sender:
        listener.execute("LISTEN o7s_chan")
        sender.execute("NOTIFY o7s_chan, 'hello'")
        sender.execute("SELECT pg_notify('o7s_chan', 'second')")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == ["hello", "second"]
