"""Usage sinks: where the shipper sends spooled usage records (see o7s_cluster.usage.Sink)."""
