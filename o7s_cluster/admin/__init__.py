"""Operating a running cluster: per-worker counters and their Prometheus exposition (`metrics`), and the
admin HTTP port (`http`: /health, /ready, /metrics, /v1/...)."""
