"""Cost of scrubbing device memory when it changes owner: zero on allocate vs zero on free.

The daemon must never hand a client memory holding another client's data. Either it zeroes a
block when it hands it out (allocate) or when it takes it back (free). Both write every byte
once; this measures, per block size on the backend's device, what each adds to the operation
it rides on:

- allocate: ``torch.zeros(n)`` vs ``torch.empty(n)`` (what malloc / a launch output costs);
- free: ``buf.zero_()`` before the block is released vs releasing it as is.

The daemon zeroes on allocate (docs/security.md says why).
"""

from __future__ import annotations

import argparse
import time

from ._common import dump_json, median, print_table


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t)
    return median(ts) / 1e3


def measure(device: str, sizes: list[int], reps: int) -> list[dict]:
    import torch

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rows = []
    for n in sizes:

        def alloc_plain():
            torch.empty(n, dtype=torch.uint8, device=dev)
            sync()

        def alloc_zero():
            torch.zeros(n, dtype=torch.uint8, device=dev)
            sync()

        def free_plain():
            b = torch.empty(n, dtype=torch.uint8, device=dev)
            del b
            sync()

        def free_zero():
            b = torch.empty(n, dtype=torch.uint8, device=dev)
            b.zero_()
            del b
            sync()

        a0, a1 = _time(alloc_plain, reps), _time(alloc_zero, reps)
        f0, f1 = _time(free_plain, reps), _time(free_zero, reps)
        rows.append(
            {
                "bytes": n,
                "alloc_us": round(a0, 2),
                "alloc_zeroed_us": round(a1, 2),
                "free_us": round(f0, 2),
                "free_zeroed_us": round(f1, 2),
                "zero_on_alloc_adds_us": round(a1 - a0, 2),
                "zero_on_free_adds_us": round(f1 - f0, 2),
                "zero_GBps": round(n / max(a1 - a0, 1e-3) / 1e3, 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexnpu bench scrub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", help="torch device to measure (cpu, cuda)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (< 10 s)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20] + ([] if args.quick else [256 << 20])
    rows = measure(args.device, sizes, 5 if args.quick else 30)
    if args.json:
        dump_json({"device": args.device, "rows": rows})
    else:
        print_table(
            rows,
            [
                ("bytes", "bytes", "d"),
                ("alloc_us", "alloc us", ".1f"),
                ("alloc_zeroed_us", "alloc+zero us", ".1f"),
                ("free_us", "free us", ".1f"),
                ("free_zeroed_us", "zero+free us", ".1f"),
                ("zero_GBps", "zero GB/s", ".1f"),
            ],
            title=f"scrub cost on {args.device} (median of repetitions)",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
