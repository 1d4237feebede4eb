"""Virtual device objects: allocations, streams, events and graphs, behind per-client handles.

A client never sees a pointer. It names objects by small integers in its own namespace; the
daemon maps them to real objects in that client's tables only, so one client cannot reach
another's memory except through an IPC import the owner allowed.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidHandle, OutOfMemory

MAX_HANDLE = (1 << 32) - 1
MAX_HANDLES = 1 << 21  # live handles per client: bounds the daemon's own memory per client


class Alloc:
    """One device allocation. `buf` is None while the launch that produces it is queued.

    A compiled graph replay leaves its outputs as `result` tensors (set_result); the byte view
    `buf` is made from it only when something reads the allocation (materialize)."""

    __slots__ = (
        "nbytes",
        "buf",
        "owner",
        "tables",
        "graphs",
        "failed",
        "ref",
        "result",
        "view",
        "__weakref__",
    )

    def __init__(self, nbytes: int, owner: Any, buf: Any = None, ref: Any = None) -> None:
        self.nbytes = nbytes
        self.buf = buf
        self.owner = owner  # the MemoryAccount charged for it
        self.tables = 0  # how many client tables reference it
        self.graphs = 0  # how many captured graphs hold it (and replay into it)
        self.failed: str | None = None
        self.ref = ref  # declared layout of a launch output (TensorRef)
        self.result: Any = None
        # (buf, layout, tensor): the result tensor the operator that produced `buf` returned, laid
        # out as declared; a planned launch reading it with that layout uses it as its view
        # (valid while `buf` is that same object). A planned launch's output is left pending
        # (buf None, result the tensor, view (tensor, layout, tensor)) until something needs
        # its bytes: materialize then keeps the view under the new buf.
        self.view: Any = None

    def set_result(self, t: Any) -> None:
        self.result = t
        self.buf = None

    def result_is_buffer(self) -> bool:
        """Is the pending result tensor exactly the allocation's bytes, laid out as declared (its
        storage is the allocation's size and it covers it densely)? Then any view of the
        allocation is a view of that storage."""
        from .backends.torch_exec import is_dense, same_strides

        r, ref = self.result, self.ref
        return bool(
            r is not None
            and r.untyped_storage().nbytes() == self.nbytes
            and r.dtype == ref.dtype
            and r.storage_offset() == ref.offset
            and tuple(r.shape) == tuple(ref.shape)
            and same_strides(ref.shape, r.stride(), ref.stride)
            and is_dense(r)
            and r.numel() * r.dtype.itemsize == self.nbytes
        )

    def materialize(self) -> Any:
        """The allocation's bytes as a 1-D uint8 tensor, laid out as declared."""
        if self.buf is None and self.result is not None:
            import torch

            from .backends.torch_exec import build_view

            r, ref = self.result, self.ref
            v = self.view
            planned = v is not None and v[0] is r  # run_plan checked what result_is_buffer checks
            if planned or self.result_is_buffer():
                self.buf = torch.empty(0, dtype=torch.uint8, device=r.device).set_(r.untyped_storage())
                if planned:
                    # r stays a valid view of the same bytes
                    self.view = (self.buf, v[1], v[2])
            else:
                buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=r.device)
                build_view(ref, buf).copy_(r)
                self.buf = buf
            self.result = None
        return self.buf


@dataclass
class MemoryAccount:
    """Device memory charged to one client; `parent` is the whole device's account, so the sum
    of all clients can never exceed what the device (or the host, for cpu) can hold."""

    limit: int | None
    used: int = 0
    peak: int = 0
    parent: MemoryAccount | None = None

    def charge(self, nbytes: int) -> bool:
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        if self.parent is not None and not self.parent.charge(nbytes):
            return False
        self.used += nbytes
        if self.used > self.peak:
            self.peak = self.used
        return True

    def uncharge(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.used)
        self.used -= nbytes
        if self.parent is not None:
            self.parent.uncharge(nbytes)


