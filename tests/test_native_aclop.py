"""The aclop operator path: a plain C program (compiled against the wheel's CANN headers) runs
aclopCompileAndExecute("Add") and friends plus aclnnAdd through dlopen("libopapi.so") under
`flexnpu run` against a real daemon; hostile `aclop::` launches get clear errors and leave the
daemon serving (skips with a reason where cc or the wheel's headers are missing)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from _native import ROOT, compile_program, flexnpu_run_cmd, run_env
from flexnpu.errors import FlexNPUError
from flexnpu.protocol import TensorRef


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    return str(compile_program("acl_op.c", tmp_path_factory.mktemp("op") / "acl_op", extra=["-ldl", "-lm"]))


def test_c_program_aclop_and_aclnn_with_correct_results(daemon, runtime_dir, prog):
    from flexnpu.cmd_run import choose_front

    assert choose_front("auto", [prog]) == "native"
    r = subprocess.run(
        flexnpu_run_cmd(runtime_dir, "--", prog),
        env=run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
    st = daemon.status()
    assert all(c["memory_bytes"] == 0 for c in st["clients"]), st["clients"]


def _fails(client, op, args, kwargs=None, match=""):
    client.launch(op, args, kwargs or {}, [], stream=0)
    with pytest.raises(FlexNPUError) as ei:
        client.synchronize(0)
    assert match in str(ei.value), str(ei.value)
    return str(ei.value)


def test_hostile_aclop_launches_get_clear_errors_and_the_daemon_keeps_serving(daemon, client):
    h = client.malloc(64)
    x = TensorRef(h, torch.float32, (4,), (1,), 0)
    y = TensorRef(h, torch.float32, (4,), (1,), 4)
    f32 = torch.float32
    _fails(client, "aclop::NoSuchOp", ([x], [y]), match="aclop::NoSuchOp")
    _fails(client, "aclop::Add", ([x, x],), match="takes 2 arguments")
    _fails(client, "aclop::Add", (x, [y]), match="")
    _fails(client, "aclop::Add", ([x, x], [[f32, [4], [1.0] * 4]]), match="output 0 must be a tensor")
    _fails(client, "aclop::Add", ([x, [f32, [4], [1.0]]], [y]), match="malformed host operand")
    _fails(client, "aclop::Add", ([x, [f32, [-1], []]], [y]), match="malformed host operand")
    _fails(client, "aclop::Add", ([x, [f32, [1 << 40], []]], [y]), match="malformed host operand")
    _fails(client, "aclop::Add", ([x, ["x", [1], [1]]], [y]), match="")
    _fails(client, "aclop::Add", ([x, [f32, [4], [1.0] * 4]], [y]), match="host memory")
    _fails(client, "aclop::Add", ([x], [y]), match="takes 2 inputs")
    _fails(client, "aclop::Add", ([x, x], [TensorRef(h, f32, (5,), (1,), 0)]), match="shape")
    _fails(client, "aclop::Add", ([x, TensorRef(99, f32, (4,), (1,), 0)], [y]), match="")
    _fails(client, "aclop::Add", ([x, TensorRef(h, f32, (4,), (1,), 100)], [y]), match="")
    m = TensorRef(h, f32, (2, 2), (2, 1), 0)
    _fails(client, "aclop::MatMul", ([m, m], [m]), {"transpose_x1": "yes"}, match="transpose_x1")
    _fails(client, "aclop::Add", ([x, x], [y]), {"a": [[[1]]]}, match="")
    _fails(client, "aclop::SliceD", ([x], [y]), {"offsets": [3], "size": [4]}, match="outside dim 0")
    _fails(client, "aclop::TransposeD", ([x], [y]), {"perm": [0, 0]}, match="permutation")
    _fails(client, "aclop::Fill", ([[torch.int64, [1], [1 << 40]], [f32, [1], [1.0]]], [y]), match="dims")
    idx = TensorRef(h, torch.int64, (2,), (1,), 0)
    client.memcpy_h2d(h, 0, torch.tensor([0, 1 << 30], dtype=torch.int64).numpy().tobytes())
    _fails(
        client,
        "aclop::GatherV2",
        (
            [TensorRef(h, f32, (2, 2), (2, 1), 4), idx, [torch.int32, [1], [0]]],
            [TensorRef(h, f32, (2, 2), (2, 1), 8)],
        ),
        match="out of range",
    )
    # raw garbage payloads: truncated, trailing bytes, wrong tags
    from flexnpu import protocol as P

    good = P.encode_launch("aclop::Add", ([x, x], [y]), {}, [])
    for bad in (good[:-3], good + b"\x00", good[:10] + b"\xff" * 8 + good[18:]):
        _raw_launch(client, bad)
        with pytest.raises(FlexNPUError):
            client.synchronize(0)
    # still serving, and a correct launch works
    client.memcpy_h2d(h, 0, torch.arange(16, dtype=torch.float32).numpy().tobytes())
    client.launch("aclop::Add", ([x, x], [TensorRef(h, f32, (4,), (1,), 8)]), {}, [], stream=0)
    client.synchronize(0)
    got = torch.frombuffer(bytearray(client.memcpy_d2h(h, 32, 16)), dtype=torch.float32)
    assert got.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert daemon.proc.poll() is None


def _raw_launch(client, payload: bytes) -> None:
    """A launch record whose payload is exactly these bytes (what a hostile process can send)."""
    from flexnpu import protocol as P

    client._async(P.Op.LAUNCH, payload=payload)


# ------------------------------------------------------------------ the real torch_npu
TORCH_NPU_ACLOP = str(ROOT / "tests" / "native" / "torch_npu_aclop.py")


@pytest.fixture
def _wheel():
    from flexnpu.hook import native

    if not native.torch_npu_installed():
        pytest.skip(
            f"the real torch_npu is not installed for FlexNPU in {native.torch_npu_dir()}: "
            f"run `flexnpu install-torch-npu`"
        )


def _torch_npu(runtime_dir, mode):
    import sys

    return subprocess.run(
        flexnpu_run_cmd(runtime_dir, "--interpose", "native", "--", sys.executable, TORCH_NPU_ACLOP, mode),
        env=run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_torch_npu_functions_without_aclnn_kernels_run_through_aclop(_wheel, daemon, runtime_dir):
    r = _torch_npu(runtime_dir, "check")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_torch_npu_operator_outside_the_table_is_its_error_with_the_op_named(_wheel, daemon, runtime_dir):
    r = _torch_npu(runtime_dir, "missing")
    assert "REFUSED" in r.stdout, r.stdout + r.stderr[-4000:]
    line = r.stdout.strip().splitlines()[-1]
    assert "aclop::Iou" in line and "100024" in line, line  # ACL_ERROR_OP_NOT_FOUND
    assert daemon.proc.poll() is None
