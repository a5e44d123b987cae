"""Usage sinks: where the shipper sends spooled usage records. `base.py` has the `Sink` protocol and
`make_sinks`; `postgres.py` writes `platform.usage_metrics`, `mongo.py` the `usageHistory` collection."""