HANDLE_COST = 512  # daemon memory one live handle costs (an Alloc, its dict slot, a
# backend buffer object: 1 M malloc(0) handles held ~558 MB)


class HandleTable:
    """handle -> Alloc for one client; tracks references so shared allocations are uncharged
    from their owner only when the last table lets go. Each entry is charged HANDLE_COST to
    `account` (the client's host budget): even size-0 allocations cost the daemon memory."""

    def __init__(self, account: MemoryAccount | None = None) -> None:
        self._h: dict[int, Alloc] = {}
        self.account = account

    def __len__(self) -> int:
        return len(self._h)

    def __contains__(self, h: int) -> bool:
        return h in self._h

    def add(self, h: int, alloc: Alloc) -> None:
        if not 0 < h <= MAX_HANDLE:
            raise InvalidHandle(f"handle {h} out of range")
        if h in self._h:
            raise InvalidHandle(f"handle {h} is already in use")
        if len(self._h) >= MAX_HANDLES:
            raise OutOfMemory(f"too many live device handles in this client (limit {MAX_HANDLES})")
        if self.account is not None and not self.account.charge(HANDLE_COST):
            raise OutOfMemory(
                f"this client's objects exceed its host memory budget of "
                f"{self.account.limit} bytes in the daemon ({len(self._h)} live handles)"
            )
        alloc.tables += 1
        self._h[h] = alloc

    def get(self, h: int) -> Alloc:
        a = self._h.get(h)
        if a is None:
            raise InvalidHandle(f"unknown or freed device handle {h}")
        return a

    def remove(self, h: int) -> Alloc:
        a = self._h.pop(h, None)
        if a is None:
            raise InvalidHandle(f"free of unknown or already freed device handle {h}")
        _release(a)
        if self.account is not None:
            self.account.uncharge(HANDLE_COST)
        return a

    def remove_many(self, hs: Any) -> tuple[list[Alloc], InvalidHandle | None]:
        """remove() of each handle in ``hs``, the accounts uncharged once each for all of them
        (an eager loop frees a few hundred handles per FREE_MANY record). Returns the removed
        allocations and the error of the first unknown handle (the rest are removed anyway)."""
        pop = self._h.pop
        removed: list[Alloc] = []
        bad: InvalidHandle | None = None
        owed: dict[int, list[Any]] = {}  # id(account) -> [account, bytes released]
        for h in hs:
            a = pop(h, None)
            if a is None:
                if bad is None:
                    bad = InvalidHandle(f"free of unknown or already freed device handle {h}")
                continue
            removed.append(a)
            a.tables -= 1
            if a.tables == 0 and a.graphs == 0:  # (_release, summed per account)
                o = a.owner
                e = owed.get(id(o))
                if e is None:
                    owed[id(o)] = [o, a.nbytes]
                else:
                    e[1] += a.nbytes
        for o, n in owed.values():
            o.uncharge(n)
        if self.account is not None and removed:
            self.account.uncharge(HANDLE_COST * len(removed))
        return removed, bad

    def clear(self) -> None:
        for a in self._h.values():
            _release(a)
        if self.account is not None:
            self.account.uncharge(HANDLE_COST * len(self._h))
        self._h.clear()


def _release(a: Alloc) -> None:
    a.tables -= 1
    if a.tables == 0 and a.graphs == 0:
        # Uncharged now; the memory itself goes when queued commands that still hold the
        # Alloc finish (stream-ordered free, as aclrtFree/cudaFreeAsync behave). An allocation a
        # captured graph holds stays charged until the graph goes (Graph.release).
        a.owner.uncharge(a.nbytes)


@dataclass
class EventState:
    requested: int = 0  # records issued
    completed: int = 0  # records executed
    token: Any = None  # backend marker of the latest executed record
    # (target, done), by target
    waiters: collections.deque[tuple[int, Callable[[], None]]] = field(default_factory=collections.deque)


