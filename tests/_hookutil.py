"""Shared setup for hook tests: a real CPU-backed daemon and the npu torch device in this process."""

from __future__ import annotations

import contextlib
import os

import pytest


@contextlib.contextmanager
def hook_env(runtime_dir, devices: str):
    """FLEXNPU_RUNTIME_DIR/FLEXNPU_DEVICES set and the npu device installed with fresh clients;
    the environment and clients are restored afterwards."""
    from flexnpu.hook import install_torch_device

    old = {k: os.environ.get(k) for k in ("FLEXNPU_RUNTIME_DIR", "FLEXNPU_DEVICES")}
    os.environ["FLEXNPU_RUNTIME_DIR"] = str(runtime_dir)
    os.environ["FLEXNPU_DEVICES"] = devices
    _drop_clients()
    install_torch_device()
    try:
        yield
    finally:
        _drop_clients()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _drop_clients() -> None:
    import flexnpu.client as fc
    from flexnpu.hook import runtime

    runtime.reset()
    runtime.set_client_factory(None)
    fc._close_all()
    fc._clients.clear()


@pytest.fixture(scope="module")
def npu(tmp_path_factory):
    """A daemon for device 0 (cpu backend), FLEXNPU_RUNTIME_DIR pointing at it, npu installed.

    Yields the hook runtime's Device 0; its ``client`` is the real flexnpu.client.Client.
    """
    from conftest import DaemonProc

    import torch  # noqa: F401

    from flexnpu.hook import runtime

    d = tmp_path_factory.mktemp("npu-run")
    proc = DaemonProc(d, 0, ["--backend", "cpu"])
    try:
        with hook_env(d, "0"):
            try:
                yield runtime.get(0)
            finally:
                try:
                    torch.npu.synchronize()
                except Exception:  # noqa: BLE001 - a test may have left an error behind
                    pass
    finally:
        proc.stop()
