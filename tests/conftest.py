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
from contextlib import contextmanager
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
        run_o7s(self.env, "org", "create", name, "--tier", tier, "--backend", dsn, f"--password={password}")
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
    mode: str = ""  # the pool mode, for fixtures that start one in each mode

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
    env = dict(env)
    env.setdefault("O7S_SPOOL_DIR", str(tmp / f"spool-{port}"))  # each proxy its own usage spool
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


# ---------------------------------------------------------------------------------------------------
# Added for the end-to-end proxy tests (test_proxy_*.py, test_isolation.py, test_faults.py).

import struct  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402


@pytest.fixture
def pool_mode(request) -> str:
    """The pool mode the module's `proxy` was started with (modules parametrise it indirectly)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get("proxy", "transaction") if callspec else "transaction"


def serve_help(env: dict[str, str]) -> str:
    """`o7s serve --help`, to find out which optional flags this build has."""
    proc = run_o7s(env, "serve", "--help", check=False)
    return proc.stdout + proc.stderr


PROTOCOL_3 = 196608


class RawPG:
    """A minimal blocking frontend over a raw socket: exact control of the bytes and exact error fields."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawPG":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_startup(self, params: dict[str, str], version: int = PROTOCOL_3) -> None:
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
        self.sock.sendall(struct.pack("!II", 8 + len(body), version) + body)

    def send(self, mtype: bytes, payload: bytes = b"") -> None:
        self.sock.sendall(mtype + struct.pack("!I", 4 + len(payload)) + payload)

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv(self) -> tuple[bytes, bytes] | None:
        """One backend message (type, body), or None at EOF."""
        hdr = self._exact(5)
        if hdr is None:
            return None
        (ln,) = struct.unpack("!I", hdr[1:])
        body = self._exact(ln - 4)
        if body is None:
            return None
        return hdr[:1], body

    def recv_until(self, types: bytes = b"ZE") -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            m = self.recv()
            if m is None:
                return out
            out.append(m)
            if m[0] in types:
                return out

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection (after any pending messages) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                m = self.recv()
                if m is None:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True

    def login(self, user: str, password: str, dbname: str | None, **params: str) -> list[tuple[bytes, bytes]]:
        """Startup + authentication (SCRAM with our client, md5, cleartext); messages up to Z or E."""
        from o7s_cluster.pgwire.scram import ScramClient, md5_password

        start = {"user": user} if dbname is None else {"user": user, "database": dbname}
        self.send_startup({**start, **params})
        seen: list[tuple[bytes, bytes]] = []
        scram = None
        while True:
            m = self.recv()
            if m is None:
                return seen
            seen.append(m)
            t, body = m
            if t == b"E" or t == b"Z":
                return seen
            if t != b"R":
                continue
            (code,) = struct.unpack("!I", body[:4])
            if code == 10:
                scram = ScramClient(password)
                first = scram.client_first()
                payload = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
                self.send(b"p", payload)
            elif code == 11:
                self.send(b"p", scram.handle_server_first(body[4:]))
            elif code == 12:
                scram.verify_server_final(body[4:])
            elif code == 5:
                self.send(b"p", md5_password(user, password, body[4:8]) + b"\0")
            elif code == 3:
                self.send(b"p", password.encode() + b"\0")

    def simple_query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(b"Q", sql.encode() + b"\0")
        out = []
        while True:
            m = self.recv()
            if m is None:
                return out
            out.append(m)
            if m[0] == b"Z":
                return out


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body → {field code: value} (S, V, C, M, D, H, ...)."""
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[part[:1].decode()] = part[1:].decode("utf-8", "replace")
    return out


def first_error(msgs: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    for t, body in msgs:
        if t == b"E":
            return error_fields(body)
    return None


@pytest.fixture(scope="session")
def fuzz_org(make_org) -> Org:
    """A free-tier org (pool of 3) for fuzzing: a leaked backend connection shows up fast."""
    return make_org("fuzz", "free")


# ---------------------------------------------------------------------------------------------- parity
# test_parity.py, test_pipeline_parity.py, test_prepared_parity.py: one `o7s serve` in each pool mode, and a
# raw client that logs in directly or through it, to compare what it receives.


@pytest.fixture(scope="module", params=["session", "transaction"])
def parity_proxy(request, migrated, tmp_path_factory) -> Iterator[Proxy]:
    """A one-worker `o7s serve` in session mode, then in transaction mode (`.mode`), for the modules that
    compare what a client receives through O7s with what it receives directly (test_*parity.py): one
    worker, so that every client of an org is served from the same pool."""
    p = start_proxy(migrated, tmp_path_factory.mktemp(f"parity-{request.param}"), "--pool-mode", request.param,
                    "--workers", "1")
    p.mode = request.param
    yield p
    stop_proxy(p)


def direct_login(org: Org) -> tuple[str, int, str, str, str]:
    """(host, port, user, password, dbname) of the org's backend database: PostgreSQL directly."""
    u = urlsplit(org.backend_dsn)
    return u.hostname or "", u.port or 0, u.username or "", u.password or "", u.path.lstrip("/")


