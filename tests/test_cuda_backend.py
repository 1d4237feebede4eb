"""The daemon's torch backend on CUDA: the same code path as cpu, checked against torch on the GPU.

Skips (with the reason) where no CUDA device is visible — on the project's CI machine always;
scripts/device-check.sh runs it on a lent GPU machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, child_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture
def cuda_daemon(start_daemon):
    return start_daemon("--backend", "cuda")


def test_runtime_on_cuda(cuda_daemon):
    from flexnpu.client import Client

    c = Client(0)
    assert c.device_info()["device_type"] == "cuda"
    data = bytes(range(256)) * 4096
    h = c.malloc(len(data))
    c.memcpy_h2d(h, 0, data)
    s1, s2 = c.create_stream(), c.create_stream(priority=-1)
    h2 = c.malloc(len(data))
    c.memcpy_d2d(h2, 0, h, 0, len(data), stream=s1)
    ev = c.create_event()
    c.record_event(ev, s1)
    c.stream_wait_event(s2, ev)
    c.memset(h2, 0, 7, 16, stream=s2)
    c.synchronize(s2)
    out = c.memcpy_d2h(h2, 0, len(data), stream=s2)
    assert out[:16] == b"\x07" * 16 and out[16:] == data[16:]
    c.close()


def test_generate_on_cuda_matches_cpu_tokens(tmp_path):
    env = child_env(tmp_path)
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)  # noqa: E731
    plain = run([sys.executable, "examples/generate.py"])
    flex = run(
        [
            sys.executable,
            "-m",
            "flexnpu",
            "run",
            "--backend",
            "cuda",
            "--",
            sys.executable,
            "examples/generate.py",
        ]
    )
    assert flex.returncode == 0, flex.stderr
    toks = lambda out: [ln for ln in out.splitlines() if ln.startswith("tokens:")]  # noqa: E731
    # random weights, greedy: GPU and CPU matmuls round differently, so compare the first tokens
    assert toks(flex.stdout)[0].split()[:6] == toks(plain.stdout)[0].split()[:6]


def test_graph_replay_on_cuda(tmp_path):
    code = textwrap.dedent("""
        import torch, torch_npu
        x = torch.randn(64, 64).npu(); w = torch.randn(64, 64).npu()
        y = torch.relu(x @ w); torch.npu.synchronize()
        g = torch.npu.NPUGraph()
        with torch.npu.graph(g):
            y = torch.relu(x @ w)
        for _ in range(3):
            x.copy_(torch.randn(64, 64).npu()); g.replay()
            torch.testing.assert_close(y.cpu(), torch.relu(x.cpu() @ w.cpu()), rtol=1e-3, atol=1e-3)
        print("OK")""")
    r = subprocess.run(
        [sys.executable, "-m", "flexnpu", "run", "--backend", "cuda", "--", sys.executable, "-c", code],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
