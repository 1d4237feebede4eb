"""Emulated accelerator: kernels take the time the cost model predicts, sharing the device.

Resource model. A device has three shared resources, each of capacity 1 (one "device-second"
per second): compute (tensor/vector units), memory bandwidth, and the inter-device link. A
kernel's work is what ``CostModel.work`` gives: seconds of each resource at full rate, with the
compute demand raised to at least ``issue_frac * memory`` because issuing memory traffic needs
cores (so a memory-bound kernel is not free for a compute-bound neighbour). A kernel advances
all its work in lock-step (roofline behaviour): at progress rate r it uses r*demand_res of each
resource, so alone it finishes in max(compute, memory, link) = the roofline time.

Sharing is weighted Dominant Resource Fairness by progressive filling: every running kernel
gets the same weighted share of its dominant resource, raised together until some resource
saturates; kernels using that resource freeze, the rest keep growing into what is left. Hence
- two compute-bound kernels each get half the compute (each takes ~2x);
- a compute-bound and a memory-bound kernel overlap, slowing each other only where their
  combined demand on one resource exceeds it (see tests for the worked numbers);
- a higher weight (stream priority: CUDA/Ascend stream priorities bias the hardware block
  scheduler) gets a proportionally larger share under contention.

Core partitions (``set_partition``: Ascend ``aclrtSetStreamResLimit`` / torch_npu
``set_stream_limit``, CUDA green contexts or MPS active-thread percentage): a stream with core
share s runs its kernels on a fraction s of the compute units. That is a hard cap, not a
weight: such a kernel's compute use never exceeds s, even on an otherwise idle device. Memory
bandwidth is not partitioned (no accelerator partitions HBM bandwidth per stream); it stays
shared work-conserving among all running kernels, but a kernel pulls bandwidth only through
the cores it has: its compute demand is at least ``issue_frac`` x its memory demand, so on a
share s it reaches at most s / issue_frac of the device bandwidth (a decode kernel on 10% of
the cores of a 910B-class spec, issue_frac 0.25, gets at most 40% of HBM bandwidth; on 25% or
more it gets all of it when alone). A share applies to kernels submitted after it is set (an
operator boundary: hardware cannot move a running kernel's cores), and the first kernel of a
stream after its share changed pays ``spec.repartition_s`` of extra launch latency (the cost of
a change: a runtime call or a switch to another pre-made green-context stream).
Kernels on the same stream run in order; each pays ``launch_s`` of latency (not a shared
resource) before it starts consuming work.

Time is whatever the caller says ``now`` is: the serving simulator passes virtual time, the
daemon's ``emu:<spec>`` backend passes ``time.monotonic()`` and sleeps until
``next_event_time()``. Nothing here reads a clock.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Hashable

from flexnpu.sched.costmodel import Cost, CostModel
from flexnpu.sched.specs import DeviceSpec

RESOURCES = ("compute", "memory", "link")
_EPS = 1e-12


@dataclass(eq=False)
class EmuKernel:
    id: int
    stream: Hashable
    cost: Cost
    demand: tuple[float, float, float]  # device-seconds of compute, memory, link at full rate
    solo_s: float  # roofline + launch on an idle device (corrected)
    launch_s: float
    weight: float
    submitted: float
    tag: Any = None
    started: float | None = None  # became head of its stream (launch begins)
    ready_at: float | None = None  # launch latency over, consuming resources from here
    finished: float | None = None
    remaining: float = 1.0  # fraction of work left
    rate: float = 0.0  # progress per second under the current allocation
    share: float | None = None  # core share (hard compute cap); None = whole device

    @property
    def duration(self) -> float | None:
        return None if self.finished is None or self.started is None else self.finished - self.started

    @property
    def slowdown(self) -> float | None:
        d = self.duration
        return None if d is None or self.solo_s <= 0 else d / self.solo_s


@dataclass
class _Stream:
    queue: deque = field(default_factory=deque)
    weight: float = 1.0
    share: float | None = None  # core share applied to kernels submitted from now on
    last_share: float | None = None  # share of the stream's previous kernel (a change costs)
    repartitions: int = 0


def check_share(share: float | None) -> float | None:
    """A core share is a fraction of the device's compute units in (0, 1], or None (no limit)."""
    if share is None:
        return None
    share = float(share)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"core share must be in (0, 1], not {share}")
    return None if share >= 1.0 else share


