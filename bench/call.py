"""Client -> daemon -> client call costs: sync no-op, async launch, daemon launch throughput.

Side by side in one run, against a Unix-socket request/reply peer doing the same no-op.
Targets (issue 3): sync call median <= 5 us and >= 5x faster than the socket peer; async launch
<= 2 us client-side; >= 200k no-op launches/s through the daemon; 4 clients together >= 0.8x of
one client's throughput.
Front `native` (issue 11; needs cc): a C program calling FlexNPU's libascendcl.so measures
native-sync-call (aclrtSynchronizeStream on an idle stream) and native-async-copy (client cost
of a 256-byte aclrtMemcpyAsync from pageable memory; -pinned: from aclrtMallocHost memory).
Targets: native sync within 1.5x of the Python client's sync call and <= 5 us; async <= 1 us p50.
torch-subclass-op (issue 13): a mul on a wrapper tensor subclass whose __torch_dispatch__ only
makes its output (torch's own cost for a device implemented in Python: the floor under any
Python front end's per-operator cost, FlexNPU's included).
npu-dispatch-op (issue 13): the same mul on FlexNPU's npu device (a real daemon; cached shape,
so the C dispatch path, flexnpu/hook/fastdispatch.c), the client's cost per operator; and
npu-dispatch-op-python, the same through the Python dispatch alone (FLEXNPU_FASTDISPATCH=0's
path), side by side. Ratio client_us_added_per_op: npu-dispatch-op minus torch-subclass-op.
planned-launch-1-client (issue 13): one client streams real operator launches (a 128-element
add with a fresh output, outputs freed in FREE_MANY batches, as the eager front end does) from
cached encodings; after the first two the daemon runs them from its launch plan, and it is the
slower side, so 1e6 / ops_per_s is the daemon's cost per planned launch, operator included.
planned-table-launch-1-client (issue 12): the same for the native front end's operators: an
`aclnn::Add` of 128 elements whose output moves among offsets of one allocation, as torch_npu's
caching allocator hands out views of its blocks (plans keyed without offsets, docs/native_ops.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from ._common import child_env, dump_json, median, pct, print_table, private_daemon, progress


def _sync_call(n: int) -> dict:
    from flexnpu.client import Client

    c = Client(0)
    for _ in range(min(2000, n)):
        c.nop()
    lat = []
    pc = time.perf_counter_ns
    for _ in range(n):
        t = pc()
        c.nop()
        lat.append(pc() - t)
    c.close()
    us = [x / 1000 for x in lat]
    return {"name": "sync-call", "p50_us": median(us), "p99_us": pct(us, 99), "ops_per_s": 1e6 / median(us)}


def _subclass_floor(n: int) -> dict:
    """p50 of one operator on a do-nothing __torch_dispatch__ wrapper subclass (no grad)."""
    import torch

    make = torch.Tensor._make_wrapper_subclass
    meta = torch.device("meta")

    class Floor(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
            return make(Floor, (1, 1, 128), strides=(128, 128, 1), dtype=torch.float32, device=meta)

    a = make(Floor, (1, 1, 128), strides=(128, 128, 1), dtype=torch.float32, device=meta)
    lat = []
    pc = time.perf_counter_ns
    with torch.no_grad():
        for _ in range(n):
            t = pc()
            a * a
            lat.append(pc() - t)
    us = [x / 1000 for x in lat]
    return {
        "name": "torch-subclass-op",
        "p50_us": median(us),
        "p99_us": pct(us, 99),
        "ops_per_s": 1e6 / median(us),
    }


def _npu_dispatch(n: int) -> list[dict]:
    """The client's cost of one cached-shape operator on the npu device: C path, Python path."""
    import torch

    from flexnpu.hook import install_torch_device
    from flexnpu.hook import tensor as T

    install_torch_device()
    c_dispatch = T.NPUTensor.__torch_dispatch__

    def python_dispatch(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return T.dispatch(func, args, kwargs or {})

    a = torch.ones(1, 1, 128, device="npu")
    rows = []
    pc = time.perf_counter_ns
    paths = [("npu-dispatch-op-python", classmethod(python_dispatch))]
    if T.FAST is not None:
        paths.insert(0, ("npu-dispatch-op", c_dispatch))
    try:
        for name, td in paths:
            T.NPUTensor.__torch_dispatch__ = td  # type: ignore[method-assign]
            lat = []
            with torch.no_grad():
                for i in range(n):
                    t = pc()
                    a * a
                    lat.append(pc() - t)
                    if i % 512 == 511:  # the daemon never falls behind far enough to push back
                        torch.npu.synchronize()  # type: ignore[attr-defined]
            torch.npu.synchronize()  # type: ignore[attr-defined]
            us = [x / 1000 for x in lat]
            rows.append(
                {"name": name, "p50_us": median(us), "p99_us": pct(us, 99), "ops_per_s": 1e6 / median(us)}
            )
    finally:
        T.NPUTensor.__torch_dispatch__ = c_dispatch  # type: ignore[method-assign]
    return rows


def _async_launch(n: int) -> list[dict]:
    import torch

    from flexnpu.client import Client
    from flexnpu.protocol import TensorRef

    c = Client(0)
    out = []
    pc = time.perf_counter_ns
    # the transport alone: one no-op record per call
    c.synchronize()
    lat = []
    for i in range(n):
        t = pc()
        c.nop(sync=False)
        lat.append(pc() - t)
        if i % 2048 == 2047:
            c.synchronize()
    c.synchronize()
    us = [x / 1000 for x in lat]
    out.append(
        {"name": "async-launch", "p50_us": median(us), "p99_us": pct(us, 99), "ops_per_s": 1e6 / median(us)}
    )
    # a real operator launch: encode arguments + stage payload + push
    a = c.malloc(64)
    ref = TensorRef(a, torch.float32, (16,), (1,), 0)
    lat = []
    for i in range(n // 4):
        t = pc()
        c.launch("aten::add_.Tensor", (ref, ref), {}, [])
        lat.append(pc() - t)
        if i % 1024 == 1023:
            c.synchronize()
    try:
        c.synchronize()
    except Exception:  # noqa: BLE001 - the daemon may lack the aten executor in a partial install
        pass
    us = [x / 1000 for x in lat]
    out.append(
        {
            "name": "async-launch-aten",
            "p50_us": median(us),
            "p99_us": pct(us, 99),
            "ops_per_s": 1e6 / median(us),
        }
    )
    c.close()
    return out


_ALL_CPUS = sorted(os.sched_getaffinity(0))

_WORKER = """
import sys, time
from flexnpu.client import Client
n = int(sys.argv[1])
c = Client(0)
c.nop()
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
t = time.perf_counter()
for i in range(n):
    c.nop(sync=False)
c.synchronize()
print(time.perf_counter() - t, flush=True)
"""


# The end of each operator-launch worker (which defines run(k)): warm up, say ready, wait for
# the go, then time n launches on the worker's own clock.
_TIMED_RUN = """
run(1000)
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
t = time.perf_counter()
run(n)
print(time.perf_counter() - t, flush=True)
"""

_PLANNED_WORKER = (
    """
import sys, time, torch
from flexnpu import protocol as P
from flexnpu.client import Client
from flexnpu.protocol import TensorRef
n = int(sys.argv[1])
c = Client(0)
shape, stride, nbytes = (1, 1, 128), (128, 128, 1), 512
ref = lambda h: TensorRef(h, torch.float32, shape, stride, 0)
a, b = c.malloc(nbytes), c.malloc(nbytes)
tpl = P.encode_launch_template("aten::add.Tensor", (ref(a), ref(b)), {}, [(nbytes, ref(1))])
def run(k):
    outs = []
    for _ in range(k):
        o = c.alloc_handle()
        c.launch_payload(P.fill_launch(tpl, (a, b, o)))
        outs.append(o)
        if len(outs) == 64:
            c.free_many(outs)
            outs = []
    c.free_many(outs)
    c.synchronize()
"""
    + _TIMED_RUN
)


_TABLE_WORKER = (
    """
import sys, time, torch
from flexnpu import protocol as P
from flexnpu.client import Client
from flexnpu.protocol import TensorRef
n = int(sys.argv[1])
c = Client(0)
h = c.malloc(512 * 8, sync=True)
ref = lambda off: TensorRef(h, torch.float32, (1, 1, 128), (128, 128, 1), off)
# one structure, the output at six offsets: encoded once each, so the client is not the slow side
pls = [P.encode_launch("aclnn::Add", (ref(0), ref(128), 1.0, ref(256 + 128 * i)), {}, []) for i in range(6)]
def run(k):
    for i in range(k):
        c.launch_payload(pls[i % 6])
    c.synchronize()
"""
    + _TIMED_RUN
)


def _throughput(clients: int, n: int, rdir: str, worker: str = _WORKER, name: str = "launch") -> dict:
    # client processes may run anywhere (not inheriting this process's pinning)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(n)],
            env=child_env(rdir),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, _ALL_CPUS),
        )
        for _ in range(clients)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    took = []
    for p in procs:
        took.append(float(p.stdout.readline()))
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait(120)
    if worker is _PLANNED_WORKER or worker is _TABLE_WORKER:
        wall = max(took)  # the worker's own clock: its interpreter's exit (torch) is no launch
    return {
        "name": f"{name}-{clients}-client{'s' if clients > 1 else ''}",
        "p50_us": None,
        "p99_us": None,
        "ops_per_s": clients * n / wall,
    }


