"""The C core under ThreadSanitizer: two threads over one mapping (ringpp threads), random
batches and pauses, futex sleeps. Our stand-in for a weakly ordered CPU: a missing
release/acquire pair is a data race on the slot bytes, which TSan reports. A second build
with the ordering deliberately broken proves the check can fail."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flexnpu.ring.cdriver import HERE, build_ringpp

SANITIZER_OPTS = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66", "PATH": "/usr/bin:/bin"}


def _built(extra: list[str] | None = None, tmp=None):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    if extra:
        exe = str(tmp / "ringpp-broken")
        p = subprocess.run(
            [
                "gcc",
                "-O1",
                "-g",
                "-std=gnu11",
                "-pthread",
                "-fsanitize=thread",
                *extra,
                "-I",
                HERE,
                f"{HERE}/ringpp.c",
                "-o",
                exe,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if p.returncode != 0:
            pytest.skip(f"cannot build with -fsanitize=thread (libtsan missing?): {p.stderr[-300:]}")
        return exe
    exe, why = build_ringpp("thread")
    if exe is None:
        pytest.skip(f"cannot build with -fsanitize=thread (libtsan missing?): {why[-300:]}")
    return exe


def test_no_race_under_tsan():
    exe = _built()
    p = subprocess.run(
        [exe, "threads", "300000"], capture_output=True, text=True, timeout=120, env=SANITIZER_OPTS
    )
    assert "WARNING: ThreadSanitizer" not in p.stderr, p.stderr[:4000]
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert '"producer_ok": 1, "consumer_ok": 1' in p.stdout


def test_tsan_catches_broken_ordering(tmp_path):
    exe = _built(["-DFX_BROKEN_ORDERING"], tmp_path)
    p = subprocess.run(
        [exe, "threads", "100000"], capture_output=True, text=True, timeout=120, env=SANITIZER_OPTS
    )
    assert "WARNING: ThreadSanitizer: data race" in p.stderr
