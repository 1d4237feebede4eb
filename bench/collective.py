"""all_reduce bus bandwidth and latency: FlexNPU's hccl backend against gloo, same processes.

Two ranks (one process each, on virtual devices npu:0 and npu:1 served by two daemons) run
all_reduce (sum, float32) for 4 KiB ... 256 MiB on the FlexNPU hccl backend (the daemons move the
data through a shared-memory segment) and on gloo over the same processes (TCP loopback),
alternating per message size. Bus bandwidth follows nccl-tests: busbw = algbw * 2(n-1)/n with
algbw = bytes / time. Targets (issue 17): >= 2x gloo's busbw at >= 64 MiB, and small-message
latency <= gloo's.

Small-message latency is reported two ways (bench/_collective_rank.py): *isolated* (a barrier,
one operation, completed: every hand-off between processes is on the critical path) and *back to
back* (nccl-tests' way: a block of operations completed once, time per operation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import ROOT, child_env, dump_json, print_table, progress

LAUNCHER = """
import os, socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
n = int(sys.argv[1])
ps = [subprocess.Popen([sys.executable] + sys.argv[2:], env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(n),
      LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in range(n)]
sys.exit(max(abs(p.wait()) for p in ps))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexnpu bench collective",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="4 KiB ... 16 MiB, fewer repetitions")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-bytes", type=int, default=None, help="largest message (default 256 MiB)")
    ap.add_argument("--iters", type=int, default=None, help="repetitions of small messages (default 50)")
    ap.add_argument(
        "--native",
        action="store_true",
        help="the ranks run the REAL torch_npu on the native front end (its ProcessGroupHCCL over "
        "FlexNPU's HCCL C API) instead of FlexNPU's Python hccl backend",
    )
    a = ap.parse_args(argv)
    top = a.max_bytes or ((16 << 20) if a.quick else (256 << 20))
    sizes = []
    s = 4 << 10
    while s <= top:
        sizes.append(s)
        s *= 4
    iters = a.iters or (10 if a.quick else 50)
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-coll-") as tmp:
        out = Path(tmp) / "result.json"
        devices = ",".join(str(d) for d in range(min(a.ranks, 2)))
        cmd = [
            sys.executable,
            "-m",
            "flexnpu",
            "run",
            "--backend",
            "cpu",
            "--device",
            devices,
            "--interpose",
            "native" if a.native else "python",
            "--",
            sys.executable,
            "-c",
            LAUNCHER,
            str(a.ranks),
            str(ROOT / "bench" / "_collective_rank.py"),
            str(out),
            ",".join(map(str, sizes)),
            str(iters),
        ]
        progress(f"[collective] {a.ranks} ranks on devices {devices}, {len(sizes)} sizes up to {top} B")
        # A runtime directory of its own: `flexnpu run` starts private daemons, never a shared one's.
        (Path(tmp) / "run").mkdir()
        env = child_env(Path(tmp) / "run", FLEXNPU_BENCH_NATIVE="1" if a.native else "0")
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=3600)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"collective benchmark failed (exit {r.returncode})")
        res = json.loads(out.read_text())
    rows = res["rows"]
    big = [x for x in rows if x["bytes"] >= 64 << 20]
    small = [x for x in rows if x["bytes"] <= 64 << 10]
    summary = {
        "min_busbw_ratio_at_64MiB_plus": min((x["busbw_ratio"] for x in big), default=None),
        "target_busbw_2x_met": all(x["busbw_ratio"] >= 2.0 for x in big) if big else None,
        "small_latency_ratio_max": max((x["hccl_us"] / x["gloo_us"] for x in small), default=None),
        "target_small_latency_met": all(x["hccl_us"] <= x["gloo_us"] for x in small) if small else None,
        "small_latency_b2b_ratio_max": max(
            (x["hccl_b2b_us"] / x["gloo_b2b_us"] for x in small if "hccl_b2b_us" in x), default=None
        ),
        "target_small_latency_b2b_met": all(x["hccl_b2b_us"] <= x["gloo_b2b_us"] for x in small)
        if small
        else None,
        "all_correct": all(x["correct"] for x in rows),
    }
    doc = {
        "benchmark": "collective",
        "op": "all_reduce sum float32",
        "front": "native (real torch_npu)" if a.native else "python",
        "ranks": res["ranks"],
        "busbw_definition": "algbw * 2(n-1)/n (nccl-tests)",
        "rows": rows,
        "summary": summary,
    }
    if a.json:
        dump_json(doc)
    else:
        print_table(
            rows,
            [
                ("bytes", "bytes", ""),
                ("hccl_us", "hccl us", ".1f"),
                ("gloo_us", "gloo us", ".1f"),
                ("hccl_busbw_GBps", "hccl busbw GB/s", ".3f"),
                ("gloo_busbw_GBps", "gloo busbw GB/s", ".3f"),
                ("busbw_ratio", "ratio", ".2f"),
                ("hccl_b2b_us", "hccl b2b us", ".1f"),
                ("gloo_b2b_us", "gloo b2b us", ".1f"),
            ],
            title=f"all_reduce, {res['ranks']} ranks",
        )
        print(json.dumps(summary))
    return 0
