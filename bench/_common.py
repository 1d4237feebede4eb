"""Shared helpers of the benchmark suites: a private daemon, percentiles, tables, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from flexnpu.daemon_process import DaemonProcess, child_env  # noqa: F401 - child_env re-exported

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def private_daemon(*args: str, device: int = 0, backend: str = "cpu") -> Iterator[Path]:
    """A daemon in its own runtime directory, stopped afterwards. Sets FLEXNPU_RUNTIME_DIR."""
    old = os.environ.get("FLEXNPU_RUNTIME_DIR")
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as d:
        rdir = Path(d)
        try:
            with DaemonProcess(device, rdir, ["--backend", backend, *args]):
                os.environ["FLEXNPU_RUNTIME_DIR"] = str(rdir)
                yield rdir
        finally:
            if old is None:
                os.environ.pop("FLEXNPU_RUNTIME_DIR", None)
            else:
                os.environ["FLEXNPU_RUNTIME_DIR"] = old


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]], title: str = "") -> None:
    """cols: (key, header, format)."""
    if title:
        print(title)
    widths = [max(len(h), *(len(_fmt(r.get(k), f)) for r in rows)) for k, h, f in cols]
    print(
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(cols, widths)))
    )
    for r in rows:
        print(
            "  ".join(
                _fmt(r.get(k), f).ljust(w) if i == 0 else _fmt(r.get(k), f).rjust(w)
                for i, ((k, _, f), w) in enumerate(zip(cols, widths))
            )
        )


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "-"
    return format(v, f) if f else str(v)


def dump_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))
