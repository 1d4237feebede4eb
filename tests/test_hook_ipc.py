"""torch-level zero-copy sharing between two processes on one device (the KV hand-off path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT, child_env

PRODUCER = textwrap.dedent("""
    import sys, torch, torch_npu
    kv = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).npu() * 2
    view = kv[1].t()                                     # a strided view of the allocation
    print(torch.npu.ipc_export(view), flush=True)         # nobody allowed yet
    consumer = int(sys.stdin.readline())
    desc = torch.npu.ipc_export(kv, pids=[consumer])
    print(desc, flush=True)
    sys.stdin.readline()                                 # the consumer wrote into the shared memory
    print(kv[0, 0].tolist(), flush=True)
    sys.stdin.readline()
""")

CONSUMER = textwrap.dedent("""
    import os, sys, torch, torch_npu
    print(os.getpid(), flush=True)
    refused = sys.stdin.readline().strip()
    try:
        torch.npu.ipc_import(refused)
        print("NOT REFUSED", flush=True)
    except Exception as e:
        print("REFUSED", type(e).__name__, flush=True)
    kv = torch.npu.ipc_import(sys.stdin.readline().strip())
    print(kv.shape, kv.sum().item(), flush=True)
    kv[0, 0] = -1.0
    torch.npu.synchronize()
    from flexnpu.client import get_client
    print("own", get_client(0).memory_stats()["allocated"], flush=True)
""")


def test_ipc_export_import_between_processes(daemon, runtime_dir):
    env = child_env(runtime_dir, FLEXNPU_DEVICES="0")
    env["PYTHONPATH"] = str(ROOT / "flexnpu" / "hook" / "bootstrap") + ":" + env["PYTHONPATH"]
    prod = subprocess.Popen(
        [sys.executable, "-c", PRODUCER], env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    cons = subprocess.Popen(
        [sys.executable, "-c", CONSUMER], env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        not_allowed = prod.stdout.readline()
        cons_pid = cons.stdout.readline().strip()
        cons.stdin.write(not_allowed)
        cons.stdin.flush()
        assert cons.stdout.readline().startswith("REFUSED PermissionDenied")
        prod.stdin.write(cons_pid + "\n")
        prod.stdin.flush()
        cons.stdin.write(prod.stdout.readline())
        cons.stdin.flush()
        assert cons.stdout.readline().strip() == "torch.Size([2, 3, 4]) 552.0"
        own = cons.stdout.readline().split()
        assert own[0] == "own" and int(own[1]) < 4096  # imported memory is not a copy
        prod.stdin.write("go\n")
        prod.stdin.flush()
        assert prod.stdout.readline().strip() == "[-1.0, -1.0, -1.0, -1.0]"  # the consumer's write
        prod.stdin.write("done\n")
        prod.stdin.flush()
        assert prod.wait(60) == 0 and cons.wait(60) == 0
    finally:
        for p in (prod, cons):
            if p.poll() is None:
                p.kill()
