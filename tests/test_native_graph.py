"""Captured graphs (aclmdlRI*) and phase hints through the native front end: plain C programs
compiled against the wheel's CANN headers and the real torch_npu's NPUGraph, against a real
daemon under `flexnpu run` (skips with a reason where cc or the wheel is missing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _native import spawn_flexnpu, run_flexnpu as _run, FLEXNPU, ROOT, compile_program, native_libs, run_env

TORCH_NPU_GRAPH = str(ROOT / "tests" / "native" / "torch_npu_graph.py")


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    return str(compile_program("acl_graph.c", tmp_path_factory.mktemp("graph") / "acl_graph"))


def test_capture_replay_50_times_reads_new_inputs_and_errors(daemon, runtime_dir, prog):
    r = _run(runtime_dir, "--", prog)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
    st = daemon.status()
    assert all(c["graphs"] == 0 for c in st["clients"]), st["clients"]


def _client_of(runtime_dir, pid):
    out = subprocess.run(
        FLEXNPU + ["status", "--json"],
        env=run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    for dev in st["daemons"]:
        for c in dev.get("clients", []):
            if c["pid"] == pid:
                return c
    raise AssertionError(f"client pid {pid} not in {st}")


def test_phase_from_flexnpu_run_and_from_the_c_api(start_daemon, runtime_dir, prog):
    start_daemon("--metrics-port", "0")
    p = spawn_flexnpu(runtime_dir, "--phase", "decode", "--", prog, "phase")
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        pid = _program_pid(p.pid)
        assert _client_of(runtime_dir, pid)["phase"] == "decode"
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "MARKED", p.stderr.read()
        c = _client_of(runtime_dir, pid)
        assert c["phase"] == "prefill"
        p.stdin.write("done\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_step_marks_from_c_reach_the_schedulers_clock(start_daemon, runtime_dir, prog):
    import urllib.request

    d = start_daemon("--metrics-port", "0")
    port = d.status()["metrics_port"]
    p = spawn_flexnpu(runtime_dir, "--", prog, "phase")
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "MARKED", p.stderr.read()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        # 5 marks on the default stream, whose phase flexnpuSetPhase(NULL) made prefill: 4 intervals
        counts = [
            ln
            for ln in text.splitlines()
            if ln.startswith("flexnpu_step_seconds_count") and 'phase="prefill"' in ln
        ]
        assert counts and float(counts[0].split()[-1]) == 4, "\n".join(
            ln for ln in text.splitlines() if "step" in ln
        )
        p.stdin.write("done\n")
        p.stdin.flush()
        p.communicate(timeout=60)
        assert p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _program_pid(run_pid: int) -> int:
    """The program `flexnpu run` started (its child)."""
    import psutil

    for _ in range(100):
        kids = psutil.Process(run_pid).children()
        if kids:
            return int(kids[0].pid)
        import time

        time.sleep(0.05)
    raise AssertionError("flexnpu run started no program")


# ------------------------------------------------------------------ the real torch_npu
@pytest.fixture
def _wheel():
    from flexnpu.hook import native

    if not native.torch_npu_installed():
        pytest.skip(
            f"the real torch_npu is not installed for FlexNPU in {native.torch_npu_dir()}: "
            f"run `flexnpu install-torch-npu`"
        )
    native_libs()


def test_torch_npu_npugraph_of_copies_replayed_50_times(_wheel, daemon, runtime_dir):
    r = _run(
        runtime_dir, "--interpose", "native", "--", sys.executable, TORCH_NPU_GRAPH, "copies", timeout=600
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_torch_npu_npugraph_of_a_decode_step_replayed_50_times_equals_eager(_wheel, daemon, runtime_dir):
    """A decode step of a small transformer layer (embedding, RMSNorm, attention over a KV
    cache, SwiGLU-style MLP, argmax) captured with torch.npu.graph: its aclnn launches replay
    50 times with new tokens, equal to eager and to the CPU."""
    r = _run(
        runtime_dir, "--interpose", "native", "--", sys.executable, TORCH_NPU_GRAPH, "decode", timeout=600
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_torch_npu_npugraph_whose_index_is_computed_inside_is_not_traced(_wheel, daemon, runtime_dir):
    """An index the graph computes itself cannot be range-checked before the replay, so such a
    graph keeps its step-by-step replay (checked per step); 30 replays read new inputs."""
    r = _run(
        runtime_dir, "--interpose", "native", "--", sys.executable, TORCH_NPU_GRAPH, "lookup", timeout=600
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]
