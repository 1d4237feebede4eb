"""The emulated accelerator backend: `--backend emu:<spec>` and `emu:<spec>+cpu`.

Every kernel takes, in real time, what the cost model predicts for the named device spec
(910b, 910c, h100, a100; see flexnpu/sched/specs.py), with compute, memory bandwidth and the
link as separate shared resources (flexnpu.sched.emu.EmuDevice). The backend itself only does
the command's data effects; *when* a command completes is decided by the daemon's scheduler
(flexnpu/daemon/scheduling.py), which submits each device command's cost to ``self.emu`` and
posts its completion once ``EmuDevice.advance(time.monotonic())`` reports it. The daemon loop
never sleeps inside a kernel.

Two modes:
- shape-only (`emu:910b`): no values. Allocations are accounted against the client's limit but
  hold no memory (``ShapeOnlyBuffer``), so a 64 GiB device can be emulated on a small host.
  Launches are checked like the torch backend checks them (operator known and allowed, views
  inside their allocations, declared outputs equal to meta-device inference) and bind
  placeholders; device-to-host copies return zeros.
- with values (`emu:910b+cpu`): every data effect runs on the cpu TorchBackend; only the timing
  is emulated (a command completes at its emulated finish, after its cpu execution).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any
from collections.abc import Callable

import torch

from ... import ops
from ...protocol import Launch, TensorRef
from ...sched.costmodel import CostModel
from ...sched.emu import EmuDevice
from ...sched.specs import SPECS, get_spec

_MAX_DIM = 1 << 48
_ZEROS = bytes(1 << 20)


class ShapeOnlyBuffer:
    """Stands for a device allocation in shape-only mode: a size and nothing else."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1


class EmuStream:
    """A device stream of the emulated device; its priority becomes an EmuDevice weight, its
    core share (``EmuBackend.set_partition``) the compute cap of the kernels submitted next."""

    __slots__ = ("priority", "share")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.share: float | None = None


# ------------------------------------------------------------------ shape-only launch checks


def _view_end(ref: TensorRef) -> int:
    """Bytes a view reaches into its allocation (0 for an empty view); raises on bad geometry."""
    if not isinstance(ref.dtype, torch.dtype):
        raise ValueError(f"handle {ref.handle}: dtype must be a torch dtype")
    if len(ref.shape) != len(ref.stride):
        raise ValueError(f"handle {ref.handle}: shape {ref.shape} and stride {ref.stride} differ in rank")
    if not 0 <= ref.offset <= _MAX_DIM:
        raise ValueError(f"handle {ref.handle}: storage offset {ref.offset} out of range")
    last, empty = ref.offset, False
    for size, st in zip(ref.shape, ref.stride):
        if not (0 <= size <= _MAX_DIM and 0 <= st <= _MAX_DIM):
            raise ValueError(f"handle {ref.handle}: size {size} / stride {st} out of range")
        empty = empty or size == 0
        last += (size - 1) * st if size > 1 else 0
    return ref.offset * ref.dtype.itemsize if empty else (last + 1) * ref.dtype.itemsize


def _resolve_op(name: str) -> Any:
    # Shape-only: nothing executes, so random operators are fine (values=False); the rest of the
    # allow list is the torch backends' (flexnpu.ops), so emu accepts exactly what they accept.
    return ops.resolve(name, values=False)[0]


def _to_meta(x: Any, depth: int = 0) -> Any:
    if isinstance(x, TensorRef):
        base = torch.empty(0, dtype=x.dtype, device="meta")
        return base.as_strided(x.shape, x.stride, x.offset)
    if isinstance(x, (list, tuple)):
        if depth > 4:
            raise ValueError("argument nesting too deep")
        out = [_to_meta(v, depth + 1) for v in x]
        return out if isinstance(x, list) else tuple(out)
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


def _key(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_key(v) for v in x)
    if isinstance(x, TensorRef):
        return ("T", x.dtype, x.shape, x.stride, x.offset)
    if isinstance(x, dict):
        return tuple(sorted((k, _key(v)) for k, v in x.items()))
    return (type(x).__name__, x)


