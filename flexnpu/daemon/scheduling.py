"""How the daemon picks the next commands to run from all clients' stream queues.

A scheduler sees every (session, stream) queue. `run_round()` executes some ready commands and
returns how many ran; `idle_timeout()` says how long the loop may sleep when nothing is ready
(None = until a request arrives).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

from .. import protocol as P
from ..protocol import Op
from ..sched.costmodel import (
    COPY,
    ELEMENTWISE,
    Cost,
    CostModel,
    aten_cost,
    copy_cost,
    default_corrections_path,
    load_corrections,
    total,
)
from ..sched.policy import (
    DeviceState,
    FlexPolicy,
    Op as PolicyOp,
    Phase,
    StaticPartitionPolicy,
    StreamQueue,
    make_policy,
)
from ..sched.specs import get_spec
from .backends.partition import Partitionable, partition_capable
from .interfaces import Backend, ClientView, Scheduler, SchedulerHost
from .objects import StreamState
from .policies import parse_policy

if TYPE_CHECKING:
    from ..sched.emu import EmuDevice

ROUND_QUANTUM = 64  # commands one stream may run per round before others get a turn


class FifoScheduler:
    """Passthrough baseline: round-robin over ready streams, in each stream's order."""

    name = "fifo"

    inline = True  # commands may run at drain time when nothing is queued ahead of them

    def __init__(self, daemon: SchedulerHost) -> None:
        self.daemon = daemon
        self.active: dict[tuple[int, int], tuple[Any, Any]] = {}  # queues with work, by (client, stream)

    def activate(self, s: ClientView, st: StreamState) -> None:
        self.active[(s.cid, st.sid)] = (s, st)

    def run_round(self) -> int:
        if not self.active:
            return 0
        ran = 0
        for key, (s, st) in list(self.active.items()):
            q = st.queue
            for _ in range(ROUND_QUANTUM):
                if not q or s.dead:
                    break
                cmd = q[0]
                if cmd.ready is not None and not cmd.ready():
                    break
                q.popleft()
                s.execute(st, cmd)
                ran += 1
            if not q or s.dead or s.streams.get(st.sid) is not st:
                self.active.pop(key, None)
        return ran

    def idle_timeout(self) -> float | None:
        return None

    def busy(self, s: ClientView) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        return {"policy": self.name, "inline": True}


# ====================================================================== policy-driven scheduling

# Commands that occupy the device (they have a cost); everything else a stream queues
# (event records and waits, stream syncs, graph marks, nops) runs once the stream's earlier
# device commands have completed, which is what keeps stream order and event semantics.
_DEVICE_OPS = frozenset({Op.LAUNCH, Op.MEMSET, Op.MEMCPY_H2D, Op.MEMCPY_D2H, Op.MEMCPY_D2D, Op.GRAPH_REPLAY})


def _tensor_meta(v: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    if isinstance(v, P.TensorRef):
        out.append((v.shape, v.dtype))
    elif isinstance(v, (list, tuple)):
        for x in v:
            _tensor_meta(x, out)
    return out


def launch_cost(
    op: str, ins: list[tuple[Any, Any]], outs: list[tuple[Any, Any]], attrs: dict[str, Any] | None = None
) -> Cost:
    """Cost of one launch of `op` from its tensors' (shape, dtype)."""
    try:
        return aten_cost(op, ins, outs, attrs or {})
    except (ValueError, TypeError, IndexError, KeyError):
        # malformed for the cost model (execution will report the real error): read+write
        return Cost(0.0, float(sum(_nbytes(s, d) for s, d in ins + outs)), 0.0, ELEMENTWISE)


def command_cost(cmd: Any) -> Cost:
    """Cost of one queued device command (cached on the command: graphs replay it)."""
    cached: Cost | None = cmd.cost
    if cached is not None:
        return cached
    op = cmd.op
    if op == Op.LAUNCH:
        launch = cmd.a[0]
        ins = _tensor_meta(launch.args, [])
        _tensor_meta(list(launch.kwargs.values()), ins)
        outs = [(ref.shape, ref.dtype) for _, ref in launch.outputs]
        attrs = {k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, float))}
        c = launch_cost(launch.op, ins, outs, attrs)
    elif op == Op.MEMCPY_H2D:
        c = copy_cost(len(cmd.a[3]), remote=True)  # host link: charged at the spec's link rate
    elif op == Op.MEMCPY_D2H:
        c = copy_cost(cmd.a[3], remote=True)
    elif op == Op.MEMCPY_D2D:
        c = copy_cost(cmd.a[6])
    elif op == Op.MEMSET:
        c = Cost(0.0, float(cmd.a[4]), 0.0, COPY)
    elif op == Op.GRAPH_REPLAY:
        c = total(command_cost(x) for x in cmd.a[0].ops if x.op in _DEVICE_OPS)
    else:
        c = Cost(launches=0)
    cmd.cost = c
    return c


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    n = 1
    for x in shape:
        n *= max(0, int(x))
    return n * getattr(dtype, "itemsize", 4)


