"""Pinned host memory for npu: blocks of the client's shared arena, zero-copy non_blocking
uploads, truthful is_pinned, and a DataLoader(pin_memory=True, num_workers=2) training loop."""

from __future__ import annotations

import gc

import pytest
import torch

from _hookutil import npu  # noqa: F401  (fixture)
from flexnpu.hook import pinned


def _in_arena(t: torch.Tensor, client) -> bool:
    base = client.host_addr(0)
    return base <= t.data_ptr() < base + client.seg.arena_size


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_pin_memory_and_factories_use_the_arena(npu):
    c = npu.client
    x = torch.randn(6, 4).t()  # strides survive pinning, as in torch
    p = x.pin_memory()
    assert p.is_pinned() and not x.is_pinned() and torch.equal(p, x) and p.stride() == x.stride()
    assert _in_arena(p, c)
    assert p.pin_memory() is p  # already pinned: no copy
    for t in (
        torch.empty(3, 4, pin_memory=True),
        torch.zeros(5, pin_memory=True),
        torch.ones(2, 2, dtype=torch.float16, pin_memory=True),
        torch.tensor([1, 2], pin_memory=True),
        torch.full((3,), 7, pin_memory=True),
        torch.empty_like(x, pin_memory=True),
    ):
        assert t.is_pinned() and _in_arena(t, c)
    assert torch.zeros(5, pin_memory=True).tolist() == [0.0] * 5
    assert not torch.zeros(3).is_pinned() and not torch.zeros(3, device="npu").is_pinned()

    @torch.jit.script
    def scripted(n: int):
        return torch.zeros(n) + 1  # the wrapped factory still compiles

    assert scripted(2).tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="only host"):
        torch.zeros(2, device="npu", pin_memory=True)


def test_non_blocking_upload_is_one_arena_command(npu, monkeypatch):
    c = npu.client
    staged = []
    real = c.memcpy_h2d
    monkeypatch.setattr(c, "memcpy_h2d", lambda *a, **k: (staged.append(a), real(*a, **k))[1])
    src = torch.randn(512, 256)
    p = src.pin_memory()
    y = p.to("npu", non_blocking=True)
    z = torch.empty(512, 256, device="npu")
    z.copy_(p)  # blocking copy: also straight from the arena
    assert staged == []
    assert torch.equal(y.cpu(), src) and torch.equal(z.cpu(), src)
    q = torch.randn(512, 256)
    q.to("npu")  # unpinned memory goes the ordinary way
    assert len(staged) == 1


def test_block_outlives_its_in_flight_copy(npu):
    c = npu.client
    gc.collect()
    torch.npu.synchronize()  # earlier tests' dead blocks go back first
    free0 = c.seg.arena_free_bytes
    src = torch.arange(1 << 20, dtype=torch.float32)
    p = src.pin_memory()
    y = p.to("npu", non_blocking=True)
    del p
    gc.collect()
    assert len(pinned._pending) == 1  # not back in the arena until the copy is done
    torch.npu.synchronize()
    assert pinned._pending == [] and c.seg.arena_free_bytes == free0
    assert torch.equal(y.cpu(), src)


def test_oversized_pin_falls_back_truthfully(npu):
    big = torch.zeros(npu.client.seg.arena_size // 4 + 1)  # more bytes than the arena holds
    with pytest.warns(UserWarning, match="FLEXNPU_ARENA"):
        pinned._warned = False
        p = big.pin_memory()
    assert not p.is_pinned() and torch.equal(p, big)


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(96, 8, generator=g)
        self.y = (self.x @ torch.randn(8, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(96, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train(device: str, pin: bool, workers: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        _Data(),
        batch_size=16,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(1),
    )
    losses = []
    for _ in range(3):
        for xb, yb in loader:
            if pin:
                assert xb.is_pinned() and yb.is_pinned()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_dataloader_pin_memory_training_matches_cpu(npu):
    ref_losses, ref_state = _train("cpu", False, 0)
    losses, state = _train("npu", True, 2)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    for k in ref_state:
        assert torch.allclose(state[k], ref_state[k], atol=1e-5), k
