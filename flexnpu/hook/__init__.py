"""FlexNPU hook: the app-side front-ends (torch ``npu`` device; pyACL ``acl`` module elsewhere).

``install()`` is what the ``flexnpu run`` bootstrap (``bootstrap/sitecustomize.py``) calls before
user code runs. It is idempotent and cheap: it only puts a finder on ``sys.meta_path`` that waits
for ``import torch``; the npu device is registered right after torch finishes importing, so
programs that never import torch never pay for it. ``install_torch_device()`` registers the
device immediately (tests, the ``torch_npu`` shim).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Any

__all__ = ["install", "install_torch_device", "is_torch_device_installed"]

_lock = threading.RLock()
_state: dict[str, Any] = {"installed": False, "torch": False, "lib": None}


def is_torch_device_installed() -> bool:
    return bool(_state["torch"])


def install_torch_device() -> None:
    """Register ``npu`` (PrivateUse1 renamed), its kernels and the ``torch.npu`` module. Idempotent."""
    with _lock:
        if _state["torch"]:
            return
        import torch
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        from flexnpu.hook import npu_module, tensor

        name = torch._C._get_privateuse1_backend_name()
        if name not in ("privateuseone", "npu"):
            raise RuntimeError(f"cannot install the FlexNPU npu device: PrivateUse1 is already '{name}'")

        class _Hooks(torch._C._acc.PrivateUse1Hooks):
            def is_available(self) -> bool:
                return True

            def has_primary_context(self, dev_id) -> bool:
                return True

            def is_built(self) -> bool:
                return True

        _setup_privateuseone_for_python_backend("npu", backend_module=npu_module, hook=_Hooks())
        from flexnpu.hook import autocast, pinned, serialization

        lib = torch.library.Library("_", "IMPL")
        lib.fallback(tensor.backend_fallback, "PrivateUse1")
        # Explicit kernels for ops that torch's C++ calls with the Python key excluded (tensor
        # constructors with device=, advanced indexing): the boxed Python fallback is not reliable
        # there, a registered kernel is.
        alib = torch.library.Library("aten", "IMPL")
        for name in tensor.EXPLICIT_KERNELS:
            alib.impl(name, tensor.kernel_for(name), "PrivateUse1")
        # scaled_dot_product_attention reaches the daemon whole when nothing needs its gradient
        # (one launch, and the backend's fused kernel, instead of ~10 launches of the math form).
        alib.impl("scaled_dot_product_attention", tensor.sdpa_autograd_kernel, "AutogradPrivateUse1")
        # linear likewise (one dispatch and one launch instead of a transpose, views and addmm)
        alib.impl("linear", tensor.linear_autograd_kernel, "AutogradPrivateUse1")
        autocast.register(lib, alib)
        pinned.install(alib)
        _state["lib"] = (lib, alib)  # registrations live as long as these objects
        sys.modules["torch.npu"] = npu_module
        serialization.install()
        _state["torch"] = True
        try:
            from flexnpu.hook import distributed

            distributed.register()  # torch.distributed backend "hccl" / "npu:hccl"
        except Exception as e:  # noqa: BLE001 - torch built without distributed: no collectives
            sys.stderr.write(f"flexnpu: the hccl torch.distributed backend is not available: {e}\n")


class _TorchImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps torch's loader so the device is installed once torch is loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfter(spec.loader)
                return spec
        return None


class _InstallAfter(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            install_torch_device()
        except Exception as e:  # noqa: BLE001 - never break `import torch` itself
            sys.stderr.write(f"flexnpu: the npu torch device could not be installed: {e}\n")

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.inner, name)


def install() -> None:
    """Arrange for the npu device to appear when torch is imported (or now, if it already is)."""
    with _lock:
        if _state["installed"]:
            return
        _state["installed"] = True
        if "torch" in sys.modules and hasattr(sys.modules["torch"], "Tensor"):
            install_torch_device()
        else:
            sys.meta_path.insert(0, _TorchImportWatcher())
