"""The native front end: AscendCL-named shared libraries (C, src/) that forward the AscendCL
runtime API over the same rings as the Python client, so the real torch_npu and plain AscendCL
C programs run through FlexNPU unmodified. See docs/native.md.

This module only answers where things are; build.py compiles the libraries and
install_torch_npu.py fetches the real torch_npu wheel into its isolated folder.
"""

from __future__ import annotations

import os
from pathlib import Path

TORCH_NPU_VERSION = "2.13.0"
# The aclnn operators run (docs/native_ops.md), but not yet everything a program may use (the
# aclop fallback path, random operators, data-dependent shapes): until they do, `flexnpu run
# --interpose auto` keeps Python programs on the Python front end, which runs them all.
RUNS_OPERATORS = False
HERE = Path(__file__).resolve().parent

# Every library the real torch_npu links or dlopens by name. libascendcl.so holds the whole
# implementation (C programs link -lascendcl and the linker resolves only direct dependencies);
# the others are thin shells depending on it, so a dlsym on any of them finds every symbol.
CORE_LIB = "libascendcl.so"
SHELL_LIBS = (
    "libacl_op_compiler.so",
    "libhccl.so",
    "libhcomm.so",  # HcclGroupStart/End (torch_npu looks them up there)
    "libge_runner.so",
    "libgraph.so",
    "libacl_tdt_channel.so",
    "libopapi.so",
    "libruntime.so",
    "libatb.so",
)


def lib_dir() -> Path:
    """Where the built libraries live (FLEXNPU_NATIVE_LIB_DIR overrides; default in-tree, gitignored)."""
    env = os.environ.get("FLEXNPU_NATIVE_LIB_DIR")
    return Path(env) if env else HERE / "_lib"


def is_built(d: Path | None = None) -> bool:
    d = d or lib_dir()
    return all((d / n).exists() for n in (CORE_LIB,) + SHELL_LIBS)


def torch_npu_dir() -> Path:
    """The isolated folder holding the real torch_npu (never the main environment: installed
    there it makes `import torch` fail on a machine without CANN). FLEXNPU_TORCH_NPU_DIR
    overrides; default $XDG_DATA_HOME/flexnpu/torch_npu-<version> (~/.local/share/...)."""
    env = os.environ.get("FLEXNPU_TORCH_NPU_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "flexnpu" / f"torch_npu-{TORCH_NPU_VERSION}"


def torch_npu_installed(d: Path | None = None) -> bool:
    d = d or torch_npu_dir()
    return (d / "torch_npu" / "lib" / "libtorch_npu.so").exists()


def wheel_include_dir(d: Path | None = None) -> Path:
    """The AscendCL headers the wheel ships (acl/acl.h, ...)."""
    return (d or torch_npu_dir()) / "torch_npu" / "include"
