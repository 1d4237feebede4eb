"""DEVELOPMENT STAND-IN, not a FlexNPU component: an in-process object with the Client API of
/work/notes/client_api.md (torch CPU storage per handle), used only until flexnpu.client and the
daemon land on main. Tests that use it say so in their names (``loopback``)."""
from __future__ import annotations

import itertools
import sys
import types
from dataclasses import dataclass

import torch

try:
    from flexnpu.protocol import TensorRef
except ImportError:  # main has not landed the wire protocol yet
    @dataclass(frozen=True, slots=True)
    class TensorRef:  # type: ignore[no-redef]
        handle: int
        dtype: torch.dtype
        shape: tuple
        stride: tuple
        offset: int

    _mod = types.ModuleType("flexnpu.protocol")
    _mod.TensorRef = TensorRef
    sys.modules["flexnpu.protocol"] = _mod


class LoopbackError(RuntimeError):
    pass


LoopbackError.__name__ = "FlexNPUError"  # what the acl layer recognises as a client error


class LoopbackClient:
    def __init__(self, device_index: int = 0, total: int = 1 << 30) -> None:
        self.device_index = device_index
        self.store: dict[int, torch.Tensor] = {}
        self._ids = itertools.count(1)
        self._streams = itertools.count(1)
        self._events = itertools.count(1)
        self.total = total
        self.pending: list[str] = []
        self.launches: list[str] = []

    def alloc_handle(self) -> int:
        return next(self._ids)

    def malloc(self, nbytes: int, handle: int | None = None) -> int:
        h = handle or self.alloc_handle()
        if nbytes > self.total - sum(t.numel() for t in self.store.values()):
            self.pending.append(f"out of memory allocating {nbytes} bytes")
        self.store[h] = torch.zeros(nbytes, dtype=torch.uint8)
        return h

    def free(self, handle: int) -> None:
        self.store.pop(handle)

    def _buf(self, h: int) -> torch.Tensor:
        if h not in self.store:
            raise LoopbackError(f"unknown handle {h}")
        return self.store[h]

    def memcpy_h2d(self, handle, offset, data, stream=0):
        mv = memoryview(data).cast("B")
        self._buf(handle)[offset:offset + len(mv)] = torch.frombuffer(bytearray(mv), dtype=torch.uint8)

    def memcpy_d2h(self, handle, offset, nbytes, stream=0) -> bytearray:
        self.synchronize()
        return bytearray(self._buf(handle)[offset:offset + nbytes].numpy().tobytes())

    def memcpy_d2d(self, dst, dst_off, src, src_off, nbytes, stream=0):
        self._buf(dst)[dst_off:dst_off + nbytes] = self._buf(src)[src_off:src_off + nbytes].clone()

    def memset(self, handle, offset, value, nbytes, stream=0):
        self._buf(handle)[offset:offset + nbytes] = value

    def _view(self, ref: TensorRef) -> torch.Tensor:
        return self._buf(ref.handle).view(ref.dtype).as_strided(ref.shape, ref.stride, ref.offset)

    def launch(self, op, args, kwargs, outputs, stream=0):
        from flexnpu.hook.acl._ops import resolve_aten

        def conv(x):
            if isinstance(x, TensorRef):
                return self._view(x)
            if isinstance(x, (list, tuple)):
                return type(x)(conv(v) for v in x)
            return x

        self.launches.append(op)
        try:
            resolve_aten(op)(*conv(args), **{k: conv(v) for k, v in kwargs.items()})
        except Exception as e:  # noqa: BLE001
            self.pending.append(f"{op}: {e}")

    def synchronize(self, stream=None):
        if self.pending:
            msg = self.pending.pop(0)
            self.pending.clear()
            raise LoopbackError(msg)

    def create_stream(self, priority=0): return next(self._streams)
    def destroy_stream(self, stream): pass
    def create_event(self): return next(self._events)
    def record_event(self, ev, stream): pass
    def stream_wait_event(self, stream, ev): pass
    def event_synchronize(self, ev): self.synchronize()
    def event_elapsed_ms(self, a, b): return 0.0
    def destroy_event(self, ev): pass
    def memory_stats(self):
        used = sum(t.numel() for t in self.store.values())
        return {"allocated": used, "peak": used, "limit": self.total, "reserved": used}
    def device_info(self):
        return {"backend": "loopback", "device_type": "cpu", "name": "loopback", "total_memory": self.total}
    def close(self): pass
