"""Shared helpers for the pyACL tests: a real CPU daemon per test module and a pyACL program
style toolkit (the ``acl`` module object as `flexnpu run` provides it)."""

from __future__ import annotations

import importlib.util
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, DaemonProc

BOOTSTRAP = ROOT / "flexnpu" / "hook" / "bootstrap"


def load_acl() -> types.ModuleType:
    """The top-level ``acl`` module exactly as the bootstrap file builds it."""
    spec = importlib.util.spec_from_file_location("acl", BOOTSTRAP / "acl.py")
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["acl"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def acl_daemon():
    with tempfile.TemporaryDirectory(prefix="flexnpu-acl-") as d:
        proc = DaemonProc(Path(d), 0, ["--backend", "cpu", "--memory-limit", "256M"])
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture
def acl(acl_daemon):
    """A fresh pyACL state attached (per test) to the module's daemon."""
    from flexnpu.client import Client
    from flexnpu.hook.acl import rt
    from flexnpu.hook.acl._runtime import RT

    clients: list = []

    def factory(device: int) -> Client:
        if device != 0:
            raise ConnectionError(f"no daemon serves device {device}")
        c = Client(0, path=str(acl_daemon.socket))
        clients.append(c)
        return c

    RT.reset()
    RT.client_factory = factory
    mod = load_acl()
    yield mod
    rt.release_host_blocks()
    RT.reset()
    for c in clients:
        c.close()


# ---- small pyACL-program helpers ------------------------------------------------------------
NP_TO_ACL = {
    np.dtype("float32"): 0,
    np.dtype("float16"): 1,
    np.dtype("int8"): 2,
    np.dtype("int32"): 3,
    np.dtype("uint8"): 4,
    np.dtype("int16"): 6,
    np.dtype("int64"): 9,
    np.dtype("float64"): 11,
    np.dtype("bool"): 12,
}


def to_device(acl, arr: np.ndarray) -> int:
    arr = np.ascontiguousarray(arr)
    ptr, ret = acl.rt.malloc(max(arr.nbytes, 1), 0)
    assert ret == 0, acl.get_recent_err_msg()
    if arr.nbytes:
        assert acl.rt.memcpy(ptr, arr.nbytes, acl.util.numpy_to_ptr(arr), arr.nbytes, 1) == 0
    return ptr


def from_device(acl, ptr: int, shape, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    if out.nbytes:
        assert acl.rt.memcpy(acl.util.numpy_to_ptr(out), out.nbytes, ptr, out.nbytes, 2) == 0, (
            acl.get_recent_err_msg()
        )
    return out


def tensor(acl, arr: np.ndarray | None = None, *, shape=None, dtype=None, ptr: int | None = None):
    """(desc, buffer, device ptr) for an input array, or an empty output of shape/dtype."""
    if arr is not None:
        shape, dtype = arr.shape, arr.dtype
        ptr = to_device(acl, arr) if ptr is None else ptr
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if ptr is None:
        ptr, ret = acl.rt.malloc(max(nbytes, 1), 0)
        assert ret == 0
    desc = acl.create_tensor_desc(NP_TO_ACL[dtype], list(shape), 2)
    return desc, acl.create_data_buffer(ptr, nbytes), ptr


def run_op(acl, op_type, inputs, out_shapes, out_dtypes, attrs=None, stream=0):
    """Execute one operator; returns (ret, [outputs as numpy]) after synchronizing."""
    ins = [tensor(acl, a) for a in inputs]
    outs = [tensor(acl, shape=s, dtype=d) for s, d in zip(out_shapes, out_dtypes)]
    attr = acl.op.create_attr()
    for name, (kind, value) in (attrs or {}).items():
        assert getattr(acl.op, f"set_attr_{kind}")(attr, name, value) == 0
    ret = acl.op.execute_v2(
        op_type,
        [d for d, _, _ in ins],
        [b for _, b, _ in ins],
        [d for d, _, _ in outs],
        [b for _, b, _ in outs],
        attr,
        stream,
    )
    acl.op.destroy_attr(attr)
    if ret != 0:
        return ret, None
    ret = acl.rt.synchronize_stream(stream)
    if ret != 0:
        return ret, None
    return 0, [from_device(acl, p, s, d) for (_, _, p), s, d in zip(outs, out_shapes, out_dtypes)]
