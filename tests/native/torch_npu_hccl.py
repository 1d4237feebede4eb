"""Ranks of a torch.distributed "hccl" program on the REAL torch_npu (run under `flexnpu run
--interpose native`): `launch N DEVS CHECKS` spawns N rank processes (DEVS: the npu index of
each rank, comma separated); each runs the named checks against expected values and prints
"rank R OK". Tensors on npu are made by copies only (the native front end runs no operators yet).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, devs: str, checks: str) -> int:
    port = _port()
    procs = [
        subprocess.Popen([sys.executable, __file__, "rank", str(r), str(n), devs, checks, str(port)])
        for r in range(n)
    ]
    rcs = [p.wait(timeout=600) for p in procs]
    print("rcs", rcs, flush=True)
    return 0 if all(rc == 0 for rc in rcs) else 1


def rank(r: int, n: int, devs: str, checks: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch_npu  # noqa: F401 - the real one: registers "npu" and the hccl backend

    dev = int(devs.split(",")[r])
    torch.npu.set_device(dev)
    dist.init_process_group("hccl", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=n)
    npu = torch.device("npu", dev)

    def on(x: torch.Tensor) -> torch.Tensor:
        return x.to(npu)

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        got = got.cpu()
        if not torch.equal(got, want):
            raise AssertionError(f"rank {r}: {name}: got {got.tolist()} want {want.tolist()}")

    base = [torch.arange(6, dtype=torch.float32) * (q + 1) - q for q in range(n)]
    for c in checks.split(","):
        if c == "all_reduce":
            for op, fold in (
                (dist.ReduceOp.SUM, lambda xs: sum(xs)),
                (dist.ReduceOp.MAX, lambda xs: torch.stack(xs).amax(0)),
                (dist.ReduceOp.MIN, lambda xs: torch.stack(xs).amin(0)),
                (dist.ReduceOp.PRODUCT, lambda xs: torch.stack(xs).prod(0)),
            ):
                for dt in (
                    torch.float32,
                    torch.int32,
                    torch.int64,
                    torch.bfloat16,
                    torch.float16,
                    torch.int8,
                ):
                    xs = [b.to(dt) for b in base]
                    t = on(xs[r])
                    dist.all_reduce(t, op=op)
                    check(f"all_reduce {op} {dt}", t, fold(xs).to(dt))
        elif c == "avg":  # HCCL has no avg: torch_npu sums, then divides with an operator
            t = on(base[r])
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            check("all_reduce avg", t, sum(base) / n)
        elif c == "all_gather":
            t = on(base[r])
            big = on(torch.zeros(6 * n))
            dist.all_gather_into_tensor(big, t)
            check("all_gather_into_tensor", big, torch.cat(base))
        elif c == "all_gather_list":  # torch_npu copies the flat result into the list (an operator)
            t = on(base[r])
            outs = [on(torch.zeros(6)) for _ in range(n)]
            dist.all_gather(outs, t)
            for q in range(n):
                check("all_gather", outs[q], base[q])
        elif c == "reduce_scatter":
            full = [torch.arange(4 * n, dtype=torch.int64) * (q + 1) for q in range(n)]
            out = on(torch.zeros(4, dtype=torch.int64))
            dist.reduce_scatter_tensor(out, on(full[r]))
            check("reduce_scatter_tensor", out, sum(full)[4 * r : 4 * r + 4])
        elif c == "reduce":  # in place; only the destination's tensor changes (HcclReduce)
            for dst in range(n):
                t = on(base[r].to(torch.int64))
                dist.reduce(t, dst=dst, op=dist.ReduceOp.MAX)
                want = torch.stack(base).amax(0).to(torch.int64) if r == dst else base[r].to(torch.int64)
                check(f"reduce to {dst}", t, want)
        elif c == "broadcast":
            for root in range(n):
                t = on(base[r].clone())
                dist.broadcast(t, src=root)
                check(f"broadcast from {root}", t, base[root])
        elif c == "scatter":  # HcclScatter
            for root in range(n):
                t = on(torch.zeros(6))
                blocks = [on(base[q] + 100 * root) for q in range(n)] if r == root else None
                dist.scatter(t, blocks, src=root)
                check(f"scatter from {root}", t, base[r] + 100 * root)
        elif c == "send_recv":
            if r == 0:
                for q in range(1, n):
                    dist.send(on(base[q] * 10), dst=q)
                for q in range(1, n):
                    t = on(torch.zeros(6))
                    dist.recv(t, src=q)
                    check(f"recv from {q}", t, base[q] + 1)
            else:
                t = on(torch.zeros(6))
                dist.recv(t, src=0)
                check("recv from 0", t, base[r] * 10)
                dist.send(on(base[r] + 1), dst=0)
        elif c == "batch_p2p":  # every rank sends to and receives from every other, in one batch
            ops, bufs = [], {}
            for q in range(n):
                if q != r:
                    bufs[q] = on(torch.zeros(6))
                    ops.append(dist.P2POp(dist.isend, on(base[r] + 100 * q), q))
                    ops.append(dist.P2POp(dist.irecv, bufs[q], q))
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            for q, b in bufs.items():
                check(f"batch recv from {q}", b, base[q] + 100 * r)
        elif c == "all_to_all":
            inp = torch.arange(2 * n, dtype=torch.int32) + 100 * r
            out = on(torch.zeros(2 * n, dtype=torch.int32))
            dist.all_to_all_single(out, on(inp))
            want = torch.cat([torch.arange(2 * r, 2 * r + 2, dtype=torch.int32) + 100 * q for q in range(n)])
            check("all_to_all_single", out, want)
        elif c == "all_to_all_v":
            # rank r sends q+1 elements to rank q
            ins = [q + 1 for q in range(n)]
            outs = [r + 1] * n
            inp = torch.cat([torch.full((q + 1,), 10 * r + q, dtype=torch.int32) for q in range(n)])
            out = on(torch.zeros(sum(outs), dtype=torch.int32))
            dist.all_to_all_single(out, on(inp), output_split_sizes=outs, input_split_sizes=ins)
            want = torch.cat([torch.full((r + 1,), 10 * q + r, dtype=torch.int32) for q in range(n)])
            check("all_to_all_single uneven", out, want)
        elif c == "barrier":
            t0 = time.time()
            if r == 0:
                time.sleep(1.0)
            dist.barrier()
            if r != 0 and time.time() - t0 < 0.9:
                raise AssertionError(f"rank {r}: barrier returned before rank 0 reached it")
        elif c == "die":
            t = on(base[r])
            dist.all_reduce(t)
            torch.npu.synchronize()
            if r == n - 1:
                print(f"rank {r} exiting", flush=True)
                os._exit(3)
            t0 = time.time()
            try:
                dist.all_reduce(t)
                t.cpu()
                torch.npu.synchronize()
            except Exception as e:  # noqa: BLE001 - what torch_npu raises for the failed stream
                print(
                    f"rank {r} failed after {time.time() - t0:.1f}s: {str(e).splitlines()[0][:200]}",
                    flush=True,
                )
                os._exit(0)
            raise AssertionError(f"rank {r}: a collective with a dead rank succeeded")
        else:
            raise SystemExit(f"unknown check {c}")
        print(f"rank {r} {c} ok", flush=True)
    dist.destroy_process_group()
    print(f"rank {r} OK", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        sys.exit(launch(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
