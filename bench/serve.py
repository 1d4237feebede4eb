"""Serving comparison (emulated): static core partition, naive co-location, chunked-prefill
co-location, decode-first co-location, static PD disaggregation and FlexNPU.

Systems (``system`` in --json):
- static-partition: the paper's baseline. A prefill instance and a decode instance on every
  device with a fixed core split: prefill on a share alpha of the compute units, decode on
  1 - alpha (static vNPU slicing, a fixed aclrtSetStreamResLimit, MPS percentage or fixed green
  contexts). Knob: alpha.
- naive-coloc: the same two instances on one device, fifo, no partition (no virtualization
  layer at all). Knob: the prefill instance's chunk.
- static-coloc: one vLLM-V1-style engine per device (chunked prefill). Knob: token budget.
- decode-first: one TGI-router-style engine per device (new requests wait behind running
  decode). Knob: --waiting-served-ratio.
- static-disagg: p prefill devices and N-p decode devices. Knob: the split p (every split
  there is); also reported: the continuous-split bound (flexnpu/sched/capacity.py).
- flexnpu: the two instances under the flex policy (ordering/gating and core shares changed at
  operator boundaries). Knob: the prefill instance's chunk.
- flexnpu-tpot: the flex policy's TPOT-keeping variant (FlexPolicy.tpot_slack =
  FLEX_TPOT_SLACK, tuned on chat only): decode's core share never drops below the share that
  keeps its iteration within 1 + slack of its whole-device time; prefill gets the rest. Knob:
  the prefill instance's chunk. Compared with every baseline like flexnpu (its own summary).

Every system's knob is searched over the same number of values (three each; static-disagg: every
split) and every comparison uses each system at its best value: the one with the highest goodput
(the highest Poisson rate with >= 90% of requests meeting both SLOs, by bisection with a fixed
span of arrivals per probe). The per-rate runs then repeat each system at its best knob at a grid
of rates, each run's length doubled until TTFT p50 and SLO attainment stop changing (or the
cap is reached); every row carries its SLO attainment and the TTFT floor (a prompt's prefill on
an idle device, which bounds any TTFT reduction). --quick runs the same systems and knob values
with fewer, shorter probes, one seed and no run-length doubling (indicative figures; it says so).

Default: Qwen2.5-7B on Ascend 910B-class devices (4 devices), chat and long-prompt workloads.
--simulate: the cluster study, DeepSeek-R1 on 910C, a unit of 8 devices scaled to 16..384.
Every figure is produced in virtual time by the cost model + emulated accelerator
(``"emulated": true``); no accelerator is used.

--realtime: engines as real client processes on real FlexNPU daemons with the emulated backend
(`--backend emu:910b`): kernels take the cost model's time in real time, scheduling is the
daemon's policy (bench/_realtime.py), static-partition through the daemon's ``partition``
policy (fixed core shares on the backend's partition capability). --quick: 8 requests per
device at 4 req/s per device (chat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from ._common import progress
from flexnpu.sched.systems import System
from flexnpu.sched.capacity import continuous_split_bound, requests_for, sustainable_rate, ttft_floors
from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import MODELS, step_kernels
from flexnpu.sched.sim import SimConfig, metrics, percentile, simulate
from flexnpu.sched.specs import get_spec
from flexnpu.sched.workload import WORKLOADS, generate

# offered load per device (req/s), chosen to span light load to past saturation per model
RATES_PER_DEVICE = {
    "qwen2.5-7b": {"chat": [2, 4, 6, 8], "long": [0.5, 1.0, 1.5, 2.0], "reasoning": [0.5, 1.0, 2.0, 3.0]},
    "deepseek-r1": {"chat": [2, 4, 6, 8], "long": [0.5, 1.0, 1.5, 2.0], "reasoning": [1.0, 2.0, 3.0, 4.0]},
}
SLO = {
    "qwen2.5-7b": {"ttft": 2.0, "ttft_long": 8.0, "tpot": 0.05},
    "deepseek-r1": {"ttft": 2.0, "ttft_long": 8.0, "tpot": 0.1},
}
SLO_ATTAINMENT = 0.9

# The systems in report order, and each one's knob: (SimConfig field, values searched). The same
# number of values for every system (static-disagg: every split of the device group).
SYSTEMS = (
    System.STATIC_PARTITION,
    System.NAIVE_COLOC,
    System.STATIC_COLOC,
    System.DECODE_FIRST,
    System.STATIC_DISAGG,
    System.FLEXNPU,
    System.FLEXNPU_TPOT,
)
FLEX_SYSTEMS = (System.FLEXNPU, System.FLEXNPU_TPOT)  # the systems compared with every baseline
# flexnpu-tpot's decode-floor slack (FlexPolicy.tpot_slack): tuned on chat only, at 8 req/s per
# device, 10 s of arrivals, chunk 1024 (docs/scheduling.md); reported unchanged on the others
FLEX_TPOT_SLACK = 0.05
KNOBS = {
    System.STATIC_PARTITION: ("partition_alpha", (0.625, 0.75, 0.875)),
    System.NAIVE_COLOC: ("flex_prefill_chunk", (512, 1024, 2048)),
    System.STATIC_COLOC: ("max_batched_tokens", (512, 1024, 2048)),
    System.DECODE_FIRST: ("waiting_served_ratio", (0.3, 1.2, 2.4)),
    System.STATIC_DISAGG: ("prefill_devices", None),
    System.FLEXNPU: ("flex_prefill_chunk", (512, 1024, 2048)),
    System.FLEXNPU_TPOT: ("flex_prefill_chunk", (512, 1024, 2048)),
}
# Probe effort, (full, --quick): seconds of arrivals per goodput probe, bisection steps, seeds
# averaged per probe, per-rate base run length and how often it may double.
CAPACITY_DURATION_S = {"chat": (20, 10), "long": (40, 20), "reasoning": (120, 60)}
CAPACITY_STEPS = (3, 2)  # over [2nd rate of the grid, 1.5 x the last] (expanded when outside): ~15 % / ~30 %
CAPACITY_SEEDS = (1, 1)
RUN_DURATION_S = {"chat": (15, 10), "long": (30, 20), "reasoning": (80, 60)}
RUN_DOUBLINGS = (1, 0)
STABLE_TTFT_REL, STABLE_ATTAINMENT_ABS = 0.10, 0.02  # "stopped changing" between two lengths


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="flexnpu bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--simulate", action="store_true", help="cluster study (DeepSeek-R1, 910C, 16-384 devices)"
    )
    p.add_argument(
        "--realtime",
        action="store_true",
        help="engines as real processes on real daemons with the emulated backend (emu:910b)",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=4,
        help="--realtime: layer groups per iteration (one projection mm + attention per group)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="same systems and knob values, fewer and shorter probes, one seed (indicative)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print {'runs': [...], 'summary': [...], 'capacity': [...]} as JSON",
    )
    p.add_argument("--plot", metavar="PNG", help="write TTFT/TPOT p50 vs request rate to this PNG")
    p.add_argument(
        "--model", choices=sorted(MODELS), help="model (default: qwen2.5-7b, or deepseek-r1 with --simulate)"
    )
    p.add_argument("--spec", help="device spec (default 910b, or 910c with --simulate)")
    p.add_argument("--workloads", help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--systems", help=f"comma list from {','.join(SYSTEMS)} (default: all)")
    p.add_argument(
        "--devices",
        type=int,
        help="device group size (default 4; the --simulate unit is 8; --realtime: 2, at least 2)",
    )
    p.add_argument(
        "--clusters", default="16,64,384", help="--simulate: cluster sizes (multiples of the unit)"
    )
    p.add_argument("--requests", type=int, help="--realtime: requests per run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="processes for the searches and runs (default: CPUs, at most 4)",
    )
    p.add_argument(
        "--alphas",
        metavar="A,A,...",
        help="static-partition prefill core shares searched (default 0.625,0.75,0.875)",
    )
    p.add_argument(
        "--coloc-budgets",
        metavar="N,N,...",
        help="static-coloc token budgets searched (default 512,1024,2048)",
    )
    p.add_argument(
        "--flex-chunks",
        metavar="N,N,...",
        help="flexnpu (and naive-coloc) prefill chunk sizes searched (default 512,1024,2048)",
    )
    p.add_argument(
        "--capacity-duration",
        type=float,
        metavar="S",
        help="seconds of arrivals per goodput probe (default per workload: chat 20, long 40, "
        "reasoning 120; --quick: 10/20/60)",
    )
    p.add_argument(
        "--capacity-steps",
        type=int,
        metavar="N",
        help="bisection steps per goodput search after bracketing (default 3; --quick: 2); resolution "
        "about (1.5 x last / 2nd grid rate) ** (1 / 2**N)",
    )
    p.add_argument(
        "--goodput-only",
        action="store_true",
        help="only the goodput searches (no per-rate runs), e.g. a finer search at chosen knobs",
    )
    p.add_argument(
        "--backend",
        help="--realtime: the daemons' backend (default emu:<spec>; cuda or npu runs the "
        "engines' kernels on the real device, random weights)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=2048,
        help="--realtime: static-coloc chunked-prefill token budget",
    )
    return p.parse_args(argv)


def estimate_split(model_name, spec, workload, n_dev, decode_batch=64):
    """Prefill devices that balance per-request prefill time (solo, whole median prompt) and decode
    time (median output at a batch of `decode_batch`); a hint for --simulate --quick only."""
    model, cm, wl = MODELS[model_name], CostModel(spec), WORKLOADS[workload]
    prompt, out = int(wl.prompt.median), int(wl.output.median)
    pre = sum(cm.predict(c) for c in step_kernels(model, [(prompt, 0)], []))
    it = sum(cm.predict(c) for c in step_kernels(model, [], [prompt + out // 2] * decode_batch))
    dec = out * it / decode_batch
    return min(n_dev - 1, max(1, round(n_dev * pre / (pre + dec))))


def _config(task: dict) -> tuple[SimConfig, int]:
    """The SimConfig and static-disagg split of a task's system at its knob value."""
    cfg = SimConfig(tpot_budget_s=task["slo"]["tpot"])
    if task["system"] == System.FLEXNPU_TPOT:
        cfg.flex_tpot_slack = FLEX_TPOT_SLACK
    field, value = task["knob"], task["value"]
    if field == "prefill_devices":
        return cfg, int(value)
    setattr(cfg, field, value)
    return cfg, 0


