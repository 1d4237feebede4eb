"""TensorRef: a tensor argument on the wire (a view of a daemon-side allocation).

The canonical definition lives in ``flexnpu.protocol`` (owned by the wire-protocol code). This
module re-exports it so hook and backend share one class for ``isinstance`` checks; the local
definition is only used in a checkout where ``flexnpu.protocol`` does not exist yet, and has the
same fields and semantics.
"""
from __future__ import annotations

try:  # pragma: no cover - depends on the checkout
    from flexnpu.protocol import TensorRef  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    from dataclasses import dataclass

    import torch

    @dataclass(frozen=True, slots=True)
    class TensorRef:  # type: ignore[no-redef]
        handle: int
        dtype: torch.dtype
        shape: tuple[int, ...]
        stride: tuple[int, ...]
        offset: int

__all__ = ["TensorRef"]
