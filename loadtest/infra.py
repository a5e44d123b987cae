"""Throwaway servers for a benchmark run: PostgreSQL, PgBouncer and `o7s serve`, plus the data set.

Everything runs on free local ports in a temporary directory and is torn down at the end.
PostgreSQL (and PgBouncer) refuse to run as root: when we are root they run as the `postgres`
system user, with their directories owned by it; as any other user they run as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None,
              what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listening on {host}:{port}")


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries found; run scripts/install")
    return Path(found[-1]).parent


def _as_service_user() -> dict:
    """Popen arguments that drop root to the `postgres` user; none when we are not root.
    (Not `runuser`: it goes through PAM, which resets the open-files limit to 1,024, and PgBouncer
    then fails to accept its 1,000 clients with "Too many open files".)"""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    return {}


def _own_dir(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster; superuser `postgres`, trust on the Unix socket and for the
    superuser on 127.0.0.1, SCRAM for every other role (as clients meet it in production)."""

    workdir: Path
    max_connections: int = 1200
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @property
    def datadir(self) -> Path:
        return self.workdir / "pgdata"

    def start(self) -> "Postgres":
        bindir = pg_bindir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _own_dir(self.workdir)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, cwd=self.workdir, **_as_service_user(),
        )
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        # A benchmark box, not a durable database: no fsync, so the disk does not add noise.
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.workdir}'",
            "max_connections": self.max_connections,
            "shared_buffers": "'256MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        _own_dir(self.workdir)
        log = open(self.workdir / "postgres.log", "w")
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.datadir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
            **_as_service_user(),
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{(self.workdir / 'postgres.log').read_text()}")
            try:
                with psycopg.connect(self.admin_dsn(), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self

    def admin_dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname} sslmode=disable"

    def url(self, user: str, password: str | None, dbname: str) -> str:
        pw = f":{password}" if password else ""
        return f"postgresql://{user}{pw}@{self.host}:{self.port}/{dbname}"

    def pids(self) -> list[int]:
        """The postmaster and every backend process (for CPU accounting)."""
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # SIGINT = fast shutdown
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class OrgSpec:
    name: str          # org name in O7s; also the backend role, the database and the PgBouncer db
    password: str      # what clients send (to O7s, PgBouncer, and Postgres directly)
    tier: str
    pool_size: int = 0

    @property
    def dbname(self) -> str:
        return self.name


