"""Scheduling policies: which queued operators the device runs next, and how many at once.

One interface for the daemon (real time) and the serving simulator (virtual time):

    queues: list[StreamQueue]       # one per client stream; the caller push()es launched ops
    device: DeviceState             # cost model + what is in flight
    policy = make_policy("flex")
    for d in policy.select(queues, device, now):   # ops leave their queue, now in flight
        backend.set_partition(stream, d.share)     # core share for this op (None: whole device)
        backend.launch(d.op, weight=d.weight)      # d.weight: stream priority (priority policy)
    ...
    policy.complete(op, device, now, started=t0)   # on completion: accounting + feedback
    policy.end_step(queue, device, at)             # a step mark after its last op completed (at)
    t = policy.next_wakeup(now)                    # call select() again by then (or None)

``select`` pops what it returns (ownership passes to the caller) and never blocks; calling it
with nothing new is cheap and harmless. Stream order is kept: ops of one stream are handed out
in push order. See docs/scheduling.md.
"""

from __future__ import annotations

import enum
import itertools
import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Hashable

from flexnpu.sched.costmodel import Cost, CostModel


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    AUTO = "auto"  # infer from arithmetic intensity of recent ops


_op_ids = itertools.count(1)


@dataclass(eq=False)
class Op:
    """One launched operator waiting in (or dispatched from) a stream queue."""

    cost: Cost
    enqueued: float
    tag: Any = None  # the caller's handle (daemon: launch record; simulator: kernel)
    step_end: bool = False  # engine hint: last op of an iteration (one output token)
    id: int = field(default_factory=lambda: next(_op_ids))
    stream: Any = None  # set by StreamQueue.push
    dispatched: float | None = None
    finished: float | None = None  # set by Policy.complete
    predicted_s: float = 0.0  # corrected solo time, set at dispatch


class StreamQueue:
    """Per-stream FIFO of ops plus what the scheduler knows about the stream."""

    def __init__(
        self,
        key: Hashable,
        phase: Phase | str = Phase.AUTO,
        priority: int = 0,
        tpot_budget_s: float | None = None,
        max_inflight: int = 64,
    ):
        self.key = key
        self.phase = Phase(phase)
        self.priority = int(priority)
        self.tpot_budget_s = tpot_budget_s
        self.max_inflight = max_inflight
        self.ops: deque[Op] = deque()
        self.inflight = 0
        # aggregate intensity of recent ops: EWMAs of flops and bytes (time-weighted in effect)
        self._ew_flops = 0.0
        self._ew_bytes = 0.0
        # Iterations dispatched and not yet closed, oldest first: [start, sum of the solo
        # predictions of its ops]. More than one when an engine that never waits per token has
        # the next iteration's kernels dispatched before the previous one's last kernel ends.
        self.open_steps: deque[list[float]] = deque()
        self._last_taken: Op | None = None
        self.step_time_ewma: float | None = None
        self.last_step_time: float | None = None
        self.last_step_pred: float | None = None
        self.steps = 0

    def __repr__(self) -> str:
        return f"StreamQueue({self.key!r}, {self.phase.value}, pending={len(self.ops)}, inflight={self.inflight})"

    def push(self, op: Op) -> Op:
        op.stream = self.key
        self.ops.append(op)
        a = 0.2
        self._ew_flops = (1 - a) * self._ew_flops + a * op.cost.flops
        self._ew_bytes = (1 - a) * self._ew_bytes + a * op.cost.bytes
        return op

    @property
    def intensity(self) -> float:
        return self._ew_flops / self._ew_bytes if self._ew_bytes > 0 else math.inf if self._ew_flops else 0.0

    def effective_phase(self, ridge: float, threshold: float = 0.5) -> Phase:
        """Declared phase, else prefill when recent ops' aggregate FLOP/byte >= threshold*ridge."""
        if self.phase is not Phase.AUTO:
            return self.phase
        if self._ew_flops == 0 and self._ew_bytes == 0:
            return Phase.DECODE  # unknown: treat as latency-sensitive until evidence says otherwise
        return Phase.PREFILL if self.intensity >= threshold * ridge else Phase.DECODE

    @property
    def pending(self) -> int:
        return len(self.ops)

    @property
    def can_dispatch(self) -> bool:
        return bool(self.ops) and self.inflight < self.max_inflight


