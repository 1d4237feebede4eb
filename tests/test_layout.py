"""The package layout: benchmarks install as flexnpu.bench, and the import graph has no cycle."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_is_flexnpu_bench_from_this_checkout():
    import flexnpu.bench
    import flexnpu.bench.ring

    assert Path(flexnpu.bench.__file__).resolve() == ROOT / "bench" / "__init__.py"
    assert Path(flexnpu.bench.ring.__file__).resolve().parent == ROOT / "bench"
    setup = (ROOT / "setup.py").read_text()
    assert '"bench", "bench.*"' not in setup and 'package_dir={"flexnpu.bench": "bench"}' in setup


def test_import_graph_has_no_cycle():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "layers.py"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "cycles: 0 " in r.stdout, r.stdout
    # Back-edges: `make lint` fails on any; the hook's use of the daemon's operator allow-list
    # (hook.tensor -> daemon.backends.torch_exec) goes once flexnpu/ops.py holds the rules.
    edges = r.stdout.split("back-edges: ", 1)[1]
    assert edges.startswith(("0 ", "1 ['flexnpu.hook.tensor->flexnpu.daemon.backends.torch_exec']")), edges
