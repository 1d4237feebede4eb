"""Serving comparison: static co-location (two kinds) vs static PD disaggregation vs FlexNPU (emulated).

Systems: static-coloc (vLLM-V1-style chunked prefill, the strong co-location baseline),
static-coloc-decode-first (TGI-router-style: no chunked prefill, new requests wait behind running
decode; the co-location the project brief describes), static-disagg, flexnpu.

Default: Qwen2.5-7B on Ascend 910B-class devices (4 devices), chat and long-prompt workloads.
--simulate: the cluster study, DeepSeek-R1 on 910C, 16 to 384 devices, chat / long-prompt /
reasoning mixes. Every figure is produced in virtual time by the cost model + emulated
accelerator (``"emulated": true``); no accelerator is used.

Two kinds of figures. Per rate (table, "runs" in --json): throughput, TTFT and TPOT p50/p99, SLO
attainment and the TTFT floor (a prompt's prefill on an idle device, which bounds any TTFT
reduction) at a grid of request rates. At the SLO ("capacity" in --json, the summary's headline):
goodput, the highest request rate each system sustains with >= 90% of requests meeting both
SLOs, by bisection with a fixed span of arrivals per probe (flexnpu/sched/capacity.py). Every
system's main knob is searched and its best setting compared: static-coloc's token budget,
static-disagg's prefill:decode split, flexnpu's prefill chunk. With --simulate --quick only the
three splits around an analytic estimate of the balanced split are searched. The full default
run also repeats flexnpu per rate at tighter TPOT budgets (--flex-tpot-budgets) and compares
each baseline with FlexNPU at equal TPOT ("vs_*_tpot_matched").

--realtime: the same comparison with engines as real client processes on real FlexNPU daemons
with the emulated backend (`--backend emu:910b`): kernels take the cost model's time in real
time, scheduling is the daemon's policy (bench/_realtime.py). Figures are labelled emulated
("mode": "realtime", "emulated": true). Every system gets the same N emulated devices
(`--devices`, default 2): static-coloc N replicas, flexnpu a prefill + decode instance on each
device, static-disagg every p:(N-p) split with the best one compared; least-loaded dispatch.
--quick: 8 requests per device at 4 req/s per device (chat), under 60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from ._common import progress
from flexnpu.sched.capacity import requests_for, sustainable_rate, ttft_floors
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
SLO = {"qwen2.5-7b": {"ttft": 2.0, "ttft_long": 8.0, "tpot": 0.05},
       "deepseek-r1": {"ttft": 2.0, "ttft_long": 8.0, "tpot": 0.1}}
SLO_ATTAINMENT = 0.9


def parse_args(argv):
    p = argparse.ArgumentParser(prog="flexnpu bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simulate", action="store_true", help="cluster study (DeepSeek-R1, 910C, 16-384 devices)")
    p.add_argument("--realtime", action="store_true",
                   help="engines as real processes on real daemons with the emulated backend (emu:910b)")
    p.add_argument("--groups", type=int, default=4,
                   help="--realtime: layer groups per iteration (one projection mm + attention per group)")
    p.add_argument("--quick", action="store_true", help="fewer requests, rates and search steps (< 60 s; goodput figures indicative)")
    p.add_argument("--json", action="store_true", help="print {'runs': [...], 'summary': [...], 'capacity': [...]} as JSON")
    p.add_argument("--plot", metavar="PNG", help="write TTFT/TPOT p50 vs request rate to this PNG")
    p.add_argument("--model", choices=sorted(MODELS), help="model (default: qwen2.5-7b, or deepseek-r1 with --simulate)")
    p.add_argument("--spec", help="device spec (default 910b, or 910c with --simulate)")
    p.add_argument("--workloads", help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--devices", type=int, help="device group size (default 4; the --simulate unit is 8; --realtime: 2, at least 2)")
    p.add_argument("--clusters", default="16,64,384", help="--simulate: cluster sizes (multiples of the unit)")
    p.add_argument("--requests", type=int, help="requests per run (per device group)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes for the goodput searches (default: CPUs, at most 4)")
    p.add_argument("--coloc-budgets", metavar="N,N,...",
                   help="static-coloc token budgets in the goodput search (default 512,1024,2048,4096; "
                        "--quick: 2048); the best one is the baseline compared")
    p.add_argument("--flex-tpot-budgets", metavar="MS,MS,...",
                   help="extra flexnpu runs per rate with a tighter TPOT budget (the daemon's --tpot-budget-ms; "
                        "the SLO is unchanged), compared at equal TPOT; default 20,25,30 (none with --quick "
                        "or --simulate)")
    p.add_argument("--flex-chunks", metavar="N,N,...",
                   help="flexnpu prefill chunk sizes in the goodput search (default 512,1024,2048; --quick: 1024)")
    p.add_argument("--capacity-duration", type=float, metavar="S",
                   help="seconds of arrivals per goodput probe (default per workload: chat 60, long 120, "
                        "reasoning 240; --quick: 20/40/60)")
    p.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="static-coloc chunked-prefill token budget (vLLM V1 online default on <70 GiB cards)")
    return p.parse_args(argv)


SYSTEMS = ("static-coloc", "static-coloc-decode-first", "flexnpu")   # + static-disagg at every split


def estimate_split(model_name, spec, workload, n_dev, decode_batch=64):
    """Prefill devices that balance per-request prefill time (solo, whole median prompt) and decode
    time (median output at a batch of `decode_batch`); a hint for --simulate --quick only."""
    model, cm, wl = MODELS[model_name], CostModel(spec), WORKLOADS[workload]
    prompt, out = int(wl.prompt.median), int(wl.output.median)
    pre = sum(cm.predict(c) for c in step_kernels(model, [(prompt, 0)], []))
    it = sum(cm.predict(c) for c in step_kernels(model, [], [prompt + out // 2] * decode_batch))
    dec = out * it / decode_batch
    return min(n_dev - 1, max(1, round(n_dev * pre / (pre + dec))))


def run_group(model_name, spec, workload, rates, n_dev, n_req, seed, cfg, slo, splits=None, flex_budgets_ms=()):
    model = MODELS[model_name]
    cm = CostModel(spec)
    runs = []
    for rate in rates:
        def one(system, n_prefill=0, budget_s=None):
            reqs = generate(workload, rate, n_req, seed)
            t0 = time.perf_counter()
            b = budget_s or slo["tpot"]
            st = simulate(system, model, cm, reqs, n_dev, n_prefill, dataclasses.replace(cfg, tpot_budget_s=b))
            m = metrics(reqs, slo["ttft"], slo["tpot"])
            if system == "flexnpu":
                # the operator's --tpot-budget-ms; the SLO the metrics use is unchanged
                m["tpot_budget_ms"], m["tight_budget"] = b * 1e3, budget_s is not None
            m["ttft_floor_p50_ms"] = percentile(ttft_floors(model, cm, reqs), 50) * 1e3
            m.update({"system": system, "workload": workload, "rate": rate, "model": model_name,
                      "device": spec.name, "devices": n_dev, "requests": n_req, "emulated": True,
                      "sim_events": st["events"], "wall_s": round(time.perf_counter() - t0, 2)})
            if system == "static-disagg":
                m["prefill_devices"], m["decode_devices"] = n_prefill, n_dev - n_prefill
            return m
        for system in SYSTEMS:
            runs.append(one(system))
        for b in flex_budgets_ms:
            runs.append(one("flexnpu", budget_s=b / 1e3))
        for p_ in (splits or range(1, n_dev)):
            runs.append(one("static-disagg", p_))
    return runs


def slo_throughput(runs):
    ok = [r["throughput_tok_s"] for r in runs if r["slo_attainment"] >= SLO_ATTAINMENT]
    return max(ok) if ok else 0.0


# Capacity (goodput) search: seconds of Poisson arrivals per probe and bisection steps, (full,
# --quick). A probe must outlast the TTFT SLO many times over, or a growing queue goes unseen;
# decode-heavy requests live ~1-2 min, so reasoning probes are longest.
CAPACITY_DURATION_S = {"chat": (60, 20), "long": (120, 40), "reasoning": (240, 60)}
CAPACITY_STEPS = (7, 5)
COLOC_BUDGETS = ((512, 1024, 2048, 4096), (2048,))   # static-coloc token budgets searched (full, --quick)
FLEX_CHUNKS = ((512, 1024, 2048), (1024,))            # flexnpu prefill-engine chunk sizes searched (full, --quick)
FLEX_TPOT_BUDGETS_MS = (20.0, 25.0, 30.0)             # extra per-rate flexnpu runs (full mode)
CAPACITY_SEEDS = (2, 1)                               # workload seeds averaged per probe (full, --quick)
SIM_COLOC_BUDGETS, SIM_FLEX_CHUNKS = (512, 2048), (1024,)   # --simulate (full): the knobs' best values on Qwen
SIM_DURATION_S = {"reasoning": 120}                   # --simulate (full): shorter decode-heavy probes


def capacity_key(system, n_prefill=0, budget=0, chunk=0):
    return (system + (f" {n_prefill}p" if system == "static-disagg" else "") + (f" b{budget}" if budget else "")
            + (f" c{chunk}" if chunk else ""))


def _capacity_task(task: dict) -> dict:
    """One system's goodput search (runs in a worker process)."""
    model, cm = MODELS[task["model"]], CostModel(get_spec(task["device"]))
    slo, n_dev = task["slo"], task["devices"]

    def attainment(rate: float) -> float:
        # averaged over seeds: one seed's attainment near the knee is not monotone in the rate
        att = []
        for seed in range(task["seed"], task["seed"] + task["seeds"]):
            reqs = generate(task["workload"], rate * n_dev, requests_for(rate, n_dev, task["duration_s"]), seed)
            cfg = SimConfig(tpot_budget_s=slo["tpot"])
            if task.get("max_batched_tokens"):
                cfg.max_batched_tokens = task["max_batched_tokens"]
            if task.get("flex_prefill_chunk"):
                cfg.flex_prefill_chunk = task["flex_prefill_chunk"]
            simulate(task["system"], model, cm, reqs, n_dev, task.get("prefill_devices", 0), cfg)
            att.append(metrics(reqs, slo["ttft"], slo["tpot"])["slo_attainment"])
        return sum(att) / len(att)

    t0 = time.perf_counter()
    res = sustainable_rate(attainment, task["lo"], task["hi"], task["steps"], SLO_ATTAINMENT)
    mean_out = sum(r.output for r in generate(task["workload"], 1.0, 4000, task["seed"])) / 4000
    out = dict(task, **res.as_dict(), key=capacity_key(task["system"], task.get("prefill_devices", 0),
                                                       task.get("max_batched_tokens", 0),
                                                       task.get("flex_prefill_chunk", 0)))
    out["goodput_tok_s"] = res.max_rate * n_dev * mean_out
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def capacity_group(model_name, spec, workload, n_dev, slo, seed, quick, splits, jobs, coloc_budgets=None,
                   duration_s=None, flex_chunks=None, seeds=None):
    """Goodput of every system (coloc at each token budget, disagg at each split) on one workload."""
    q = 1 if quick else 0
    grid = RATES_PER_DEVICE[model_name][workload]
    base = {"model": model_name, "device": spec.name, "workload": workload, "devices": n_dev, "slo": slo,
            "seed": seed, "seeds": seeds or CAPACITY_SEEDS[q], "duration_s": duration_s or CAPACITY_DURATION_S[workload][q],
            "steps": CAPACITY_STEPS[q],
            "lo": grid[0], "hi": 2 * grid[-1], "emulated": True}
    tasks = [dict(base, system="static-coloc", max_batched_tokens=b) for b in (coloc_budgets or COLOC_BUDGETS[q])]
    tasks += [dict(base, system="flexnpu", flex_prefill_chunk=c) for c in (flex_chunks or FLEX_CHUNKS[q])]
    tasks += [dict(base, system="static-coloc-decode-first")]
    tasks += [dict(base, system="static-disagg", prefill_devices=p_) for p_ in (splits or range(1, n_dev))]
    tasks.sort(key=lambda t: t["system"] != "flexnpu")     # the slowest first
    out = []
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else contextlib.nullcontext() as ex:
        for r in (ex.map if ex else map)(_capacity_task, tasks):
            progress(f"  capacity {workload}: {r['key']}: {r['max_rate_per_device']:.3f} req/s/device ({r['wall_s']} s)")
            out.append(r)
    return out


