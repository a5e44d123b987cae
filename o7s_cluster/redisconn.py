"""A small helper for the sync redis-py client that O7s uses from worker threads, never on a query's path.

Why threads and not an async client: every Redis round trip O7s makes (token batches, connection-count
heartbeats, the tier-change subscription) runs in a background task, so the cost of a thread hop does not
matter, while trio-asyncio (to use redis-py's asyncio client) would bring a second event loop into every
worker for no gain. The sync client is mature, thread-safe through its connection pool, and a blocked
socket in a thread can never stall the trio loop.
"""

from __future__ import annotations

import re

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# What a Redis outage looks like from redis-py: refused/reset connections, timeouts, a server that is
# loading its data set or shutting down, and plain socket errors.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def client(url: str, *, timeout: float = 0.5, **kw: object) -> redis.Redis:
    """A client that fails fast: no retries, short timeouts, so an outage is noticed within `timeout`."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        **kw,
    )


def redact(url: str | None) -> str:
    """The URL without its password, for log lines and errors."""
    if not url:
        return ""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
