"""Shared fixtures: real daemons in real processes, each in its own runtime directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _markers import pytest_collection_modifyitems  # noqa: F401 - marks slow tests (tests/_markers.py)

ROOT = Path(__file__).resolve().parent.parent


def child_env(runtime_dir: Path | str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that must import this checkout and find our daemon."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if runtime_dir is not None:
        env["FLEXNPU_RUNTIME_DIR"] = str(runtime_dir)
    env.update(extra)
    return env


class DaemonProc:
    def __init__(self, runtime_dir: Path, device: int, args: list[str]) -> None:
        self.runtime_dir = runtime_dir
        self.device = device
        self.socket = runtime_dir / f"npu{device}.sock"
        self.log = runtime_dir / f"daemon{device}.log"
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexnpu", "daemon", "--device", str(device), "--runtime-dir",
             str(runtime_dir), *args],
            env=child_env(runtime_dir), stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not start: {self.log.read_text()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        from flexnpu.control import query

        return query(str(self.socket), {"op": "status"})["daemon"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


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

    def start(*args: str, device: int = 0) -> DaemonProc:
        d = DaemonProc(runtime_dir, device, ["--backend", "cpu", *args])
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
