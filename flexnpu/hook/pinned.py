"""Pinned host memory for the npu device: host tensors whose bytes live in the client's shared
arena (like ``aclrtMallocHost`` / CUDA's pinned memory), so ``.to("npu", non_blocking=True)`` is
one command the daemon serves straight from that memory, with no staging copy and no wait.

Where torch asks for pinned memory, and how FlexNPU answers (torch 2.13):

* ``Tensor.pin_memory()`` (also what DataLoader's pinning thread calls) and ``is_pinned()`` are
  the aten ops ``_pin_memory`` and ``is_pinned``; FlexNPU registers CPU kernels for both.
* Factories with ``pin_memory=True`` (``torch.empty``, ``zeros``, ``tensor``, ...) allocate
  inside torch's C++ through ``PrivateUse1HooksInterface::getPinnedMemoryAllocator``, which a
  Python backend cannot provide (``torch._C._acc.PrivateUse1Hooks`` exposes only
  ``is_available``/``has_primary_context``/``is_built``; see torch/csrc/acc/Module.cpp), so
  FlexNPU wraps those factory functions: with ``pin_memory=True`` they build the tensor
  unpinned and pin it (and are registered as TorchScript builtins, so scripted code still works).

A pinned tensor's block returns to the arena when its last tensor dies, once the copies that read
it asynchronously have completed (an event recorded after each such copy). When the arena cannot
hold a block (it keeps one copy chunk free for ordinary copies), the tensor is an ordinary host
copy and ``is_pinned()`` says False; raise the arena with ``FLEXNPU_ARENA`` for big pinned batches.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Any

import numpy as np
import torch

from flexnpu.hook import runtime

_lock = threading.RLock()  # (re-entered when a block dies while it is held)
_live: weakref.WeakValueDictionary[int, _Block] = (
    weakref.WeakValueDictionary()
)  # addr -> block; the tensor owns it
_pending: list[tuple[Any, int, int]] = []  # (client, arena offset, event or 0) to free
_warned = False


class _Block:
    """Arena bytes behind one pinned tensor; the numpy array torch wraps keeps it alive."""

    __slots__ = ("dev", "client", "off", "nbytes", "addr", "event", "__weakref__")

    def __init__(self, dev: runtime.Device, nbytes: int):
        self.dev, self.client, self.nbytes = dev, dev.client, nbytes
        self.off = self.client.host_alloc(max(nbytes, 1))
        self.addr = self.client.host_addr(self.off)
        self.event = 0

    @property
    def __array_interface__(self) -> dict:
        return {"data": (self.addr, False), "shape": (self.nbytes,), "typestr": "|u1", "version": 3}

    def __del__(self) -> None:
        try:
            with _lock:
                _pending.append((self.client, self.off, self.event))  # freed by reap(), never here
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def reap(wait: bool = False) -> None:
    """Return dead blocks to their arenas once no asynchronous copy reads them any more."""
    with _lock:
        todo = list(_pending)
        _pending.clear()
    keep = []
    for client, off, ev in todo:
        try:
            if ev:
                if wait:
                    client.event_synchronize(ev)
                elif not client.event_query(ev):
                    keep.append((client, off, ev))
                    continue
                client.destroy_event(ev)
            client.host_free(off)
        except Exception:  # noqa: BLE001 - the client is gone: its arena went with it
            pass
    if keep:
        with _lock:
            _pending.extend(keep)


def _extent(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()  # type: ignore[return-value]  # SymInt only when traced


def _device_for(device: Any) -> runtime.Device:
    if device is None:
        return runtime.get(None)
    d = torch.device(device) if not isinstance(device, torch.device) else device
    return runtime.get(d.index if d.type == "npu" else None)


def pin(t: torch.Tensor, device: Any = None) -> torch.Tensor:
    """A pinned copy of host tensor ``t`` (same sizes and strides) in the arena of ``device``'s client."""
    global _warned
    if _pending:
        reap()
    dev = _device_for(device)
    nbytes = _extent(t)
    try:
        block = _Block(dev, nbytes)
    except MemoryError as e:
        if not _warned:
            _warned = True
            warnings.warn(
                f"FlexNPU: pinned memory falls back to ordinary host memory ({e}); "
                "set FLEXNPU_ARENA larger for zero-copy transfers of this size",
                stacklevel=3,
            )
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
        out.copy_(t)
        return out
    with _lock:
        _live[block.addr] = block
    raw = torch.from_numpy(np.asarray(block))
    if raw.numel() == 0:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    else:
        out = raw.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


