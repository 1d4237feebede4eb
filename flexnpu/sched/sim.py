"""Virtual-time serving simulator: engines, devices and the three systems compared.

- ``static-coloc``: every device runs one engine doing both phases, vLLM-V1 style continuous
  batching with chunked prefill (per iteration: all running decodes first, then partial
  prefills, then new prompts, up to ``max_batched_tokens``; ``max_seqs`` sequences).
- ``decode-first`` (alias ``static-coloc-decode-first``): every device runs one engine doing both phases without chunked
  prefill, onboarding new requests only between decode iterations under TGI's router rules
  (``DecodeFirstEngine``): new requests wait behind running decode, the co-location the
  project brief describes ("time-to-first-token explodes").
- ``static-disagg``: ``n_prefill`` devices run prefill-only engines, the rest decode-only
  engines; each prompt's KV cache moves prefill -> decode device over the link (serialised per
  receiving device, at ``spec.link_bw * link_eff``) before decoding starts.
- ``flexnpu``: every device runs a prefill engine and a decode engine as separate streams on one
  ``EmuDevice``; the ``flex`` policy arbitrates at kernel granularity (ordering/gating and core
  shares changed at operator boundaries), KV hand-off is zero-copy (the request joins the
  co-located decode engine with its reservation, no transfer).
- ``static-partition``: the paper's baseline. The same P and D instances on every device, each
  on a fixed share of the compute units (prefill ``alpha``, decode ``1 - alpha``: static vNPU
  slicing / a fixed set_stream_limit / fixed green contexts), fifo within each, same zero-copy
  hand-off (generous: separate vNPU slices would copy the KV within the device).
- ``naive-coloc``: the same P and D instances on one device with no partition and fifo
  dispatch: what two processes get from the device with no virtualization layer.

Single-engine devices (coloc, disagg) take each iteration's time as the sum of its kernels'
solo times, which is what the emulator gives for one stream (tests check this); only the
co-located device needs the emulator's resource sharing.

Seams for the real-time mode: an engine only needs ``plan() / costs(plan) / finish(plan, now)``
and a device only ``run_step(engine, costs, done_callback)``; ``EngineDevice`` and
``FlexDevice`` are the virtual-time implementations (a real-time one submits the same kernels to
daemons and calls back on completion).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from flexnpu.sched.costmodel import Cost, CostModel
from flexnpu.sched.emu import EmuDevice
from flexnpu.sched.models import ModelShape, step_kernels
from flexnpu.sched.policy import (
    DeviceState,
    FifoPolicy,
    FlexPolicy,
    Op,
    Phase,
    Policy,
    StaticPartitionPolicy,
    StreamQueue,
)
from flexnpu.sched.systems import System, parse_system
from flexnpu.sched.workload import Request


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def run(self, max_events: int = 50_000_000) -> None:
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()
            self.events += 1
            if self.events > max_events:
                raise RuntimeError("simulation exceeded its event budget (overloaded or stuck)")


class KVPool:
    """KV-cache token reservations of one device. A request reserves prompt + output tokens at
    admission (no preemption in any system), so a device never over-commits."""

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.used = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


@dataclass
class StepPlan:
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    decodes: list[Request] = field(default_factory=list)


class BatchEngine:
    """Continuous-batching engine (one instance on one device).

    do_prefill/do_decode select coloc (both), prefill-only or decode-only behaviour.
    Callbacks: on_prefilled(req, now) when a prompt completes in a prefill-only engine.
    """

    def __init__(
        self,
        model: ModelShape,
        pool: KVPool,
        do_prefill: bool = True,
        do_decode: bool = True,
        max_batched_tokens: int = 2048,
        max_seqs: int = 256,
        slices: int = 2,
        on_prefilled: Callable[[Request, float], None] | None = None,
        on_finished: Callable[[Request, float], None] | None = None,
        reserve_output: bool = True,
    ):
        self.model, self.pool = model, pool
        self.do_prefill, self.do_decode = do_prefill, do_decode
        self.budget, self.max_seqs, self.slices = max_batched_tokens, max_seqs, slices
        self.on_prefilled, self.on_finished = on_prefilled, on_finished
        self.reserve_output = reserve_output
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.busy = False

    def load(self) -> float:
        """Routing signal: outstanding work in tokens (prompt still to prefill + decode seqs)."""
        return (
            sum(r.prompt - r.prefilled for r in self.waiting)
            + sum(r.prompt - r.prefilled for r in self.running)
            + 64 * (len(self.running) + len(self.waiting))
        )

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def _reserve(self, r: Request) -> bool:
        if r.admitted:
            return True
        need = r.prompt + (r.output if self.reserve_output else 0)
        if self.pool.try_reserve(need):
            r.admitted = True
            return True
        return False

    def plan(self) -> StepPlan | None:
        p = StepPlan()
        budget = self.budget
        for r in self.running:  # running first: decodes, then unfinished prefills
            if r.prefilled >= r.prompt and self.do_decode and r.generated < r.output and budget > 0:
                p.decodes.append(r)
                budget -= 1
        if self.do_prefill:
            for r in self.running:
                if r.prefilled < r.prompt and budget > 0:
                    n = min(budget, r.prompt - r.prefilled)
                    p.chunks.append((r, n))
                    budget -= n
            while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
                r = self.waiting[0]
                if r.prefilled >= r.prompt:  # decode-only engine hand-in, admitted below
                    break
                if not self._reserve(r):
                    break
                self.waiting.popleft()
                self.running.append(r)
                n = min(budget, r.prompt - r.prefilled)
                p.chunks.append((r, n))
                budget -= n
        if self.do_decode:  # decode-only engines admit handed-off requests at iteration start
            while self.waiting and len(self.running) < self.max_seqs and budget > 0:
                r = self.waiting[0]
                if r.prefilled < r.prompt or not self._reserve(r):
                    break
                self.waiting.popleft()
                self.running.append(r)
                p.decodes.append(r)
                budget -= 1
        return p if (p.chunks or p.decodes) else None

    def costs(self, p: StepPlan) -> list[Cost]:
        finishing = sum(1 for r, n in p.chunks if r.prefilled + n >= r.prompt)
        return step_kernels(
            self.model,
            [(n, r.prefilled) for r, n in p.chunks],
            [r.context for r in p.decodes],
            self.slices,
            logits_rows=len(p.decodes) + finishing,
        )

    def finish(self, p: StepPlan, now: float) -> None:
        for r in p.decodes:
            r.generated += 1
            if r.generated >= r.output:
                r.finish = now
                self.running.remove(r)
                self.pool.release(r.prompt + (r.output if self.reserve_output else 0))
                if self.on_finished:
                    self.on_finished(r, now)
        for r, n in p.chunks:
            r.prefilled += n
            if r.prefilled >= r.prompt:
                r.first_token = now
                r.generated = 1
                if r.output <= 1:
                    r.finish = now
                if not self.do_decode or r.output <= 1:
                    self.running.remove(r)
                    if self.on_prefilled and r.output > 1:
                        self.on_prefilled(r, now)
                    else:
                        self.pool.release(r.prompt + (r.output if self.reserve_output else 0))


class DecodeFirstEngine(BatchEngine):
    """Co-location without chunked prefill where new requests wait behind running decode: the
    batching loop of Hugging Face TGI's router (``batching_task`` in router/src/infer.rs,
    v1.x-v2.x; flags ``--waiting-served-ratio``, ``--max-waiting-tokens``,
    ``--max-batch-prefill-tokens``).

    After every decode iteration the router tries to onboard waiting requests, but only when
    (a) nothing is running, or (b) at least ``floor(waiting_served_ratio * running)`` waiting
    requests fit into a new prefill batch, or (c) ``max_waiting_tokens`` decode iterations have
    passed since the last onboarding. An onboarding runs one prefill-only iteration over whole
    prompts (FCFS, at most ``prefill_budget`` prompt tokens, KV reservation and ``max_seqs``
    slots permitting; a single prompt longer than the budget goes alone, as TGI requires
    ``max_batch_prefill_tokens >= max_input_tokens``), pausing the running decodes for it; the
    new requests then join the decode batch. Otherwise the engine decodes and the queue waits.
    Defaults are TGI's: ratio 1.2, 20 iterations, 4096 prefill tokens (TGI 3.x lowered the
    ratio default to 0.3; pass it to model that).
    """

    def __init__(
        self,
        model: ModelShape,
        pool: KVPool,
        prefill_budget: int = 4096,
        max_seqs: int = 256,
        slices: int = 2,
        waiting_served_ratio: float = 1.2,
        max_waiting_tokens: int = 20,
        on_finished: Callable[[Request, float], None] | None = None,
    ):
        super().__init__(model, pool, True, True, prefill_budget, max_seqs, slices, on_finished=on_finished)
        self.ratio, self.max_waiting_tokens = waiting_served_ratio, max_waiting_tokens
        self.since_onboard = 0

    def _onboard(self, min_size: int) -> StepPlan | None:
        picked: list[Request] = []
        tokens, reserved = 0, 0
        for r in self.waiting:
            if len(self.running) + len(picked) >= self.max_seqs:
                break
            if picked and tokens + r.prompt > self.budget:
                break
            need = r.prompt + r.output
            if self.pool.used + reserved + need > self.pool.capacity:
                break
            picked.append(r)
            tokens += r.prompt
            reserved += need
        if not picked or len(picked) < min_size:
            return None
        p = StepPlan()
        for r in picked:
            self.waiting.popleft()
            self._reserve(r)
            self.running.append(r)
            p.chunks.append((r, r.prompt))
        return p

    def plan(self) -> StepPlan | None:
        if self.waiting:
            if not self.running or self.since_onboard >= self.max_waiting_tokens:
                min_size = 1
            else:
                min_size = max(1, math.floor(self.ratio * len(self.running)))
            p = self._onboard(min_size)
            if p is not None:
                self.since_onboard = 0
                return p
        decodes = [r for r in self.running if r.prefilled >= r.prompt and r.generated < r.output]
        if not decodes:
            return None
        self.since_onboard += 1
        return StepPlan(decodes=decodes)


class EngineDevice:
    """A device running one engine; iteration time = sum of its kernels' solo times."""

    def __init__(self, loop: EventLoop, cm: CostModel, engine: BatchEngine, step_overhead_s: float = 0.0):
        self.loop, self.cm, self.engine, self.overhead = loop, cm, engine, step_overhead_s
        self.busy_s = 0.0

    def kick(self) -> None:
        if self.engine.busy:
            return
        p = self.engine.plan()
        if p is None:
            return
        dt = sum(self.cm.predict(c) for c in self.engine.costs(p)) + self.overhead
        self.busy_s += dt
        self.engine.busy = True

        def done() -> None:
            self.engine.busy = False
            self.engine.finish(p, self.loop.now)
            self.kick()

        self.loop.at(self.loop.now + dt, done)


