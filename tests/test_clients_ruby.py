"""The client matrix, Ruby: the `pg` gem (Debian's ruby-pg, on libpq) through a real `o7s serve` in both
pool modes, and straight against PostgreSQL for comparison. The workload is
tests/clients/ruby/ruby_pg.rb; it runs its steps and prints one RESULT line per step
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

SCRIPT = Path(__file__).parent / "clients" / "ruby" / "ruby_pg.rb"
RUN_LIMIT = 120  # seconds for one run of the workload (each step is bounded at 30 s inside)
PROBE_LIMIT = 30  # seconds for `ruby -e 'require "pg"'`

STEPS = ["setup", "prepared_statements", "transactions", "copy", "error_then_usable", "cancel", "pool_concurrent"]
KNOWN: dict[tuple[str | None, str], str] = {}  # (mode or None, step) -> the O7s defect it meets


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_ruby", "enterprise")


@pytest.fixture(scope="session")
def ruby_cmd() -> list[str]:
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.fail("ruby is not installed (scripts/install installs Debian's ruby-pg)")
    probe = subprocess.run([ruby, "-e", 'require "pg"; print PG::VERSION'], capture_output=True, text=True,
                           timeout=PROBE_LIMIT)
    if probe.returncode != 0:
        pytest.fail(f"the pg gem does not load (scripts/install installs Debian's ruby-pg): {probe.stderr}")
    return [ruby, str(SCRIPT)]


_runs = RunCache()


@MODES
@pytest.mark.parametrize("step", STEPS)
def test_ruby_pg(proxy, org, ruby_cmd, step, request):
    mark_known(request, step, KNOWN)
    run = _runs.get(proxy, lambda: run_workload(ruby_cmd, proxy, org, timeout=RUN_LIMIT))
    run.check(step, control=lambda: run_direct(ruby_cmd, org, ["setup", step], timeout=RUN_LIMIT))


_direct: list = []


@pytest.mark.parametrize("step", STEPS)
def test_ruby_pg_direct(org, ruby_cmd, step):
    """The same workload straight against PostgreSQL: the comparison the proxied runs are read against."""
    if not _direct:
        _direct.append(run_direct(ruby_cmd, org, [], timeout=RUN_LIMIT))
    _direct[0].check(step)
