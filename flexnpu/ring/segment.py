"""Segment and Ring: the typed Python face of the C core (flexnpu/ring/ring.c).

Python never touches a shared index: every push/pop/wait is one call into C, where the
indices are C11 atomics. cffi (API mode) releases the GIL around every call, so waits in C
never block other Python threads.
"""

from __future__ import annotations

import mmap
import os
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any

from ._core import ffi, lib
from .errors import PeerClosed, PeerDead, RingCorrupt, RingError

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

LIVENESS_INTERVAL_S: float = lib.fx_liveness_ns_default() / 1e9
"""A waiter checks the peer (control fd EOF/HUP, pidfd) at least this often while asleep, so a
dead peer is reported within LIVENESS_INTERVAL_S plus scheduling delay (tests allow 4x)."""

_READY, _TIMEOUT = lib.FX_READY, lib.FX_TIMEOUT
_EPEERDEAD, _ECLOSED, _ECORRUPT, _EINTR = lib.FX_EPEERDEAD, lib.FX_ECLOSED, lib.FX_ECORRUPT, lib.FX_EINTR

# Functions bound once (attribute lookups on lib cost ~30 ns each).
_push_batch, _pop_batch, _push_wait = lib.fx_push_batch, lib.fx_pop_batch, lib.fx_push_wait
_from_buffer = ffi.from_buffer
_BAD = ffi.cast("int *", 0)  # a closed Ring's handle: cffi refuses it with TypeError, never derefs

# The CPython fast path (pyfast.c, same .so): FastRing.push/pop/wait and call() cost ~40 ns of
# call overhead instead of ~200 ns through cffi. Installed once into this namespace.
_fast: dict[str, Any] = {}
if lib.fx_py_install(id(_fast)) != 0:  # id() is the object's address in CPython
    raise ImportError("flexnpu.ring: cannot install the C fast path")
_FastRing = _fast["FastRing"]
_fast_call = _fast["call"]
launch_split = _fast["launch_split"]  # protocol.split_launch: the codec's structure/handle split
# The client's staging ring for small payloads, with the launch hot path (stage + push) in C:
# Stager(offset, size); .alloc(n, seq) -> offset | None, .release_before(seq), .release_all(),
# .bind(sq._fast, arena, record_template, at_stream, at_offset, at_length),
# .submit(payload, stream, seq) -> bool (False: nothing done, the caller's slow path runs).
Stager = _fast["Stager"]
_CLOSEDRC, _ROLERC = 100, 101