SCHEMA = """
CREATE TABLE accounts (
  id         INT PRIMARY KEY,
  balance    BIGINT NOT NULL,
  name       TEXT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE history (
  id      BIGSERIAL PRIMARY KEY,
  src     INT NOT NULL,
  dst     INT NOT NULL,
  amount  BIGINT NOT NULL,
  at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


def make_orgs(n: int, tier: str, prefix: str = "lt_org") -> list[OrgSpec]:
    return [OrgSpec(f"{prefix}{i:02d}", secrets.token_urlsafe(12), tier) for i in range(1, n + 1)]


def load_dataset(pg: Postgres, orgs: list[OrgSpec], rows: int) -> None:
    """One role and one database per org, owned by it, with `rows` accounts (SCRAM password = the
    org's password, so the same credentials work directly, through PgBouncer and through O7s)."""
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        for o in orgs:
            conn.execute(f"CREATE ROLE {o.name} LOGIN PASSWORD '{o.password}'")
            conn.execute(f"CREATE DATABASE {o.name} OWNER {o.name}")
    for o in orgs:
        with psycopg.connect(pg.admin_dsn(o.dbname), autocommit=True) as conn:
            conn.execute(f"SET ROLE {o.name}")
            conn.execute(SCHEMA)
            conn.execute(
                "INSERT INTO accounts (id, balance, name) "
                "SELECT g, 1000, 'acct-' || g FROM generate_series(1, %s) g", (rows,)
            )
            conn.execute("RESET ROLE")
            conn.execute("VACUUM ANALYZE accounts")


def tier_pool_sizes(pg: Postgres, platform_db: str) -> dict[str, int]:
    with psycopg.connect(pg.admin_dsn(platform_db)) as conn:
        return dict(conn.execute("SELECT tier, pool_size FROM platform.tier_limits").fetchall())


# -- PgBouncer ---------------------------------------------------------------------------------

@dataclass
class PgBouncer:
    workdir: Path
    pg: Postgres
    orgs: list[OrgSpec]
    max_client_conn: int
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    def start(self) -> "PgBouncer":
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"  # /usr/sbin: not on a user's PATH
        if not os.path.exists(exe):
            raise RuntimeError("pgbouncer not installed; run scripts/install")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The roles' SCRAM verifiers, as an auth_file taken from pg_authid is in production: PgBouncer
        # checks the client's proof with them and reuses the client's key for the server login, so
        # it never runs PBKDF2 itself (with plain passwords it would, once per client connection).
        with psycopg.connect(self.pg.admin_dsn()) as conn:
            secrets_ = dict(conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                ([o.name for o in self.orgs],)).fetchall())
        users = "".join(f'"{o.name}" "{secrets_[o.name]}"\n' for o in self.orgs)
        (self.workdir / "userlist.txt").write_text(users)
        dbs = "".join(
            f"{o.dbname} = host={self.pg.host} port={self.pg.port} dbname={o.dbname} "
            f"pool_size={o.pool_size}\n" for o in self.orgs
        )
        ini = f"""[databases]
{dbs}
[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
listen_backlog = 4096
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.workdir}/userlist.txt
pool_mode = transaction
max_client_conn = {self.max_client_conn}
default_pool_size = {max(o.pool_size for o in self.orgs)}
max_db_connections = 0
server_reset_query =
logfile = {self.workdir}/pgbouncer.log
pidfile =
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 600
"""
        (self.workdir / "pgbouncer.ini").write_text(ini)
        _own_dir(self.workdir)
        self.proc = subprocess.Popen(
            [exe, str(self.workdir / "pgbouncer.ini")],
            stdout=open(self.workdir / "pgbouncer.out", "w"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.workdir, **_as_service_user(),
        )
        wait_port(self.host, self.port, proc=self.proc, what="pgbouncer")
        return self

    def url(self, o: OrgSpec) -> str:
        return f"postgresql://{o.name}:{o.password}@{self.host}:{self.port}/{o.dbname}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -- O7s ----------------------------------------------------------------------------------------

def o7s_available() -> tuple[bool, str]:
    """Whether `o7s serve` exists in this checkout (it lands in the core proxy issue)."""
    proc = subprocess.run([sys.executable, "-m", "o7s_cluster", "serve", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    return proc.returncode == 0, (proc.stdout + proc.stderr)


def o7s_env(platform_dsn: str) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {k: v for k, v in os.environ.items() if not k.startswith(("O7S_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.update(O7S_PLATFORM_DSN=platform_dsn, O7S_SECRET_KEY=Fernet.generate_key().decode(),
               O7S_LOG_LEVEL="warning")
    return env


def run_o7s(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "o7s_cluster", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"o7s {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@dataclass
class O7s:
    workdir: Path
    env: dict[str, str]
    workers: int
    pool_mode: str = "transaction"
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    def start(self) -> "O7s":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "o7s_cluster", "serve", "--listen", f"{self.host}:{self.port}",
                "--pool-mode", self.pool_mode]
        if self.workers:
            args += ["--workers", str(self.workers)]
        args += self.extra_args
        self.proc = subprocess.Popen(args, env=self.env, cwd=REPO,
                                     stdout=open(self.workdir / "o7s.log", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.host, self.port, timeout=60, proc=self.proc, what="o7s serve")
        except Exception:
            self.stop()
            raise RuntimeError(f"o7s serve did not start:\n{(self.workdir / 'o7s.log').read_text()[-4000:]}")
        return self

    def url(self, o: OrgSpec) -> str:
        return f"postgresql://{o.name}:{o.password}@{self.host}:{self.port}/{o.dbname}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def add_tier(pg: Postgres, platform_db: str, name: str, like: str, **limits) -> None:
    """A tier row in the throwaway control plane: a copy of tier `like` with `limits` changed
    (e.g. a pool size of N and ceilings no benchmark reaches, so the limiter never throttles)."""
    with psycopg.connect(pg.admin_dsn(platform_db), autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM platform.tier_limits WHERE tier = %s", (like,))
        cols = [d.name for d in cur.description]
        row = dict(zip(cols, cur.fetchone()))
        rank = conn.execute("SELECT max(rank) + 1 FROM platform.tier_limits").fetchone()[0]
        row.update(tier=name, rank=rank, **limits)
        conn.execute(f"INSERT INTO platform.tier_limits ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",
                     list(row.values()))


def provision_o7s(pg: Postgres, orgs: list[OrgSpec], platform_db: str = "o7s_platform",
                  tiers: dict[str, dict] | None = None) -> dict[str, str]:
    """`o7s migrate`, then `tiers` (name -> add_tier arguments), then `o7s org create` per org."""
    with psycopg.connect(pg.admin_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {platform_db}")
    env = o7s_env(f"postgresql://postgres@{pg.host}:{pg.port}/{platform_db}?sslmode=disable")
    run_o7s(env, "migrate")
    for name, spec in (tiers or {}).items():
        add_tier(pg, platform_db, name, **spec)
    for o in orgs:
        run_o7s(env, "org", "create", o.name, "--tier", o.tier,
                "--backend", pg.url(o.name, o.password, o.dbname), f"--password={o.password}")
    return env


@dataclass
class BareRelay:
    """loadtest/bare_relay.py in front of PostgreSQL: 1:1 byte copying on trio.lowlevel, no pooling."""

    workdir: Path
    backend_host: str
    backend_port: int
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    poller: bool = False  # read through O7s's worker poller (the poll-relay target)
    proc: subprocess.Popen | None = None

    def start(self) -> "BareRelay":
        self.workdir.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).resolve().parent / "bare_relay.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--listen", f"{self.host}:{self.port}",
             "--backend", f"{self.backend_host}:{self.backend_port}", *(["--poller"] if self.poller else [])],
            stdout=open(self.workdir / "bare_relay.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.workdir,
        )
        wait_port(self.host, self.port, proc=self.proc, what="bare relay")
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def make_workdir(base: str | None = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix="o7s-loadtest-", dir=base))
    os.chmod(d, 0o755)
    return d


def shuffle_seeded(xs: list, seed: int = 7) -> list:
    r = random.Random(seed)
    xs = list(xs)
    r.shuffle(xs)
    return xs
