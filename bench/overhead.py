"""FlexNPU's overhead against direct device access: decode tokens/s and client cost per op.

The same decoder (bench/_decode.py) runs directly on the backend device and through FlexNPU
(`flexnpu run`, the `npu` device, an embedded daemon on the same backend), alternating runs in
one invocation; medians are compared. Graph mode captures one decode step with
torch.npu.NPUGraph and replays it as one command. On the CPU there is no native graph, so the
direct baseline of both modes is direct eager execution.
Targets (issue 4): graph-replayed decode >= 0.97x direct; eager client cost <= 15 us per op.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ._common import child_env, dump_json, median, print_table, progress


def _child(args: list[str], through_flexnpu: bool, backend: str) -> dict:
    script = str(Path(__file__).with_name("_decode.py"))   # beside this file, installed or not
    if through_flexnpu:
        cmd = [sys.executable, "-m", "flexnpu", "run", "--backend", backend, "--", sys.executable, script, *args]
    else:
        cmd = [sys.executable, script, *args]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexnpu bench overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer steps (under a minute)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="cpu", help="cpu|cuda (the direct device and the daemon's backend)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)
    layers = a.layers or 4
    hidden = a.hidden or (512 if a.quick else 1024)
    steps = a.steps or (20 if a.quick else 60)
    reps = a.repeat or (2 if a.quick else 3)
    direct_dev = a.backend
    common = ["--steps", str(steps), "--layers", str(layers), "--hidden", str(hidden)]
    native_graph = a.backend == "cuda"
    runs: dict[str, list[float]] = {}
    tokens: dict[str, set] = {}
    for r in range(reps):
        for name, through, dev, mode in (
                ("direct-eager", False, direct_dev, "eager"),
                ("flexnpu-eager", True, "npu", "eager"),
                ("direct-graph", False, direct_dev, "graph" if native_graph else "eager"),
                ("flexnpu-graph", True, "npu", "graph")):
            progress(f"[overhead] repetition {r + 1}/{reps}: {name}")
            res = _child(["--device", dev, "--mode", mode, *common], through, a.backend)
            runs.setdefault(name, []).append(res["tokens_per_s"])
            tokens.setdefault(name, set()).add(res["last_token"])
    progress("[overhead] eager client-side cost per op")
    op_direct = _child(["--device", direct_dev, "--mode", "opcost"], False, a.backend)["eager_client_us_per_op"]
    op_flex = _child(["--device", "npu", "--mode", "opcost"], True, a.backend)["eager_client_us_per_op"]
    results = []
    for name in ("direct-eager", "flexnpu-eager", "direct-graph", "flexnpu-graph"):
        base = "direct-graph" if name.endswith("graph") else "direct-eager"
        tps = median(runs[name])
        results.append({"name": name, "tokens_per_s": round(tps, 2),
                        "ratio_vs_direct": round(tps / median(runs[base]), 4)})
    same = len(set().union(*tokens.values())) == 1
    out = {"results": results, "eager_client_us_per_op": round(op_flex, 2),
           "direct_us_per_op": round(op_direct, 2), "backend": a.backend, "same_tokens": same,
           "model": {"layers": layers, "hidden": hidden, "steps": steps}, "repetitions": reps,
           "note": None if native_graph else "CPU has no native graphs: direct-graph is direct eager"}
    if a.json:
        dump_json(out)
    else:
        print_table(results, [("name", "run", ""), ("tokens_per_s", "tokens/s", ".2f"),
                              ("ratio_vs_direct", "vs direct", ".3f")],
                    title=f"flexnpu bench overhead (backend {a.backend}, medians of {reps})")
        print(f"eager client-side cost: {op_flex:.2f} us/op through FlexNPU ({op_direct:.2f} us/op direct); "
              f"identical tokens: {same}")
    return 0 if same else 1
