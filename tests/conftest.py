"""Shared fixtures: real PostgreSQL servers (pytest-postgresql), a control plane, a real `o7s serve`."""

from __future__ import annotations

import glob
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import port_for
import psycopg
import pytest
from hypothesis import settings as hyp_settings
from pytest_postgresql import factories

hyp_settings.register_profile("o7s", database=None, deadline=None)
hyp_settings.load_profile("o7s")


def _pg_ctl() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries found; run scripts/install")
    return found[-1]


# Every backend role but the superuser must authenticate, each with the method its name says,
# so the proxy's backend authentication is exercised against the real server.
_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all o7s_trust 127.0.0.1/32 trust
host all o7s_md5 127.0.0.1/32 md5
host all o7s_plain 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
"""
_HBA_FILE = Path(tempfile.mkdtemp(prefix="o7s-hba-")) / "pg_hba.conf"
_HBA_FILE.write_text(_HBA)
_PG_OPTS = f"-c hba_file={_HBA_FILE} -c max_connections=300 -c password_encryption=scram-sha-256"

pg_server = factories.postgresql_proc(
    executable=_pg_ctl(), host="127.0.0.1", port=None, postgres_options=_PG_OPTS
)
# A second server for tests that stop or break a backend.
pg_breakable = factories.postgresql_proc(
    executable=_pg_ctl(), host="127.0.0.1", port=None, postgres_options=_PG_OPTS
)


def free_port() -> int:
    return port_for.select_random()


def admin_dsn(pg, dbname: str = "postgres") -> str:
    return f"host={pg.host} port={pg.port} user={pg.user} dbname={dbname}"


def create_backend_db(pg, dbname: str, role: str, password: str | None, md5: bool = False) -> str:
    """Create a role and a database owned by it on server `pg`; returns a DSN the proxy can use."""
    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if md5:
            conn.execute("SET password_encryption = 'md5'")
        if password is None:
            q = f'CREATE ROLE "{role}" LOGIN' if not exists else None
        else:
            verb = "ALTER" if exists else "CREATE"
            q = f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}'"
        if q:
            conn.execute(q)
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}" OWNER "{role}"')
    pw = f":{password}" if password is not None else ""
    return f"postgresql://{role}{pw}@{pg.host}:{pg.port}/{dbname}"


@pytest.fixture(scope="session")
def secret_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def platform_dsn(pg_server) -> str:
    dbname = "o7s_platform"
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {dbname}")
    return f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/{dbname}"


@pytest.fixture(scope="session")
def o7s_env(platform_dsn, secret_key) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("O7S_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.update(O7S_PLATFORM_DSN=platform_dsn, O7S_SECRET_KEY=secret_key, O7S_LOG_LEVEL="warning")
    return env


def run_o7s(env: dict[str, str], *args: str, input: str | None = None, check: bool = True):
    """Run the real `o7s` CLI in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "o7s_cluster", *args],
        env=env, input=input, capture_output=True, text=True, timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"o7s {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def migrated(o7s_env) -> dict[str, str]:
    run_o7s(o7s_env, "migrate")
    return o7s_env


@dataclass
class Org:
    name: str
    password: str
    tier: str
    dbname: str
    backend_dsn: str


@dataclass
class OrgFactory:
    pg: object
    env: dict[str, str]
    made: dict[str, Org] = field(default_factory=dict)

    def __call__(self, name: str, tier: str = "pro", *, role_kind: str = "scram", pg=None) -> Org:
        if name in self.made:
            return self.made[name]
        pg = pg or self.pg
        password = secrets.token_urlsafe(12)
        backend_pw = secrets.token_urlsafe(12)
        role = {"scram": f"{name}_owner", "md5": "o7s_md5", "plain": "o7s_plain", "trust": "o7s_trust"}[role_kind]
        dbname = f"{name}_db"
        dsn = create_backend_db(
            pg, dbname, role,
            None if role_kind == "trust" else backend_pw,
            md5=(role_kind == "md5"),
        )
        run_o7s(self.env, "org", "create", name, "--tier", tier, "--backend", dsn, "--password", password)
        org = Org(name, password, tier, dbname, dsn)
        self.made[name] = org
        return org


@pytest.fixture(scope="session")
def make_org(pg_server, migrated) -> OrgFactory:
    return OrgFactory(pg_server, migrated)


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"o7s exited early with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


@dataclass
class Proxy:
    host: str
    port: int
    proc: subprocess.Popen
    log: Path

    def dsn(self, org: Org, dbname: str | None = None, user: str | None = None, **kw: str) -> str:
        parts = {
            "host": self.host, "port": str(self.port), "user": user or org.name,
            "password": org.password, "dbname": dbname or org.dbname, "sslmode": "disable",
        }
        parts.update(kw)
        return " ".join(f"{k}='{v}'" for k, v in parts.items())


def start_proxy(env: dict[str, str], tmp: Path, *extra: str) -> Proxy:
    port = free_port()
    log = tmp / f"o7s-{port}.log"
    fh = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "o7s_cluster", "serve", "--listen", f"127.0.0.1:{port}", *extra],
        env=env, stdout=fh, stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"o7s serve did not start:\n{log.read_text()}")
    return Proxy("127.0.0.1", port, proc, log)


def stop_proxy(p: Proxy) -> None:
    if p.proc.poll() is None:
        p.proc.terminate()
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture(scope="module", params=["transaction"])
def proxy(request, migrated, tmp_path_factory) -> Iterator[Proxy]:
    """A real `o7s serve` (transaction mode unless a module parametrises `proxy` otherwise)."""
    p = start_proxy(migrated, tmp_path_factory.mktemp("proxy"), "--pool-mode", request.param)
    yield p
    stop_proxy(p)
