"""the usage package directly: aggregation, records, spool write/replay, crash safety, the shipper and its sinks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
import trio

from conftest import admin_dsn
from o7s_cluster.control_plane.migrate import migrate
from o7s_cluster.config import Settings
from o7s_cluster.usage.sinks.postgres import PostgresSink
from o7s_cluster.usage.counters import USAGE_FIELDS, OrgCounters
from o7s_cluster.usage.records import HEAVY_ROWS, AuditRecord, UsageRecord, estimate
from o7s_cluster.usage.recorder import UsageRecorder
from o7s_cluster.usage.spool import decode_frames, encode_frame


class MemorySink:
    """Stores by id (like the real sinks); can be switched down."""

    name = "memory"

    def __init__(self) -> None:
        self.by_id: dict[str, UsageRecord] = {}
        self.sends = 0
        self.down = False
        self.failures = 0

    async def send(self, records):
        if self.down:
            self.failures += 1
            raise ConnectionError("sink down")
        self.sends += 1
        for r in records:
            self.by_id.setdefault(r.id, r)

    async def aclose(self):
        pass

    def total(self, field: str, org: str | None = None) -> float:
        return sum(getattr(r, field) for r in self.by_id.values() if org is None or r.org_name == org)


def settings(tmp_path: Path, **kw) -> Settings:
    kw.setdefault("usage_window", 10.0)
    return Settings(spool_dir=str(tmp_path / "spool"), usage_sink_postgres=False, **kw)


def recorder(tmp_path: Path, sinks=None, **kw) -> UsageRecorder:
    s = settings(tmp_path, **{k: kw.pop(k) for k in list(kw) if k == "usage_window"})
    # the spool directory depends on the sinks: every recorder of a test uses a "memory" sink
    return UsageRecorder(s, worker=kw.pop("worker", "m0-w1"), sinks=[MemorySink()] if sinks is None else sinks, **kw)


# ---------------------------------------------------------------------------------------------- counters


def test_counters_hot_path():
    c = OrgCounters("acme", "pro", "postgres", "o1")
    c.connection_opened()
    c.connection_opened()
    c.connection_closed()
    c.query_done(0.5, 10, True)
    c.query_done(0.25, HEAVY_ROWS + 1, False)
    c.bytes_in += 100
    c.bytes_out += 2000
    c.backend_seconds += 0.8
    c.throttled += 1
    assert (c.queries, c.errors, c.rows, c.client_connections, c.peak_connections) == (2, 1, 1011, 1, 2)
    assert c.query_seconds == 0.75 and c.heavy_seconds == 0.25
    assert c.usage_values() == (2, 1, 1, 0, 100, 2000, 1011, 0.75, 0.8, 0.25, 0)
    assert len(c.usage_values()) == len(USAGE_FIELDS)
    assert [getattr(c, f) for f in USAGE_FIELDS] == list(c.usage_values())
    # the peak is read once per window; the open connection is the next window's starting peak
    assert c.take_peak() == 2 and c.peak_connections == 1 and c.take_peak() == 1
    assert c.queries == 2  # cumulative: reading never resets what metrics show
    assert not hasattr(c, "__dict__")  # __slots__: no per-object dict on the hot path


def test_metrics_and_usage_read_the_same_counters(tmp_path):
    """One event, one write: what a dashboard shows and what a bill counts cannot disagree."""
    from o7s_cluster.admin.metrics import WorkerMetrics, aggregate

    rec = recorder(tmp_path)
    metrics = WorkerMetrics(0, 1, book=rec.book)
    c = metrics.org("acme", "pro", "postgres", "o1")
    assert rec.counters("o1", "acme", "postgres", tier="pro") is c
    for i in range(7):
        c.query_done(0.001, 1, i != 3)
    c.refused += 2
    r1, refusals = rec._close_window()  # the refusals are also an audit row (rate_refused, count 2)
    assert isinstance(refusals, AuditRecord) and (refusals.kind, refusals.count) == ("rate_refused", 2)
    for _ in range(3):
        c.query_done(0.001, 1, True)
    (r2,) = rec._close_window()
    (o,) = aggregate([metrics.snapshot()])["orgs"]
    assert (r1.queries, r1.errors, r1.refused) == (7, 1, 2) and (r2.queries, r2.errors, r2.refused) == (3, 0, 0)
    assert (o["queries"], o["errors"], o["refused"]) == (r1.queries + r2.queries, 1, 2)
    assert rec._close_window() == []  # nothing new: no record


def test_rows_from_command_tags():
    from o7s_cluster.usage.counters import rows_from_tag

    cases = {b"SELECT 5": 5, b"INSERT 0 3": 3, b"UPDATE 12": 12, b"DELETE 0": 0, b"MERGE 2": 2, b"FETCH 100": 100,
             b"MOVE 4": 4, b"COPY 7": 7, b"CREATE TABLE": 0, b"BEGIN": 0, b"SET": 0, b"": 0, b"SELECT x": 0,
             b"CREATE TABLE AS 9": 0}
    for tag, n in cases.items():
        assert rows_from_tag(tag) == n, tag
    assert rows_from_tag(bytearray(b"SELECT 42")) == rows_from_tag(memoryview(b"SELECT 42")) == 42


def test_estimates_follow_the_seeds():
    # seed 001 section 6.3 PRO: 6,000 queries x 100 ms x 0.2 vCPU = 120 vCPU-seconds; x 50 MB = 30 GB-seconds
    vcpu_h, mem_h = estimate(600.0, 0.0, "pro")
    assert vcpu_h == pytest.approx(120 / 3600) and mem_h == pytest.approx(30 / 3600)
    # FREE (and an unknown tier, seed 000's factor 0.1): 300 x 50 ms x 0.1 vCPU = 1.5 vCPU-s; x 20 MB = 0.3 GB-s
    assert estimate(15.0, 0.0, "free") == pytest.approx((1.5 / 3600, 0.3 / 3600))
    assert estimate(15.0, 0.0, None) == estimate(15.0, 0.0, "free")
    # STARTER 1,500 x 75 ms x 0.15 = 16.875 vCPU-s
    assert estimate(112.5, 0.0, "starter")[0] == pytest.approx(16.875 / 3600)
    # parallelism 2 above 1,000 rows (seed 001 section 3.2): heavy seconds count twice
    assert estimate(2.0, 1.0, "free")[0] == pytest.approx(3.0 * 0.1 / 3600)


async def test_window_records(tmp_path):
    rec = recorder(tmp_path)
    a = rec.counters("11111111-1111-1111-1111-111111111111", "acme", "postgres", tier="pro")
    b = rec.counters("22222222-2222-2222-2222-222222222222", "beta", "neon", tier="free")
    assert rec.counters("11111111-1111-1111-1111-111111111111", "acme", "postgres", tier="pro") is a  # cached
    idle = rec.counters("33333333-3333-3333-3333-333333333333", "idle", "postgres")
    for _ in range(5):
        a.query_done(0.01, 3, True)
    a.refused += 2
    b.connection_opened()
    b.query_done(1.0, 2000, False)
    rec.auth_failure("acme")  # a known name: counted on its counters
    rec.auth_failure("nosuchorg")
    rec.auth_failure("nosuchorg")
    rec.auth_failure("NOT a valid name; drop table")
    closed = rec._close_window()
    records = {r.org_name: r for r in closed if isinstance(r, UsageRecord)}
    assert set(records) == {"acme", "beta", "nosuchorg", "*"}  # the idle org has no record
    # the two refused queries are also one audit row for the org (aggregated per window)
    audit = [(r.kind, r.org, r.org_id, r.count) for r in closed if isinstance(r, AuditRecord)]
    assert audit == [("rate_refused", "acme", "11111111-1111-1111-1111-111111111111", 2)]
    ra, rb = records["acme"], records["beta"]
    assert (ra.queries, ra.errors, ra.rows, ra.refused, ra.auth_failures) == (5, 0, 15, 2, 1)
    assert ra.query_seconds == pytest.approx(0.05) and ra.tier == "pro" and ra.worker == "m0-w1"
    assert ra.vcpu_hours == pytest.approx(0.05 * 0.2 / 3600)
    assert (rb.queries, rb.errors, rb.peak_connections, rb.database_type) == (1, 1, 1, "neon")
    assert rb.vcpu_hours == pytest.approx(2.0 * 0.1 / 3600)  # parallelism 2
    assert records["nosuchorg"].auth_failures == 2 and records["nosuchorg"].org_id is None
    assert records["*"].auth_failures == 1
    assert ra.period_start < ra.period_end
    # next window: only the org with an open connection has something (its peak), ids all differ
    again = rec._close_window()
    assert [r.org_name for r in again] == ["beta"] and again[0].peak_connections == 1 and again[0].queries == 0
    assert again[0].id != rb.id
    assert idle.queries == 0


def test_record_ids_are_deterministic_and_distinct():
    from o7s_cluster.usage.records import record_id

    import uuid

    from o7s_cluster.usage.records import USAGE_NAMESPACE

    assert record_id("m0-w1", "boot", 3, "org", "postgres") == record_id("m0-w1", "boot", 3, "org", "postgres")
    assert record_id("m0-w1", "boot", 3, "org", None) == str(uuid.uuid5(USAGE_NAMESPACE, "m0-w1/boot/3/org/"))
    ids = {record_id(w, b, s, o, d) for w in ("m0-w1", "m0-w2") for b in ("x", "y") for s in (1, 2)
           for o in ("o1", "o2") for d in ("postgres", "neon")}
    assert len(ids) == 32


def test_frames_roundtrip_and_torn_tail():
    r = UsageRecord(id="a", org_id=None, org_name="x", database_type=None, worker="w",
                    period_start=__import__("datetime").datetime.now(__import__("datetime").timezone.utc),
                    period_end=__import__("datetime").datetime.now(__import__("datetime").timezone.utc), queries=3)
    data = encode_frame([r]) + encode_frame([r, r])
    frames = decode_frames(data)
    assert [len(f[2]) for f in frames] == [1, 2] and frames[-1][1] == len(data)
    assert frames[0][2][0] == r
    # a torn last frame and a corrupt one are not read
    assert len(decode_frames(data[:-3])) == 1
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    assert len(decode_frames(bytes(bad))) == 1


# ---------------------------------------------------------------------------------------------- spool


async def test_flush_spools_and_next_recorder_replays(tmp_path):
    rec = recorder(tmp_path)
    c = rec.counters("o1", "acme", "postgres")
    for _ in range(7):
        c.query_done(0.001, 1, True)
    await rec.flush()
    assert rec.pending == 1 and rec.spool_bytes > 0
    spool = rec.spool_root / "m0-w1"
    assert len(list(spool.glob("seg-*.spool"))) == 1
    rec.close()  # the process goes away without shipping

    sink = MemorySink()
    rec2 = recorder(tmp_path, sinks=[sink])
    await rec2._open_spool()
    assert rec2.pending == 1  # replayed from the spool
    assert await rec2.ship_now() == 1
    assert sink.total("queries") == 7 and rec2.pending == 0 and rec2.shipped == 1
    assert not list(spool.glob("seg-*"))  # shipped: the segment and its offset file are gone
    assert await rec2.ship_now() == 0
    rec2.close()


async def test_partial_ack_survives_restart(tmp_path):
    """A shipper that acked some frames then died: the next run sends only the rest."""
    rec = recorder(tmp_path, batch_records=1)
    for i in range(3):
        rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
        await rec.flush()
    sink = MemorySink()
    from o7s_cluster.usage.recorder import _SinkState

    rec._sinks = [_SinkState(sink)]
    assert await rec._ship_sink(rec._own, 0)  # one frame shipped and acked
    rec.close()
    assert sink.sends == 1
    sink2 = MemorySink()
    rec2 = recorder(tmp_path, sinks=[sink2])
    assert await rec2.ship_now() == 2
    assert len(sink2.by_id) == 2 and not (set(sink2.by_id) & set(sink.by_id))
    rec2.close()


async def test_torn_segment_tail_is_ignored(tmp_path, caplog):
    rec = recorder(tmp_path)
    rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await rec.flush()
    rec.close()
    seg = next((rec.spool_root / "m0-w1").glob("seg-*.spool"))
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a crash in the middle of the next append
    sink = MemorySink()
    rec2 = recorder(tmp_path, sinks=[sink])
    with caplog.at_level(logging.WARNING, logger="o7s.usage"):
        assert await rec2.ship_now() == 1
    assert "unreadable bytes" in caplog.text
    assert not list(seg.parent.glob("seg-*"))
    rec2.close()


_CRASHER = textwrap.dedent("""
    import sys, time, trio
    from o7s_cluster.config import Settings
    from o7s_cluster.usage.recorder import UsageRecorder

    class Unused:
        name = "memory"  # the sink the test's next recorder has: same spool directory

    async def main():
        rec = UsageRecorder(Settings(spool_dir=sys.argv[1], usage_sink_postgres=False, usage_window=60),
                            worker="m0-w7", sinks=[Unused()])
        c = rec.counters("o1", "acme", "postgres")
        for n in (3, 4):
            for _ in range(n):
                c.query_done(0.002, 5, True)
            await rec.flush()
        for _ in range(1000):  # counted after the last flush: may be lost by the kill, never duplicated
            c.query_done(0.002, 5, True)
        print("flushed", flush=True)
        await trio.sleep(60)

    trio.run(main)