def proxy_login(proxy: Proxy, org: Org) -> tuple[str, int, str, str, str]:
    """(host, port, user, password, dbname) of the org through `proxy`."""
    return proxy.host, proxy.port, org.name, org.password, org.dbname


@contextmanager
def raw_session(host: str, port: int, user: str, password: str, dbname: str, timeout: float = 10.0,
                **params: str) -> Iterator[tuple[RawPG, list[tuple[bytes, bytes]]]]:
    """A raw client logged in (its login messages up to ReadyForQuery, which must hold no error); says
    goodbye (Terminate) when the block ends without an exception."""
    with RawPG(host, port, timeout=timeout) as pg:
        seen = pg.login(user, password, dbname, **params)
        while seen[-1][0] != b"Z":
            got = pg.recv()
            assert got is not None, f"connection closed during login: {seen}"
            seen.append(got)
        errors = [b for t, b in seen if t == b"E"]
        assert not errors, errors
        yield pg, seen
        pg.send(b"X")


# ---------------------------------------------------------------------------------------------- Redis
# A real redis-server on a free port, no persistence, that a test can stop and start again (the
# limits outage tests). Owned by the limits module (issue 4).


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = os.environ.get("O7S_REDIS_SERVER") or "redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # like a crash: nothing saved
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; `.stop()` / `.start()` for outages (same port)."""
    import shutil

    if not (os.environ.get("O7S_REDIS_SERVER") or shutil.which("redis-server")):
        pytest.skip("redis-server not installed (scripts/install)")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- Redis as a
# tenant database (issue 12): one redis-server shared by the orgs ra, rb (pro) and rfree (free), and one
# `o7s serve --redis-listen` in front of it, for test_redis_*.py.

import redis as _redis  # noqa: E402


@dataclass
class RedisProxy:
    proxy: Proxy
    port: int
    backend: RedisServer

    def client(self, org: Org, protocol: int = 2, user: str | None = None, **kw) -> _redis.Redis:
        return _redis.Redis(host="127.0.0.1", port=self.port, username=user or org.name, password=org.password,
                           protocol=protocol, socket_timeout=10, **kw)


@pytest.fixture(scope="session")
def backend(tmp_path_factory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis-backend"))
    srv.start()
    yield srv
    srv.stop()


def add_redis(env: dict[str, str], org: Org, backend: RedisServer, *extra: str) -> None:
    out = run_o7s(env, "org", "show", org.name).stdout
    if "redis" not in out.split("databases")[-1] or extra:
        run_o7s(env, "org", "add-db", org.name, backend.url, "--type", "redis", *extra)


@pytest.fixture(scope="session")
def rp(migrated, make_org, backend, tmp_path_factory) -> Iterator[RedisProxy]:
    for name, tier in (("ra", "pro"), ("rb", "pro"), ("rfree", "free")):
        add_redis(migrated, make_org(name, tier), backend)
    port = free_port()
    p = start_proxy(migrated, tmp_path_factory.mktemp("redis-proxy"), "--redis-listen", f"127.0.0.1:{port}",
                    "--workers", "1")
    wait_port("127.0.0.1", port, proc=p.proc)
    yield RedisProxy(p, port, backend)
    stop_proxy(p)


@pytest.fixture
def ra(make_org) -> Org:
    return make_org("ra", "pro")


@pytest.fixture
def rb(make_org) -> Org:
    return make_org("rb", "pro")


@pytest.fixture
def direct(backend) -> _redis.Redis:
    return _redis.Redis.from_url(backend.url)




@contextmanager
def extra_tier(env: dict[str, str], row: tuple) -> Iterator[str]:
    """A tier of a test's own (a full platform.tier_limits row), removed after; its orgs go back to free."""
    dsn = env["O7S_PLATFORM_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO platform.tier_limits VALUES ({', '.join(['%s'] * len(row))}) ON CONFLICT DO NOTHING",
                     row)
    try:
        yield row[0]
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:  # other tests list the seed's four tiers
            conn.execute("UPDATE platform.organizations SET tier = 'free' WHERE tier = %s", (row[0],))
            conn.execute("DELETE FROM platform.tier_limits WHERE tier = %s", (row[0],))
