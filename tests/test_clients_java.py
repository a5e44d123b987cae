"""The client matrix, Java: pgjdbc (Debian's libpostgresql-jdbc-java, 42.5) through a real `o7s serve` in
both pool modes. The workload is tests/clients/java/JdbcWorkload.java, compiled once per session with
the installed JDK into a temporary directory; it connects with prepareThreshold=1 (named server-side
statements from the first execution), runs its steps and prints one RESULT line per step
(tests/clients/harness.py); each step is one test here. A step that fails through O7s is run again
straight against PostgreSQL, and the failure says whether it passes there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from clients.harness import RunCache, mark_known, run_direct, run_workload

pytestmark = [pytest.mark.timeout(180)]
MODES = pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module")

SOURCE = Path(__file__).parent / "clients" / "java" / "JdbcWorkload.java"
PGJDBC_JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
MAIN_CLASS = "JdbcWorkload"
COMPILE_LIMIT = 120  # seconds for javac
RUN_LIMIT = 120  # seconds for one run of the workload (each step is bounded at 30 s inside)

STEPS = ["setup", "prepared_statements", "batches", "transactions", "copy", "error_then_usable", "cancel",
         "metadata", "pool_concurrent"]
KNOWN: dict[tuple[str | None, str], str] = {}  # (mode or None, step) -> the O7s defect it meets


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_java", "enterprise")


@pytest.fixture(scope="session")
def java_cmd(tmp_path_factory) -> list[str]:
    """The command running the workload: compiled here once per session."""
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.fail("no JDK (javac, java) installed (scripts/install installs Debian's default-jdk-headless)")
    if not PGJDBC_JAR.is_file():
        pytest.fail(f"{PGJDBC_JAR} missing (scripts/install installs Debian's libpostgresql-jdbc-java)")
    out = tmp_path_factory.mktemp("java_classes")
    proc = subprocess.run([javac, "-encoding", "UTF-8", "-d", str(out), "-cp", str(PGJDBC_JAR), str(SOURCE)],
                          capture_output=True, text=True, timeout=COMPILE_LIMIT)
    if proc.returncode != 0:
        pytest.fail(f"javac failed:\n{proc.stdout}{proc.stderr}")
    return [java, "-Dfile.encoding=UTF-8", "-cp", f"{out}:{PGJDBC_JAR}", MAIN_CLASS]


_runs = RunCache()


@MODES
@pytest.mark.parametrize("step", STEPS)
def test_pgjdbc(proxy, org, java_cmd, step, request):
    mark_known(request, step, KNOWN)
    run = _runs.get(proxy, lambda: run_workload(java_cmd, proxy, org, timeout=RUN_LIMIT))
    run.check(step, control=lambda: run_direct(java_cmd, org, ["setup", step], timeout=RUN_LIMIT))


_direct: list = []


@pytest.mark.parametrize("step", STEPS)
def test_pgjdbc_direct(org, java_cmd, step):
    """The same workload straight against PostgreSQL: the comparison the proxied runs are read against."""
    if not _direct:
        _direct.append(run_direct(java_cmd, org, [], timeout=RUN_LIMIT))
    _direct[0].check(step)