class FlexDevice:
    """A device with a prefill engine and a decode engine sharing one EmuDevice under a Policy."""

    def __init__(
        self,
        loop: EventLoop,
        cm: CostModel,
        engines: dict[str, BatchEngine],
        policy: Policy,
        tpot_budget_s: float,
        step_overhead_s: float = 0.0,
    ):
        self.loop, self.policy = loop, policy
        self.emu = EmuDevice(CostModel(cm.spec))  # ground truth: uncorrected
        self.state = DeviceState(CostModel(cm.spec))  # the policy's view
        self.engines = engines
        self.overhead = step_overhead_s
        self.queues = {
            "prefill": StreamQueue("prefill", Phase.PREFILL, priority=0),
            "decode": StreamQueue("decode", Phase.DECODE, priority=1, tpot_budget_s=tpot_budget_s),
        }
        self._left: dict[str, int] = {}
        self._plans: dict[str, StepPlan] = {}
        self._wake_at = math.inf

    def kick(self) -> None:
        for name, eng in self.engines.items():
            if eng.busy:
                continue
            p = eng.plan()
            if p is None:
                continue
            costs = eng.costs(p)
            eng.busy = True
            self._plans[name] = p
            self._left[name] = len(costs)
            q = self.queues[name]
            for i, c in enumerate(costs):
                q.push(Op(c, self.loop.now, tag=name, step_end=(i == len(costs) - 1)))
        self._pump()

    def _pump(self) -> None:
        now = self.loop.now
        for d in self.policy.select(list(self.queues.values()), self.state, now):
            self.emu.submit(d.queue.key, d.op.cost, now, weight=d.weight, tag=d.op, share=d.share)
        t = self.emu.next_event_time()
        if t is not None and (t < self._wake_at - 1e-12 or self._wake_at <= now):
            self._wake_at = t
            self.loop.at(t, self._wake)

    def _wake(self) -> None:
        now = self.loop.now
        if self._wake_at <= now + 1e-12:
            self._wake_at = math.inf
        finished_steps = []
        for k in self.emu.advance(now):
            op: Op = k.tag
            self.policy.complete(op, self.state, now)  # emu is ground truth: no correction feed
            self._left[op.tag] -= 1
            if self._left[op.tag] == 0:
                finished_steps.append(op.tag)
        for name in finished_steps:
            if self.overhead > 0:
                self.loop.at(now + self.overhead, functools.partial(self._step_done, name))
            else:
                self._step_done(name, kick=False)
        if finished_steps and self.overhead <= 0:
            self.kick()
        else:
            self._pump()

    def _step_done(self, name: str, kick: bool = True) -> None:
        eng = self.engines[name]
        eng.busy = False
        eng.finish(self._plans.pop(name), self.loop.now)
        if kick:
            self.kick()


