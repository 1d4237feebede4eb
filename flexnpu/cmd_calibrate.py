"""flexnpu calibrate: fit the cost model's corrections to this machine and save them.

The policy scheduler's cost model (flexnpu.sched.costmodel) predicts kernel times from a device
spec's roofline; the daemon loads the corrections saved here (local_cost_model) so its torch
backends predict from measured times. That makes this runtime configuration, not a benchmark:
it is a command of its own (it was `flexnpu bench calibrate`).

Runs a fixed set of ops (GEMMs, attention, softmax, norms, elementwise, embedding, copies),
times each (median of repeats), compares with the roofline prediction for the local device spec,
and learns one correction factor per op class (bounded EWMA of measured/predicted in log space).
The corrections are written as JSON (default ~/.cache/flexnpu/corrections-<spec>.json, where the
daemon looks for them) and can be loaded with flexnpu.sched.costmodel.load_corrections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexnpu.sched.costmodel import CostModel, Corrections, aten_cost, default_corrections_path
from flexnpu.sched.specs import get_spec


def _cases(torch: Any, quick: bool, dev: str) -> list[tuple[str, Callable[[], Any], list[Any]]]:
    f = torch.float32
    n = 256 if quick else 512
    a, b = torch.randn(n, n, dtype=f, device=dev), torch.randn(n, n, dtype=f, device=dev)
    x = torch.randn(64, 1024, dtype=f, device=dev)
    w = torch.randn(2048, 1024, dtype=f, device=dev)
    q = torch.randn(1, 8, 256, 64, dtype=f, device=dev)
    big = torch.randn(4 * 2**20 if quick else 16 * 2**20, dtype=f, device=dev)
    emb = torch.randn(32000, 256, dtype=f, device=dev)
    idx = torch.randint(0, 32000, (512,), device=dev)
    F = torch.nn.functional
    return [
        ("aten::mm", lambda: torch.mm(a, b), [a, b]),
        ("aten::linear", lambda: F.linear(x, w), [x, w]),
        ("aten::bmm", lambda: torch.bmm(q[0], q[0].transpose(1, 2)), [q[0], q[0].transpose(1, 2)]),
        (
            "aten::scaled_dot_product_attention",
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
            [q, q, q],
        ),
        ("aten::_softmax", lambda: torch.softmax(x, -1), [x]),
        ("aten::layer_norm", lambda: F.layer_norm(x, (1024,)), [x]),
        ("aten::add", lambda: big + big, [big, big]),
        ("aten::mul", lambda: big * 2.0, [big]),
        ("aten::embedding", lambda: F.embedding(idx, emb), [emb, idx]),
        ("aten::clone", lambda: big.clone(), [big]),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", help="where to save the corrections (default ~/.cache/flexnpu/...)")
    p.add_argument("--spec", default="cpu", help="device spec to correct (default: measured local cpu)")
    p.add_argument("--device", default="cpu", help="torch device to run on (cpu; cuda where present)")
    p.add_argument("--repeats", type=int, help="timed repeats per op (median reported)")


def run(a: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("flexnpu calibrate: torch is required", file=sys.stderr)
        return 2
    spec = get_spec(a.spec)
    model = CostModel(spec, Corrections(alpha=0.3))
    reps = a.repeats or (5 if a.quick else 15)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    rows = []
    for name, fn, ins in _cases(torch, a.quick, a.device):
        out = fn()
        sync()
        outs = out if isinstance(out, (tuple, list)) else [out]
        cost = aten_cost(name, ins, outs, {"is_causal": True})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        pred = model.roofline(cost)
        for t in times:
            model.observe(cost, t)
        rows.append(
            {
                "op": name,
                "class": cost.op_class,
                "flops": cost.flops,
                "bytes": cost.bytes,
                "predicted_ms": pred * 1e3,
                "measured_ms": med * 1e3,
                "ratio": med / pred,
            }
        )
    corr = model.corrections.to_dict()
    out_path = Path(a.out) if a.out else default_corrections_path(spec.name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "spec": spec.name,
        "device": a.device,
        "torch": torch.__version__,
        "rows": rows,
        "corrections": corr,
        "spec_figures": {"peak_flops": spec.peak_flops, "hbm_bw": spec.hbm_bw},
    }
    out_path.write_text(json.dumps(doc, indent=1))
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(
        f"calibrate on torch {a.device} against spec {spec.name} "
        f"(fp32 {spec.flops('float32') / 1e9:.0f} GFLOP/s, {spec.hbm_bw / 1e9:.0f} GB/s); median of {reps}"
    )
    print(f"{'op':<36}{'class':<12}{'pred ms':>10}{'meas ms':>10}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['op']:<36}{r['class']:<12}{r['predicted_ms']:>10.3f}{r['measured_ms']:>10.3f}{r['ratio']:>8.2f}"
        )
    print("corrections: " + ", ".join(f"{k} x{v:.2f}" for k, v in corr["factors"].items()))
    print(f"saved to {out_path}")
    return 0
