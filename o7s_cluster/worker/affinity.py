"""Which worker is an org's home, and how a BackendKeyData names the worker that issued it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# BackendKeyData secret: | machine (7 bits) | worker (6 bits) | random (19 bits) |
MACHINE_BITS, WORKER_BITS, RANDOM_BITS = 7, 6, 19
MACHINE_MASK = (1 << MACHINE_BITS) - 1
MAX_WORKERS = 1 << WORKER_BITS
# Linux's pid_max is at most 2^22 (PID_MAX_LIMIT): pids from here on are never a real process's.
FIRST_SESSION_PID = (1 << 22) + 1
SESSION_COUNTER_BITS = 17  # FIRST_SESSION_PID + (machine, worker, counter) stays below 2^31


def home_worker(org: str, members: Iterable[int]) -> int | None:
    """Rendezvous hashing: the member with the highest score for the org. Adding or removing one
    member moves only the orgs whose winner changed (about 1/n of them)."""
    best, best_score = None, b""
    key = org.encode()
    for member in members:
        score = hashlib.blake2b(key, digest_size=8, salt=member.to_bytes(8, "big")).digest()
        if best is None or score > best_score:
            best, best_score = member, score
    return best


def key_secret(machine: int, worker: int, random_bits: int) -> int:
    """The secret of a BackendKeyData O7s hands out: it names the machine and worker that own the
    session, the rest is random (the pid may be the backend's own, so it cannot carry routing)."""
    value = ((machine & MACHINE_MASK) << (WORKER_BITS + RANDOM_BITS)) | ((worker & (MAX_WORKERS - 1)) << RANDOM_BITS) \
        | (random_bits & ((1 << RANDOM_BITS) - 1))
    return value - (1 << 32) if value >= 1 << 31 else value


def key_worker(secret: int) -> tuple[int, int]:
    """(machine, worker) a BackendKeyData secret names."""
    value = secret & 0xFFFFFFFF
    return value >> (WORKER_BITS + RANDOM_BITS), (value >> RANDOM_BITS) & (MAX_WORKERS - 1)


def session_pid(machine: int, worker: int, counter: int) -> int:
    """A process id for a session with no backend of its own (transaction mode): above Linux's largest
    pid_max, so it can never name a PostgreSQL process; it names the machine and worker too."""
    where = ((machine & MACHINE_MASK) << WORKER_BITS) | (worker & (MAX_WORKERS - 1))
    return FIRST_SESSION_PID + ((where << SESSION_COUNTER_BITS) | (counter & ((1 << SESSION_COUNTER_BITS) - 1)))


def split_session_pid(pid: int) -> tuple[int, int, int]:
    """(machine, worker, counter) of a pid from `session_pid`."""
    value = pid - FIRST_SESSION_PID
    if value < 0:
        raise ValueError(f"{pid} is a server process id, not one O7s made")
    where, counter = value >> SESSION_COUNTER_BITS, value & ((1 << SESSION_COUNTER_BITS) - 1)
    return where >> WORKER_BITS, where & (MAX_WORKERS - 1), counter