@dataclass
class DeviceState:
    """What the policy may know about the device: its cost model and what is in flight."""

    model: CostModel
    max_inflight: int = 64  # device queue depth the policy may fill
    inflight: dict[int, Op] = field(default_factory=dict)

    @property
    def ridge(self) -> float:
        # the spec is immutable; this is asked once per stream per scheduling decision
        spec = self.model.spec
        if getattr(self, "_ridge_spec", None) is not spec:
            self._ridge_spec, self._ridge = spec, spec.ridge()
        return self._ridge


@dataclass
class Dispatch:
    op: Op
    queue: StreamQueue
    weight: float = 1.0  # stream priority (CUDA/Ascend stream priority; emu: DRF weight)
    # Core share the op runs on: the fraction of the device's compute units its stream is
    # limited to (Ascend set_stream_limit, CUDA green context), None = the whole device. Set
    # per op because hardware applies a partition to operators launched after the change.
    share: float | None = None


class Policy(ABC):
    name = "base"

    def __init__(self) -> None:
        self._queues: dict[Hashable, StreamQueue] = {}

    @abstractmethod
    def select(self, queues: list[StreamQueue], device: DeviceState, now: float) -> list[Dispatch]:
        """Choose ops to hand to the device now; they are popped from their queues."""

    def next_wakeup(self, now: float) -> float | None:
        """A time at which select() may decide differently without any new event."""
        return None

    def _take(
        self, q: StreamQueue, device: DeviceState, now: float, weight: float = 1.0, share: float | None = None
    ) -> Dispatch:
        op = q.ops.popleft()
        op.dispatched = now
        op.predicted_s = device.model.predict(op.cost)
        q.inflight += 1
        device.inflight[op.id] = op
        self._queues[q.key] = q
        # The iteration an op belongs to is fixed by order: marks reach the queue before any
        # later op, so a step-ending op is flagged before the next iteration's first dispatch.
        last = q._last_taken
        if not q.open_steps or (last is not None and last.step_end):
            q.open_steps.append([now, 0.0])
        q.open_steps[-1][1] += op.predicted_s
        q._last_taken = op
        return Dispatch(op, q, weight, share)

    def complete(self, op: Op, device: DeviceState, now: float, started: float | None = None) -> None:
        """The device finished `op` at `now`. `started`: when it began executing, if known
        (feeds the cost model's online correction; omit when the measured span includes
        queueing behind other work, as with an opaque backend queue)."""
        device.inflight.pop(op.id, None)
        op.finished = now
        q = self._queues.get(op.stream)
        closed = False
        if q is not None:
            q.inflight = max(0, q.inflight - 1)
            if op.step_end:
                closed = self._close_step(q, now)
        if started is not None and now > started:
            device.model.observe(op.cost, now - started)
        self.on_complete(op, q, device, now)
        if closed:
            assert q is not None  # only a queue's step can close
            self.on_step(q, device, now)

    def end_step(self, q: StreamQueue, device: DeviceState, at: float) -> None:
        """The engine marked an iteration end after its last op had already completed (at
        `at`): close the iteration as if that op had carried the mark."""
        if self._close_step(q, at):
            self.on_step(q, device, at)

    @staticmethod
    def _close_step(q: StreamQueue, now: float) -> bool:
        if not q.open_steps:
            return False
        start, pred = q.open_steps.popleft()
        dt = now - start
        q.last_step_time = dt
        q.last_step_pred = pred
        q.step_time_ewma = dt if q.step_time_ewma is None else 0.7 * q.step_time_ewma + 0.3 * dt
        q.steps += 1
        if q.open_steps:
            # Dispatched early, the next iteration still could not finish before this one: it
            # starts here, so back-to-back iterations time as the gap between their ends.
            q.open_steps[0][0] = max(q.open_steps[0][0], now)
        return True

    def on_complete(self, op: Op, queue: StreamQueue | None, device: DeviceState, now: float) -> None:
        pass

    def on_step(self, queue: StreamQueue, device: DeviceState, now: float) -> None:
        """An iteration of `queue` ended at `now` (its time is ``queue.last_step_time``)."""


