"""Issue 14 group 4: a client process interrupted mid-query (Ctrl-C, SIGINT) or killed (SIGKILL) through a
real `o7s serve`, in both pool modes. The query must end on the server within a couple of seconds, as it
does directly, the backend must not stay busy in the pool, and the org's next clients get clean backends.

Each client is a real child Python process (psycopg 3, whose wait loop sends a CancelRequest on
KeyboardInterrupt, and psycopg2 with `wait_select`, which does the same); what the server does is read
straight from PostgreSQL (`pg_stat_activity`), never through O7s.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time

from collections.abc import Iterator

import psycopg
import pytest
from conftest import extra_tier

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(120),
]

SLEEP = 30               # the query the client is interrupted in
ENDS_WITHIN = 3.0        # seconds after the signal by which the server no longer runs it
STARTS_WITHIN = 15.0     # seconds for the child to connect and start its query

# The child: connects, opens a transaction, runs a long query marked with a tag, and says what happened.
# `autocommit`: whether it runs the query outside a transaction; `warm`: one query
# first (it takes a token). `after` is what it does once interrupted: 'rollback' (then waits for a line on stdin, runs one more
# query and exits) or 'exit' (lets the KeyboardInterrupt end the process, as an app without a handler).
CHILD = textwrap.dedent("""
    import sys
    driver, dsn, tag, after, autocommit, warm = sys.argv[1:7]
    def say(*words):
        print(*words, flush=True)
    if driver == "psycopg":
        import psycopg
        conn = psycopg.connect(dsn, autocommit=autocommit == "autocommit")
        say("ready", conn.info.backend_pid)
        if warm == "warm":
            conn.execute("SELECT 1")
        say("sending")
        try:
            conn.execute(f"SELECT pg_sleep({SLEEP}) /* {tag} */")
            say("finished")
        except BaseException as exc:
            say("interrupted", type(exc).__name__)
            if after == "exit":
                raise
        conn.rollback()
        say("rolled back", conn.info.transaction_status.name)
    else:
        import psycopg2, psycopg2.extensions, psycopg2.extras
        psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)  # makes Ctrl-C cancel
        conn = psycopg2.connect(dsn)
        conn.autocommit = autocommit == "autocommit"
        say("ready", conn.get_backend_pid())
        cur = conn.cursor()
        if warm == "warm":
            cur.execute("SELECT 1")
        say("sending")
        try:
            cur.execute(f"SELECT pg_sleep({SLEEP}) /* {tag} */")
            say("finished")
        except BaseException as exc:
            say("interrupted", type(exc).__name__)
            if after == "exit":
                raise KeyboardInterrupt from exc
        conn.rollback()
        say("rolled back", conn.get_transaction_status())
    sys.stdin.readline()
    if driver == "psycopg":
        say("after", conn.execute("SELECT 'usable'").fetchone()[0])
    else:
        cur.execute("SELECT 'usable'")
        say("after", cur.fetchone()[0])
        conn.rollback()
    conn.close()
