"""`python -m loadtest core` (the session core alone, per pgbench transaction): the traffic it feeds is
what the core handles as a whole transaction in every mode, and the command runs. No figure is asserted:
µs per transaction is a benchmark's result, never a timed test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import core_bench
from o7s_cluster.pgwire import messages as m

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", core_bench.MODES)
def test_each_mode_is_a_whole_transaction_that_releases_its_backend(mode):
    core, backend, transaction = core_bench._session(mode)
    sent, answer = core_bench.TRAFFIC[mode]
    transaction()  # raises unless the core answered everything and released the backend
    assert core.idle() and core.backend is None and core.counters.queries == (2 if mode == "prepared" else 1)
    if mode == "prepared":
        assert backend.prepared  # the statement went to the backend once, under O7s's name


def test_the_answers_end_with_ready_for_query():
    for sent, answer in core_bench.TRAFFIC.values():
        assert answer.endswith(m.ready_for_query(b"I"))
        assert sent[:1] in (b"Q", b"P", b"B")


def test_the_command_reports_each_mode():
    proc = subprocess.run([sys.executable, "-m", "loadtest", "core", "--transactions", "200", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(core_bench.MODES)
    assert all("µs of the session core per transaction" in line for line in lines)