def _best(cap, system):
    """A system's best configuration: highest goodput (ties: fewer prefill devices, smaller
    budget or chunk). Every system gets its main knob searched, FlexNPU included."""
    c = [r for r in cap if r["system"] == system]
    return max(c, key=lambda r: (r["max_rate_per_device"], -r.get("prefill_devices", 0),
                                 -r.get("max_batched_tokens", 0), -r.get("flex_prefill_chunk", 0)))


def summarize(runs, workload, cap, scale=1.0):
    """Compare FlexNPU with the baselines: per rate (TTFT, TPOT) and at the SLO (goodput)."""
    wl = [r for r in runs if r["workload"] == workload]
    cw = [r for r in cap if r["workload"] == workload]
    bd = _best(cw, "static-disagg")
    best = bd["prefill_devices"]
    for r in wl:
        if r["system"] == "static-disagg":
            r["best_split"] = r["prefill_devices"] == best
    flex = {r["rate"]: r for r in wl if r["system"] == "flexnpu" and not r.get("tight_budget")}
    col = {r["rate"]: r for r in wl if r["system"] == "static-coloc"}
    dfc = {r["rate"]: r for r in wl if r["system"] == "static-coloc-decode-first"}
    variants = [r for r in wl if r["system"] == "flexnpu"]

    def matched(base):
        """Per rate: of FlexNPU's runs at each TPOT budget, the lowest TTFT p50 whose TPOT p50 is
        within +5 % of the baseline's (None if no budget holds TPOT there)."""
        out = []
        for rate in sorted(flex):
            c = base[rate]
            ok = [f for f in variants if f["rate"] == rate and f["tpot_p50_ms"] <= 1.05 * c["tpot_p50_ms"]]
            if not ok:
                out.append({"rate": rate, "tpot_budget_ms": None})
                continue
            f = min(ok, key=lambda f: f["ttft_p50_ms"])
            out.append(dict(vs_one(f, c), tpot_budget_ms=f["tpot_budget_ms"]))
        return out

    def vs_one(f, c):
        return {"rate": f["rate"], "ttft_p50_reduction_pct": 100 * (1 - f["ttft_p50_ms"] / c["ttft_p50_ms"]),
                # no system can prefill faster than an idle device: the most any could cut
                "ttft_p50_reduction_bound_pct": 100 * (1 - f["ttft_floor_p50_ms"] / c["ttft_p50_ms"]),
                "tpot_p50_change_pct": 100 * (f["tpot_p50_ms"] / c["tpot_p50_ms"] - 1),
                "throughput_ratio": f["throughput_tok_s"] / c["throughput_tok_s"]}

    def vs(base):
        return [vs_one(flex[rate], base[rate]) for rate in sorted(flex)]
    best_c, fx, dff = _best(cw, "static-coloc"), _best(cw, "flexnpu"), _best(cw, "static-coloc-decode-first")
    kind = WORKLOADS[workload].kind

    def pct(a, b):
        return 100 * (a["max_rate_per_device"] / b["max_rate_per_device"] - 1) if b["max_rate_per_device"] else math.inf
    k = round(scale)
    return {"workload": workload, "kind": kind, "best_disagg_split": f"{best * k}:{(bd['devices'] - best) * k}",
            "best_disagg_unit_prefill_devices": best,
            "best_coloc_max_batched_tokens": best_c["max_batched_tokens"],
            "best_flex_prefill_chunk": fx["flex_prefill_chunk"],
            "goodput_tok_s": {"flexnpu": fx["goodput_tok_s"] * scale, "static-coloc": best_c["goodput_tok_s"] * scale,
                              "static-disagg": bd["goodput_tok_s"] * scale,
                              "static-coloc-decode-first": dff["goodput_tok_s"] * scale},
            "max_rate_per_device": {"flexnpu": fx["max_rate_per_device"], "static-coloc": best_c["max_rate_per_device"],
                                    "static-disagg": bd["max_rate_per_device"],
                                    "static-coloc-decode-first": dff["max_rate_per_device"]},
            "flex_vs_disagg_pct": pct(fx, bd), "flex_vs_coloc_pct": pct(fx, best_c),
            "flex_vs_coloc_decode_first_pct": pct(fx, dff),
            "vs_coloc_per_rate": vs(col), "vs_coloc_decode_first_per_rate": vs(dfc),
            "vs_coloc_tpot_matched": matched(col), "vs_coloc_decode_first_tpot_matched": matched(dfc),
            "disagg_target_pct": 5.0 if kind == "balanced" else 26.0}


