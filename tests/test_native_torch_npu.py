"""The REAL torch_npu (2.13.0, from its isolated folder) under `flexnpu run --interpose native`:
its C++ runtime, caching allocator and task queue run on FlexNPU's AscendCL libraries against a
real daemon. Runtime half (device, memory, copies, streams, events); operators: tests/test_native_ops.py.
Skips when the wheel is not installed for FlexNPU (`flexnpu install-torch-npu`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _native import spawn_flexnpu, FLEXNPU, ROOT, flexnpu_run_cmd, native_libs, run_env

SCRIPT = str(ROOT / "tests" / "native" / "torch_npu_runtime.py")


@pytest.fixture(scope="module", autouse=True)
def _need_wheel():
    from flexnpu.hook import native

    if not native.torch_npu_installed():
        pytest.skip(
            f"the real torch_npu is not installed for FlexNPU in {native.torch_npu_dir()}: "
            f"run `flexnpu install-torch-npu`"
        )
    native_libs()


def _native(runtime_dir, *args, timeout=300, env=None, **kw):
    return subprocess.run(
        flexnpu_run_cmd(runtime_dir, "--interpose", "native", *args),
        env=env or run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


def test_device_memory_copies_of_every_dtype_pinned_streams_events(daemon, runtime_dir):
    r = _native(runtime_dir, "--", sys.executable, SCRIPT, "check")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_task_queue_is_off_by_default_and_a_users_setting_wins(daemon, runtime_dir):
    """`flexnpu run` turns torch_npu's task queue off (the ring is the queue: cmd_run.native_env);
    a program that sets TASK_QUEUE_ENABLE itself keeps its value, and the queue works on our
    libraries too."""
    show = [sys.executable, "-c", "import os; print('TQ', os.environ.get('TASK_QUEUE_ENABLE'))"]
    r = _native(runtime_dir, "--", *show)
    assert r.returncode == 0 and "TQ 0" in r.stdout, r.stdout + r.stderr[-2000:]
    env = run_env(runtime_dir) | {"TASK_QUEUE_ENABLE": "2"}
    r = _native(runtime_dir, "--", *show, env=env)
    assert "TQ 2" in r.stdout, r.stdout + r.stderr[-2000:]
    r = _native(runtime_dir, "--", sys.executable, SCRIPT, "check", env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_main_environment_is_untouched(daemon, runtime_dir):
    """Only the native path sees the real torch_npu: plain `import torch` here does not load it."""
    r = subprocess.run(
        [sys.executable, "-c", "import torch, importlib.util; print(importlib.util.find_spec('torch_npu'))"],
        capture_output=True,
        text=True,
        timeout=120,
        env=run_env(runtime_dir),
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr


def _status(runtime_dir) -> dict:
    out = subprocess.run(
        FLEXNPU + ["status", "--json", "--runtime-dir", str(runtime_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=run_env(runtime_dir),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    (info,) = json.loads(out.stdout)["daemons"]
    return info


def _line(p, tag: str) -> list[str]:
    """The next stdout line starting with tag (torch_npu prints warnings on stdout too)."""
    for raw in p.stdout:
        if raw.startswith(tag):
            return raw.split()
    raise AssertionError(f"no {tag} line; stderr: {p.stderr.read()[-3000:]}")


def test_memory_allocated_and_empty_cache_show_in_flexnpu_status(daemon, runtime_dir):
    p = spawn_flexnpu(runtime_dir, "--interpose", "native", "--", sys.executable, SCRIPT, "status")
    try:
        line = _line(p, "ALLOCATED")
        allocated, reserved = int(line[1]), int(line[2])
        assert allocated >= 64 << 20
        (c,) = _status(runtime_dir)["clients"]
        assert c["memory_bytes"] == reserved, (c, reserved)  # the caching allocator's blocks, exactly
        p.stdin.write("\n")
        p.stdin.flush()
        line = _line(p, "EMPTIED")
        assert int(line[2]) == 0
        (c,) = _status(runtime_dir)["clients"]
        assert c["memory_bytes"] == 0, c
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_exceeding_memory_limit_raises_torch_npus_own_oom(daemon, runtime_dir):
    r = _native(runtime_dir, "--memory-limit", "256MiB", "--", sys.executable, SCRIPT, "oom", str(512 << 20))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "OOM OutOfMemoryError NPU out of memory" in r.stdout, r.stdout
    assert "256.00 MiB total capacity" in r.stdout  # aclrtGetMemInfo reports the client's quota


def test_npu_tensor_shared_with_a_spawned_process_reads_identically(daemon, runtime_dir):
    """torch.multiprocessing's npu reductions: torch_npu exports with pid validation disabled,
    which the daemon grants to processes of the exporter's uid only."""
    r = _native(runtime_dir, "--", sys.executable, SCRIPT, "share")
    assert r.returncode == 0 and "SHARED OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_install_torch_npu_is_idempotent_and_checkable(tmp_path):
    from flexnpu.hook import native

    r = subprocess.run(
        FLEXNPU + ["install-torch-npu"], capture_output=True, text=True, timeout=120, env=run_env(), cwd=ROOT
    )
    assert r.returncode == 0 and "already installed" in r.stdout, r.stdout + r.stderr
    assert str(native.torch_npu_dir()) in r.stdout
    env = run_env()
    env["FLEXNPU_TORCH_NPU_DIR"] = str(tmp_path / "nowhere")
    r = subprocess.run(
        FLEXNPU + ["install-torch-npu", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "is not installed" in r.stdout
