"""One backend for every torch device type: cpu here, cuda on GPUs, npu with torch_npu.

Device memory is a flat uint8 tensor per allocation; tensors are views built on demand. The
code path is the same for all three device types; only stream/event objects and
synchronization differ, and those come from torch's device-generic interfaces.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable

import torch

from ...protocol import Launch

# Host data handed to h2d may be read-only (bytes copied out of a ring payload); torch only reads it.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def detect(requested: str = "auto") -> str:
    """Resolve `auto` to the best device type present: npu (torch_npu) > cuda > cpu."""
    if requested != "auto":
        return requested
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    except Exception:  # torch_npu absent, or present without CANN: fall through
        pass
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


class TorchBackend:
    """Executes the daemon's commands on one torch device."""

    supports_compiled_graphs = True   # launches are plain aten calls on this device's tensors
    emu = None                        # a real device: no emulated clock for the scheduler to drive

    def __init__(self, device_type: str = "cpu", index: int = 0) -> None:
        if device_type == "npu":
            import torch_npu  # noqa: F401
        if device_type not in ("cpu", "cuda", "npu"):
            raise ValueError(f"unknown backend device type {device_type!r}")
        self.device_type = device_type
        self.name = device_type
        self.device = torch.device(device_type, index) if device_type != "cpu" else torch.device("cpu")
        self._mod = getattr(torch, device_type, None) if device_type != "cpu" else None
        if self._mod is not None:
            if index >= self._mod.device_count():
                raise ValueError(f"{device_type}:{index} does not exist ({self._mod.device_count()} present)")
            self._mod.set_device(index)
        # The exec module belongs to the hook side's contract (aten launches); imported lazily so
        # the daemon starts even if a client never launches.
        self._exec = None

    # -- description -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backend": self.name, "device_type": self.device_type,
                             "torch": torch.__version__}
        if self._mod is not None:
            props = self._mod.get_device_properties(self.device)
            d["name"] = getattr(props, "name", self.device_type)
            d["total_memory"] = int(getattr(props, "total_memory", 0))
        else:
            import os

            import psutil

            d["name"] = f"cpu ({os.cpu_count()} cores)"
            d["total_memory"] = int(psutil.virtual_memory().total)
        return d

    def total_memory(self) -> int:
        return int(self.info()["total_memory"])

    # -- memory ------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def memset(self, buf: torch.Tensor, offset: int, value: int, nbytes: int) -> None:
        buf[offset:offset + nbytes].fill_(value & 0xFF)

    def h2d(self, buf: torch.Tensor, offset: int, src: Any) -> None:
        host = torch.frombuffer(src, dtype=torch.uint8) if len(src) else torch.empty(0, dtype=torch.uint8)
        buf[offset:offset + host.numel()].copy_(host, non_blocking=False)

    def d2h(self, buf: torch.Tensor, offset: int, nbytes: int, dst: Any) -> None:
        if nbytes:
            torch.frombuffer(dst, dtype=torch.uint8).copy_(buf[offset:offset + nbytes])

    def d2d(self, dst: torch.Tensor, dst_off: int, src: torch.Tensor, src_off: int, nbytes: int) -> None:
        dst[dst_off:dst_off + nbytes].copy_(src[src_off:src_off + nbytes])

    # -- operators ---------------------------------------------------------------------------
    def launch(self, launch: Launch, resolve: Callable[[int], torch.Tensor],
               allocate: Callable[[int], torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        if self._exec is None:
            from . import torch_exec

            self._exec = torch_exec
        return self._exec.execute_launch(self.device, launch.op, launch.args, launch.kwargs,
                                         launch.outputs, resolve, allocate)

    def op_allowed(self, op: str) -> bool:
        if self._exec is None:
            from . import torch_exec

            self._exec = torch_exec
        return self._exec.is_op_allowed(op)

    # -- streams and events ------------------------------------------------------------------
    def new_stream(self, priority: int = 0) -> Any:
        """A device stream for one client stream (None on cpu, where work runs in order).
        Priority follows torch/CUDA: lower number = higher priority."""
        if self._mod is None:
            return None
        return self._mod.Stream(device=self.device, priority=priority)

    def stream_context(self, stream: Any) -> Any:
        if stream is None or self._mod is None:
            return contextlib.nullcontext()
        return self._mod.stream(stream)

    def sync_stream(self, stream: Any) -> None:
        if stream is not None:
            stream.synchronize()

    def synchronize(self) -> None:
        if self._mod is not None:
            self._mod.synchronize(self.device)

    def record_event(self, stream: Any) -> Any:
        """A completion marker in stream order: (device event or None, host time)."""
        if self._mod is None:
            return (None, time.perf_counter_ns())
        ev = self._mod.Event(enable_timing=True)
        ev.record(stream)
        return (ev, None)

    def event_done(self, token: Any) -> bool:
        ev, _ = token
        return True if ev is None else bool(ev.query())

    def event_sync(self, token: Any) -> None:
        ev, _ = token
        if ev is not None:
            ev.synchronize()

    def wait_event(self, stream: Any, token: Any) -> None:
        ev, _ = token
        if ev is not None and stream is not None:
            stream.wait_event(ev)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        (e0, t0), (e1, t1) = start, end
        if e0 is None:
            return (t1 - t0) / 1e6
        e1.synchronize()
        return float(e0.elapsed_time(e1))


def make_backend(spec: str, index: int = 0) -> TorchBackend:
    """`auto|cpu|cuda|npu` -> a backend on that device (index = the physical device)."""
    kind = detect(spec)
    return TorchBackend(kind, index if kind != "cpu" else 0)
