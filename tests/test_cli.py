"""The real `o7s` CLI in a subprocess against a real control plane: commands, outputs, exit codes, errors."""

from __future__ import annotations

import json
import secrets
import socket

import psycopg
import pytest
from cryptography.fernet import Fernet

from o7s_cluster.cli.main import main
from tests.conftest import create_backend_db, free_port, run_o7s, start_proxy, stop_proxy

SECRET_BACKEND_PW = "Backend-" + secrets.token_urlsafe(8)


def fail(env, *args, code=1, input=None) -> str:
    """Run a command that must fail: one `o7s: error:` line on stderr, the given exit code, no traceback."""
    p = run_o7s(env, *args, input=input, check=False)
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("o7s: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    return p.stderr


def rows(env, sql, *params):
    with psycopg.connect(env["O7S_PLATFORM_DSN"]) as conn:
        return conn.execute(sql, params).fetchall()


def n_orgs(env) -> int:
    return rows(env, "SELECT count(*) FROM platform.organizations")[0][0]


@pytest.fixture(scope="module")
def backend_dsn(pg_server) -> str:
    return create_backend_db(pg_server, "cli_backend", "cli_owner", SECRET_BACKEND_PW)


def test_keygen():
    k1 = run_o7s({}, "keygen").stdout.strip()
    k2 = run_o7s({}, "keygen").stdout.strip()
    assert k1 != k2
    Fernet(k1.encode())


def test_migrate_twice_is_a_noop(migrated):
    before = rows(migrated, "SELECT name, applied_at FROM platform.schema_migrations")
    p = run_o7s(migrated, "migrate")
    assert p.stdout.strip() == "control plane is up to date"
    assert rows(migrated, "SELECT name, applied_at FROM platform.schema_migrations") == before


def test_org_lifecycle(migrated, backend_dsn):
    env = migrated
    p = run_o7s(env, "org", "create", "cli-life", "--tier", "starter", "--backend", backend_dsn,
                "--password", "first-pw")
    assert p.stdout.strip() == "created org cli-life (tier starter)"

    out = run_o7s(env, "org", "list").stdout
    assert out.splitlines()[0].split() == ["ORG", "TIER", "DATABASES", "CREATED"]
    line = next(l for l in out.splitlines() if l.startswith("cli-life "))
    assert line.split()[1:3] == ["starter", "1"]

    show = run_o7s(env, "org", "show", "cli-life").stdout
    assert "tier:        starter" in show and "10 connections, 50 queries/s, pool 5" in show
    assert "cli_backend  [postgres]  postgresql://cli_owner@127.0.0.1:" in show
    assert SECRET_BACKEND_PW not in show and "first-pw" not in show
    no_key = {k: v for k, v in env.items() if k != "O7S_SECRET_KEY"}
    assert "(set O7S_SECRET_KEY to show the backend)" in run_o7s(no_key, "org", "show", "cli-life").stdout

    data = json.loads(run_o7s(env, "org", "show", "cli-life", "--json").stdout)
    assert data["tier"] == "starter" and data["limits"]["max_qps"] == 50
    assert data["databases"][0]["db_name"] == "cli_backend" and SECRET_BACKEND_PW not in json.dumps(data)
    assert "cli-life" in [o["name"] for o in json.loads(run_o7s(env, "org", "list", "--json").stdout)]

    run_o7s(env, "org", "add-db", "cli-life", backend_dsn, "--type", "neon", "--db-name", "reports")
    dbs = rows(env, "SELECT d.db_name, d.database_type FROM platform.database_credentials d"
                    " JOIN platform.organizations o ON o.id = d.org_id WHERE o.name = 'cli-life' ORDER BY 1")
    assert dbs == [("cli_backend", "postgres"), ("reports", "neon")]

    assert run_o7s(env, "org", "set-tier", "cli-life", "enterprise").returncode == 0
    assert rows(env, "SELECT tier FROM platform.organizations WHERE name = 'cli-life'") == [("enterprise",)]

    [(v1,)] = rows(env, "SELECT scram_verifier FROM platform.org_logins l JOIN platform.organizations o"
                        " ON o.id = l.org_id WHERE o.name = 'cli-life'")
    run_o7s({**env, "O7S_ORG_PASSWORD": "second-pw"}, "org", "passwd", "cli-life")
    [(v2,)] = rows(env, "SELECT scram_verifier FROM platform.org_logins l JOIN platform.organizations o"
                        " ON o.id = l.org_id WHERE o.name = 'cli-life'")
    from o7s_cluster.pgwire.scram import make_verifier, parse_verifier

    it, salt, _, _ = parse_verifier(v2)
    assert v1 != v2 and make_verifier("second-pw", salt, it) == v2

    assert run_o7s(env, "org", "delete", "cli-life").stdout.strip() == "deleted org cli-life"
    assert rows(env, "SELECT count(*) FROM platform.organizations WHERE name = 'cli-life'") == [(0,)]
    assert "unknown org 'cli-life'" in fail(env, "org", "show", "cli-life")


def test_password_from_environment_and_no_plaintext(migrated, backend_dsn):
    pw = "EnvPw-" + secrets.token_urlsafe(8)
    run_o7s({**migrated, "O7S_ORG_PASSWORD": pw}, "org", "create", "cli-envpw", "--tier", "free",
            "--backend", backend_dsn)
    dump = "".join(
        r[0] for (t,) in rows(migrated, "SELECT tablename FROM pg_tables WHERE schemaname = 'platform'")
        for r in rows(migrated, f"SELECT row_to_json(x)::text FROM platform.{t} x")
    )
    assert "cli-envpw" in dump and pw not in dump and SECRET_BACKEND_PW not in dump


def test_no_password_without_a_terminal(migrated, backend_dsn):
    err = fail(migrated, "org", "create", "cli-nopw", "--tier", "free", "--backend", backend_dsn, code=2)
    assert "no org password" in err
    run_o7s(migrated, "org", "create", "cli-nopw", "--tier", "free", "--backend", backend_dsn, "--password", "x")
    assert "no org password" in fail(migrated, "org", "passwd", "cli-nopw", code=2)


def test_wrong_or_missing_key_writes_nothing(migrated, backend_dsn, make_org):
    make_org("cli-keyed", "free")  # at least one write happened with the right key
    before = rows(migrated, "SELECT count(*) FROM platform.organizations")
    creds = rows(migrated, "SELECT count(*) FROM platform.database_credentials")
    wrong = {**migrated, "O7S_SECRET_KEY": Fernet.generate_key().decode()}
    args = ("org", "create", "cli-wrongkey", "--tier", "free", "--backend", backend_dsn, "--password", "x")
    assert "O7S_SECRET_KEY is not the key" in fail(wrong, *args)
    assert "O7S_SECRET_KEY is not the key" in fail(wrong, "org", "add-db", "cli-keyed", backend_dsn, "--db-name", "z")
    assert "O7S_SECRET_KEY is not the key" in fail(wrong, "org", "show", "cli-keyed")
    missing = {k: v for k, v in migrated.items() if k != "O7S_SECRET_KEY"}
    assert "O7S_SECRET_KEY is not set" in fail(missing, *args)
    err = fail({**migrated, "O7S_SECRET_KEY": "not-a-key-TopSecret"}, *args)
    assert "malformed" in err and "TopSecret" not in err
    assert rows(migrated, "SELECT count(*) FROM platform.organizations") == before
    assert rows(migrated, "SELECT count(*) FROM platform.database_credentials") == creds


def test_errors(migrated, backend_dsn):
    env = migrated
    before = n_orgs(env)
    err = fail(env, "org", "create", "cli-err", "--tier", "gold", "--backend", backend_dsn, "--password", "x")
    assert "unknown tier 'gold' (one of free, starter, pro, enterprise)" in err
    err = fail(env, "org", "create", "cli-err", "--tier", "pro", "--password", "x",
               "--backend", "postgresql://u:TopSecret@h:notaport/d")
    assert "malformed backend DSN" in err and "TopSecret" not in err
    err = fail(env, "org", "create", "cli-err", "--tier", "pro", "--password", "x", "--backend", "TopSecret")
    assert "malformed backend DSN" in err and "TopSecret" not in err
    assert "invalid org name" in fail(env, "org", "create", "CLI ERR", "--tier", "pro", "--password", "x",
                                      "--backend", backend_dsn)
    assert "unknown org 'cli-ghost'" in fail(env, "org", "set-tier", "cli-ghost", "pro")
    assert "unknown org 'cli-ghost'" in fail(env, "org", "delete", "cli-ghost")
    assert "unknown org 'cli-ghost'" in fail(env, "org", "passwd", "cli-ghost", "--password", "x")
    assert "unknown tier" in fail(env, "org", "set-tier", "cli-ghost", "diamond")
    assert n_orgs(env) == before


def test_duplicate_org(migrated, backend_dsn, make_org):
    make_org("cli-dup", "free")
    before = n_orgs(migrated)
    assert "org 'cli-dup' already exists" in fail(
        migrated, "org", "create", "cli-dup", "--tier", "pro", "--backend", backend_dsn, "--password", "x")
    assert n_orgs(migrated) == before


def test_usage_errors_exit_2(migrated):
    assert "required" in fail(migrated, code=2)
    assert "invalid choice" in fail(migrated, "frobnicate", code=2)
    assert "required: --tier" in fail(migrated, "org", "create", "x", "--backend", "b", code=2)
    assert "invalid choice: 'mysql'" in fail(migrated, "org", "add-db", "x", "dsn", "--type", "mysql", code=2)
    no_dsn = {k: v for k, v in migrated.items() if k != "O7S_PLATFORM_DSN"}
    assert "no control-plane DSN" in fail(no_dsn, "org", "list", code=2)


def test_control_plane_dsn_sources(migrated, pg_server):
    dsn = migrated["O7S_PLATFORM_DSN"]
    base = {k: v for k, v in migrated.items() if k != "O7S_PLATFORM_DSN"}
    bad = "postgresql://nobody:TopSecret@127.0.0.1:1/none"
    assert run_o7s({**base, "DATABASE_URL": dsn}, "org", "list").returncode == 0
    assert run_o7s({**base, "DATABASE_URL": bad, "O7S_PLATFORM_DSN": dsn}, "org", "list").returncode == 0
    assert run_o7s({**base, "O7S_PLATFORM_DSN": bad}, "--platform-dsn", dsn, "org", "list").returncode == 0
    assert run_o7s({**base, "O7S_PLATFORM_DSN": bad}, "org", "list", "--platform-dsn", dsn).returncode == 0
    err = fail({**base, "O7S_PLATFORM_DSN": bad}, "org", "list")
    assert "cannot connect to the control plane" in err and "TopSecret" not in err


def test_unmigrated_control_plane(pg_server, migrated):
    with psycopg.connect(f"host={pg_server.host} port={pg_server.port} user={pg_server.user} dbname=postgres",
                         autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS cli_empty")
        conn.execute("CREATE DATABASE cli_empty")
    env = {**migrated, "O7S_PLATFORM_DSN": f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/cli_empty"}
    assert "run `o7s migrate`" in fail(env, "org", "list")
    assert "run `o7s migrate`" in fail(env, "serve", "--listen", "127.0.0.1:1")


def test_serve_checks_before_starting(migrated, make_org, tmp_path):
    make_org("cli-serve", "free")
    wrong = {**migrated, "O7S_SECRET_KEY": Fernet.generate_key().decode()}
    assert "O7S_SECRET_KEY is not the key" in fail(wrong, "serve")
    assert "pool_mode must be one of" in fail({**migrated, "O7S_POOL_MODE": "statement"}, "serve")
    assert "invalid choice" in fail(migrated, "serve", "--pool-mode", "statement", code=2)
    assert "invalid listen" in fail(migrated, "serve", "--listen", "nowhere")
    cfg = tmp_path / "o7s.toml"
    cfg.write_text("pool_size = 3\n")
    assert "unknown setting 'pool_size'" in fail(migrated, "serve", "--config", str(cfg))


def test_serve_on_a_busy_port(migrated, make_org):
    make_org("cli-serve", "free")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = fail(migrated, "serve", "--listen", f"127.0.0.1:{port}")
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in err


def test_serve_where_another_serve_runs(migrated, make_org, tmp_path):
    """The workers bind with SO_REUSEPORT, so a second `o7s serve` of the same user could join the first one's
    port unseen; it must fail before serving, naming the port and the flag (issue 14)."""
    make_org("cli-serve", "free")
    admin = free_port()
    first = start_proxy(migrated, tmp_path, "--workers", "1", "--admin", f"127.0.0.1:{admin}")
    try:
        err = fail(migrated, "serve", "--listen", f"127.0.0.1:{first.port}", "--workers", "1")
        assert f"cannot serve on 127.0.0.1:{first.port}: Address already in use" in err
        assert "choose another with --listen HOST:PORT" in err
        err = fail(migrated, "serve", "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{admin}")
        assert f"cannot open the admin port on 127.0.0.1:{admin}: Address already in use" in err
        assert "choose another with --admin HOST:PORT" in err
        err = fail(migrated, "serve", "--listen", f"127.0.0.1:{free_port()}", "--admin", "nowhere.invalid:9")
        assert "cannot open the admin port on nowhere.invalid:9" in err and "--admin HOST:PORT" in err
        assert first.proc.poll() is None  # the first one is untouched
    finally:
        stop_proxy(first)


def test_main_in_process(capsys):
    assert main(["--version"]) == 0
    assert main(["org", "create"]) == 2
    assert capsys.readouterr().err.startswith("o7s: error: ")


def test_last_resort_message_names_each_failure_and_where_but_no_message():
    from o7s_cluster.cli.main import describe_unexpected

    def fail_lookup() -> None:
        {}["postgresql://u:secret@h/db"]  # noqa: B018 - the key stands for a DSN in a message

    def fail_value() -> None:
        raise ValueError("password=hunter2")

    errors = []
    for fn in (fail_lookup, fail_value):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    text = describe_unexpected(BaseExceptionGroup("outer", [ExceptionGroup("inner", errors[:1]), errors[1]]))
    assert "KeyError at test_cli.py:" in text and "in fail_lookup" in text
    assert "ValueError at test_cli.py:" in text and "in fail_value" in text
    assert "secret" not in text and "hunter2" not in text and "Group" not in text
