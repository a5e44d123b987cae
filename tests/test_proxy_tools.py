"""psql and pgbench through a real `o7s serve`, compared with the same runs straight against Postgres."""

from __future__ import annotations

import os
import re
import subprocess

import psycopg
import pytest

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("tools_pro", "pro")  # pool_size 20


def client_env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    env["PGSSLMODE"] = "disable"
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def psql(proxy, org, *args: str, password: str | None = None, user: str | None = None, dbname: str | None = None):
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port),
         "-U", user or org.name, "-d", dbname or org.dbname, *args],
        env=client_env(org.password if password is None else password),
        capture_output=True, text=True, timeout=60,
    )


# ----------------------------------------------------------------------------------------------- psql


def test_psql_command(proxy, org):
    p = psql(proxy, org, "-At", "-c", "SELECT current_database(), 40 + 2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{org.dbname}|42"
    p = psql(proxy, org, "-At", "-c", "SELECT 1", "-c", "SELECT 'two'")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "two"]


def test_psql_error_and_wrong_password(proxy, org):
    p = psql(proxy, org, "-c", "SELECT 1/0")
    assert p.returncode == 1
    assert "division by zero" in p.stderr
    p = psql(proxy, org, "-c", "SELECT 1", password="definitely-wrong")
    assert p.returncode == 2
    assert "password authentication failed" in p.stderr
    assert org.backend_dsn not in p.stderr


def test_psql_script_with_copy(proxy, org, pool_mode, tmp_path):
    table = f"psql_copy_{pool_mode}"
    src = tmp_path / "in.csv"
    out = tmp_path / "out.csv"
    rows = [f"{i},name {i},\"quoted, {i}\"" for i in range(1, 20001)]
    src.write_text("\n".join(rows) + "\n")
    script = tmp_path / "script.sql"
    script.write_text(
        f"""
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (id int PRIMARY KEY, name text, note text);
\\copy {table} FROM '{src}' WITH (FORMAT csv)
BEGIN;
UPDATE {table} SET name = upper(name) WHERE id % 1000 = 0;
COMMIT;
\\copy (SELECT id, name, note FROM {table} ORDER BY id) TO '{out}' WITH (FORMAT csv)
SELECT count(*) AS n FROM {table} \\gset
\\echo rows :n
\\dt {table}
"""
    )
    os.chmod(tmp_path, 0o777)
    p = psql(proxy, org, "-f", str(script))
    assert p.returncode == 0, p.stderr
    assert "rows 20000" in p.stdout
    assert table in p.stdout  # \dt
    expected = [
        (f"{i},NAME {i},\"quoted, {i}\"" if i % 1000 == 0 else f"{i},name {i},\"quoted, {i}\"")
        for i in range(1, 20001)
    ]
    assert out.read_text().splitlines() == expected


def test_psql_single_transaction_script_rolls_back(proxy, org, pool_mode, tmp_path):
    table = f"psql_tx_{pool_mode}"
    p = psql(proxy, org, "-c", f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int)")
    assert p.returncode == 0, p.stderr
    script = tmp_path / "fail.sql"
    script.write_text(f"INSERT INTO {table} VALUES (1);\nINSERT INTO {table} VALUES ('x');\n")
    os.chmod(tmp_path, 0o777)
    p = psql(proxy, org, "-1", "-f", str(script))
    assert p.returncode == 3
    assert "invalid input syntax" in p.stderr
    p = psql(proxy, org, "-At", "-c", f"SELECT count(*) FROM {table}")
    assert p.stdout.strip() == "0", p.stderr


# -------------------------------------------------------------------------------------------- pgbench

COUNTER_SCRIPT = """\
\\set k random(1, 100000)
BEGIN;
UPDATE counters SET n = n + 1, s = s + :client_id WHERE id = :client_id % 10;
INSERT INTO hits (client_id, k) VALUES (:client_id, :k);
SELECT abalance FROM pgbench_accounts WHERE aid = :k;
SELECT n FROM counters WHERE id = :client_id % 10;
END;
"""


def backend(org) -> psycopg.Connection:
    return psycopg.connect(org.backend_dsn, autocommit=True, connect_timeout=10)


