"""Operating a running cluster.

Modules:
    metrics.py   `WorkerMetrics` (reads the worker's `OrgCounters`), aggregation, Prometheus exposition
    http.py      the admin HTTP port: /health, /ready, /metrics, /v1/... (Hypercorn, trio)
"""