_ECHO = """
import socket, sys, os
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
while True:
    m = c.recv(64)
    if not m:
        break
    c.sendall(m)
"""


def _socket_call(n: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flexnpu-sock-") as d:
        path = os.path.join(d, "echo.sock")
        # the echo server sits where the daemon sits (the last CPU), the client where it is
        p = subprocess.Popen(
            [sys.executable, "-c", _ECHO, path],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {_ALL_CPUS[-1]}),
        )
        try:
            p.stdout.readline()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            msg = b"x" * 64
            pc = time.perf_counter_ns
            lat = []
            for i in range(n + 1000):
                t = pc()
                s.sendall(msg)
                got = 0
                while got < 64:
                    got += len(s.recv(64 - got))
                if i >= 1000:
                    lat.append(pc() - t)
            s.close()
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
    us = [x / 1000 for x in lat]
    return {"name": "socket-call", "p50_us": median(us), "p99_us": pct(us, 99), "ops_per_s": 1e6 / median(us)}


def _native_calls(n: int, rdir: str) -> list[dict]:
    """The native front end's call costs, from a C program pinned where this process runs."""
    import shutil
    import tempfile

    from flexnpu.hook import native
    from flexnpu.hook.native.build import build

    if not shutil.which("cc"):
        progress("[call] native front skipped: no C compiler")
        return []
    libs = build(quiet=True)
    exe = os.path.join(tempfile.mkdtemp(prefix="flexnpu-bench-"), "native_call")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_call.c")
    subprocess.run(["cc", "-O2", "-o", exe, src, f"-L{libs}", "-lascendcl", f"-Wl,-rpath,{libs}"], check=True)
    env = child_env(rdir)
    env.update(FLEXNPU_DEVICES="0", LD_LIBRARY_PATH=str(libs))
    cpu = os.sched_getaffinity(0)
    out = subprocess.run(
        [exe, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.sched_setaffinity(0, cpu),
    )
    if out.returncode:
        raise RuntimeError(f"native benchmark failed: {out.stderr}")
    rows = []
    for line in out.stdout.splitlines():
        name, p50, p99 = line.split()
        rows.append(
            {
                "name": name,
                "front": "native",
                "p50_us": float(p50),
                "p99_us": float(p99),
                "ops_per_s": 1e6 / float(p50),
            }
        )
    del native
    return rows


def _pin_daemon_apart(pinned: bool = True) -> None:
    """Latency runs: daemon on the last CPU, this (client) process on the first, so the figures do
    not depend on where the scheduler puts two spinning processes. Throughput runs: unpinned, the
    daemon competes with its clients for every core as it would in production."""
    import psutil

    if len(_ALL_CPUS) < 2:
        return
    for child in psutil.Process().children(recursive=True):
        if "daemon" in " ".join(child.cmdline()):
            os.sched_setaffinity(child.pid, {_ALL_CPUS[-1]} if pinned else _ALL_CPUS)
    os.sched_setaffinity(0, {_ALL_CPUS[0]} if pinned else _ALL_CPUS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexnpu bench call", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer iterations (about 15 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions; medians are reported")
    a = ap.parse_args(argv)
    n = 20000 if a.quick else 100000
    reps = a.repeat or (1 if a.quick else 3)
    runs: dict[str, list[dict]] = {}
    with private_daemon() as rdir:
        _pin_daemon_apart()
        for r in range(reps):
            progress(f"[call] repetition {r + 1}/{reps}: sync call")
            rows = [_sync_call(n)]
            progress("[call] socket peer")
            rows.append(_socket_call(n))
            progress("[call] async launch (client side)")
            rows += _async_launch(n)
            rows.append(_subclass_floor(n // 4))
            progress("[call] npu device dispatch (client side), C and Python paths")
            rows += _npu_dispatch(n // 4)
            progress("[call] native front (C program on libascendcl.so)")
            rows += _native_calls(n, str(rdir))
            progress("[call] daemon throughput, 1 and 4 clients")
            _pin_daemon_apart(False)
            rows.append(_throughput(1, n * 2, str(rdir)))
            rows.append(_throughput(4, n // 2, str(rdir)))
            progress("[call] planned operator launches, 1 client")
            rows.append(_throughput(1, n // 5, str(rdir), _PLANNED_WORKER, "planned-launch"))
            progress("[call] planned native-front (aclnn) launches, 1 client")
            rows.append(_throughput(1, n // 5, str(rdir), _TABLE_WORKER, "planned-table-launch"))
            _pin_daemon_apart(True)
            for row in rows:
                runs.setdefault(row["name"], []).append(row)
    results = []
    for name, rs in runs.items():
        row = {"name": name, "front": rs[0].get("front", "python")}
        for k in ("p50_us", "p99_us", "ops_per_s"):
            vals = [x[k] for x in rs if x[k] is not None]
            row[k] = round(median(vals), 3) if vals else None
        results.append(row)
    by = {r["name"]: r for r in results}
    ratios = {
        "socket_over_sync_p50": round(by["socket-call"]["p50_us"] / by["sync-call"]["p50_us"], 2),
        "four_over_one_client": round(
            by["launch-4-clients"]["ops_per_s"] / by["launch-1-client"]["ops_per_s"], 3
        ),
    }
    if "npu-dispatch-op" in by:
        ratios["client_us_added_per_op"] = round(
            by["npu-dispatch-op"]["p50_us"] - by["torch-subclass-op"]["p50_us"], 2
        )
        ratios["python_over_c_dispatch_p50"] = round(
            by["npu-dispatch-op-python"]["p50_us"] / by["npu-dispatch-op"]["p50_us"], 2
        )
    if "planned-launch-1-client" in by:
        ratios["daemon_us_per_planned_launch"] = round(1e6 / by["planned-launch-1-client"]["ops_per_s"], 2)
    if "planned-table-launch-1-client" in by:
        ratios["daemon_us_per_planned_table_launch"] = round(
            1e6 / by["planned-table-launch-1-client"]["ops_per_s"], 2
        )
    if "native-sync-call" in by:
        ratios["native_sync_over_python_sync_p50"] = round(
            by["native-sync-call"]["p50_us"] / by["sync-call"]["p50_us"], 3
        )
    if a.json:
        dump_json({"results": results, "ratios": ratios, "repetitions": reps, "iterations": n})
    else:
        print_table(
            results,
            [
                ("name", "benchmark", ""),
                ("p50_us", "p50 us", ".2f"),
                ("p99_us", "p99 us", ".2f"),
                ("ops_per_s", "ops/s", ",.0f"),
            ],
            title="flexnpu bench call (medians)",
        )
        print(
            f"socket peer / sync call (p50): {ratios['socket_over_sync_p50']}x;  "
            f"4 clients / 1 client throughput: {ratios['four_over_one_client']}x"
        )
        if "daemon_us_per_planned_launch" in ratios:
            print(f"daemon cost per planned operator launch: {ratios['daemon_us_per_planned_launch']} us")
        if "daemon_us_per_planned_table_launch" in ratios:
            us = ratios["daemon_us_per_planned_table_launch"]
            print(f"daemon cost per planned aclnn launch (native front end): {us} us")
        if "native_sync_over_python_sync_p50" in ratios:
            print(f"native sync / Python client sync (p50): {ratios['native_sync_over_python_sync_p50']}x")
    return 0
