"""Which worker is an org's home, and how a BackendKeyData names the worker that issued it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# BackendKeyData process id: | 0 | machine (7 bits) | worker (6 bits) | session counter (18 bits) |
MACHINE_BITS, WORKER_BITS, COUNTER_BITS = 7, 6, 18
MAX_WORKERS = 1 << WORKER_BITS


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


def make_pid(machine: int, worker: int, counter: int) -> int:
    return (machine << (WORKER_BITS + COUNTER_BITS)) | (worker << COUNTER_BITS) | (counter & ((1 << COUNTER_BITS) - 1))


def split_pid(pid: int) -> tuple[int, int, int]:
    """(machine, worker, counter) of a process id O7s handed out."""
    pid &= 0x7FFFFFFF
    return (pid >> (WORKER_BITS + COUNTER_BITS), (pid >> COUNTER_BITS) & (MAX_WORKERS - 1),
            pid & ((1 << COUNTER_BITS) - 1))
