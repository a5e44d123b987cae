"""Usage attribution: per-worker counters, windowed msgspec records, a durable spool and a shipper.

The session hot path only adds to plain attributes of a `UsageCounters` object it holds (one per
(org, database type) per worker). `UsageRecorder.run()` closes a window every `usage_window` seconds
(aligned to the wall clock), turns every non-idle counters object into a `UsageRecord`, appends the
batch to the spool (msgpack, fsynced in a worker thread) and only then counts it as taken. A shipper
task sends spooled records to the sinks (Postgres `platform.usage_metrics`, MongoDB `usageHistory`) in
batches and acknowledges them in the spool only when every sink has them; a sink that is down is retried
with backoff while the spool holds the data. Record ids are fixed when a record is made, so a batch sent
twice (a retry, a replay after a crash) is a no-op in every sink.

Spool layout (`spool_dir/<sinks>/<worker>/`; <sinks> is a hash of the sinks' identities, listed in its SINKS file):
  lock                    flock held by the live recorder of this directory (released when it dies)
  seg-<n>.spool           append-only frames: <u32 length><u32 crc32><msgpack list[UsageRecord]>
  seg-<n>.ack             text: the byte offset up to which the segment has been shipped (atomic rename)
A segment is deleted once it is no longer written to and fully acknowledged. A torn last frame (a crash
mid-write, never fsynced, so never counted as taken) is ignored. Directories whose lock is free (a worker
that died and was not restarted under the same id) are adopted and drained by any live recorder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import random
import secrets
import struct
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import msgspec
import trio

log = logging.getLogger("o7s.usage")

# ------------------------------------------------------------------------------------------- estimates
# Seed 000 (week 2): vcpuHours = seconds x complexity x 0.1 / 3600; seed 001 section 3.2: x parallelism,
# 2 when a query returns more than 1,000 rows; seed 001 section 6.3: a query of a FREE tenant uses 0.1 vCPU
# and 20 MB, STARTER 0.15 vCPU and 30 MB, PRO 0.2 vCPU and 50 MB. O7s does not parse SQL: complexity is 1.
# Enterprise has no figure in the seeds; it is estimated like PRO.
TIER_ESTIMATES: dict[str, tuple[float, float]] = {  # tier -> (vCPU per running query, GB per running query)
    "free": (0.10, 0.020),
    "starter": (0.15, 0.030),
    "pro": (0.20, 0.050),
    "enterprise": (0.20, 0.050),
}
DEFAULT_ESTIMATE = TIER_ESTIMATES["free"]  # unknown tier: the seed 000 factor (0.1 vCPU)
HEAVY_ROWS = 1000  # a result above this many rows counts twice (seed 001 section 3.2 "parallelism")

USAGE_NAMESPACE = uuid.UUID("5b0d6f1e-4f7c-5d1e-9a47-0a7c5e0b5e11")
_NS_BYTES = USAGE_NAMESPACE.bytes
_ORG_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_AUTH_NAMES = 1000  # distinct failed-login names kept per window; the rest are summed under "*"


def estimate(query_seconds: float, heavy_seconds: float, tier: str | None) -> tuple[float, float]:
    """(vCPU-hours, memory-GB-hours) for `query_seconds` of queries, `heavy_seconds` of them with >1,000 rows."""
    vcpu, gb = TIER_ESTIMATES.get(tier or "", DEFAULT_ESTIMATE)
    weighted = query_seconds + heavy_seconds  # parallelism 2 for the heavy ones
    return weighted * vcpu / 3600.0, weighted * gb / 3600.0


_ROW_TAGS = (b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"FETCH", b"MOVE", b"COPY")


def rows_from_tag(tag: bytes | bytearray | memoryview) -> int:
    """Rows of a CommandComplete tag (without its NUL): "SELECT 5" -> 5, "INSERT 0 3" -> 3, "CREATE TABLE" -> 0."""
    tag = bytes(tag)
    sp = tag.rfind(b" ")
    if sp <= 0:
        return 0
    last = tag[sp + 1:]
    if not last.isdigit() or not tag.startswith(_ROW_TAGS):
        return 0
    return int(last)


# ------------------------------------------------------------------------------------------- counters


class UsageCounters:
    """Plain counters of one (org, database type) in one worker. The hot path adds to the attributes."""

    __slots__ = (
        "org_id", "org_name", "db_type", "tier",
        "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out", "rows",
        "query_seconds", "backend_seconds", "heavy_seconds", "connections", "peak_connections", "auth_failures",
    )

    def __init__(self, org_id: str | None, org_name: str, db_type: str, tier: str | None = None) -> None:
        self.org_id = org_id
        self.org_name = org_name
        self.db_type = db_type
        self.tier = tier
        self.queries = 0
        self.errors = 0
        self.throttled = 0
        self.refused = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rows = 0
        self.query_seconds = 0.0
        self.backend_seconds = 0.0
        self.heavy_seconds = 0.0  # summed duration of queries that returned more than HEAVY_ROWS rows
        self.connections = 0  # open client connections now
        self.peak_connections = 0  # highest `connections` in the current window
        self.auth_failures = 0

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        self.queries += 1
        self.query_seconds += seconds
        self.rows += rows
        if not ok:
            self.errors += 1
        if rows > HEAVY_ROWS:
            self.heavy_seconds += seconds

    def connection_opened(self) -> None:
        self.connections += 1
        if self.connections > self.peak_connections:
            self.peak_connections = self.connections

    def connection_closed(self) -> None:
        if self.connections > 0:
            self.connections -= 1

    def _idle(self) -> bool:
        return not (self.queries or self.errors or self.throttled or self.refused or self.bytes_in
                    or self.bytes_out or self.rows or self.query_seconds or self.backend_seconds
                    or self.peak_connections or self.connections or self.auth_failures)

    def _take(self) -> tuple:
        """Snapshot and reset (connections stay: they are still open; the next window's peak starts there)."""
        snap = (self.queries, self.errors, self.throttled, self.refused, self.bytes_in, self.bytes_out, self.rows,
                self.query_seconds, self.backend_seconds, self.heavy_seconds,
                max(self.peak_connections, self.connections), self.auth_failures)
        self.queries = self.errors = self.throttled = self.refused = 0
        self.bytes_in = self.bytes_out = self.rows = self.auth_failures = 0
        self.query_seconds = self.backend_seconds = self.heavy_seconds = 0.0
        self.peak_connections = self.connections
        return snap


# ------------------------------------------------------------------------------------------- records


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One (org, database type, worker, window). `id` is fixed at creation: the idempotency key in every sink."""

    id: str
    org_id: str | None  # None: an auth failure for a name the worker could not resolve (the sink looks it up)
    org_name: str
    database_type: str | None
    worker: str
    period_start: datetime  # UTC
    period_end: datetime
    queries: int = 0
    errors: int = 0
    throttled: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rows: int = 0
    query_seconds: float = 0.0
    backend_seconds: float = 0.0
    peak_connections: int = 0
    auth_failures: int = 0
    vcpu_hours: float = 0.0
    memory_gb_hours: float = 0.0
    tier: str | None = None


def record_id(worker: str, boot: str, seq: int, org_key: str, db_type: str | None) -> str:
    """Deterministic: the same window of the same recorder incarnation always gets the same id.

    uuid5(USAGE_NAMESPACE, "worker/boot/seq/org/db type"), computed without the uuid module's objects
    (3x faster; a window of 10,000 orgs makes 10,000 of them).
    """
    b = bytearray(hashlib.sha1(_NS_BYTES + f"{worker}/{boot}/{seq}/{org_key}/{db_type or ''}".encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[UsageRecord])
_HEADER = struct.Struct("<II")


def encode_frame(records: Sequence[UsageRecord]) -> bytes:
    body = _ENCODER.encode(list(records))
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_frames(data: bytes, start: int = 0) -> list[tuple[int, int, list[UsageRecord]]]:
    """(offset, end offset, records) of each whole, valid frame from `start`; stops at a torn/corrupt tail."""
    out = []
    pos = start
    n = len(data)
    while pos + _HEADER.size <= n:
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if end > n:
            break
        body = data[pos + _HEADER.size:end]
        if zlib.crc32(body) != crc:
            break
        try:
            records = _DECODER.decode(body)
        except msgspec.DecodeError:
            break
        out.append((pos, end, records))
        pos = end
    return out


# ------------------------------------------------------------------------------------------- spool


class SpoolFull(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Segment:
    path: Path
    acked: int  # bytes shipped
    size: int  # bytes durably written (fsynced) as far as this process knows


class SpoolDir:
    """One worker's spool directory. Blocking methods: call them through trio.to_thread."""

    def __init__(self, path: Path, *, segment_bytes: int = 1 << 20) -> None:
        self.path = path
        self.segment_bytes = segment_bytes
        self.lock_fd: int | None = None
        self.segments: list[Segment] = []
        self.current: Segment | None = None
        self._fd: int | None = None

    # -- locking
    def try_lock(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = None

    # -- replay
    def load(self) -> None:
        """Find the segments a previous incarnation left, with their shipped offsets."""
        self.segments = []
        for p in sorted(self.path.glob("seg-*.spool"), key=lambda p: int(p.stem.split("-")[1])):
            acked = 0
            ack = p.with_suffix(".ack")
            try:
                acked = int(ack.read_text().strip() or 0)
            except (OSError, ValueError):
                acked = 0
            self.segments.append(Segment(p, acked, p.stat().st_size))

    def pending_bytes(self) -> int:
        return sum(max(0, s.size - s.acked) for s in self.segments)

    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    # -- writing
    def _next_path(self) -> Path:
        last = max((int(s.path.stem.split("-")[1]) for s in self.segments), default=0)
        return self.path / f"seg-{last + 1:012d}.spool"

    def append(self, frame: bytes) -> None:
        """Append one frame and fsync it (a new segment is started when the current one is big enough)."""
        if self.current is None or self.current.size >= self.segment_bytes:
            self.rotate()
            path = self._next_path()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.current = Segment(path, 0, 0)
            self.segments.append(self.current)
            _fsync_dir(self.path)
        assert self._fd is not None
        view = memoryview(frame)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self.current.size += len(frame)

    def rotate(self) -> None:
        """Stop writing to the current segment (the next append starts a new one)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.current = None

    # -- shipping
    def read_pending(self, max_records: int) -> list[tuple[Segment, int, list[UsageRecord]]]:
        """Frames not yet acknowledged, oldest first: (segment, end offset, records), about max_records."""
        out: list[tuple[Segment, int, list[UsageRecord]]] = []
        count = 0
        for seg in list(self.segments):
            if seg.acked >= seg.size:
                continue
            with open(seg.path, "rb") as f:
                f.seek(seg.acked)
                data = f.read(seg.size - seg.acked)
            frames = decode_frames(data)
            if not frames and seg is not self.current:
                # a torn or corrupt tail that was never fsynced whole: nothing more can come from it
                log.warning("usage spool: ignoring %d unreadable bytes at the end of %s",
                            seg.size - seg.acked, seg.path.name)
                seg.size = seg.acked
                continue
            for _start, end, records in frames:
                out.append((seg, seg.acked + end, records))
                count += len(records)
                if count >= max_records:
                    return out
            if frames and frames[-1][1] < len(data) and seg is not self.current:
                log.warning("usage spool: ignoring %d unreadable bytes at the end of %s",
                            len(data) - frames[-1][1], seg.path.name)
                seg.size = seg.acked + frames[-1][1]
        return out

    def ack(self, seg: Segment, offset: int) -> None:
        """Everything in `seg` before `offset` is in every sink: record it, drop finished segments."""
        seg.acked = max(seg.acked, offset)
        if seg.acked >= seg.size and seg is self.current:
            self.rotate()  # fully shipped: let it go, the next window starts a new segment
        if seg.acked >= seg.size and seg is not self.current:
            seg.path.unlink(missing_ok=True)
            seg.path.with_suffix(".ack").unlink(missing_ok=True)
            self.segments.remove(seg)
            return
        tmp = seg.path.with_suffix(".ack.tmp")
        with open(tmp, "w") as f:
            f.write(str(seg.acked))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, seg.path.with_suffix(".ack"))
        _fsync_dir(self.path)

    def drop_finished(self) -> None:
        for seg in list(self.segments):
            if seg is not self.current and seg.acked >= seg.size:
                seg.path.unlink(missing_ok=True)
                seg.path.with_suffix(".ack").unlink(missing_ok=True)
                self.segments.remove(seg)


# ------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    name: str

    async def send(self, records: Sequence[UsageRecord]) -> None:
        """Store the records idempotently (by id); raise on any failure (the batch is retried)."""

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


@dataclass
class _SinkState:
    sink: Sink
    failures: int = 0
    next_try: float = 0.0  # trio clock
    last_error: str | None = None


def _sink_key(sink: Any) -> str:
    return str(getattr(sink, "key", None) or getattr(sink, "name", type(sink).__name__))


def sink_keys(sinks: Sequence[Any]) -> list[str]:
    """What identifies each sink (no secrets): e.g. postgres:host=... port=... dbname=... user=..."""
    return sorted(_sink_key(s) for s in sinks)


def sink_namespace(sinks: Sequence[Any]) -> str:
    return hashlib.sha1("\n".join(sink_keys(sinks)).encode()).hexdigest()[:12] if sinks else "no-sink"


# ------------------------------------------------------------------------------------------- recorder


class UsageRecorder:
    """Per-worker usage aggregation, spooling and shipping (see the module docstring)."""

    def __init__(self, settings: Any, *, worker: str, sinks: Sequence[Sink] | None = None,
                 spool_max_bytes: int | None = None, batch_records: int = 1000,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 memory_max_records: int = 100_000, metrics: Any = None) -> None:
        self.settings = settings
        self.worker = worker
        self.window = float(getattr(settings, "usage_window", 10.0))
        self._sinks = [_SinkState(s) for s in (make_sinks(settings) if sinks is None else sinks)]
        # One directory per set of sinks: a spool left by a worker is only ever shipped (adopted) to the
        # sinks it was meant for, never to another control plane that shares the machine's spool_dir.
        self.sink_namespace = sink_namespace([st.sink for st in self._sinks])
        self.spool_base = Path(getattr(settings, "spool_dir", ".o7s/spool"))
        self.spool_root = self.spool_base / self.sink_namespace
        self.spool_max_bytes = spool_max_bytes or int(getattr(settings, "usage_spool_max_bytes", 256 << 20))
        self.batch_records = batch_records
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.memory_max_records = memory_max_records
        self._counters: dict[tuple[str | None, str], UsageCounters] = {}
        self._by_name: dict[str, UsageCounters] = {}
        self._auth: dict[str, int] = {}
        self._boot = secrets.token_hex(8)  # this incarnation: ids never collide with a previous run's
        self._seq = 0
        self._window_start = time.time()
        self._unwritten: list[UsageRecord] = []  # closed but not yet in the spool (spool full or failing)
        self._spool: SpoolDir | None = None
        self._write_lock = trio.Lock()
        self._wake = trio.Event()
        # metrics
        self.spool_bytes = 0  # bytes in this worker's spool (written, shipped or not)
        self.pending = 0  # records closed but not yet in every sink
        self.shipped = 0  # records acknowledged by every sink since start
        self.dropped = 0  # records lost because the spool was full and the memory backlog too (logged)
        self.spool_full = False
        self.windows_closed = 0
        self.last_ship_time: float | None = None  # wall clock of the last successful shipment
        self.spool_disk_bytes = 0  # bytes of spool files on disk (shipped or not): what the cap limits
        self._pending_spooled = 0
        self._oldest_unshipped: float | None = None  # wall clock end of the oldest window not yet shipped
        self._running = False
        self.metrics = metrics  # optional WorkerMetrics: usage_spool_bytes, usage_shipping_lag_seconds

    # ---------------------------------------------------------------------------- hot path API
    def counters(self, org_id: str, org_name: str, db_type: str, *, tier: str | None = None) -> UsageCounters:
        key = (org_id, db_type)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = UsageCounters(org_id, org_name, db_type, tier)
            self._by_name.setdefault(org_name, c)
        elif tier is not None and c.tier != tier:
            c.tier = tier
        return c

    def auth_failure(self, org_name: str) -> None:
        c = self._by_name.get(org_name)
        if c is not None:
            c.auth_failures += 1
            return
        name = org_name if (0 < len(org_name) <= 63 and set(org_name) <= _ORG_NAME_OK) else "*"
        if name not in self._auth and len(self._auth) >= MAX_AUTH_NAMES:
            name = "*"
        self._auth[name] = self._auth.get(name, 0) + 1

    # ---------------------------------------------------------------------------- windows
    def _close_window(self, now: float | None = None) -> list[UsageRecord]:
        """Snapshot every counters object into records for [window start, now) and reset them."""
        return self._build(self._snapshot(now))

    def _snapshot(self, now: float | None = None) -> tuple:
        """The cheap part, on the event loop: take and reset the counters (plain tuples, no records yet)."""
        now = time.time() if now is None else now
        start, self._window_start = self._window_start, now
        seq = self._seq
        self._seq += 1
        self.windows_closed += 1
        taken = []
        for c in self._counters.values():
            if c._idle():
                continue
            snap = c._take()
            if any(snap):
                taken.append((c.org_id, c.org_name, c.db_type, c.tier, snap))
        auth, self._auth = self._auth, {}
        return seq, start, now, taken, auth

    def _build(self, snapshot: tuple) -> list[UsageRecord]:
        """Records from a snapshot (ids, estimates): runs in a worker thread when there are many orgs."""
        seq, start, now, taken, auth = snapshot
        p_start = datetime.fromtimestamp(start, timezone.utc)
        p_end = datetime.fromtimestamp(now, timezone.utc)
        out: list[UsageRecord] = []
        for org_id, org_name, db_type, tier, snap in taken:
            (q, err, thr, ref, b_in, b_out, rows, q_s, b_s, heavy_s, peak, auth_n) = snap
            vcpu_h, mem_h = estimate(q_s, heavy_s, tier)
            out.append(UsageRecord(
                id=record_id(self.worker, self._boot, seq, org_id or org_name, db_type),
                org_id=org_id, org_name=org_name, database_type=db_type, worker=self.worker,
                period_start=p_start, period_end=p_end, queries=q, errors=err, throttled=thr, refused=ref,
                bytes_in=b_in, bytes_out=b_out, rows=rows, query_seconds=q_s, backend_seconds=b_s,
                peak_connections=peak, auth_failures=auth_n, vcpu_hours=vcpu_h, memory_gb_hours=mem_h, tier=tier,
            ))
        for name, n in auth.items():
            out.append(UsageRecord(
                id=record_id(self.worker, self._boot, seq, "auth:" + name, None),
                org_id=None, org_name=name, database_type=None, worker=self.worker,
                period_start=p_start, period_end=p_end, auth_failures=n,
            ))
        return out

    async def _close_and_write(self) -> None:
        snap = self._snapshot()
        records = (self._build(snap) if len(snap[3]) + len(snap[4]) < 200
                   else await trio.to_thread.run_sync(self._build, snap))
        await self._write(records)

    def _next_boundary(self, now: float) -> float:
        return (math.floor(now / self.window) + 1) * self.window

    # ---------------------------------------------------------------------------- spool writing
    async def _open_spool(self) -> None:
        def open_() -> SpoolDir:
            try:
                return lock_dir()
            except OSError as e:  # e.g. a spool_dir this user cannot write: usage must not stop the worker
                fallback = Path(tempfile.gettempdir()) / f"o7s-spool-{os.getuid()}" / self.sink_namespace
                log.error("usage spool: cannot use %s (%s); using %s", self.spool_root, e.strerror or e, fallback,
                          extra={"worker": self.worker})
                self.spool_root = fallback
                return lock_dir()

        def lock_dir() -> SpoolDir:
            self.spool_root.mkdir(parents=True, exist_ok=True)
            about = self.spool_root / "SINKS"
            if not about.exists():
                about.write_text("".join(f"{k}\n" for k in sink_keys([st.sink for st in self._sinks])))
            own = SpoolDir(self.spool_root / self.worker)
            if not own.try_lock():  # another live process uses this worker id: never share a directory
                own = SpoolDir(self.spool_root / f"{self.worker}.{os.getpid()}.{self._boot[:6]}")
                if not own.try_lock():
                    raise RuntimeError(f"cannot lock a usage spool directory under {self.spool_root}")
            own.load()
            return own

        self._spool = await trio.to_thread.run_sync(open_)
        replay = self._spool.pending_bytes()
        if replay:
            frames = await trio.to_thread.run_sync(self._spool.read_pending, 1 << 62)
            self._pending_spooled += sum(len(recs) for _seg, _end, recs in frames)
            ends = [r.period_end.timestamp() for _seg, _end, recs in frames for r in recs]
            self._oldest_unshipped = min(ends) if ends else None
            log.info("usage spool: replaying %d records (%d bytes) left by a previous run", self._pending_spooled,
                     replay, extra={"worker": self.worker, "spool": str(self._spool.path)})
        self._refresh_metrics()

    def _refresh_metrics(self) -> None:
        if self._spool is not None:
            self.spool_bytes = self._spool.pending_bytes()
            self.spool_disk_bytes = self._spool.total_bytes()
        self.pending = len(self._unwritten) + self._pending_spooled
        if not self.pending:
            self._oldest_unshipped = None
        m = self.metrics
        if m is not None:
            m.usage_spool_bytes = self.spool_bytes
            m.usage_shipping_lag_seconds = self.shipping_lag_seconds

    @property
    def shipping_lag_seconds(self) -> float:
        """Age of the oldest record not yet in every sink (an upper bound: counted from its window's end)."""
        if not self.pending or self._oldest_unshipped is None:
            return 0.0
        return max(0.0, time.time() - self._oldest_unshipped)

    async def _write(self, records: list[UsageRecord]) -> None:
        """Append closed records (and any backlog) to the spool; keep them in memory if it is full."""
        async with self._write_lock:
            batch = self._unwritten + records
            self._unwritten = []
            if not batch:
                return
            spool = self._spool
            assert spool is not None
            frame = encode_frame(batch)
            room = self.spool_max_bytes - spool.total_bytes()
            n = len(batch)
            while len(frame) > room and n > 0 and spool.total_bytes() > 0:
                n = min(n - 1, n * room // len(frame))  # write what fits, keep the rest in memory
                frame = encode_frame(batch[:n]) if n > 0 else b""
            if n < len(batch):
                self._spool_full(batch[n:])
                if n == 0:
                    return
                batch = batch[:n]
            try:
                await trio.to_thread.run_sync(spool.append, frame)
            except OSError as e:
                log.error("usage spool: cannot write (%s); %d records kept in memory", e, len(batch),
                          extra={"worker": self.worker})
                self._keep(batch + self._unwritten)
                return
            if self.spool_full and not self._unwritten:
                log.warning("usage spool: has room again", extra={"worker": self.worker})
                self.spool_full = False
            self._pending_spooled += len(batch)
            if self._oldest_unshipped is None:
                self._oldest_unshipped = min(r.period_end for r in batch).timestamp()
            self._refresh_metrics()
            self._wake.set()

    def _spool_full(self, batch: list[UsageRecord]) -> None:
        if not self.spool_full:
            log.error("usage spool full (%d bytes, cap %d): records are kept in memory until the sinks catch up",
                      self._spool.total_bytes() if self._spool else 0, self.spool_max_bytes,
                      extra={"worker": self.worker})
        self.spool_full = True
        self._keep(batch)

    def _keep(self, batch: list[UsageRecord]) -> None:
        if len(batch) > self.memory_max_records:
            lost = len(batch) - self.memory_max_records
            self.dropped += lost
            log.error("usage: %d records dropped: spool full and in-memory backlog over %d records",
                      lost, self.memory_max_records, extra={"worker": self.worker, "dropped_total": self.dropped})
            batch = batch[lost:]
        self._unwritten = batch
        if batch and self._oldest_unshipped is None:
            self._oldest_unshipped = min(r.period_end for r in batch).timestamp()
        self._refresh_metrics()

    async def flush(self, ship_timeout: float = 2.0) -> None:
        """Close the current window now and write it to the spool (SIGTERM drain). When run() is going, give
        the shipper up to `ship_timeout` seconds to send what is pending, so a clean exit leaves an empty
        spool when the sinks are up (what it could not send is replayed at the next start)."""
        if self._spool is None:
            await self._open_spool()
        await self._close_and_write()
        if self._running and ship_timeout > 0:
            with trio.move_on_after(ship_timeout):
                while self.pending:
                    await trio.sleep(0.02)

    # ---------------------------------------------------------------------------- shipping
    async def _ship_once(self, spool: SpoolDir, *, own: bool) -> bool:
        """Ship one batch from `spool`; True if something was shipped, False if nothing to do or sinks down."""
        batch = await trio.to_thread.run_sync(spool.read_pending, self.batch_records)
        if not batch:
            return False
        records = [r for _seg, _end, recs in batch for r in recs]
        if not self._sinks:
            ok = True
        else:
            ok = await self._send_all(records)
        if not ok:
            return False

        def ack() -> None:
            # acknowledge per segment, up to the end of the last frame shipped from it
            last: dict[int, tuple[Segment, int]] = {}
            for seg, end, _recs in batch:
                last[id(seg)] = (seg, end)
            for seg, end in last.values():
                spool.ack(seg, end)

        async with self._write_lock:  # ack may rotate the segment the writer appends to
            await trio.to_thread.run_sync(ack)
        if own:
            self._pending_spooled = max(0, self._pending_spooled - len(records))
        self.shipped += len(records)
        self.last_ship_time = time.time()
        if own:  # what is left is newer than what was just shipped
            self._oldest_unshipped = max(r.period_end for r in records).timestamp()
        self._refresh_metrics()
        return True

    async def _send_all(self, records: list[UsageRecord]) -> bool:
        """Send to every sink not yet done with this batch; retried with backoff until all have it."""
        done: set[int] = set()
        while True:
            now = trio.current_time()
            for i, st in enumerate(self._sinks):
                if i in done or st.next_try > now:
                    continue
                try:
                    await st.sink.send(records)
                except Exception as e:  # noqa: BLE001 - any failure: keep the data, retry later
                    st.failures += 1
                    delay = min(self.backoff_max, self.backoff_initial * 2 ** min(st.failures - 1, 16))
                    delay *= random.uniform(0.8, 1.2)
                    st.next_try = trio.current_time() + delay
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    if st.failures == 1 or msg != st.last_error or st.failures % 10 == 0:
                        log.warning("usage sink %s: %s; retrying in %.1fs (%d records waiting)",
                                    st.sink.name, msg, delay, self.pending,
                                    extra={"worker": self.worker, "sink": st.sink.name, "failures": st.failures})
                    st.last_error = msg
                    continue
                if st.failures:
                    log.info("usage sink %s: back after %d failures", st.sink.name, st.failures,
                             extra={"worker": self.worker, "sink": st.sink.name})
                st.failures = 0
                st.last_error = None
                st.next_try = 0.0
                done.add(i)
            if len(done) == len(self._sinks):
                return True
            wait = min(st.next_try for i, st in enumerate(self._sinks) if i not in done) - trio.current_time()
            await trio.sleep(max(0.01, wait))

    async def _adopt_orphans(self) -> None:
        """Drain spool directories of workers that died and were not restarted under the same id."""
        if not self.spool_root.is_dir():
            return
        own = self._spool.path if self._spool else None
        for d in sorted(p for p in self.spool_root.iterdir() if p.is_dir() and p != own):
            orphan = SpoolDir(d)
            locked = await trio.to_thread.run_sync(orphan.try_lock)
            if not locked:
                continue
            try:
                await trio.to_thread.run_sync(orphan.load)
                if orphan.pending_bytes():
                    log.info("usage spool: adopting %s (%d bytes)", d.name, orphan.pending_bytes(),
                             extra={"worker": self.worker})
                while await self._ship_once(orphan, own=False):
                    pass
                await trio.to_thread.run_sync(orphan.drop_finished)
            finally:
                orphan.release()
            if "." in d.name and not any(d.glob("seg-*")):  # a fallback directory: never reused
                for f in d.iterdir():
                    f.unlink(missing_ok=True)
                d.rmdir()

    async def _shipper(self) -> None:
        assert self._spool is not None
        last_adopt = -math.inf
        while True:
            self._wake = trio.Event()  # a write from here on wakes the wait below
            while await self._ship_once(self._spool, own=True):
                pass
            if trio.current_time() - last_adopt > max(60.0, self.window * 6):
                last_adopt = trio.current_time()
                await self._adopt_orphans()
            self._refresh_metrics()  # the lag grows while nothing happens
            with trio.move_on_after(min(5.0, max(1.0, self.window))):
                await self._wake.wait()

    async def _closer(self) -> None:
        while True:
            now = time.time()
            await trio.sleep(max(0.0, self._next_boundary(now) - now))
            await self._close_and_write()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background task: replay the spool, close windows, write them to the spool, ship them."""
        if self._spool is None:
            await self._open_spool()
        if not self._sinks:
            log.warning("usage: no sink configured (usage_sink_postgres off, no mongodb_url): records are spooled"
                        " and discarded", extra={"worker": self.worker})
        try:
            self._running = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._shipper)
                nursery.start_soon(self._closer)
                task_status.started()
        finally:
            self._running = False
            # a sink call abandoned on a hung server may hold its connection: do not wait long for it
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                for st in self._sinks:
                    try:
                        await st.sink.aclose()
                    except Exception:  # noqa: BLE001
                        pass

    async def ship_now(self) -> int:
        """Ship everything spooled (own and orphaned directories) now; returns how many records were shipped."""
        if self._spool is None:
            await self._open_spool()
        before = self.shipped
        assert self._spool is not None
        while await self._ship_once(self._spool, own=True):
            pass
        await self._adopt_orphans()
        return self.shipped - before

    def close(self) -> None:
        """Release the spool directory (after flush(); the data stays for the next run)."""
        if self._spool is not None:
            self._spool.release()
            self._spool = None

    def sink_status(self) -> list[dict[str, Any]]:
        return [{"sink": st.sink.name, "failures": st.failures, "last_error": st.last_error}
                for st in self._sinks]
