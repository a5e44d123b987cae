"""The MongoDB sink over the wire: against tests/mongo_wire.py (an OP_MSG test server), and against a real
MongoDB when O7S_TEST_MONGODB_URL is set (the same tests; those that stop the server or inspect the exact
commands need the test server)."""

from __future__ import annotations

import os
import secrets
import uuid
from datetime import datetime, timezone

import psycopg
import pytest
import trio

from mongo_wire import FakeMongo
from o7s_cluster.config import Settings
from o7s_cluster.usage.sinks.mongo import MongoSink, to_document
from o7s_cluster.usage.sinks.postgres import PostgresSink
from o7s_cluster.usage.records import UsageRecord
from o7s_cluster.usage.recorder import UsageRecorder
from o7s_cluster.usage.sinks.base import make_sinks

REAL_URL = os.environ.get("O7S_TEST_MONGODB_URL")
# mockupdb's accept thread can trip over its own closed socket when the test server is stopped
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Backend:
    """What a test needs from a MongoDB: a URL, a database name, the stored documents."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.db = f"o7s_test_{secrets.token_hex(4)}"
        self.fake: FakeMongo | None = None
        if kind == "wire":
            self.fake = FakeMongo().start()
            self.url = f"mongodb://127.0.0.1:{self.fake.port}/{self.db}"
        else:
            import pymongo

            self.client = pymongo.MongoClient(REAL_URL, serverSelectionTimeoutMS=5000, tz_aware=True)
            self.url = REAL_URL

    def sink(self, **kw) -> MongoSink:
        return MongoSink(self.url, database=self.db, timeout_ms=kw.pop("timeout_ms", 2000), **kw)

    def docs(self) -> list[dict]:
        if self.fake:
            return self.fake.docs()
        return list(self.client[self.db]["usageHistory"].find())

    def index_names(self) -> set[str]:
        if self.fake:
            return {ix["name"] for ix in self.fake.indexes.get("usageHistory", [])}
        return set(self.client[self.db]["usageHistory"].index_information())

    def close(self) -> None:
        if self.fake:
            self.fake.stop()
        else:
            self.client.drop_database(self.db)
            self.client.close()


@pytest.fixture(params=["wire", "real"])
def mongo(request):
    if request.param == "real" and not REAL_URL:
        pytest.skip("no real MongoDB: set O7S_TEST_MONGODB_URL=mongodb://host:27017 to run against one")
    b = Backend(request.param)
    yield b
    b.close()


def wire_only(b: Backend) -> FakeMongo:
    if b.fake is None:
        pytest.skip("needs the wire test server (stops it or inspects the exact commands)")
    return b.fake


T0 = datetime(2025, 11, 21, 10, 0, 0, tzinfo=timezone.utc)
T1 = datetime(2025, 11, 21, 10, 0, 10, tzinfo=timezone.utc)


def rec(i: int, org: str = "acme", **kw) -> UsageRecord:
    return UsageRecord(id=f"00000000-0000-5000-8000-{i:012d}", org_id="11111111-1111-1111-1111-111111111111",
                       org_name=org, database_type="postgres", worker="m0-w1", period_start=T0, period_end=T1,
                       queries=kw.pop("queries", 10), vcpu_hours=kw.pop("vcpu_hours", 0.25), tier="pro", **kw)


async def test_documents_and_indexes(mongo):
    sink = mongo.sink()
    await sink.send([rec(1, rows=7, bytes_out=99), rec(2, org="beta")])
    docs = {d["_id"]: d for d in mongo.docs()}
    d = docs["00000000-0000-5000-8000-000000000001"]
    assert (d["orgName"], d["period"], d["queryCount"], d["rowCount"], d["bytesOut"]) == ("acme", "2025-11", 10, 7, 99)
    assert d["vcpuHours"] == 0.25 and d["databaseType"] == "postgres" and d["worker"] == "m0-w1"
    assert d["periodStart"].replace(tzinfo=timezone.utc) == T0
    assert {"orgId_period", "period", "periodStart"} <= mongo.index_names()
    await sink.aclose()


async def test_exact_commands_on_the_wire(mongo):
    fake = wire_only(mongo)
    sink = mongo.sink()
    await sink.send([rec(1)])
    await sink.send([rec(2)])
    created = fake.commands_named("createIndexes")
    assert len(created) == 1  # once per sink
    assert created[0]["createIndexes"] == "usageHistory" and created[0]["$db"] == mongo.db
    assert [(dict(ix["key"]), ix["name"]) for ix in created[0]["indexes"]] == [
        ({"orgId": 1, "period": 1}, "orgId_period"), ({"period": 1}, "period"), ({"periodStart": 1}, "periodStart")]
    inserts = fake.commands_named("insert")
    assert len(inserts) == 2
    first = inserts[0]
    assert first["insert"] == "usageHistory" and first["ordered"] is False and first["$db"] == mongo.db
    assert len(first["documents"]) == 1
    sent = dict(first["documents"][0])
    want = to_document(rec(1))
    assert list(sent) == list(want)  # the same fields in the same order
    assert sent["_id"] == want["_id"] and sent["queryCount"] == 10 and sent["orgId"] == want["orgId"]
    await sink.aclose()


async def test_same_batch_twice_is_a_noop(mongo):
    sink = mongo.sink()
    batch = [rec(i) for i in range(1, 6)]
    await sink.send(batch)
    await sink.send(batch)  # every document a duplicate: success, nothing changes
    await sink.send(batch[2:] + [rec(6)])  # some duplicates, one new
    docs = mongo.docs()
    assert len(docs) == 6 and sum(d["queryCount"] for d in docs) == 60
    await sink.aclose()


async def test_other_write_errors_fail_the_batch(mongo):
    fake = wire_only(mongo)
    sink = mongo.sink()
    fake.fail_next(121)  # document validation failure
    with pytest.raises(Exception, match="121|validation|simulated"):
        await sink.send([rec(1)])
    await sink.send([rec(1)])  # the retry goes through
    assert len(mongo.docs()) == 1
    await sink.aclose()


async def test_down_then_up_with_two_sinks(mongo, tmp_path):
    """MongoDB down while another sink is up: the spool keeps the data until both have every record, once."""
    fake = wire_only(mongo)
    from test_usage import MemorySink

    other = MemorySink()
    sink = mongo.sink(timeout_ms=300)
    r = UsageRecorder(Settings(spool_dir=str(tmp_path / "spool"), usage_sink_postgres=False, usage_window=0.1),
                      worker="m0-w1", sinks=[other, sink], backoff_initial=0.05, backoff_max=0.3)
    c = r.counters("11111111-1111-1111-1111-111111111111", "acme", "postgres")
    fake.stop()
    async with trio.open_nursery() as n:
        await n.start(r.run)
        for _ in range(40):
            c.query_done(0.001, 1, True)
            await trio.sleep(0.01)
        await trio.sleep(0.5)
        assert r.pending > 0 and r.sink_status()[1]["failures"] > 0
        await trio.to_thread.run_sync(fake.start)  # same port, same data
        await r.flush()
        with trio.fail_after(20):
            while r.pending:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    docs = mongo.docs()
    assert sum(d["queryCount"] for d in docs) == 40 and len(docs) == len({d["_id"] for d in docs})
    assert {d["_id"] for d in docs} == set(other.by_id)
    r.close()


def _pg_usage(dsn: str, worker: str) -> dict[str, int]:
    """record id -> query count of one recorder's rows in platform.usage_metrics."""
    with psycopg.connect(dsn) as conn:
        return {r[0]: r[1] for r in conn.execute(
            "SELECT id::text, query_count FROM platform.usage_metrics WHERE worker = %s", (worker,))}


