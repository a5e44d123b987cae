"""`UsageRecorder`: a worker's usage windows (and its audit events, audit.py), written to the spool, shipped to the sinks.

`run()` closes a window every `usage_window` seconds (aligned to the wall clock), turns every non-idle
counters object into a `UsageRecord`, appends the batch to the spool and only then counts it as taken. A
shipper task per sink sends spooled records to its sink in batches from that sink's own position, so a sink
that is down (retried with backoff) never holds back the others; the spool is acknowledged up to the slowest
sink's position, so it holds whatever some sink still lacks.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trio

from o7s_cluster.usage import advice
from o7s_cluster.usage.audit import RATE_REFUSED, AuditBuffer
from o7s_cluster.usage.counters import CounterBook, OrgCounters
from o7s_cluster.usage.records import AnyRecord, AuditRecord, UsageRecord, estimate, record_id
from o7s_cluster.usage.sinks.base import Sink, make_sinks, sink_keys, sink_namespace
from o7s_cluster.usage.spool import START, Position, Segment, SpoolDir, encode_frame

log = logging.getLogger("o7s.usage")

_ORG_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_AUTH_NAMES = 1000  # distinct failed-login names kept per window; the rest are summed under "*"
IDLE_POLL_MAX = 5.0  # seconds: a shipper with nothing to do looks again this often at most (writes wake it)
ADOPT_EVERY = 60.0  # seconds (at least 6 windows) between looks for orphaned spool directories


@dataclass
class _SinkState:
    sink: Sink
    failures: int = 0
    next_try: float = 0.0  # trio clock
    last_error: str | None = None


Lane = int | None  # a sink's index in the recorder's sinks; None: no sink configured (records are discarded)


class _Cursor:
    """Where each sink is in one spool directory. In memory only: after a restart every sink starts again
    from the acknowledgement on disk (a record sent twice is a no-op in every sink)."""

    def __init__(self, spool: SpoolDir, sinks: int, *, own: bool) -> None:
        self.spool = spool
        self.own = own  # the worker's own directory (its pending count and lag), not an adopted orphan
        self.lanes: list[Lane] = list(range(sinks)) or [None]
        self.at: dict[Lane, Position] = dict.fromkeys(self.lanes, START)
        self.locks = {lane: trio.Lock() for lane in self.lanes}  # one batch in flight per sink
        self.acked: Position = START
        self.read_to: Position = START  # end of the newest frame any sink has read
        # frames some sink has read and not every sink has: (end, records, newest period end), oldest first
        self.frames: deque[tuple[Position, int, float]] = deque()

    def note(self, batch: list[tuple[Segment, int, list[AnyRecord]]]) -> None:
        for seg, end, recs in batch:
            pos = (seg.number, end)
            if pos > self.read_to:
                newest = max((r.period_end.timestamp() for r in recs), default=0.0)
                self.frames.append((pos, len(recs), newest))
                self.read_to = pos

    def everyone(self) -> Position:
        """How far every sink has been sent (with no sink: whatever was read, to discard)."""
        return self.read_to if self.lanes == [None] else min(self.at.values())

    def take(self, upto: Position) -> tuple[int, float | None]:
        """Forget the frames before `upto`: (how many records, the newest period end among them)."""
        n, newest = 0, None
        while self.frames and self.frames[0][0] <= upto:
            _pos, k, newest = self.frames.popleft()
            n += k
        return n, newest


class UsageRecorder:
    """Per-worker usage aggregation, spooling and shipping (see the module docstring)."""

    def __init__(self, settings: Any, *, worker: str, sinks: Sequence[Sink] | None = None,
                 spool_max_bytes: int | None = None, batch_records: int = 1000,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 memory_max_records: int = 100_000, metrics: Any = None, book: CounterBook | None = None) -> None:
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
        self.book = CounterBook() if book is None else book  # the worker's counters, shared with its metrics
        self._last: dict[OrgCounters, tuple] = {}  # what each counters object showed when the last window closed
        self._auth: dict[str, int] = {}
        self.audit = AuditBuffer()  # the hot path's audit events (logins, refusals, trips, admin calls)
        self.tiers: Callable[[], Awaitable[list[Any]]] | None = None  # the tier table, for upgrade advice
        self._boot = secrets.token_hex(8)  # this incarnation: ids never collide with a previous run's
        self._seq = 0
        self._window_start = time.time()
        self._unwritten: list[AnyRecord] = []  # closed but not yet in the spool (spool full or failing)
        self._spool: SpoolDir | None = None
        self._own: _Cursor | None = None  # each sink's position in self._spool
        self._write_lock = trio.Lock()
        self._wake = trio.Event()  # set (and replaced) by every spool write: wakes every sink's shipper
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
    def counters(self, org_id: str | None, org_name: str, db_type: str, *, tier: str | None = None) -> OrgCounters:
        """The counters a session adds to (the same object the worker's metrics read)."""
        return self.book.get(org_name, tier, db_type, org_id)

    def auth_failure(self, org_name: str) -> None:
        c = self.book.of_org(org_name)
        if c is not None:
            c.auth_failures += 1
            return
        name = org_name if (0 < len(org_name) <= 63 and set(org_name) <= _ORG_NAME_OK) else "*"
        if name not in self._auth and len(self._auth) >= MAX_AUTH_NAMES:
            name = "*"
        self._auth[name] = self._auth.get(name, 0) + 1

    # ---------------------------------------------------------------------------- windows
    def _close_window(self, now: float | None = None) -> list[AnyRecord]:
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
        last = self._last
        for c in self.book:
            now_values = c.usage_values()
            before = last.get(c)
            peak = c.take_peak()
            if before == now_values and not peak:
                continue
            last[c] = now_values
            if before is None:
                delta = now_values
            else:
                delta = tuple(a - b for a, b in zip(now_values, before))
            q, err, thr, ref, b_in, b_out, rows, q_s, b_s, heavy_s, auth_n = delta
            snap = (q, err, thr, ref, b_in, b_out, rows, q_s, b_s, heavy_s, peak, auth_n)
            if any(snap):
                taken.append((c.org_id, c.org, c.db_type, c.tier, snap))
        auth, self._auth = self._auth, {}
        return seq, start, now, taken, auth, self.audit.take()

    def _build(self, snapshot: tuple) -> list[AnyRecord]:
        """Records from a snapshot (ids, estimates): runs in a worker thread when there are many orgs."""
        seq, start, now, taken, auth, audit = snapshot
        p_start = datetime.fromtimestamp(start, timezone.utc)
        p_end = datetime.fromtimestamp(now, timezone.utc)
        out: list[AnyRecord] = []
        for org_id, org_name, db_type, tier, snap in taken:
            (q, err, thr, ref, b_in, b_out, rows, q_s, b_s, heavy_s, peak, auth_n) = snap
            vcpu_h, mem_h = estimate(q_s, heavy_s, tier)
            out.append(UsageRecord(
                id=record_id(self.worker, self._boot, seq, f"{org_id or org_name}@{tier or ''}", db_type),
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
        out.extend(self._audit_records(seq, p_start, p_end, taken, audit))
        return out

    def _audit_records(self, seq: int, p_start: datetime, p_end: datetime, taken: list, audit: dict) -> list[AuditRecord]:
        """The window's audit rows: the buffer's events, and the rate refusals per org from the usage counters."""
        refused: dict[tuple[str | None, str], list[int]] = {}
        for org_id, org_name, _db_type, _tier, snap in taken:
            if snap[3]:  # queries refused by the rate limiter (snap[2]: throttled)
                r = refused.setdefault((org_id, org_name), [0, 0])
                r[0] += snap[3]
                r[1] += snap[2]
        out: list[AuditRecord] = []
        for (org_id, org_name), (n, throttled) in refused.items():
            out.append(AuditRecord(
                id=record_id(self.worker, self._boot, seq, f"audit-rate:{org_id or org_name}", None), at=p_end,
                kind=RATE_REFUSED, org=org_name, org_id=org_id, count=n, detail={"throttled": throttled},
                worker=self.worker, period_start=p_start))
        for i, ((kind, org, org_id, actor, source, method, detail), n) in enumerate(audit.items()):
            out.append(AuditRecord(
                id=record_id(self.worker, self._boot, seq, f"audit:{i}", None), at=p_end, kind=kind, org=org,
                org_id=org_id, actor=actor, source=source, method=method, count=n, detail=dict(detail),
                worker=self.worker, period_start=p_start))
        return out

    async def _close_and_write(self) -> None:
        snap = self._snapshot()
        records = (self._build(snap) if len(snap[3]) + len(snap[4]) + len(snap[5]) < 200
                   else await trio.to_thread.run_sync(self._build, snap))
        records.extend(await self._advice(snap))
        await self._write(records)

    async def _advice(self, snap: tuple) -> list[AnyRecord]:
        """Upgrade suggestions for the orgs that kept hitting their ceilings in this window (advice.py)."""
        found = advice.candidates(snap[3], snap[5])
        if not found:
            return []
        tiers: list[Any] = []
        if self.tiers is not None:
            try:
                tiers = await self.tiers()
            except Exception as e:  # noqa: BLE001 - the event still says what happened, without a suggestion
                log.warning("upgrade advice: no tier table (%s)", type(e).__name__, extra={"worker": self.worker})
        seq, start, now = snap[0], snap[1], snap[2]
        return advice.records(found, tiers, lambda key: record_id(self.worker, self._boot, seq, key, None),
                              self.worker, datetime.fromtimestamp(start, timezone.utc),
                              datetime.fromtimestamp(now, timezone.utc))

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
        self._own = _Cursor(self._spool, len(self._sinks), own=True)
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

    async def _write(self, records: list[AnyRecord]) -> None:
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
            self._wake = trio.Event()

    def _spool_full(self, batch: list[AnyRecord]) -> None:
        if not self.spool_full:
            log.error("usage spool full (%d bytes, cap %d): records are kept in memory until the sinks catch up",
                      self._spool.total_bytes() if self._spool else 0, self.spool_max_bytes,
                      extra={"worker": self.worker})
        self.spool_full = True
        self._keep(batch)

    def _keep(self, batch: list[AnyRecord]) -> None:
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
    async def _ship_sink(self, cur: _Cursor, lane: Lane) -> bool:
        """Send one sink the next batch after its own position in `cur`'s spool; True if it took one (False:
        nothing new for it, or it is backing off or just failed). The others never wait for it."""
        async with cur.locks[lane]:
            st = None if lane is None else self._sinks[lane]
            if st is not None and st.next_try > trio.current_time():
                return False
            after = cur.acked if lane is None else cur.at[lane]
            batch = await trio.to_thread.run_sync(cur.spool.read_after, after, self.batch_records)
            if not batch:
                return False
            cur.note(batch)
            if st is not None:
                if not await self._send(st, [r for _seg, _end, recs in batch for r in recs]):
                    return False
                seg, end, _recs = batch[-1]
                cur.at[lane] = max(cur.at[lane], (seg.number, end))
        await self._ack(cur)
        return True

    async def _ack(self, cur: _Cursor) -> None:
        """Acknowledge in the spool what every sink has (up to the slowest one); only that counts as shipped."""
        upto = cur.everyone()
        if upto <= cur.acked:
            return
        cur.acked = upto
        n, newest = cur.take(upto)
        async with self._write_lock:  # ack may rotate the segment the writer appends to
            await trio.to_thread.run_sync(cur.spool.ack_to, upto)
        if cur.own:
            self._pending_spooled = max(0, self._pending_spooled - n)
            if newest is not None:  # what is left is newer than what was just shipped
                self._oldest_unshipped = newest
        self.shipped += n
        self.last_ship_time = time.time()
        self._refresh_metrics()

    async def _send(self, st: _SinkState, records: list[AnyRecord]) -> bool:
        """One try; a failure sets the sink's backoff (logged at the first failure, when the error changes and
        every tenth time) and the data stays in the spool."""
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
            return False
        if st.failures:
            log.info("usage sink %s: back after %d failures", st.sink.name, st.failures,
                     extra={"worker": self.worker, "sink": st.sink.name})
        st.failures = 0
        st.last_error = None
        st.next_try = 0.0
        return True

    async def _drain(self, cur: _Cursor) -> None:
        """Every sink, side by side, until each has all of `cur`'s spool or is failing (left to its backoff)."""
        async def lane_(lane: Lane) -> None:
            while await self._ship_sink(cur, lane):
                pass

        async with trio.open_nursery() as nursery:
            for lane in cur.lanes:
                nursery.start_soon(lane_, lane)

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
                # positions last as long as the lock: a sink still down gets it at a later adoption, and the
                # others are sent the unacknowledged part again then (a no-op for them)
                await self._drain(_Cursor(orphan, len(self._sinks), own=False))
                await trio.to_thread.run_sync(orphan.drop_finished)
            finally:
                orphan.release()
            if "." in d.name and not any(d.glob("seg-*")):  # a fallback directory: never reused
                for f in d.iterdir():
                    f.unlink(missing_ok=True)
                d.rmdir()

    @property
    def _idle_poll(self) -> float:
        return min(IDLE_POLL_MAX, max(1.0, self.window))

    async def _lane(self, lane: Lane) -> None:
        """Ship the worker's own spool to one sink, at that sink's pace: woken by every spool write, and when
        its backoff is over."""
        cur = self._own
        assert cur is not None
        while True:
            wake = self._wake  # a write from here on sets it
            while await self._ship_sink(cur, lane):
                pass
            wait = self._idle_poll
            backoff = 0.0 if lane is None else self._sinks[lane].next_try - trio.current_time()
            if backoff > 0:  # it failed: try again when its backoff is over, even with nothing new
                wait = min(wait, backoff)
            with trio.move_on_after(max(0.01, wait)):
                await wake.wait()

    async def _shipper(self) -> None:
        assert self._own is not None
        async with trio.open_nursery() as nursery:
            for lane in self._own.lanes:
                nursery.start_soon(self._lane, lane)
            last_adopt = -math.inf
            while True:
                if trio.current_time() - last_adopt > max(ADOPT_EVERY, self.window * 6):
                    last_adopt = trio.current_time()
                    await self._adopt_orphans()
                self._refresh_metrics()  # the lag grows while nothing happens
                await trio.sleep(self._idle_poll)

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
        """Ship everything spooled (own and orphaned directories) now; returns how many records every sink
        has now that it lacked (a sink that fails is left to its backoff, not waited for)."""
        if self._spool is None:
            await self._open_spool()
        before = self.shipped
        assert self._own is not None
        await self._drain(self._own)
        await self._adopt_orphans()
        return self.shipped - before

    def close(self) -> None:
        """Release the spool directory (after flush(); the data stays for the next run)."""
        if self._spool is not None:
            self._spool.release()
            self._spool = None
            self._own = None

    def sink_status(self) -> list[dict[str, Any]]:
        return [{"sink": st.sink.name, "failures": st.failures, "last_error": st.last_error}
                for st in self._sinks]
