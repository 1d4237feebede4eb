"""The daemon's compiled executors (one C++ module, built by make install): planned table
launches (optable/planexec.cpp, below) and planned aten launches (backends/atenexec.cpp: the
Python front end's operators, torch_exec.LaunchPlan; the same recording, see that file).

The executor of planned table launches, and how a plan gets one.

A TablePlan whose entry writes its result in place (register_value) runs, per launch, a few
Python steps around one torch call: a view per tensor, the argument dict, the overlap test, the
entry's function. On its first in-place launch the plan records the ATen operators that function
calls (``record``). If it is exactly one, with every tensor argument one of the launch's views,
the plan keeps an ``Exec`` that repeats that call in C++ for its later launches: views at each
launch's offsets, the same overlap test, the operator through the dispatcher. Anything else
(several operators, a tensor the entry made itself, an index check) keeps the Python path, as
does any launch the executor is unsure of: it returns False and never raises for the client's
input (planexec.cpp).

    python3 -m flexnpu.daemon.optable.build            # build (make install does)
    python3 -m flexnpu.daemon.optable.build --force    # rebuild

The build needs a C++ compiler and torch's headers (the installed torch); without them the
daemon runs every launch in Python and says so once in its log. The library is loaded only if
it was built from this source for this torch (a stamp next to it), never compiled on demand:
a daemon never waits for a compiler.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "optable" / "planexec.cpp", HERE / "backends" / "atenexec.cpp")
HEADERS = (HERE / "recording.h",)  # included by both: part of the stamp, not of the command
NAME = "flexnpu_planexec"
log = logging.getLogger("flexnpu.daemon")

# FLEXNPU_PLANEXEC=0 keeps every launch on the Python path (for comparisons and for bisecting)
ENABLED = os.environ.get("FLEXNPU_PLANEXEC", "1") != "0"


def build_dir() -> Path:
    return HERE / "optable" / "_planexec"


def _stamp() -> str:
    h = hashlib.sha256(b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS)))
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()


def _built() -> Path | None:
    d = build_dir()
    try:
        if (d / "stamp").read_text().strip() != _stamp():
            return None
    except OSError:
        return None
    so = list(d.glob(f"{NAME}*.so"))
    return so[0] if len(so) == 1 else None


def state() -> str:
    """What a daemon started now would find: "built" (it loads the executor), "stale" (built
    from other sources), "missing", or "disabled" (FLEXNPU_PLANEXEC=0). Loads nothing."""
    if not ENABLED:
        return "disabled"
    if _built() is not None:
        return "built"
    return "stale" if any(build_dir().glob(f"{NAME}*.so")) else "missing"


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile SOURCES into build_dir() (idempotent unless ``force``): one compiler call
    with torch's include and library paths (no build system needed)."""
    done = _built()
    if done is not None and not force:
        return done
    import sysconfig

    from torch.utils import cpp_extension as ce

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++, or set CXX)")
    d = build_dir()
    tmp = Path(tempfile.mkdtemp(prefix="planexec-"))
    try:
        out = tmp / (NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        # (-DNDEBUG as torch itself is built: its headers check, in debug builds only, state that
        # a release libtorch never sets, e.g. RecordFunction::inputs)
        cmd = [cxx, "-O2", "-DNDEBUG", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]
        cmd += [
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DTORCH_EXTENSION_NAME={NAME}",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
        ]
        cmd += [f"-I{p}" for p in [*ce.include_paths(), sysconfig.get_paths()["include"]]]
        cmd += [*(str(s) for s in SOURCES), "-o", str(out)]
        for lib in ce.library_paths():
            cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
        cmd += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({r.returncode}):\n{r.stderr[-4000:]}")
        # Into place by rename, never by rewriting: a daemon that has the old library mapped
        # keeps it (rewriting a mapped file in place kills its mapper with SIGBUS); the stamp
        # last, so a stamp never vouches for a library that is not there yet.
        d.mkdir(parents=True, exist_ok=True)
        final = d / out.name
        shutil.copy2(out, d / (out.name + ".tmp"))
        os.replace(d / (out.name + ".tmp"), final)
        for old in d.glob(f"{NAME}*.so"):
            if old != final:
                old.unlink()
        (d / "stamp.tmp").write_text(_stamp() + "\n")
        os.replace(d / "stamp.tmp", d / "stamp")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_module: Any = None
_loaded = False


def module() -> Any:
    """The built executor module, or None (not built, built from other sources, disabled)."""
    global _module, _loaded
    if _loaded:
        return _module
    _loaded = True
    if not ENABLED:
        return None
    so = _built()
    if so is None:
        if state() == "stale":
            # built, then its sources changed (an edit, a pull): easy to miss, and it costs speed
            log.warning(
                "compiled plan executor is stale (built from other sources; python3 -m "
                "flexnpu.daemon.optable.build): planned launches run in Python"
            )
        else:
            log.info(
                "compiled plan executor not built (python3 -m flexnpu.daemon.optable.build): "
                "planned launches run in Python"
            )
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, so)
        assert spec is not None and spec.loader is not None
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
    except Exception as e:  # noqa: BLE001 - an unloadable build costs speed, nothing else
        log.warning("compiled plan executor not loaded (%s): planned launches run in Python", e)
        return None
    _module = m
    return m


def record(
    run: Callable[[], Any], views: Sequence[torch.Tensor], slots: Sequence[Any], dest: int
) -> tuple[Any, Any]:
    """Run ``run()`` (the entry's in-place call over ``views``, one per slot) once, recording the
    ATen calls it makes: returns its result and an Exec repeating it, or None where it cannot
    be repeated exactly (planexec.cpp, Exec::record). ``slots``: the plan's Slots (dtype, shape,
    stride of each view). The recording is torch's RecordFunction observer, in C++: a Python
    dispatch mode would import torch._dynamo on first use (1-2 s in mid-launch)."""
    m = module()
    if m is None:
        return run(), None
    layouts = [(sl.dtype, list(sl.shape), list(sl.stride)) for sl in slots]
    return tuple(m.record(run, list(views), layouts, dest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m flexnpu.daemon.optable.build", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if the built library is current")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = build(force=a.force, verbose=a.verbose)
    except Exception as e:  # noqa: BLE001 - reported; the daemon runs without it
        print(
            f"flexnpu: compiled plan executor not built ({e}); planned launches will run in Python",
            file=sys.stderr,
        )
        return 1
    print(f"flexnpu: compiled plan executor: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
