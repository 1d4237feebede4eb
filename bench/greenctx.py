"""Green-context probe (GPU only): what the emulator's partition model assumes, measured.

`python3 -m flexnpu.bench.greenctx [--json]` on a CUDA device with green contexts (driver >= 12.8):
1. a compute-bound GEMM and a bandwidth-bound copy on green contexts of 1/8 .. 7/8 of the SMs
   and on the whole device: time vs share. The emulator's model (flexnpu/sched/emu.py) says
   GEMM time ~ 1/share and copy bandwidth ~ min(1, share / issue_frac) of the whole device's;
2. the two contexts a static split uses (alpha and 1 - alpha) running a GEMM each at once:
   whether torch's GreenContext.create(num_sms) gives disjoint SM sets (sum of the two rates
   ~ 1) or overlapping ones (the GEMMs slow each other down);
3. the cost of a partition change: moving a stream's next kernel to another green context's
   stream (event record + wait), per change.
Prints what it measured; nothing is asserted (hardware figures for docs/scheduling.md).
"""

from __future__ import annotations

import json
import sys
import time


def _time(fn, stream, reps=5) -> float:
    import torch

    with torch.cuda.stream(stream):
        fn()
    stream.synchronize()
    t = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(reps):
            fn()
    stream.synchronize()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch

    if not torch.cuda.is_available():
        print("bench.greenctx: no CUDA device", file=sys.stderr)
        return 2
    from torch.cuda import green_contexts as gc

    if not gc.SUPPORTED:
        print("bench.greenctx: this torch build has no green contexts", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    gemm = lambda: torch.mm(a, b)  # noqa: E731
    copy = lambda: dst.copy_(src)  # noqa: E731
    full = torch.cuda.Stream()
    base = {"gemm_s": _time(gemm, full), "copy_s": _time(copy, full)}
    levels = {}
    ctxs = {}
    for lvl in range(1, 8):
        n = max(1, round(sms * lvl / 8))
        ctx = gc.GreenContext.create(num_sms=n, device_id=0)
        ctxs[lvl] = (ctx, ctx.Stream())
        s = ctxs[lvl][1]
        g, c = _time(gemm, s), _time(copy, s)
        levels[lvl / 8] = {"sms": n, "gemm_rate": base["gemm_s"] / g, "copy_bw_frac": base["copy_s"] / c}
    pairs = {}
    for lvl in (2, 4, 6):
        s1, s2 = ctxs[lvl][1], ctxs[8 - lvl][1]
        solo1, solo2 = _time(gemm, s1), _time(gemm, s2)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            with torch.cuda.stream(s1):
                gemm()
            with torch.cuda.stream(s2):
                gemm()
        torch.cuda.synchronize()
        together = (time.perf_counter() - t) / 5
        # disjoint SM sets: together ~ max(solo1, solo2); overlapping: closer to solo1 + solo2
        pairs[f"{lvl}/8+{8 - lvl}/8"] = {
            "solo_s": [solo1, solo2],
            "together_s": together,
            "disjoint": together < 1.15 * max(solo1, solo2),
        }
    small = torch.empty(1024, device="cuda")
    s1, s2 = ctxs[2][1], ctxs[6][1]
    n = 200
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        with torch.cuda.stream(s1):
            small.add_(1)
    s1.synchronize()
    same = (time.perf_counter() - t) / n
    t = time.perf_counter()
    cur = s1
    for i in range(n):
        nxt = s2 if cur is s1 else s1
        ev = torch.cuda.Event()
        ev.record(cur)
        nxt.wait_event(ev)
        with torch.cuda.stream(nxt):
            small.add_(1)
        cur = nxt
    torch.cuda.synchronize()
    switching = (time.perf_counter() - t) / n
    out = {
        "device": torch.cuda.get_device_name(0),
        "sms": sms,
        "whole_device": base,
        "levels": levels,
        "pairs": pairs,
        "repartition_s": max(0.0, switching - same),
        "tiny_kernel_s": same,
    }
    if "--json" in argv:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
