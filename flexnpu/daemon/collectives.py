"""Collectives executed where the data is: by the daemons that own the ranks' devices.

A communicator is created by its ranks (Op.COMM_INIT) with a 16-byte unique id the front end
agrees on through the torch.distributed store, the rank, the size and the daemon device of every
rank. Each daemon keeps one `Comm` per id for the ranks it serves (its *local* ranks); a client
names the communicators it joined by its own handles (per-client table), so it can only use those.

A collective (Op.COLLECTIVE) is a stream-ordered command. When it reaches the head of its stream
(everything before it has executed), it *arrives*: its buffers are resolved and checked and it is
recorded as rank r's part of instance k (the k-th collective that rank issued on the comm). When
every local rank's part of instance k is there, the instance is handed to the comm's worker thread:

* all ranks in this daemon: the worker reduces/copies directly between the ranks' allocations;
* ranks on several daemons of this host: the daemons exchange data through one shared segment per
  communicator (`ShmLink`): each daemon reduces its local ranks first, posts that into its slot,
  and reads the other daemons' slots, in chunks through two buffers per daemon (a pipeline). The
  data never passes through the client processes. All counters and flags in the segment are C11
  atomics in flexnpu/ring/coll.c.

The main loop never blocks on a collective: the command's `ready()` polls its instance, and the
worker rings the daemon's doorbell when it finishes. Failures make the communicator unusable
(like an aborted NCCL/HCCL communicator): a rank whose client exits, a peer daemon that dies, a
timeout, or ranks that disagree on the collective, its shape, dtype or reduction. Every rank then
gets a CollectiveError at its stream's next synchronization, within about a second.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import struct
from collections import deque
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import torch

from .. import protocol as P
from ..errors import BadState, CollectiveError, InvalidArgument, InvalidHandle, NotFound, PermissionDenied
from ..protocol import Op
from . import requests as R
from .objects import Cmd, StreamState, ready_buf

# The daemon (server.Daemon) and its sessions (session.Session) create and call this module, so
# it must not import them: they are typed loosely here to keep collectives below both.
Daemon = Any
Session = Any

log = logging.getLogger("flexnpu.daemon.collectives")


def _unlink_shm(name: str) -> None:
    """Remove a posix shared-memory name; one already gone is fine."""
    try:
        import posix_ipc  # type: ignore[import-not-found]  # C extension, ships no type stubs

        posix_ipc.unlink_shared_memory(name)
    except Exception:  # noqa: BLE001 - already gone
        pass


MAX_COMMS_PER_CLIENT = 256
MAX_COMMS = 1024
MAX_SHARED_COMMS = 64  # communicators spanning several daemons (each maps a shared segment)
MAX_PENDING_JOINS = 256  # joins by id alone whose device map is still being exchanged (a thread each)
MAX_PENDING_INSTANCES = 4096  # per communicator: collectives issued ahead of the slowest rank
DECODE_CACHE_MAX = 1024  # decoded collective payloads kept per daemon
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 24 * 3600.0
SLOT_BYTES = int(os.environ.get("FLEXNPU_COLL_SLOT", str(8 << 20)))  # one pipeline buffer
SPIN_NS = 50_000  # cross-daemon waits spin this long before sleeping on the futex
LIVENESS_SLICE_S = 0.05  # a waiting worker checks peer daemons this often
# Collectives this small (elements per rank) run in the main loop when nothing must wait: a thread
# hop costs more than the work. At most ATen's grain size, so their ops stay serial: an OpenMP
# parallel region entered from the loop's thread stalls for tens of ms on a loaded host.
INLINE_ELEMENTS = int(os.environ.get("FLEXNPU_COLL_INLINE", "32768"))
# The shared path may work through each chunk in pieces (FLEXNPU_COLL_PIECE elements; 32768 =
# ATen's grain size keeps every op on one core). Default: whole chunks, which measured faster here.
PIECE = int(os.environ.get("FLEXNPU_COLL_PIECE", str(1 << 40)))
# ... which spins this long for the other daemons' posts, then waits for them in the main loop
INLINE_WAIT_S = float(os.environ.get("FLEXNPU_COLL_INLINE_WAIT_US", "30")) * 1e-6
# A collective handed to a worker thread waits for the GIL while the main loop runs Python code:
# up to the interpreter's switch interval (5 ms by default), which dominated small-message latency
# on a loaded host (median 2-5 ms -> 0.9-1.6 ms for 4 KiB, see docs/collectives.md). Once a daemon
# runs collective workers it switches threads this often instead.
SWITCH_INTERVAL_S = float(os.environ.get("FLEXNPU_COLL_SWITCH_S", "0.0002"))

ALL_REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = range(len(P.COLL_KINDS))
SUM, AVG, PROD, MIN, MAX, BAND, BOR, BXOR = range(len(P.REDUCE_OPS))
_BITWISE = (BAND, BOR, BXOR)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ====================================================================== reductions
def _combine(op: int, acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc = acc (op) x, in place."""
    if x.device != acc.device:  # device allocations against the host segment (cuda/npu backends)
        x = x.to(acc.device)
    if op in (SUM, AVG):
        acc.add_(x) if acc.dtype != torch.bool else acc.logical_or_(x)
    elif op == PROD:
        acc.mul_(x) if acc.dtype != torch.bool else acc.logical_and_(x)
    elif op == MIN:
        torch.minimum(acc, x, out=acc)
    elif op == MAX:
        torch.maximum(acc, x, out=acc)
    elif op == BAND:
        acc.bitwise_and_(x)
    elif op == BOR:
        acc.bitwise_or_(x)
    else:
        acc.bitwise_xor_(x)


_BINARY: dict[int, Callable[..., torch.Tensor]] = {
    SUM: torch.add,
    AVG: torch.add,
    PROD: torch.mul,
    MIN: torch.minimum,
    MAX: torch.maximum,
    BAND: torch.bitwise_and,
    BOR: torch.bitwise_or,
    BXOR: torch.bitwise_xor,
}


def _reduce_into(op: int, out: torch.Tensor, xs: list[torch.Tensor]) -> None:
    """out = xs[0] (op) xs[1] (op) ... in this order, so every daemon gets the same bits. `out`
    may be xs[0] itself (in-place all_reduce) but no other x."""
    if len(xs) >= 2 and out.dtype != torch.bool and all(x.device == out.device for x in xs[:2]):
        _BINARY[op](xs[0], xs[1], out=out)  # one pass over both instead of a copy, then the op
        rest = xs[2:]
    else:
        if out.data_ptr() != xs[0].data_ptr():
            out.copy_(xs[0])
        rest = xs[1:]
    for x in rest:
        _combine(op, out, x)


def _finish(op: int, out: torch.Tensor, n: int) -> None:
    if op == AVG:
        out.div_(n)


def check_reduce(op: int, dtype: torch.dtype) -> None:
    if not 0 <= op < len(P.REDUCE_OPS):
        raise InvalidArgument(f"unknown reduce op code {op}")
    if op in _BITWISE and (dtype in _FLOATS or dtype.is_complex):
        raise InvalidArgument(f"{P.REDUCE_OPS[op]} needs an integer or bool dtype, not {dtype}")
    if op == AVG and dtype not in _FLOATS:
        raise InvalidArgument(f"avg needs a floating-point dtype, not {dtype}")
    if op in (MIN, MAX) and dtype.is_complex:
        raise InvalidArgument(f"{P.REDUCE_OPS[op]} is not defined for {dtype}")


