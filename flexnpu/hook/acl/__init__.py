"""pyACL (AscendCL's Python API) on top of FlexNPU.

Under ``flexnpu run`` the bootstrap directory provides a top-level ``acl`` module
(flexnpu/hook/bootstrap/acl.py) that re-exports this package, so unmodified pyACL programs
(``import acl; acl.rt.malloc(...)``) run against a FlexNPU daemon. See docs/acl.md.
"""

from __future__ import annotations

import sys
import types

from . import base, mdl, media, op, rt, util

SUBMODULES = {"rt": rt, "op": op, "util": util, "mdl": mdl, "media": media}


def populate(module: types.ModuleType) -> None:
    """Make ``module`` (the top-level ``acl``) look like pyACL: top-level functions plus the
    ``rt``/``op``/``util``/``mdl``/``media`` submodules, also importable as ``acl.rt`` etc."""
    for name in dir(base):
        obj = getattr(base, name)
        if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "") == base.__name__:
            setattr(module, name, obj)
    for name, sub in SUBMODULES.items():
        setattr(module, name, sub)
        sys.modules[f"{module.__name__}.{name}"] = sub
    module.__getattr__ = base.__getattr__  # type: ignore[method-assign]  # module-level __getattr__ (PEP 562)
