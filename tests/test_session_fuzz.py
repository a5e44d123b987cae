"""Fuzzing a live `o7s serve`: random start-up packets and random message streams after login.

Nothing may crash or wedge the worker, and nothing may leak a pooled backend connection: the org is on
the free tier (pool of 3), so three leaked connections would make the final check time out.
"""

from __future__ import annotations

import socket
import struct
import time

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RawPG, admin_dsn

FRONTEND_TYPES = b"QPBEDCSHFdcfXpZ"

message = st.tuples(
    st.sampled_from(list(FRONTEND_TYPES)) | st.integers(0, 255),
    st.binary(max_size=64),
    st.booleans(),  # lie about the length
    st.integers(-8, 1 << 31 - 1),
)


def _encode(mtype: int, payload: bytes, lie: bool, fake_len: int) -> bytes:
    length = fake_len if lie else len(payload) + 4
    return bytes([mtype]) + struct.pack("!i", length) + payload


def _settle(sock: socket.socket) -> None:
    sock.settimeout(0.3)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64), st.integers(-8, 20000))
def test_fuzz_startup(proxy, body: bytes, length: int) -> None:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=2)
    try:
        sock.sendall(struct.pack("!i", length) + body)
        sock.shutdown(socket.SHUT_WR)
        _settle(sock)
    except OSError:
        pass
    finally:
        sock.close()
    assert proxy.proc.poll() is None


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(message, max_size=8))
def test_fuzz_messages_after_login(proxy, fuzz_org, messages) -> None:
    with RawPG(proxy.host, proxy.port, timeout=3) as c:
        assert c.login(fuzz_org.name, fuzz_org.password, fuzz_org.dbname)[-1][0] == b"Z"
        try:
            c.sendall(b"".join(_encode(*msg) for msg in messages))
            c.sock.shutdown(socket.SHUT_WR)
            _settle(c.sock)
        except OSError:
            pass
    assert proxy.proc.poll() is None


def test_after_fuzzing_the_worker_serves_and_no_backend_leaked(proxy, fuzz_org, pg_server) -> None:
    # Runs after the fuzz tests in this module (file order).
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as admin:
        while True:
            busy = admin.execute(
                "select count(*) from pg_stat_activity where datname = %s and state <> 'idle'",
                (fuzz_org.dbname,)).fetchone()[0]
            if busy == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert busy == 0, "a fuzzed session left a backend busy"
    for _ in range(5):  # more sessions than the free tier's pool of 3
        with psycopg.connect(proxy.dsn(fuzz_org), autocommit=True) as conn:
            with conn.transaction():
                assert conn.execute("select 1").fetchone() == (1,)