""")


async def test_kill_9_after_flush_loses_nothing_flushed(tmp_path):
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(spool)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "flushed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    sink = MemorySink()
    rec = recorder(tmp_path, sinks=[sink], worker="m0-w7")  # the restarted worker, same id
    await rec.ship_now()
    assert sink.total("queries") == 7 and len(sink.by_id) == 2
    rec.close()


async def test_orphan_spool_is_adopted_by_another_worker(tmp_path):
    dead = recorder(tmp_path, worker="m0-w9")
    dead.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await dead.flush()
    dead.close()  # its lock is released, as when the process dies
    sink = MemorySink()
    live = recorder(tmp_path, sinks=[sink], worker="m0-w1")
    assert await live.ship_now() == 1
    assert sink.total("queries") == 1
    live.close()


async def test_orphan_with_one_sink_down_reaches_the_other_now_and_the_first_later(tmp_path):
    dead = recorder(tmp_path, sinks=[MemorySink(), MemorySink()], worker="m0-w9")
    dead.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await dead.flush()
    dead.close()
    up, down = MemorySink(), MemorySink()
    down.down = True
    live = recorder(tmp_path, sinks=[up, down], worker="m0-w1", backoff_initial=0.01, backoff_max=0.01)
    assert await live.ship_now() == 0  # not in every sink: not acknowledged, the orphan keeps it
    assert len(up.by_id) == 1 and down.failures == 1
    assert list((live.spool_root / "m0-w9").glob("seg-*.spool"))
    down.down = False
    await trio.sleep(0.05)  # its backoff
    assert await live.ship_now() == 1
    assert set(down.by_id) == set(up.by_id) and len(down.by_id) == 1
    assert not list((live.spool_root / "m0-w9").glob("seg-*"))
    live.close()


async def test_a_new_segment_never_reuses_a_shipped_ones_name(tmp_path):
    """A sink's position outlives the segment it points into: a spool shipped empty starts its next segment
    under a new number, or the position would skip the start of the new data."""
    sink = MemorySink()
    rec = recorder(tmp_path, sinks=[sink])
    names = set()
    for _ in range(3):
        rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
        await rec.flush()
        names |= {p.name for p in rec._spool.path.glob("seg-*.spool")}
        assert await rec.ship_now() == 1
        assert not list(rec._spool.path.glob("seg-*"))
    assert len(names) == 3 and len(sink.by_id) == 3 and rec.pending == 0
    rec.close()


async def test_no_sink_discards_what_is_spooled(tmp_path):
    rec = recorder(tmp_path, sinks=[])
    rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await rec.flush()
    assert await rec.ship_now() == 1 and rec.pending == 0 and not list(rec._spool.path.glob("seg-*"))
    rec.close()


async def test_two_live_recorders_never_share_a_directory(tmp_path):
    a = recorder(tmp_path, worker="m0-w1")
    b = recorder(tmp_path, worker="m0-w1")
    await a._open_spool()
    await b._open_spool()
    assert a._spool.path != b._spool.path
    a.close()
    b.close()


async def test_full_spool_keeps_records_in_memory_and_says_so(tmp_path, caplog):
    sink = MemorySink()
    sink.down = True
    rec = recorder(tmp_path, sinks=[sink], spool_max_bytes=600)
    with caplog.at_level(logging.ERROR, logger="o7s.usage"):
        for i in range(6):
            rec.counters(f"o{i}", f"org{i}", "postgres").query_done(0.001, 1, True)
            await rec.flush()
    assert rec.spool_full and rec.spool_bytes <= 600
    assert "usage spool full" in caplog.text
    assert rec.pending == 6 and rec.dropped == 0  # nothing dropped: the rest waits in memory
    sink.down = False
    await rec.ship_now()  # frees the spool
    await rec.flush()  # the backlog goes to the spool now
    assert not rec.spool_full
    await rec.ship_now()
    assert len(sink.by_id) == 6 and rec.pending == 0
    rec.close()


async def test_memory_backlog_cap_drops_loudly(tmp_path, caplog):
    rec = recorder(tmp_path, spool_max_bytes=10, memory_max_records=2)
    with caplog.at_level(logging.ERROR, logger="o7s.usage"):
        for round_ in range(2):  # an empty spool takes one frame whatever its size; then it is full
            for i in range(3):
                rec.counters(f"o{i}", f"org{i}", "postgres").query_done(0.001, 1, True)
            await rec.flush()
    assert rec.dropped == 1 and rec.pending == 3 + 2
    assert "dropped" in caplog.text
    rec.close()


async def test_run_closes_windows_and_ships(tmp_path):
    sink = MemorySink()
    rec = recorder(tmp_path, sinks=[sink], usage_window=0.2)
    c = rec.counters("o1", "acme", "postgres")
    async with trio.open_nursery() as n:
        await n.start(rec.run)
        for _ in range(50):
            c.query_done(0.001, 1, True)
            await trio.sleep(0.01)
        with trio.fail_after(5):
            while sink.total("queries") < 50:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert sink.total("queries") == 50 and len(sink.by_id) >= 2  # several windows
    # windows are aligned to the clock and follow each other
    recs = sorted(sink.by_id.values(), key=lambda r: r.period_start)
    for x, y in zip(recs, recs[1:]):
        assert x.period_end <= y.period_start
    rec.close()


async def test_sink_down_then_up_memory(tmp_path):
    sink = MemorySink()
    sink.down = True
    rec = recorder(tmp_path, sinks=[sink], usage_window=0.1, backoff_initial=0.05, backoff_max=0.2)
    c = rec.counters("o1", "acme", "postgres")
    async with trio.open_nursery() as n:
        await n.start(rec.run)
        for _ in range(30):
            c.query_done(0.001, 1, True)
            await trio.sleep(0.01)
        await trio.sleep(0.3)
        assert sink.failures >= 2 and rec.pending > 0 and rec.spool_bytes > 0
        sink.down = False
        with trio.fail_after(5):
            while sink.total("queries") < 30 or rec.pending:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert sink.total("queries") == 30
    rec.close()


# ---------------------------------------------------------------------------------------------- Postgres sink


@pytest.fixture(scope="module")
def breakable_platform(pg_breakable) -> str:
    dbname = "o7s_usage_sink"
    with psycopg.connect(admin_dsn(pg_breakable), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {dbname}")
    dsn = f"postgresql://{pg_breakable.user}@{pg_breakable.host}:{pg_breakable.port}/{dbname}"
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO platform.organizations (id, name, tier) VALUES"
                     " ('11111111-1111-1111-1111-111111111111', 'acme', 'pro'),"
                     " ('22222222-2222-2222-2222-222222222222', 'beta', 'free') ON CONFLICT DO NOTHING")
    return dsn


def _pg_totals(dsn: str) -> dict[str, tuple]:
    with psycopg.connect(dsn) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT coalesce(org_name, '?'), count(*), sum(query_count), sum(error_count), sum(auth_failures),"
            " count(org_id) FROM platform.usage_metrics GROUP BY 1")}


def _pg_clear(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.usage_metrics")


async def test_postgres_sink_same_batch_twice_is_a_noop(breakable_platform, tmp_path):
    _pg_clear(breakable_platform)
    rec = recorder(tmp_path)
    rec.counters("11111111-1111-1111-1111-111111111111", "acme", "postgres", tier="pro").query_done(0.5, 3, True)
    rec.counters("22222222-2222-2222-2222-222222222222", "beta", "neon").query_done(0.5, 3, False)
    rec.counters("99999999-9999-9999-9999-999999999999", "gone", "postgres").query_done(0.5, 3, True)  # deleted org
    rec.auth_failure("beta-x")
    rec.auth_failure("acme")  # resolved to acme's counters
    batch = rec._close_window()
    sink = PostgresSink(breakable_platform)
    await sink.send(batch)
    first = _pg_totals(breakable_platform)
    await sink.send(batch)
    await sink.send(batch[:2])
    assert _pg_totals(breakable_platform) == first
    assert first["acme"] == (1, 1, 0, 1, 1)
    assert first["beta"] == (1, 1, 1, 0, 1)
    assert first["gone"] == (1, 1, 0, 0, 0)  # kept, org_id NULL: a deleted org never blocks a batch
    assert first["beta-x"] == (1, 0, 0, 1, 0)
    with psycopg.connect(breakable_platform) as conn:
        row = conn.execute("SELECT vcpu_hours, memory_gb_hours, tier, worker, period_end > period_start"
                           " FROM platform.usage_metrics WHERE org_name = 'acme'").fetchone()
    assert float(row[0]) == pytest.approx(0.5 * 0.2 / 3600) and float(row[1]) == pytest.approx(0.5 * 0.05 / 3600)
    assert row[2:] == ("pro", "m0-w1", True)
    await sink.aclose()
    rec.close()


async def test_postgres_sink_down_then_up_every_record_once(breakable_platform, pg_breakable, tmp_path):
    _pg_clear(breakable_platform)
    sink = PostgresSink(breakable_platform, connect_timeout=2)
    rec = recorder(tmp_path, sinks=[sink], usage_window=0.2, backoff_initial=0.1, backoff_max=0.5)
    acme = rec.counters("11111111-1111-1111-1111-111111111111", "acme", "postgres", tier="pro")
    beta = rec.counters("22222222-2222-2222-2222-222222222222", "beta", "postgres", tier="free")
    sent = {"acme": 0, "beta": 0}

    async def load(stop: trio.Event) -> None:
        i = 0
        while not stop.is_set():
            c, name = (acme, "acme") if i % 3 else (beta, "beta")
            c.query_done(0.001, 1, True)
            sent[name] += 1
            i += 1
            await trio.sleep(0.002)

    stop = trio.Event()
    try:
        async with trio.open_nursery() as n:
            await n.start(rec.run)
            n.start_soon(load, stop)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(pg_breakable.stop)
            await trio.sleep(2.0)  # several windows while the sink is down
            assert rec.pending > 0 and rec.sink_status()[0]["failures"] > 0
            await trio.to_thread.run_sync(pg_breakable.start)
            await trio.sleep(0.5)
            stop.set()
            await trio.sleep(0.3)
            await rec.flush()
            with trio.fail_after(30):
                while rec.pending:
                    await trio.sleep(0.1)
            n.cancel_scope.cancel()
    finally:
        if not pg_breakable.running():
            pg_breakable.start()
    totals = _pg_totals(breakable_platform)
    assert totals["acme"][1] == sent["acme"] and totals["beta"][1] == sent["beta"]
    with psycopg.connect(breakable_platform) as conn:
        n_rows = conn.execute("SELECT count(*) FROM platform.usage_metrics").fetchone()[0]
    assert n_rows == rec.shipped  # every record once
    rec.close()


async def test_metrics_gauges_spool_bytes_and_lag(tmp_path):
    from types import SimpleNamespace

    m = SimpleNamespace(usage_spool_bytes=0, usage_shipping_lag_seconds=0.0)
    sink = MemorySink()
    sink.down = True
    rec = UsageRecorder(settings(tmp_path), worker="m0-w1", sinks=[sink], metrics=m, backoff_initial=0.01)
    rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await rec.flush()
    await trio.sleep(0.3)
    rec._refresh_metrics()
    assert m.usage_spool_bytes == rec.spool_bytes > 0
    assert 0.25 <= m.usage_shipping_lag_seconds < 5
    sink.down = False
    await rec.ship_now()
    assert (m.usage_spool_bytes, m.usage_shipping_lag_seconds, rec.pending) == (0, 0.0, 0)
    rec.close()


def test_window_close_snapshot_then_build(tmp_path):
    """A window close takes a snapshot on the event loop and builds the records (ids, estimates) apart,
    in a thread when there are many orgs. (Its cost is measured, not asserted: see docs/USAGE.md.)"""
    rec = recorder(tmp_path)
    for i in range(10_000):
        rec.counters(f"id{i}", f"org{i}", "postgres").query_done(0.001, 1, True)
    snap = rec._snapshot()
    assert len(snap[3]) == 10_000 and all(rec._last[c] == c.usage_values() for c in rec.book)
    records = rec._build(snap)
    assert len(records) == len({r.id for r in records}) == 10_000


async def test_spools_of_other_sinks_are_never_adopted(tmp_path):
    """Two control planes sharing a machine's spool_dir: a dead worker's records only go to its own sinks."""

    class OtherSink(MemorySink):
        key = "postgres:host=elsewhere port=5432 dbname=platform user=o7s"

    dead = recorder(tmp_path, sinks=[OtherSink()], worker="m0-w9")
    dead.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
    await dead.flush()
    dead.close()
    live_sink = MemorySink()
    live = recorder(tmp_path, sinks=[live_sink], worker="m0-w1")
    assert await live.ship_now() == 0 and not live_sink.by_id
    assert live.spool_root != dead.spool_root and live.spool_root.parent == dead.spool_root.parent
    assert (dead.spool_root / "SINKS").read_text() == OtherSink.key + "\n"
    live.close()
    same = recorder(tmp_path, sinks=[other := OtherSink()], worker="m0-w1")
    assert await same.ship_now() == 1 and len(other.by_id) == 1
    same.close()


def test_sink_keys_carry_no_secret():
    from o7s_cluster.usage.sinks.mongo import MongoSink
    from o7s_cluster.usage.sinks.postgres import PostgresSink

    pg = PostgresSink("postgresql://o7s:s3cret@db.internal:5433/platform")
    assert pg.key == "postgres:host=db.internal port=5433 dbname=platform user=o7s"
    mg = MongoSink("mongodb://app:s3cret@m1:27017,m2:27017/usage?replicaSet=rs0")
    assert mg.key == "mongodb:m1:27017,m2:27017/usage" and "s3cret" not in mg.key


async def test_unwritable_spool_dir_falls_back_loudly(tmp_path, caplog):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as root: every directory is writable")
    sink = MemorySink()
    rec = UsageRecorder(Settings(spool_dir=str(ro / "spool"), usage_sink_postgres=False), worker="m0-w1",
                        sinks=[sink])
    with caplog.at_level(logging.ERROR, logger="o7s.usage"):
        rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
        await rec.flush()
    assert "cannot use" in caplog.text and not str(rec.spool_root).startswith(str(ro))
    assert await rec.ship_now() >= 1 and sink.total("queries", "acme") >= 1
    rec.close()


async def test_flush_while_running_ships_before_returning(tmp_path):
    sink = MemorySink()
    rec = recorder(tmp_path, sinks=[sink], usage_window=60)
    async with trio.open_nursery() as n:
        await n.start(rec.run)
        rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
        await rec.flush()
        assert sink.total("queries") == 1 and rec.pending == 0
        sink.down = True
        rec.counters("o1", "acme", "postgres").query_done(0.001, 1, True)
        with trio.fail_after(5):
            await rec.flush(ship_timeout=0.3)  # a sink that is down does not hold up the exit for long
        assert rec.pending == 1
        n.cancel_scope.cancel()
    rec.close()
    sink.down = False
    again = recorder(tmp_path, sinks=[sink])
    assert await again.ship_now() == 1 and sink.total("queries") == 2
    again.close()
