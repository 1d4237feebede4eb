"""Build the pure-C ring driver (ringpp.c) on demand: the benchmark's c-floor and the
ThreadSanitizer test use it. Needs gcc; returns None (with the reason) when it cannot build."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("ringpp.c", "ring.c", "ring.h")


def build_ringpp(sanitize: str | None = None, outdir: str | None = None) -> tuple[str | None, str]:
    """Compile ringpp (optionally with -fsanitize=SANITIZE). Returns (path or None, message)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None, "no C compiler (gcc) on PATH"
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    h.update((sanitize or "").encode())
    outdir = outdir or os.path.join(tempfile.gettempdir(), f"flexnpu-ringpp-{os.getuid()}")
    os.makedirs(outdir, exist_ok=True)
    exe = os.path.join(outdir, f"ringpp-{sanitize or 'opt'}-{h.hexdigest()[:12]}")
    if os.path.exists(exe):
        return exe, "cached"
    flags = ["-O2", "-std=gnu11", "-Wall", "-pthread"]
    if sanitize:
        flags = ["-O1", "-g", "-std=gnu11", "-Wall", "-pthread", f"-fsanitize={sanitize}"]
    tmp = exe + f".tmp{os.getpid()}"
    cmd = [cc, *flags, "-I", HERE, os.path.join(HERE, "ringpp.c"), "-o", tmp]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return None, f"compile failed: {' '.join(cmd)}\n{p.stderr[-2000:]}"
    os.replace(tmp, exe)
    return exe, "built"