class FifoPolicy(Policy):
    """Passthrough baseline: dispatch everything in arrival order, up to the device queue depth."""

    name = "fifo"

    def select(self, queues, device, now):
        out = []
        while len(device.inflight) < device.max_inflight:
            ready = [q for q in queues if q.can_dispatch]
            if not ready:
                break
            q = min(ready, key=lambda q: q.ops[0].id)
            out.append(self._take(q, device, now))
        return out


class PriorityPolicy(Policy):
    """Strict stream priority, non-preemptive at kernel granularity: a lower-priority stream's
    op is dispatched only while no higher-priority stream has ops pending. Dispatches carry
    weight ``base ** (priority - lowest)`` so backends with stream priorities (and emu) favour them."""

    name = "priority"

    def __init__(self, base: float = 4.0):
        super().__init__()
        self.base = base

    def select(self, queues, device, now):
        out = []
        lo = min((q.priority for q in queues), default=0)
        while len(device.inflight) < device.max_inflight:
            pending = [q for q in queues if q.ops]
            if not pending:
                break
            top = max(q.priority for q in pending)
            ready = [q for q in pending if q.priority == top and q.can_dispatch]
            if not ready:
                break  # the top class is throttled by its own in-flight cap; lower classes wait
            q = min(ready, key=lambda q: q.ops[0].id)
            out.append(self._take(q, device, now, self.base ** (q.priority - lo)))
        return out


def _quantize(share: float, step: float) -> float:
    """A share on the hardware's grid (multiples of `step`), at least one step."""
    return min(1.0, max(step, round(share / step) * step))


