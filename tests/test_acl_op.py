"""acl.op.execute_v2 against a real CPU daemon: results match NumPy, mistakes give ACL codes."""

from __future__ import annotations

import numpy as np
import pytest

from _acl_env import acl, acl_daemon, from_device, run_op, tensor  # noqa: F401
from flexnpu.hook.acl import constants as C

rng = np.random.default_rng(42)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def dev(acl):
    assert acl.init() == 0
    assert acl.rt.set_device(0) == 0
    yield acl
    assert acl.rt.reset_device(0) == 0
    assert acl.finalize() == 0


@pytest.mark.parametrize(
    "op_type,fn",
    [
        ("Add", np.add),
        ("Sub", np.subtract),
        ("Mul", np.multiply),
        ("Div", np.divide),
        ("RealDiv", np.divide),
        ("Maximum", np.maximum),
        ("Minimum", np.minimum),
    ],
)
def test_binary_ops_match_numpy(dev, op_type, fn):
    a, b = f32(4, 5), f32(4, 5) + 3.0
    ret, (out,) = run_op(dev, op_type, [a, b], [(4, 5)], [np.float32])
    assert ret == 0
    np.testing.assert_allclose(out, fn(a, b), rtol=1e-6)


def test_add_broadcast_and_float16(dev):
    a, b = f32(3, 1, 4).astype(np.float16), f32(5, 1).astype(np.float16)
    ret, (out,) = run_op(dev, "Add", [a, b], [(3, 5, 4)], [np.float16])
    assert ret == 0 and out.dtype == np.float16
    np.testing.assert_allclose(out, a + b, rtol=1e-3)


def test_integer_div_truncates(dev):
    a, b = np.array([7, -7, 9], np.int32), np.array([2, 2, -4], np.int32)
    ret, (out,) = run_op(dev, "Div", [a, b], [(3,)], [np.int32])
    assert ret == 0 and out.tolist() == [3, -3, -2]


