"""FlexNPU's overhead against direct device access: decode tokens/s and client cost per op.

The same decoder (bench/_decode.py) runs directly on the backend device and through FlexNPU
(`flexnpu run`, the `npu` device, an embedded daemon on the same backend), alternating runs in
one invocation; medians are compared. Repetitions continue (up to --max-repeat) until the
direct runs agree within 10 %; the spread of every series is reported, and a caveat says when
they never agreed. Graph mode captures one decode step with torch.npu.NPUGraph and replays it
as one command. On the CPU there is no native graph, so the direct baseline of both modes is
direct eager execution (all direct runs pooled).
Targets (issue 4): graph-replayed decode >= 0.97x direct; eager client cost <= 15 us per op.

HF generate rows (bench/_hfgen.py): HuggingFace `generate()` with its default dynamic KV cache on
examples/generate.py's default model and on a 4-layer, 1024-wide one, eager, every shape new
(what users run: shapes change every token). added_us_per_op = (time per token through FlexNPU
- direct) / the program's aten operators per token (counted directly with a dispatch mode).
Targets (issue 13): >= 0.2x (default model) and >= 0.6x (1024 wide), <= 20 us added per op.

first-run row (full runs; --quick skips it to stay under a minute): the README's main job as a
user first meets it, `examples/generate.py` (its own timer around its one generate() call, the
first in the process: every shape, plan and first call is cold) directly and under `flexnpu run`
with a fresh embedded daemon (cpu backend only: the example runs on the CPU when not under
FlexNPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._common import child_env, dump_json, median, print_table, progress

_RUNTIME_DIR: str | None = None  # private runtime folder of this invocation's embedded daemons


def _child(args: list[str], through_flexnpu: bool, backend: str, script_name: str = "_decode.py") -> dict:
    # beside this file, installed or not (or a path of the checkout, e.g. the main example)
    script = script_name if "/" in script_name else str(Path(__file__).with_name(script_name))
    if through_flexnpu:
        # each run gets a fresh embedded daemon that leaves right after it (as a first run would)
        cmd = [
            sys.executable,
            "-m",
            "flexnpu",
            "run",
            "--backend",
            backend,
            "--idle-grace",
            "0",
            "--",
            sys.executable,
            script,
            *args,
        ]
    else:
        cmd = [sys.executable, script, *args]
    r = subprocess.run(cmd, env=child_env(_RUNTIME_DIR), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _native_generate(quick: bool, reps: int, backend: str, mode: str, max_reps: int = 0) -> list[dict] | str:
    """HuggingFace greedy generate() (dynamic KV cache) through the native front end, i.e. the
    real torch_npu on FlexNPU's AscendCL libraries (docs/native_ops.md), against the same
    program run directly on the backend device: one row per model, medians of at least `reps`
    alternating pairs, more (up to `max_reps`) while either series (direct or native) spreads by
    over AGREE: one run of either side that a busy neighbour slowed moves a median of three."""
    from flexnpu.hook import native

    if mode == "off":
        return "skipped (--native off)"
    if not native.torch_npu_installed():
        if mode == "on":
            raise RuntimeError("--native on: the real torch_npu is not installed (flexnpu install-torch-npu)")
        return "skipped: the real torch_npu is not installed for FlexNPU (flexnpu install-torch-npu)"
    script = str(Path(__file__).with_name("_native_generate.py"))
    models = [("tiny", 2, 64)] + ([] if quick else [("hidden-1024", 4, 1024)])
    # ... and the static decoder (bench/_decode.py) captured with the real torch_npu's NPUGraph
    # and replayed, against direct eager (the CPU has no graphs), as the main graph row
    models.append(("graph", 4, 512 if quick else 1024))
    tokens = "16" if quick else "32"
    rows = []
    for label, layers, hidden in models:
        args = ["--layers", str(layers), "--hidden", str(hidden), "--tokens", tokens]
        if label == "graph":
            args = ["--layers", str(layers), "--hidden", str(hidden), "--steps", "20" if quick else "60"]
        tps: dict[str, list[float]] = {"direct": [], "native": []}
        last: set[int] = set()
        r = 0
        while r < reps or (r < max_reps and max(spread(tps["direct"]), spread(tps["native"])) > AGREE):
            r += 1
            for name in ("direct", "native"):
                progress(
                    f"[overhead] native {label} repetition {r}/{reps if r <= reps else max_reps}: {name}"
                )
                if label == "graph":
                    mode = ["--mode", "eager" if name == "direct" else "graph"]
                    prog = str(Path(__file__).with_name("_decode.py"))
                    cmd = [
                        sys.executable,
                        prog,
                        "--device",
                        backend if name == "direct" else "npu",
                        *args,
                        *mode,
                    ]
                else:
                    cmd = [sys.executable, script, "--device", backend if name == "direct" else "npu", *args]
                if name == "native":
                    cmd = [
                        sys.executable, "-m", "flexnpu", "run", "--interpose", "native", "--backend", backend,
                        "--idle-grace", "0", "--", *cmd,
                    ]  # fmt: skip
                p = subprocess.run(
                    cmd, env=child_env(_RUNTIME_DIR), capture_output=True, text=True, timeout=900
                )
                if p.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                tps[name].append(res["tokens_per_s"])
                last.add(res["last_token"])
        d, n = median(tps["direct"]), median(tps["native"])
        rows.append(
            {
                "name": f"native-hf-generate-{label}" if label != "graph" else "native-decode-graph",
                "model": {"layers": layers, "hidden": hidden}
                | ({"steps": int(args[-1])} if label == "graph" else {"new_tokens": int(tokens)}),
                "tokens_per_s": round(n, 2),
                "direct_tokens_per_s": round(d, 2),
                "ratio_vs_direct": round(n / d, 4) if d else None,
                "spread_pct": round(100 * spread(tps["native"]), 1),
                "direct_spread_pct": round(100 * spread(tps["direct"]), 1),
                "repetitions": r,
                "same_tokens": len(last) == 1,
            }
        )
    return rows


AGREE = 0.10  # direct runs must agree within this spread before ratios are trusted


def spread(values: list[float]) -> float:
    """(max - min) / median: how far repeated measurements of one thing disagree."""
    m = median(values)
    return (max(values) - min(values)) / m if values and m else float("inf")


def direct_groups(runs: dict[str, list[float]], native_graph: bool) -> dict[str, list[float]]:
    """The direct measurements that must agree. Without native graphs direct-graph runs the
    same eager code as direct-eager, so all of them measure one thing."""
    if native_graph:
        return {"direct-eager": runs.get("direct-eager", []), "direct-graph": runs.get("direct-graph", [])}
    return {"direct": runs.get("direct-eager", []) + runs.get("direct-graph", [])}


def settled(runs: dict[str, list[float]], native_graph: bool) -> bool:
    return all(len(v) >= 2 and spread(v) <= AGREE for v in direct_groups(runs, native_graph).values())


def main(argv: list[str] | None = None) -> int:
    global _RUNTIME_DIR
    with tempfile.TemporaryDirectory(prefix="flexnpu-overhead-") as d:
        _RUNTIME_DIR = d
        try:
            return _main(argv)
        finally:
            _RUNTIME_DIR = None


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexnpu bench overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer steps (under a minute)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--backend", default="cpu", help="cpu|cuda (the direct device and the daemon's backend)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions at least (default 1 quick, 3)")
    ap.add_argument(
        "--max-repeat",
        type=int,
        default=None,
        help="repeat until the direct runs agree within 10%% or this many repetitions "
        "(default 3x --repeat; --quick: --repeat); the spread is reported either way",
    )
    ap.add_argument(
        "--native",
        choices=("auto", "on", "off"),
        default="auto",
        help="HF generate() rows through the native front end (the real torch_npu); auto: when "
        "installed, except with --quick (its minute has no room for them; --native on adds them)",
    )
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--hf-tokens", type=int, default=None, help="tokens per HF generate run (default 16 quick, 32)"
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate runs")
    a = ap.parse_args(argv)
    layers = a.layers or 4
    hidden = a.hidden or (512 if a.quick else 1024)
    steps = a.steps or (20 if a.quick else 60)
    reps = a.repeat or (1 if a.quick else 3)
    direct_dev = a.backend
    common = ["--steps", str(steps), "--layers", str(layers), "--hidden", str(hidden)]
    native_graph = a.backend == "cuda"
    runs: dict[str, list[float]] = {}
    tokens: dict[str, set] = {}
    # --quick keeps to its repetitions (under a minute); a full run repeats until direct agrees
    max_reps = max(reps, a.max_repeat or (reps if a.quick else 3 * reps))
    r = 0
    while r < reps or (r < max_reps and not settled(runs, native_graph)):
        r += 1
        for name, through, dev, mode in (
            ("direct-eager", False, direct_dev, "eager"),
            ("flexnpu-eager", True, "npu", "eager"),
            ("direct-graph", False, direct_dev, "graph" if native_graph else "eager"),
            ("flexnpu-graph", True, "npu", "graph"),
        ):
            progress(f"[overhead] repetition {r}/{reps if r <= reps else max_reps}: {name}")
            res = _child(["--device", dev, "--mode", mode, *common], through, a.backend)
            runs.setdefault(name, []).append(res["tokens_per_s"])
            tokens.setdefault(name, set()).add(res["last_token"])
    progress("[overhead] eager client-side cost per op")
    op_direct = _child(["--device", direct_dev, "--mode", "opcost"], False, a.backend)[
        "eager_client_us_per_op"
    ]
    op_flex = _child(["--device", "npu", "--mode", "opcost"], True, a.backend)["eager_client_us_per_op"]
    native_rows = (
        "skipped in --quick (add --native on)"
        if a.quick and a.native == "auto"
        else _native_generate(a.quick, reps, a.backend, a.native, min(max_reps, 2 * reps))
    )
    reps = r
    groups = direct_groups(runs, native_graph)
    # the baseline of each mode: without native graphs both modes compare with all direct runs
    base = {
        name: median(groups[name] if native_graph else groups["direct"])
        for name in ("direct-eager", "direct-graph")
    }
    results = []
    for name in ("direct-eager", "flexnpu-eager", "direct-graph", "flexnpu-graph"):
        tps = median(runs[name])
        results.append(
            {
                "name": name,
                "tokens_per_s": round(tps, 2),
                "ratio_vs_direct": round(
                    tps / base["direct-graph" if name.endswith("graph") else "direct-eager"], 4
                ),
                "spread_pct": round(100 * spread(runs[name]), 1),
            }
        )
    same = len(set().union(*tokens.values())) == 1
    hf = (
        []
        if a.no_hf
        else hf_generate_rows(a.backend, a.hf_tokens or (16 if a.quick else 32), reps if not a.quick else 1)
    )
    same = same and all(row["same_tokens"] for row in hf)
    # two cold runs of the example (~20 s): no room in --quick's minute
    first = (
        None
        if a.no_hf
        else "skipped in --quick (a full run measures it)"
        if a.quick
        else first_run_row(a.backend, reps)
    )
    if isinstance(first, dict):
        same = same and first["same_tokens"]
    caveats = []
    build = daemon_build()
    if not build["compiled_executor"] or build["hot_path"] != "c":
        caveats.append(
            f"the daemons ran a partial build ({build['why']}): these figures are slower than "
            "a full install's (make install builds everything)"
        )
    if not native_graph:
        caveats.append(
            "CPU has no native graphs: direct-graph is direct eager (both modes compare "
            "with the median of all direct runs)"
        )
    for g, v in groups.items():
        if spread(v) > AGREE:
            caveats.append(
                f"{g} runs disagree by {100 * spread(v):.0f}% (> {100 * AGREE:.0f}%) after {reps} "
                f"repetitions: ratios are uncertain by about that much (busy machine?)"
            )
    out = {
        "results": results,
        "hf_generate": hf,
        "first_run": first,
        "eager_client_us_per_op": round(op_flex, 2),
        "direct_us_per_op": round(op_direct, 2),
        "backend": a.backend,
        "same_tokens": same,
        "model": {"layers": layers, "hidden": hidden, "steps": steps},
        "repetitions": reps,
        "direct_spread_pct": {g: round(100 * spread(v), 1) for g, v in groups.items()},
        "note": caveats[0] if not native_graph else None,
        "caveats": caveats,
        "native_generate": native_rows,
        "daemon_build": {k: v for k, v in build.items() if k != "why"},
    }
    if a.json:
        dump_json(out)
    else:
        print_table(
            results,
            [
                ("name", "run", ""),
                ("tokens_per_s", "tokens/s", ".2f"),
                ("ratio_vs_direct", "vs direct", ".3f"),
                ("spread_pct", "spread %", ".1f"),
            ],
            title=f"flexnpu bench overhead (backend {a.backend}, medians of {reps})",
        )
        print(
            f"eager client-side cost: {op_flex:.2f} us/op through FlexNPU ({op_direct:.2f} us/op direct); "
            f"identical tokens: {same}"
        )
        if hf:
            print_hf_table(hf)
        if isinstance(first, dict):
            print(
                f"first run of the main example (examples/generate.py, cold): "
                f"{first['flexnpu_tokens_per_s']:.1f} tokens/s through FlexNPU, "
                f"{first['direct_tokens_per_s']:.1f} direct ({first['ratio_vs_direct']:.3f}x)"
            )
        elif first:
            print(f"first run: {first}")
        if isinstance(native_rows, list):
            print_table(
                native_rows,
                [
                    ("name", "run", ""),
                    ("tokens_per_s", "tokens/s", ".2f"),
                    ("direct_tokens_per_s", "direct", ".2f"),
                    ("ratio_vs_direct", "vs direct", ".3f"),
                    ("direct_spread_pct", "direct spread %", ".1f"),
                    ("repetitions", "pairs", ""),
                    ("same_tokens", "same tokens", ""),
                ],
                title="through the native front end (real torch_npu): HF generate(), eager; the static decoder, NPUGraph",
            )
        else:
            print(f"native generate: {native_rows}")
        for c in caveats:
            print(f"caveat: {c}")
    return 0 if same else 1


def daemon_build() -> dict[str, Any]:
    """What the daemons of this install run their planned launches with (they load these very
    files): the compiled executor (daemon/compiled.py) and the C hot path (daemon/hotpath.c).
    A stale or missing build only costs speed, silently; the figures say so instead."""
    import importlib.util

    from flexnpu.daemon import compiled

    why = []
    executor = compiled.state()
    if executor == "disabled":
        why.append("FLEXNPU_PLANEXEC=0")
    elif executor != "built":
        why.append(
            f"compiled executor not built or stale ({executor}): python3 -m flexnpu.daemon.optable.build"
        )
    hot = "c"
    if os.environ.get("FLEXNPU_DAEMON_HOTPATH", "1").strip() == "0":
        hot = "python"
        why.append("FLEXNPU_DAEMON_HOTPATH=0")
    elif importlib.util.find_spec("flexnpu.daemon._hot_core") is None:
        hot = "python"
        why.append("daemon/_hot_core not built: python3 setup.py build_ext --inplace")
    return {"compiled_executor": executor == "built", "hot_path": hot, "why": "; ".join(why)}


# ---- HF generate (dynamic cache, eager): the loop users run --------------------------------


def hf_generate_rows(backend: str, tokens: int, reps: int) -> list[dict]:
    """Direct and FlexNPU children alternate ``reps`` times; one row per model (medians)."""
    direct: list[dict] = []
    flex: list[dict] = []
    args = ["--tokens", str(tokens)]
    for r in range(reps):
        progress(f"[overhead] HF generate, repetition {r + 1}/{reps}: direct")
        direct.append(_child(["--device", backend, *args], False, backend, "_hfgen.py"))
        progress(f"[overhead] HF generate, repetition {r + 1}/{reps}: through FlexNPU")
        flex.append(_child(["--device", "npu", *args], True, backend, "_hfgen.py"))
    rows = []
    for name in direct[0]:
        d = median([x[name]["tokens_per_s"] for x in direct])
        f = median([x[name]["tokens_per_s"] for x in flex])
        ops = direct[0][name]["ops_per_token"]
        rows.append(
            {
                "name": f"hf-generate-{name}",
                "layers": direct[0][name]["layers"],
                "hidden": direct[0][name]["hidden"],
                "tokens": tokens,
                "direct_tokens_per_s": round(d, 2),
                "flexnpu_tokens_per_s": round(f, 2),
                "ratio_vs_direct": round(f / d, 4),
                "ops_per_token": round(ops, 1),
                "ops_per_token_npu": round(flex[0][name]["ops_per_token"], 1),
                "added_us_per_op": round((1 / f - 1 / d) / ops * 1e6, 1),
                "spread_pct": round(100 * spread([x[name]["tokens_per_s"] for x in flex]), 1),
                "same_tokens": len({tuple(x[name]["last_tokens"]) for x in direct + flex}) == 1,
            }
        )
    return rows


def first_run_row(backend: str, reps: int) -> dict | str:
    """The main example, cold: direct and through FlexNPU alternate ``reps`` times (medians)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    if backend != "cpu":
        return f"cpu backend only (the example runs on the CPU outside FlexNPU, not on {backend})"
    if not example.is_file():
        return f"{example}: needs a FlexNPU checkout"
    direct: list[dict] = []
    flex: list[dict] = []
    for r in range(reps):
        progress(f"[overhead] first run of examples/generate.py, repetition {r + 1}/{reps}")
        direct.append(_child(["--json"], False, backend, str(example)))
        flex.append(_child(["--json"], True, backend, str(example)))
    d = median([x["tokens_per_s"] for x in direct])
    f = median([x["tokens_per_s"] for x in flex])
    return {
        "name": "first-run-main-example",
        "direct_tokens_per_s": round(d, 2),
        "flexnpu_tokens_per_s": round(f, 2),
        "ratio_vs_direct": round(f / d, 4),
        "tokens": len(direct[0]["tokens"]),
        "same_tokens": len({tuple(x["tokens"]) for x in direct + flex}) == 1,
        "flexnpu_device": flex[0]["device"],
    }


def print_hf_table(rows: list[dict]) -> None:
    print_table(
        rows,
        [
            ("name", "HF generate (dynamic cache)", ""),
            ("direct_tokens_per_s", "direct tok/s", ".1f"),
            ("flexnpu_tokens_per_s", "flexnpu tok/s", ".1f"),
            ("ratio_vs_direct", "vs direct", ".3f"),
            ("ops_per_token", "ops/token", ".0f"),
            ("added_us_per_op", "added us/op", ".1f"),
        ],
    )