async def test_mongo_down_never_holds_postgres_back(mongo, migrated, platform_dsn, tmp_path):
    """MongoDB down: every window still reaches Postgres promptly, each sink going at its own pace; MongoDB
    back: it gets every record once; the spool is acknowledged only once both have them. (CI: billing
    stalled behind a down MongoDB, Postgres never got the second window.)"""
    fake = wire_only(mongo)
    worker = f"m0-t{secrets.token_hex(3)}"  # its rows in the shared control plane
    pg = PostgresSink(platform_dsn)
    mg = mongo.sink(timeout_ms=1000)  # each try waits its server selection timeout, as in production
    window = 0.2
    r = UsageRecorder(Settings(spool_dir=str(tmp_path / "spool"), usage_sink_postgres=False, usage_window=window),
                      worker=worker, sinks=[pg, mg], backoff_initial=0.05, backoff_max=0.3)
    c = r.counters(str(uuid.uuid4()), "acme", "postgres")
    fake.stop()
    windows, per_window = 4, 5
    async with trio.open_nursery() as n:
        await n.start(r.run)
        for _ in range(windows):
            closed = r.windows_closed
            for _ in range(per_window):
                c.query_done(0.001, 1, True)
            with trio.fail_after(5):
                while r.windows_closed == closed:
                    await trio.sleep(0.01)
        want = windows * per_window
        with trio.fail_after(4):  # a window or so each: never a MongoDB timeout per window
            while sum(_pg_usage(platform_dsn, worker).values()) < want:
                await trio.sleep(0.05)
        in_pg = _pg_usage(platform_dsn, worker)
        assert len(in_pg) >= windows and sum(in_pg.values()) == want
        with trio.fail_after(5):  # Postgres may have it all before MongoDB's first try has timed out
            while not r.sink_status()[1]["failures"]:
                await trio.sleep(0.05)
        assert not fake.docs()
        # nothing is acknowledged while MongoDB lacks it: the spool keeps every record
        assert r.shipped == 0 and r.pending == len(in_pg)
        assert r.spool_bytes == r._spool.total_bytes() > 0
        await trio.to_thread.run_sync(fake.start)  # same port, same (empty) data
        with trio.fail_after(20):
            while r.pending:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    docs = mongo.docs()
    assert len(docs) == len({d["_id"] for d in docs}) == len(in_pg)  # each record once
    assert {d["_id"]: d["queryCount"] for d in docs} == in_pg == _pg_usage(platform_dsn, worker)
    assert r.shipped == len(in_pg) and not list(r._spool.path.glob("seg-*"))  # acked: segments gone
    r.close()


def test_make_sinks_from_settings():
    s = Settings(platform_dsn="postgresql://x@127.0.0.1/p", mongodb_url="mongodb://127.0.0.1:1/db")
    assert [k.name for k in make_sinks(s)] == ["postgres", "mongodb"]
    s = Settings(platform_dsn="postgresql://x@127.0.0.1/p", usage_sink_postgres=False)
    assert make_sinks(s) == []
