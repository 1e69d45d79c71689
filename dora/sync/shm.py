"""Shared-memory channel: trainer and engines are processes on one machine.

One file in /dev/shm per writer, named `{config.name}.{writer pid}`, preallocated on the first
publish and double-buffered:

    [control page]  magic, owner pid, offsets, current slot, committed version,
                    per slot (seq, version, step, state), reader table (pid, pinned version per slot)
    [layout]        JSON: names, dtypes, shapes, byte offsets (fixed per model, written once)
    [checksums]     per slot, one CRC-32 per tensor (when `config.checksum`)
    [slot 0][slot 1] the flat weights of one version each

Commit protocol (a seqlock; every protocol decision is taken under an flock on the file, the data
copies run without it):
- The writer takes the slot that is *not* current, bumps that slot's `seq` to odd, copies the
  weights in, then bumps `seq` back to even, sets the slot's version and makes it current.
- A reader (copy mode) notes the current slot and its `seq`, copies the slot into its staging
  buffer, then re-reads `seq`: if it changed, the writer lapped it (two publishes during one copy)
  and the copy is discarded and retried. So a reader never returns a half-written version, and the
  trainer never waits for a slow engine.
- A reader in view mode (`read_mode=view`) gets zero-copy views of the slot instead and *pins* it
  (its reader-table entry records the version). The writer never starts writing a pinned slot: it
  waits (up to `timeout_s`, then SyncTimeout naming the reader pids) until `release(version)`.
  Views stay valid until the reader releases them; with two slots a view reader can hold one
  version while the next is published. Pins of dead reader processes are ignored.

Why flock and not lock-free atomics: Python cannot issue memory fences, and the only shared-memory
fields read outside the lock (committed version, closed flag, used as "anything new?" hints) are
8-byte aligned int64s written with one numpy store, a single atomic store on x86-64 and aarch64;
a stale hint only costs one more lock round. The lock is taken a handful of times per version.

Cleanup: the writer unlinks its file in `close()`, at interpreter exit (atexit) and on
SIGTERM/SIGHUP. A SIGKILLed writer cannot clean up, so every writer first calls
`cleanup_stale(config.name)`, which removes the files of dead owner pids. (A pid reused by an
unrelated process keeps its stale file alive until that process exits.)
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from dora.sync.base import (
    CHANNELS, ChecksumError, ReadMode, StagingPool, SyncConfig, SyncRole, SyncTimeout, WeightChannel,
)
from dora.sync.layout import WeightLayout, checksum, copy_chunked
from dora.types import PolicyVersion

SHM_DIR = "/dev/shm"
PAGE = 4096
MAGIC = 0x6E79735F61726F64  # b"dora_syn" little-endian
FORMAT = 1
MAX_READERS = 64

# Control-page int64 word indices.
W_MAGIC, W_FORMAT, W_OWNER, W_LAYOUT_OFF, W_LAYOUT_LEN, W_SUMS_OFF, W_DATA_OFF, W_SLOT_BYTES = range(8)
W_CURRENT, W_COMMITTED, W_CLOSED, W_NUM_TENSORS = range(8, 12)
W_SLOTS = 16  # + 4 * slot: seq, version, step, state
S_SEQ, S_VERSION, S_STEP, S_STATE = range(4)
W_READERS = 32  # + 4 * entry: pid, pinned version in slot 0, pinned version in slot 1, unused
NUM_WORDS = W_READERS + 4 * MAX_READERS
STATE_EMPTY, STATE_WRITING, STATE_COMMITTED = 0, 1, 2

_live_lock = threading.Lock()
_live_paths: dict[str, int] = {}  # path -> pid of the process that must unlink it
_handlers_installed = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped child still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _segment_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)(\.init)?$")


def cleanup_stale(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Remove the segments named `{prefix}.{pid}` (and half-created `.init` ones) whose owner
    process is dead. Returns the removed paths."""
    pattern = _segment_pattern(prefix)
    removed = []
    for entry in os.listdir(shm_dir):
        match = pattern.match(entry)
        if match and not _pid_alive(int(match.group(1))):
            path = os.path.join(shm_dir, entry)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


def _cleanup_live() -> None:
    with _live_lock:
        for path, pid in list(_live_paths.items()):
            if pid == os.getpid():  # a forked child must not unlink its parent's segment
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                del _live_paths[path]


