"""pyACL calls Ascend's level-1 Python samples use beyond the runtime basics: acl.media.dvpp_malloc/
dvpp_free, operator handles, Slice; and a program shaped like the samples
memcpy_host_device_async_python / memcpy_host_DVPP_python, run as its own process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from _acl_env import (
    BOOTSTRAP,
    acl,  # noqa: F401 - fixture
    acl_daemon,  # noqa: F401 - fixture
    from_device,
    tensor,  # noqa: F401
    to_device,  # noqa: F401 - re-exported helper
)
from conftest import child_env
from flexnpu.hook.acl import constants as C


@pytest.fixture
def dev(acl):
    assert acl.init() == 0
    assert acl.rt.set_device(0) == 0
    yield acl
    assert acl.rt.reset_device(0) == 0
    assert acl.finalize() == 0


def test_dvpp_malloc_is_device_memory(dev):
    acl = dev
    ptr, ret = acl.media.dvpp_malloc(1 << 20)
    assert ret == 0 and ptr
    data = np.arange(1 << 18, dtype=np.int32)
    assert (
        acl.rt.memcpy(ptr, data.nbytes, acl.util.numpy_to_ptr(data), data.nbytes, C.ACL_MEMCPY_HOST_TO_DEVICE)
        == 0
    )
    assert np.array_equal(from_device(acl, ptr, data.shape, np.int32), data)
    stream, ret = acl.rt.create_stream()
    assert acl.rt.memset_async(ptr, 1 << 20, 7, 1 << 20, stream) == 0
    assert acl.rt.synchronize_stream(stream) == 0
    assert (from_device(acl, ptr, (1 << 20,), np.uint8) == 7).all()
    assert acl.rt.destroy_stream(stream) == 0
    assert acl.media.dvpp_free(ptr) == 0
    assert acl.media.dvpp_free(ptr) == C.ACL_ERROR_INVALID_PARAM  # double free
    other, _ = acl.rt.malloc(64, 0)
    assert acl.media.dvpp_free(other) == C.ACL_ERROR_INVALID_PARAM  # not DVPP memory
    assert "dvpp_malloc" in acl.get_recent_err_msg()
    assert acl.rt.free(other) == 0
    _, ret = acl.media.dvpp_malloc(0)
    assert ret == C.ACL_ERROR_INVALID_PARAM
    with pytest.raises(AttributeError, match="acl.media.vpc_resize_async.*no DVPP media engine"):
        acl.media.vpc_resize_async


def test_op_handle_and_slice(dev):
    acl = dev
    x = np.arange(60, dtype=np.float32).reshape(6, 10)
    in_desc = [
        acl.create_tensor_desc(0, [6, 10], 2),
        acl.create_tensor_desc(3, [2], 2),
        acl.create_tensor_desc(3, [2], 2),
    ]
    out_desc = [acl.create_tensor_desc(0, [3, 4], 2)]
    attr = acl.op.create_attr()
    handle, ret = acl.op.create_handle("Slice", in_desc, out_desc, attr)
    assert ret == 0 and handle
    xd, _, _ = tensor(acl, x)
    bufs_out = []
    for offsets in ([1, 2], [3, 6]):
        ins = [
            tensor(acl, x)[1],
            tensor(acl, np.array(offsets, np.int32))[1],
            tensor(acl, np.array([3, 4], np.int32))[1],
        ]
        _, ob, optr = tensor(acl, shape=(3, 4), dtype=np.float32)
        bufs_out.append((offsets, optr))
        assert acl.op.execute_with_handle(handle, ins, [ob], 0) == 0
    assert acl.rt.synchronize_stream(0) == 0
    for (r, c), optr in bufs_out:
        assert np.array_equal(from_device(acl, optr, (3, 4), np.float32), x[r : r + 3, c : c + 4])
    acl.op.destroy_handle(handle)
    assert acl.op.execute_with_handle(handle, [], [], 0) == C.ACL_ERROR_INVALID_PARAM
    _, ret = acl.op.create_handle("NoSuchOp", in_desc, out_desc, attr)
    assert ret == C.ACL_ERROR_OP_NOT_FOUND


# The call sequence of Ascend's memcpy_host_device_async_python and memcpy_host_DVPP_python
# samples (written here from their structure): pinned host buffers, memset_async on the host
# buffer, DVPP device buffers, async copies both ways on a stream, memory info, teardown.
SAMPLE = r"""
import sys
import numpy as np
import acl

SIZE = int(sys.argv[1])
ROUNDS = 3
def ok(what, ret):
    if ret != 0:
        print(what, "failed", ret, acl.get_recent_err_msg()); sys.exit(1)

def peek(ptr, kind):
    arr = np.zeros(SIZE, dtype=np.int8)
    data = arr.tobytes()
    ok("memcpy", acl.rt.memcpy(acl.util.bytes_to_ptr(data), SIZE, ptr, SIZE, kind))
    return np.frombuffer(data, dtype=np.int8)

ok("init", acl.init())
ok("set_device", acl.rt.set_device(0))
ctx, ret = acl.rt.create_context(0); ok("create_context", ret)
stream, ret = acl.rt.create_stream(); ok("create_stream", ret)
free0, total, ret = acl.rt.get_mem_info(1); ok("get_mem_info", ret)
devs = []
for r in range(ROUNDS):
    host, ret = acl.rt.malloc_host(SIZE); ok("malloc_host", ret)
    ok("memset_async", acl.rt.memset_async(host, SIZE, 7 + r, SIZE, stream))
    dvpp, ret = acl.media.dvpp_malloc(SIZE); ok("dvpp_malloc", ret)
    devs.append(dvpp)
    ok("synchronize_stream", acl.rt.synchronize_stream(stream))
    assert (peek(host, 0) == 7 + r).all()
    ok("memcpy_async h2d", acl.rt.memcpy_async(dvpp, SIZE, host, SIZE, 1, stream))
    back, ret = acl.rt.malloc_host(SIZE); ok("malloc_host", ret)
    ok("synchronize_stream", acl.rt.synchronize_stream(stream))
    assert (peek(dvpp, 2) == 7 + r).all()
    ok("memcpy_async d2h", acl.rt.memcpy_async(back, SIZE, dvpp, SIZE, 2, stream))
    ok("free_host", acl.rt.free_host(host))
    ok("synchronize_stream", acl.rt.synchronize_stream(stream))
    assert (peek(back, 0) == 7 + r).all()
    ok("free_host", acl.rt.free_host(back))
free1, _, ret = acl.rt.get_mem_info(1); ok("get_mem_info", ret)
assert free1 <= free0 - ROUNDS * SIZE, (free0, free1)
for d in devs:
    ok("dvpp_free", acl.media.dvpp_free(d))
ok("destroy_stream", acl.rt.destroy_stream(stream))
ok("destroy_context", acl.rt.destroy_context(ctx))
ok("reset_device", acl.rt.reset_device(0))
ok("finalize", acl.finalize())
print("run success!")
"""


@pytest.mark.parametrize("size", [1 << 20, 28 << 20])  # the larger one fills most of the arena
def test_sample_shaped_program(acl_daemon, tmp_path, size):
    prog = tmp_path / "memcpy_dvpp_sample.py"
    prog.write_text(SAMPLE)
    env = child_env(acl_daemon.runtime_dir)
    env["PYTHONPATH"] = f"{BOOTSTRAP}:{env['PYTHONPATH']}"
    r = subprocess.run(
        [sys.executable, str(prog), str(size)], env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run success!" in r.stdout
