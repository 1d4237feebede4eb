"""One rank of `flexnpu bench collective` (started by bench/collective.py under `flexnpu run`).

all_reduce (sum, float32) of each size on the hccl group (npu tensors, daemon collectives) and on
a gloo group over the same processes (cpu tensors), alternating per size. Two timings:

* isolated: a barrier, then one operation that is complete on return: gloo's all_reduce blocks,
  and the hccl one is followed by a stream synchronisation, so the hccl figure includes the round
  trip to the daemon (a latency, not a pipelined throughput). Medians over the repetitions.
* back to back (small sizes): as nccl-tests time it, a block of operations issued one after the
  other and completed once (hccl: one stream synchronisation at the end; gloo: each call blocks
  anyway), time per operation; alternating hccl and gloo blocks, median of the blocks.

Rank 0 writes the rows to OUT as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import os

import torch
import torch.distributed as dist

NATIVE = os.environ.get("FLEXNPU_BENCH_NATIVE") == "1"
B2B_MAX_BYTES = 1 << 20  # back-to-back latency for these sizes
B2B_BLOCKS = 5
WARMUP = 50
if NATIVE:
    import torch_npu  # noqa: F401 - the real one (flexnpu run --interpose native)


def main() -> int:
    out, sizes, iters_small = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
    dist.init_process_group("hccl")
    me, n = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    dev = torch.device("npu", me % torch.npu.device_count())
    # warm both paths up once (communicators, shared segments, first-call costs) before any size
    w_npu = torch.zeros(1024).to(dev) if NATIVE else torch.zeros(1024, device=dev)
    for _ in range(WARMUP):
        dist.all_reduce(w_npu)
        dist.all_reduce(torch.zeros(1024), group=gloo)
    torch.npu.synchronize(dev)
    rows = []
    for nbytes in sizes:
        numel = nbytes // 4
        iters = max(3, min(iters_small, (64 << 20) // nbytes * 2))
        # the native front end runs no operators yet: the npu tensor is made by a copy
        x_npu = torch.ones(numel).to(dev) if NATIVE else torch.ones(numel, device=dev)
        x_cpu = torch.ones(numel)
        times: dict[str, list[float]] = {"hccl": [], "gloo": []}
        for rep in range(iters + 1):
            for name in ("hccl", "gloo"):
                dist.barrier(group=gloo)
                t0 = time.perf_counter()
                if name == "hccl":
                    dist.all_reduce(x_npu)
                    torch.npu.synchronize(dev)
                else:
                    dist.all_reduce(x_cpu, group=gloo)
                dt = time.perf_counter() - t0
                if rep:  # the first round warms up (communicator, buffers)
                    times[name].append(dt)
        # every element is n ** (iters + 1) after the repeated sums: check a value
        expect = float(n) ** (iters + 1)
        ok = abs(x_npu[:1].cpu().item() - expect) <= 1e-3 * expect
        row = {"bytes": nbytes, "iters": iters, "correct": ok}
        if nbytes <= B2B_MAX_BYTES:
            # zeros: the sums stay representable however many operations run
            z_npu = torch.zeros(numel).to(dev) if NATIVE else torch.zeros(numel, device=dev)
            z_cpu = torch.zeros(numel)
            blocks: dict[str, list[float]] = {"hccl": [], "gloo": []}
            for blk in range(B2B_BLOCKS + 1):
                for name in ("hccl", "gloo"):
                    dist.barrier(group=gloo)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        if name == "hccl":
                            dist.all_reduce(z_npu)
                        else:
                            dist.all_reduce(z_cpu, group=gloo)
                    if name == "hccl":
                        torch.npu.synchronize(dev)
                    if blk:  # the first block warms up
                        blocks[name].append((time.perf_counter() - t0) / iters)
            for name, ts in blocks.items():
                row[f"{name}_b2b_us"] = round(statistics.median(ts) * 1e6, 1)
            row["correct"] = ok and not z_npu.cpu().any().item()
            del z_npu, z_cpu
        for name, ts in times.items():
            t = statistics.median(ts)
            algbw = nbytes / t
            row[f"{name}_us"] = round(t * 1e6, 1)
            row[f"{name}_busbw_GBps"] = round(algbw * 2 * (n - 1) / n / 1e9, 4)
        row["busbw_ratio"] = round(row["hccl_busbw_GBps"] / row["gloo_busbw_GBps"], 3)
        rows.append(row)
        del x_npu, x_cpu
        if me == 0:
            b2b = (
                f"   back to back: hccl {row['hccl_b2b_us']:.1f} us  gloo {row['gloo_b2b_us']:.1f} us"
                if "hccl_b2b_us" in row
                else ""
            )
            print(
                f"[collective] {nbytes:>10} B  hccl {row['hccl_us']:>10.1f} us  gloo {row['gloo_us']:>10.1f} us{b2b}",
                file=sys.stderr,
                flush=True,
            )
    dist.barrier(group=gloo)
    dist.destroy_process_group()
    if me == 0:
        with open(out, "w") as f:
            json.dump({"ranks": n, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