class Ring:
    """One direction of a segment. This process's role (producer or consumer) is fixed.

    The per-record operations are the C fast path (pyfast.c), bound per instance:

    - ``push(rec) -> bool``: producer; push one record (zero-padded to entry_size); False if the
      ring is full. ValueError if ``rec`` exceeds entry_size.
    - ``pop() -> bytes | None``: consumer; one record copied out of shared memory, or None if empty.
    - ``wait(timeout) -> bool``: consumer; until non-empty, spinning briefly then futex-sleeping
      (announce-sleep protocol) with the GIL released. True = ready, False = timeout (None =
      forever). A signal's Python handler runs (and may raise) between wait slices.

    Each raises RingError on a closed segment or from the wrong side, PeerDead / PeerClosed /
    RingCorrupt as their names say.
    """

    def __init__(self, seg: Segment, ptr: Any, name: str) -> None:
        self._r = ptr
        self._seg = seg  # keeps the mapping alive while the Ring is reachable
        self.name = name
        self.entry_size: int = lib.fx_ring_entry_size(ptr)
        self.capacity: int = lib.fx_ring_capacity(ptr)
        self.is_producer: bool = bool(lib.fx_ring_is_producer(ptr))
        self._fast = _FastRing(int(ffi.cast("uintptr_t", ptr)), self._fast_err)
        self.push = self._fast.push
        self.pop = self._fast.pop
        self.wait = self._fast.wait

    def _fast_err(self, rc: int, what: str) -> None:
        if rc == _CLOSEDRC:
            raise self._closed_error(what)
        if rc == _ROLERC:
            role = "producer" if self.is_producer else "consumer"
            raise RingError(f"{what} is not allowed: this process is the {role} of the {self.name} ring")
        self._raise(rc, what)

    def _detach(self) -> None:
        self._r = _BAD
        self._fast.detach()

    def __repr__(self) -> str:
        role = "producer" if self.is_producer else "consumer"
        return f"<Ring {self.name} {role} {self.capacity}x{self.entry_size}B>"

    # ---- errors (cold paths)
    def _raise(self, rc: int, what: str) -> None:
        if rc == lib.FX_EROLE:
            role = "producer" if self.is_producer else "consumer"
            raise RingError(f"{what} is not allowed: this process is the {role} of the {self.name} ring")
        if rc == _ECORRUPT:
            if self._r is _BAD:
                raise RingError(f"{what} on a closed segment")
            snap = ffi.new("uint32_t[4]")
            lib.fx_ring_snapshot(self._r, snap)
            raise RingCorrupt(
                f"{self.name} ring corrupt: shared head={snap[2]} tail={snap[3]} (our index "
                f"{snap[0]}, last peer index {snap[1]}), tail-head exceeds capacity "
                f"{self.capacity} ({what}); the peer scribbled on the ring, refusing to follow it"
            )
        if rc == _EPEERDEAD:
            raise PeerDead(f"peer died while waiting on the {self.name} ring ({what})")
        if rc == _ECLOSED:
            raise PeerClosed(f"segment closed by the peer ({self.name} ring, {what})")
        raise RingError(f"{what}: unexpected status {rc}")

    def _closed_error(self, what: str) -> RingError:
        return RingError(f"{what} on a closed segment")

    def _check_role(self, producer: bool, what: str) -> None:
        if self.is_producer != producer:
            role = "producer" if self.is_producer else "consumer"
            raise RingError(f"{what} is not allowed: this process is the {role} of the {self.name} ring")

    # ---- both
    @property
    def wakes(self) -> int:
        """How many futex wakes this side issued (the peer was asleep): a statistic."""
        return 0 if self._r is _BAD else lib.fx_ring_wakes(self._r)

    def __len__(self) -> int:
        if self._r is _BAD:
            return 0
        n: int = lib.fx_ring_pending(self._r)
        if n < 0:
            self._raise(n, "len")
        return n

    # ---- producer
    def push_batch(self, buf: Any, n: int) -> int:
        """Push n records packed back to back (entry_size bytes each) with one tail store.
        Returns how many fit (a prefix of the batch)."""
        self._check_role(True, "push_batch")
        need = n * self.entry_size
        if n < 0 or len(memoryview(buf).cast("B")) < need:
            raise ValueError(f"buffer holds fewer than {n} records of {self.entry_size} bytes")
        if self._r is _BAD:
            raise self._closed_error("push_batch")
        rc: int = _push_batch(self._r, _from_buffer(buf), n)
        if rc < 0:
            self._raise(rc, "push_batch")
        return rc

    def wait_space(self, timeout: float | None) -> bool:
        """Producer: until at least one slot is free (spin, then futex). True = space, False =
        timeout. Raises PeerDead / PeerClosed / RingCorrupt."""
        self._check_role(True, "wait_space")
        if self._r is _BAD:
            raise self._closed_error("wait_space")
        end = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            left = -1.0 if end is None else max(0.0, end - _monotonic())
            rc = lib.fx_wait_space(self._r, left)
            if rc == _READY:
                return True
            if rc == _TIMEOUT:
                return False
            if rc != _EINTR:
                self._raise(rc, "wait_space")

    def push_wait(self, rec: bytes, timeout: float | None) -> None:
        """Push, waiting for space (spin, then futex). Raises TimeoutError, PeerDead, PeerClosed."""
        n = len(rec)
        if n > self.entry_size:
            raise ValueError(f"record of {n} bytes exceeds entry size {self.entry_size}")
        self._check_role(True, "push_wait")
        if self._r is _BAD:
            raise self._closed_error("push_wait")
        rec = bytes(rec)
        end = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            left = -1.0 if end is None else max(0.0, end - _monotonic())
            rc = _push_wait(self._r, rec, n, left)
            if rc == _READY:
                return
            if rc == _TIMEOUT:
                raise TimeoutError(f"{self.name} ring full for {timeout} s")
            if rc != _EINTR:
                self._raise(rc, "push_wait")

    # ---- consumer
    def pop_into(self, buf: Any, max_n: int) -> int:
        """Copy up to max_n records into the private writable buffer ``buf``; returns the count."""
        self._check_role(False, "pop_into")
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("pop_into needs a writable buffer")
        if max_n < 0 or mv.nbytes < max_n * self.entry_size:
            raise ValueError(f"buffer too small for {max_n} records of {self.entry_size} bytes")
        if self._r is _BAD:
            raise self._closed_error("pop_into")
        rc: int = _pop_batch(self._r, _from_buffer(buf, require_writable=True), max_n)
        if rc < 0:
            self._raise(rc, "pop_into")
        return rc