class EmuDevice:
    """One emulated device. Not thread-safe: drive it from one loop (daemon or simulator)."""

    def __init__(self, spec: DeviceSpec | CostModel, now: float = 0.0):
        self.model = spec if isinstance(spec, CostModel) else CostModel(spec)
        self.spec = self.model.spec
        self.now = float(now)
        self._streams: dict[Hashable, _Stream] = {}
        self._ids = itertools.count(1)
        self._dirty = True
        self._next_t: float | None = None  # next_event_time() cache: valid while not dirty
        self._pending: list[EmuKernel] = []
        self.busy_time = [0.0, 0.0, 0.0]  # integrated resource use, for utilisation reports
        self.completed_count = 0

    # ------------------------------------------------------------ public API
    def set_stream_weight(self, stream: Hashable, weight: float) -> None:
        """Emulated stream priority: share multiplier under contention (default 1)."""
        if weight <= 0:
            raise ValueError("stream weight must be positive")
        self._streams.setdefault(stream, _Stream()).weight = float(weight)
        self._dirty = True

    def set_partition(self, shares: dict[Hashable, float | None]) -> None:
        """Core share per stream (None or 1 = no limit), for kernels submitted from now on."""
        checked = {k: check_share(v) for k, v in shares.items()}
        for k, v in checked.items():
            self._streams.setdefault(k, _Stream()).share = v

    def partition(self) -> dict[Hashable, float | None]:
        return {k: s.share for k, s in self._streams.items() if s.share is not None}

    def repartitions(self, stream: Hashable) -> int:
        """How many times a kernel of `stream` started under a share other than its predecessor's."""
        st = self._streams.get(stream)
        return 0 if st is None else st.repartitions

    def submit(
        self,
        stream: Hashable,
        cost: Cost,
        now: float,
        weight: float | None = None,
        tag: Any = None,
        share: float | None = -1.0,
    ) -> EmuKernel:
        """Enqueue a kernel on `stream` at time `now` (>= the device's clock). Completions due
        before `now` are processed first (collect them with the next ``advance``). `share`: this
        kernel's core share (default: the stream's partition; None: no limit)."""
        self._pending.extend(self._advance_to(now))
        comp, mem, link = self.model.work(cost)
        f = self.model.corrections.factor(cost.op_class)
        comp, mem, link = comp * f, mem * f, link * f
        demand = (max(comp, self.spec.issue_frac * mem), mem, link)
        launch = cost.launches * self.spec.launch_s
        st = self._streams.setdefault(stream, _Stream())
        sh = st.share if share == -1.0 else check_share(share)
        if sh != st.last_share:
            # the partition changed at this operator boundary: the change costs launch latency
            launch += self.spec.repartition_s
            st.repartitions += 1
            st.last_share = sh
        solo = max(comp, mem, link) if sh is None else max(demand[0] / sh, mem, link)
        k = EmuKernel(
            next(self._ids),
            stream,
            cost,
            demand,
            solo + launch,
            launch,
            st.weight if weight is None else float(weight),
            self.now,
            tag,
            share=sh,
        )
        st.queue.append(k)
        if len(st.queue) == 1:
            self._start(k, self.now)
        return k

    def advance(self, now: float) -> list[EmuKernel]:
        """Move the clock to `now`; return kernels completed since the last call, in order."""
        done, self._pending = self._pending, []
        return done + self._advance_to(now)

    def next_event_time(self) -> float | None:
        """Earliest time something changes (a launch ends or a kernel completes), assuming no
        new submissions; None when idle. The real-time driver sleeps until then."""
        # While the allocation holds, progress does not move this time (remaining/rate shrinks
        # exactly as the clock advances), so it is computed once per allocation.
        if not self._dirty and self._next_t is not None and self._next_t > self.now + _EPS:
            return self._next_t
        self._allocate()
        best = None
        for k in self._heads():
            if k.ready_at is not None and k.ready_at > self.now + _EPS:
                t = k.ready_at
            elif k.rate > 0:
                t = self.now + k.remaining / k.rate
            elif k.remaining <= _EPS:
                t = self.now
            else:
                continue
            best = t if best is None else min(best, t)
        self._next_t = best
        return best

    def predict_finish(self, kernel: EmuKernel) -> float:
        """Finish time if the current allocation held (exact when nothing else arrives)."""
        if kernel.finished is not None:
            return kernel.finished
        probe = self.clone()
        target = next(k for s in probe._streams.values() for k in s.queue if k.id == kernel.id)
        while target.finished is None:
            t = probe.next_event_time()
            if t is None:
                raise RuntimeError("emulator stalled")  # cannot happen: positive rates
            probe._advance_to(t)
        return target.finished

    def clone(self) -> EmuDevice:
        import copy

        # the cost model (with its lock) is shared: a probe only reads it
        return copy.deepcopy(self, memo={id(self.model): self.model, id(self.spec): self.spec})

    @property
    def idle(self) -> bool:
        return not any(s.queue for s in self._streams.values())

    def inflight(self) -> list[EmuKernel]:
        return [k for s in self._streams.values() for k in s.queue]

    def utilization(self) -> tuple[float, float, float]:
        """Current share of (compute, memory, link) in use."""
        self._allocate()
        use = [0.0, 0.0, 0.0]
        for k in self._heads():
            if k.rate > 0:
                for r in range(3):
                    use[r] += k.rate * k.demand[r]
        return tuple(use)  # type: ignore[return-value]

    # ------------------------------------------------------------ internals
    def _heads(self):
        for s in self._streams.values():
            if s.queue:
                yield s.queue[0]

    def _start(self, k: EmuKernel, t: float) -> None:
        k.started = t
        k.ready_at = t + k.launch_s
        self._dirty = True

    def _allocate(self) -> None:
        """Weighted DRF by progressive filling over the running (post-launch) kernels."""
        if not self._dirty:
            return
        run = []
        for k in self._heads():
            k.rate = 0.0
            if k.ready_at is not None and k.ready_at <= self.now + _EPS:
                run.append(k)
        cap = [1.0, 1.0, 1.0]
        active = [k for k in run if max(k.demand) > 0]
        for k in run:
            if max(k.demand) <= 0:
                k.rate = float("inf")  # no work: completes at once
        level = 0.0
        # per kernel: resource use per unit of fill level (weight x demand / dominant demand),
        # and the level at which a partitioned kernel's compute use reaches its core share
        g, lim, doms = {}, {}, {}
        for k in active:
            dom = doms[k.id] = max(k.demand)
            g[k.id] = (
                k.weight * k.demand[0] / dom,
                k.weight * k.demand[1] / dom,
                k.weight * k.demand[2] / dom,
            )
            if k.share is not None and k.demand[0] > _EPS:
                lim[k.id] = k.share / g[k.id][0]
        while active:
            per = [sum(g[k.id][r] for k in active) for r in range(3)]
            # fill level at which each resource saturates, given the still-growing kernels
            best, sat = float("inf"), None
            for r in range(3):
                if per[r] > _EPS:
                    grow = cap[r] / per[r]
                    if grow < best:
                        best, sat = grow, r
            # a partitioned kernel stops growing when its compute use reaches its core share
            capped = None
            for k in active:
                if k.id in lim:
                    grow = lim[k.id] - level
                    if grow < best - _EPS:
                        best, sat, capped = max(grow, 0.0), None, k
            if sat is None and capped is None:
                break
            level += best
            for r in range(3):
                cap[r] = max(cap[r] - best * per[r], 0.0)
            for k in active:
                k.rate = k.weight * level / doms[k.id]
            if capped is not None:
                frozen = [k for k in active if k.id in lim and level >= lim[k.id] * (1 - 1e-9)]
            else:
                frozen = [k for k in active if k.demand[sat] > _EPS * doms[k.id]]
            active = [k for k in active if k not in frozen]
            # those still active keep their rate and can grow further (level is shared)
        self._dirty = False

    def _advance_to(self, now: float) -> list[EmuKernel]:
        if now < self.now - 1e-9:
            raise ValueError(f"time went backwards: now={now} < device clock {self.now}")
        done: list[EmuKernel] = []
        while True:
            t = self.next_event_time()
            if t is None or t > now:
                break
            self._progress(t)
            done.extend(self._settle())
        self._progress(max(now, self.now))
        done.extend(self._settle())
        return done

    def _progress(self, t: float) -> None:
        dt = max(0.0, t - self.now)
        self._allocate()
        for k in self._heads():
            if k.rate == float("inf"):
                k.remaining = 0.0
            elif k.rate > 0:
                # its finish time as next_event_time computes it: reached when not after t. On
                # a clock far from zero (time.monotonic() on a host up for hours) a remainder
                # below the clock's resolution gives now + remaining / rate == now, dt == 0, and
                # nothing would ever move it: the real-time driver spun forever.
                finish = self.now + k.remaining / k.rate
                k.remaining -= k.rate * dt
                for r in range(3):
                    self.busy_time[r] += k.rate * k.demand[r] * dt
                # float dust: what is left would finish within a picosecond
                if finish <= t or k.remaining <= 1e-9 or k.remaining / k.rate < 1e-12:
                    k.remaining = 0.0
        self.now = max(self.now, t)

    def _settle(self) -> list[EmuKernel]:
        """Retire finished heads, start their successors, mark launches that became ready."""
        done = []
        for s in self._streams.values():
            while s.queue:
                k = s.queue[0]
                if max(k.demand) <= 0 and k.ready_at is not None and k.ready_at <= self.now + _EPS:
                    k.remaining = 0.0
                if k.remaining <= 1e-9 and k.ready_at is not None and k.ready_at <= self.now + _EPS:
                    k.finished = self.now
                    k.remaining = 0.0
                    s.queue.popleft()
                    done.append(k)
                    self.completed_count += 1
                    self._dirty = True
                    if s.queue:
                        self._start(s.queue[0], self.now)
                    continue
                break
            if s.queue and s.queue[0].ready_at is not None and s.queue[0].ready_at <= self.now + _EPS:
                self._dirty = True  # launch just ended: it joins the allocation
        done.sort(key=lambda k: (k.finished, k.id))
        return done