class FlexPolicy(Policy):
    """Dynamic prefill/decode co-location with two levers that exist on hardware.

    1. Ordering and gating (every backend): decode streams (declared, or inferred from low
       arithmetic intensity) are dispatched first; prefill streams fill in, with at most
       ``prefill_slots`` prefill ops in flight while decode work is pending or in flight (no
       limit when there is no decode work).
    2. Core shares (backends with the partition capability: npu set_stream_limit, cuda green
       contexts, emu): while both phases have work, decode ops run on ``decode_share`` of the
       compute units and prefill ops on the rest; while only one phase has work it runs on the
       whole device (a static split would leave the other part idle). Decode counts as active
       for a budget's time after its last op completed, so a prefill kernel dispatched in the
       gap between two decode iterations (the engine's host work) still gets the prefill share
       and cannot take the whole device from the next iteration. A share is attached to
       each op at dispatch, so a change takes effect at operator boundaries, and shares move on
       a grid of ``share_step`` (green contexts are made per level; few distinct levels also
       keep the number of changes, which cost ``spec.repartition_s`` each, small).
    Both adapt on each decode stream's measured iteration time (``Op.step_end`` marks iteration
    ends) against its budget: the smaller of the TPOT budget (``StreamQueue.tpot_budget_s``,
    else ``default_tpot_budget_s``) and ``max_slowdown`` x the iteration's predicted solo time.
    Above ``high`` x budget: halve the prefill slots (floor ``min_prefill_slots``, default 1, so
    prefill cannot starve) and grow the decode share by ``share_up`` (cap ``max_decode_share``,
    so prefill keeps cores); below ``low`` x budget: add a slot and shrink the decode share by
    ``share_down`` (floor ``min_decode_share``), so prefill takes the slack.
    TPOT-keeping variant (``tpot_slack`` set, e.g. 0.05): the decode share never drops below
    the *decode floor*, the smallest grid share on which the cost model predicts decode's last
    iteration within ``1 + tpot_slack`` of its whole-device time (``decode_floor``): on a share
    s a kernel needs max(max(compute, issue_frac x memory) / s, memory, link) (emu.py's model:
    memory traffic needs cores to issue it), so a memory-bound decode iteration keeps its
    whole-device speed from about issue_frac of the cores up and prefill gets the rest. Without
    it (the default) the AIMD spends decode's slack below the TPOT budget on prefill.
    Prefill work should arrive chunked (a few layers per op) so that the gate has kernel-level
    granularity; the engine decides the chunking, the policy only gates and partitions.
    The constants were tuned on the chat workload only (docs/scheduling.md).
    """

    name = "flex"

    def __init__(
        self,
        default_tpot_budget_s: float = 0.05,
        max_prefill_slots: int = 4,
        decode_share: float = 0.5,
        low: float = 0.7,
        high: float = 0.8,
        phase_threshold: float = 0.5,
        max_slowdown: float | None = None,
        min_prefill_slots: int = 1,
        share_step: float = 1 / 8,
        min_decode_share: float = 1 / 8,
        max_decode_share: float = 7 / 8,
        share_up: float = 2.0,
        share_down: float = 1.25,
        partition: bool = True,
        tpot_slack: float | None = None,
    ):
        super().__init__()
        if tpot_slack is not None and not 0 <= tpot_slack:
            raise ValueError(f"tpot_slack must be >= 0, not {tpot_slack}")
        if not 0 < min_decode_share <= max_decode_share < 1:
            raise ValueError("need 0 < min_decode_share <= max_decode_share < 1")
        self.default_tpot_budget_s = default_tpot_budget_s
        self.max_prefill_slots = max_prefill_slots
        self.prefill_slots = float(max_prefill_slots)
        self.share_step = share_step
        self.min_decode_share, self.max_decode_share = min_decode_share, max_decode_share
        self.decode_share = min(max_decode_share, max(min_decode_share, decode_share))
        self.share_up, self.share_down = share_up, share_down
        self.partition = partition  # False: ordering/gating only (cpu backend)
        self.low, self.high = low, high
        self.phase_threshold = phase_threshold
        self.max_slowdown = max_slowdown
        self.min_prefill_slots = min_prefill_slots
        self.adjustments = 0
        self._decode_seen: float | None = None  # last completion of a decode op
        self.tpot_slack = tpot_slack
        # decode floor: per decode stream, the predicted time of the current iteration on each
        # grid share (index k: share (k+1) x share_step); the floor from the last closed one
        self._levels = max(1, round(1 / share_step))
        self._iter_at_share: dict[Hashable, list[float]] = {}
        self._floors: dict[Hashable, float] = {}  # per decode stream; the policy keeps the largest
        self.decode_floor: float | None = None

    def _phase(self, q: StreamQueue, device: DeviceState) -> Phase:
        return q.effective_phase(device.ridge, self.phase_threshold)

    def on_complete(self, op, queue, device, now):
        if queue is not None and self._phase(queue, device) is Phase.DECODE:
            self._decode_seen = now

    def shares(self, decode_busy: bool, prefill_busy: bool) -> tuple[float | None, float | None]:
        """(decode, prefill) core shares for ops dispatched now."""
        if not (self.partition and decode_busy and prefill_busy):
            return None, None
        d = _quantize(self.decode_share, self.share_step)
        if self.decode_floor is not None:
            d = max(d, self.decode_floor)
        d = min(d, 1.0 - self.share_step)
        return d, 1.0 - d

    def select(self, queues, device, now):
        out: list[Dispatch] = []
        dec: list[StreamQueue] = []
        pre: list[StreamQueue] = []
        for q in queues:
            (dec if self._phase(q, device) is Phase.DECODE else pre).append(q)
        decode_busy = any(q.ops or q.inflight for q in dec)
        prefill_busy = any(q.ops or q.inflight for q in pre)
        # (the daemon passes only queues with work: an idle decode stream is not in `queues`)
        recent = self._decode_seen is not None and now - self._decode_seen <= max(
            (self.budget(q) for q in dec), default=self.default_tpot_budget_s
        )
        d_share, p_share = self.shares(decode_busy or recent, prefill_busy)
        # decode first, in arrival order across decode streams
        while len(device.inflight) < device.max_inflight:
            ready = [q for q in dec if q.can_dispatch]
            if not ready:
                break
            q = min(ready, key=lambda q: q.ops[0].id)
            if self.tpot_slack is not None:
                self._account_floor(q, q.ops[0].cost, device)
            out.append(self._take(q, device, now, 1.0, d_share))
        slots = math.inf if not decode_busy else int(self.prefill_slots)
        pre_inflight = sum(q.inflight for q in pre)
        while len(device.inflight) < device.max_inflight and pre_inflight < max(
            slots, 0 if decode_busy else 1
        ):
            ready = [q for q in pre if q.can_dispatch]
            if not ready:
                break
            # oldest op first across prefill streams (FCFS keeps TTFT tails short)
            q = min(ready, key=lambda q: q.ops[0].id)
            out.append(self._take(q, device, now, 1.0, p_share))
            pre_inflight += 1
        return out

    def _account_floor(self, q: StreamQueue, cost: Cost, device: DeviceState) -> None:
        """Add a decode op's predicted time on every grid share to its iteration's totals."""
        comp, mem, link = device.model.work(cost)
        spec = device.model.spec
        need = max(comp, spec.issue_frac * mem)  # compute units' work, incl. issuing memory traffic
        fixed = max(mem, link)  # what more cores cannot shorten
        lat = cost.launches * spec.launch_s
        acc = self._iter_at_share.setdefault(q.key, [0.0] * self._levels)
        for k in range(self._levels):
            acc[k] += max(need / ((k + 1) * self.share_step), fixed) + lat

    def _close_floor(self, q: StreamQueue) -> None:
        acc = self._iter_at_share.pop(q.key, None)
        if not acc or acc[-1] <= 0 or self.tpot_slack is None:
            return
        target = (1.0 + self.tpot_slack) * acc[-1]  # acc[-1]: the whole device
        k = next(k for k in range(self._levels) if acc[k] <= target + 1e-15)
        # (prefill keeps at least one grid step: the floor is capped like the AIMD share)
        self._floors[q.key] = min((k + 1) * self.share_step, 1.0 - self.share_step)
        self.decode_floor = max(self._floors.values())

    def on_step(self, queue, device, now):
        if queue.last_step_time is None:
            return
        if self._phase(queue, device) is not Phase.DECODE:
            return
        if self.tpot_slack is not None:
            self._close_floor(queue)
        budget = self.budget(queue)
        t = queue.last_step_time
        if t > self.high * budget:
            self.prefill_slots = max(float(self.min_prefill_slots), math.floor(self.prefill_slots / 2))
            self.decode_share = min(self.max_decode_share, self.decode_share * self.share_up)
            self.adjustments += 1
        elif t < self.low * budget:
            self.prefill_slots = min(float(self.max_prefill_slots), self.prefill_slots + 1)
            self.decode_share = max(self.min_decode_share, self.decode_share / self.share_down)
            self.adjustments += 1

    def budget(self, queue: StreamQueue) -> float:
        """Iteration-time budget of a decode stream (seconds)."""
        b = queue.tpot_budget_s or self.default_tpot_budget_s
        if self.max_slowdown and queue.last_step_pred:
            b = min(b, self.max_slowdown * queue.last_step_pred)
        return b