def _simulate(task: dict, rate: float, duration_s: float, seed: int):
    model, cm = MODELS[task["model"]], CostModel(get_spec(task["device"]))
    n_dev = task["devices"]
    reqs = generate(task["workload"], rate * n_dev, requests_for(rate, n_dev, duration_s), seed)
    cfg, n_prefill = _config(task)
    system = (
        System.FLEXNPU if task["system"] == System.FLEXNPU_TPOT else task["system"]
    )  # (cfg has the slack)
    st = simulate(system, model, cm, reqs, n_dev, n_prefill, cfg)
    return reqs, st


def knob_label(system: str, value) -> str:
    field = KNOBS[system][0]
    return {
        "partition_alpha": f"alpha {value}",
        "flex_prefill_chunk": f"chunk {value}",
        "max_batched_tokens": f"budget {value}",
        "waiting_served_ratio": f"ratio {value}",
        "prefill_devices": f"{value}p",
    }[field]


def _capacity_task(task: dict) -> dict:
    """One system's goodput search at one knob value (runs in a worker process)."""
    slo = task["slo"]

    def attainment(rate: float) -> float:
        # averaged over seeds: one seed's attainment near the knee is not monotone in the rate
        att = []
        for seed in range(task["seed"], task["seed"] + task["seeds"]):
            reqs, _ = _simulate(task, rate, task["duration_s"], seed)
            att.append(metrics(reqs, slo["ttft"], slo["tpot"])["slo_attainment"])
        return sum(att) / len(att)

    t0 = time.perf_counter()
    res = sustainable_rate(attainment, task["lo"], task["hi"], task["steps"], SLO_ATTAINMENT)
    mean_out = sum(r.output for r in generate(task["workload"], 1.0, 4000, task["seed"])) / 4000
    out = dict(task, **res.as_dict(), key=f"{task['system']} {knob_label(task['system'], task['value'])}")
    if task["system"] == System.STATIC_DISAGG:
        out["prefill_devices"] = task["value"]
    out["goodput_tok_s"] = res.max_rate * task["devices"] * mean_out
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _run_task(task: dict) -> dict:
    """One system at its best knob at one rate; the run is doubled in length until TTFT p50 and
    SLO attainment stop changing (a queue that grows with the run's length shows as such)."""
    slo, n_dev = task["slo"], task["devices"]
    model, cm = MODELS[task["model"]], CostModel(get_spec(task["device"]))
    dur, prev, lengths = task["duration_s"], None, []
    t0 = time.perf_counter()
    for i in range(task["doublings"] + 1):
        reqs, st = _simulate(task, task["rate_per_device"], dur, task["seed"])
        m = metrics(reqs, slo["ttft"], slo["tpot"])
        lengths.append(
            {
                "duration_s": dur,
                "requests": len(reqs),
                "ttft_p50_ms": m["ttft_p50_ms"],
                "slo_attainment": m["slo_attainment"],
            }
        )
        stable = prev is not None and (
            abs(m["ttft_p50_ms"] / prev["ttft_p50_ms"] - 1) <= STABLE_TTFT_REL
            and abs(m["slo_attainment"] - prev["slo_attainment"]) <= STABLE_ATTAINMENT_ABS
        )
        prev = m
        if stable:
            break
        if i < task["doublings"]:
            dur *= 2
    m = dict(prev)
    m["ttft_floor_p50_ms"] = percentile(ttft_floors(model, cm, reqs), 50) * 1e3
    m.update(
        {
            "system": task["system"],
            "knob": task["knob"],
            "knob_value": task["value"],
            "workload": task["workload"],
            "rate": task["rate_per_device"] * n_dev,
            "rate_per_device": task["rate_per_device"],
            "model": task["model"],
            "device": task["device"],
            "devices": n_dev,
            "requests": len(reqs),
            "duration_s": dur,
            "run_lengths": lengths,
            # None: a single length (--quick); False: still changing at the longest length allowed
            "stable": _stable(lengths[-2], lengths[-1]) if len(lengths) > 1 else None,
            "emulated": True,
            "sim_events": st["events"],
            "wall_s": round(time.perf_counter() - t0, 2),
        }
    )
    if "repartitions" in st:  # core-share changes per second per device (each costs spec.repartition_s)
        m["repartitions_per_s_per_device"] = st["repartitions"] / max(st["end"], 1e-9) / n_dev
    if task["system"] == System.STATIC_DISAGG:
        m["prefill_devices"], m["decode_devices"] = task["value"], n_dev - task["value"]
    if task["system"] == System.STATIC_PARTITION:
        m["alpha"] = task["value"]
    return m


