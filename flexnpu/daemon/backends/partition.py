"""Core partitioning as a backend capability: ``set_partition({stream: core share})``.

A core share is the fraction of the device's compute units (AI cores, SMs) a stream's
operators may use; None (or 1) lifts the limit. It applies to operators launched after the
call (the hardware cannot move a running kernel's cores), so the daemon calls it at operator
boundaries, before the command it concerns. Memory bandwidth is never partitioned.

Per backend (docs/scheduling.md, "Core partitions on hardware"):
- npu (torch_npu): ``torch.npu.set_stream_limit(stream, cube_num, vector_num)`` (AscendCL
  ``aclrtSetStreamResLimit``, Atlas A2/A3), cube and vector cores scaled by the share; the code
  path is exercised only on Ascend hardware.
- cuda: green contexts (``torch.cuda.green_contexts.GreenContext.create(num_sms=...)``, driver
  >= 12.8), one per share level, each with its own stream; a partitioned client stream's work
  moves to the stream of its level's green context (ordered after its earlier work by an
  event). MPS (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) is the per-process alternative: static,
  set when a process starts, so it fits the static-partition baseline only.
- emu: a hard compute cap per stream (flexnpu/sched/emu.py).
- cpu: no partition (``partition_capable`` False): the flex policy uses ordering only.

The capability is a typed interface plus a run-time flag (a cuda backend on a driver without
green contexts has the method but not the capability), never a class-name check.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable
from collections.abc import Mapping


@runtime_checkable
class Partitionable(Protocol):
    partition_capable: bool  # the mechanism works here (checked when the backend starts)
    partition_levels: int  # distinct shares the hardware offers (cores, SMs, share grid)

    def set_partition(self, shares: Mapping[Any, float | None]) -> None:
        """Core share per device stream, for its operators launched from now on."""


def partition_capable(backend: Any) -> bool:
    return isinstance(backend, Partitionable) and bool(backend.partition_capable)


def cores_for(share: float | None, total: int) -> int | None:
    """Whole units for a share (at least one), None for no limit."""
    if share is None or share >= 1.0:
        return None
    if not 0.0 < share < 1.0:
        raise ValueError(f"core share must be in (0, 1], not {share}")
    return max(1, min(total, round(share * total)))
