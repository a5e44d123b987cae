"""How the limits name things in Redis: per-org buckets and connection counts, workers and their index.

Every per-org key carries the org id in braces, so an org's keys share one hash slot (Redis Cluster).
"""

from __future__ import annotations

WORKERS_KEY = "o7s:workers"  # sorted set: worker key -> last registration (ms)


def worker_key(machine_id: int, index: int, pid: int) -> str:
    """How a worker is named in Redis (counts, holders, registry): the supervisor names a dead one the same way."""
    return f"m{machine_id}-w{index}-{pid}"


def worker_index_key(worker_key: str) -> str:
    """The set of orgs a worker counts connections (c:ORG_ID) or holds tokens (r:ORG_ID) for."""
    return f"o7s:wk:{{{worker_key}}}"


def bucket_keys(org_id: str) -> list[str]:
    return [f"o7s:rl:{{{org_id}}}", f"o7s:rlw:{{{org_id}}}"]  # one hash slot: fine on Redis Cluster


def gate_keys(org_id: str) -> list[str]:
    return [f"o7s:conn:{{{org_id}}}", f"o7s:connhb:{{{org_id}}}"]