class StaticPartitionPolicy(Policy):
    """The paper's baseline: a fixed core split, what static vNPU slicing, a fixed
    set_stream_limit per stream, MPS active-thread percentage or fixed green contexts give.
    Prefill streams always run on ``alpha`` of the compute units and decode streams on
    ``1 - alpha``, busy or not (the split is not work-conserving: an idle part's cores stay
    idle); within each part ops go in arrival order, with no gating between the parts."""

    name = "partition"

    def __init__(self, alpha: float = 0.5, phase_threshold: float = 0.5):
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"alpha (prefill core share) must be in (0, 1), not {alpha}")
        self.alpha = float(alpha)
        self.phase_threshold = phase_threshold

    def select(self, queues, device, now):
        out = []
        while len(device.inflight) < device.max_inflight:
            ready = [q for q in queues if q.can_dispatch]
            if not ready:
                break
            q = min(ready, key=lambda q: q.ops[0].id)
            pre = q.effective_phase(device.ridge, self.phase_threshold) is Phase.PREFILL
            out.append(self._take(q, device, now, 1.0, self.alpha if pre else 1.0 - self.alpha))
        return out


POLICIES = {
    "fifo": FifoPolicy,
    "priority": PriorityPolicy,
    "flex": FlexPolicy,
    "partition": StaticPartitionPolicy,
}


def make_policy(name: str, **kwargs: Any) -> Policy:
    """fifo | priority | flex | partition (keyword arguments go to the policy's constructor)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
