"""Tier enforcement across workers and machines: the global connection gate and per-org query rates.

Query rate (issue 4, layer 4). Each org has one central token bucket in Redis (capacity B, rate L),
refilled by a Lua script on Redis's own clock (`TIME`), so every worker of every machine draws from the
same bucket and clock skew between machines does not matter. A worker never asks Redis on a query's path:
it keeps a local stock of at most c = ceil(L*T) tokens per org (T = `rate_sync_interval`) that a background
task tops up in batches, before it runs dry. `Bucket.admit` takes a local token without a checkpoint; with
none left the query waits (FIFO, open transactions first) for the next batch, up to the tier's
`max_query_wait_ms`, then is refused with SQLSTATE 53400. Inside an open transaction it waits as long as
it takes. A worker with no demand for an org for `idle_after` seconds gives its tokens back and stops
drawing, so only workers that serve the org hold tokens (n below).

    Over any window tau: admitted <= L*tau + B + n*c     (central output <= L*tau + B; local stocks <= n*c)
    Under saturation:    admitted >= L*tau - n*c - (tokens lost while the central bucket sat full)

Redis unreachable: `degraded` goes up, a log line says so, and each worker refills its stock from a
local share, L/k, where k is the last number of workers seen holding tokens for the org (a sorted set in
Redis); Redis is probed every `probe_interval` and the shared buckets are used again when it answers.

Connection ceiling (layer 3): a Redis hash per org of worker_key -> open connections, plus a sorted set of
worker_key -> last heartbeat. A Lua script drops the counts of workers that have not heartbeaten for
`conn_expiry` seconds, sums the rest and increments atomically if under the ceiling. Closing a connection
is a local decrement flushed to Redis by a background task at once. Without Redis (or while it is down)
the decision is node-local: this worker's count plus the other workers' last known count.

A worker that dies without its goodbye (kill -9, OOM) would leave its counts for `conn_expiry` (30 s), blocking
its orgs at their ceiling although nothing is open. So each worker names, in an index set in Redis
(`o7s:wk:{worker_key}`), every org it counts connections or holds tokens for, in the same pipeline, and the
supervisor, which knows at once that a worker exited, releases them all (limits/release.py).

Redis is reached with the sync redis-py client in worker threads (`trio.to_thread`), from background
tasks only; see redisconn.py for why.

Modules:
    service.py   `Limits`: a worker's limits, its Redis connection and the degraded mode
    bucket.py    `Bucket`: one org's local token stock and `admit`, the only call on a query's path
    gate.py      `Ticket` and the connection ceiling
    sync.py      the rate sync: local stocks topped up from the central buckets in Redis
    tiers.py     `TierCache` (org -> tier limits) and tier changes heard on Redis
    keys.py      the Redis key names
    release.py   the supervisor's release of a dead worker's counts and tokens
    breaker.py   the login breaker's sans-IO state machine; logins.py shares it through Redis
    errors.py    `LimitError`, what a refusal sends the client
"""
