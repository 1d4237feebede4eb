"""FlexNPU bootstrap, put first on PYTHONPATH by `flexnpu run`: installs the hook, then chains to
whatever sitecustomize the environment had (the next one on sys.path)."""

import os
import sys


def _flexnpu_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import flexnpu.hook  # noqa: F401
    except ImportError:
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(here))))
    try:
        import flexnpu.hook

        flexnpu.hook.install()
    except Exception as e:  # noqa: BLE001 - the program must still start
        sys.stderr.write(f"flexnpu: hook not installed: {e}\n")
    import importlib.machinery
    import importlib.util

    others = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.origin and os.path.abspath(spec.origin) != os.path.abspath(__file__):
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_flexnpu_chained_sitecustomize"] = mod
        spec.loader.exec_module(mod)


_flexnpu_boot()
del _flexnpu_boot