def _stable(a: dict, b: dict) -> bool:
    return (
        abs(b["ttft_p50_ms"] / a["ttft_p50_ms"] - 1) <= STABLE_TTFT_REL
        and abs(b["slo_attainment"] - a["slo_attainment"]) <= STABLE_ATTAINMENT_ABS
    )


def _pool(jobs):
    return ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else contextlib.nullcontext()


def knob_values(system, a, n_dev, splits):
    if system == System.STATIC_DISAGG:
        return list(splits or range(1, n_dev))
    over = {
        System.STATIC_PARTITION: a.alphas,
        System.STATIC_COLOC: a.coloc_budgets,
        System.FLEXNPU: a.flex_chunks,
        System.FLEXNPU_TPOT: a.flex_chunks,
        System.NAIVE_COLOC: a.flex_chunks,
    }.get(system)
    if over:
        return [float(x) if system == System.STATIC_PARTITION else int(x) for x in over.split(",") if x]
    return list(KNOBS[system][1])


def capacity_group(base, systems, a, n_dev, splits, jobs):
    """Goodput of every system at every knob value on one workload."""
    tasks = [
        dict(base, system=s, knob=KNOBS[s][0], value=v)
        for s in systems
        for v in knob_values(s, a, n_dev, splits)
    ]
    tasks.sort(
        key=lambda t: (
            t["system"]
            not in (System.FLEXNPU, System.FLEXNPU_TPOT, System.STATIC_PARTITION, System.NAIVE_COLOC)
        )
    )  # slowest first
    out = []
    with _pool(jobs) as ex:
        for r in (ex.map if ex else map)(_capacity_task, tasks):
            progress(
                f"  capacity {base['workload']}: {r['key']}: {r['max_rate_per_device']:.3f} req/s/device ({r['wall_s']} s)"
            )
            out.append(r)
    return out


def _best(cap, system):
    """A system's best knob value: highest goodput (ties: the first value searched)."""
    c = [r for r in cap if r["system"] == system]
    return max(c, key=lambda r: r["max_rate_per_device"]) if c else None


def run_group(base, systems, cap, rates, a, jobs):
    """Every system at its best knob at every rate (per-device rates)."""
    q = 1 if a.quick else 0
    tasks = []
    for s in systems:
        b = _best(cap, s)
        for rate in rates:
            tasks.append(
                dict(
                    base,
                    system=s,
                    knob=KNOBS[s][0],
                    value=b["value"],
                    rate_per_device=rate,
                    duration_s=RUN_DURATION_S[base["workload"]][q],
                    doublings=RUN_DOUBLINGS[q],
                )
            )
    out = []
    with _pool(jobs) as ex:
        for r in (ex.map if ex else map)(_run_task, tasks):
            progress(
                f"  run {base['workload']}: {r['system']} {knob_label(r['system'], r['knob_value'])} at "
                f"{r['rate_per_device']} req/s/dev: TTFT p50 {r['ttft_p50_ms']:.0f} ms, SLO {r['slo_attainment']:.2f}"
                f" ({len(r['run_lengths'])} length(s), {r['wall_s']} s)"
            )
            out.append(r)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    out.sort(key=lambda r: (r["rate"], order[r["system"]]))
    return out


def vs_one(f, c):
    """FlexNPU against a baseline at the same load, one rate."""
    both = f["slo_attainment"] >= SLO_ATTAINMENT and c["slo_attainment"] >= SLO_ATTAINMENT
    return {
        "rate": f["rate"],
        "rate_per_device": f["rate_per_device"],
        "ttft_p50_reduction_pct": 100 * (1 - f["ttft_p50_ms"] / c["ttft_p50_ms"]),
        # no system can prefill faster than an idle device: the most any could cut
        "ttft_p50_reduction_bound_pct": 100 * (1 - f["ttft_floor_p50_ms"] / c["ttft_p50_ms"]),
        "tpot_p50_change_pct": 100 * (f["tpot_p50_ms"] / c["tpot_p50_ms"] - 1),
        "throughput_ratio": f["throughput_tok_s"] / c["throughput_tok_s"],
        "flex_slo_attainment": f["slo_attainment"],
        "baseline_slo_attainment": c["slo_attainment"],
        "both_attain_slo": both,
    }


