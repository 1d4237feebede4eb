"""Install the real torch_npu for FlexNPU's native front end, into an isolated folder.

    flexnpu install-torch-npu            # idempotent: does nothing when already installed
    flexnpu install-torch-npu --force    # reinstall

It runs `pip install --no-deps --target <folder> torch-npu==2.13.0`. The folder (default
$XDG_DATA_HOME/flexnpu/torch_npu-2.13.0, i.e. ~/.local/share/...; FLEXNPU_TORCH_NPU_DIR
overrides) is never the Python environment itself: torch auto-loads an installed torch_npu on
every `import torch`, which fails on a machine without CANN. Only `flexnpu run --interpose
native` puts the folder on the program's path, together with FlexNPU's AscendCL libraries.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    p.add_argument("--target", type=Path, default=None, help="folder (default: see above)")
    p.add_argument("--check", action="store_true", help="only report whether it is installed (exit 0/1)")


def run(args: argparse.Namespace) -> int:
    from .hook import native

    target = args.target or native.torch_npu_dir()
    if args.check:
        ok = native.torch_npu_installed(target)
        print(
            f"torch_npu {native.TORCH_NPU_VERSION} {'is' if ok else 'is not'} installed for FlexNPU in {target}"
        )
        return 0 if ok else 1
    if native.torch_npu_installed(target) and not args.force:
        print(f"torch_npu {native.TORCH_NPU_VERSION} already installed for FlexNPU in {target}")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    # Into a fresh folder first, then renamed: an interrupted install never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".torch_npu-", dir=target.parent))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(tmp),
        f"torch-npu=={native.TORCH_NPU_VERSION}",
    ]
    print("flexnpu: " + " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc != 0 or not native.torch_npu_installed(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"flexnpu install-torch-npu: pip failed (exit {rc}); is the package index reachable? The native "
            f"front end still serves plain AscendCL programs without it.",
            file=sys.stderr,
        )
        return rc or 1
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(
        f"flexnpu: torch_npu {native.TORCH_NPU_VERSION} installed for FlexNPU in {target}; use it with "
        f"`flexnpu run --interpose native -- python app.py`"
    )
    return 0
