"""FlexNPU: a transparent user-space virtualization layer for AI accelerators."""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__version__ = "0.1.0"

# The benchmarks live in the checkout's top-level bench/ folder and install as flexnpu.bench
# (setup.py package_dir). Run from a source checkout (PYTHONPATH=checkout, `setup.py build_ext
# --inplace`, or beside an editable install of another checkout), flexnpu.bench must still be
# this checkout's bench/: a finder for exactly that one name, consulted before the others.
_SRC_BENCH = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "bench")


class _SourceBenchFinder:
    @staticmethod
    def find_spec(
        name: str, path: Sequence[str] | None = None, target: ModuleType | None = None, /
    ) -> ModuleSpec | None:
        if name != "flexnpu.bench":
            return None
        from importlib.util import spec_from_file_location

        return spec_from_file_location(
            name, _os.path.join(_SRC_BENCH, "__init__.py"), submodule_search_locations=[_SRC_BENCH]
        )


if _os.path.isfile(_os.path.join(_SRC_BENCH, "__init__.py")) and not _os.path.isdir(
    _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "bench")
):
    _sys.meta_path.insert(0, _SourceBenchFinder)