def summarize(runs, workload, cap, scale=1.0, flex_system=System.FLEXNPU):
    """Compare a FlexNPU system (flexnpu or flexnpu-tpot) with every baseline: per rate (TTFT,
    TPOT, throughput) and goodput."""
    wl = [r for r in runs if r["workload"] == workload]
    cw = [r for r in cap if r["workload"] == workload]
    by = {}
    for r in wl:
        by.setdefault(r["system"], {})[r["rate"]] = r
    best = {s: _best(cw, s) for s in SYSTEMS if _best(cw, s)}
    flex = by.get(flex_system, {})
    kind = WORKLOADS[workload].kind
    out = {
        "workload": workload,
        "flex_system": flex_system,
        "kind": kind,
        "best_knob": {s: {"knob": KNOBS[s][0], "value": b["value"]} for s, b in best.items()},
        "max_rate_per_device": {s: b["max_rate_per_device"] for s, b in best.items()},
        "goodput_tok_s": {s: b["goodput_tok_s"] * scale for s, b in best.items()},
        "disagg_target_pct": 5.0 if kind == "balanced" else 26.0,
    }
    fx = best.get(flex_system)
    for s, b in best.items():
        if s in FLEX_SYSTEMS or fx is None:
            continue
        key = s.replace("-", "_")
        out[f"flex_vs_{key}_goodput_pct"] = (
            100 * (fx["max_rate_per_device"] / b["max_rate_per_device"] - 1)
            if b["max_rate_per_device"]
            else math.inf
        )
        if s in by:
            out[f"vs_{key}"] = [
                dict(
                    vs_one(flex[rate], by[s][rate]),
                    **({"alpha": b["value"]} if s == System.STATIC_PARTITION else {}),
                )
                for rate in sorted(flex)
                if rate in by[s]
            ]
    dis = [r for r in cw if r["system"] == System.STATIC_DISAGG]
    if dis and fx is not None:
        k = round(scale)
        bd = best[System.STATIC_DISAGG]
        n = bd["devices"]
        out["best_disagg_split"] = f"{bd['value'] * k}:{(n - bd['value']) * k}"
        out["best_disagg_unit_prefill_devices"] = bd["value"]
        bound = continuous_split_bound([(r["value"], r["max_rate_per_device"]) for r in dis], n)
        out["disagg_continuous_bound_rate_per_device"] = bound
        out["flex_vs_disagg_continuous_bound_pct"] = (
            100 * (fx["max_rate_per_device"] / bound - 1) if bound else math.inf
        )
    if "vs_static_partition" in out:
        out["static_partition_targets"] = _targets(out["vs_static_partition"], kind)
    return out


def _targets(rows, kind):
    """The paper's claim per rate, where both systems attain >= 90% of SLOs."""
    res = []
    for r in rows:
        if not r["both_attain_slo"]:
            res.append({"rate": r["rate"], "comparable": False})
            continue
        res.append(
            {
                "rate": r["rate"],
                "comparable": True,
                "ttft_met": r["ttft_p50_reduction_pct"] >= 92.0,
                "tpot_met": r["tpot_p50_change_pct"] <= 5.0,
                "throughput_met": r["throughput_ratio"] >= 0.97,
            }
        )
    return res


def deployment_split(summaries, capacity):
    """A static split is fixed when the cluster is deployed, not re-cut per request mix: compare
    FlexNPU on each other mix with disaggregation at the split that was best for the balanced mix
    (a secondary figure; the headline uses each mix's own best split)."""
    for bal in [s for s in summaries if s["kind"] == "balanced" and "best_disagg_unit_prefill_devices" in s]:
        p_ = bal["best_disagg_unit_prefill_devices"]
        fs = bal.get("flex_system", System.FLEXNPU)
        for s in summaries:
            if s["workload"] == bal["workload"] or s.get("cluster") != bal.get("cluster"):
                continue
            if s.get("flex_system", System.FLEXNPU) != fs:
                continue
            d = [
                c
                for c in capacity
                if c["workload"] == s["workload"] and c["system"] == System.STATIC_DISAGG and c["value"] == p_
            ]
            if not d or not d[0]["max_rate_per_device"] or fs not in s["max_rate_per_device"]:
                continue
            s["balanced_mix_split"] = bal["best_disagg_split"]
            s["flex_vs_disagg_at_balanced_mix_split_pct"] = 100 * (
                s["max_rate_per_device"][fs] / d[0]["max_rate_per_device"] - 1
            )


