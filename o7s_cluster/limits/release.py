"""Release a dead worker's connection counts and token holdings in Redis: the supervisor's side.

A worker that exits normally says goodbye itself (Limits._goodbye). One that is killed (kill -9, the OOM killer)
cannot: its counts would keep its orgs at their ceiling until they expire (`conn_expiry`, 30 s). The supervisor
learns of the death at once (the process exits) and calls `release_worker` with the dead worker's key: every org
in the worker's index (limits/service.py, `Limits._index`) gets that worker's count deleted (the gate script's `force`
to 0, so the totals stay right) and its entry in the org's token holders removed, then the index and the
registry entry go. Idempotent: releasing a worker twice, or one that said goodbye, changes nothing.
"""

from __future__ import annotations

import logging

import trio

from o7s_cluster.limits.gate import GATE_LUA
from o7s_cluster.limits.keys import WORKERS_KEY, bucket_keys, gate_keys, worker_index_key, worker_key
from o7s_cluster.redisconn import REDIS_ERRORS, client as redis_client

__all__ = ["release_worker", "release_dead_worker"]

log = logging.getLogger("o7s.limits.release")

RELEASE_TIMEOUT = 2.0  # seconds: Redis answers in milliseconds; a supervisor never waits longer on it


def release_worker(url: str, key: str, *, conn_expiry: float = 30.0) -> tuple[int, int]:
    """(orgs whose connection count was released, orgs whose token holding was released). Blocking: a thread."""
    r = redis_client(url, timeout=RELEASE_TIMEOUT)
    try:
        index = worker_index_key(key)
        members = [m.decode() if isinstance(m, bytes) else m for m in r.smembers(index)]
        gate = r.register_script(GATE_LUA)
        pipe = r.pipeline(transaction=False)
        counts = holdings = 0
        for member in members:
            kind, _, org_id = member.partition(":")
            if kind == "c":
                gate(keys=gate_keys(org_id), args=[key, "force", 0, int(conn_expiry * 1000), 0, 0], client=pipe)
                counts += 1
            elif kind == "r":
                pipe.zrem(bucket_keys(org_id)[1], key)
                holdings += 1
        pipe.zrem(WORKERS_KEY, key)
        pipe.delete(index)
        pipe.execute()
        return counts, holdings
    finally:
        r.close()


async def release_dead_worker(url: str, machine_id: int, index: int, pid: int) -> None:
    """The supervisor saw worker `index` (process `pid`) exit: release what it held, logging what happened."""
    key = worker_key(machine_id, index, pid)
    try:
        with trio.move_on_after(RELEASE_TIMEOUT * 2):
            counts, holdings = await trio.to_thread.run_sync(release_worker, url, key, abandon_on_cancel=True)
            if counts or holdings:
                log.info("released a dead worker's connection counts and token holdings",
                         extra={"worker": index, "pid": pid, "orgs_counted": counts, "orgs_holding": holdings})
            return
        log.warning("could not release a dead worker's counts in time; they expire by themselves",
                    extra={"worker": index, "pid": pid})
    except REDIS_ERRORS as exc:
        log.warning("could not release a dead worker's counts (Redis); they expire by themselves",
                    extra={"worker": index, "pid": pid, "error": f"{type(exc).__name__}"})
