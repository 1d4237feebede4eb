"""`torch_npu` under `flexnpu run`: the npu device is FlexNPU's (this shim is on PYTHONPATH only
there; without FlexNPU the real torch_npu package is imported as usual).

Besides registering the device it offers torch_npu's fused operators that Ascend model code and
libraries call (``flexnpu.hook.torch_npu_ops``; table in docs/torch_npu_ops.md), built from aten
ops so they run through the daemon like everything else. Any other ``torch_npu.npu_*`` raises an
AttributeError that names it (so ``hasattr`` feature checks still fall back cleanly).
"""

from __future__ import annotations

import torch

from flexnpu.hook import install_torch_device
from flexnpu.hook import torch_npu_ops as _ops
from flexnpu.hook.torch_npu_ops import *  # noqa: F401,F403

install_torch_device()

npu = torch.npu
__version__ = "flexnpu-shim"
FLEXNPU = True


def __getattr__(name: str):
    if name.startswith("npu_") or name.startswith("_npu_"):
        raise AttributeError(
            f"torch_npu.{name} is not provided under FlexNPU: its torch_npu imitation implements "
            f"{', '.join(_ops.__all__)} (see docs/torch_npu_ops.md); use plain torch ops instead, "
            f"or ask for {name} to be added"
        )
    raise AttributeError(f"module 'torch_npu' has no attribute {name!r}")
