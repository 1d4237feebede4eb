"""``acl.util``: host pointer helpers. Host pointers are real addresses of this process;
device pointers (from acl.rt.malloc) are not host-readable and are refused with a clear error."""

from __future__ import annotations

import ctypes
import warnings
from typing import Any

import numpy as np

from ._runtime import is_device_ptr

# NumPy C type number -> dtype, e.g. 11 (NPY_FLOAT) -> float32.
_NPY_TYPES: dict[int, np.dtype] = {}
for _t in set(np.sctypeDict.values()):
    try:
        _NPY_TYPES.setdefault(np.dtype(_t).num, np.dtype(_t))
    except TypeError:
        pass


def _host_only(ptr: Any, fn: str) -> int:
    if not isinstance(ptr, int) or isinstance(ptr, bool):
        raise TypeError(f"acl.util.{fn} args parse failed: ptr must be an int")
    if is_device_ptr(ptr):
        raise ValueError(
            f"acl.util.{fn}: {ptr:#x} is device memory; copy it to the host with acl.rt.memcpy first"
        )
    if ptr < 4096:
        raise ValueError(f"acl.util.{fn}: {ptr:#x} is not a valid host address")
    return ptr


def numpy_to_ptr(data: np.ndarray) -> int:
    if not isinstance(data, np.ndarray):
        raise ValueError("needs an ndarray as argument")
    if not data.flags["C_CONTIGUOUS"]:
        warnings.warn(
            "The input ndarray is discontiguous. Please use acl.util.numpy_contiguous_to_ptr instead.",
            stacklevel=2,
        )
    return int(data.ctypes.data)


def numpy_contiguous_to_ptr(data: np.ndarray) -> tuple[int, np.ndarray]:
    """Pointer to a C-contiguous version of ``data`` and that array (keep it alive)."""
    if not isinstance(data, np.ndarray):
        raise ValueError("needs an ndarray as argument")
    arr = np.ascontiguousarray(data)
    return int(arr.ctypes.data), arr


def ptr_to_numpy(ptr: int, shape: tuple, npy_type: int) -> np.ndarray:
    """A zero-copy array over host memory (valid while that memory is)."""
    _host_only(ptr, "ptr_to_numpy")
    dtype = _NPY_TYPES.get(npy_type)
    if dtype is None:
        raise ValueError(f"acl.util.ptr_to_numpy: unknown NumPy type number {npy_type!r}")
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)  # type: ignore[call-overload]  # ctypes arrays are buffers


def bytes_to_ptr(data: bytes) -> int:
    """Address of a bytes object's internal buffer (no copy), as pyACL returns it."""
    if not isinstance(data, bytes):
        raise ValueError("needs an byte as argument")
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def ptr_to_bytes(ptr: int, size: int) -> bytes:
    if not isinstance(size, int) or size < 0:
        raise TypeError("acl.util.ptr_to_bytes args parse failed: size must be an int >= 0")
    if size == 0:
        return b""
    return ctypes.string_at(_host_only(ptr, "ptr_to_bytes"), size)


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"acl.util.{name} is not implemented by FlexNPU's pyACL layer (see docs/acl.md for the supported API)"
    )
