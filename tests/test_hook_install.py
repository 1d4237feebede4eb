"""The bootstrap: lazy installation on `import torch`, sitecustomize chaining, torch_npu, flexnpu run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_env

BOOT = ROOT / "flexnpu" / "hook" / "bootstrap"


def _py(code: str, pythonpath: list[Path], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    e = child_env(**env)
    e["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    return subprocess.run(
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=timeout
    )


def test_non_torch_programs_do_not_import_torch():
    r = _py(
        "import sys, json, flexnpu.hook as h; "
        "print('torch' in sys.modules, h._state['installed'], "
        "any(type(f).__name__ == '_TorchImportWatcher' for f in sys.meta_path))",
        [BOOT, ROOT],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True"]


def test_importing_torch_installs_the_device_without_a_daemon_round_trip(tmp_path):
    # no daemon runs here: installing must not attach (the client attaches on first npu use)
    code = (
        "import torch, flexnpu.hook as h; print(h.is_torch_device_installed(), "
        "torch._C._get_privateuse1_backend_name(), hasattr(torch.Tensor, 'is_npu'), "
        "torch.npu.device_count())\n"
        "try:\n    torch.ones(1, device='npu')\nexcept Exception as e:\n    print(type(e).__name__)"
    )
    r = _py(code, [BOOT, ROOT], FLEXNPU_RUNTIME_DIR=str(tmp_path), FLEXNPU_DEVICES="0,1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "npu", "True", "2", "AttachError"]


def test_chains_to_an_existing_sitecustomize(tmp_path):
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE_RAN'] = '1'\n")
    r = _py(
        "import os, flexnpu.hook as h; print(os.environ.get('OTHER_SITECUSTOMIZE_RAN'), "
        "h._state['installed'])",
        [BOOT, ROOT, other],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True"]


def test_install_is_idempotent():
    r = _py(
        "import sys, flexnpu.hook as h; h.install(); h.install(); import torch; h.install(); "
        "h.install_torch_device(); print(sum(type(f).__name__ == '_TorchImportWatcher' for f in sys.meta_path), "
        "h.is_torch_device_installed())",
        [BOOT, ROOT],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True"]


def test_flexnpu_run_torch_npu_program(tmp_path):
    prog = tmp_path / "app.py"
    prog.write_text(
        "import torch, torch_npu\n"
        "torch.npu.set_device(0)\n"
        "x = torch.randn(4, 4).npu()\n"
        "y = (x @ x.t()).relu()\n"
        "torch.npu.synchronize()\n"
        "print(torch_npu.__version__, y.device, bool((y.cpu() >= 0).all()), torch.npu.memory_allocated() > 0)\n"
    )
    e = child_env()
    e.pop("FLEXNPU_RUNTIME_DIR", None)
    r = subprocess.run(
        [sys.executable, "-m", "flexnpu", "run", "--", sys.executable, str(prog)],
        env=e,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[-4:] == ["flexnpu-shim", "npu:0", "True", "True"]


def test_device_map_env(monkeypatch):
    from flexnpu.hook import runtime

    monkeypatch.setenv("FLEXNPU_DEVICES", "3,1")
    assert runtime.device_map() == [3, 1]
    monkeypatch.setenv("FLEXNPU_DEVICES", "x")
    with pytest.raises(RuntimeError, match="FLEXNPU_DEVICES"):
        runtime.device_map()