@dataclass
class StreamState:
    sid: int
    priority: int = 0
    phase: str = "auto"
    device_stream: Any = None
    queue: collections.deque[Cmd] = field(default_factory=collections.deque)
    error: tuple[int, str] | None = None  # first async error, reported at next sync
    capturing: int = 0  # graph id being captured, 0 if none
    ops_done: int = 0
    busy_s: float = 0.0  # measured execution time, for the scheduler

    def set_error(self, code: int, msg: str) -> None:
        if self.error is None:
            self.error = (code, msg)


@dataclass
class Graph:
    gid: int
    stream: int
    ops: list[Cmd] = field(default_factory=list)  # prepared commands, replayed in order
    complete: bool = False
    # graphs.CompiledGraph, False (cannot be compiled) or None; Any because graphs builds on this module
    compiled: Any = None
    retained: dict[int, Alloc] = field(default_factory=dict)  # id -> Alloc the graph's commands hold

    def retain(self, cmd: Any) -> None:
        """Hold (and keep charged) every allocation a captured command uses: replays write into
        them after the client may have freed its handles."""
        for x in cmd.a:
            for al in x.values() if isinstance(x, dict) else (x,):
                if isinstance(al, Alloc) and id(al) not in self.retained:
                    self.retained[id(al)] = al
                    al.graphs += 1

    def release(self) -> None:
        """The graph is gone: uncharge what only it still held."""
        for al in self.retained.values():
            al.graphs -= 1
            if al.graphs == 0 and al.tables == 0:
                al.owner.uncharge(al.nbytes)
        self.retained.clear()

    held: int = 0  # bytes of the client's host budget its records use


MAX_IMPORT_PIDS = 4096  # processes one export may be granted to


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None
    if there is no such process. With the pid it names one process: a pid is reused, a
    (pid, start time) pair is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class IpcExport:
    alloc: Alloc
    owner_client: int
    # pid -> start time of the process the owner allowed: a grant is for that process only,
    # not for whatever later gets the same pid, and goes when the process exits
    pids: dict[int, int] = field(default_factory=dict)
    same_uid: int | None = None  # set: any process of this uid may import (key known = capability)
    created: float = field(default_factory=time.time)

    def grant(self, pid: int) -> bool:
        start = process_start_time(pid)
        if start is None:
            return False
        self.pids[pid] = start
        return True

    def allows(self, pid: int, start: int | None) -> bool:
        granted = self.pids.get(pid)
        if granted is None:
            return False
        if start is None or granted != start or process_start_time(pid) != granted:
            del self.pids[pid]  # that process is gone: its grant goes with it
            return False
        return True

    def prune(self) -> None:
        """Drop the grants of processes that exited (or whose pid now names another)."""
        for pid, start in list(self.pids.items()):
            if process_start_time(pid) != start:
                del self.pids[pid]


@dataclass(slots=True)
class Cmd:
    """A validated request waiting in its stream's queue."""

    op: int
    user_data: int
    sync: bool
    run: Callable[[Any, StreamState, Cmd], Any]  # (Session, its stream, this command)
    a: tuple[Any, ...] = ()
    ready: Callable[[], bool] | None = None  # None = always ready (only waits use it)
    cost: Any = None  # scheduler annotation (phase, predicted time)
    undo: Callable[[], None] | None = None  # reverts the prepare step's effects if refused
    t0: float = 0.0  # perf_counter when drained (launch latency metric)
    held: int = 0  # host budget charged while it waits in a queue


def ready_buf(al: Alloc, h: int) -> Any:
    """The backend buffer behind handle `h` (allocation `al`), materialized if it is a deferred
    launch result; InvalidHandle if the operator that should have produced it failed."""
    if al.buf is None and al.result is not None:
        return al.materialize()
    if al.buf is None:
        raise InvalidHandle(
            f"device handle {h} was never produced (the operator that should have "
            f"written it failed{': ' + al.failed if al.failed else ''})"
        )
    return al.buf
