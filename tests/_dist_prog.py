"""A multi-process torch.distributed program for the hccl tests, run under `flexnpu run`.

    flexnpu run --device 0,1 -- python _dist_prog.py launch NPROC MODE OUTDIR

`launch` starts NPROC ranks (this file again, with RANK/WORLD_SIZE/MASTER_* set); each writes
OUTDIR/rank<R>.json. Modes:
  check  every collective and dtype on hccl against gloo on the same inputs, in four layouts
         (all ranks on one virtual device / spread over two; world and a two-rank sub-group),
         a 2-way tensor-parallel MLP + attention block against the single-process result, and
         mismatched shapes refused on a sub-group.
  kill   ranks loop on all_reduce; the launcher SIGKILLs the last rank; the others record when
         and what they raised.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback

DTYPES = ("float32", "float64", "bfloat16", "float16", "int32", "int64", "int8", "uint8")
INT_OPS = ("sum", "prod", "min", "max", "band", "bor", "bxor")
FLOAT_OPS = ("sum", "avg", "prod", "min", "max")


def launch(nproc: int, mode: str, outdir: str) -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    for r in range(nproc):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(r),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen([sys.executable, __file__, "rank", mode, outdir], env=env))
    if mode == "kill":
        # Once every rank is looping on all_reduce, SIGKILL the last one (it shares a daemon with
        # rank 0; rank 1 is on the other device) and note when.
        deadline = time.time() + 300
        while not all(os.path.exists(os.path.join(outdir, f"ready{r}")) for r in range(nproc)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        time.sleep(0.5)
        victim = procs[-1]
        victim.kill()
        with open(os.path.join(outdir, "killed.json"), "w") as f:
            json.dump({"rank": nproc - 1, "at": time.time()}, f)
        victim.wait()
        return max(abs(p.wait(120)) for p in procs[:-1])
    return max(abs(p.wait()) for p in procs)


# ------------------------------------------------------------------------------------------ check
def _inputs(dtype, n: int, rank: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * 131 + rank)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 4, (n,), generator=g, dtype=dtype)
    return torch.randint(-3, 4, (n,), generator=g, dtype=dtype)


def _same(a, b, dtype, what: str, fails: list, tol: float = 0.0) -> None:
    import torch

    a, b = a.cpu(), b.cpu()
    if dtype.is_floating_point:
        ok = a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol or 2e-2, atol=tol or 2e-2)
    else:
        ok = a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # byte-exact
    if not ok:
        fails.append(f"{what}: hccl {a.flatten()[:6].tolist()} != gloo {b.flatten()[:6].tolist()}")


def check_layout(hccl, gloo, dev, tag: str, fails: list, counts: dict) -> None:
    import torch
    import torch.distributed as dist

    R = dist.ReduceOp
    ops = {
        "sum": R.SUM,
        "avg": R.AVG,
        "prod": R.PRODUCT,
        "min": R.MIN,
        "max": R.MAX,
        "band": R.BAND,
        "bor": R.BOR,
        "bxor": R.BXOR,
    }
    n = dist.get_world_size(hccl)
    me = dist.get_rank(hccl)
    m = 1000 + 37
    for di, dname in enumerate(DTYPES):
        dtype = getattr(torch, dname)
        for oi, oname in enumerate(FLOAT_OPS if dtype.is_floating_point else INT_OPS):
            x = _inputs(dtype, m, me, di * 10 + oi)
            if oname == "prod" and dtype.is_floating_point:
                x = 1 + x.float().abs().clamp(max=1).to(dtype) / 4
            ref = x.clone()
            if oname == "avg":  # gloo has no avg: its sum / n
                dist.all_reduce(ref, op=R.SUM, group=gloo)
                ref = (ref.double() / n).to(dtype)
            else:
                dist.all_reduce(ref, op=ops[oname], group=gloo)
            y = x.to(dev)
            w = dist.all_reduce(y, op=ops[oname], group=hccl, async_op=True)
            w.wait()
            _same(y, ref, dtype, f"{tag} all_reduce {oname} {dname}", fails)
            counts["all_reduce"] = counts.get("all_reduce", 0) + 1
        x = _inputs(dtype, m, me, di + 100)
        # broadcast from the last rank
        ref = x.clone()
        dist.broadcast(ref, src=dist.get_global_rank(hccl, n - 1), group=gloo)
        y = x.to(dev)
        dist.broadcast(y, src=dist.get_global_rank(hccl, n - 1), group=hccl)
        _same(y, ref, dtype, f"{tag} broadcast {dname}", fails)
        # all_gather_into_tensor and the list form
        ref = torch.empty(n * m, dtype=dtype)
        dist.all_gather_into_tensor(ref, x, group=gloo)
        y = torch.empty(n * m, dtype=dtype, device=dev)
        dist.all_gather_into_tensor(y, x.to(dev), group=hccl)
        _same(y, ref, dtype, f"{tag} all_gather_into_tensor {dname}", fails)
        outs = [torch.empty(m, dtype=dtype, device=dev) for _ in range(n)]
        dist.all_gather(outs, x.to(dev), group=hccl)
        _same(torch.cat([o.cpu() for o in outs]), ref, dtype, f"{tag} all_gather {dname}", fails)
        # reduce_scatter_tensor and the list form (sum; max too for a non-sum reduction)
        big = _inputs(dtype, n * m, me, di + 200)
        for oname in ("sum", "max"):
            ref = torch.empty(m, dtype=dtype)
            dist.reduce_scatter_tensor(ref, big, op=ops[oname], group=gloo)
            y = torch.empty(m, dtype=dtype, device=dev)
            dist.reduce_scatter_tensor(y, big.to(dev), op=ops[oname], group=hccl)
            _same(y, ref, dtype, f"{tag} reduce_scatter_tensor {oname} {dname}", fails)
        y = torch.empty(m, dtype=dtype, device=dev)
        dist.reduce_scatter(y, [c.to(dev) for c in big.chunk(n)], group=hccl)
        ref = torch.empty(m, dtype=dtype)
        dist.reduce_scatter_tensor(ref, big, group=gloo)
        _same(y, ref, dtype, f"{tag} reduce_scatter {dname}", fails)
        # all_to_all_single, even and uneven splits, and the list form
        ref = torch.empty(n * m, dtype=dtype)
        dist.all_to_all_single(ref, big, group=gloo)
        y = torch.empty(n * m, dtype=dtype, device=dev)
        dist.all_to_all_single(y, big.to(dev), group=hccl)
        _same(y, ref, dtype, f"{tag} all_to_all_single {dname}", fails)
        ins = [(me + j) % 3 + 1 for j in range(n)]  # rank me sends ins[j] rows to j
        outs_n = [(j + me) % 3 + 1 for j in range(n)]  # ... and receives from j
        src = _inputs(dtype, sum(ins) * 2, me, di + 300).view(-1, 2)
        ref = torch.empty(sum(outs_n), 2, dtype=dtype)
        dist.all_to_all_single(ref, src, outs_n, ins, group=gloo)
        y = torch.empty(sum(outs_n), 2, dtype=dtype, device=dev)
        dist.all_to_all_single(y, src.to(dev), outs_n, ins, group=hccl)
        _same(y, ref, dtype, f"{tag} all_to_all_single uneven {dname}", fails)
        chunks = list(big.chunk(n))
        got = [torch.empty(m, dtype=dtype, device=dev) for _ in range(n)]
        dist.all_to_all(got, [c.to(dev) for c in chunks], group=hccl)
        exp = [torch.empty(m, dtype=dtype) for _ in range(n)]
        dist.all_to_all(exp, chunks, group=gloo)
        _same(torch.cat([g.cpu() for g in got]), torch.cat(exp), dtype, f"{tag} all_to_all {dname}", fails)
        # send/recv around the ring
        nxt, prv = (me + 1) % n, (me - 1) % n
        gn, gp = dist.get_global_rank(hccl, nxt), dist.get_global_rank(hccl, prv)
        y = torch.empty(m, dtype=dtype, device=dev)
        if me % 2 == 0:
            dist.send(x.to(dev), gn, group=hccl)
            dist.recv(y, gp, group=hccl)
        else:
            dist.recv(y, gp, group=hccl)
            dist.send(x.to(dev), gn, group=hccl)
        ref = torch.empty(m, dtype=dtype)
        if me % 2 == 0:
            dist.send(x, gn, group=gloo)
            dist.recv(ref, gp, group=gloo)
        else:
            dist.recv(ref, gp, group=gloo)
            dist.send(x, gn, group=gloo)
        _same(y, ref, dtype, f"{tag} send/recv {dname}", fails)
        for k in ("broadcast", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
            counts[k] = counts.get(k, 0) + 1
    dist.barrier(group=hccl)


def tensor_parallel(group, dev, fails: list) -> None:
    """2-way Megatron-style block: attention (heads split, column-parallel QKV, row-parallel
    output) then MLP (column-parallel up, row-parallel down), one all-reduce after each."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    tp, me = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(0)
    B, S, H, NH = 2, 8, 64, 4
    x = torch.randn(B, S, H)
    wq, wk, wv, wo = (torch.randn(H, H) / H**0.5 for _ in range(4))
    w1, w2 = torch.randn(H, 4 * H) / H**0.5, torch.randn(4 * H, H) / (4 * H) ** 0.5
    hd = H // NH

    def attn(x, wq, wk, wv, wo, nh):
        q, k, v = (x @ w for w in (wq, wk, wv))
        q, k, v = (t.view(B, S, nh, hd).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, S, nh * hd) @ wo

    def mlp(x, w1, w2):
        return F.gelu(x @ w1) @ w2

    ref = x + attn(x, wq, wk, wv, wo, NH)
    ref = ref + mlp(ref, w1, w2)
    cols = slice(me * H // tp, (me + 1) * H // tp)
    hcols = slice(me * 4 * H // tp, (me + 1) * 4 * H // tp)
    xd = x.to(dev)
    a = attn(xd, wq[:, cols].to(dev), wk[:, cols].to(dev), wv[:, cols].to(dev), wo[cols, :].to(dev), NH // tp)
    dist.all_reduce(a, group=group)
    h = xd + a
    o = mlp(h, w1[:, hcols].to(dev), w2[hcols, :].to(dev))
    dist.all_reduce(o, group=group)
    out = (h + o).cpu()
    if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
        fails.append(f"tensor parallel block differs: max |diff| {(out - ref).abs().max().item():.3g}")


def rank_check(outdir: str) -> dict:
    import torch
    import torch.distributed as dist

    from flexnpu.errors import CollectiveError

    dist.init_process_group("hccl")
    me, n = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "hccl"
    # A group keeps one device per rank (as with NCCL/HCCL): one group per layout.
    gloo = dist.new_group(backend="gloo")
    world_one, world_spread = dist.new_group(), dist.new_group()  # hccl, the default backend
    pair_one, pair_spread = dist.new_group([0, 1]), dist.new_group([0, 1])
    pair_gloo = dist.new_group([0, 1], backend="gloo")
    bad = dist.new_group([0, 1])
    fails: list[str] = []
    counts: dict = {}
    ndev = torch.npu.device_count()
    spread = torch.device("npu", me % ndev)
    layouts = [
        (f"{n} ranks on npu:0", world_one, gloo, torch.device("npu", 0)),
        (f"{n} ranks on {ndev} devices", world_spread, gloo, spread),
    ]
    if me < 2:
        layouts += [
            ("2 ranks on npu:0", pair_one, pair_gloo, torch.device("npu", 0)),
            (f"2 ranks on {min(2, ndev)} devices", pair_spread, pair_gloo, spread),
        ]
    t0 = time.perf_counter()
    for tag, hg, gg, dev in layouts:
        check_layout(hg, gg, dev, tag, fails, counts)
    t1 = time.perf_counter()
    tp_ok = None
    if me < 2:
        tensor_parallel(pair_spread, spread, fails)
        tp_ok = not any(f.startswith("tensor parallel") for f in fails)
        # mismatched shapes on a communicator of their own: refused with a clear error
        t = torch.ones(10 + me, device=spread)
        mismatch = None
        try:
            dist.all_reduce(t, group=bad)
            t.cpu()
        except CollectiveError as e:
            mismatch = str(e)
    else:
        mismatch = "not in group"
    dist.barrier(group=gloo)
    dist.destroy_process_group()
    return {
        "rank": me,
        "fails": fails,
        "counts": counts,
        "tp_ok": tp_ok,
        "mismatch": mismatch,
        "seconds": round(t1 - t0, 2),
    }


def rank_kill(outdir: str) -> dict:
    import torch
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo,npu:hccl")  # the device-backend form
    me, n = dist.get_rank(), dist.get_world_size()
    c = torch.full((4,), float(me))
    dist.all_reduce(c)  # cpu tensors: gloo
    cpu_ok = c.tolist() == [float(sum(range(n)))] * 4
    dev = torch.device("npu", me % torch.npu.device_count())
    x = torch.ones(1 << 20, device=dev)
    dist.all_reduce(x)
    npu_ok = x[:2].cpu().tolist() == [float(n)] * 2
    open(os.path.join(outdir, f"ready{me}"), "w").close()
    i = 0
    try:
        while True:
            dist.all_reduce(x)
            x.cpu()
            i += 1
    except Exception as e:  # noqa: BLE001 - what we wait for
        return {
            "rank": me,
            "raised_at": time.time(),
            "error": f"{type(e).__name__}: {e}",
            "iterations": i,
            "cpu_ok": cpu_ok,
            "npu_ok": npu_ok,
            "backend": str(dist.get_backend()),
        }


def main() -> int:
    if sys.argv[1] == "launch":
        return launch(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    mode, outdir = sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    try:
        res = rank_check(outdir) if mode == "check" else rank_kill(outdir)
    except Exception:  # noqa: BLE001
        res = {"rank": rank, "crash": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