@dataclass
class SimConfig:
    max_batched_tokens: int = 2048  # vLLM V1 default for online serving on <70 GiB cards
    max_seqs: int = 256  # vLLM default max_num_seqs
    prefill_budget: int = 8192  # prefill-only engines (disagg) batch larger
    flex_prefill_chunk: int = (
        1024  # FlexNPU prefill engine chunk: best goodput of 512/1024/2048 (docs/scheduling.md)
    )
    flex_prefill_slices: int = 2  # FlexNPU prefill kernels per iteration (layer groups): gate granularity
    slices: int = 2
    decode_first_prefill_tokens: int = 4096  # TGI --max-batch-prefill-tokens default
    waiting_served_ratio: float = 1.2  # TGI --waiting-served-ratio default (v1.x-v2.x)
    max_waiting_tokens: int = 20  # TGI --max-waiting-tokens default
    tpot_budget_s: float = 0.05
    step_overhead_s: float = 0.0
    partition_alpha: float = 0.5  # static-partition: prefill instance's core share
    # flexnpu's TPOT-keeping variant: the decode share's floor keeps decode's iteration within
    # 1 + slack of its whole-device time (FlexPolicy.tpot_slack); None: the default policy
    flex_tpot_slack: float | None = None


def _least_loaded(devs: list) -> Any:
    """The router of single-engine devices: each request to the least loaded engine."""

    def route(r: Request) -> None:
        d = min(devs, key=lambda d: d.engine.load())
        d.engine.add(r)
        d.kick()

    return route


