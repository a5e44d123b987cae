"""What every usage sink is (`Sink`), what identifies one, and the sinks a settings object asks for."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from o7s_cluster.usage.records import AnyRecord


class Sink(Protocol):
    name: str

    async def send(self, records: Sequence[AnyRecord]) -> None:
        """Store the records idempotently (by id), each kind where it belongs; raise on any failure (retried)."""

    async def aclose(self) -> None: ...


def make_sinks(settings: Any) -> list[Sink]:
    sinks: list[Sink] = []
    if getattr(settings, "usage_sink_postgres", False) and getattr(settings, "platform_dsn", None):
        from o7s_cluster.usage.sinks.postgres import PostgresSink

        sinks.append(PostgresSink(settings.platform_dsn))
    if getattr(settings, "mongodb_url", None):
        from o7s_cluster.usage.sinks.mongo import MongoSink

        sinks.append(MongoSink(settings.mongodb_url))
    return sinks


def _sink_key(sink: Any) -> str:
    return str(getattr(sink, "key", None) or getattr(sink, "name", type(sink).__name__))


def sink_keys(sinks: Sequence[Any]) -> list[str]:
    """What identifies each sink (no secrets): e.g. postgres:host=... port=... dbname=... user=..."""
    return sorted(_sink_key(s) for s in sinks)


def sink_namespace(sinks: Sequence[Any]) -> str:
    return hashlib.sha1("\n".join(sink_keys(sinks)).encode()).hexdigest()[:12] if sinks else "no-sink"
