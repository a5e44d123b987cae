"""The client matrix, Node.js: node-postgres (`pg`, with pg-copy-streams and pg-cursor) and postgres.js
(`postgres`) through a real `o7s serve` in both pool modes. Each driver's workload is a script in
tests/clients/node (packages from its package-lock.json, installed by scripts/install with `npm ci`)
that runs its steps and prints one RESULT line per step (tests/clients/harness.py); each step is one
test here. A step that fails through O7s is run again straight against PostgreSQL, and the failure
says whether it passes there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clients.harness import RunCache, mark_known, run_direct, run_workload

pytestmark = [pytest.mark.timeout(120)]
MODES = pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module")

NODE_DIR = Path(__file__).parent / "clients" / "node"
RUN_LIMIT = 90  # seconds for one run of a workload script (each step is bounded at 30 s inside)
NODE = shutil.which("node")

STEPS = ["setup", "prepared_statements", "transactions", "copy", "error_then_usable", "cancel", "pool_concurrent"]
DRIVERS = {  # driver -> its workload script
    "pg": "node_pg.js",
    "postgres": "node_postgres.js",
}
KNOWN: dict[tuple[str | None, str], str] = {}  # (mode or None, "driver:step") -> the O7s defect it meets


@pytest.fixture(scope="module")
def org(make_org):
    return make_org("cl_node", "enterprise")


@pytest.fixture(scope="module")
def node_ready():
    if NODE is None:
        pytest.fail("node is not installed (scripts/install installs Debian's nodejs)")
    missing = [p for p in ("pg", "pg-copy-streams", "pg-cursor", "postgres") if not (NODE_DIR / "node_modules" / p).is_dir()]
    if missing:
        pytest.fail(f"npm packages missing in {NODE_DIR}: {missing} (scripts/install runs npm ci there)")
    return NODE


_runs: dict[str, RunCache] = {d: RunCache() for d in DRIVERS}


@MODES
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_node(proxy, org, node_ready, driver, step, request):
    mark_known(request, f"{driver}:{step}", KNOWN)
    cmd = [node_ready, str(NODE_DIR / DRIVERS[driver])]
    run = _runs[driver].get(proxy, lambda: run_workload(cmd, proxy, org, timeout=RUN_LIMIT, cwd=NODE_DIR))
    run.check(step, control=lambda: run_direct(cmd, org, ["setup", step], timeout=RUN_LIMIT, cwd=NODE_DIR))
