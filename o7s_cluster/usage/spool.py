"""A worker's durable spool of records (usage, audit, analytics): msgpack frames, fsynced, acknowledged as shipped.

Spool layout (`spool_dir/<sinks>/<worker>/`; <sinks> is a hash of the sinks' identities, listed in its SINKS file):
  lock                    flock held by the live recorder of this directory (released when it dies)
  seg-<n>.spool           append-only frames: <u32 length><u32 crc32><msgpack list[AnyRecord]>
  seg-<n>.ack             text: the byte offset up to which the segment has been shipped (atomic rename)
A segment is deleted once it is no longer written to and fully acknowledged. A torn last frame (a crash
mid-write, never fsynced, so never counted as taken) is ignored. Directories whose lock is free (a worker
that died and was not restarted under the same id) are adopted and drained by any live recorder.

Every method here blocks: the recorder calls them through `trio.to_thread`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from o7s_cluster.usage.records import AnyRecord, UsageRecord

log = logging.getLogger("o7s.usage")

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(list[AnyRecord])
_LEGACY = msgspec.msgpack.Decoder(list[UsageRecord])  # frames spooled before records were tagged
_HEADER = struct.Struct("<II")


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
    def read_pending(self, max_records: int) -> list[tuple[Segment, int, list[AnyRecord]]]:
        """Frames not yet acknowledged, oldest first: (segment, end offset, records), about max_records."""
        out: list[tuple[Segment, int, list[AnyRecord]]] = []
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