def print_table(runs, summaries, header, quick):
    print(header)
    if quick:
        print(
            "--quick: the same systems and knob values as the full run, with fewer and shorter probes, one seed "
            "and no run-length doubling: indicative figures"
        )
    cols = ("system", "knob", "rate", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "SLO")
    print(
        f"{cols[0]:<18}{cols[1]:>13}{cols[2]:>7}{cols[3]:>10}{cols[4]:>10}{cols[5]:>10}{cols[6]:>10}{cols[7]:>10}{cols[8]:>6}"
    )
    for wl in dict.fromkeys(r["workload"] for r in runs):
        print(f"-- workload {wl} ({WORKLOADS[wl].kind}), emulated, each system at its best knob, times in ms")
        for r in runs:
            if r["workload"] != wl:
                continue
            mark = " (still changing at the longest run)" if r.get("stable") is False else ""
            print(
                f"{r['system']:<18}{knob_label(r['system'], r['knob_value']):>13}{r['rate']:>7.2f}"
                f"{r['throughput_tok_s']:>10.0f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>10.1f}"
                f"{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>10.1f}{r['slo_attainment']:>6.2f}{mark}"
            )
    print("\nsummary (emulated):")
    for s in summaries:
        mr = s["max_rate_per_device"]
        parts = [
            f"{sy} ({knob_label(sy, s['best_knob'][sy]['value'])}) {mr[sy]:.2f}" for sy in SYSTEMS if sy in mr
        ]
        print(
            f"  {s['workload']:<10} {s['kind']:<14} goodput, req/s/device at >= {SLO_ATTAINMENT:.0%} SLO attainment: "
            + ", ".join(parts)
        )
        fs = s.get("flex_system", System.FLEXNPU)
        print(f"  {'':<25} [{fs} against every baseline]")
        if "best_disagg_split" in s:
            print(
                f"  {'':<25} -> flex vs disagg {s['flex_vs_static_disagg_goodput_pct']:+.1f}% at the real split "
                f"granularity ({s['best_disagg_split']}; target >= +{s['disagg_target_pct']:.0f}%), "
                f"{s['flex_vs_disagg_continuous_bound_pct']:+.1f}% vs the continuous-split bound "
                f"({s['disagg_continuous_bound_rate_per_device']:.2f} req/s/device)"
            )
        if "flex_vs_static_partition_goodput_pct" in s:
            print(
                f"  {'':<25} -> flex vs static partition (best alpha {s['best_knob']['static-partition']['value']}) "
                f"goodput {s['flex_vs_static_partition_goodput_pct']:+.1f}%"
            )
        if "balanced_mix_split" in s:
            print(
                f"  {'':<25} -> flex vs disagg deployed at the balanced mix's split {s['balanced_mix_split']}: "
                f"{s['flex_vs_disagg_at_balanced_mix_split_pct']:+.1f}%"
            )
        for sy in SYSTEMS:
            if sy in FLEX_SYSTEMS:
                continue
            for pr in s.get(f"vs_{sy.replace('-', '_')}", []):
                ok = "" if pr["both_attain_slo"] else "  [not comparable: an SLO attainment < 90%]"
                print(
                    f"      rate {pr['rate']:6.2f}: vs {sy:<17} TTFT p50 {-pr['ttft_p50_reduction_pct']:+6.1f}% "
                    f"(floor allows {-pr['ttft_p50_reduction_bound_pct']:+.0f}%), TPOT p50 {pr['tpot_p50_change_pct']:+6.1f}%, "
                    f"throughput x{pr['throughput_ratio']:.3f}, SLO {pr['flex_slo_attainment']:.2f} vs "
                    f"{pr['baseline_slo_attainment']:.2f}{ok}"
                )
        for t in s.get("static_partition_targets", []):
            if t["comparable"]:
                print(
                    f"      rate {t['rate']:6.2f}: paper targets vs static partition: TTFT -92% "
                    f"{'met' if t['ttft_met'] else 'NOT met'}, TPOT +5% {'met' if t['tpot_met'] else 'NOT met'}, "
                    f"throughput 0.97x {'met' if t['throughput_met'] else 'NOT met'}"
                )


def verdicts(summaries: list[dict]) -> list[dict]:
    """One verdict per target and workload (and cluster size): met or not, the figure, the target.
    Goodput against static disaggregation at its real split granularity; TTFT/TPOT/throughput
    against the paper's baseline, static core partition at its best alpha, over the rates where
    both systems attain the SLO (worst rate, so "met" means met at every such rate)."""
    out = []
    for s in summaries:
        where = s["workload"] + (f" @{s['cluster']} devices" if "cluster" in s else "")
        if s.get("flex_system", System.FLEXNPU) != System.FLEXNPU:
            where = f"{s['flex_system']}: {where}"
        g = s.get("flex_vs_static_disagg_goodput_pct", s.get("flex_vs_disagg_pct"))
        if g is not None:
            out.append(
                {
                    "where": where,
                    "target": "goodput vs static-disagg",
                    "figure": f"{g:+.1f}%",
                    "goal": f">= +{s['disagg_target_pct']:.0f}%",
                    "met": g >= s["disagg_target_pct"],
                }
            )
        for key, lab in (("vs_static_partition", System.STATIC_PARTITION),):
            rates = [pr for pr in s.get(key) or [] if pr.get("both_attain_slo", True)]
            if not rates:
                if s.get(key):
                    out.append(
                        {
                            "where": where,
                            "target": f"per-rate vs {lab}",
                            "figure": "no rate where both attain the SLO",
                            "goal": "TTFT -92%, TPOT +5%, x0.97",
                            "met": False,
                        }
                    )
                continue
            ttft = min(rates, key=lambda pr: pr["ttft_p50_reduction_pct"])
            tpot = max(rates, key=lambda pr: pr["tpot_p50_change_pct"])
            thr = min(rates, key=lambda pr: pr["throughput_ratio"])
            out += [
                {
                    "where": where,
                    "target": f"TTFT p50 vs {lab}",
                    "figure": f"{-ttft['ttft_p50_reduction_pct']:+.1f}% at rate {ttft['rate']:.2f}",
                    "goal": "<= -92% at every rate",
                    "met": all(pr["ttft_p50_reduction_pct"] >= 92 for pr in rates),
                },
                {
                    "where": where,
                    "target": f"TPOT p50 vs {lab}",
                    "figure": f"{tpot['tpot_p50_change_pct']:+.1f}% at rate {tpot['rate']:.2f}",
                    "goal": "<= +5% at every rate",
                    "met": all(pr["tpot_p50_change_pct"] <= 5 for pr in rates),
                },
                {
                    "where": where,
                    "target": f"throughput vs {lab}",
                    "figure": f"x{thr['throughput_ratio']:.3f} at rate {thr['rate']:.2f}",
                    "goal": ">= x0.97 at every rate",
                    "met": all(pr["throughput_ratio"] >= 0.97 for pr in rates),
                },
            ]
    return out