""").replace("{SLEEP}", str(SLEEP))


# Tiers of the module's own (platform.tier_limits rows): a statement_timeout far past the query, so that
# only a cancel can end it early. POOL: 3 backends (a backend left busy would soon be missed); ONE: one
# backend (a query waits for it); SLOW: one query a second (a query waits for its token).
POOL = ("intr-pool", 95, 10, 1000, 1, 3, 20000, 120000, "4MB", False, 0, 0, 0, 0, 0)
ONE = ("intr-one", 96, 10, 1000, 1, 1, 20000, 120000, "4MB", False, 0, 0, 0, 0, 0)
SLOW = ("intr-slow", 97, 10, 1, 1, 3, 20000, 120000, "4MB", False, 0, 0, 0, 0, 0)
POOL_SIZE = POOL[5]


@pytest.fixture(scope="module")
def tiers(migrated) -> Iterator[None]:
    with extra_tier(migrated, POOL), extra_tier(migrated, ONE), extra_tier(migrated, SLOW):
        yield


@pytest.fixture(scope="module")
def org(make_org, tiers):
    return make_org("intr_pool", POOL[0])


@pytest.fixture(scope="module")
def one_org(make_org, tiers):
    return make_org("intr_one", ONE[0])


@pytest.fixture(scope="module")
def slow_org(make_org, tiers):
    return make_org("intr_slow", SLOW[0])


def activity(org, tag: str) -> list[tuple]:
    """(pid, state, wait_event) of the server processes running the tagged query, read directly."""
    with psycopg.connect(org.backend_dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(
            "SELECT pid, state, wait_event FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND state = 'active' AND query LIKE %s", (org.dbname, f"%{tag}%")).fetchall()


def busy_backends(org) -> list[tuple]:
    """Server processes of the org's database that are in a query or a transaction, read directly."""
    with psycopg.connect(org.backend_dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND state <> 'idle'", (org.dbname,)).fetchall()


class Child:
    def __init__(self, proxy, org, driver: str, after: str, autocommit: bool = False, warm: bool = False) -> None:
        self.tag = f"intr_{secrets.token_hex(4)}"
        dsn = proxy.dsn(org, application_name=self.tag)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, driver, dsn, self.tag, after,
                                      "autocommit" if autocommit else "transaction", "warm" if warm else "cold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self._got = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._got:
                self.lines.append(line.strip())
                self._got.notify_all()

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        with self._got:
            ok = self._got.wait_for(lambda: any(x.startswith(prefix) for x in self.lines), timeout)
        if not ok:
            self.proc.kill()
            raise AssertionError(f"child never said {prefix!r}: {self.lines}; stderr: {self.proc.stderr.read()}")
        return next(x for x in self.lines if x.startswith(prefix))

    def wait_running(self, org) -> list[tuple]:
        """Until the server runs the child's query (read directly)."""
        self.wait_line("ready", STARTS_WITHIN)
        deadline = time.monotonic() + STARTS_WITHIN
        while time.monotonic() < deadline:
            rows = activity(org, self.tag)
            if rows:
                return rows
            time.sleep(0.05)
        raise AssertionError(f"the query never started: {self.lines}")

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def ended_within(org, tag: str, limit: float) -> float:
    """Seconds until the server no longer runs the tagged query; fails past `limit`."""
    t0 = time.monotonic()
    while activity(org, tag):
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"the server still runs the interrupted query {limit:g} s after the signal: "
                                 f"{activity(org, tag)}")
        time.sleep(0.05)
    return time.monotonic() - t0