def lookup(ptr: int, nbytes: int, dev: runtime.Device) -> _Block | None:
    """The live block of ``dev``'s current client holding [ptr, ptr + nbytes), if any."""
    with _lock:
        for b in list(_live.values()):  # a handful of live batches in practice
            if b.addr <= ptr and ptr + nbytes <= b.addr + b.nbytes:
                return b if b.client is dev._client else None
    return None


def is_pinned_ptr(ptr: int) -> bool:
    with _lock:
        return any(b.addr <= ptr < b.addr + max(b.nbytes, 1) for b in list(_live.values()))


def copy_to_device(dst, src: torch.Tensor, non_blocking: bool) -> bool:
    """Device <- pinned host tensor as one arena-to-device command; False if ``src`` is not
    pinned in the arena of ``dst``'s client (the caller copies the ordinary way)."""
    if not _live or src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
        return False
    if not (src.is_contiguous() and dst.is_contiguous()) or src.numel() == 0:
        return False
    dev = dst._a.dev
    if dev._client is None:
        return False
    n = src.numel() * src.element_size()
    ptr = src.data_ptr()
    b = lookup(ptr, n, dev)
    if b is None:
        return False
    if dev.flush_due:
        dev.flush_frees()
    c = dev.client
    off = b.off + (ptr - b.addr)
    c.memcpy_h2d_host(
        dst._a.handle, dst.storage_offset() * dst.element_size(), off, n, dev.stream, sync=not non_blocking
    )
    if non_blocking:
        # the block must outlive the copy: its release waits for this event
        if not b.event:
            b.event = c.create_event()
        c.record_event(b.event, dev.stream)
    return True


# ------------------------------------------------------------------------------ registration


def _pin_memory_kernel(self: torch.Tensor, device: Any = None) -> torch.Tensor:
    return pin(self, device)


def _is_pinned_kernel(self: torch.Tensor, device: Any = None) -> bool:
    return self.numel() > 0 and is_pinned_ptr(self.data_ptr())


FACTORIES = (
    "empty",
    "empty_like",
    "empty_strided",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "tensor",
    "rand",
    "randn",
    "randint",
    "arange",
)


def _wrap_factory(name: str):
    orig = getattr(torch, name)

    @functools.wraps(orig)
    def factory(*args, **kwargs):
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type != "cpu":
                raise RuntimeError(f"torch.{name}: only host (cpu) tensors can be pinned, got device={dev}")
            return pin(orig(*args, **kwargs))
        return orig(*args, **kwargs)

    factory.__flexnpu_orig__ = orig  # type: ignore[attr-defined]  # our tag: the unwrapped factory
    return factory


def install(alib) -> None:
    """Register the kernels on ``alib`` (an aten IMPL library kept alive by the caller) and wrap
    the pin_memory factories."""
    alib.impl("_pin_memory", _pin_memory_kernel, "CPU")
    alib.impl("is_pinned", _is_pinned_kernel, "CPU")
    from torch.jit import _builtins

    for name in FACTORIES:
        orig = getattr(torch, name, None)
        if orig is None or hasattr(orig, "__flexnpu_orig__"):
            continue
        wrapped = _wrap_factory(name)
        setattr(torch, name, wrapped)
        op = _builtins._find_builtin(orig)
        if op is not None:
            _builtins._register_builtin(wrapped, op)  # TorchScript keeps compiling torch.<name>