class _MetaOutputs:
    """(dtype, shape) of what an aten op returns, by meta-device inference, cached."""

    MAX = 8192

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def __call__(
        self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[torch.dtype, tuple[int, ...], int], ...]:
        key = (op, _key(args), _key(kwargs))
        hit: tuple[tuple[torch.dtype, tuple[int, ...], int], ...] | Exception | None = self._cache.get(key)
        if hit is None:
            try:
                r = _resolve_op(op)(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
                flat: list[tuple[torch.dtype, tuple[int, ...], int]] = []
                stack: list[Any] = [r]
                while stack:
                    v = stack.pop(0)
                    if isinstance(v, torch.Tensor):
                        flat.append((v.dtype, tuple(v.shape), _meta_extent(v)))
                    elif isinstance(v, (list, tuple)):
                        stack[0:0] = list(v)
                hit = tuple(flat)
            except Exception as e:  # noqa: BLE001 - any failure means the launch is malformed
                first = str(e).splitlines()[0] if str(e) else ""
                hit = ValueError(
                    f"{op}: cannot infer the outputs of this launch ({type(e).__name__}: {first})"
                )
            with self._lock:
                if len(self._cache) >= self.MAX:
                    self._cache.clear()
                self._cache[key] = hit
        if isinstance(hit, Exception):
            raise ValueError(str(hit))
        return hit


def _meta_extent(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
    return (last + 1) * t.dtype.itemsize


# ------------------------------------------------------------------ the backend


class EmuBackend:
    """Backend interface of TorchBackend; timing lives in ``self.emu`` (driven by the scheduler)."""

    device_type = "emu"
    partition_capable = True  # flexnpu.daemon.backends.partition.Partitionable
    partition_levels = 0  # any share: the emulator's cap is continuous
    # every kernel's time comes from self.emu, so a graph must replay command by command
    supports_compiled_graphs = False

    def __init__(self, spec_name: str, values: bool = False, index: int = 0) -> None:
        self.spec = get_spec(spec_name, measure_cpu=False)
        if self.spec.name not in SPECS:
            raise ValueError(f"emu needs an accelerator spec ({', '.join(sorted(SPECS))}), not {spec_name!r}")
        self.values = values
        self.name = f"emu:{self.spec.name}" + ("+cpu" if values else "")
        self.model = CostModel(self.spec)  # ground truth of the emulation: uncorrected
        self.emu = EmuDevice(self.model, now=time.monotonic())
        self.index = index
        self._cpu = None
        if values:
            from .torch_backend import TorchBackend

            self._cpu = TorchBackend("cpu")
        self.device = torch.device("cpu") if values else torch.device("meta")
        self._meta = _MetaOutputs()

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device_type": "emu",
            "name": f"emulated {self.spec.name}",
            "spec": self.spec.name,
            "emulated": True,
            "values": self.values,
            "total_memory": int(self.spec.mem_bytes),
            "torch": torch.__version__,
            # values live in the cpu backend (zeroed on allocation); shape-only holds no data
            "scrub": "allocate" if self._cpu else "no data",
        }

    def set_partition(self, shares: Any) -> None:
        """Core share per EmuStream: the compute cap of its kernels submitted from now on."""
        from ...sched.emu import check_share

        for stream, share in shares.items():
            if isinstance(stream, EmuStream):
                stream.share = check_share(share)

    # -- memory ------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Any:
        return self._cpu.alloc(nbytes) if self._cpu else ShapeOnlyBuffer(nbytes)

    def memset(self, buf: Any, offset: int, value: int, nbytes: int) -> None:
        if self._cpu:
            self._cpu.memset(buf, offset, value, nbytes)

    def h2d(self, buf: Any, offset: int, src: Any) -> None:
        if self._cpu:
            self._cpu.h2d(buf, offset, src)

    def d2h(self, buf: Any, offset: int, nbytes: int, dst: Any) -> None:
        if self._cpu:
            self._cpu.d2h(buf, offset, nbytes, dst)
            return
        mv = memoryview(dst).cast("B")
        for pos in range(0, nbytes, len(_ZEROS)):  # no values: the host sees zeros
            n = min(len(_ZEROS), nbytes - pos)
            mv[pos : pos + n] = _ZEROS[:n]

    def d2d(self, dst: Any, dst_off: int, src: Any, src_off: int, nbytes: int) -> None:
        if self._cpu:
            self._cpu.d2d(dst, dst_off, src, src_off, nbytes)

    # -- operators ---------------------------------------------------------------------------
    def launch(
        self, launch: Launch, resolve: Callable[[int], Any], allocate: Callable[[int], Any]
    ) -> list[tuple[int, Any]]:
        if self._cpu:
            return self._cpu.launch(launch, resolve, allocate)
        for ref in ops.tensor_refs(launch.args, launch.kwargs):
            buf = resolve(ref.handle)
            end = _view_end(ref)
            if end > buf.nbytes:
                raise ValueError(
                    f"{launch.op}: handle {ref.handle}: view {ref.dtype} shape {ref.shape} "
                    f"stride {ref.stride} offset {ref.offset} reaches byte {end}, beyond the "
                    f"allocation of {buf.nbytes} bytes"
                )
        expected = self._meta(launch.op, tuple(launch.args), dict(launch.kwargs))
        outs = launch.outputs
        if outs and len(outs) != len(expected):
            raise ValueError(
                f"{launch.op}: {len(outs)} outputs declared, the op returns {len(expected)} tensors"
            )
        bound = []
        for i, ((nbytes, ref), (dtype, shape, need)) in enumerate(zip(outs, expected)):
            if ref.dtype != dtype or tuple(ref.shape) != shape:
                raise ValueError(
                    f"{launch.op}: output {i} declared {ref.dtype} {tuple(ref.shape)} but the op "
                    f"returns {dtype} {shape}"
                )
            if _view_end(ref) > nbytes or need > nbytes:
                raise ValueError(
                    f"{launch.op}: output {i} declared with {nbytes} bytes but the op's result "
                    f"{dtype} {shape} takes {max(need, _view_end(ref))} bytes"
                )
            if any(sz > 1 and st == 0 for sz, st in zip(ref.shape, ref.stride)):
                raise ValueError(
                    f"{launch.op}: output {i} declared with a zero stride: outputs must not "
                    "overlap themselves"
                )
            bound.append((ref.handle, ShapeOnlyBuffer(nbytes)))
        return bound

    def op_allowed(self, op: str) -> bool:
        if self._cpu:
            return self._cpu.op_allowed(op)
        # Nothing executes in shape-only mode, so ops the torch backend refuses because they
        # would draw from the daemon's random generator (SDPA carries a dropout argument) are
        # fine here; everything else follows the same allow list (flexnpu.ops).
        return ops.is_allowed(op, values=False)

    # -- streams and events ------------------------------------------------------------------
    def new_stream(self, priority: int = 0) -> EmuStream:
        return EmuStream(priority)

    def stream_context(self, stream: Any) -> Any:
        return contextlib.nullcontext()

    def sync_stream(self, stream: Any) -> None:
        pass  # the scheduler runs a stream's later commands only after its kernels completed

    def synchronize(self) -> None:
        pass

    def record_event(self, stream: Any) -> Any:
        return (None, time.perf_counter_ns())

    def event_done(self, token: Any) -> bool:
        return True

    def event_sync(self, token: Any) -> None:
        pass

    def wait_event(self, stream: Any, token: Any) -> None:
        pass

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float((end[1] - start[1]) / 1e6)


def make_emu_backend(spec: str, index: int = 0) -> EmuBackend:
    """`emu:<spec>` (shape-only) or `emu:<spec>+cpu` (values on the cpu backend)."""
    _, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(
            f"--backend emu needs a device spec, e.g. emu:910b (choose from "
            f"{', '.join(sorted(SPECS))}; add +cpu for values)"
        )
    name, plus, extra = rest.partition("+")
    if plus and extra != "cpu":
        raise ValueError(f"emu backend: only '+cpu' may follow the spec, not '+{extra}'")
    return EmuBackend(name, values=bool(plus), index=index)
