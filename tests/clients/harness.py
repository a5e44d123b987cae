"""Runs a client-matrix workload program (a driver in another language, or Django in its own process)
against a real `o7s serve` and reads its per-step results.

A workload program reads where to connect from the environment (O7S_HOST, O7S_PORT, O7S_USER,
O7S_PASSWORD, O7S_DB, O7S_MODE), runs each of its steps on fresh connections, bounds each step in
time, and prints one line per step:  RESULT<TAB>step<TAB>ok  or  RESULT<TAB>step<TAB>fail<TAB>message
(the message on one line). Each step is then one pytest test, so a known O7s defect can be marked on
the one step it breaks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

RESULT_PREFIX = "RESULT\t"
MODES = ("transaction", "session")
TAIL = 4000  # characters of a program's output quoted in a failure


@dataclass
class Run:
    """What one run of a workload program reported."""

    results: dict[str, tuple[bool, str]]
    returncode: int | None
    output: str

    def check(self, step: str, control: Callable[[], Run] | None = None) -> None:
        """Fail the calling test unless `step` reported ok. With `control` (the same program run directly
        against PostgreSQL, see run_direct), a failure says whether the step passes there, so that
        a difference O7s makes is told from a fault of the workload."""
        got = self.results.get(step)
        if got is None:
            pytest.fail(f"step {step!r} reported nothing (exit {self.returncode}); output:\n{self.output[-TAIL:]}")
        ok, message = got
        if not ok:
            direct = ""
            if control is not None:
                d_ok, d_message = control().results.get(step, (False, "reported nothing"))
                direct = ("\ndirectly against PostgreSQL the step passes (a difference O7s makes)" if d_ok
                          else f"\ndirectly against PostgreSQL it fails too: {d_message}")
            pytest.fail(f"step {step!r} failed through O7s: {message}{direct}\noutput:\n{self.output[-TAIL:]}")


def proxy_mode(proxy) -> str:
    """The pool mode a `proxy` fixture's `o7s serve` was started with."""
    args = list(proxy.proc.args)
    return args[args.index("--pool-mode") + 1] if "--pool-mode" in args else "transaction"


def workload_env(proxy, org, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "O7S_"))}
    env.update(O7S_HOST=proxy.host, O7S_PORT=str(proxy.port), O7S_USER=org.name, O7S_PASSWORD=org.password,
               O7S_DB=org.dbname, O7S_MODE=proxy_mode(proxy), **extra)
    return env


def direct_env(org, **extra: str) -> dict[str, str]:
    """The environment of a workload run straight against the org's PostgreSQL database (O7S_MODE=direct)."""
    u = urlsplit(org.backend_dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "O7S_"))}
    env.update(O7S_HOST=u.hostname or "127.0.0.1", O7S_PORT=str(u.port or 5432), O7S_USER=unquote(u.username or ""),
               O7S_PASSWORD=unquote(u.password or ""), O7S_DB=u.path.lstrip("/"), O7S_MODE="direct", **extra)
    return env


def run_workload(cmd: list[str], proxy, org, *, timeout: float, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> Run:
    """Run the program once, killing it after `timeout` seconds; the steps it reported by then count."""
    full_env = workload_env(proxy, org)
    full_env.update(env or {})
    return _run(cmd, full_env, timeout=timeout, cwd=cwd)


def run_direct(cmd: list[str], org, steps: list[str], *, timeout: float, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> Run:
    """Run the program's `steps` (its argv) straight against PostgreSQL: the control for a failed step."""
    full_env = direct_env(org)
    full_env.update(env or {})
    return _run([*cmd, *steps], full_env, timeout=timeout, cwd=cwd)


def _run(cmd: list[str], full_env: dict[str, str], *, timeout: float, cwd: Path | None) -> Run:
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\n[killed after {timeout} s]"
    results: dict[str, tuple[bool, str]] = {}
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            parts = line.split("\t", 3)
            if len(parts) >= 3:
                results[parts[1]] = (parts[2] == "ok", parts[3] if len(parts) > 3 else "")
    return Run(results, proc.returncode, out)


def mark_known(request, step: str, known: dict[tuple[str | None, str], str]) -> None:
    """Mark the running test xfail(strict=True) when `known` names an O7s defect for its (mode, step);
    keys are (mode, step), or (None, step) for both modes."""
    mode = request.getfixturevalue("pool_mode")
    reason = known.get((mode, step)) or known.get((None, step))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


class RunCache:
    """One run of a workload per proxy (so per pool mode), shared by that mode's step tests."""

    def __init__(self) -> None:
        self._runs: dict[int, Run] = {}

    def get(self, proxy, make) -> Run:
        if proxy.port not in self._runs:
            self._runs[proxy.port] = make()
        return self._runs[proxy.port]