# ====================================================================== instances
@dataclass(slots=True)
class Part:
    """One rank's part of a collective: its buffers (flat views) and what it asked for."""

    rank: int
    kind: int
    op: int
    root: int
    dtype: torch.dtype
    inp: torch.Tensor
    out: torch.Tensor

    def describe(self) -> str:
        return (
            f"{P.COLL_KINDS[self.kind]}(input {self.inp.numel()} x {str(self.dtype).replace('torch.', '')}"
            f", op {P.REDUCE_OPS[self.op]}, root {self.root})"
        )

    def key(self) -> tuple[int | torch.dtype, ...]:
        k: tuple[int | torch.dtype, ...] = (self.kind, self.dtype, self.inp.numel())
        if self.kind in (ALL_REDUCE, REDUCE_SCATTER):
            k += (self.op,)
        if self.kind == BROADCAST:
            k += (self.root,)
        return k


@dataclass(slots=True, eq=False)
class Instance:
    k: int
    deadline: float
    parts: dict[int, Part] = field(default_factory=dict)
    submitted: bool = False
    plan: Any = None  # set once the main thread has posted its first step
    done: bool = False
    error: str | None = None


# ====================================================================== the shared segment
_U64 = struct.Struct("<Q")
_DESC = struct.Struct("<QQQQQ")  # kind, op, root, dtype code, per-rank input elements
MAX_DAEMONS = 16  # devices one communicator may span (one host)
_H_MAGIC, _H_ATTACHED, _H_ABORT, _H_CLAIM, _H_BELL, _H_SLEEPERS, _H_MSG = 0, 128, 256, 384, 512, 640, 768
_MSG_BYTES = 1024
_BLOCKS = 2048  # per daemon: pid, posted, consumed, one 128-byte line each
_BLOCK = 384
_DATA = 32768  # page-aligned start of the buffers
_BUF_HEAD = 128  # each buffer starts with its step's descriptor
SHM_MAGIC = 0x4C4C4F43504E5846  # "FXNPCOLL"


def shm_name(comm_id: bytes) -> str:
    return "/flexnpu-coll-" + comm_id.hex()


class ShmLink:
    """This daemon's view of a communicator's shared segment: D daemons, two buffers each.

    The segment is created by whichever daemon opens it first (posix shm, mode 0600) and its name
    is unlinked as soon as every daemon has mapped it, so nothing is left in /dev/shm."""

    def __init__(self, comm_id: bytes, n_daemons: int, me: int, slot: int) -> None:
        import posix_ipc

        from ..ring._core import ffi, lib

        self.lib, self.ffi = lib, ffi
        self.n, self.me, self.slot = n_daemons, me, slot
        self.size = _DATA + n_daemons * 2 * slot
        self.name = shm_name(comm_id)
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
        try:
            st = os.fstat(shm.fd)
            if st.st_size == 0:
                os.ftruncate(shm.fd, self.size)
            elif st.st_size != self.size:
                raise CollectiveError(
                    f"communicator segment {self.name} has {st.st_size} bytes, expected "
                    f"{self.size}: the daemons disagree about the communicator"
                )
            self.mm = mmap.mmap(shm.fd, self.size)
        finally:
            shm.close_fd()
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.base = self.buf.data_ptr()
        self._offs_posted = ffi.new("uint32_t[]", [self._blk(d) + 128 for d in range(n_daemons) if d != me])
        self._offs_consumed = ffi.new("uint32_t[]", [self._blk(d) + 256 for d in range(n_daemons) if d != me])
        self._npeers = n_daemons - 1
        lib.fx_shm_store(self.base + self._blk(me), os.getpid())
        lib.fx_shm_store(self.base + _H_MAGIC, SHM_MAGIC)
        if lib.fx_shm_fetch_add(self.base + _H_ATTACHED, 1) + 1 == n_daemons:
            self.unlink()
        self.step = 0

    @staticmethod
    def _blk(d: int) -> int:
        return _BLOCKS + d * _BLOCK

    def unlink(self) -> None:
        _unlink_shm(self.name)

    def close(self) -> None:
        self.unlink()
        try:
            del self.buf
            self.mm.close()
        except Exception:  # noqa: BLE001 - views of it may still exist; the mapping dies with them
            pass

    # -- words ---------------------------------------------------------------------------------
    def peer_pids(self) -> list[int]:
        return [self.lib.fx_shm_load(self.base + self._blk(d)) for d in range(self.n) if d != self.me]

    def aborted(self) -> str | None:
        if not self.lib.fx_shm_load(self.base + _H_ABORT):
            return None
        raw = bytes(self.mm[_H_MSG : _H_MSG + _MSG_BYTES]).split(b"\0", 1)[0]
        return raw.decode(errors="replace") or "aborted by another daemon"

    def abort(self, why: str) -> None:
        """First reason wins; it is written before the flag is released."""
        if self.lib.fx_shm_cas(self.base + _H_CLAIM, 0, 1):
            data = why.encode()[: _MSG_BYTES - 1] + b"\0"
            self.mm[_H_MSG : _H_MSG + len(data)] = data
        self.lib.fx_coll_post(self.base + _H_ABORT, 1, self.base + _H_BELL, self.base + _H_SLEEPERS)

    def _post(self, word: int, v: int) -> None:
        self.lib.fx_coll_post(
            self.base + self._blk(self.me) + word, v, self.base + _H_BELL, self.base + _H_SLEEPERS
        )

    def _wait(self, offs: Any, target: int, deadline: float, alive: Callable[[], str | None]) -> None:
        lib = self.lib
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveError("collective timed out waiting for another device's daemon")
            rc = lib.fx_coll_wait(
                self.base,
                offs,
                self._npeers,
                target,
                self.base + _H_ABORT,
                self.base + _H_BELL,
                self.base + _H_SLEEPERS,
                min(left, LIVENESS_SLICE_S),
                SPIN_NS,
            )
            if rc == 1:
                return
            if rc == lib.FX_COLL_ABORTED:
                raise CollectiveError(self.aborted() or "communicator aborted")
            why = alive()
            if why:
                raise CollectiveError(why)

    # -- one pipeline step ---------------------------------------------------------------------
    def buffer(self, d: int, step: int) -> torch.Tensor:
        off = _DATA + (d * 2 + step % 2) * self.slot
        return self.buf[off + _BUF_HEAD : off + self.slot]

    def desc(self, d: int, step: int) -> bytes:
        off = _DATA + (d * 2 + step % 2) * self.slot
        return bytes(self.mm[off : off + _DESC.size])

    def ready_for(self, step: int) -> bool:
        """May this daemon write its buffer of `step` now (no waiting)?"""
        if step <= 2:
            return True
        rc: int = self.lib.fx_coll_wait(
            self.base,
            self._offs_consumed,
            self._npeers,
            step - 2,
            self.base + _H_ABORT,
            self.base + _H_BELL,
            self.base + _H_SLEEPERS,
            0.0,
            0,
        )
        return rc == 1

    def peers_posted(self, step: int, spin_s: float) -> bool:
        rc: int = self.lib.fx_coll_wait(
            self.base,
            self._offs_posted,
            self._npeers,
            step,
            self.base + _H_ABORT,
            self.base + _H_BELL,
            self.base + _H_SLEEPERS,
            spin_s,
            int(spin_s * 1e9),
        )
        return rc == 1

    def begin(self, step: int, deadline: float, alive: Callable[[], str | None]) -> torch.Tensor:
        """Wait until every peer has read what this daemon posted two steps ago (same buffer)."""
        if step > 2:
            self._wait(self._offs_consumed, step - 2, deadline, alive)
        return self.buffer(self.me, step)

    def post(self, step: int, desc: bytes | None) -> None:
        if desc is not None:
            off = _DATA + (self.me * 2 + step % 2) * self.slot
            self.mm[off : off + len(desc)] = desc
        self._post(128, step)

    def gather(self, step: int, deadline: float, alive: Callable[[], str | None]) -> None:
        self._wait(self._offs_posted, step, deadline, alive)

    def consumed(self, step: int) -> None:
        self._post(256, step)