@pytest.mark.parametrize("t1,t2", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes(dev, t1, t2):
    a = f32(6, 3) if t1 else f32(3, 6)
    b = f32(4, 6) if t2 else f32(6, 4)
    ret, (out,) = run_op(
        dev,
        "MatMul",
        [a, b],
        [(3, 4)],
        [np.float32],
        {"transpose_x1": ("bool", t1), "transpose_x2": ("bool", t2)},
    )
    assert ret == 0
    np.testing.assert_allclose(out, (a.T if t1 else a) @ (b.T if t2 else b), rtol=1e-5, atol=1e-5)


def test_matmul_with_bias_and_batch_matmul(dev):
    a, b, bias = f32(3, 6), f32(6, 4), f32(4)
    ret, (out,) = run_op(dev, "MatMul", [a, b, bias], [(3, 4)], [np.float32])
    assert ret == 0
    np.testing.assert_allclose(out, a @ b + bias, rtol=1e-5, atol=1e-5)
    x, y = f32(2, 5, 3), f32(2, 4, 3)
    ret, (out,) = run_op(dev, "BatchMatMul", [x, y], [(2, 5, 4)], [np.float32], {"adj_x2": ("bool", True)})
    assert ret == 0
    np.testing.assert_allclose(out, x @ y.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_cast_relu_softmax_reduce(dev):
    x = f32(3, 4) * 4
    ret, (out,) = run_op(dev, "Cast", [x], [(3, 4)], [np.int32], {"dst_type": ("int", C.ACL_INT32)})
    assert ret == 0 and np.array_equal(out, x.astype(np.int32))
    ret, (out,) = run_op(dev, "Cast", [x], [(3, 4)], [np.float16], {"dst_type": ("int", C.ACL_FLOAT16)})
    assert ret == 0 and np.array_equal(out, x.astype(np.float16))
    ret, (out,) = run_op(dev, "Relu", [x], [(3, 4)], [np.float32])
    assert ret == 0 and np.array_equal(out, np.maximum(x, 0))
    ret, (out,) = run_op(dev, "SoftmaxV2", [x], [(3, 4)], [np.float32], {"axes": ("list_int", [0])})
    e = np.exp(x - x.max(0))
    assert ret == 0 and np.allclose(out, e / e.sum(0), atol=1e-6)
    ret, (out,) = run_op(
        dev, "ReduceSum", [x, np.array([1], np.int64)], [(3, 1)], [np.float32], {"keep_dims": ("bool", True)}
    )
    assert ret == 0 and np.allclose(out, x.sum(1, keepdims=True), atol=1e-5)
    ret, (out,) = run_op(dev, "ReduceSumD", [x], [()], [np.float32], {"axes": ("list_int", [0, 1])})
    assert ret == 0 and np.allclose(out, x.sum(), atol=1e-4)


@pytest.mark.parametrize(
    "op_type,fn",
    [
        ("Exp", np.exp),
        ("Sqrt", lambda v: np.sqrt(np.abs(v))),
        ("Abs", np.abs),
        ("Neg", np.negative),
        ("Tanh", np.tanh),
    ],
)
def test_unary_ops(dev, op_type, fn):
    x = f32(17)
    if op_type == "Sqrt":
        x = np.abs(x)
    ret, (out,) = run_op(dev, op_type, [x], [(17,)], [np.float32])
    assert ret == 0
    np.testing.assert_allclose(out, fn(x), rtol=1e-5)


def test_data_movement_ops(dev):
    x = f32(2, 3, 4)
    ret, (out,) = run_op(dev, "TransposeD", [x], [(4, 2, 3)], [np.float32], {"perm": ("list_int", [2, 0, 1])})
    assert ret == 0 and np.array_equal(out, x.transpose(2, 0, 1))
    ret, (out,) = run_op(dev, "Transpose", [x, np.array([1, 0, 2], np.int32)], [(3, 2, 4)], [np.float32])
    assert ret == 0 and np.array_equal(out, x.transpose(1, 0, 2))
    ret, (out,) = run_op(dev, "Reshape", [x, np.array([6, 4], np.int64)], [(6, 4)], [np.float32])
    assert ret == 0 and np.array_equal(out, x.reshape(6, 4))
    y = f32(2, 1, 4)
    ret, (out,) = run_op(
        dev, "ConcatD", [x, y], [(2, 4, 4)], [np.float32], {"concat_dim": ("int", 1), "N": ("int", 2)}
    )
    assert ret == 0 and np.array_equal(out, np.concatenate([x, y], 1))
    ret, outs = run_op(
        dev,
        "SplitD",
        [x],
        [(2, 3, 2), (2, 3, 2)],
        [np.float32] * 2,
        {"split_dim": ("int", -1), "num_split": ("int", 2)},
    )
    assert ret == 0 and np.array_equal(outs[0], x[..., :2]) and np.array_equal(outs[1], x[..., 2:])
    idx = np.array([2, 0, 2], np.int64)
    ret, (out,) = run_op(dev, "GatherV2", [x, idx, np.array([1], np.int32)], [(2, 3, 4)], [np.float32])
    assert ret == 0 and np.array_equal(out, x[:, idx])


def test_operands_at_offsets_share_one_allocation(dev):
    acl = dev
    x = f32(64)
    base = from_device.__globals__["to_device"](acl, x)  # one allocation holding a and b
    da, ba, _ = tensor(acl, shape=(32,), dtype=np.float32, ptr=base)
    db, bb, _ = tensor(acl, shape=(32,), dtype=np.float32, ptr=base + 128)
    do, bo, po = tensor(acl, shape=(32,), dtype=np.float32)
    assert acl.op.execute_v2("Mul", [da, db], [ba, bb], [do], [bo], acl.op.create_attr(), 0) == 0
    assert acl.rt.synchronize_device() == 0
    np.testing.assert_allclose(from_device(acl, po, (32,), np.float32), x[:32] * x[32:], rtol=1e-6)
    # misaligned element address
    dm, bm, _ = tensor(acl, shape=(8,), dtype=np.float32, ptr=base + 2)
    assert acl.op.execute_v2("Abs", [dm], [bm], [do], [bo], 0, 0) == C.ACL_ERROR_MEMORY_ADDRESS_UNALIGNED


def test_op_mistakes_give_acl_codes(dev):
    acl = dev
    a, b = f32(3, 4), f32(3, 4)
    ret, _ = run_op(acl, "NoSuchOp", [a], [(3, 4)], [np.float32])
    assert ret == C.ACL_ERROR_OP_NOT_FOUND
    assert "'NoSuchOp' is not supported" in acl.get_recent_err_msg()
    ret, _ = run_op(acl, "Add", [a, f32(5, 4)], [(3, 4)], [np.float32])
    assert ret == C.ACL_ERROR_OP_INPUT_NOT_MATCH
    ret, _ = run_op(acl, "Add", [a, b], [(4, 3)], [np.float32])
    assert ret == C.ACL_ERROR_OP_OUTPUT_NOT_MATCH
    ret, _ = run_op(acl, "Add", [a], [(3, 4)], [np.float32])
    assert ret == C.ACL_ERROR_OP_INPUT_NOT_MATCH
    ret, _ = run_op(acl, "MatMul", [a, b], [(3, 4)], [np.float32], {"transpose_x1": ("string", "yes")})
    assert ret == C.ACL_ERROR_OP_ATTR_NOT_MATCH
    # an input buffer that was freed
    da, ba, pa = tensor(acl, a)
    do, bo, _ = tensor(acl, shape=(3, 4), dtype=np.float32)
    assert acl.rt.free(pa) == 0
    assert acl.op.execute_v2("Abs", [da], [ba], [do], [bo], 0, 0) == C.ACL_ERROR_RT_PARAM_INVALID
    assert "freed" in acl.get_recent_err_msg()
    # an output in host memory
    host = np.zeros((3, 4), np.float32)
    db, bb, _ = tensor(acl, b)
    hb = acl.create_data_buffer(acl.util.numpy_to_ptr(host), host.nbytes)
    assert acl.op.execute_v2("Abs", [db], [bb], [do], [hb], 0, 0) == C.ACL_ERROR_INVALID_PARAM
    # packed device formats are refused
    nz = acl.create_tensor_desc(C.ACL_FLOAT, [3, 4], C.ACL_FORMAT_FRACTAL_NZ)
    assert acl.op.execute_v2("Abs", [nz], [bb], [do], [bo], 0, 0) == C.ACL_ERROR_FORMAT_NOT_MATCH


def test_device_side_failure_surfaces_at_synchronize(dev):
    acl = dev
    x = f32(2, 3)
    bad_index = np.array([0, 99], np.int64)  # passes shape checks, fails when run
    ret, _ = run_op(acl, "GatherV2", [x, bad_index, np.array([1], np.int32)], [(2, 2)], [np.float32])
    assert ret == C.ACL_ERROR_RT_AICORE_EXCEPTION
    # refused by the daemon's index check before it runs, reported like the device fault it prevents
    assert "holds 99, out of range for size 3" in acl.get_recent_err_msg().lower()


def test_ops_on_a_created_stream_with_events(dev):
    acl = dev
    stream, _ = acl.rt.create_stream()
    start, _ = acl.rt.create_event()
    end, _ = acl.rt.create_event()
    a, b = f32(64, 64), f32(64, 64)
    assert acl.rt.record_event(start, stream) == 0
    ret, (out,) = run_op(acl, "MatMul", [a, b], [(64, 64)], [np.float32], stream=stream)
    assert acl.rt.record_event(end, stream) == 0
    assert ret == 0 and acl.rt.synchronize_event(end) == 0
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)
    ms, ret = acl.rt.event_elapsed_time(start, end)
    assert ret == 0 and ms >= 0
