"""How much work one launch may ask of the device.

The daemon runs one client's operator at a time on a device every client shares, so a single
launch can block them all. Views make that cheap to ask for: a stride-0 view of a 4-byte
allocation can stand for a 250000 x 250000 tensor, and `sum` over it runs for seconds. Each
launch is therefore costed when it arrives (the scheduler's cost model: FLOPs and the bytes of
every tensor as the operator sees it, broadcast views at their full size) and refused past a
ceiling, before it is queued.

Defaults are far above what real models ask of one operator: bytes = 4x the memory all clients
together may hold on the device (a real operator reads and writes tensors that fit in device
memory; only broadcast views inflate past it), FLOPs = 1e6 GFLOP (a whole prefill of a large model
is a few thousand GFLOP per matmul). Both are set by `flexnpu daemon --max-launch-gflop /
--max-launch-bytes` (0 = no ceiling).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgument
from ..protocol import TensorRef
from ..sched.costmodel import normalize_op_name

DEFAULT_MAX_GFLOP = 1e6
DEFAULT_BYTES_PER_DEVICE_BYTE = 4


class LaunchTooLarge(InvalidArgument):
    """A launch whose predicted work exceeds the daemon's per-launch ceiling."""


@dataclass(frozen=True)
class LaunchLimits:
    max_flop: float | None  # None = no ceiling
    max_bytes: float | None

    @classmethod
    def make(cls, max_gflop: float | None, max_bytes: int | None, device_memory: int | None) -> LaunchLimits:
        """Limits from the daemon's flags (None = default, 0 = none) and its device memory."""
        if max_gflop is None:
            max_gflop = DEFAULT_MAX_GFLOP
        if max_bytes is None:
            max_bytes = DEFAULT_BYTES_PER_DEVICE_BYTE * device_memory if device_memory else 0
        return cls(max_gflop * 1e9 if max_gflop else None, float(max_bytes) if max_bytes else None)

    def check(self, cmd: Any) -> None:
        """Raise LaunchTooLarge if the queued launch ``cmd`` asks for more than the ceiling.

        Bytes are counted directly from the launch's tensor references (what the cost model
        counts); the full cost model (whose FLOPs for matrix, attention and convolution
        operators can far exceed their bytes) runs only for those operators or when the bytes
        already come near the FLOP ceiling, so an ordinary launch pays a few microseconds."""
        if self.max_flop is None and self.max_bytes is None:
            return
        launch = cmd.a[0]
        nbytes = _logical_bytes(launch)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise self._too_many_bytes(launch.op, nbytes)
        if self.max_flop is None:
            return
        base = normalize_op_name(launch.op)
        if base not in _COMPUTE_HEAVY and nbytes <= self.max_flop:
            return  # the cost model gives these at most one FLOP per element touched
        from .scheduling import command_cost

        c = command_cost(cmd)  # kept on the command: the scheduler uses the same figure
        if c.flops > self.max_flop:
            raise LaunchTooLarge(
                f"{launch.op}: this launch would take {c.flops / 1e9:.4g} GFLOP, more than "
                f"the daemon allows for one operator ({self.max_flop / 1e9:.4g} GFLOP, "
                "--max-launch-gflop)"
            )
        if self.max_bytes is not None and c.bytes > self.max_bytes:
            raise self._too_many_bytes(launch.op, c.bytes)

    def check_sized(self, op: str, dtypes: Sequence[Any], dims: Sequence[tuple[Sequence[int], Any]]) -> bool:
        """check() for a launch run from a plan without sizes (optable.SizedPlan, never of a
        compute-heavy operator: sized_plan_allowed): its tensors' dtypes and (sizes, strides),
        counted at full logical size as check() counts them. Raises LaunchTooLarge over the
        byte ceiling; False when the FLOP ceiling needs the full check (the launch then takes
        the generic path, which runs it)."""
        if self.max_flop is None and self.max_bytes is None:
            return True
        nbytes = 0
        for dtype, (shape, _) in zip(dtypes, dims):
            n = dtype.itemsize
            for x in shape:
                n *= x
            nbytes += max(0, n)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise self._too_many_bytes(op, nbytes)
        return self.max_flop is None or nbytes <= self.max_flop

    def _too_many_bytes(self, op: str, nbytes: float) -> LaunchTooLarge:
        return LaunchTooLarge(
            f"{op}: this launch would read and write {nbytes:.4g} bytes (its tensors as the "
            f"operator sees them, broadcast views at full size), more than the daemon "
            f"allows for one operator ({self.max_bytes:.4g} bytes, --max-launch-bytes)"
        )


_COMPUTE_HEAVY = frozenset(
    """mm bmm addmm addbmm baddbmm matmul linear addmv mv dot vdot addr outer
_addmm_activation convolution _convolution convolution_backward _scaled_dot_product_flash_attention_for_cpu
_scaled_dot_product_flash_attention_for_cpu_backward _scaled_dot_product_efficient_attention
_scaled_dot_product_efficient_attention_backward _scaled_dot_product_flash_attention
_scaled_dot_product_flash_attention_backward _scaled_dot_product_cudnn_attention
_scaled_dot_product_cudnn_attention_backward _scaled_dot_product_fused_attention_overrideable""".split()
)


def sized_plan_allowed(op: str) -> bool:
    """Whether launches of ``op`` may run from plans without sizes: not the operators whose
    cost the FLOP ceiling reads from their shapes (check_sized counts bytes only)."""
    return normalize_op_name(op) not in _COMPUTE_HEAVY


def _logical_bytes(launch: Any) -> int:
    """Bytes of every tensor of a launch at its full logical size (inputs and declared outputs)."""
    total = 0
    stack: list[Any] = [launch.args, list(launch.kwargs.values()), [r for _, r in launch.outputs]]
    while stack:
        v = stack.pop()
        if isinstance(v, TensorRef):
            try:
                n = v.dtype.itemsize
                for d in v.shape:
                    n *= d
                total += max(0, int(n))
            except (TypeError, AttributeError, ValueError):
                pass  # malformed: the backend's view checks report it
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total