def simulate(
    system: str,
    model: ModelShape,
    cm: CostModel,
    requests: list[Request],
    n_devices: int,
    n_prefill: int = 0,
    cfg: SimConfig | None = None,
    policy_factory: Callable[[], Policy] | None = None,
) -> dict:
    """Run one system over `requests` (mutated in place) on n_devices; returns run statistics."""
    system = parse_system(system)
    cfg = cfg or SimConfig()
    loop = EventLoop()
    cap = model.kv_capacity_tokens(cm.spec.mem_bytes)
    devs: list[EngineDevice] | list[FlexDevice]
    if system == System.STATIC_COLOC:
        devs = [
            EngineDevice(
                loop,
                cm,
                BatchEngine(model, KVPool(cap), True, True, cfg.max_batched_tokens, cfg.max_seqs, cfg.slices),
                cfg.step_overhead_s,
            )
            for _ in range(n_devices)
        ]

        route = _least_loaded(devs)
    elif system == System.DECODE_FIRST:
        devs = [
            EngineDevice(
                loop,
                cm,
                DecodeFirstEngine(
                    model,
                    KVPool(cap),
                    cfg.decode_first_prefill_tokens,
                    cfg.max_seqs,
                    cfg.slices,
                    cfg.waiting_served_ratio,
                    cfg.max_waiting_tokens,
                ),
                cfg.step_overhead_s,
            )
            for _ in range(n_devices)
        ]

        route = _least_loaded(devs)
    elif system.colocated:
        fdevs: list[FlexDevice] = []
        for _ in range(n_devices):
            pool = KVPool(cap)
            dec = BatchEngine(model, pool, False, True, cfg.max_seqs, cfg.max_seqs, cfg.slices)

            def handoff(r: Request, now: float, dec=dec) -> None:
                dec.add(r)  # zero-copy: same device, same KV reservation

            pre = BatchEngine(
                model,
                pool,
                True,
                False,
                cfg.flex_prefill_chunk,
                cfg.max_seqs,
                cfg.flex_prefill_slices,
                on_prefilled=handoff,
            )
            if system in (System.FLEXNPU, System.FLEXNPU_TPOT):  # the variant: cfg.flex_tpot_slack
                pol = (
                    policy_factory()
                    if policy_factory
                    else FlexPolicy(default_tpot_budget_s=cfg.tpot_budget_s, tpot_slack=cfg.flex_tpot_slack)
                )
            elif system == System.STATIC_PARTITION:
                pol = StaticPartitionPolicy(cfg.partition_alpha)
            else:
                pol = FifoPolicy()
            fd = FlexDevice(
                loop, cm, {"decode": dec, "prefill": pre}, pol, cfg.tpot_budget_s, cfg.step_overhead_s
            )
            fdevs.append(fd)
        devs = fdevs

        def route(r: Request) -> None:
            d = min(fdevs, key=lambda d: d.engines["prefill"].load() + d.engines["decode"].load())
            d.engines["prefill"].add(r)
            d.kick()
    elif system == System.STATIC_DISAGG:
        if not 0 < n_prefill < n_devices:
            raise ValueError("static-disagg needs 0 < n_prefill < n_devices")
        dec_devs: list[EngineDevice] = []
        link_free = [0.0] * (n_devices - n_prefill)
        kv_bw = cm.spec.link_bw * cm.spec.link_eff

        def to_decode(r: Request, now: float) -> None:
            i = min(
                range(len(dec_devs)),
                key=lambda i: dec_devs[i].engine.load() + len(dec_devs[i].engine.running),
            )
            start = max(now, link_free[i])
            t = start + r.prompt * model.kv_bytes_per_token / kv_bw
            link_free[i] = t

            def arrive(i=i, r=r) -> None:
                dec_devs[i].engine.add(r)
                dec_devs[i].kick()

            loop.at(t, arrive)

        pre_devs = [
            EngineDevice(
                loop,
                cm,
                BatchEngine(
                    model,
                    KVPool(cap),
                    True,
                    False,
                    cfg.prefill_budget,
                    cfg.max_seqs,
                    cfg.slices,
                    on_prefilled=to_decode,
                    reserve_output=False,
                ),
                cfg.step_overhead_s,
            )
            for _ in range(n_prefill)
        ]

        # a prefill device frees the prompt's KV once it has been sent; approximated as at send
        for d in pre_devs:
            eng = d.engine
            orig = eng.on_prefilled

            def sent(r: Request, now: float, eng=eng, orig=orig) -> None:
                eng.pool.release(r.prompt)
                orig(r, now)

            eng.on_prefilled = sent
        dec_devs += [
            EngineDevice(
                loop,
                cm,
                BatchEngine(model, KVPool(cap), False, True, cfg.max_seqs, cfg.max_seqs, cfg.slices),
                cfg.step_overhead_s,
            )
            for _ in range(n_devices - n_prefill)
        ]
        devs = pre_devs + dec_devs

        route = _least_loaded(pre_devs)
    else:
        raise ValueError(f"unknown system {system!r}")

    for r in requests:
        loop.at(r.arrival, functools.partial(route, r))
    loop.run()
    unfinished = sum(1 for r in requests if r.finish is None)
    if unfinished:
        raise RuntimeError(f"{system}: {unfinished} requests never finished (KV capacity too small?)")
    out = {"events": loop.events, "end": loop.now}
    flex_devs = [d for d in devs if isinstance(d, FlexDevice)]
    if flex_devs:  # partition changes (each cost spec.repartition_s of launch latency)
        out["repartitions"] = sum(d.emu.repartitions(k) for d in flex_devs for k in d.queues)
    return out


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def metrics(requests: list[Request], ttft_slo_s: float, tpot_slo_s: float) -> dict:
    done = [r for r in requests if r.finish is not None]
    t0 = min(r.arrival for r in requests)
    t1 = max(r.finish for r in done if r.finish is not None)  # (all of them; narrows for mypy)
    toks = sum(r.output for r in done)
    ttft = [r.ttft for r in done if r.ttft is not None]  # (all: a finished request has a first token)
    tpot = [r.tpot for r in done if r.tpot is not None]
    ok = sum(
        1
        for r in done
        if r.ttft is not None and r.ttft <= ttft_slo_s and (r.tpot is None or r.tpot <= tpot_slo_s)
    )
    return {
        "throughput_tok_s": toks / (t1 - t0),
        "completed": len(done),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "slo_attainment": ok / len(requests),
    }
