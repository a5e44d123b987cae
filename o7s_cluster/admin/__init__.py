"""Operating a running cluster.

Modules:
    metrics.py   `WorkerMetrics`/`OrgMetrics` (the per-worker counters), aggregation, Prometheus exposition
    http.py      the admin HTTP port: /health, /ready, /metrics, /v1/... (Hypercorn, trio)
"""