# ====================================================================== the device-map rendezvous
_R_MAGIC, _R_SIZE, _R_COUNT, _R_BELL, _R_SLEEPERS, _R_ABORT, _R_CLAIM, _R_POKE = (
    0,
    128,
    256,
    384,
    512,
    640,
    768,
    896,
)
_R_MSG, _R_SLOTS = 1024, 4096
RDV_BYTES = _R_SLOTS + 8 * P.MAX_COMM_SIZE
RDV_MAGIC = 0x5644524C4C4F4358  # "XCOLLRDV"


def rdv_name(comm_id: bytes) -> str:
    return "/flexnpu-rdv-" + comm_id.hex()


class Rendezvous:
    """Where the daemons of a communicator learn its rank -> device map when the ranks only share
    a root info (the native HcclCommInitRootInfo: 16 bytes, no store to exchange devices through).

    One host segment per communicator id (posix shm, mode 0600, fixed size): each daemon claims
    the slot of each rank it serves (compare-and-swap: a rank is claimed once), the size word
    (first writer sets it, the others must agree), and counts the joins; the daemon whose join
    completes the count unlinks the name (every rank's daemon has mapped it by then). A waiting
    daemon does not block: a small thread sleeps on the segment's futex and rings the daemon's
    doorbell when the map is complete, aborted or late; the first collective resolves it."""

    def __init__(self, comm_id: bytes, size: int, rank: int, device: int, deadline: float) -> None:
        import posix_ipc

        from ..ring._core import ffi, lib

        self.lib, self.ffi = lib, ffi
        self.id, self.size, self.rank, self.deadline = comm_id, size, rank, deadline
        self.name = rdv_name(comm_id)
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
        try:
            st = os.fstat(shm.fd)
            if st.st_size == 0:
                os.ftruncate(shm.fd, RDV_BYTES)
            elif st.st_size != RDV_BYTES:
                raise InvalidArgument(
                    f"rendezvous segment {self.name} has {st.st_size} bytes, not {RDV_BYTES}"
                )
            self.mm: mmap.mmap | None = mmap.mmap(shm.fd, RDV_BYTES)
        finally:
            shm.close_fd()
        self._view = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.base = self._view.data_ptr()
        self._offs = ffi.new("uint32_t[]", [_R_COUNT])
        self._cancel = self._watching = False
        self._lock = threading.Lock()
        try:
            lib.fx_shm_cas(self.base + _R_MAGIC, 0, RDV_MAGIC)
            if lib.fx_shm_load(self.base + _R_MAGIC) != RDV_MAGIC:
                raise InvalidArgument(f"rendezvous segment {self.name} is not one")
            lib.fx_shm_cas(self.base + _R_SIZE, 0, size)
            theirs = lib.fx_shm_load(self.base + _R_SIZE)
            if theirs != size:
                raise InvalidArgument(
                    f"communicator {comm_id.hex()[:8]}: this rank was created with {size} ranks, "
                    f"another with {theirs}"
                )
            if self.aborted():
                raise CollectiveError(f"communicator {comm_id.hex()[:8]} was aborted: {self.aborted()}")
            if not lib.fx_shm_cas(self.base + _R_SLOTS + 8 * rank, 0, device + 1):
                raise PermissionDenied(f"rank {rank} of communicator {comm_id.hex()[:8]} was already joined")
            if lib.fx_shm_fetch_add(self.base + _R_COUNT, 1) + 1 >= size:
                self.unlink()
            lib.fx_coll_post(self.base + _R_POKE, 1, self.base + _R_BELL, self.base + _R_SLEEPERS)
        except BaseException:
            self.close()
            raise

    def complete(self) -> bool:
        return self.mm is not None and self.lib.fx_shm_load(self.base + _R_COUNT) >= self.size

    def aborted(self) -> str | None:
        if self.mm is None or not self.lib.fx_shm_load(self.base + _R_ABORT):
            return None
        raw = bytes(self.mm[_R_MSG : _R_MSG + _MSG_BYTES]).split(b"\0", 1)[0]
        return raw.decode(errors="replace") or "aborted"

    def devmap(self) -> tuple[int, ...]:
        vals = struct.unpack_from(f"<{self.size}Q", self.mm or b"", _R_SLOTS)
        if any(v == 0 or v > 1 << 32 for v in vals):
            raise CollectiveError("communicator rendezvous incomplete")
        return tuple(v - 1 for v in vals)

    def abort(self, why: str) -> None:
        if self.mm is None:
            return
        if self.lib.fx_shm_cas(self.base + _R_CLAIM, 0, 1):
            data = why.encode()[: _MSG_BYTES - 1] + b"\0"
            self.mm[_R_MSG : _R_MSG + len(data)] = data
        self.lib.fx_coll_post(self.base + _R_ABORT, 1, self.base + _R_BELL, self.base + _R_SLEEPERS)
        self.unlink()

    def watch(self, wake: Callable[[], None]) -> None:
        """Ring `wake` once the map is complete, aborted or past the deadline (a thread; the
        mapping is released by whichever of it and close() comes last)."""

        def run() -> None:
            try:
                while not self._cancel:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        break
                    rc = self.lib.fx_coll_wait(
                        self.base,
                        self._offs,
                        1,
                        self.size,
                        self.base + _R_ABORT,
                        self.base + _R_BELL,
                        self.base + _R_SLEEPERS,
                        min(left, 0.25),
                        0,
                    )
                    if rc != 0:
                        break
                if not self._cancel:
                    wake()
            finally:
                with self._lock:
                    self._watching = False
                    if self._cancel:
                        self._release()

        with self._lock:
            self._watching = True
        threading.Thread(target=run, name=f"flexnpu-rdv-{self.id.hex()[:8]}", daemon=True).start()

    def unlink(self) -> None:
        _unlink_shm(self.name)

    def close(self) -> None:
        """Done with it (resolved, failed, or the rank left)."""
        if self.mm is not None and (time.monotonic() > self.deadline or self.aborted()):
            self.unlink()  # nobody completes it any more
        with self._lock:
            self._cancel = True
            if not self._watching:
                self._release()

    def _release(self) -> None:
        if self.mm is None:
            return
        mm, self.mm = self.mm, None
        try:
            del self._view
            mm.close()
        except Exception:  # noqa: BLE001 - a view may still exist; the mapping dies with it
            pass


