"""The client matrix, Go: pgx v4 (Debian's golang-github-jackc-pgx-v4-dev, with pgconn and pgxpool) through a
real `o7s serve` in both pool modes, and straight against PostgreSQL for comparison. The workload is
tests/clients/go/pgx_workload.go, built once per session with Debian's Go in GOPATH mode from
/usr/share/gocode, offline (GO111MODULE=off, GOPROXY=off), into a temporary directory; it runs its steps
and prints one RESULT line per step (tests/clients/harness.py); each step is one test here. A step that
fails through O7s is run again straight against PostgreSQL, and the failure says whether it passes there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from clients.harness import RunCache, mark_known, run_direct, run_workload

pytestmark = [pytest.mark.timeout(180)]
MODES = pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module")

SOURCE = Path(__file__).parent / "clients" / "go" / "pgx_workload.go"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put their sources
PGX = GOPATH / "src" / "github.com" / "jackc" / "pgx" / "v4"
BUILD_LIMIT = 240  # seconds for `go build` with a cold cache
RUN_LIMIT = 120  # seconds for one run of the workload (each step is bounded at 30 s inside)

STEPS = ["setup", "prepared_statements", "batches", "transactions", "copy", "error_then_usable", "cancel",
         "pool_concurrent"]
KNOWN: dict[tuple[str | None, str], str] = {}  # (mode or None, step) -> the O7s defect it meets


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_go", "enterprise")


@pytest.fixture(scope="session")
def go_cmd(tmp_path_factory) -> list[str]:
    """The workload binary, built here once per session without the network."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is not installed (scripts/install installs Debian's golang-go)")
    if not PGX.is_dir():
        pytest.fail(f"{PGX} missing (scripts/install installs Debian's golang-github-jackc-pgx-v4-dev)")
    out = tmp_path_factory.mktemp("go_build")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOPROXY": "off", "GOFLAGS": "",
           "GOCACHE": str(out / "cache"), "CGO_ENABLED": "0"}
    binary = out / "pgx_workload"
    proc = subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=BUILD_LIMIT)
    if proc.returncode != 0:
        pytest.fail(f"go build failed:\n{proc.stdout}{proc.stderr}")
    return [str(binary)]


_runs = RunCache()


@MODES
@pytest.mark.parametrize("step", STEPS)
def test_pgx(proxy, org, go_cmd, step, request):
    mark_known(request, step, KNOWN)
    run = _runs.get(proxy, lambda: run_workload(go_cmd, proxy, org, timeout=RUN_LIMIT))
    run.check(step, control=lambda: run_direct(go_cmd, org, ["setup", step], timeout=RUN_LIMIT))


_direct: list = []


@pytest.mark.parametrize("step", STEPS)
def test_pgx_direct(org, go_cmd, step):
    """The same workload straight against PostgreSQL: the comparison the proxied runs are read against."""
    if not _direct:
        _direct.append(run_direct(go_cmd, org, [], timeout=RUN_LIMIT))
    _direct[0].check(step)
