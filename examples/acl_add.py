"""Add two arrays on an Ascend NPU with pyACL (AscendCL's Python API).

A plain pyACL program in the style of Ascend's samples. It runs unmodified on a real Ascend
host with CANN, and under FlexNPU on any machine:

    flexnpu run -- python examples/acl_add.py
"""

import sys

import acl
import numpy as np

# AscendCL constants (pyACL exports none; samples define their own, as here)
ACL_SUCCESS = 0
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_FLOAT = 0
ACL_FORMAT_ND = 2
DEVICE_ID = 0


def check(what, ret):
    if ret != ACL_SUCCESS:
        raise RuntimeError(f"{what} failed, ret={ret}")


def main():
    shape = [8, 1024]
    x1 = np.random.default_rng(0).random(shape, dtype=np.float32)
    x2 = np.random.default_rng(1).random(shape, dtype=np.float32)
    nbytes = x1.nbytes

    check("acl.init", acl.init())
    check("acl.rt.set_device", acl.rt.set_device(DEVICE_ID))
    context, ret = acl.rt.create_context(DEVICE_ID)
    check("acl.rt.create_context", ret)
    stream, ret = acl.rt.create_stream()
    check("acl.rt.create_stream", ret)

    # device buffers for the two inputs and the output
    dev = []
    for _ in range(3):
        ptr, ret = acl.rt.malloc(nbytes, ACL_MEM_MALLOC_HUGE_FIRST)
        check("acl.rt.malloc", ret)
        dev.append(ptr)
    for ptr, arr in zip(dev, (x1, x2)):
        check(
            "acl.rt.memcpy",
            acl.rt.memcpy(ptr, nbytes, acl.util.numpy_to_ptr(arr), nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
        )

    # describe the operands and run the Add operator
    descs = [acl.create_tensor_desc(ACL_FLOAT, shape, ACL_FORMAT_ND) for _ in range(3)]
    buffers = [acl.create_data_buffer(ptr, nbytes) for ptr in dev]
    attr = acl.op.create_attr()
    check(
        "acl.op.execute_v2",
        acl.op.execute_v2("Add", descs[:2], buffers[:2], descs[2:], buffers[2:], attr, stream),
    )
    check("acl.rt.synchronize_stream", acl.rt.synchronize_stream(stream))

    # bring the result back through pinned host memory and check it
    host, ret = acl.rt.malloc_host(nbytes)
    check("acl.rt.malloc_host", ret)
    check("acl.rt.memcpy", acl.rt.memcpy(host, nbytes, dev[2], nbytes, ACL_MEMCPY_DEVICE_TO_HOST))
    y = np.frombuffer(acl.util.ptr_to_bytes(host, nbytes), dtype=np.float32).reshape(shape)
    max_err = float(np.abs(y - (x1 + x2)).max())
    ok = max_err <= 1e-6

    # release everything in reverse order
    acl.op.destroy_attr(attr)
    for b in buffers:
        check("acl.destroy_data_buffer", acl.destroy_data_buffer(b))
    for d in descs:
        acl.destroy_tensor_desc(d)
    check("acl.rt.free_host", acl.rt.free_host(host))
    for ptr in dev:
        check("acl.rt.free", acl.rt.free(ptr))
    check("acl.rt.destroy_stream", acl.rt.destroy_stream(stream))
    check("acl.rt.destroy_context", acl.rt.destroy_context(context))
    check("acl.rt.reset_device", acl.rt.reset_device(DEVICE_ID))
    check("acl.finalize", acl.finalize())

    print(
        f"acl_add: Add of two {shape[0]}x{shape[1]} float32 arrays on device {DEVICE_ID}: "
        f"{'PASS' if ok else 'FAIL'} (max abs error vs numpy {max_err:.3g})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
