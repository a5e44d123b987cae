"""Bad input and faults: a clear ErrorResponse, and nothing else breaks."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import RawPG, admin_dsn, error_fields, first_error, start_proxy, stop_proxy

pytestmark = pytest.mark.timeout(60)

STARTUP_TIMEOUT = 2.0
POOL_TIMEOUT = 1.0  # below the startup timeout: a client may wait for the pool while logging in
MAX_MESSAGE = 1024 * 1024
BACKEND_DOWN_CODES = {"08006", "08001", "57P03", "08004"}
POOL_TIMEOUT_CODES = {"53P01", "53300", "53400", "57P03", "08006"}


@pytest.fixture(scope="module", params=["transaction", "session"])
def fproxy(request, migrated, tmp_path_factory):
    p = start_proxy(
        migrated, tmp_path_factory.mktemp("fproxy"), "--pool-mode", request.param,
        "--startup-timeout", str(STARTUP_TIMEOUT), "--pool-timeout", str(POOL_TIMEOUT),
        "--max-message-size", str(MAX_MESSAGE),
    )
    p.mode = request.param
    yield p
    stop_proxy(p)


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("flt_pro", "pro")


def alive(proxy, org) -> None:
    """The proxy still serves clients."""
    with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)


def read_to_close(c: RawPG, timeout: float = 5.0) -> tuple[list[tuple[bytes, bytes]], bool]:
    """All messages until the peer closes (True) or `timeout` passes (False)."""
    c.sock.settimeout(timeout)
    msgs = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.recv()
            if m is None:
                return msgs, True
            msgs.append(m)
    except ConnectionResetError:
        return msgs, True  # closed with our unread bytes pending: the kernel resets the connection
    except (TimeoutError, OSError):
        pass
    return msgs, False


# ------------------------------------------------------------------------------------ startup timeout


@pytest.mark.parametrize("sent", [b"", b"\x00\x00", b"\x00\x00\x00\x30\x00\x03\x00\x00user\x00"])
def test_silent_client_is_closed_after_startup_timeout(fproxy, org, sent):
    with RawPG(fproxy.host, fproxy.port) as c:
        t0 = time.monotonic()
        if sent:
            c.sendall(sent)
        msgs, closed = read_to_close(c, STARTUP_TIMEOUT + 8)
        elapsed = time.monotonic() - t0
    assert closed, "a client that sends nothing must be disconnected"
    assert STARTUP_TIMEOUT - 0.3 <= elapsed <= STARTUP_TIMEOUT + 5, elapsed
    assert all(t == b"E" for t, _ in msgs)
    alive(fproxy, org)


def test_client_stalling_in_authentication_is_closed(fproxy, org):
    with RawPG(fproxy.host, fproxy.port) as c:
        c.send_startup({"user": org.name, "database": org.dbname})
        t0 = time.monotonic()
        t, body = c.recv()
        assert t == b"R"  # AuthenticationSASL, then we say nothing
        _, closed = read_to_close(c, STARTUP_TIMEOUT + 8)
        assert closed
        assert time.monotonic() - t0 <= STARTUP_TIMEOUT + 5


def test_many_silent_clients_do_not_block_others(fproxy, org):
    socks = [RawPG(fproxy.host, fproxy.port) for _ in range(50)]
    try:
        t0 = time.monotonic()
        alive(fproxy, org)
        assert time.monotonic() - t0 < 5
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------- malformed startup


def _startup(body: bytes, version: int = 196608, length: int | None = None) -> bytes:
    return struct.pack("!II", length if length is not None else 8 + len(body), version) + body


MALFORMED_STARTUP = {
    "length-too-small": (b"\x00\x00\x00\x04\x00\x03\x00\x00", {"08P01"}),
    "length-huge": (struct.pack("!II", 0x7FFFFFFF, 196608), {"08P01"}),
    "length-negative": (struct.pack("!iI", -8, 196608), {"08P01"}),
    "length-over-10000": (_startup(b"user\x00" + b"u" * 20000 + b"\x00\x00"), {"08P01"}),
    "protocol-2": (_startup(b"user\x00x\x00\x00", version=131072), {"08P01", "0A000"}),
    "protocol-garbage": (_startup(b"user\x00x\x00\x00", version=0x12345678), {"08P01", "0A000"}),
    "no-final-nul": (_startup(b"user\x00x\x00database\x00y"), {"08P01"}),
    "key-without-value": (_startup(b"user\x00x\x00database\x00\x00"), {"08P01"}),
    "missing-user": (_startup(b"database\x00x\x00\x00"), {"08P01", "28000"}),
    "bad-utf8-user": (_startup(b"user\x00\xff\xfe\x00\x00"), {"08P01", "28P01", "22021"}),
    "bad-option": (_startup(b"user\x00x\x00options\x00-c\x00\x00"), {"08P01", "0A000", "28P01"}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_STARTUP))
def test_malformed_startup_packet(fproxy, org, case):
    data, codes = MALFORMED_STARTUP[case]
    with RawPG(fproxy.host, fproxy.port) as c:
        t0 = time.monotonic()
        try:
            c.sendall(data)
        except OSError:
            pass  # the proxy may already have closed while we were still sending
        msgs, closed = read_to_close(c, 8)
        elapsed = time.monotonic() - t0
    assert closed
    if case in ("length-huge", "length-over-10000", "length-too-small", "length-negative"):
        assert elapsed < STARTUP_TIMEOUT, "an impossible length must be refused at once, not waited for"
    errs = [error_fields(b) for t, b in msgs if t == b"E"]
    if case == "length-over-10000" and not errs:
        return  # closed with 20 kB unread: the reset may discard the ErrorResponse (PostgreSQL sends none)
    assert errs, f"{case}: closed without an ErrorResponse (want {codes}); got {msgs}"
    assert errs[0]["C"] in codes, errs
    assert errs[0]["S"] == "FATAL"
    alive(fproxy, org)


# ------------------------------------------------------------------------------ bad messages after login


def _logged_in(proxy, org) -> RawPG:
    c = RawPG(proxy.host, proxy.port)
    msgs = c.login(org.name, org.password, org.dbname)
    assert msgs and msgs[-1][0] == b"Z", msgs
    return c


BAD_MESSAGES = {
    "length-huge": b"Q" + struct.pack("!I", 0x7FFFFFFF),
    "length-3": b"Q" + struct.pack("!I", 3),
    "length-negative": b"Q" + struct.pack("!i", -100),
    "over-max-message-size": b"Q" + struct.pack("!I", MAX_MESSAGE + 1000) + b"x" * 100,
    "unknown-type": b"\x01" + struct.pack("!I", 4),
    # A startup packet after login reads as message type 0 with a 4352-byte body that never comes:
    # like PostgreSQL, an invalid type must be refused at once, not after waiting for its body.
    "startup-again": _startup(b"user\x00x\x00\x00"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_message_after_login(fproxy, org, case):
    c = _logged_in(fproxy, org)
    with c:
        t0 = time.monotonic()
        c.sendall(BAD_MESSAGES[case])
        msgs, closed = read_to_close(c, 8)
        elapsed = time.monotonic() - t0
    assert closed, f"{case}: connection must be closed"
    assert elapsed < 5
    errs = [error_fields(b) for t, b in msgs if t == b"E"]
    assert errs and errs[-1]["C"] == "08P01", msgs
    alive(fproxy, org)


def test_message_size_limit(fproxy, org):
    with psycopg.connect(fproxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        s = "a" * (MAX_MESSAGE // 2)
        assert conn.execute("SELECT length(%s::text)", (s,)).fetchone() == (len(s),)
    with psycopg.connect(fproxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(psycopg.OperationalError) as ei:
            conn.execute("SELECT length(%s::text)", ("b" * (2 * MAX_MESSAGE),))
        assert ei.value.sqlstate in (None, "08P01")
    alive(fproxy, org)


def test_garbage_does_not_crash_the_proxy(fproxy, org):
    rnd = random.Random(1234)
    for i in range(40):
        with RawPG(fproxy.host, fproxy.port, timeout=5) as c:
            if i % 2:
                c.login(org.name, org.password, org.dbname)
            try:
                c.sendall(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300))))
                c.sock.shutdown(1)  # we are done sending
            except OSError:
                pass
            read_to_close(c, STARTUP_TIMEOUT + 5)
    alive(fproxy, org)


def test_sasl_garbage_gets_28p01_or_08p01(fproxy, org):
    for payload in [b"SCRAM-SHA-256\x00\xff\xff\xff\xff", b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc",
                    b"SCRAM-SHA-256\x00\x00\x00\x00\x03abc", b"PLAIN\x00\x00\x00\x00\x01x",
                    b"SCRAM-SHA-256-PLUS\x00\x00\x00\x00\x05p=x,,"]:
        with RawPG(fproxy.host, fproxy.port) as c:
            c.send_startup({"user": org.name, "database": org.dbname})
            assert c.recv()[0] == b"R"
            c.send(b"p", payload)
            msgs, closed = read_to_close(c, 5)
        errs = [error_fields(b) for t, b in msgs if t == b"E"]
        assert closed and errs, payload
        assert errs[0]["C"] in {"08P01", "28P01", "28000"}, (payload, errs)
    alive(fproxy, org)


# ------------------------------------------------------------------------------------ backend down


@pytest.fixture(scope="module")
def brk_org(make_org, pg_breakable):
    return make_org("flt_brk", "pro", pg=pg_breakable)


def _no_secrets(text: str, org) -> None:
    u = urlsplit(org.backend_dsn)
    for s in (org.backend_dsn, u.password, f"{u.hostname}:{u.port}", str(u.port), u.username, org.password):
        assert s not in text, f"leaks {s!r}: {text!r}"


def _wait_backend_up(pg, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(admin_dsn(pg), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_backend_down(fproxy, org, brk_org, pg_breakable):
    alive(fproxy, brk_org)
    before = psycopg.connect(fproxy.dsn(brk_org), autocommit=True, connect_timeout=10)
    before.execute("SELECT 1")
    pg_breakable.stop()
    try:
        # A new client of the broken org: a clear error naming its database, quickly.
        with RawPG(fproxy.host, fproxy.port, timeout=20) as c:
            t0 = time.monotonic()
            msgs = c.login(brk_org.name, brk_org.password, brk_org.dbname)
            elapsed = time.monotonic() - t0
            err = first_error(msgs)
            if err is None:  # some designs attach the backend at the first query
                msgs = c.simple_query("SELECT 1")
                err = first_error(msgs)
                elapsed = time.monotonic() - t0
        assert err is not None, msgs
        assert err["C"] in BACKEND_DOWN_CODES, err
        assert brk_org.dbname in err["M"], err
        _no_secrets(" ".join(err.values()), brk_org)
        assert elapsed < 15
        # psycopg sees a readable error too.
        with pytest.raises(psycopg.OperationalError) as ei:
            with psycopg.connect(fproxy.dsn(brk_org), autocommit=True, connect_timeout=15) as conn:
                conn.execute("SELECT 1")
        assert brk_org.dbname in str(ei.value)
        _no_secrets(str(ei.value), brk_org)
        # The client connected before the outage gets an error, not a hang.
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error) as ei:
            before.execute("SELECT 1")
        assert time.monotonic() - t0 < 15
        _no_secrets(str(ei.value), brk_org)
        # Other orgs are served all along.
        alive(fproxy, org)
    finally:
        before.close()
        pg_breakable.start()
        _wait_backend_up(pg_breakable)
    # Back up: new clients of the org are served again (broken pooled connections replaced).
    deadline = time.monotonic() + 15
    while True:
        try:
            for _ in range(3):
                alive(fproxy, brk_org)
            break
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_broken_idle_backend_connections_are_replaced(fproxy, make_org, pg_server):
    org = make_org("flt_term", "starter")
    with psycopg.connect(fproxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Kill every backend connection of the org behind the proxy's back.
        with psycopg.connect(admin_dsn(pg_server), autocommit=True) as admin:
            n = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (org.dbname,)).fetchone()[0]
            assert n >= 1
        time.sleep(0.3)
        if fproxy.mode == "transaction":
            # The client was idle: the pool must not hand it a dead connection.
            assert conn.execute("SELECT 2").fetchone() == (2,)
        else:
            with pytest.raises(psycopg.Error):
                conn.execute("SELECT 2")
    alive(fproxy, org)


# --------------------------------------------------------------------------- client gone mid-transaction


def _setup_ghost_table(org) -> None:
    with psycopg.connect(org.backend_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS ghost_t")
        conn.execute("CREATE TABLE ghost_t (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO ghost_t VALUES (1, 0)")


def _check_clean_after_ghost(proxy, org, pg) -> None:
    # Cycle through more clients than the pool (free: 3) so the ghost's backend connection, if it were
    # handed out, would be used.
    for i in range(6):
        with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SET lock_timeout = '5s'")
            xid, fresh, n2 = conn.execute(
                "SELECT txid_current_if_assigned(), now() = statement_timestamp(),"
                " (SELECT count(*) FROM ghost_t WHERE id = 2)"
            ).fetchone()
            assert xid is None, "a client was handed a backend connection inside another's transaction"
            assert fresh, "a client's statement ran inside an older transaction"
            assert n2 == 0, "the vanished client's uncommitted insert became visible"
            # The ghost's row lock is gone.
            conn.execute("UPDATE ghost_t SET v = v + 10 WHERE id = 1")
    with psycopg.connect(org.backend_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT v FROM ghost_t WHERE id = 1").fetchone() == (60,)
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_dsn(pg), autocommit=True) as admin:
        while True:
            dirty = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                (org.dbname,)).fetchone()[0]
            if dirty == 0:
                break
            assert time.monotonic() < deadline, "a backend connection stays idle in transaction"
            time.sleep(0.2)


GHOST = r"""
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], connect_timeout=10)
conn.execute("UPDATE ghost_t SET v = v + 1 WHERE id = 1")
conn.execute("INSERT INTO ghost_t VALUES (2, 99)")
print("ready", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_transaction(fproxy, make_org, pg_server):
    org = make_org("flt_ghost", "free")  # pool_size 3
    _setup_ghost_table(org)
    proc = subprocess.Popen([sys.executable, "-c", GHOST, fproxy.dsn(org)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _check_clean_after_ghost(fproxy, org, pg_server)


def test_socket_closed_mid_transaction_and_mid_query(fproxy, make_org, pg_server):
    org = make_org("flt_ghost2", "free")
    _setup_ghost_table(org)
    c = _logged_in(fproxy, org)
    out = c.simple_query("BEGIN; UPDATE ghost_t SET v = v + 1 WHERE id = 1; INSERT INTO ghost_t VALUES (2, 99)")
    assert out[-1] == (b"Z", b"T")
    c.close()  # no Terminate, no ROLLBACK
    c = _logged_in(fproxy, org)
    c.send(b"Q", b"BEGIN; INSERT INTO ghost_t VALUES (2, 98); SELECT pg_sleep(30)\0")
    time.sleep(0.5)
    c.close()  # gone while its query runs
    t0 = time.monotonic()
    _check_clean_after_ghost(fproxy, org, pg_server)
    assert time.monotonic() - t0 < 25, "the vanished client's query kept a backend connection busy"


# ---------------------------------------------------------------------------------------- pool exhausted


def test_pool_exhausted(fproxy, make_org):
    org = make_org("flt_pool", "free")  # pool_size 3, max_connections 5
    holders = []
    try:
        for _ in range(3):
            conn = psycopg.connect(fproxy.dsn(org), connect_timeout=10)  # not autocommit: BEGIN on first query
            conn.execute("SELECT 1")  # now holding a backend connection in an open transaction
            holders.append(conn)
        # A 4th client waits for a backend connection, then gets a clear error.
        with RawPG(fproxy.host, fproxy.port, timeout=20) as c:
            t0 = time.monotonic()
            msgs = c.login(org.name, org.password, org.dbname)
            err = first_error(msgs)
            if err is None:  # attached at the first query instead of at login
                msgs = c.simple_query("SELECT 1")
                err = first_error(msgs)
            elapsed = time.monotonic() - t0
            assert err is not None, msgs
            assert err["C"] in POOL_TIMEOUT_CODES, err
            assert org.dbname in err["M"] or "pool" in err["M"].lower(), err
            assert POOL_TIMEOUT - 0.3 <= elapsed <= POOL_TIMEOUT + 5, elapsed
            if err["S"] == "ERROR":  # the connection stays usable
                assert msgs[-1][0] == b"Z"
        # A waiting client gets a connection as soon as one is released.
        result = {}

        def waiter():
            try:
                with psycopg.connect(fproxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
                    result["v"] = conn.execute("SELECT 'got one'").fetchone()[0]
            except Exception as e:  # noqa: BLE001
                result["e"] = e

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.5)
        holders.pop().close()  # in session mode, closing the session releases its backend
        t.join(15)
        assert result.get("v") == "got one", result
    finally:
        for h in holders:
            h.close()
    # And everything works again.
    for _ in range(4):
        alive(fproxy, org)
