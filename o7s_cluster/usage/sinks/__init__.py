"""Sinks: where the shipper sends spooled records. `base.py` has the `Sink` protocol and `make_sinks`;
`postgres.py` writes `platform.usage_metrics`, `platform.audit_log` and `platform.analytics_events`, `mongo.py`
the `usageHistory`, `auditLogs` and `analyticsEvents` collections."""