# ====================================================================== the communicator
class Comm:
    """One communicator as seen by one daemon: its local ranks, their instances, its worker."""

    def __init__(
        self, colls: Collectives, comm_id: bytes, size: int, devmap: tuple[int, ...], timeout_s: float
    ) -> None:
        self.colls = colls
        self.id = comm_id
        self.size = size
        self.devmap = devmap
        self.timeout_s = timeout_s
        dev = colls.daemon.device
        self.daemons = sorted(set(devmap))
        self.me = self.daemons.index(dev)
        self.ranks_of = [[r for r in range(size) if devmap[r] == d] for d in self.daemons]
        self.local = self.ranks_of[self.me]
        self.members: dict[int, tuple[int, int]] = {}  # rank -> (client id, pid)
        self.next_k: dict[int, int] = dict.fromkeys(self.local, 0)
        self.instances: dict[int, Instance] = {}
        self.error: str | None = None
        self.link: ShmLink | None = None
        self._link_lock = threading.Lock()
        self._q: queue.SimpleQueue[Instance | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.done_count = 0
        # One-step collectives the main loop posted whose peers had not posted yet: the loop
        # keeps them (no thread hop) and sleeps on the segment's bell as well as on its rings.
        self.waiting: Instance | None = None
        self._watched = 0  # the bell's address while the daemon's doorbell watches it
        self._next_liveness = 0.0
        self._backlog: deque[Instance] = deque()  # submitted while an earlier one still runs
        self._to_worker = 0  # instances handed to the worker (main thread counts) ...
        self._worker_done = 0  # ... and those it finished (worker counts): one writer each

    @property
    def label(self) -> str:
        return f"communicator {self.id.hex()[:8]}"

    # -- main thread ---------------------------------------------------------------------------
    def arrive(self, part: Part) -> Instance:
        r = part.rank
        k = self.next_k[r]
        self.next_k[r] = k + 1
        inst = self.instances.get(k)
        if inst is None:
            if len(self.instances) >= MAX_PENDING_INSTANCES:
                raise BadState(f"{self.label}: {MAX_PENDING_INSTANCES} collectives wait for a slower rank")
            inst = self.instances[k] = Instance(k, time.monotonic() + self.timeout_s)
        inst.parts[r] = part
        if self.error is not None:
            self._fail(inst, self.error)
        elif len(inst.parts) == len(self.local):
            first = inst.parts[self.local[0]]
            for p in inst.parts.values():
                if p.key() != first.key():
                    self.abort(
                        f"ranks disagree on collective #{k}: rank {first.rank} called "
                        f"{first.describe()}, rank {p.rank} called {p.describe()}"
                    )
                    return inst
            inst.submitted = True
            if self.waiting is not None or self._backlog:
                self._backlog.append(inst)  # collectives of one communicator run in order
            else:
                self._start(inst)
        return inst

    def _start(self, inst: Instance) -> None:
        """Run a submitted instance: here in the loop when it is small and nothing of this
        communicator is in the worker, else in the worker (in order behind what it has)."""
        first = inst.parts[self.local[0]]
        if self._to_worker == self._worker_done and first.inp.numel() <= INLINE_ELEMENTS:
            r = self.try_inline(inst)
            if r is True:
                inst.done = True
                self.done_count += 1
                return
            if r is None:
                self.waiting = inst
                return
        self._to_worker += 1
        self._start_worker()
        self._q.put(inst)

    def _poll_waiting(self, inst: Instance) -> None:
        """Main thread: has the instance this loop posted seen every peer's post? Then read,
        finish, and start what waits behind it. Bounded like the worker's waits: the deadline,
        an abort, and the peer daemons' liveness every LIVENESS_SLICE_S."""
        plan = inst.plan
        link = plan.link
        try:
            if not link.peers_posted(link.step, 0.0):
                why = link.aborted() or self.error
                now = time.monotonic()
                if why is None and now > inst.deadline:
                    why = "collective timed out waiting for another device's daemon"
                if why is None and now >= self._next_liveness:
                    self._next_liveness = now + LIVENESS_SLICE_S
                    why = self._alive()
                if why is None:
                    return
                raise CollectiveError(why)
            plan.read(0, link.step)
            link.consumed(link.step)
        except Exception as e:  # noqa: BLE001 - as in the worker
            self._failed(inst, e)
        self._end_wait()
        inst.done = True
        self.done_count += 1
        while self._backlog and self.waiting is None:
            nxt = self._backlog.popleft()
            self._start(nxt)
            if nxt.done:  # finished at once: its ranks' commands see it at their next poll
                self.colls.wake()

    def _end_wait(self) -> None:
        self.waiting = None
        if self._watched:
            self.colls.unwatch(self._watched)
            self._watched = 0

    def poll(self, inst: Instance) -> bool:
        """Has this instance finished (done or failed)? Checks deadlines of local waits."""
        if inst is self.waiting:
            self._poll_waiting(inst)
        if inst.done:
            self.instances.pop(inst.k, None)
            return True
        if inst.submitted:
            return False  # the worker finishes it, bounded by its deadline and peer checks
        if self.error is not None:
            self._fail(inst, self.error)
            return True
        if self.link is not None:
            why = self.link.aborted()
            if why:
                self.abort(why)
                return True
        if time.monotonic() > inst.deadline:
            missing = sorted(set(self.local) - set(inst.parts))
            self.abort(
                f"{self.label}: collective #{inst.k} timed out after {self.timeout_s:g} s "
                f"waiting for rank(s) {missing} to call it"
            )
            return True
        return False

    def abort(self, why: str) -> None:
        """Fail every pending collective of this communicator, here and in the other daemons."""
        if self.error is None:
            self.error = why
            log.warning("%s aborted: %s", self.label, why)
        if len(self.daemons) > 1:
            try:
                self._ensure_link().abort(why)  # the other daemons' ranks must hear it too
            except Exception as e:  # noqa: BLE001 - they will time out instead
                log.warning("%s: cannot tell the other devices: %s", self.label, e)
        for inst in list(self.instances.values()):
            if not inst.submitted:
                self._fail(inst, self.error)

    def _fail(self, inst: Instance, why: str) -> None:
        if not inst.done:
            inst.error = why
            inst.done = True
            self.instances.pop(inst.k, None)

    def leave(self, rank: int) -> None:
        self.members.pop(rank, None)

    def close(self) -> None:
        if self.waiting is not None:  # its ranks are gone (the communicator closes with them)
            self._fail(self.waiting, self.error or f"{self.label} closed")
        self._end_wait()  # before the segment can be unmapped
        if self._thread is not None:
            self._q.put(None)
        elif self.link is not None:
            self.link.close()

    # -- worker thread -------------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self._thread is None:
            if 0 < SWITCH_INTERVAL_S < sys.getswitchinterval():
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(
                target=self._work, name=f"flexnpu-coll-{self.id.hex()[:8]}", daemon=True
            )
            self._thread.start()

    def _work(self) -> None:
        while True:
            inst = self._q.get()
            if inst is None:
                break
            try:
                # Submitted means every local part is here (their buffers are held by the parts), so
                # it runs even if the communicator failed since: the peers' waits decide.
                if len(self.daemons) == 1:
                    self._run_local(inst)
                elif inst.plan is not None:
                    self._run_shared(inst, inst.plan, first=1)  # the main thread posted step 1
                else:
                    self._run_shared(inst)
            except Exception as e:  # noqa: BLE001 - every failure becomes the ranks' error
                self._failed(inst, e)
            inst.done = True
            self.done_count += 1
            self._worker_done += 1
            self.colls.wake()
        if self.link is not None:
            self.link.close()

    def _parts(self, inst: Instance) -> list[Part]:
        return [inst.parts[r] for r in self.local]

    def _run_local(self, inst: Instance) -> None:
        """Every rank is served by this daemon: move data directly between their allocations."""
        parts = self._parts(inst)
        p0 = parts[0]
        n = self.size
        kind, op = p0.kind, p0.op
        by_rank = {p.rank: p for p in parts}
        if kind == ALL_REDUCE:
            _reduce_into(op, p0.out, [p.inp for p in parts])
            _finish(op, p0.out, n)
            for p in parts[1:]:
                p.out.copy_(p0.out)
        elif kind == BROADCAST:
            src = by_rank[p0.root].inp
            for p in parts:
                if p.rank != p0.root:
                    p.out.copy_(src)
                elif p.out.data_ptr() != src.data_ptr():
                    p.out.copy_(src)
        elif kind == ALL_GATHER:
            m = p0.inp.numel()
            for p in parts:
                for q in parts:
                    dst = p.out[q.rank * m : (q.rank + 1) * m]
                    if dst.data_ptr() != q.inp.data_ptr():
                        dst.copy_(q.inp)
        elif kind == REDUCE_SCATTER:
            m = p0.out.numel()
            # Reduce into a temporary first: an output may alias its own rank's input.
            res = [torch.empty_like(p.out) for p in parts]
            for i, p in enumerate(parts):
                _reduce_into(op, res[i], [q.inp[p.rank * m : (p.rank + 1) * m] for q in parts])
                _finish(op, res[i], n)
            for i, p in enumerate(parts):
                p.out.copy_(res[i])
        elif kind == ALL_TO_ALL:
            m = p0.inp.numel() // n
            for p in parts:
                for q in parts:
                    p.out[q.rank * m : (q.rank + 1) * m].copy_(q.inp[p.rank * m : (p.rank + 1) * m])

    def _alive(self) -> str | None:
        if self.error is not None:
            return self.error
        link = self.link
        for pid in link.peer_pids() if link is not None else ():
            if pid and not _pid_alive(int(pid)):
                return f"{self.label}: the daemon of another device (pid {pid}) died"
        return None

    def _ensure_link(self) -> ShmLink:
        with self._link_lock:  # the main thread (abort, fast path) and the worker both may
            if self.link is None:
                self.link = ShmLink(self.id, len(self.daemons), self.me, SLOT_BYTES)
            return self.link

    def _plan(self, inst: Instance) -> _Plan:
        return _Plan(self, inst, self._ensure_link())

    def _run_shared(self, inst: Instance, plan: _Plan | None = None, first: int = 0) -> None:
        """Ranks on several daemons: exchange chunks through the shared segment. With `first`
        = 1 the first step was already posted (by the main thread's fast path)."""
        plan = plan or self._plan(inst)
        link, deadline, alive = plan.link, inst.deadline, self._alive
        for c in range(plan.steps):
            if c >= first:
                link.step += 1
                link.begin(link.step, deadline, alive)
                plan.post(c, link.step)
            link.gather(link.step, deadline, alive)
            plan.read(c, link.step)
            link.consumed(link.step)

    def try_inline(self, inst: Instance) -> bool | None:
        """Main thread, small collectives: run the instance here (a thread hop costs more than
        the work). True if it finished; None if it posted and now waits for the other daemons'
        posts in the loop (`waiting`); False if the worker must take it (from the start, or
        after the post if `inst.plan` is set)."""
        try:
            if len(self.daemons) == 1:
                self._run_local(inst)
                return True
            plan = self._plan(inst)
            link = plan.link
            if plan.steps != 1 or not link.ready_for(link.step + 1):
                return False
            link.step += 1
            plan.post(0, link.step)
            inst.plan = plan
            if not link.peers_posted(link.step, INLINE_WAIT_S):
                bell = link.base + _H_BELL
                if not self.colls.watch(bell, link.base + _H_SLEEPERS):
                    return False  # the doorbell watches enough segments: the worker waits
                self._watched = bell
                # a post after the spin but before the watch took its snapshot is seen here
                if not link.peers_posted(link.step, 0.0):
                    self._next_liveness = time.monotonic() + LIVENESS_SLICE_S
                    return None
                self._end_wait()
            plan.read(0, link.step)
            link.consumed(link.step)
            return True
        except Exception as e:  # noqa: BLE001 - as in the worker
            self._failed(inst, e)
            return True

    def _failed(self, inst: Instance, e: BaseException) -> None:
        why = str(e) if isinstance(e, CollectiveError) else f"{type(e).__name__}: {e}"
        if self.error is None:
            self.error = why
            log.warning("%s aborted: %s", self.label, why)
        if self.link is not None:
            self.link.abort(why)
        inst.error = self.error


class _Plan:
    """How one instance moves through the shared segment: chunk size, descriptor, roles."""

    def __init__(self, comm: Comm, inst: Instance, link: ShmLink) -> None:
        self.comm, self.inst, self.link = comm, inst, link  # link: comm.link, which is set by now
        self.parts = parts = comm._parts(inst)
        p0 = self.p0 = parts[0]
        self.kind, self.op, self.n = p0.kind, p0.op, comm.size
        self.isz = p0.dtype.itemsize
        self.m = m = p0.inp.numel()  # per-rank input elements
        kind = self.kind
        self.pieces = max(len(r) for r in comm.ranks_of) if kind in (ALL_GATHER, ALL_TO_ALL) else 1
        cap = (link.slot - _BUF_HEAD) // (self.isz * self.pieces)  # elements per piece per step
        self.cap = cap = max(1, cap - cap % 64) if cap > 64 else max(1, cap)
        self.steps = max(1, -(-m // cap))
        self.desc = _DESC.pack(
            kind,
            self.op if kind in (ALL_REDUCE, REDUCE_SCATTER) else 0,
            p0.root if kind == BROADCAST else 0,
            P.DTYPE_NAMES.index(str(p0.dtype)[6:]),
            m,
        )
        self.root_d = comm.daemons.index(comm.devmap[p0.root]) if kind == BROADCAST else -1
        self.src = None
        if kind == BROADCAST and self.root_d == comm.me:
            self.src = inst.parts[p0.root].inp
            for p in parts:
                if p.out.data_ptr() != self.src.data_ptr():
                    p.out.copy_(self.src)

    def _view(self, raw: torch.Tensor) -> torch.Tensor:
        return raw[: self.pieces * self.cap * self.isz].view(self.p0.dtype)

    def post(self, c: int, t: int) -> None:
        """Write this daemon's contribution for chunk c into its buffer of step t; publish it."""
        link, cap = self.link, self.cap
        lo, hi = c * cap, min(self.m, (c + 1) * cap)
        mine = self._view(link.buffer(link.me, t))
        for a in range(lo, hi, PIECE):
            self._post_range(mine, a, min(hi, a + PIECE), lo)
        link.post(t, self.desc if c == 0 else None)

    def _post_range(self, mine: torch.Tensor, lo: int, hi: int, base: int) -> None:
        kind, parts, cap = self.kind, self.parts, self.cap
        if kind in (ALL_REDUCE, REDUCE_SCATTER):
            _reduce_into(self.op, mine[lo - base : hi - base], [p.inp[lo:hi] for p in parts])
        elif kind == BROADCAST:
            if self.src is not None:
                mine[lo - base : hi - base].copy_(self.src[lo:hi])
        else:
            for j, p in enumerate(parts):
                mine[j * cap + lo - base : j * cap + hi - base].copy_(p.inp[lo:hi])

    def read(self, c: int, t: int) -> None:
        """Every daemon posted chunk c (step t): check agreement, read into the local outputs."""
        comm, link, cap = self.comm, self.link, self.cap
        lo, hi = c * cap, min(self.m, (c + 1) * cap)
        if c == 0:
            for d in range(len(comm.daemons)):
                if d != comm.me and link.desc(d, t) != self.desc:
                    theirs = _DESC.unpack(link.desc(d, t))
                    raise CollectiveError(
                        f"ranks disagree on collective #{self.inst.k}: device {comm.daemons[comm.me]}'s ranks "
                        f"called {_desc_text(_DESC.unpack(self.desc))}, device {comm.daemons[d]}'s ranks called "
                        f"{_desc_text(theirs)}"
                    )
        bufs = [self._view(link.buffer(d, t)) for d in range(len(comm.daemons))]
        for a in range(lo, hi, PIECE):
            self._read_range(bufs, a, min(hi, a + PIECE), lo)

    def _read_range(self, bufs: list[torch.Tensor], lo: int, hi: int, base: int) -> None:
        comm, kind, parts, cap, m, op, n = self.comm, self.kind, self.parts, self.cap, self.m, self.op, self.n
        if kind == ALL_REDUCE:
            out0 = self.p0.out[lo:hi]
            _reduce_into(op, out0, [b[lo - base : hi - base] for b in bufs])
            _finish(op, out0, n)
            for p in parts[1:]:
                p.out[lo:hi].copy_(out0)
        elif kind == REDUCE_SCATTER:
            mo = self.p0.out.numel()
            for p in parts:
                a, b = max(lo, p.rank * mo), min(hi, (p.rank + 1) * mo)
                if a < b:
                    dst = p.out[a - p.rank * mo : b - p.rank * mo]
                    _reduce_into(op, dst, [x[a - base : b - base] for x in bufs])
                    _finish(op, dst, n)
        elif kind == BROADCAST:
            if self.root_d != comm.me:
                for p in parts:
                    p.out[lo:hi].copy_(bufs[self.root_d][lo - base : hi - base])
        elif kind == ALL_GATHER:
            for d, ranks in enumerate(comm.ranks_of):
                for j, g in enumerate(ranks):
                    piece = bufs[d][j * cap + lo - base : j * cap + hi - base]
                    for p in parts:
                        p.out[g * m + lo : g * m + hi].copy_(piece)
        else:  # ALL_TO_ALL: rank p's block g = rank g's block p
            mb = m // n
            for d, ranks in enumerate(comm.ranks_of):
                for j, g in enumerate(ranks):
                    for p in parts:
                        a, b = max(lo, p.rank * mb), min(hi, (p.rank + 1) * mb)
                        if a < b:
                            p.out[g * mb + a - p.rank * mb : g * mb + b - p.rank * mb].copy_(
                                bufs[d][j * cap + a - base : j * cap + b - base]
                            )


def _desc_text(d: tuple[int, ...]) -> str:
    kind, op, root, dt, m = d
    name = P.COLL_KINDS[kind] if kind < len(P.COLL_KINDS) else f"kind {kind}"
    dtn = P.DTYPE_NAMES[dt] if dt < len(P.DTYPE_NAMES) else f"dtype {dt}"
    return f"{name}(input {m} x {dtn}, op {P.REDUCE_OPS[op] if op < len(P.REDUCE_OPS) else op}, root {root})"


def _timeout_s(timeout_ms: int) -> float:
    return min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, timeout_ms / 1000.0))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ====================================================================== the daemon's registry
@dataclass(slots=True)
class Membership:
    """A client's handle to a communicator. `comm` is None while the device map is still being
    exchanged (`rdv`, a join with the id alone): the first collective resolves it."""

    comm: Comm | None
    rank: int
    size: int = 0
    rdv: Rendezvous | None = None
    timeout_ms: int = 0
    error: str | None = None  # the exchange failed: every collective on the handle does

    def resolved(self) -> Comm:
        assert self.comm is not None, "resolve the rendezvous first"
        return self.comm


class Collectives:
    """All communicators of one daemon, and each client's handles to the ones it joined."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.comms: dict[bytes, Comm] = {}
        self.clients: dict[int, dict[int, Membership]] = {}  # client id -> handle -> membership
        self.pending = 0  # joins whose device map is still being exchanged (Rendezvous)
        self._decoded: dict[bytes, tuple[P.TensorRef, P.TensorRef]] = {}
        self.watching = 0  # communicators whose collective the main loop waits for (see Comm.waiting)

    def wake(self) -> None:
        """From a worker thread: let the main loop look at finished collectives."""
        self.daemon._doorbell.ring()

    def decode(self, payload: bytes) -> tuple[P.TensorRef, P.TensorRef]:
        """A collective's payload -> its (input, output) references, checked. A pure function of
        the bytes, so it is cached by them: a program repeats the same few collectives."""
        got = self._decoded.get(payload)
        if got is not None:
            return got
        try:
            launch = P.decode_launch(payload, self.daemon.backend.device)
        except P.DecodeError as e:
            raise InvalidArgument(f"malformed collective: {e}") from None
        if (
            len(launch.args) != 2
            or not all(isinstance(x, P.TensorRef) for x in launch.args)
            or launch.kwargs
            or launch.outputs
        ):
            raise InvalidArgument("a collective takes exactly an input and an output tensor")
        iref, oref = launch.args
        if iref.dtype != oref.dtype:
            raise InvalidArgument(f"collective input is {iref.dtype} but output is {oref.dtype}")
        if len(self._decoded) >= DECODE_CACHE_MAX:
            self._decoded.clear()
        got = self._decoded[payload] = (iref, oref)
        return got

    # Main thread only (the doorbell's watch list belongs to the thread that waits on it).
    def watch(self, bell: int, sleepers: int) -> bool:
        if not self.daemon._doorbell.watch(bell, sleepers):
            return False
        self.watching += 1
        return True

    def unwatch(self, bell: int) -> None:
        self.daemon._doorbell.unwatch(bell)
        self.watching -= 1

    def join(self, s: Session, handle: int, rank: int, size: int, timeout_ms: int, payload: bytes) -> None:
        mine = self.clients.setdefault(s.cid, {})
        if not 0 < handle < 1 << 32 or handle in mine:
            raise InvalidHandle(f"communicator handle {handle} invalid or in use")
        if len(mine) >= MAX_COMMS_PER_CLIENT:
            raise InvalidArgument(f"too many communicators in this client (limit {MAX_COMMS_PER_CLIENT})")
        if not 1 <= size <= P.MAX_COMM_SIZE:
            raise InvalidArgument(f"communicator size {size} out of range 1..{P.MAX_COMM_SIZE}")
        if not 0 <= rank < size:
            raise InvalidArgument(f"rank {rank} out of range for a communicator of {size}")
        if len(payload) == P.COMM_ID_BYTES:
            # The id alone (the native HcclCommInitRootInfo): the daemons exchange the device map
            # among themselves; the first collective waits for it (this call never blocks).
            comm_id = bytes(payload)
            if len(self.comms) + self.pending >= MAX_COMMS:
                raise InvalidArgument(f"too many communicators on this device (limit {MAX_COMMS})")
            if self.pending >= MAX_PENDING_JOINS:
                raise InvalidArgument(
                    f"too many communicators on this device wait for their first collective "
                    f"(limit {MAX_PENDING_JOINS})"
                )
            known = self.comms.get(comm_id)
            if known is not None and rank in known.members:
                raise PermissionDenied(f"rank {rank} of {known.label} was already joined")
            deadline = time.monotonic() + _timeout_s(timeout_ms)
            rdv = Rendezvous(comm_id, size, rank, self.daemon.device, deadline)
            mine[handle] = Membership(None, rank, size, rdv, timeout_ms)
            self.pending += 1
            rdv.watch(self.wake)
            return
        if len(payload) != P.COMM_ID_BYTES + 4 * size:
            raise InvalidArgument(
                "communicator init: payload must be a 16-byte id and one u32 device per rank, or the id alone"
            )
        comm_id = bytes(payload[: P.COMM_ID_BYTES])
        devmap = struct.unpack(f"<{size}I", payload[P.COMM_ID_BYTES :])
        mine[handle] = Membership(self._enter(s, comm_id, rank, size, tuple(devmap), timeout_ms), rank, size)

    def _enter(
        self, s: Session, comm_id: bytes, rank: int, size: int, devmap: tuple[int, ...], timeout_ms: int
    ) -> Comm:
        """Join rank `rank` to the communicator with this id and device map (creating it here)."""
        if devmap[rank] != self.daemon.device:
            raise PermissionDenied(
                f"rank {rank} of this communicator belongs to device {devmap[rank]}, "
                f"not to device {self.daemon.device} that this client is attached to"
            )
        if len(set(devmap)) > MAX_DAEMONS:
            raise InvalidArgument(f"a communicator may span at most {MAX_DAEMONS} devices")
        timeout = _timeout_s(timeout_ms)
        comm = self.comms.get(comm_id)
        if comm is None:
            if len(self.comms) >= MAX_COMMS:
                raise InvalidArgument(f"too many communicators on this device (limit {MAX_COMMS})")
            if (
                len(set(devmap)) > 1
                and sum(len(c.daemons) > 1 for c in self.comms.values()) >= MAX_SHARED_COMMS
            ):
                # each maps a host shared segment of 2 x FLEXNPU_COLL_SLOT bytes per device
                raise InvalidArgument(
                    f"too many communicators spanning devices on this device (limit {MAX_SHARED_COMMS})"
                )
            comm = Comm(self, comm_id, size, tuple(devmap), timeout)
            self.comms[comm_id] = comm
        elif comm.size != size or comm.devmap != tuple(devmap):
            raise InvalidArgument(
                f"{comm.label} exists with {comm.size} ranks on devices {list(comm.devmap)}; "
                f"this rank was created with {size} ranks on devices {list(devmap)}"
            )
        if rank in comm.members:
            raise PermissionDenied(
                f"rank {rank} of {comm.label} was already joined (by pid {comm.members[rank][1]})"
            )
        if comm.error is not None:
            raise CollectiveError(f"{comm.label} was aborted: {comm.error}")
        comm.members[rank] = (s.cid, s.pid)
        return comm

    def resolve(self, s: Session, m: Membership) -> bool:
        """Main thread: finish a join whose device map was being exchanged. True once `m.comm` is
        set; False while ranks are missing; raises CollectiveError if it failed or timed out."""
        if m.comm is not None:
            return True
        rdv = m.rdv
        if rdv is None:
            raise CollectiveError(m.error or "communicator initialisation failed")
        why = rdv.aborted()
        if why is None and not rdv.complete():
            if time.monotonic() <= rdv.deadline:
                return False
            why = (
                f"communicator {rdv.id.hex()[:8]}: timed out after {_timeout_s(m.timeout_ms):g} s waiting "
                f"for its other ranks to join ({self._joined(rdv)} of {rdv.size} joined)"
            )
            rdv.abort(why)
        if why is not None:
            m.error = why
            self._settle(m)
            raise CollectiveError(why)
        try:
            m.comm = self._enter(s, rdv.id, m.rank, m.size, rdv.devmap(), m.timeout_ms)
        except Exception as e:
            m.error = f"rank {m.rank}: {e}"
            rdv.abort(m.error)
            self._settle(m)
            raise
        self._settle(m)
        return True

    @staticmethod
    def _joined(rdv: Rendezvous) -> int:
        return int(rdv.lib.fx_shm_load(rdv.base + _R_COUNT)) if rdv.mm is not None else 0

    def _settle(self, m: Membership) -> None:
        if m.rdv is not None:
            m.rdv.close()
            m.rdv = None
            self.pending -= 1

    def leave(self, s: Session, handle: int) -> None:
        m = self.clients.get(s.cid, {}).pop(handle, None)
        if m is None:
            raise NotFound(f"unknown communicator handle {handle}")
        self._drop_member(s, m, None)

    def _drop_member(self, s: Session, m: Membership, why: str | None) -> None:
        """`m`'s rank leaves (why: its client exited, which fails the communicator for all)."""
        if m.comm is None and m.rdv is not None:
            if m.rdv.complete() and why is not None:
                try:  # the others may have resolved already: fail them through the communicator
                    self.resolve(s, m)
                except Exception:  # noqa: BLE001 - it failed anyway, and told the others
                    pass
            if m.comm is None and m.rdv is not None:
                m.rdv.abort(why or f"rank {m.rank} left before its communicator was used")
                self._settle(m)
        comm = m.comm
        if comm is None:
            return
        comm.leave(m.rank)
        if why is not None and (comm.members or len(comm.daemons) > 1):  # someone may still wait for it
            comm.abort(why)
        self._maybe_drop(comm)

    def member(self, s: Session, handle: int) -> Membership:
        m = self.clients.get(s.cid, {}).get(handle)
        if m is None:
            raise InvalidHandle(
                f"unknown communicator handle {handle} (a client may only use communicators it joined)"
            )
        return m

    def session_closed(self, s: Session) -> None:
        """A client went away: its ranks are gone, so every communicator it was in fails."""
        for m in (self.clients.pop(s.cid, None) or {}).values():
            label = (
                m.comm.label if m.comm is not None else f"communicator {m.rdv.id.hex()[:8] if m.rdv else '?'}"
            )
            self._drop_member(
                s, m, f"{label}: rank {m.rank} (pid {s.pid}, device {self.daemon.device}) exited"
            )

    def _maybe_drop(self, comm: Comm) -> None:
        if not comm.members:
            self.comms.pop(comm.id, None)
            comm.close()

    def close(self) -> None:
        for mine in self.clients.values():
            for m in mine.values():
                if m.rdv is not None:
                    m.rdv.abort("the daemon is stopping")
                    self._settle(m)
        for comm in list(self.comms.values()):
            comm.abort("the daemon is stopping")
            comm.close()
        self.comms.clear()

    def status(self) -> list[dict[str, Any]]:
        """From the control thread: a best-effort snapshot (the main thread changes the table)."""
        try:
            return self._status()
        except RuntimeError:
            return []

    def _status(self) -> list[dict[str, Any]]:
        return [
            {
                "id": c.id.hex()[:8],
                "size": c.size,
                "devices": c.daemons,
                "local_ranks": c.local,
                "joined": sorted(c.members),
                "completed": c.done_count,
                "by_worker": c._worker_done,  # the rest ran in the main loop (small ones)
                "pending": len(c.instances),
                "error": c.error,
            }
            for c in list(self.comms.values())
        ]


# ====================================================================== request handlers
def _flat(ref: P.TensorRef, al: Any, h: int) -> torch.Tensor:
    # cached: collectives change their buffers' data, never a view's metadata (see cached_view)
    from .backends.torch_exec import cached_view

    n = 1
    for d in ref.shape:
        n *= d
    expect = 1
    for d, st in zip(reversed(ref.shape), reversed(ref.stride)):
        if d != 1 and st != expect:
            raise InvalidArgument("collective buffers must be contiguous")
        expect *= d
    flat = P.TensorRef(ref.handle, ref.dtype, (n,), (1,), ref.offset)
    return cached_view(flat, ready_buf(al, h))


def _check_sizes(kind: int, size: int, inp: torch.Tensor, out: torch.Tensor) -> None:
    ni, no = inp.numel(), out.numel()
    ok = {
        ALL_REDUCE: no == ni,
        BROADCAST: no == ni,
        ALL_GATHER: no == ni * size,
        REDUCE_SCATTER: ni == no * size,
        ALL_TO_ALL: ni == no and ni % size == 0,
    }[kind]
    if not ok:
        raise InvalidArgument(
            f"{P.COLL_KINDS[kind]} on {size} ranks: input of {ni} and output of {no} elements do not fit"
        )


def _p_comm_init(s: Session, st: StreamState | None, r: R.CommInit) -> None:
    payload = bytes(s._payload(r.payload_offset, r.payload_len))
    s.daemon.collectives.join(s, r.comm, r.rank, r.size, r.timeout_ms, payload)
    if r.sync:
        s.reply(r.user_data)


def _p_comm_destroy(s: Session, st: StreamState | None, r: R.CommDestroy) -> None:
    s.daemon.collectives.leave(s, r.comm)
    if r.sync:
        s.reply(r.user_data)


def _run_collective(s: Session, st: StreamState, c: Any) -> None:
    state = c.a[1]
    inst: Instance | None = state["inst"]
    if state.get("error") or inst is None:
        raise CollectiveError(state.get("error") or "collective did not start")
    if inst.error is not None:
        raise CollectiveError(inst.error)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_collective(s: Session, st: StreamState | None, r: R.Collective) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    m: Membership = s.daemon.collectives.member(s, r.comm)
    kind, op, root = r.kind, r.reduce_op, r.root
    if not 0 <= kind < len(P.COLL_KINDS):
        raise InvalidArgument(f"unknown collective kind {kind}")
    if st.capturing:
        raise BadState("collectives cannot be captured into a graph")
    colls = s.daemon.collectives
    iref, oref = colls.decode(bytes(s._payload(r.payload_offset, r.payload_len)))
    size = m.size
    if m.error is not None:
        raise CollectiveError(m.error)
    if kind == BROADCAST and not 0 <= root < size:
        raise InvalidArgument(f"broadcast root {root} out of range for {size} ranks")
    if kind in (ALL_REDUCE, REDUCE_SCATTER):
        check_reduce(op, iref.dtype)
    ial, oal = s.alloc_of(iref.handle), s.alloc_of(oref.handle)
    state: dict[str, Any] = {"inst": None}

    def ready() -> bool:
        try:
            return _advance()
        except Exception as e:  # noqa: BLE001 - never let one client's collective break the loop
            state["error"] = f"rank {m.rank}: {type(e).__name__}: {e}"
            if m.comm is not None:
                m.comm.abort(state["error"])
            elif m.rdv is not None:
                m.rdv.abort(state["error"])
            return True

    def _advance() -> bool:
        inst = state["inst"]
        if inst is None and not colls.resolve(s, m):
            return False  # the other ranks' daemons have not all joined yet (native root info)
        comm = m.resolved()
        if inst is None:
            # Everything before this command on the stream has run: its inputs are final.
            s.daemon.backend.sync_stream(st.device_stream)
            try:
                inp, out = _flat(iref, ial, iref.handle), _flat(oref, oal, oref.handle)
                _check_sizes(kind, size, inp, out)
                err = None
            except Exception as e:  # noqa: BLE001 - this rank's mistake fails the communicator
                err = f"rank {m.rank}: {e}"
                inp = out = torch.empty(0, dtype=iref.dtype)
            if err is not None:
                comm.abort(err)  # first, so the peers see this reason rather than a mismatch
            part = Part(m.rank, kind, op, root, iref.dtype, inp, out)
            inst = state["inst"] = comm.arrive(part)
        return comm.poll(inst)

    return Cmd(
        Op.COLLECTIVE,
        r.user_data,
        r.sync,
        _run_collective,
        (m, state),
        ready=ready,
        cost=_cost(kind, iref, size),
    )


def _cost(kind: int, ref: P.TensorRef, size: int) -> Any:
    from ..sched.costmodel import collective_cost

    n = 1
    for d in ref.shape:
        n *= max(0, d)
    name = {
        ALL_REDUCE: "all_reduce",
        ALL_GATHER: "all_gather",
        REDUCE_SCATTER: "reduce_scatter",
        BROADCAST: "all_gather",
        ALL_TO_ALL: "all_to_all",
    }[kind]
    try:
        return collective_cost(name, float(n * ref.dtype.itemsize), size, str(ref.dtype))
    except ValueError:  # a dtype the cost model has no entry for (bool, uint16, ...)
        return collective_cost(name, float(n * ref.dtype.itemsize), size, "int8")


# the handlers of the collective opcodes (flexnpu/daemon/handlers/ dispatches to them)
PREPARE: dict[Op, Any] = {
    Op.COMM_INIT: _p_comm_init,
    Op.COMM_DESTROY: _p_comm_destroy,
    Op.COLLECTIVE: _p_collective,
}