def local_cost_model(backend: Backend) -> CostModel:
    """The cost model of the device a torch backend drives, with saved corrections if any."""
    kind = getattr(backend, "device_type", "cpu")
    name = str(backend.info().get("name", "")).lower()
    if kind == "cuda":
        spec = get_spec("a100" if "a100" in name else "h100")
    elif kind == "npu":
        spec = get_spec("910c" if "910c" in name else "910b")
    else:
        spec = get_spec("cpu")
    corr = None
    path = default_corrections_path(spec.name)
    if path.exists():
        try:
            corr = load_corrections(path)
        except (OSError, ValueError, KeyError):
            corr = None
    return CostModel(spec, corr)


class _Inflight:
    """An emulated kernel's bookkeeping: what to do when EmuDevice says it finished."""

    __slots__ = ("op", "s", "st", "held")

    def __init__(self, op: PolicyOp, s: Any, st: Any, held: list[tuple[Any, ...]]) -> None:
        self.op, self.s, self.st, self.held = op, s, st, held


class PolicyScheduler:
    """fifo | priority | flex | partition from flexnpu.sched.policy, in real time.

    Every device command becomes a policy ``Op`` in a ``StreamQueue`` per (client, stream)
    (phase from the stream's declared phase, priority from its stream priority: lower number =
    higher priority, as in CUDA/ACL). ``policy.select`` decides what the device runs next.
    - torch backends: dispatch = execute now, then ``policy.complete`` with the measured time
      (cpu only: a cuda/npu launch returns before the kernel ran, so its span is not a kernel time).
    - emu backends: dispatch = do the command's data effects and submit its cost to the
      backend's EmuDevice; replies the command posted are held until the emulated kernel
      completes; ``idle_timeout`` is the time to the next emulated completion.
    Iteration ends for the flex policy's TPOT control: the last device command before a
    STEP_MARK (``Client.mark_step``, ``torch.npu.mark_step``) or, for engines that never mark,
    before a synchronisation of the stream.
    Core shares: each dispatch may carry a share (flex, partition); on a backend with the
    partition capability (flexnpu.daemon.backends.partition) the scheduler sets the stream's
    share just before executing the command, so a change lands at an operator boundary; on
    others (cpu) shares are not applied and the flex policy is told so (ordering/gating only).
    """

    inline = False

    def __init__(
        self,
        daemon: SchedulerHost,
        policy: str,
        tpot_budget_s: float | None = None,
        alpha: float | None = None,
    ) -> None:
        self.daemon = daemon
        be = daemon.backend
        self.emu: EmuDevice | None = getattr(be, "emu", None)
        self.partition = partition_capable(be)
        kw: dict[str, Any] = {}
        if policy == "flex":
            kw["partition"] = self.partition
            if tpot_budget_s:
                kw["default_tpot_budget_s"] = tpot_budget_s
            if alpha is not None:  # flex:SLACK (parse_policy): the TPOT-keeping variant
                kw["tpot_slack"] = alpha
        if policy == "partition" and alpha is not None:
            kw["alpha"] = alpha
        self.policy = make_policy(policy, **kw)
        self.name = policy
        self.shares: dict[tuple[int, int], float | None] = {}  # share last set per stream
        # (an emulated device: the emu backend, which has a spec the Backend protocol does not name)
        model = CostModel(be.spec) if self.emu is not None else local_cost_model(be)  # type: ignore[attr-defined]
        # A shallow device queue: kernels wait in the policy's queues, where the policy can still
        # reorder them. Two per stream keep the next kernel queued on the device while one
        # runs, so stream-ordered kernels chain without gaps from the loop's wake-up latency.
        self.state = DeviceState(model, max_inflight=16)
        self.per_stream_inflight = 2
        self.measure = self.emu is None and getattr(be, "device_type", "") == "cpu"
        self.queues: dict[tuple[int, int], StreamQueue] = {}
        self.streams: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.active: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.inflight: dict[tuple[int, int], int] = {}
        self.last_op: dict[tuple[int, int], PolicyOp] = {}

    def activate(self, s: ClientView, st: StreamState) -> None:
        key = (s.cid, st.sid)
        self.active[key] = (s, st)
        self.streams[key] = (s, st)

    # ------------------------------------------------------------------ the round
    def run_round(self) -> int:
        emu = self.emu
        n = self._completions(emu) if emu is not None else 0
        if self.active:
            n += self._pump()
        n += self._dispatch()
        return n

    def _queue(self, key: tuple[int, int], st: Any) -> StreamQueue:
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = StreamQueue(
                key, _phase(st.phase), -st.priority, max_inflight=self.per_stream_inflight
            )
            self.inflight[key] = 0
        else:
            q.phase = _phase(st.phase)  # SET_PHASE may have changed it
        return q

    def _pump(self) -> int:
        """Move each active stream's queued commands into its policy queue; run the non-device
        commands whose predecessors have all completed."""
        ran = 0
        now = time.monotonic()
        for key, (s, st) in list(self.active.items()):
            if s.dead or s.streams.get(st.sid) is not st:
                self._forget(key)
                continue
            q = self._queue(key, st)
            cq = st.queue
            while cq:
                cmd = cq[0]
                if cmd.op == Op.STEP_MARK and not cmd.sync:
                    # not a barrier: it closes the iteration and the next one's kernels follow
                    cq.popleft()
                    self._mark_step(key, q)
                    continue
                if cmd.op in _DEVICE_OPS:
                    cq.popleft()
                    op = q.push(PolicyOp(command_cost(cmd), now, tag=(s, st, cmd), step_end=cmd.sync))
                    self.last_op[key] = op
                    continue
                if q.ops or self.inflight.get(key):
                    if cmd.sync and key in self.last_op:
                        self.last_op[key].step_end = True  # the client waits here: an iteration ends
                    break
                if cmd.op == Op.STEP_MARK:
                    self._mark_step(key, q)
                if cmd.ready is not None and not cmd.ready():
                    break
                cq.popleft()
                s.execute(st, cmd)
                ran += 1
                if s.dead or s.streams.get(st.sid) is not st:
                    break
            if s.dead or s.streams.get(st.sid) is not st:
                self._forget(key)
            elif not cq:
                self.active.pop(key, None)
        return ran

    def _forget(self, key: tuple[int, int]) -> None:
        self.active.pop(key, None)
        self.shares.pop(key, None)
        self.streams.pop(key, None)
        self.last_op.pop(key, None)
        q = self.queues.get(key)
        if q is not None:
            q.ops.clear()
            if not self.inflight.get(key):
                del self.queues[key]
                self.inflight.pop(key, None)

    def _mark_step(self, key: tuple[int, int], q: StreamQueue) -> None:
        """STEP_MARK: the last device command before it ends an iteration."""
        op = self.last_op.pop(key, None)
        if op is None:
            return  # no kernel since the previous mark
        if op.finished is None:
            op.step_end = True  # closes the iteration when it completes
        else:
            self.policy.end_step(q, self.state, op.finished)

    def _dispatch(self) -> int:
        queues = [q for q in self.queues.values() if q.ops or q.inflight]
        if not queues or not any(q.ops for q in queues):
            return 0
        now = time.monotonic()
        n = 0
        for d in self.policy.select(queues, self.state, now):
            n += 1
            s, st, cmd = d.op.tag
            key: tuple[int, int] = d.queue.key  # type: ignore[assignment]  # our queues: (client, stream)
            if s.dead or s.streams.get(st.sid) is not st:
                self.policy.complete(d.op, self.state, now)
                continue
            if self.partition and self.shares.get(key, None) != d.share:
                # the lever: applies to this command and the stream's later ones
                cast(Partitionable, self.daemon.backend).set_partition({st.device_stream: d.share})
                self.shares[key] = d.share
            if self.emu is None:
                t0 = time.monotonic()
                s.execute(st, cmd)
                t1 = time.monotonic()
                self.policy.complete(d.op, self.state, t1, started=t0 if self.measure else None)
                if st.queue:
                    self.active[key] = (s, st)
                continue
            s.held = []
            try:
                s.execute(st, cmd)
            finally:
                held, s.held = s.held, None
            w = d.weight if self.name == "priority" else d.weight * 2.0 ** (-st.priority)
            self.emu.submit(
                key,
                d.op.cost,
                max(now, self.emu.now),
                weight=w,
                tag=_Inflight(d.op, s, st, held),
                share=getattr(st.device_stream, "share", None),
            )
            self.inflight[key] = self.inflight.get(key, 0) + 1
        return n

    def _completions(self, emu: EmuDevice) -> int:
        done = emu.advance(max(time.monotonic(), emu.now))
        for k in done:
            f: _Inflight = k.tag
            key: tuple[int, int] = f.op.stream
            self.inflight[key] = max(0, self.inflight.get(key, 0) - 1)
            # emu is ground truth: no correction (k.finished is set: advance() returns finished kernels)
            self.policy.complete(f.op, self.state, k.finished)  # type: ignore[arg-type]
            s, st = f.s, f.st
            if s.dead:
                if not self.inflight[key] and key not in self.streams:
                    self.queues.pop(key, None)
                    self.inflight.pop(key, None)
                continue
            for r in f.held:
                s.reply(*r)
            if st.queue:
                self.active[key] = (s, st)
        return len(done)

    def idle_timeout(self) -> float | None:
        t = self.emu.next_event_time() if self.emu is not None else None
        w = self.policy.next_wakeup(time.monotonic())
        if w is not None:
            t = w if t is None else min(t, w)
        if t is None:
            return None
        return max(0.0, t - time.monotonic())

    # ------------------------------------------------------------------ introspection
    def busy(self, s: ClientView) -> bool:
        """True while device work of this client is queued in the policy or in flight."""
        return any(k[0] == s.cid and (q.ops or self.inflight.get(k)) for k, q in self.queues.items())

    def status(self) -> dict[str, Any]:
        ridge = self.state.ridge
        streams = []
        for (cid, sid), q in list(self.queues.items()):
            pair = self.streams.get((cid, sid))
            waiting = len(pair[1].queue) if pair else 0
            phase = _phase(pair[1].phase) if pair else q.phase
            streams.append(
                {
                    "client_id": cid,
                    "stream": sid,
                    "phase": phase.value,
                    "effective_phase": q.effective_phase(ridge).value,
                    "priority": q.priority,
                    "queued": len(q.ops) + waiting,
                    "inflight": self.inflight.get((cid, sid), 0),
                    "steps": q.steps,
                    "last_step_ms": None if q.last_step_time is None else round(q.last_step_time * 1e3, 3),
                }
            )
        out: dict[str, Any] = {"policy": self.name, "streams": streams, "inflight": len(self.state.inflight)}
        out["partition"] = self.partition
        if isinstance(self.policy, FlexPolicy):
            out.update(
                prefill_slots=self.policy.prefill_slots,
                decode_share=self.policy.decode_share,
                adjustments=self.policy.adjustments,
                tpot_slack=self.policy.tpot_slack,
                decode_floor=self.policy.decode_floor,
            )
        if isinstance(self.policy, StaticPartitionPolicy):
            out["alpha"] = self.policy.alpha
        if self.emu is not None:
            out["emulated"] = {
                "spec": self.emu.spec.name,
                "completed": self.emu.completed_count,
                "utilization": [round(x, 3) for x in self.emu.utilization()],
            }
        return out


def _phase(p: str) -> Phase:
    try:
        return Phase(p)
    except ValueError:
        return Phase.AUTO


def make_scheduler(name: str, daemon: SchedulerHost, tpot_budget_s: float | None = None) -> Scheduler:
    """fifo on a torch backend keeps the inline passthrough (the sync-call fast path); every
    other combination runs the policy from flexnpu.sched.policy."""
    name, alpha = parse_policy(name)
    if name == "fifo" and getattr(daemon.backend, "emu", None) is None:
        return FifoScheduler(daemon)
    return PolicyScheduler(daemon, name, tpot_budget_s, alpha)
