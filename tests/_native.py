"""Helpers for the native front end's tests: build the libraries, compile AscendCL C programs
against the CANN headers of the real torch_npu wheel (skipping with a reason when absent)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env

HERE = Path(__file__).resolve().parent
FLEXNPU = [sys.executable, "-m", "flexnpu"]


def native_libs() -> Path:
    from flexnpu.hook.native.build import build

    if not shutil.which("cc"):
        pytest.skip("no C compiler (cc): the native front end cannot be built")
    return build(quiet=True)


def wheel_headers() -> Path:
    from flexnpu.hook import native

    inc = native.wheel_include_dir()
    if not (inc / "acl" / "acl.h").exists():
        pytest.skip(
            f"the real torch_npu (with its AscendCL headers) is not installed for FlexNPU in "
            f"{native.torch_npu_dir()}: run `flexnpu install-torch-npu`"
        )
    return inc


def compile_program(src: str, out: Path, extra: list[str] | None = None, libs: Path | None = None) -> Path:
    libs = libs or native_libs()
    inc = wheel_headers()
    cmd = [
        "cc",
        "-O1",
        "-Wall",
        f"-I{inc}",
        "-o",
        str(out),
        str(HERE / "native" / src),
        f"-L{libs}",
        "-lascendcl",
        "-lacl_op_compiler",
        f"-Wl,-rpath,{libs}",
        "-pthread",
        *(extra or []),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


def run_env(runtime_dir: Path | None = None) -> dict[str, str]:
    return child_env(runtime_dir)


def flexnpu_run_cmd(runtime_dir: Path, *args: str) -> list[str]:
    return FLEXNPU + ["run", "--daemon", str(runtime_dir), *args]


__all__ = ["ROOT", "compile_program", "native_libs", "wheel_headers", "run_env", "flexnpu_run_cmd", "FLEXNPU"]


def run_flexnpu(runtime_dir: Path, *args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    """`flexnpu run <args>` against the daemons of runtime_dir, output captured as text."""
    return subprocess.run(
        flexnpu_run_cmd(runtime_dir, *args),
        env=run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


def spawn_flexnpu(runtime_dir: Path, *args: str) -> subprocess.Popen:
    """`flexnpu run <args>` started in the background, stdin/stdout/stderr piped as text: for
    programs a test talks to while they run."""
    return subprocess.Popen(
        flexnpu_run_cmd(runtime_dir, *args),
        env=run_env(runtime_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