def deployment_split(summaries, capacity):
    """A static split is fixed when the cluster is deployed, not re-cut per request mix: compare
    FlexNPU on each other mix with disaggregation at the split that was best for the balanced mix
    (a secondary figure; the headline uses each mix's own best split)."""
    for bal in [s for s in summaries if s["kind"] == "balanced"]:
        p_ = bal["best_disagg_unit_prefill_devices"]
        for s in summaries:
            if s["workload"] == bal["workload"] or s.get("cluster") != bal.get("cluster"):
                continue
            d = [c for c in capacity if c["workload"] == s["workload"] and c["system"] == "static-disagg"
                 and c["prefill_devices"] == p_]
            if not d or not d[0]["max_rate_per_device"]:
                continue
            s["balanced_mix_split"] = bal["best_disagg_split"]
            s["flex_vs_disagg_at_balanced_mix_split_pct"] = 100 * (s["max_rate_per_device"]["flexnpu"]
                                                                  / d[0]["max_rate_per_device"] - 1)


def print_table(runs, summaries, header):
    print(header)
    cols = ("system", "split", "rate", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "SLO")
    print(f"{cols[0]:<27}{cols[1]:>6}{cols[2]:>7}{cols[3]:>10}{cols[4]:>10}{cols[5]:>10}{cols[6]:>10}{cols[7]:>10}{cols[8]:>6}")
    for wl in dict.fromkeys(r["workload"] for r in runs):
        print(f"-- workload {wl} ({WORKLOADS[wl].kind}), emulated, times in ms")
        for r in runs:
            if r["workload"] != wl or (r["system"] == "static-disagg" and not r.get("best_split")):
                continue
            split = f"{r['prefill_devices']}:{r['decode_devices']}" if r["system"] == "static-disagg" else "-"
            name = r["system"] + (f" @{r['tpot_budget_ms']:.0f}ms" if r.get("tight_budget") else "")
            print(f"{name:<27}{split:>6}{r['rate']:>7.2f}{r['throughput_tok_s']:>10.0f}{r['ttft_p50_ms']:>10.1f}"
                  f"{r['ttft_p99_ms']:>10.1f}{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>10.1f}{r['slo_attainment']:>6.2f}")
    print("\nsummary (emulated):")
    for s in summaries:
        g, mr = s["goodput_tok_s"], s["max_rate_per_device"]
        print(f"  {s['workload']:<10} {s['kind']:<14} goodput = highest rate with >= {SLO_ATTAINMENT:.0%} of requests "
              f"within both SLOs: flexnpu chunk {s['best_flex_prefill_chunk']} {mr['flexnpu']:.2f} req/s/dev "
              f"({g['flexnpu']:.0f} tok/s), "
              f"disagg {s['best_disagg_split']} {mr['static-disagg']:.2f} ({g['static-disagg']:.0f}), "
              f"coloc budget {s['best_coloc_max_batched_tokens']} {mr['static-coloc']:.2f} ({g['static-coloc']:.0f}), "
              f"coloc-decode-first {mr['static-coloc-decode-first']:.2f} ({g['static-coloc-decode-first']:.0f})")
        print(f"  {'':<25} -> flex vs disagg {s['flex_vs_disagg_pct']:+.1f}% (target >= +{s['disagg_target_pct']:.0f}%), "
              f"vs coloc {s['flex_vs_coloc_pct']:+.1f}%, vs coloc-decode-first {s['flex_vs_coloc_decode_first_pct']:+.1f}%")
        if "balanced_mix_split" in s:
            print(f"  {'':<25} -> flex vs disagg deployed at the balanced mix's split {s['balanced_mix_split']}: "
                  f"{s['flex_vs_disagg_at_balanced_mix_split_pct']:+.1f}%")
        for key, lab in (("vs_coloc_tpot_matched", "coloc"), ("vs_coloc_decode_first_tpot_matched", "coloc-decode-first")):
            for pr in s.get(key, []):
                if pr["tpot_budget_ms"] is None:
                    print(f"      rate {pr['rate']:6.2f}: vs {lab:<18} no TPOT budget kept TPOT p50 within +5%")
                    continue
                print(f"      rate {pr['rate']:6.2f}: vs {lab:<18} at the same TPOT (flexnpu --tpot-budget-ms "
                      f"{pr['tpot_budget_ms']:.0f}): TTFT p50 {-pr['ttft_p50_reduction_pct']:+6.1f}% (floor allows "
                      f"{-pr['ttft_p50_reduction_bound_pct']:+.0f}%), TPOT p50 {pr['tpot_p50_change_pct']:+5.1f}%, "
                      f"throughput x{pr['throughput_ratio']:.3f}")
        for key, lab in (("vs_coloc_per_rate", "coloc"), ("vs_coloc_decode_first_per_rate", "coloc-decode-first")):
            for pr in s[key]:
                print(f"      rate {pr['rate']:6.2f}: vs {lab:<18} TTFT p50 {-pr['ttft_p50_reduction_pct']:+6.1f}% "
                      f"(target <= -92%; idle-device floor allows {-pr['ttft_p50_reduction_bound_pct']:+.0f}%), "
                      f"TPOT p50 {pr['tpot_p50_change_pct']:+6.1f}% (target <= +5%), "
                      f"throughput x{pr['throughput_ratio']:.3f} (target >= 0.97)")


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys((r.get("cluster", r["devices"]), r["workload"]) for r in runs))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for i, (cl, wl) in enumerate(groups):
        sel = [r for r in runs if r["workload"] == wl and r.get("cluster", r["devices"]) == cl]
        for system in ("static-coloc", "static-coloc-decode-first", "static-disagg", "flexnpu"):
            rs = sorted((r for r in sel if r["system"] == system and not r.get("tight_budget")
                         and (system != "static-disagg" or r.get("best_split"))),
                        key=lambda r: r["rate"])
            if not rs:
                continue
            lab = system + (f" {rs[0]['prefill_devices']}:{rs[0]['decode_devices']}" if system == "static-disagg" else "")
            x = [r["rate"] * r.get("scale", 1) for r in rs]
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
    fig.suptitle(f"{runs[0]['model']} on {runs[0]['device']} - emulated (virtual-time cost model), not measured hardware")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