def _register_live(path: str) -> None:
    global _handlers_installed
    with _live_lock:
        _live_paths[path] = os.getpid()
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_cleanup_live)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still covers exits
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: object, previous: object = previous) -> None:
            _cleanup_live()
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def _unregister_live(path: str) -> None:
    with _live_lock:
        _live_paths.pop(path, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


class _Segment:
    """An open, mapped segment file: header words, layout, checksum arrays, slot byte tensors."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.thread_lock = threading.Lock()
        # MAP_POPULATE maps every page now, so the first copy into or out of a slot does not pay
        # a page fault per 4 KiB.
        self.mm = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.hdr = np.ndarray((NUM_WORDS,), dtype=np.int64, buffer=self.mm)
        if int(self.hdr[W_MAGIC]) != MAGIC or int(self.hdr[W_FORMAT]) != FORMAT:
            self.hdr = None  # type: ignore[assignment]
            self.mm.close()
            os.close(fd)
            raise ValueError(f"shm: {path} is not a dora sync segment of format {FORMAT}")
        layout_off, layout_len = int(self.hdr[W_LAYOUT_OFF]), int(self.hdr[W_LAYOUT_LEN])
        self.layout = WeightLayout.from_json(bytes(self.mm[layout_off:layout_off + layout_len]).decode())
        num_tensors = int(self.hdr[W_NUM_TENSORS])
        sums_off = int(self.hdr[W_SUMS_OFF])
        self.sums = np.ndarray((2, max(1, num_tensors)), dtype=np.int64, buffer=self.mm, offset=sums_off)
        data_off, slot_bytes = int(self.hdr[W_DATA_OFF]), int(self.hdr[W_SLOT_BYTES])
        self.slots = [torch.frombuffer(self.mm, dtype=torch.uint8, count=self.layout.nbytes,
                                       offset=data_off + s * slot_bytes) for s in range(2)]

    def slot_word(self, slot: int, field: int) -> int:
        return W_SLOTS + 4 * slot + field

    @contextmanager
    def locked(self) -> Iterator[None]:
        # flock excludes other open files (processes, other channel objects); threads sharing this
        # one (a receiver thread and an engine calling `release`) need the thread lock as well.
        with self.thread_lock:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.slots = []
        self.hdr = self.sums = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:  # zero-copy views still alive: the mapping lives until they are freed
            pass
        os.close(self.fd)


def _create_segment(prefix: str, layout: WeightLayout) -> _Segment:
    pid = os.getpid()
    path = os.path.join(SHM_DIR, f"{prefix}.{pid}")
    tmp = path + ".init"  # renamed into place when complete, so readers never map a partial header
    layout_json = layout.to_json().encode()
    layout_off = PAGE
    sums_off = layout_off + _round_up(len(layout_json))
    num_tensors = len(layout.specs)
    data_off = sums_off + _round_up(2 * 8 * max(1, num_tensors))
    slot_bytes = _round_up(layout.nbytes)
    total = data_off + 2 * slot_bytes
    _register_live(tmp)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Allocate every page now: a full tmpfs then fails here with ENOSPC instead of a SIGBUS
        # in the middle of a later copy.
        os.posix_fallocate(fd, 0, total)
        with mmap.mmap(fd, total) as mm:
            hdr = np.ndarray((NUM_WORDS,), dtype=np.int64, buffer=mm)
            hdr[:] = 0
            hdr[W_FORMAT], hdr[W_OWNER] = FORMAT, pid
            hdr[W_LAYOUT_OFF], hdr[W_LAYOUT_LEN], hdr[W_SUMS_OFF] = layout_off, len(layout_json), sums_off
            hdr[W_DATA_OFF], hdr[W_SLOT_BYTES], hdr[W_NUM_TENSORS] = data_off, slot_bytes, num_tensors
            hdr[W_CURRENT] = hdr[W_COMMITTED] = -1
            for slot in range(2):
                hdr[W_SLOTS + 4 * slot + S_VERSION] = -1
            for entry in range(MAX_READERS):
                hdr[W_READERS + 4 * entry + 1: W_READERS + 4 * entry + 3] = -1
            mm[layout_off:layout_off + len(layout_json)] = layout_json
            hdr[W_MAGIC] = MAGIC
            del hdr
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        _unregister_live(tmp)
        raise
    with _live_lock:
        _live_paths.pop(tmp, None)
    _register_live(path)
    return _Segment(path, fd)


def _find_segment(prefix: str) -> str | None:
    pattern = _segment_pattern(prefix)
    live = [e for e in os.listdir(SHM_DIR)
            if (m := pattern.match(e)) and not m.group(2) and _pid_alive(int(m.group(1)))]
    if len(live) > 1:
        raise ValueError(f"shm: several live writers share sync.name {prefix!r}: {sorted(live)}; "
                         "give each run its own sync.name")
    return os.path.join(SHM_DIR, live[0]) if live else None


@CHANNELS.register("shm")
class ShmChannel(WeightChannel):
    name = "shm"

    def __init__(self, config: SyncConfig, role: SyncRole) -> None:
        super().__init__(config, role)
        if SyncRole(role) == SyncRole.both:
            raise ValueError("shm: role must be 'writer' or 'reader' (one object per process side)")
        if config.read_mode == ReadMode.view and torch.device(config.device).type != "cpu":
            raise ValueError(f"shm: sync.read_mode=view gives views of host shared memory, so "
                             f"sync.device must be 'cpu', got {config.device!r}")
        self._seg: _Segment | None = None
        self._reader_entry = -1
        self._pool = StagingPool(config.device)
        self._closed = False
        if self.role == SyncRole.writer:
            cleanup_stale(config.name)

    @property
    def path(self) -> str | None:
        return self._seg.path if self._seg else None

    # -- writer ----------------------------------------------------------------------------------
    def _publish(self, version: int, weights: Mapping[str, torch.Tensor], step: int) -> int:
        if self._closed:
            raise ValueError(f"shm: publish of version {version} on a closed channel")
        if self._seg is None:
            self._seg = _create_segment(self.config.name, WeightLayout.of(weights))
        seg = self._seg
        seg.layout.check(weights, "shm")
        slot = self._claim_slot(seg, version)
        seg.layout.pack(weights, seg.slots[slot])
        if self.config.checksum:
            for i, spec in enumerate(seg.layout.specs):
                seg.sums[slot, i] = checksum(seg.slots[slot][spec.offset:spec.offset + spec.nbytes])
        with seg.locked():
            seg.hdr[seg.slot_word(slot, S_VERSION)] = version
            seg.hdr[seg.slot_word(slot, S_STEP)] = step
            seg.hdr[seg.slot_word(slot, S_STATE)] = STATE_COMMITTED
            seg.hdr[seg.slot_word(slot, S_SEQ)] += 1  # even again: the slot is complete
            seg.hdr[W_CURRENT] = slot
            seg.hdr[W_COMMITTED] = version
        return seg.layout.nbytes

    def _claim_slot(self, seg: _Segment, version: int) -> int:
        """Mark the non-current slot as being written, once no live reader pins it."""
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            with seg.locked():
                current = int(seg.hdr[W_CURRENT])
                slot = 0 if current < 0 else 1 - current
                old = int(seg.hdr[seg.slot_word(slot, S_VERSION)])
                pinners = [pid for pid, pins in self._readers(seg) if old >= 0 and pins[slot] == old]
                if not pinners:
                    seg.hdr[seg.slot_word(slot, S_STATE)] = STATE_WRITING
                    # Odd and changed (also after a publish that failed half-way): a reader that
                    # started copying this slot before will see the change and retry.
                    seq = int(seg.hdr[seg.slot_word(slot, S_SEQ)])
                    seg.hdr[seg.slot_word(slot, S_SEQ)] = seq + 1 if seq % 2 == 0 else seq + 2
                    return slot
            if time.monotonic() >= deadline:
                raise SyncTimeout("shm", f"reader pid(s) {pinners} to release version {old} (slot {slot}) "
                                  f"before publishing version {version}", self.config.timeout_s)
            time.sleep(0.001)

    @staticmethod
    def _readers(seg: _Segment) -> list[tuple[int, tuple[int, int]]]:
        out = []
        for entry in range(MAX_READERS):
            base = W_READERS + 4 * entry
            pid = int(seg.hdr[base])
            if pid and _pid_alive(pid):
                out.append((pid, (int(seg.hdr[base + 1]), int(seg.hdr[base + 2]))))
        return out

    # -- reader ----------------------------------------------------------------------------------
    def _attach(self) -> bool:
        path = _find_segment(self.config.name)
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # unlinked between listing and opening
            return False
        seg = _Segment(path, fd)
        with seg.locked():
            for entry in range(MAX_READERS):
                base = W_READERS + 4 * entry
                pid = int(seg.hdr[base])
                if pid == 0 or not _pid_alive(pid):
                    seg.hdr[base + 1] = seg.hdr[base + 2] = -1
                    seg.hdr[base] = os.getpid()
                    self._reader_entry = entry
                    break
            else:
                seg.close()
                raise ValueError(f"shm: {path} already has {MAX_READERS} live readers")
        self._seg = seg
        return True

    def _detach(self) -> None:
        seg, self._seg = self._seg, None
        if seg is None:
            return
        if self._reader_entry >= 0:
            with seg.locked():
                base = W_READERS + 4 * self._reader_entry
                seg.hdr[base] = 0
                seg.hdr[base + 1] = seg.hdr[base + 2] = -1
            self._reader_entry = -1
        seg.close()

    def _receive(self, after: int, timeout: float) -> PolicyVersion | None:
        deadline = time.monotonic() + timeout
        next_liveness_check = 0.0
        poll = self.config.poll_s
        while not self._closed:
            if self._seg is None:
                self._attach()
            seg = self._seg
            if seg is not None and int(seg.hdr[W_COMMITTED]) > after:
                pv = self._read_current(seg)
                if pv is not None:
                    return pv
                continue  # torn by a lapping writer: read the newer version
            now = time.monotonic()
            if seg is not None and now >= next_liveness_check:
                next_liveness_check = now + 0.2  # /proc reads are cheap, not free: not every poll
                if int(seg.hdr[W_CLOSED]) or not _pid_alive(int(seg.hdr[W_OWNER])):
                    self._detach()  # the writer is gone; a restarted writer has a new segment
            if now >= deadline:
                return None
            # Short sleeps: a new version is noticed within ~2 ms (one int64 read per poll).
            time.sleep(min(poll, max(0.0, deadline - now)))
            poll = min(poll * 2, 0.002)
        return None

    def _read_current(self, seg: _Segment) -> PolicyVersion | None:
        view = self.config.read_mode == ReadMode.view
        with seg.locked():
            slot = int(seg.hdr[W_CURRENT])
            version = int(seg.hdr[seg.slot_word(slot, S_VERSION)])
            step = int(seg.hdr[seg.slot_word(slot, S_STEP)])
            seq = int(seg.hdr[seg.slot_word(slot, S_SEQ)])
            assert seq % 2 == 0, "the writer never writes the current slot"
            if view:
                seg.hdr[W_READERS + 4 * self._reader_entry + 1 + slot] = version
        if view:
            flat = seg.slots[slot]
        else:
            flat = self._pool.acquire(version, seg.layout.nbytes)
            copy_chunked(flat, seg.slots[slot])
        sums = seg.sums[slot].copy() if self.config.checksum else None
        if not view:
            with seg.locked():
                lapped = int(seg.hdr[seg.slot_word(slot, S_SEQ)]) != seq
            if lapped:
                self._pool.release(version)
                return None
        if sums is not None:
            self._verify(seg.layout, flat, sums, version)
        return PolicyVersion(version=version, weights=seg.layout.views(flat), step=step)

    def _verify(self, layout: WeightLayout, flat: torch.Tensor, sums: np.ndarray, version: int) -> None:
        host = flat if flat.device.type == "cpu" else flat.cpu()
        for i, spec in enumerate(layout.specs):
            got = checksum(host[spec.offset:spec.offset + spec.nbytes])
            if got != int(sums[i]):
                self.release(version)
                raise ChecksumError(f"shm: checksum mismatch in weight {spec.name!r} of version {version} "
                                    f"(expected {int(sums[i]):#x}, got {got:#x})")

    def release(self, version: int) -> None:
        if self.config.read_mode == ReadMode.copy:
            self._pool.release(version)
            return
        seg = self._seg
        if seg is None or self._reader_entry < 0:
            return
        with seg.locked():
            base = W_READERS + 4 * self._reader_entry
            for slot in range(2):
                if int(seg.hdr[base + 1 + slot]) == version:
                    seg.hdr[base + 1 + slot] = -1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.role == SyncRole.writer:
            seg, self._seg = self._seg, None
            if seg is not None:
                seg.hdr[W_CLOSED] = 1
                _unregister_live(seg.path)
                seg.close()
        else:
            self._detach()
