"""Device backends. `make_backend(spec, index)` turns a --backend value into one."""
from __future__ import annotations

from typing import Any


def make_backend(spec: str, index: int = 0) -> Any:
    if spec.startswith("emu"):
        from .emu import make_emu_backend  # the emulated accelerator (scheduler issue)

        return make_emu_backend(spec, index)
    from .torch_backend import make_backend as make_torch

    return make_torch(spec, index)
