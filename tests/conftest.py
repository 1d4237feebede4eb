"""Shared fixtures: real daemons in real processes, each in its own runtime directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flexnpu.daemon_process import DaemonProcess, child_env  # noqa: F401 - child_env re-exported to tests
from _markers import pytest_collection_modifyitems  # noqa: F401 - marks slow tests (tests/_markers.py)

ROOT = Path(__file__).resolve().parent.parent
# Embedded daemons that `flexnpu run` starts in tests leave soon after their last client.
os.environ.setdefault("FLEXNPU_IDLE_GRACE", "2")

# The smallest whole `flexnpu bench serve` run that still exercises every system and knob search
# (one workload, two devices, one value per knob): tests of its output share it.
QUICK_SERVE_ARGS = [
    "--quick",
    "--workloads",
    "chat",
    "--devices",
    "2",
    "--capacity-duration",
    "4",
    "--jobs",
    "2",
    "--alphas",
    "0.75",
    "--coloc-budgets",
    "2048",
    "--flex-chunks",
    "1024",
]


def pytest_addoption(parser):
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the adversarial suite (tests/test_adversary.py) for much longer",
    )


class DaemonProc(DaemonProcess):
    """A test's daemon: our child in our session (not detached), so it dies with the test run."""

    def __init__(self, runtime_dir: Path, device: int, args: list[str], preexec_fn=None) -> None:
        super().__init__(device, runtime_dir, args, detach=False, start_timeout=120, preexec_fn=preexec_fn)


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def start_daemon(runtime_dir):
    """Factory: start_daemon(*extra_args, device=0) -> DaemonProc; all are stopped at teardown."""
    procs: list[DaemonProc] = []

    def start(*args: str, device: int = 0, preexec_fn=None) -> DaemonProc:
        d = DaemonProc(runtime_dir, device, ["--backend", "cpu", *args], preexec_fn)
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.stop()


@pytest.fixture
def daemon(start_daemon):
    """A CPU-backed daemon for device 0 with FLEXNPU_RUNTIME_DIR pointing at it."""
    return start_daemon()


@pytest.fixture
def client(daemon):
    from flexnpu.client import Client

    c = Client(0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def pe():
    """The daemon's compiled executors' module (flexnpu/daemon/compiled.py): skips without a C++
    compiler; fails if one is there but the module was not built (make install builds it)."""
    import shutil

    from flexnpu.daemon import compiled

    m = compiled.module()
    if m is None:
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler on this machine: the compiled plan executor is not built")
        pytest.fail(
            "the compiled plan executor is not built: python3 -m flexnpu.daemon.optable.build (make install)"
        )
    return m
