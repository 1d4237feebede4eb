"""One backend for every torch device type: cpu here, cuda on GPUs, npu with torch_npu.

Device memory is a flat uint8 tensor per allocation; tensors are views built on demand. The
code path is the same for all three device types; only stream/event objects and
synchronization differ, and those come from torch's device-generic interfaces.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from typing import Any, cast
from collections.abc import Callable

import torch

from ...protocol import Launch

# Host data handed to h2d may be read-only (bytes copied out of a ring payload); torch only reads it.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


# Launch names of the native front end's operator APIs (flexnpu/daemon/optable)
_ASCEND_PREFIXES = ("aclnn::", "aclop::")
_optable_mod: Any = None


def _optable() -> Any:
    """The operator table, imported on first use (a function-level import costs the import
    machinery on every call: measured 6% of a native client's daemon time when it sat in
    op_allowed)."""
    global _optable_mod
    if _optable_mod is None:
        from .. import optable

        _optable_mod = optable
    return _optable_mod


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


def cpu_threads() -> int:
    """Intra-op threads of the cpu backend: $FLEXNPU_CPU_THREADS, else $OMP_NUM_THREADS's choice,
    else one core fewer than torch would take. Every client spins on a core while it issues
    work; OpenMP workers that busy-wait between the many small operators of eager decoding on
    all cores fight them for it (2 cores: 1 thread ran HF generate 2-3x faster than 2)."""
    raw = os.environ.get("FLEXNPU_CPU_THREADS", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"FLEXNPU_CPU_THREADS={raw!r}: expected a number of threads") from None
        if n < 1:
            raise ValueError(f"FLEXNPU_CPU_THREADS={raw!r}: expected at least 1")
        return n
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() - 1)


class TorchBackend:
    """Executes the daemon's commands on one torch device."""

    supports_compiled_graphs = True  # launches are plain aten calls on this device's tensors
    emu = None  # a real device: no emulated clock for the scheduler to drive

    def __init__(self, device_type: str = "cpu", index: int = 0) -> None:
        if device_type == "npu":
            import torch_npu  # noqa: F401
        if device_type not in ("cpu", "cuda", "npu"):
            raise ValueError(f"unknown backend device type {device_type!r}")
        self.device_type = device_type
        self.name = device_type
        self.device = torch.device(device_type, index) if device_type != "cpu" else torch.device("cpu")
        # torch.cuda / torch.npu (the latter registered at run time by torch_npu); None on cpu
        self._mod: Any = getattr(torch, device_type, None) if device_type != "cpu" else None
        if device_type == "cpu":
            torch.set_num_threads(cpu_threads())
        if self._mod is not None:
            if index >= self._mod.device_count():
                raise ValueError(f"{device_type}:{index} does not exist ({self._mod.device_count()} present)")
            self._mod.set_device(index)
        # The exec module belongs to the hook side's contract (aten launches); imported lazily so
        # the daemon starts even if a client never launches.
        self._exec: Any = None  # the torch_exec module once imported
        self.plans: dict[bytes, Any] = {}  # launch structure (protocol.split_launch) -> plan
        # structures without sizes -> plan: the native front end's (protocol.split_launch_dims)
        # and the Python front end's aten launches (launch_split mode 3, torch_exec.SizedLaunchPlan)
        self.sized_plans: dict[bytes, Any] = {}
        # Core partitions (flexnpu.daemon.backends.partition): the capability is probed here.
        self.partition_capable = False
        self.partition_levels = 0
        self.partition_error: str | None = None
        self._eff: dict[int, Any] = {}  # id(client device stream) -> stream its work runs on now
        self._green: dict[int, Any] = {}  # cuda: share level -> (green context, its stream)
        self._npu_cores: tuple[int, int] | None = None
        if device_type == "cuda":
            self._probe_green_contexts(index)
        elif device_type == "npu":
            self._probe_stream_limit()

    # -- core partitions ---------------------------------------------------------------------
    GREEN_LEVELS = 8  # cuda: green contexts at 1/8 .. 7/8 of the SMs (the flex policy's share grid)

    def _probe_green_contexts(self, index: int) -> None:
        try:
            from torch.cuda import green_contexts as gc

            if not gc.SUPPORTED:
                raise RuntimeError("this torch build has no green-context support")
            sms = int(self._mod.get_device_properties(self.device).multi_processor_count)
            self._sms = sms
            for lvl in range(1, self.GREEN_LEVELS):
                n = max(1, round(sms * lvl / self.GREEN_LEVELS))
                # torch annotates create() as returning its base class (object without cuda)
                ctx = cast(gc.GreenContext, gc.GreenContext.create(num_sms=n, device_id=index))
                self._green[lvl] = (ctx, ctx.Stream(), n)
            self.partition_capable, self.partition_levels = True, self.GREEN_LEVELS - 1
        except Exception as e:  # noqa: BLE001 - old driver (< 12.8), MIG, or torch without it
            self.partition_error = f"green contexts unavailable: {type(e).__name__}: {e}"
            self._green.clear()

    def _probe_stream_limit(self) -> None:
        try:
            probe = self._mod.Stream(device=self.device)
            lim = self._mod.get_stream_limit(probe)  # hardware defaults: all cores
            cube = int(lim.get("cube_core_num", lim.get("cube_num", 0)))
            vec = int(lim.get("vector_core_num", lim.get("vector_num", 0)))
            if cube <= 0 or vec <= 0:
                raise RuntimeError(f"unexpected get_stream_limit result {lim!r}")
            self._npu_cores = (cube, vec)
            self.partition_capable, self.partition_levels = True, cube
        except Exception as e:  # noqa: BLE001 - torch_npu without the API, or not Atlas A2/A3
            self.partition_error = f"set_stream_limit unavailable: {type(e).__name__}: {e}"

    def set_partition(self, shares: Any) -> None:
        """Core share per client device stream, for its operators launched from now on."""
        from .partition import cores_for

        if not self.partition_capable:
            return
        for stream, share in shares.items():
            if stream is None:
                continue
            if self.device_type == "npu":
                cube, vec = self._npu_cores  # type: ignore[misc]
                c, v = cores_for(share, cube), cores_for(share, vec)
                if c is None:
                    self._mod.reset_stream_limit(stream)
                else:
                    self._mod.set_stream_limit(stream, c, v)
                continue
            # cuda: move the stream's later work to the green context of its level, ordered
            # after everything it already queued (event record + wait: the cost of a change)
            lvl = (
                None
                if share is None or share >= 1.0
                else min(self.GREEN_LEVELS - 1, max(1, round(share * self.GREEN_LEVELS)))
            )
            target = stream if lvl is None else self._green[lvl][1]
            cur = self._eff.get(id(stream), stream)
            if target is cur:
                continue
            ev = self._mod.Event()
            ev.record(cur)
            target.wait_event(ev)
            if lvl is None:
                self._eff.pop(id(stream), None)
            else:
                self._eff[id(stream)] = target

    def _on(self, stream: Any) -> Any:
        """The stream a client stream's work currently runs on (itself unless partitioned)."""
        return self._eff.get(id(stream), stream) if self._eff else stream

    # -- description -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        # "scrub": when memory that may have held another client's data is cleared (see alloc)
        d: dict[str, Any] = {
            "backend": self.name,
            "device_type": self.device_type,
            "torch": torch.__version__,
            "scrub": "allocate",
        }
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
        """Zeroed device memory: a block may have held another client's data (or the daemon's
        own heap), so it is scrubbed when it changes owner, i.e. on allocation (docs/security.md
        says why on allocation rather than on free)."""
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        if self._mod is not None and self._mod.current_stream(self.device) == self._mod.default_stream(
            self.device
        ):
            # Outside a client stream (malloc): the memset must be done before any client stream
            # touches the block. Launch outputs are allocated on their stream, already in order.
            self._mod.current_stream(self.device).synchronize()
        return buf

    def memset(self, buf: torch.Tensor, offset: int, value: int, nbytes: int) -> None:
        buf[offset : offset + nbytes].fill_(value & 0xFF)

    def h2d(self, buf: torch.Tensor, offset: int, src: Any) -> None:
        host = torch.frombuffer(src, dtype=torch.uint8) if len(src) else torch.empty(0, dtype=torch.uint8)
        buf[offset : offset + host.numel()].copy_(host, non_blocking=False)

    def d2h(self, buf: torch.Tensor, offset: int, nbytes: int, dst: Any) -> None:
        if nbytes:
            torch.frombuffer(dst, dtype=torch.uint8).copy_(buf[offset : offset + nbytes])

    def d2d(self, dst: torch.Tensor, dst_off: int, src: torch.Tensor, src_off: int, nbytes: int) -> None:
        dst[dst_off : dst_off + nbytes].copy_(src[src_off : src_off + nbytes])

    # -- operators ---------------------------------------------------------------------------
    def _torch_exec(self) -> Any:
        """The torch_exec module, imported on first use."""
        if self._exec is None:
            from . import torch_exec

            self._exec = torch_exec
            # run_plan below without its own frame (the hot path of eager decoding); the
            # method stays for a backend whose torch_exec was never needed
            self.run_plan = functools.partial(torch_exec.run_plan, self.device)  # type: ignore[method-assign]
        return self._exec

    def launch(
        self, launch: Launch, resolve: Callable[[int], torch.Tensor], allocate: Callable[[int], torch.Tensor]
    ) -> list[tuple[int, torch.Tensor]]:
        if launch.op.startswith(_ASCEND_PREFIXES):
            # an operator of the native front end: the Ascend operator table (no fresh outputs)
            _optable().execute(self.device, launch.op, launch.args, launch.kwargs, launch.outputs, resolve)
            return []
        bound: list[tuple[int, torch.Tensor]] = self._torch_exec().execute_launch(
            self.device, launch.op, launch.args, launch.kwargs, launch.outputs, resolve, allocate
        )
        return bound

    # Launch plans (torch_exec.make_plan): the daemon keeps them per structure in `plans`.
    PLAN_CACHE_MAX = 4096

    def make_plan(self, launch: Launch) -> Any:
        """A reusable, validated plan of `launch` (None: run it the generic way, always)."""
        if launch.op.startswith(_ASCEND_PREFIXES):
            # the native front end's operators: their structure leaves out tensor offsets
            # (protocol.split_launch_offsets), which each launch brings to run_table_plan
            return _optable().make_plan(
                self.device, launch.op, launch.args, launch.kwargs, launch.outputs, launch.values
            )
        return self._torch_exec().make_plan(self.device, launch)

    def make_sized_plan(self, launch: Launch) -> Any:
        """A plan of `launch`'s structure without tensor sizes (None: it has none)."""
        if not launch.op.startswith(_ASCEND_PREFIXES):
            return self._torch_exec().make_sized_plan(self.device, launch)
        return _optable().make_plan(
            self.device, launch.op, launch.args, launch.kwargs, launch.outputs, launch.values, sized=True
        )

    def run_table_plan(self, plan: Any, bufs: Any, handles: Any, offsets: Any, dims: Any = None) -> None:
        if dims is None:
            plan.run(bufs, handles, offsets)
        else:
            plan.run_sized(bufs, handles, offsets, dims)

    def prepare_sized_plan(
        self, plan: Any, handles: Any, offsets: Any, dims: Any, out_nbytes: Any
    ) -> tuple[Any, Any] | None:
        prepared: tuple[Any, Any] | None = self._exec.prepare_sized_plan(
            plan, handles, offsets, dims, out_nbytes
        )
        return prepared

    def run_sized_plan(
        self,
        plan: Any,
        bufs: Any,
        prepared: tuple[Any, Any],
        allocate: Callable[[int], torch.Tensor],
        hints: Any = None,
    ) -> tuple[list[tuple[torch.Tensor | None, torch.Tensor]], list[Any]]:
        ran: tuple[list[tuple[torch.Tensor | None, torch.Tensor]], list[Any]] = self._exec.run_sized_plan(
            self.device, plan, bufs, prepared[0], prepared[1], allocate, hints
        )
        return ran

    def run_plan(
        self, plan: Any, bufs: Any, handles: Any, allocate: Callable[[int], torch.Tensor], hints: Any
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        bound: list[tuple[torch.Tensor | None, torch.Tensor]] = self._exec.run_plan(
            self.device, plan, bufs, handles, allocate, hints
        )
        return bound

    def op_allowed(self, op: str) -> bool:
        if op.startswith(_ASCEND_PREFIXES):
            return bool(_optable().is_supported(op))
        return bool(self._torch_exec().is_op_allowed(op))

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
        return self._mod.stream(self._on(stream))

    def sync_stream(self, stream: Any) -> None:
        if stream is not None:
            self._on(stream).synchronize()

    def synchronize(self) -> None:
        if self._mod is not None:
            self._mod.synchronize(self.device)

    def record_event(self, stream: Any) -> Any:
        """A completion marker in stream order: (device event or None, host time)."""
        if self._mod is None:
            return (None, time.perf_counter_ns())
        ev = self._mod.Event(enable_timing=True)
        ev.record(self._on(stream) if stream is not None else stream)
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
            self._on(stream).wait_event(ev)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        (e0, t0), (e1, t1) = start, end
        if e0 is None:
            return float((t1 - t0) / 1e6)
        e1.synchronize()
        return float(e0.elapsed_time(e1))


def make_backend(spec: str, index: int = 0) -> TorchBackend:
    """`auto|cpu|cuda|npu` -> a backend on that device (index = the physical device)."""
    kind = detect(spec)
    return TorchBackend(kind, index if kind != "cpu" else 0)