RT_RATES_PER_DEVICE = {"chat": ([4.0], [3.0, 6.0]), "long": ([1.0], [0.5, 1.0])}   # (--quick, full)
RT_REQUESTS_PER_DEVICE = (8, 20)                                                     # (--quick, full)


def rt_summary(runs, workload):
    """The simulated mode's summary keys for a real-time group (no decode-first baseline here)."""
    wl = [r for r in runs if r["workload"] == workload]
    flex = {r["rate"]: r for r in wl if r["system"] == "flexnpu"}
    col = {r["rate"]: r for r in wl if r["system"] == "static-coloc"}
    dis = {r["rate"]: r for r in wl if r["system"] == "static-disagg" and r.get("best_split")}
    tf, tc, td = (slo_throughput(list(d.values())) for d in (flex, col, dis))
    rb = next(iter(dis.values()))
    kind = WORKLOADS[workload].kind
    return {"workload": workload, "kind": kind, "best_disagg_split": f"{rb['prefill_devices']}:{rb['decode_devices']}",
            "slo_throughput_tok_s": {"flexnpu": tf, "static-coloc": tc, "static-disagg": td},
            "flex_vs_disagg_pct": (100 * (tf / td - 1)) if td else math.inf,
            "flex_vs_coloc_pct": (100 * (tf / tc - 1)) if tc else math.inf,
            "vs_coloc_per_rate": [{"rate": rate,
                                   "ttft_p50_reduction_pct": 100 * (1 - flex[rate]["ttft_p50_ms"] / col[rate]["ttft_p50_ms"]),
                                   "tpot_p50_change_pct": 100 * (flex[rate]["tpot_p50_ms"] / col[rate]["tpot_p50_ms"] - 1),
                                   "throughput_ratio": flex[rate]["throughput_tok_s"] / col[rate]["throughput_tok_s"]}
                                  for rate in sorted(flex)],
            "disagg_target_pct": 5.0 if kind == "balanced" else 26.0}


