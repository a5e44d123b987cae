"""The embedded default: a throwaway PostgreSQL with a migrated control plane and a working demo org."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import trio

from o7s_cluster.control_plane.catalog import TrioCatalog
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.config import Settings
from o7s_cluster.control_plane.embedded import EmbeddedPostgres, banner, embedded_platform
from o7s_cluster.pgwire.scram import make_verifier, parse_verifier
from o7s_cluster.control_plane.vault import Vault, generate_key
from tests.conftest import free_port, wait_port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_embedded_platform_starts_sets_up_and_stops():
    key = generate_key()
    with embedded_platform(Settings(listen_port=7654, secret_key=key)) as (settings, psql):
        assert settings.secret_key == key and settings.platform_dsn and settings.listen_port == 7654
        port = int(settings.platform_dsn.rsplit(":", 1)[1].split("/")[0])
        assert _listening(port)
        # the control plane is migrated and holds the demo org, on the free tier
        org = Admin(settings.platform_dsn).show_org("demo", Vault(key))
        assert org.tier == "free" and [d.db_name for d in org.databases] == ["demo"]
        # the printed psql line carries the demo password, which the stored verifier accepts
        assert psql.startswith('psql "postgresql://demo:') and psql.endswith('@127.0.0.1:7654/demo"')
        password = psql.split("demo:", 1)[1].split("@", 1)[0]

        async def check() -> None:
            cat = TrioCatalog(settings.platform_dsn, Vault(key))
            try:
                login = await cat.login("demo")
                it, salt, _, _ = parse_verifier(login.verifier)
                assert make_verifier(password, salt, it) == login.verifier
                target, _ = await cat.backend(login.org_id, "demo")
            finally:
                cat.close()
            # the demo backend is a real database the stored credentials can reach
            with psycopg.connect(target.conninfo()) as conn:
                assert conn.execute("SELECT current_user, current_database()").fetchone() == ("demo_owner", "demo")

        trio.run(check)
        # the server itself requires a password (no trust auth on the throwaway server)
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=o7s dbname=postgres password=wrong").close()
            raise AssertionError("connected with a wrong password")
        except psycopg.OperationalError:
            pass
    assert not _listening(port)


def test_embedded_generates_a_key_when_none_given():
    with embedded_platform(Settings(listen_host="0.0.0.0")) as (settings, psql):
        Vault(settings.secret_key)
        Admin(settings.platform_dsn).verify(Vault(settings.secret_key))
        assert "@127.0.0.1:6432/demo" in psql


def test_embedded_postgres_stops_when_the_body_fails():
    pg = EmbeddedPostgres()
    try:
        with pg:
            assert _listening(pg.port)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not _listening(pg.port) and not pg.tmp.exists()


# ------------------------------------------------------------------ through a real `o7s serve` (issue 14)

README = Path(__file__).resolve().parent.parent / "README.md"
QUICK_START = "<!-- quick-start:"


def embedded_env() -> dict[str, str]:
    """A newcomer's environment: no control plane, no key, no libpq settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("O7S_", "PG"))}
    env.pop("DATABASE_URL", None)
    env["O7S_LOG_LEVEL"] = "warning"
    return env


def ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_pair() -> int:
    """A port P with P + 1 free too (embedded mode's default admin port)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and ports_free(port, port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


def serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """`o7s serve ARGS` must fail at once: exit 1, one `o7s: error:` line, nothing on stdout (no psql line)."""
    p = subprocess.run([sys.executable, "-m", "o7s_cluster", "serve", "--workers", "1", *args],
                       env=env or embedded_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == "", p.stdout
    assert p.stderr.startswith("o7s: error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


class EmbeddedServe:
    """`o7s serve` in embedded mode in a subprocess; `text` is what it printed on stdout."""

    def __init__(self, tmp: Path, port: int, *extra: str) -> None:
        self.port = port
        self.out = tmp / f"embedded-{port}.out"
        self.err = tmp / f"embedded-{port}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "o7s_cluster", "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", *extra],
            env=embedded_env(), stdout=open(self.out, "w"), stderr=open(self.err, "w"), cwd=tmp)
        deadline = time.monotonic() + 90
        while "export O7S_ADMIN_LISTEN=" not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded o7s serve did not start:\n{self.text}\n{self.err.read_text()}")
            time.sleep(0.1)
        wait_port("127.0.0.1", port, proc=self.proc)

    @property
    def text(self) -> str:
        return self.out.read_text()

    def pasted(self) -> str:
        """The lines the banner says to paste in another shell."""
        lines = self.text.splitlines()
        start = next(i for i, l in enumerate(lines) if l.startswith("To run `o7s org")) + 1
        return "\n".join(l.strip() for l in lines[start:] if l.startswith("  "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def shell(script: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash as a newcomer's second shell would: from elsewhere, `o7s` not on PATH."""
    env = embedded_env()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "o7s")))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)