@pytest.fixture(scope="module")
def bench_db(org):
    """pgbench tables initialised directly on the org's backend, plus the counter tables."""
    p = subprocess.run(["pgbench", "-i", "-s", "1", "-q", org.backend_dsn],
                       env=client_env(None), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with backend(org) as conn:
        conn.execute("DROP TABLE IF EXISTS counters, hits")
        conn.execute("CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL, s bigint NOT NULL)")
        conn.execute("CREATE TABLE hits (client_id int NOT NULL, k int NOT NULL)")
    return org


def reset_counters(org) -> None:
    with backend(org) as conn:
        conn.execute("TRUNCATE hits")
        conn.execute("DELETE FROM counters")
        conn.execute("INSERT INTO counters SELECT i, 0, 0 FROM generate_series(0, 9) i")


def snapshot(org):
    with backend(org) as conn:
        counters = conn.execute("SELECT id, n, s FROM counters ORDER BY id").fetchall()
        hits = conn.execute("SELECT client_id, count(*) FROM hits GROUP BY 1 ORDER BY 1").fetchall()
    return counters, hits


def run_pgbench(args: list[str], target: list[str], password: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(["pgbench", "-n", *args, *target], env=client_env(password),
                          capture_output=True, text=True, timeout=100)


def check_pgbench_ok(p: subprocess.CompletedProcess, clients: int, txs: int) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
    assert m and int(m.group(1)) == clients * txs == int(m.group(2)), out
    m = re.search(r"number of failed transactions: (\d+)", out)
    assert m and m.group(1) == "0", out
    assert "error" not in p.stderr.lower(), p.stderr


def proxy_target(proxy, org) -> list[str]:
    return ["-h", proxy.host, "-p", str(proxy.port), "-U", org.name, org.dbname]


@pytest.mark.parametrize("qmode", ["simple", "extended", "prepared"])
def test_pgbench_counters_same_as_direct(proxy, bench_db, pool_mode, qmode, tmp_path):
    org = bench_db
    # More clients than the pool has backend connections (pro: 20) in transaction mode;
    # in session mode every client holds a backend connection, so stay under the pool size.
    clients, txs = (30, 20) if pool_mode == "transaction" else (10, 20)
    script = tmp_path / "counters.sql"
    script.write_text(COUNTER_SCRIPT)
    os.chmod(tmp_path, 0o777)
    threads = 3  # fewer threads than clients: pgbench multiplexes clients and prepares with blocking calls
    args = ["-M", qmode, "-c", str(clients), "-j", str(threads), "-t", str(txs), "-f", str(script)]

    reset_counters(org)
    direct = run_pgbench(args, [org.backend_dsn], None)
    check_pgbench_ok(direct, clients, txs)
    want = snapshot(org)

    reset_counters(org)
    via = run_pgbench(args, proxy_target(proxy, org), org.password)
    check_pgbench_ok(via, clients, txs)
    got = snapshot(org)

    assert got == want
    counters, hits = got
    assert hits == [(c, txs) for c in range(clients)]
    expect = [(i, txs * sum(1 for c in range(clients) if c % 10 == i),
               txs * sum(c for c in range(clients) if c % 10 == i)) for i in range(10)]
    assert counters == expect


def test_pgbench_prepared_fewer_threads_than_clients(proxy, bench_db, pool_mode, tmp_path):
    if pool_mode != "transaction":
        pytest.skip("transaction mode only")
    org = bench_db
    script = tmp_path / "counters.sql"
    script.write_text(COUNTER_SCRIPT)
    os.chmod(tmp_path, 0o777)
    reset_counters(org)
    p = run_pgbench(["-M", "prepared", "-c", "30", "-j", "3", "-t", "20", "-f", str(script)],
                    proxy_target(proxy, org), org.password)
    check_pgbench_ok(p, 30, 20)


@pytest.mark.parametrize("qmode", ["simple", "extended", "prepared"])
def test_pgbench_tpcb_builtin(proxy, bench_db, pool_mode, qmode):
    org = bench_db
    clients, txs = (25, 20) if pool_mode == "transaction" else (8, 20)
    with backend(org) as conn:
        before = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
    threads = 3
    p = run_pgbench(["-b", "tpcb-like", "-M", qmode, "-c", str(clients), "-j", str(threads), "-t", str(txs)],
                    proxy_target(proxy, org), org.password)
    check_pgbench_ok(p, clients, txs)
    with backend(org) as conn:
        after = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
        a, b, t = conn.execute(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),"
            " (SELECT sum(tbalance) FROM pgbench_tellers)"
        ).fetchone()
    assert after - before == clients * txs
    assert a == b == t  # every transaction applied all of its updates, or none


def test_pgbench_reconnect_each_transaction(proxy, bench_db, pool_mode):
    """-C: a new connection (and SCRAM login) per transaction."""
    org = bench_db
    p = run_pgbench(["-C", "-M", "extended", "-c", "4", "-j", "2", "-t", "15", "-b", "select-only"],
                    proxy_target(proxy, org), org.password)
    check_pgbench_ok(p, 4, 15)
