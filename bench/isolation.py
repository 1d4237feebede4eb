"""Figures for the daemon's per-client isolation (issue 9): what hostile or idle clients cost
a bystander, and whether the daemon's memory comes back when clients go.

    flexnpu bench isolation idle [--sessions 1000]     bystander p50 with idle clients
    flexnpu bench isolation waiters [--waiters 80000]  bystander p50 with pending syncs
    flexnpu bench isolation rss [--rounds 20]          idle daemon RSS over client rounds

Each starts its own cpu (or emu) daemon in a temporary runtime folder and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _start(rt: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, FLEXNPU_RUNTIME_DIR=str(rt))
    p = subprocess.Popen(
        [sys.executable, "-m", "flexnpu", "daemon", "--runtime-dir", str(rt), *args],
        env=env,
        stdout=open(rt / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    t0 = time.monotonic()
    while not (rt / "npu0.sock").exists():
        if p.poll() is not None or time.monotonic() - t0 > 60:
            raise SystemExit(f"daemon did not start: {(rt / 'daemon.log').read_text()}")
        time.sleep(0.05)
    return p


def _p50_ms(c, n: int = 1000) -> float:
    for _ in range(100):
        c.nop()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.nop()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 3)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def idle(n: int) -> dict:
    from flexnpu.client import Client

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as d:
        rt = Path(d)
        p = _start(rt, "--backend", "cpu", "--max-sessions-per-uid", str(n + 10))
        try:
            busy = Client(0, path=str(rt / "npu0.sock"))
            base = _p50_ms(busy)
            others = [Client(0, path=str(rt / "npu0.sock"), arena_bytes=1 << 20) for _ in range(n)]
            loaded = _p50_ms(busy)
            for c in others:
                c.close()
            busy.close()
        finally:
            p.terminate()
            p.wait(20)
    return {"figure": "bystander nop p50 ms", "idle_sessions": n, "alone": base, "with_idle": loaded}


def waiters(n: int) -> dict:
    """Attackers park EVENT_SYNCs on an event recorded behind long emulated kernels."""
    import torch

    from flexnpu import protocol as P
    from flexnpu.client import Client
    from flexnpu.protocol import TensorRef

    with tempfile.TemporaryDirectory() as d:
        rt = Path(d)
        p = _start(rt, "--backend", "emu:910b", "--device-memory", str(1 << 50))
        try:
            path = str(rt / "npu0.sock")
            busy = Client(0, path=path)
            base = _p50_ms(busy)
            per = 4096
            attackers = []
            accepted = 0
            evs = []
            for _ in range(max(1, n // per)):
                a = Client(0, path=path, sq_entries=8192, cq_entries=8192)
                k = 32768
                x = TensorRef(a.malloc(k * k * 2, sync=True), torch.bfloat16, (k, k), (k, 1), 0)
                for _ in range(100):  # ~20 s of emulated kernels ahead of the record
                    a.launch(
                        "aten::mm.default",
                        (x, x),
                        {},
                        [(k * k * 2, TensorRef(a.alloc_handle(), torch.bfloat16, (k, k), (k, 1), 0))],
                    )
                ev = a.create_event()
                a.record_event(ev, 0)
                attackers.append(a)
                evs.append(ev)
            kernels_only = _p50_ms(busy, 300)  # the same device load, no waiters yet
            for a, ev in zip(attackers, evs):
                for i in range(per):
                    rec = P.pack_sqe(P.Op.EVENT_SYNC, ev, user_data=i + 10, flags=P.FLAG_SYNC)
                    if not a.seg.sq.push(rec):
                        a.seg.sq.push_wait(rec, 10)
            loaded = _p50_ms(busy, 300)
            for a in attackers:
                while (r := a.seg.cq.pop()) is not None:
                    accepted += P.CQE.unpack(r)[1] != 0
            for a in attackers:
                a.close()
            busy.close()
        finally:
            p.terminate()
            p.wait(20)
    return {
        "figure": "bystander nop p50 ms",
        "waiters_sent": n,
        "alone": base,
        "with_attackers_kernels_only": kernels_only,
        "with_waiters": loaded,
        "refused_so_far": accepted,
    }


def rss(rounds: int, clients: int, mb: int) -> dict:
    """Rounds of clients that allocate, fill, compute and leave; the daemon's RSS when idle."""
    import numpy as np
    import torch

    from flexnpu.client import Client
    from flexnpu.protocol import TensorRef

    out = []
    with tempfile.TemporaryDirectory() as d:
        rt = Path(d)
        p = _start(rt, "--backend", "cpu")
        try:
            path = str(rt / "npu0.sock")
            time.sleep(1)
            out.append(_rss_mb(p.pid))
            rng = np.random.default_rng(0)
            for r in range(rounds):
                cs = [Client(0, path=path) for _ in range(clients)]
                for i, c in enumerate(cs):
                    sizes = rng.integers(1 << 10, mb << 20, 24)
                    hs = [c.malloc(int(s)) for s in sizes]
                    for h, s in zip(hs, sizes):
                        c.memset(h, 0, 7, int(s))
                    n = 256 + 64 * (r % 8)
                    a = TensorRef(c.malloc(n * n * 4), torch.float32, (n, n), (n, 1), 0)
                    c.memset(a.handle, 0, 0, n * n * 4)
                    for _ in range(4):
                        c.launch(
                            "aten::mm.default",
                            (a, a),
                            {},
                            [(n * n * 4, TensorRef(c.alloc_handle(), torch.float32, (n, n), (n, 1), 0))],
                        )
                    for h in hs[::2]:
                        c.free(h)
                    c.synchronize()
                for c in cs:
                    c.close()
                time.sleep(1.0)
                out.append(_rss_mb(p.pid))
            from flexnpu.control import query

            st = query(str(rt / "npu0.sock"), {"op": "status"})["daemon"]
        finally:
            p.terminate()
            p.wait(20)
    return {
        "figure": "idle daemon RSS MB after each round",
        "rounds": rounds,
        "clients": clients,
        "rss_mb": out,
        "status_rss_mb": round(st.get("rss_bytes", 0) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexnpu.bench.isolation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("idle")
    a.add_argument("--sessions", type=int, default=1000)
    w = sub.add_parser("waiters")
    w.add_argument("--waiters", type=int, default=80000)
    r = sub.add_parser("rss")
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--clients", type=int, default=4)
    r.add_argument("--mb", type=int, default=16, help="largest allocation, MiB")
    args = ap.parse_args(argv)
    if args.cmd == "idle":
        res = idle(args.sessions)
    elif args.cmd == "waiters":
        res = waiters(args.waiters)
    else:
        res = rss(args.rounds, args.clients, args.mb)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
