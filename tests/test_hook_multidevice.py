"""Two virtual npu devices (FLEXNPU_DEVICES="0,1") served by two real daemons."""

from __future__ import annotations

import pytest
import torch

from _hookutil import hook_env


@pytest.fixture(scope="module")
def two_npus(tmp_path_factory):
    from conftest import DaemonProc

    d = tmp_path_factory.mktemp("npu2-run")
    procs = [DaemonProc(d, 0, ["--backend", "cpu"]), DaemonProc(d, 1, ["--backend", "cpu"])]
    try:
        with hook_env(d, "1,0"):  # npu:0 -> daemon device 1, npu:1 -> daemon device 0
            yield procs
    finally:
        for p in procs:
            p.stop()


def test_two_devices(two_npus):
    from flexnpu.hook import runtime

    assert torch.npu.device_count() == 2
    a = torch.arange(6.0).to("npu:0")
    b = torch.arange(6.0).to("npu:1")
    assert runtime.get(0).client.device_index == 1 and runtime.get(1).client.device_index == 0
    assert (b * 2).device == torch.device("npu", 1)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device.*npu:0.*npu:1"):
        a + b
    c = a.to("npu:1")  # device to device goes through the host
    assert c.device.index == 1 and torch.equal((c + b).cpu(), torch.arange(6.0) * 2)
    torch.npu.set_device(1)
    try:
        assert torch.zeros(2, device="npu").device == torch.device("npu", 1)
        with torch.npu.device(0):
            assert torch.npu.current_device() == 0
        assert torch.npu.current_device() == 1
    finally:
        torch.npu.set_device(0)
    assert a.new_zeros(3, device="cpu").device.type == "cpu"
    for p in two_npus:
        assert p.proc.poll() is None
