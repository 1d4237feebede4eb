"""Quick development checks against the in-process stand-in (tests/_acl_loopback.py)."""
import numpy as np
import pytest

from _acl_loopback import LoopbackClient  # noqa: F401  (installs flexnpu.protocol if missing)
import flexnpu.hook.acl as aclpkg
from flexnpu.hook.acl import constants as C
from flexnpu.hook.acl._runtime import RT
import types

acl = types.ModuleType("acl")
aclpkg.populate(acl)


@pytest.fixture(autouse=True)
def fresh():
    RT.reset()
    clients = {}
    RT.client_factory = lambda d: clients.setdefault(d, LoopbackClient(d))
    yield clients
    RT.reset()


def dev_array(arr):
    n = arr.nbytes
    p, ret = acl.rt.malloc(n, C.ACL_MEM_MALLOC_HUGE_FIRST)
    assert ret == 0
    assert acl.rt.memcpy(p, n, acl.util.numpy_to_ptr(arr), n, C.ACL_MEMCPY_HOST_TO_DEVICE) == 0
    return p


def read(p, shape, dtype):
    out = np.empty(shape, dtype)
    assert acl.rt.memcpy(acl.util.numpy_to_ptr(out), out.nbytes, p, out.nbytes, C.ACL_MEMCPY_DEVICE_TO_HOST) == 0
    return out


def run(op_type, ins, out_shape, out_dtype, attrs=None, acl_dtype=None):
    descs, bufs = [], []
    for a in ins:
        p = dev_array(a)
        descs.append(acl.create_tensor_desc(_acl_dt(a.dtype), list(a.shape), C.ACL_FORMAT_ND))
        bufs.append(acl.create_data_buffer(p, a.nbytes))
    nbytes = int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize
    op, ret = acl.rt.malloc(max(nbytes, 1), 0)
    od = acl.create_tensor_desc(_acl_dt(np.dtype(out_dtype)), list(out_shape), C.ACL_FORMAT_ND)
    ob = acl.create_data_buffer(op, nbytes)
    attr = acl.op.create_attr()
    for k, (kind, v) in (attrs or {}).items():
        assert getattr(acl.op, f"set_attr_{kind}")(attr, k, v) == 0
    ret = acl.op.execute_v2(op_type, descs, bufs, [od], [ob], attr, 0)
    if ret:
        return ret, None
    assert acl.rt.synchronize_device() == 0
    return 0, read(op, out_shape, out_dtype)


def _acl_dt(dt):
    return {np.dtype("float32"): C.ACL_FLOAT, np.dtype("float16"): C.ACL_FLOAT16,
            np.dtype("int32"): C.ACL_INT32, np.dtype("int64"): C.ACL_INT64, np.dtype("bool"): C.ACL_BOOL}[np.dtype(dt)]


def test_flow():
    assert acl.init() == 0
    assert acl.rt.set_device(0) == 0
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.ones((3, 4), np.float32) * 2
    ret, z = run("Add", [x, y], (3, 4), np.float32)
    assert ret == 0 and np.array_equal(z, x + y)
    a = np.random.rand(3, 5).astype(np.float32)
    b = np.random.rand(4, 5).astype(np.float32)
    ret, m = run("MatMul", [a, b], (3, 4), np.float32, {"transpose_x2": ("bool", True)})
    assert ret == 0 and np.allclose(m, a @ b.T, atol=1e-5)
    ret, s = run("ReduceSum", [x, np.array([1], np.int64)], (3,), np.float32)
    assert ret == 0 and np.allclose(s, x.sum(1))
    ret, t = run("TransposeD", [x], (4, 3), np.float32, {"perm": ("list_int", [1, 0])})
    assert ret == 0 and np.array_equal(t, x.T)
    ret, c = run("Cast", [x], (3, 4), np.int32, {"dst_type": ("int", C.ACL_INT32)})
    assert ret == 0 and np.array_equal(c, x.astype(np.int32))
    ret, _ = run("Add", [x, np.ones((5, 4), np.float32)], (3, 4), np.float32)
    assert ret == C.ACL_ERROR_OP_INPUT_NOT_MATCH
    ret, _ = run("NoSuchOp", [x], (3, 4), np.float32)
    assert ret == C.ACL_ERROR_OP_NOT_FOUND
    ret, _ = run("Add", [x, y], (4, 4), np.float32)
    assert ret == C.ACL_ERROR_OP_OUTPUT_NOT_MATCH
    p, _ = acl.rt.malloc(16, 0)
    assert acl.rt.free(p) == 0
    assert acl.rt.free(p) == C.ACL_ERROR_RT_PARAM_INVALID
    assert "freed" in acl.get_recent_err_msg()
    assert acl.rt.reset_device(0) == 0
    assert acl.finalize() == 0