def print_verdicts(vs: list[dict]) -> None:
    print("\nverdict (emulated):")
    for v in vs:
        print(
            f"  {'MET    ' if v['met'] else 'NOT MET'}  {v['where']:<24} {v['target']:<40} {v['figure']:<24} target {v['goal']}"
        )


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.get("cluster", r["devices"]), r["workload"]) for r in runs))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for i, (cl, wl) in enumerate(groups):
        sel = [r for r in runs if r["workload"] == wl and r.get("cluster", r["devices"]) == cl]
        for system in SYSTEMS:
            rs = sorted((r for r in sel if r["system"] == system), key=lambda r: r["rate"])
            if not rs:
                continue
            lab = f"{system} ({knob_label(system, rs[0]['knob_value'])})"
            x = [r["rate"] for r in rs]
            axes[i][0].plot(x, [r["ttft_p50_ms"] for r in rs], marker="o", label=lab)
            axes[i][1].plot(x, [r["tpot_p50_ms"] for r in rs], marker="o", label=lab)
        for j, what in enumerate(("TTFT p50 (ms)", "TPOT p50 (ms)")):
            ax = axes[i][j]
            ax.set_title(f"{wl}, {cl} devices [EMULATED]", fontsize=9)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(what)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{runs[0]['model']} on {runs[0]['device']} - emulated (virtual-time cost model), not measured hardware"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def slo_throughput(runs):
    ok = [r["throughput_tok_s"] for r in runs if r["slo_attainment"] >= SLO_ATTAINMENT]
    return max(ok) if ok else 0.0


RT_RATES_PER_DEVICE = {"chat": ([4.0], [3.0, 6.0]), "long": ([1.0], [0.5, 1.0])}  # (--quick, full)
RT_REQUESTS_PER_DEVICE = (8, 20)  # (--quick, full)


def rt_summary(runs, workload):
    """The simulated mode's comparison keys for a real-time group (no decode-first baseline here)."""
    wl = [r for r in runs if r["workload"] == workload]
    flex = {r["rate"]: r for r in wl if r["system"] == System.FLEXNPU}
    col = {r["rate"]: r for r in wl if r["system"] == System.STATIC_COLOC}
    dis = {r["rate"]: r for r in wl if r["system"] == System.STATIC_DISAGG and r.get("best_split")}
    par = {r["rate"]: r for r in wl if r["system"] == System.STATIC_PARTITION and r.get("best_alpha")}
    nai = {r["rate"]: r for r in wl if r["system"] == System.NAIVE_COLOC}
    tf, tc, td, tp = (slo_throughput(list(d.values())) for d in (flex, col, dis, par))
    rb = next(iter(dis.values()), None)
    kind = WORKLOADS[workload].kind
    out = {
        "workload": workload,
        "kind": kind,
        "best_disagg_split": f"{rb['prefill_devices']}:{rb['decode_devices']}" if rb else None,
        "best_alpha": next(iter(par.values()))["alpha"] if par else None,
        "slo_throughput_tok_s": {
            System.FLEXNPU: tf,
            System.STATIC_COLOC: tc,
            System.STATIC_DISAGG: td,
            System.STATIC_PARTITION: tp,
        },
        "flex_vs_disagg_pct": (100 * (tf / td - 1)) if td else math.inf,
        "flex_vs_coloc_pct": (100 * (tf / tc - 1)) if tc else math.inf,
        "disagg_target_pct": 5.0 if kind == "balanced" else 26.0,
    }
    for name, base in (("static_coloc", col), ("static_partition", par), ("naive_coloc", nai)):
        rows = [vs_one(flex[rate], base[rate]) for rate in sorted(flex) if rate in base]
        if name == "static_partition":
            for r in rows:
                r["alpha"] = par[r["rate"]]["alpha"]
        out[f"vs_{name}"] = rows
    return out


