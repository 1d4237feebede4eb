"""`flexnpu calibrate`: measured cost-model corrections, saved where the daemon loads them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu.daemon.scheduling import local_cost_model
from flexnpu.sched.costmodel import default_corrections_path, load_corrections

ROOT = Path(__file__).resolve().parent.parent


def _flexnpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexnpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_calibrate_saves_corrections_the_daemons_cost_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from flexnpu.daemon.backends.torch_backend import TorchBackend

    cache = tmp_path / "cache"
    r = _flexnpu("calibrate", "--quick", "--repeats", "2", "--json", env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert {row["op"] for row in doc["rows"]} >= {"aten::mm", "aten::add", "aten::layer_norm"}
    assert all(row["measured_ms"] > 0 and row["predicted_ms"] > 0 for row in doc["rows"])

    # saved at the default path, which is where a cpu daemon's scheduler looks
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    path = default_corrections_path(doc["spec"])
    assert path.is_file() and path.is_relative_to(cache)
    saved = load_corrections(path)
    model = local_cost_model(TorchBackend("cpu"))
    assert doc["corrections"]["factors"], "no op class was corrected"
    for cls, factor in doc["corrections"]["factors"].items():
        assert saved.factor(cls) == pytest.approx(factor)
        assert model.corrections.factor(cls) == pytest.approx(factor)


def test_bench_calibrate_points_at_the_command():
    r = _flexnpu("bench", "calibrate", "--quick")
    assert r.returncode == 2
    assert "flexnpu calibrate --quick" in r.stderr
    listing = _flexnpu("bench", "--help").stdout
    assert "calibrate" not in listing and "ring" in listing