def run_realtime(a, model_name, spec, t0) -> int:
    from flexnpu.sched.models import MODELS

    wls = (a.workloads or ("chat" if a.quick else "chat,long")).split(",")
    for w in wls:
        if w not in WORKLOADS:
            print(f"flexnpu bench serve: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    n_dev = a.devices or 2
    if n_dev < 2:
        print("flexnpu bench serve: --realtime needs --devices >= 2 (static-disagg needs a prefill and a decode "
              "device, and every system gets the same count)", file=sys.stderr)
        return 2
    model = MODELS[model_name]
    kv_tokens = min(model.kv_capacity_tokens(spec.mem_bytes) // 2, 200_000)
    cfg = SimConfig(max_batched_tokens=a.max_batched_tokens)
    n_req = a.requests or RT_REQUESTS_PER_DEVICE[0 if a.quick else 1] * n_dev
    runs, summaries = [], []
    pools: dict = {}     # (policy, TPOT budget) -> DaemonSet, reused by every run that matches
    try:
        _rt_groups(a, model_name, spec, wls, n_dev, n_req, kv_tokens, cfg, runs, summaries, pools)
    finally:
        for ds in pools.values():
            ds.stop()
    return _rt_report(a, runs, summaries, model_name, spec, n_dev, n_req, t0)


def _rt_groups(a, model_name, spec, wls, n_dev, n_req, kv_tokens, cfg, runs, summaries, pools):
    from ._realtime import DaemonSet, best_split, run_system

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
        for rate in rates:
            for system, p_ in [("static-coloc", 0), ("flexnpu", 0)] + [("static-disagg", p_) for p_ in splits]:
                reqs = generate(w, rate, n_req, a.seed)     # same seeded workload for every system
                key = ("flex" if system == "flexnpu" else "fifo", slo["tpot"])
                if key not in pools:
                    pools[key] = DaemonSet(n_dev, spec.name, key[0], slo["tpot"] * 1e3)
                t1 = time.perf_counter()
                m = run_system(system, model_name, spec.name, reqs, cfg, slo, a.groups, kv_tokens,
                               deadline_s=120.0, n_devices=n_dev, n_prefill=p_, daemons=pools[key])
                m.update({"workload": w, "rate": rate, "model": model_name, "device": spec.name,
                          "devices": n_dev, "requests": n_req, "seed": a.seed, "mode": "realtime", "emulated": True,
                          "throughput_per_device_tok_s": m["throughput_tok_s"] / n_dev,
                          "wall_s": round(time.perf_counter() - t1, 2)})
                group.append(m)
        best = best_split(group, SLO_ATTAINMENT)
        for r in group:
            if r["system"] == "static-disagg":
                r["best_split"] = r["prefill_devices"] == best
        runs += group
        summaries.append(rt_summary(group, w))


def _rt_report(a, runs, summaries, model_name, spec, n_dev, n_req, t0) -> int:
    if a.json:
        print(json.dumps({"runs": runs, "summary": summaries, "mode": "realtime", "emulated": True, "devices": n_dev,
                          "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
        return 0
    print(f"flexnpu bench serve --realtime: {model_name} on {n_dev} emulated {spec.name} devices (one emu:{spec.name} "
          f"daemon each, real client processes), {n_req} requests per run, seed {a.seed}, {a.groups} layer groups, "
          f"least-loaded dispatch [EMULATED: real time, cost-model kernels]")
    print(f"{'system':<14}{'split':>6}{'dev':>4}{'rate':>6}{'tok/s':>9}{'tok/s/dev':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT p50':>10}{'TPOT p99':>10}{'SLO':>6}")
    for r in runs:
        split = f"{r['prefill_devices']}:{r['decode_devices']}" if r["system"] == "static-disagg" else "-"
        mark = "*" if r.get("best_split") else ""
        print(f"{r['system'] + mark:<14}{split:>6}{r['devices']:>4}{r['rate']:>6.1f}{r['throughput_tok_s']:>9.0f}"
              f"{r['throughput_per_device_tok_s']:>10.0f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>10.1f}"
              f"{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>10.1f}{r['slo_attainment']:>6.2f}  ({r['workload']})")
        if "kv_handoff" in r:
            k = r["kv_handoff"]
            print(f"{'':14}KV hand-off zero-copy on all {len(k['per_device'])} devices: {k['zero_copy']} (pool "
                  f"{k['kv_pool_bytes'] / 2**30:.1f} GiB per device charged once; importers' own allocations "
                  f"<= {k['importer_allocated_bytes'] / 2**20:.0f} MiB)")
        if "kv_link_gb_s" in r:
            print(f"{'':14}KV over a {r['kv_link_gb_s']} GB/s link (D2H + H2D, both charged)")
    print("* static-disagg: best split (highest throughput at >= 90% SLO attainment, ties to lower TTFT p50); "
          "every split is in --json")
    for s_ in summaries:
        sl = s_["slo_throughput_tok_s"]
        print(f"  {s_['workload']}: throughput at >= {SLO_ATTAINMENT:.0%} SLO: flexnpu {sl['flexnpu']:.0f}, "
              f"disagg {s_['best_disagg_split']} {sl['static-disagg']:.0f}, coloc {sl['static-coloc']:.0f} tok/s "
              f"(flex vs disagg {s_['flex_vs_disagg_pct']:+.1f}%, vs coloc {s_['flex_vs_coloc_pct']:+.1f}%)")
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
    default_wl = ("chat" if a.quick else "chat,long,reasoning") if a.simulate else "chat,long"
    wls = (a.workloads or default_wl).split(",")
    for w in wls:
        if w not in WORKLOADS:
            print(f"flexnpu bench serve: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    n_dev = a.devices or (8 if a.simulate else 4)
    n_req = a.requests or ((10 * n_dev if a.simulate else 30 * n_dev) if a.quick else 100 * n_dev)
    cfg = SimConfig(max_batched_tokens=a.max_batched_tokens)
    runs, summaries, capacity = [], [], []
    for w in wls:
        slo = dict(SLO[model])
        if WORKLOADS[w].kind == "prefill-heavy":
            slo["ttft"] = slo["ttft_long"]
        cfg.tpot_budget_s = slo["tpot"]
        rates = RATES_PER_DEVICE[model][w]
        if a.quick:  # --simulate --quick: a middle and the highest load only, to stay under 60 s
            rates = rates[1:] if not a.simulate else [rates[1], rates[-1]] if WORKLOADS[w].kind != "decode-heavy" \
                else rates[-1:]   # decode-heavy runs have ~1500 iterations per request: 3-5x the events
        splits = None
        if a.simulate and a.quick:
            p0 = estimate_split(model, spec, w, n_dev)
            splits = [p_ for p_ in (p0 - 1, p0, p0 + 1) if 0 < p_ < n_dev]
        budgets_ms = ([float(b) for b in a.flex_tpot_budgets.split(",") if b] if a.flex_tpot_budgets is not None
                      else [] if (a.quick or a.simulate) else FLEX_TPOT_BUDGETS_MS)
        group = run_group(model, spec, w, [r * n_dev for r in rates], n_dev, n_req, a.seed, cfg, slo, splits,
                          budgets_ms)
        progress(f"flexnpu bench serve: {w}: per-rate runs done ({time.perf_counter() - t0:.0f} s); goodput search "
                 f"on {a.jobs} process(es)...")
        budgets = [int(b) for b in a.coloc_budgets.split(",")] if a.coloc_budgets else None
        chunks = [int(b) for b in a.flex_chunks.split(",")] if a.flex_chunks else None
        seeds = None
        if a.simulate:   # DeepSeek-R1 probes cost ~10x Qwen's: the knobs found best on Qwen, one seed
            budgets, chunks, seeds = budgets or SIM_COLOC_BUDGETS, chunks or SIM_FLEX_CHUNKS, 1
        cap = capacity_group(model, spec, w, n_dev, slo, a.seed, a.quick, splits, a.jobs, budgets,
                             a.capacity_duration or (SIM_DURATION_S.get(w) if a.simulate and not a.quick else None),
                             chunks, seeds)
        capacity += cap
        if a.simulate:
            clusters = [int(c) for c in a.clusters.split(",")]
            if a.quick:
                clusters = [clusters[0], clusters[-1]]
            summarize(group, w, cap)     # marks the best split in the unit's runs
            for cl in clusters:
                if cl % n_dev:
                    print(f"flexnpu bench serve: cluster {cl} is not a multiple of the unit {n_dev}", file=sys.stderr)
                    return 2
                k = cl // n_dev
                for r in group:
                    rr = dict(r, cluster=cl, scale=k, rate=r["rate"] * k, throughput_tok_s=r["throughput_tok_s"] * k,
                              unit_devices=n_dev)
                    if rr["system"] == "static-disagg":
                        rr["prefill_devices"], rr["decode_devices"] = r["prefill_devices"] * k, r["decode_devices"] * k
                    rr["scale"] = 1
                    runs.append(rr)
                sc = summarize([r for r in runs if r.get("cluster") == cl and r["workload"] == w], w, cap, scale=k)
                sc["cluster"] = cl
                summaries.append(sc)
        else:
            runs += group
            summaries.append(summarize(group, w, cap))
    deployment_split(summaries, capacity)
    if a.plot:
        plot(runs, a.plot)
    if a.json:
        print(json.dumps({"runs": runs, "summary": summaries, "capacity": capacity, "emulated": True,
                          "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
    else:
        hdr = (f"flexnpu bench serve: {model} on {spec.name}, "
               + (f"cluster study, unit of {n_dev} devices scaled to {a.clusters}" if a.simulate else f"{n_dev} devices")
               + f", {n_req} requests per run, seed {a.seed} [EMULATED: virtual time, cost model + emu engine]")
        if a.simulate:
            for cl in dict.fromkeys(r["cluster"] for r in runs):
                print_table([r for r in runs if r["cluster"] == cl],
                            [s for s in summaries if s["cluster"] == cl], hdr + f"\n== {cl} devices")
        else:
            print_table(runs, summaries, hdr)
        print(f"\n({time.perf_counter() - t0:.1f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
