"""`torch_npu` under `flexnpu run`: the npu device is FlexNPU's (this shim is on PYTHONPATH only
there; without FlexNPU the real torch_npu package is imported as usual)."""
import torch

from flexnpu.hook import install_torch_device

install_torch_device()

npu = torch.npu
__version__ = "flexnpu-shim"
FLEXNPU = True
