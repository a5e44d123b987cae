"""A worker's durable spool of records (usage, audit, analytics): msgpack frames, fsynced, acknowledged as shipped.

Spool layout (`spool_dir/<sinks>/<worker>/`; <sinks> is a hash of the sinks' identities, listed in its SINKS file):
  lock                    flock held by the live recorder of this directory (released when it dies)
  seg-<n>.spool           append-only frames: <u32 length><u32 crc32><msgpack list[AnyRecord]>
  seg-<n>.ack             text: the byte offset up to which the segment has been shipped (atomic rename)
A segment is deleted once it is no longer written to and fully acknowledged. A torn last frame (a crash
mid-write, never fsynced, so never counted as taken) is ignored. Directories whose lock is free (a worker
that died and was not restarted under the same id) are adopted and drained by any live recorder.

Each sink reads from its own `Position` (kept in memory by the recorder: `read_after`), so a sink that is
down never holds back the others; the acknowledgement on disk (`ack_to`) is the slowest sink's position.
Segment numbers only grow within a process, so a position never points into a later, reused name.

Every method here blocks: the recorder calls them through `trio.to_thread`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from o7s_cluster.usage.records import AnyRecord, UsageRecord

log = logging.getLogger("o7s.usage")

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[AnyRecord])
_LEGACY = msgspec.msgpack.Decoder(list[UsageRecord])  # frames spooled before records were tagged
_HEADER = struct.Struct("<II")

Position = tuple[int, int]  # (segment number, byte offset): everything before it has been read/sent
START: Position = (0, 0)  # before every segment (numbers start at 1)


def _decode(body: bytes) -> list[AnyRecord]:
    try:
        return _DECODER.decode(body)
    except msgspec.DecodeError:
        return list(_LEGACY.decode(body))  # no tag: an untagged usage frame of an older version


def encode_frame(records: Sequence[AnyRecord]) -> bytes:
    body = _ENCODER.encode(list(records))
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def decode_frames(data: bytes, start: int = 0) -> list[tuple[int, int, list[AnyRecord]]]:
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
            records = _decode(body)
        except msgspec.DecodeError:
            break
        out.append((pos, end, records))
        pos = end
    return out


class SpoolFull(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _number(path: Path) -> int:
    return int(path.stem.split("-")[1])


@dataclass
class Segment:
    path: Path
    acked: int  # bytes shipped
    size: int  # bytes durably written (fsynced) as far as this process knows
    number: int = field(init=False)

    def __post_init__(self) -> None:
        self.number = _number(self.path)


class SpoolDir:
    """One worker's spool directory. Blocking methods: call them through trio.to_thread."""

    def __init__(self, path: Path, *, segment_bytes: int = 1 << 20) -> None:
        self.path = path
        self.segment_bytes = segment_bytes
        self.lock_fd: int | None = None
        self.segments: list[Segment] = []
        self.current: Segment | None = None
        self._fd: int | None = None
        self._last_number = 0  # highest segment number this process has seen: names are never reused

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
        for p in sorted(self.path.glob("seg-*.spool"), key=_number):
            acked = 0
            ack = p.with_suffix(".ack")
            try:
                acked = int(ack.read_text().strip() or 0)
            except (OSError, ValueError):
                acked = 0
            self.segments.append(Segment(p, acked, p.stat().st_size))
        self._last_number = max([self._last_number, *(s.number for s in self.segments)])

    def pending_bytes(self) -> int:
        return sum(max(0, s.size - s.acked) for s in self.segments)

    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    # -- writing
    def _next_path(self) -> Path:
        # past every number seen, not just the segments left: a sink's in-memory position may still name a
        # deleted segment, and must never point into a new one of the same name
        self._last_number = max([self._last_number, *(s.number for s in self.segments)]) + 1
        return self.path / f"seg-{self._last_number:012d}.spool"

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
    def read_pending(self, max_records: int) -> list[tuple[Segment, int, list[AnyRecord]]]:
        """Frames not yet acknowledged, oldest first: (segment, end offset, records), about max_records."""
        return self.read_after(START, max_records)

    def read_after(self, position: Position, max_records: int) -> list[tuple[Segment, int, list[AnyRecord]]]:
        """Frames after `position` and not yet acknowledged, oldest first: (segment, end offset, records),
        about max_records (whole frames). What one sink has not been sent yet."""
        out: list[tuple[Segment, int, list[AnyRecord]]] = []
        count = 0
        after_seg, after_offset = position
        for seg in list(self.segments):
            if seg.number < after_seg:
                continue
            start = max(seg.acked, after_offset if seg.number == after_seg else 0)
            if start >= seg.size:
                continue
            with open(seg.path, "rb") as f:
                f.seek(start)
                data = f.read(seg.size - start)
            frames = decode_frames(data)
            if not frames and seg is not self.current:
                # a torn or corrupt tail that was never fsynced whole: nothing more can come from it
                log.warning("usage spool: ignoring %d unreadable bytes at the end of %s",
                            seg.size - start, seg.path.name)
                seg.size = start
                continue
            for _start, end, records in frames:
                out.append((seg, start + end, records))
                count += len(records)
                if count >= max_records:
                    return out
            if frames and frames[-1][1] < len(data) and seg is not self.current:
                log.warning("usage spool: ignoring %d unreadable bytes at the end of %s",
                            len(data) - frames[-1][1], seg.path.name)
                seg.size = start + frames[-1][1]
        return out

    def ack_to(self, position: Position) -> None:
        """Everything before `position` is in every sink: acknowledge it, segment by segment."""
        upto_seg, upto_offset = position
        for seg in list(self.segments):
            if seg.number > upto_seg:
                break
            offset = seg.size if seg.number < upto_seg else upto_offset
            if offset > seg.acked or offset >= seg.size:
                self.ack(seg, offset)

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