def call(sq: Ring, cq: Ring, rec: bytes, timeout: float | None) -> bytes:
    """Synchronous call in one C crossing (GIL released while waiting): push ``rec`` on sq
    (waking the consumer if it sleeps), wait for ONE cq record and return it."""
    rep: bytes = _fast_call(sq._fast, cq._fast, rec, timeout)
    return rep


class Doorbell:
    """A process-local futex word another thread rings to wake wait_any (private futex)."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = ffi.gc(lib.fx_doorbell_new(), lib.fx_doorbell_free)
        if self._d == ffi.NULL:
            raise MemoryError("doorbell")

    def ring(self) -> None:
        lib.fx_doorbell_ring(self._d)

    def watch(self, bell: int, sleepers: int) -> bool:
        """Also wake wait_any when the shared u32 at address `bell` (in a mapping another process
        posts to, e.g. a collective segment) changes; `sleepers` is the count its posters read
        before waking. Only the thread that calls wait_any may watch and unwatch, and a mapping
        must be unwatched before it is unmapped. False if the watch list is full."""
        return bool(lib.fx_doorbell_watch(self._d, bell, sleepers) == 0)

    def unwatch(self, bell: int) -> None:
        lib.fx_doorbell_unwatch(self._d, bell)

    @property
    def watching(self) -> int:
        return int(lib.fx_doorbell_nwatch(self._d))


def wait_any(
    rings: list[Ring], timeout: float | None, doorbell: Doorbell | None = None, *, fallback: bool = False
) -> bool:
    """Consumer side of many rings: spin briefly, announce sleep on each, seq_cst fence, recheck
    all, then futex_waitv on all sleep words plus the doorbell. Beyond 127 rings, where
    futex_waitv is missing, or with ``fallback=True``, sliced waits (0.2 -> 10 ms) are used.
    True if a ring has records (or is corrupt, or its segment is closed) or the doorbell rang."""
    for r in rings:
        if r._r is _BAD:
            raise r._closed_error("wait_any")
        r._check_role(False, "wait_any")
    arr = ffi.new("fx_ring *[]", [r._r for r in rings]) if rings else ffi.NULL
    d = doorbell._d if doorbell is not None else ffi.NULL
    end = None if timeout is None else _monotonic() + max(0.0, timeout)
    while True:
        left = -1.0 if end is None else max(0.0, end - _monotonic())
        rc = lib.fx_wait_any(arr, len(rings), left, d, 1 if fallback else 0)
        if rc == _READY:
            return True
        if rc == _TIMEOUT:
            return False
        if rc != _EINTR:
            raise RingError(f"wait_any: status {rc}")


class RingSet:
    """Consumer side of a fixed list of rings (one per client): which have work, in one C pass,
    and a wait on all of them. Build it once per change of the list, not once per wait: with
    many idle clients, per-ring Python calls would dominate the loop. Put the most recently
    active rings first: beyond 127 rings only the first are woken by futex (wait_any)."""

    __slots__ = ("rings", "_arr", "_out", "_keep")

    def __init__(self, rings: list[Ring]) -> None:
        for r in rings:
            if r._r is _BAD:
                raise r._closed_error("RingSet")
            r._check_role(False, "RingSet")
        self.rings = list(rings)
        self._keep = [r._seg for r in self.rings]  # keeps each mapping alive (unless closed: rebuild then)
        self._arr = ffi.new("fx_ring *[]", [r._r for r in self.rings]) if self.rings else ffi.NULL
        self._out = ffi.new("uint32_t[]", max(1, len(self.rings)))

    def __len__(self) -> int:
        return len(self.rings)

    def ready(self) -> list[int]:
        """Indices of the rings with records (or corrupt, or closed by their peer)."""
        if not self.rings:
            return []
        k = lib.fx_ready_list(self._arr, len(self.rings), self._out)
        return ffi.unpack(self._out, k) if k else []

    def wait(self, timeout: float | None, doorbell: Doorbell | None = None) -> bool:
        d = doorbell._d if doorbell is not None else ffi.NULL
        end = None if timeout is None else _monotonic() + max(0.0, timeout)
        while True:
            left = -1.0 if end is None else max(0.0, end - _monotonic())
            rc = lib.fx_wait_any(self._arr, len(self.rings), left, d, 0)
            if rc == _READY:
                return True
            if rc == _TIMEOUT:
                return False
            if rc != _EINTR:
                raise RingError(f"wait_any: status {rc}")


def have_futex_waitv() -> bool:
    return bool(lib.fx_have_futex_waitv())


class Segment:
    """One shared-memory segment: header page, SQ ring, CQ ring, data arena (sealed memfd).

    The creator (client) produces on sq and consumes cq; the attacher (daemon) the reverse.
    """

    def __init__(self, ptr: Any, *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use Segment.create() or Segment.attach(fd)")
        self._s = ptr
        self._closed = False
        self.fd: int = lib.fx_seg_fd(ptr)
        self.size: int = lib.fx_seg_size(ptr)
        self.is_creator: bool = bool(lib.fx_seg_is_creator(ptr))
        self.arena_offset: int = lib.fx_seg_arena_off(ptr)
        self.arena_size: int = lib.fx_seg_arena_size(ptr)
        self.generation: int = lib.fx_seg_generation(ptr)
        self.creator_pid: int = lib.fx_seg_creator_pid(ptr)
        self.sq = Ring(self, lib.fx_seg_sq(ptr), "SQ")
        self.cq = Ring(self, lib.fx_seg_cq(ptr), "CQ")
        # The arena gets its own Python-managed mapping: views/ndarrays/tensors keep it alive
        # past close(), so a stale view can never touch unmapped memory.
        self._mm: mmap.mmap | None = None
        if self.arena_size:
            self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._arena = memoryview(self._mm)[self.arena_offset : self.arena_offset + self.arena_size]
        else:
            self._arena = memoryview(bytearray(0))

    @classmethod
    def create(
        cls,
        *,
        sq_entries: int = 1024,
        cq_entries: int = 1024,
        sqe_size: int = 64,
        cqe_size: int = 32,
        arena_bytes: int = 16 << 20,
    ) -> Segment:
        """Create a new segment (client side): a sealed memfd with the header filled in."""
        for name, v in (
            ("sq_entries", sq_entries),
            ("cq_entries", cq_entries),
            ("sqe_size", sqe_size),
            ("cqe_size", cqe_size),
            ("arena_bytes", arena_bytes),
        ):
            if not isinstance(v, int) or v < 0 or v >= 1 << 63:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        err = ffi.new("char[]", lib.FX_ERRMSG_LEN)
        p = lib.fx_seg_create(sq_entries, cq_entries, sqe_size, cqe_size, arena_bytes, err)
        if p == ffi.NULL:
            msg = ffi.string(err).decode(errors="replace")
            raise (ValueError if "must be" in msg or "too large" in msg else OSError)(msg)
        return cls(p, _token=_PRIVATE)

    @classmethod
    def attach(cls, fd: int) -> Segment:
        """Attach to a segment received from a client (daemon side). ``fd`` is dup'ed (the caller
        still owns it). The header is copied out and validated against the memfd's real size and
        seals; a bad one raises RingCorrupt. Records this process as the attacher."""
        err = ffi.new("char[]", lib.FX_ERRMSG_LEN)
        corrupt = ffi.new("int *")
        p = lib.fx_seg_attach(fd, err, corrupt)
        if p == ffi.NULL:
            msg = ffi.string(err).decode(errors="replace")
            raise (RingCorrupt if corrupt[0] else OSError)(f"cannot attach segment: {msg}")
        return cls(p, _token=_PRIVATE)

    def __repr__(self) -> str:
        side = "creator" if self.is_creator else "attacher"
        return (
            f"<Segment {side} fd={self.fd} size={self.size} sq={self.sq.capacity}x"
            f"{self.sq.entry_size} cq={self.cq.capacity}x{self.cq.entry_size} "
            f"arena={self.arena_size}{' closed' if self._closed else ''}>"
        )

    def _live(self) -> Any:
        if self._closed:
            raise RingError("segment is closed")
        return self._s

    @property
    def attacher_pid(self) -> int:
        v: int = lib.fx_seg_attacher_pid(self._live())
        return v

    @property
    def heartbeat(self) -> int:
        v: int = lib.fx_seg_heartbeat(self._live())
        return v

    def beat(self) -> int:
        """Increment the daemon heartbeat (atomic u64); returns the new value."""
        v: int = lib.fx_seg_beat(self._live())
        return v

    @property
    def closed_by_peer(self) -> bool:
        """True once either side called close_notify()."""
        return bool(lib.fx_seg_closed(self._live()))

    def set_peer(self, *, fd: int | None = None, pid: int | None = None) -> None:
        """Define "peer died" for waits: ``fd`` (dup'ed; e.g. the control socket) reaching
        EOF/HUP and/or process ``pid`` exiting (pidfd: a zombie counts as dead)."""
        rc = lib.fx_seg_set_peer(self._live(), -1 if fd is None else fd, -1 if pid is None else pid)
        if rc < 0:
            raise OSError(-rc, f"set_peer: {os.strerror(-rc)}")

    def peer_alive(self) -> bool:
        return bool(lib.fx_seg_peer_alive(self._live()))

    def set_spin(self, seconds: float) -> None:
        """How long waits spin before they futex-sleep (default 30 us)."""
        lib.fx_seg_set_spin_ns(self._live(), int(seconds * 1e9))

    def set_liveness_interval(self, seconds: float) -> None:
        lib.fx_seg_set_liveness_ns(self._live(), int(seconds * 1e9))

    # ---- arena
    def _check_range(self, offset: int, nbytes: int) -> None:
        if (
            not (isinstance(offset, int) and isinstance(nbytes, int))
            or offset < 0
            or nbytes < 0
            or offset + nbytes > self.arena_size
        ):
            raise RingCorrupt(
                f"arena range offset={offset} nbytes={nbytes} is outside the {self.arena_size}-byte arena"
            )

    def arena_view(self, offset: int, nbytes: int) -> memoryview:
        """Writable zero-copy view of arena bytes [offset, offset+nbytes); bounds-checked."""
        self._live()
        self._check_range(offset, nbytes)
        return self._arena[offset : offset + nbytes]

    def arena_bytes(self, offset: int, nbytes: int) -> bytes:
        """A copy of arena bytes [offset, offset+nbytes), bounds-checked: what a reader parses
        (the peer may rewrite its arena at any time), in one call on the daemon's hot path."""
        if (
            not self._closed
            and type(offset) is int
            and type(nbytes) is int
            and 0 <= offset
            and 0 <= nbytes
            and offset + nbytes <= self.arena_size
        ):
            return bytes(self._arena[offset : offset + nbytes])
        return bytes(self.arena_view(offset, nbytes))  # raises what it raises

    def arena_numpy(
        self, offset: int, nbytes: int, dtype: Any = "uint8", shape: tuple[int, ...] | None = None
    ) -> numpy.ndarray:
        """Zero-copy numpy array over the arena."""
        import numpy as np

        dt = np.dtype(dtype)
        if nbytes % dt.itemsize:
            raise ValueError(f"{nbytes} bytes is not a whole number of {dt} items")
        a = np.frombuffer(self.arena_view(offset, nbytes), dtype=dt)
        return a if shape is None else a.reshape(shape)

    def arena_torch(
        self, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Zero-copy torch tensor over the arena (torch imported lazily)."""
        import torch

        elsize = torch.empty((), dtype=dtype).element_size()
        if nbytes % elsize:
            raise ValueError(f"{nbytes} bytes is not a whole number of {dtype} items")
        view = self.arena_view(offset, nbytes)
        if nbytes == 0:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(view, dtype=dtype, count=nbytes // elsize)
        return t if shape is None else t.reshape(shape)

    def alloc(self, nbytes: int, align: int = 64) -> int:
        """Allocate nbytes of arena (creator side); returns the offset. MemoryError when full.
        Allocator metadata lives in process-local C memory, never in the shared segment."""
        if not self.is_creator:
            raise RingError("only the creator allocates arena space")
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 4096:
            raise ValueError(f"align must be a power of two <= 4096, got {align!r}")
        off: int = lib.fx_arena_alloc(self._live(), nbytes, align)
        if off == -1:
            raise MemoryError(
                f"arena full: cannot allocate {nbytes} bytes (align {align}); "
                f"{self.arena_free_bytes} bytes free, largest block "
                f"{lib.fx_arena_largest_free(self._s)}"
            )
        if off < 0:
            raise ValueError(f"bad allocation request nbytes={nbytes} align={align}")
        return off

    def free(self, offset: int) -> None:
        """Free an allocation; ValueError on a bad or double free."""
        if not isinstance(offset, int) or offset < 0 or lib.fx_arena_free(self._live(), offset) != 0:
            raise ValueError(f"free of arena offset {offset!r} that is not allocated")

    @property
    def arena_free_bytes(self) -> int:
        v: int = lib.fx_arena_free_bytes(self._live())
        return v

    @property
    def arena_free_blocks(self) -> int:
        v: int = lib.fx_arena_nfree_blocks(self._live())
        return v

    # ---- lifetime
    def close_notify(self) -> None:
        """Mark the segment closed in the header and wake every waiter (the peer sees PeerClosed)."""
        lib.fx_seg_close_notify(self._live())

    def close(self) -> None:
        """Unmap and close the fd. Idempotent. Arena views already handed out stay valid."""
        if self._closed:
            return
        self._closed = True
        for r in (self.sq, self.cq):
            r._detach()
        self._arena.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # live views: the mapping goes away with the last of them
            self._mm = None
        lib.fx_seg_close(self._s)
        self._s = None

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_PRIVATE = object()