def run_realtime(a, model_name, spec, t0) -> int:
    from flexnpu.sched.models import MODELS

    wls = (a.workloads or ("chat" if a.quick else "chat,long")).split(",")
    for w in wls:
        if w not in WORKLOADS:
            print(
                f"flexnpu bench serve: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}",
                file=sys.stderr,
            )
            return 2
    n_dev = a.devices or 2
    # (flexnpu-tpot: simulated study only so far; the daemon runs it as --policy flex:SLACK)
    rt_systems = [s for s in SYSTEMS if s not in (System.DECODE_FIRST, System.FLEXNPU_TPOT)]
    systems = a.systems.split(",") if a.systems else rt_systems
    if any(s not in rt_systems for s in systems):
        print(
            f"flexnpu bench serve: --realtime systems: {', '.join(rt_systems)}",
            file=sys.stderr,
        )
        return 2
    if n_dev < (2 if System.STATIC_DISAGG in systems else 1):
        print(
            "flexnpu bench serve: --realtime needs --devices >= 2 with static-disagg (a prefill and a decode "
            "device, and every system gets the same count)",
            file=sys.stderr,
        )
        return 2
    a.systems_rt = systems
    model = MODELS[model_name]
    kv_tokens = min(model.kv_capacity_tokens(spec.mem_bytes) // 2, 200_000)
    cfg = SimConfig(max_batched_tokens=a.max_batched_tokens)
    n_req = a.requests or RT_REQUESTS_PER_DEVICE[0 if a.quick else 1] * n_dev
    runs, summaries = [], []
    pools: dict = {}  # (policy, TPOT budget) -> DaemonSet, reused by every run that matches
    try:
        _rt_groups(a, model_name, spec, wls, n_dev, n_req, kv_tokens, cfg, runs, summaries, pools)
    finally:
        for ds in pools.values():
            ds.stop()
    return _rt_report(a, runs, summaries, model_name, spec, n_dev, n_req, t0)


def _rt_groups(a, model_name, spec, wls, n_dev, n_req, kv_tokens, cfg, runs, summaries, pools):
    from ._realtime import DaemonSet, best_alpha, best_split, daemon_policy, run_system

    for w in wls:
        slo = dict(SLO[model_name])
        if WORKLOADS[w].kind == "prefill-heavy":
            slo["ttft"] = slo["ttft_long"]
        rates = [r * n_dev for r in RT_RATES_PER_DEVICE.get(w, ([1.0], [0.5, 1.0]))[0 if a.quick else 1]]
        # every split with few devices; around the analytic balance point with --quick on many
        splits = list(range(1, n_dev))
        if a.quick and n_dev > 4:
            p0 = estimate_split(model_name, spec, w, n_dev)
            splits = [p_ for p_ in (p0 - 1, p0, p0 + 1) if 0 < p_ < n_dev]
        group = []
        alphas = knob_values(System.STATIC_PARTITION, a, n_dev, None)
        plan = (
            [(System.STATIC_PARTITION, 0, al) for al in alphas]
            + [(System.NAIVE_COLOC, 0, 0.5), (System.STATIC_COLOC, 0, 0.5), (System.FLEXNPU, 0, 0.5)]
            + [(System.STATIC_DISAGG, p_, 0.5) for p_ in splits]
        )
        plan = [x for x in plan if x[0] in a.systems_rt]
        for system, p_, alpha in plan:
            cur = daemon_policy(system, alpha)  # one alpha's daemons at a time: no other run reuses them
            for k in [k for k in pools if k[0].startswith("partition:") and k[0] != cur]:
                pools.pop(k).stop()
            for rate in rates:
                reqs = generate(w, rate, n_req, a.seed)  # same seeded workload for every system
                key = (daemon_policy(system, alpha), slo["tpot"])
                if key not in pools:
                    pools[key] = DaemonSet(n_dev, spec.name, key[0], slo["tpot"] * 1e3, a.backend)
                t1 = time.perf_counter()
                m = run_system(
                    system,
                    model_name,
                    spec.name,
                    reqs,
                    cfg,
                    slo,
                    a.groups,
                    kv_tokens,
                    deadline_s=120.0,
                    n_devices=n_dev,
                    n_prefill=p_,
                    daemons=pools[key],
                    alpha=alpha,
                )
                m.update(
                    {
                        "workload": w,
                        "rate": rate,
                        "model": model_name,
                        "device": spec.name,
                        "devices": n_dev,
                        "requests": n_req,
                        "seed": a.seed,
                        "mode": "realtime",
                        "emulated": not a.backend or a.backend.startswith("emu"),
                        "backend": a.backend or f"emu:{spec.name}",
                        "rate_per_device": rate / n_dev,
                        "ttft_floor_p50_ms": percentile(
                            ttft_floors(MODELS[model_name], CostModel(spec), reqs), 50
                        )
                        * 1e3,
                        "throughput_per_device_tok_s": m["throughput_tok_s"] / n_dev,
                        "wall_s": round(time.perf_counter() - t1, 2),
                    }
                )
                group.append(m)
        if System.STATIC_DISAGG in a.systems_rt:
            best = best_split(group, SLO_ATTAINMENT)
            for r in group:
                if r["system"] == System.STATIC_DISAGG:
                    r["best_split"] = r["prefill_devices"] == best
        best_a = best_alpha(group, SLO_ATTAINMENT)
        for r in group:
            if r["system"] == System.STATIC_PARTITION:
                r["best_alpha"] = r["alpha"] == best_a
        runs += group
        summaries.append(rt_summary(group, w))


def _rt_report(a, runs, summaries, model_name, spec, n_dev, n_req, t0) -> int:
    if a.json:
        print(
            json.dumps(
                {
                    "runs": runs,
                    "summary": summaries,
                    "mode": "realtime",
                    "emulated": not a.backend or a.backend.startswith("emu"),
                    "backend": a.backend or f"emu:{spec.name}",
                    "devices": n_dev,
                    "wall_s": round(time.perf_counter() - t0, 1),
                },
                indent=1,
            )
        )
        return 0
    print(
        f"flexnpu bench serve --realtime: {model_name} on {n_dev} emulated {spec.name} devices (one emu:{spec.name} "
        f"daemon each, real client processes), {n_req} requests per run, seed {a.seed}, {a.groups} layer groups, "
        f"least-loaded dispatch "
        + (
            "[EMULATED: real time, cost-model kernels]"
            if not a.backend or a.backend.startswith("emu")
            else f"[{a.backend} backend: real kernels, random weights]"
        )
    )
    print(
        f"{'system':<14}{'split':>6}{'dev':>4}{'rate':>6}{'tok/s':>9}{'tok/s/dev':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'TPOT p50':>10}{'TPOT p99':>10}{'SLO':>6}"
    )
    for r in runs:
        split = (
            f"{r['prefill_devices']}:{r['decode_devices']}"
            if r["system"] == System.STATIC_DISAGG
            else f"a{r['alpha']}"
            if r["system"] == System.STATIC_PARTITION
            else "-"
        )
        mark = "*" if r.get("best_split") or r.get("best_alpha") else ""
        print(
            f"{r['system'] + mark:<14}{split:>6}{r['devices']:>4}{r['rate']:>6.1f}{r['throughput_tok_s']:>9.0f}"
            f"{r['throughput_per_device_tok_s']:>10.0f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>10.1f}"
            f"{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>10.1f}{r['slo_attainment']:>6.2f}  ({r['workload']})"
        )
        if "kv_handoff" in r:
            k = r["kv_handoff"]
            print(
                f"{'':14}KV hand-off zero-copy on all {len(k['per_device'])} devices: {k['zero_copy']} (pool "
                f"{k['kv_pool_bytes'] / 2**30:.1f} GiB per device charged once; importers' own allocations "
                f"<= {k['importer_allocated_bytes'] / 2**20:.0f} MiB)"
            )
        if "kv_link_gb_s" in r:
            print(f"{'':14}KV over a {r['kv_link_gb_s']} GB/s link (D2H + H2D, both charged)")
    print(
        "* static-disagg: best split, static-partition: best alpha (highest throughput at >= 90% SLO attainment, "
        "ties to lower TTFT p50); every split and alpha is in --json"
    )
    for s_ in summaries:
        sl = s_["slo_throughput_tok_s"]
        print(
            f"  {s_['workload']}: throughput at >= {SLO_ATTAINMENT:.0%} SLO: flexnpu {sl['flexnpu']:.0f}, "
            f"disagg {s_['best_disagg_split']} {sl['static-disagg']:.0f}, coloc {sl['static-coloc']:.0f} tok/s "
            f"(flex vs disagg {s_['flex_vs_disagg_pct']:+.1f}%, vs coloc {s_['flex_vs_coloc_pct']:+.1f}%)"
        )
        for pr in s_.get("vs_static_partition", []):
            print(
                f"    rate {pr['rate']:6.2f}: vs static-partition (alpha {pr['alpha']}): TTFT p50 "
                f"{-pr['ttft_p50_reduction_pct']:+6.1f}%, TPOT p50 {pr['tpot_p50_change_pct']:+6.1f}%, throughput "
                f"x{pr['throughput_ratio']:.3f}, SLO {pr['flex_slo_attainment']:.2f} vs {pr['baseline_slo_attainment']:.2f}"
            )
    print(f"\n({time.perf_counter() - t0:.1f} s wall)")
    return 0


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    if a.realtime:
        try:
            spec = get_spec(a.spec or "910b")
        except ValueError as e:
            print(f"flexnpu bench serve: {e}", file=sys.stderr)
            return 2
        return run_realtime(a, a.model or "qwen2.5-7b", spec, t0)
    model = a.model or ("deepseek-r1" if a.simulate else "qwen2.5-7b")
    try:
        spec = get_spec(a.spec or ("910c" if a.simulate else "910b"))
    except ValueError as e:
        print(f"flexnpu bench serve: {e}", file=sys.stderr)
        return 2
    # --simulate --quick: the balanced mix only (a DeepSeek-R1 reasoning probe alone takes ~25 s)
    default_wl = (
        ("chat" if a.quick else "chat,long,reasoning") if a.simulate else ("chat" if a.quick else "chat,long")
    )
    wls = (a.workloads or default_wl).split(",")
    for w in wls:
        if w not in WORKLOADS:
            print(
                f"flexnpu bench serve: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}",
                file=sys.stderr,
            )
            return 2
    systems = a.systems.split(",") if a.systems else list(SYSTEMS)
    for s in systems:
        if s not in SYSTEMS:
            print(
                f"flexnpu bench serve: unknown system {s!r}; choose from {', '.join(SYSTEMS)}",
                file=sys.stderr,
            )
            return 2
    n_dev = a.devices or (8 if a.simulate else 4)
    q = 1 if a.quick else 0
    runs, summaries, capacity = [], [], []
    for w in wls:
        slo = dict(SLO[model])
        if WORKLOADS[w].kind == "prefill-heavy":
            slo["ttft"] = slo["ttft_long"]
        # the lowest rate of the grid is light load for every system: the comparison starts above it
        rates = RATES_PER_DEVICE[model][w][1:]
        if a.quick:
            rates = rates[1:] if not a.simulate else rates[-1:]
        splits = None
        if a.simulate and a.quick:
            p0 = estimate_split(model, spec, w, n_dev)
            splits = [p_ for p_ in (p0 - 1, p0, p0 + 1) if 0 < p_ < n_dev]
        grid = RATES_PER_DEVICE[model][w]
        base = {
            "model": model,
            "device": spec.name,
            "workload": w,
            "devices": n_dev,
            "slo": slo,
            "seed": a.seed,
            "seeds": CAPACITY_SEEDS[q],
            "duration_s": a.capacity_duration or CAPACITY_DURATION_S[w][q],
            "steps": a.capacity_steps or CAPACITY_STEPS[q],
            "lo": grid[1],
            "hi": 1.5 * grid[-1],
            "emulated": True,
        }
        progress(f"flexnpu bench serve: {w}: goodput search over every knob value on {a.jobs} process(es)...")
        cap = capacity_group(base, systems, a, n_dev, splits, a.jobs)
        capacity += cap
        progress(
            f"flexnpu bench serve: {w}: goodput done ({time.perf_counter() - t0:.0f} s); per-rate runs at the "
            f"best knobs..."
        )
        group = [] if a.goodput_only else run_group(base, systems, cap, rates, a, a.jobs)
        if a.simulate:
            clusters = [int(c) for c in a.clusters.split(",")]
            if a.quick:
                clusters = [clusters[0], clusters[-1]]
            for cl in clusters:
                if cl % n_dev:
                    print(
                        f"flexnpu bench serve: cluster {cl} is not a multiple of the unit {n_dev}",
                        file=sys.stderr,
                    )
                    return 2
                k = cl // n_dev
                scaled = []
                for r in group:
                    rr = dict(
                        r,
                        cluster=cl,
                        rate=r["rate"] * k,
                        throughput_tok_s=r["throughput_tok_s"] * k,
                        unit_devices=n_dev,
                    )
                    if rr["system"] == System.STATIC_DISAGG:
                        rr["prefill_devices"], rr["decode_devices"] = (
                            r["prefill_devices"] * k,
                            r["decode_devices"] * k,
                        )
                    scaled.append(rr)
                runs += scaled
                for fs in [f for f in FLEX_SYSTEMS if f in systems] or [System.FLEXNPU]:
                    sc = summarize(scaled, w, cap, scale=k, flex_system=fs)
                    sc["cluster"] = cl
                    summaries.append(sc)
        else:
            runs += group
            summaries += [
                summarize(group, w, cap, flex_system=fs)
                for fs in [f for f in FLEX_SYSTEMS if f in systems] or [System.FLEXNPU]
            ]
    deployment_split(summaries, capacity)
    if a.plot:
        plot(runs, a.plot)
    effort = {
        "capacity_duration_s": {w: a.capacity_duration or CAPACITY_DURATION_S[w][q] for w in wls},
        "bisection_steps": a.capacity_steps or CAPACITY_STEPS[q],
        "seeds": CAPACITY_SEEDS[q],
        "run_duration_s": {w: RUN_DURATION_S[w][q] for w in wls},
        "run_doublings": RUN_DOUBLINGS[q],
        "knobs": {s: {"knob": KNOBS[s][0], "values": knob_values(s, a, n_dev, None)} for s in systems},
    }
    if a.json:
        print(
            json.dumps(
                {
                    "runs": runs,
                    "summary": summaries,
                    "verdicts": verdicts(summaries),
                    "capacity": capacity,
                    "emulated": True,
                    "quick": a.quick,
                    "effort": effort,
                    "wall_s": round(time.perf_counter() - t0, 1),
                },
                indent=1,
            )
        )
    else:
        hdr = (
            f"flexnpu bench serve: {model} on {spec.name}, "
            + (
                f"cluster study, unit of {n_dev} devices scaled to {a.clusters}"
                if a.simulate
                else f"{n_dev} devices"
            )
            + f", seed {a.seed} [EMULATED: virtual time, cost model + emu engine]"
        )
        if a.simulate:
            for cl in dict.fromkeys(r["cluster"] for r in runs):
                print_table(
                    [r for r in runs if r["cluster"] == cl],
                    [s for s in summaries if s["cluster"] == cl],
                    hdr + f"\n== {cl} devices",
                    a.quick,
                )
        else:
            print_table(runs, summaries, hdr, a.quick)
        print_verdicts(verdicts(summaries))
        print(f"\n({time.perf_counter() - t0:.1f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