def assert_clean_pool(proxy, org, pool_mode: str) -> None:
    """Nothing of the org's is busy on the server, and the org's next clients, as many as its pool has
    backends, each get a clean one at once (no open transaction, no leftover application_name)."""
    deadline = time.monotonic() + ENDS_WITHIN
    while (busy := busy_backends(org)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not busy, f"backends left busy: {busy}"
    results: list = []
    errors: list = []
    barrier = threading.Barrier(POOL_SIZE)

    def client() -> None:
        try:
            with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
                barrier.wait(10)
                t0 = time.monotonic()
                row = conn.execute("SELECT current_setting('application_name'), now() = statement_timestamp(), "
                                   "pg_sleep(0.3)").fetchone()
                results.append((row[0], row[1], time.monotonic() - t0))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(POOL_SIZE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(results) == POOL_SIZE
    for app, fresh_tx, took in results:
        assert app == "", f"a backend kept another client's application_name {app!r}"
        assert fresh_tx, "a backend was still in a transaction"
        assert took < 3.0, f"waited {took:.1f} s for a backend"


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_ctrl_c_then_rollback(proxy, org, pool_mode, driver):
    """SIGINT mid-query in a transaction; the app catches it, rolls back and goes on using the connection."""
    child = Child(proxy, org, driver, "rollback")
    try:
        child.wait_running(org)
        time.sleep(0.3)
        child.proc.send_signal(signal.SIGINT)
        took = ended_within(org, child.tag, ENDS_WITHIN)
        said = child.wait_line("interrupted")
        assert said in ("interrupted KeyboardInterrupt", "interrupted QueryCanceled"), said
        status = child.wait_line("rolled back")
        assert status in ("rolled back IDLE", "rolled back 0"), status
        assert not busy_backends(org), busy_backends(org)
        child.proc.stdin.write("go\n")
        child.proc.stdin.flush()
        assert child.wait_line("after") == "after usable"
        assert child.proc.wait(10) == 0, child.proc.stderr.read()
        print(f"{driver} {pool_mode}: query ended {took:.2f} s after SIGINT")
    finally:
        child.finish()
    assert_clean_pool(proxy, org, pool_mode)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_ctrl_c_then_exit(proxy, org, pool_mode, driver):
    """SIGINT mid-query in a transaction; the KeyboardInterrupt ends the process."""
    child = Child(proxy, org, driver, "exit")
    try:
        child.wait_running(org)
        time.sleep(0.3)
        child.proc.send_signal(signal.SIGINT)
        ended_within(org, child.tag, ENDS_WITHIN)
        assert child.proc.wait(10) != 0
        assert "KeyboardInterrupt" in child.proc.stderr.read()
    finally:
        child.finish()
    assert_clean_pool(proxy, org, pool_mode)


def test_kill_9_mid_query(proxy, org, pool_mode):
    """A client that just goes away (SIGKILL) mid-query: its query is cancelled on the server, and the
    backend does not go back to the pool busy."""
    child = Child(proxy, org, "psycopg", "rollback")
    try:
        (pid, _, _), = child.wait_running(org)
        time.sleep(0.3)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(10)
        ended_within(org, child.tag, ENDS_WITHIN)
    finally:
        child.finish()
    assert_clean_pool(proxy, org, pool_mode)


def interrupt_while_waiting(child: Child, sig_after: float) -> float:
    """SIGINT `sig_after` s after the child sent its query (which O7s holds back); seconds until the child
    hears that it was interrupted."""
    child.wait_line("sending", STARTS_WITHIN)
    time.sleep(sig_after)
    child.proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    said = child.wait_line("interrupted", ENDS_WITHIN)
    assert said in ("interrupted KeyboardInterrupt", "interrupted QueryCanceled"), said
    return time.monotonic() - t0


def never_runs(org, tag: str, watch: float = 1.5) -> None:
    """The tagged query does not run on the server in the next `watch` seconds (or ends at once)."""
    deadline = time.monotonic() + watch
    while time.monotonic() < deadline:
        ended_within(org, tag, 1.0)
        time.sleep(0.05)


def finish_usable(child: Child, org) -> None:
    status = child.wait_line("rolled back")
    assert status in ("rolled back IDLE", "rolled back 0"), status
    assert not busy_backends(org), busy_backends(org)
    child.proc.stdin.write("go\n")
    child.proc.stdin.flush()
    assert child.wait_line("after") == "after usable"
    assert child.proc.wait(10) == 0, child.proc.stderr.read()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_ctrl_c_while_waiting_for_a_backend(proxy, one_org, pool_mode, driver):
    """Transaction mode: the query waits for the org's only backend when the client is interrupted. The
    cancel must answer it (57014) at once, and it must never run once the backend is free; directly the
    server would have cancelled it."""
    if pool_mode != "transaction":
        pytest.skip("in session mode a client's backend is taken at login, before it can send a query")
    with psycopg.connect(proxy.dsn(one_org), connect_timeout=10) as holder:
        holder.execute("SELECT 1")  # a transaction holds the backend
        child = Child(proxy, one_org, driver, "rollback", autocommit=True)
        try:
            took = interrupt_while_waiting(child, 0.5)
            holder.rollback()
            never_runs(one_org, child.tag)
            finish_usable(child, one_org)
            print(f"{driver} {pool_mode}: interrupted {took:.2f} s after SIGINT while waiting for a backend")
        finally:
            child.finish()


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_ctrl_c_while_waiting_for_a_token(proxy, slow_org, pool_mode, driver, autocommit):
    """The org may run one query a second: the query waits for its token when the client is interrupted.
    The cancel must end the wait, and the query must not run (or be cancelled at once on the server)."""
    child = Child(proxy, slow_org, driver, "rollback", autocommit=autocommit, warm=True)
    try:
        took = interrupt_while_waiting(child, 0.2)
        never_runs(slow_org, child.tag)
        finish_usable(child, slow_org)
        print(f"{driver} {pool_mode}: interrupted {took:.2f} s after SIGINT while waiting for a token")
    finally:
        child.finish()