def quick_start_block(port: int) -> str:
    """The README's quick-start commands, on the test's port instead of 6432."""
    text = README.read_text()
    body = text[text.index(QUICK_START):].split("```sh\n", 1)[1].split("```", 1)[0]
    assert "o7s org list" in body and "127.0.0.1:6432" in body
    return body.replace("127.0.0.1:6432", f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    e = EmbeddedServe(tmp_path_factory.mktemp("embedded"), free_pair())
    yield e
    e.stop()


def test_embedded_serve_prints_what_another_shell_needs(embedded, tmp_path):
    text = embedded.text
    admin = f"127.0.0.1:{embedded.port + 1}"
    assert f"@127.0.0.1:{embedded.port}/demo\"" in text
    assert f"Admin port: http://{admin} " in text  # on by default in embedded mode, and said where
    pasted = embedded.pasted()
    assert pasted.splitlines()[0] == f"source {Path(sys.prefix) / 'bin' / 'activate'}"
    env = dict(shlex.split(l.removeprefix("export "))[0].split("=", 1) for l in pasted.splitlines()[1:])
    assert set(env) == {"O7S_PLATFORM_DSN", "O7S_SECRET_KEY", "O7S_ADMIN_LISTEN"} and env["O7S_ADMIN_LISTEN"] == admin
    Vault(env["O7S_SECRET_KEY"])
    # the admin port answers
    with urllib.request.urlopen(f"http://{admin}/health", timeout=5) as r:
        assert r.status == 200
    # pasted into a shell where `o7s` is not on PATH, the README's quick start works as written
    assert shell("o7s --version", tmp_path).returncode == 127
    p = shell(pasted + "\n" + quick_start_block(embedded.port), tmp_path)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "demo " in p.stdout and "created org acme (tier pro)" in p.stdout
    assert "current_database" in p.stdout and "acme" in p.stdout.split("current_database", 1)[1]
    assert "ready:    yes" in p.stdout and "workers:  1" in p.stdout


def test_embedded_serve_on_a_taken_port_says_so_before_printing(embedded):
    # a second `o7s serve` on the first one's port (SO_REUSEPORT would have let it join silently)
    err = serve_fails("--listen", f"127.0.0.1:{embedded.port}")
    assert f"cannot serve on 127.0.0.1:{embedded.port}: Address already in use" in err
    assert f"port {embedded.port} is taken" in err and "choose another with --listen HOST:PORT" in err
    # its default admin port (listen + 1) taken, the listen port free
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as the workers bind theirs
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        if not ports_free(busy - 1):
            pytest.skip(f"port {busy - 1} is taken by someone else")
        err = serve_fails("--listen", f"127.0.0.1:{busy - 1}")
    assert f"cannot open the admin port on 127.0.0.1:{busy}: Address already in use" in err
    assert "choose another with --admin HOST:PORT" in err
    # an explicit --admin that is taken
    err = serve_fails("--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{embedded.port}")
    assert f"cannot open the admin port on 127.0.0.1:{embedded.port}" in err and "--admin HOST:PORT" in err


def test_embedded_banner_never_prints_a_key_it_was_given():
    s = Settings(platform_dsn="postgresql://o7s:pw@127.0.0.1:5999/o7s_platform", secret_key=generate_key(),
                 admin_listen="127.0.0.1:6433")
    given = banner(s, 'psql "x"', key_given=True, venv=None)
    assert s.secret_key not in given and "export O7S_SECRET_KEY" not in given and "source" not in given
    assert "export O7S_PLATFORM_DSN=postgresql://o7s:pw@127.0.0.1:5999/o7s_platform" in given
    made = banner(s, 'psql "x"', key_given=False, venv="/a b/.venv/bin/activate")
    assert f"export O7S_SECRET_KEY={s.secret_key}" in made and "source '/a b/.venv/bin/activate'" in made
