"""Issue 14 groups 3 and 5 through a real `o7s serve`, compared with PostgreSQL directly: the process id a
client is given (its backend's own in session mode, one no PostgreSQL process can have in transaction mode),
a backend terminated under its client, and `client_encoding` reported as the server spells it."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pgerr

from o7s_cluster.worker.affinity import FIRST_SESSION_PID

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(90),
]

PID_MAX_LIMIT = 1 << 22  # Linux's largest possible pid_max


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("ident_pro", "pro")


def connect(proxy, org, **kw) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(org), connect_timeout=10, autocommit=True, **kw)


def test_the_pid_a_client_is_given(proxy, org, pool_mode):
    with connect(proxy, org) as conn:
        given = conn.info.backend_pid
        real = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        if pool_mode == "session":
            assert given == real, "session mode: the backend's own pid, as directly"
        else:
            assert given >= FIRST_SESSION_PID > PID_MAX_LIMIT, given  # can never name a server process
            assert real < PID_MAX_LIMIT


def test_terminating_the_clients_backend(proxy, org, pool_mode):
    """pg_terminate_backend of the client's own backend: in session mode the client gets the server's 57P01
    and is closed, as directly; in transaction mode the given pid names no process: PostgreSQL ends nothing
    (it says so and returns false, as for any pid that is not one of its processes) and the client goes on."""
    with psycopg.connect(org.backend_dsn, autocommit=True) as direct, connect(proxy, org) as conn:
        given = conn.info.backend_pid
        if pool_mode == "session":
            assert direct.execute("SELECT pg_terminate_backend(%s)", [given]).fetchone()[0] is True
            with pytest.raises(pgerr.AdminShutdown):
                conn.execute("SELECT 1")
            assert conn.closed
        else:
            # PostgreSQL: WARNING "PID ... is not a PostgreSQL backend process", and false
            assert direct.execute("SELECT pg_terminate_backend(%s)", [given]).fetchone()[0] is False
            assert conn.execute("SELECT 1").fetchone()[0] == 1


@pytest.mark.parametrize("spelling,server", [("utf-8", "UTF8"), ("euc-jp", "EUC_JP"), ("Latin1", "LATIN1")])
def test_client_encoding_is_reported_as_the_server_names_it(proxy, org, spelling, server):
    with psycopg.connect(org.backend_dsn, client_encoding=spelling) as direct:
        assert direct.info.parameter_status("client_encoding") == server  # PostgreSQL's own answer
    with connect(proxy, org, client_encoding=spelling) as conn:
        assert conn.info.parameter_status("client_encoding") == server
        for _ in range(3):  # on whichever backend each transaction lands
            assert conn.execute("SHOW client_encoding").fetchone()[0] == server
        conn.execute(f"SET client_encoding TO '{spelling.swapcase()}'")
        assert conn.info.parameter_status("client_encoding") == server
        assert conn.execute("SHOW client_encoding").fetchone()[0] == server
