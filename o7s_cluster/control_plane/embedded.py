"""The embedded default: with no control plane configured, `o7s serve` runs on a throwaway PostgreSQL
holding both the control plane and a demo backend, so a newcomer gets a psql line to paste."""

from __future__ import annotations

import dataclasses
import glob
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from o7s_cluster.control_plane.migrate import migrate
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.config import Settings
from o7s_cluster.control_plane.vault import Vault, generate_key


class EmbeddedError(RuntimeError):
    pass


def pg_bindir() -> Path:
    """The newest installed server's bin directory (Debian layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise EmbeddedError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: run scripts/install")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    """A throwaway server on 127.0.0.1: password-protected superuser `o7s`, data in a temp dir.
    PostgreSQL refuses to run as root, so as root it runs as the `postgres` system user."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.tmp = Path(tempfile.mkdtemp(prefix="o7s-embedded-"))
        self.data = self.tmp / "data"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.running = False

    def dsn(self, dbname: str = "postgres", user: str = "o7s", password: str | None = None) -> str:
        return f"postgresql://{user}:{password or self.password}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self._as, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EmbeddedError(f"{Path(cmd[0]).name} failed: {tail[0]}")

    def start(self) -> None:
        pwfile = self.tmp / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(self.tmp, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(self.tmp, 0o700)
        os.chmod(pwfile, 0o600)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "o7s", f"--pwfile={pwfile}",
                  "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions")
        pwfile.unlink()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.tmp}'"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.tmp / "postgres.log"), "-w", "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        try:
            if self.running:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
                self.running = False
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def setup_demo(pg: EmbeddedPostgres, secret_key: str) -> tuple[str, str]:
    """Create and migrate the control plane, a demo backend and the `demo` org; returns
    (platform DSN, demo password)."""
    demo_pw, owner_pw = secrets.token_urlsafe(12), secrets.token_urlsafe(18)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE o7s_platform")
        conn.execute(f"CREATE ROLE demo_owner LOGIN PASSWORD '{owner_pw}'")  # token_urlsafe: no quotes
        conn.execute("CREATE DATABASE demo OWNER demo_owner")
    platform = pg.dsn("o7s_platform")
    migrate(platform)
    Admin(platform).create_org("demo", "free", pg.dsn("demo", "demo_owner", owner_pw), "postgres", demo_pw,
                               Vault(secret_key))
    return platform, demo_pw


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def embedded_platform(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """Yield settings pointing at a fresh throwaway control plane, and the psql line for the demo org."""
    key = settings.secret_key or generate_key()
    # SIGTERM's default would kill us without unwinding and leave the throwaway server running;
    # as an exception it unwinds through EmbeddedPostgres.__exit__ (the proxy installs its own handler).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_exit)
    with EmbeddedPostgres() as pg:
        platform, demo_pw = setup_demo(pg, key)
        host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::", "") else settings.listen_host
        host = f"[{host}]" if ":" in host else host
        psql = f'psql "postgresql://demo:{demo_pw}@{host}:{settings.listen_port}/demo"'
        yield dataclasses.replace(settings, platform_dsn=platform, secret_key=key), psql


def default_admin(settings: Settings) -> str:
    """Embedded mode opens the admin port unless told otherwise: on 127.0.0.1 (it has no token here),
    the listen port + 1 (a free port when there is none)."""
    port = settings.listen_port + 1 if 0 < settings.listen_port < 65535 else _free_port()
    return f"127.0.0.1:{port}"


def banner(settings: Settings, psql: str, *, key_given: bool, venv: str | None) -> str:
    """What embedded mode prints: the psql line, the admin port, and the lines to paste in another shell
    so that `o7s org ...` and `o7s ctl ...` work against this throwaway control plane."""
    admin = settings.admin_listen
    lines = ["O7s embedded mode: a throwaway control plane and a demo org (removed when this stops).",
             "Connect with:", f"  {psql}"]
    if admin:
        lines.append(f"Admin port: http://{admin} (/health /ready /metrics /v1/...)")
    lines.append("To run `o7s org ...` / `o7s ctl ...` against it from another shell, paste:")
    if venv:
        lines.append(f"  source {shlex.quote(venv)}")
    lines.append(f"  export O7S_PLATFORM_DSN={shlex.quote(settings.platform_dsn or '')}")
    if key_given:
        lines.append("  # and O7S_SECRET_KEY: the key this was started with")
    else:
        lines.append(f"  export O7S_SECRET_KEY={shlex.quote(settings.secret_key or '')}")
    if admin:
        lines.append(f"  export O7S_ADMIN_LISTEN={shlex.quote(admin)}")
    return "\n".join(lines)
