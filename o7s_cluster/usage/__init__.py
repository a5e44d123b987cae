"""Usage attribution: per-worker counters, windowed msgspec records, a durable spool and a shipper.

The session hot path only adds to plain attributes of an `OrgCounters` object it holds (one per
(org, tier, database type) per worker; the worker's metrics read the same objects). The counters are
cumulative: `UsageRecorder.run()` closes a window every `usage_window` seconds (aligned to the wall
clock), turns what every counters object gained since the last window into a `UsageRecord`, appends the
batch to the spool (msgpack, fsynced in a worker thread) and only then counts it as taken. A shipper
task per sink sends spooled records to it (Postgres `platform.usage_metrics`, MongoDB `usageHistory`) in
batches from that sink's own position, so a sink that is down (retried with backoff) never holds back the
others; the spool is acknowledged only up to what every sink has, and holds the rest. Record ids are fixed when a record is made, so a batch sent
twice (a retry, a replay after a crash) is a no-op in every sink.

Modules:
    counters.py   `OrgCounters`/`CounterBook`: what the session adds to, read by metrics and usage
    records.py    `UsageRecord`, record ids, the vCPU and memory estimates
    recorder.py   `UsageRecorder`: windows, spool writes, the shipper
    spool.py      `SpoolDir`: the on-disk spool (layout in its docstring)
    sinks/        `Sink` (base.py), Postgres `platform.usage_metrics`, MongoDB `usageHistory`
    billing.py    invoices, cost attribution and margins from platform.usage_metrics
"""
