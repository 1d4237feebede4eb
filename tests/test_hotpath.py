"""The daemon's hot path (handlers/launch.py run_hot, and hotpath.c: Session.drain's loop with
planned launches run in C): the same results, accounting and refusals as the generic path, with
the C module and without it ($FLEXNPU_DAEMON_HOTPATH=0), over real daemons."""

from __future__ import annotations

import pytest
import torch

from flexnpu.errors import InvalidHandle, OutOfMemory
from flexnpu.protocol import TensorRef

from test_op_safety import _alive, _get, _out, _put

HOTPATHS = ["c", "python"]


def _hot_daemon(start_daemon, monkeypatch, which: str, *args: str):
    if which == "c":
        from flexnpu.daemon import handlers

        if handlers.HOT_DRAIN is None:
            pytest.skip("the daemon's C hot path (flexnpu/daemon/_hot_core) is not built: make install")
        monkeypatch.delenv("FLEXNPU_DAEMON_HOTPATH", raising=False)
    else:
        monkeypatch.setenv("FLEXNPU_DAEMON_HOTPATH", "0")
    d = start_daemon(*args)
    assert d.status()["plans"]["hot_path"] == which
    return d


def _mul(c, a: TensorRef, b: TensorRef) -> TensorRef:
    o = _out(c, torch.float32, a.shape)
    c.launch("aten::mul.Tensor", (a, b), {}, [o])
    return o[1]


def _run_sequence(c) -> list[list[float]]:
    """Planned launches whose inputs are pending results read as produced, read relaid out,
    read twice in one launch, and fresh uploads; every result read back."""
    seen = []
    x = _put(c, torch.arange(6.0))
    for i in range(8):
        y = _mul(c, x, x)  # planned from the third on; y pending
        z = _mul(c, y, x)  # y read in its own layout: the pending tensor itself
        t = TensorRef(z.handle, torch.float32, (3, 2), (1, 3), 0)  # z read transposed
        o = _out(c, torch.float32, (3, 2))
        c.launch("aten::add.Tensor", (t, t), {}, [o])
        c.synchronize()
        seen += [_get(c, z).tolist(), _get(c, o[1]).tolist()]
        for h in (y.handle, z.handle, o[1].handle):
            c.free(h)
        if i % 3 == 2:  # a new upload now and then
            c.free(x.handle)
            x = _put(c, torch.arange(6.0) - i)
    return seen


@pytest.mark.parametrize("which", HOTPATHS)
def test_hot_path_results_and_accounting_match_the_generic_path(start_daemon, monkeypatch, which):
    from flexnpu.client import Client

    _hot_daemon(start_daemon, monkeypatch, which)
    with Client(0) as c:
        got = _run_sequence(c)
        stats = c.memory_stats()
    want = []
    x = torch.arange(6.0)
    for i in range(8):
        z = x * x * x
        want += [z.tolist(), (z.reshape(2, 3).t() * 2).tolist()]
        if i % 3 == 2:
            x = torch.arange(6.0) - i
    assert got == want
    assert stats["allocated"] == 24  # only x is left


@pytest.mark.parametrize("which", HOTPATHS)
def test_hot_path_refuses_foreign_freed_stale_and_out_of_range_handles(start_daemon, monkeypatch, which):
    from flexnpu.client import Client

    d = _hot_daemon(start_daemon, monkeypatch, which)
    with Client(0) as owner, Client(0) as other:
        a = _put(owner, torch.ones(8))
        for _ in range(3):
            _mul(owner, a, a)
        owner.synchronize()
        used = owner.memory_stats()["allocated"]
        _mul(other, a, a)  # the owner's handle, in another client's planned launch
        with pytest.raises(InvalidHandle):
            other.synchronize()
        # output handles that are not fresh (an input, another live allocation) or out of range
        b = _put(owner, torch.full((8,), 2.0))
        for out in (a.handle, b.handle, 0):
            owner.launch("aten::mul.Tensor", (a, a), {}, [(32, TensorRef(out, torch.float32, (8,), (1,), 0))])
            with pytest.raises(InvalidHandle):
                owner.synchronize()
        assert owner.memory_stats()["allocated"] == used + 32  # a and b: nothing charged per refusal
        assert torch.equal(_get(owner, a), torch.ones(8)) and torch.equal(
            _get(owner, b), torch.full((8,), 2.0)
        )
        owner.free(a.handle)
        _mul(owner, a, a)  # freed
        with pytest.raises(InvalidHandle):
            owner.synchronize()
        _alive(owner)
        _alive(other)
    assert d.proc.poll() is None


@pytest.mark.parametrize("which", HOTPATHS)
def test_hot_path_keeps_each_clients_memory_limit(start_daemon, monkeypatch, which):
    from flexnpu.client import Client

    d = _hot_daemon(start_daemon, monkeypatch, which, "--memory-limit", "64KiB")
    with Client(0) as c:
        small = _put(c, torch.ones(16))
        big = _put(c, torch.ones(6 * 1024))  # 24 KiB
        for _ in range(3):
            c.free(_mul(c, small, small).handle)
        c.synchronize()
        used = c.memory_stats()["allocated"]
        outs = [_mul(c, big, big) for _ in range(2)]  # 48 KiB more: the second is over the limit
        with pytest.raises(OutOfMemory, match="limit"):
            c.synchronize()
        assert c.memory_stats()["allocated"] == used + 24 * 1024  # the refused output charged nothing
        assert torch.equal(_get(c, outs[0]), torch.ones(6 * 1024))
        _alive(c)
    assert d.proc.poll() is None


def test_daemon_status_reports_its_loops_busy_and_waiting_time(daemon):
    from flexnpu.client import Client

    with Client(0) as c:
        first = daemon.status()["loop"]
        a = _put(c, torch.ones(1024))
        for _ in range(200):
            c.free(_mul(c, a, a).handle)
        c.synchronize()
        loop = daemon.status()["loop"]
    assert set(loop) == {"busy_s", "wait_s"}
    assert loop["busy_s"] > first["busy_s"] > 0 and loop["wait_s"] >= first["wait_s"] > 0
