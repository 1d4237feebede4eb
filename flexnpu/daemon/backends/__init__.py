"""Device backends. `make_backend(spec, index)` turns a --backend value into one.

BACKEND_KINDS and check_backend() are the one list of what --backend accepts: `flexnpu daemon`,
`flexnpu run` and `flexnpu service install` all validate with it.
"""

from __future__ import annotations

import argparse
from typing import Any

BACKEND_KINDS = ("auto", "cpu", "cuda", "npu", "emu")
BACKEND_SYNTAX = "auto|cpu|cuda|npu|emu:<spec>[+cpu]"


def check_backend(text: str) -> str:
    """`text` if it names a backend (emu: with a known accelerator spec), else a clear error
    (argparse.ArgumentTypeError, so it can be an option's type=)."""
    from ...sched.specs import ALIASES, SPECS

    kind, colon, rest = text.partition(":")
    if kind not in BACKEND_KINDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {BACKEND_SYNTAX}")
    if kind != "emu":
        if colon:
            raise argparse.ArgumentTypeError(f"backend {kind} takes no ':' suffix ({text!r})")
        return text
    name, plus, extra = rest.partition("+")
    specs = sorted(SPECS)
    if not name or ALIASES.get(name.lower(), name.lower()) not in SPECS:
        raise argparse.ArgumentTypeError(
            f"backend emu needs an accelerator spec: emu:<spec>[+cpu] with "
            f"<spec> one of {', '.join(specs)} (got {text!r})"
        )
    if plus and extra != "cpu":
        raise argparse.ArgumentTypeError(f"emu backend: only '+cpu' may follow the spec, not '+{extra}'")
    return text


def make_backend(spec: str, index: int = 0) -> Any:
    if spec.startswith("emu"):
        from .emu import make_emu_backend  # the emulated accelerator (scheduler issue)

        return make_emu_backend(spec, index)
    from .torch_backend import make_backend as make_torch

    return make_torch(spec, index)
