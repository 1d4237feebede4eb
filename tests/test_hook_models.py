"""Hugging Face transformers models on the npu device (real daemon) match CPU exactly/closely."""

from __future__ import annotations

import copy

import pytest
import torch

from _hookutil import npu  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")


def _tiny(kind: str):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_greedy_matches_cpu(npu, kind):
    model = _tiny(kind)
    model_n = copy.deepcopy(model).to("npu")
    assert next(model_n.parameters()).device.type == "npu"
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = model_n.generate(ids.npu(), attention_mask=mask.npu(), max_new_tokens=12, do_sample=False)
    assert got.device.type == "npu"
    assert got.cpu().tolist() == want.tolist()


def test_training_step_matches_cpu(npu):
    model = _tiny("llama").train()
    model_n = copy.deepcopy(model).to("npu")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_n = torch.optim.SGD(model_n.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        loss_n = model_n(input_ids=ids.npu(), labels=ids.npu()).loss
        loss_n.backward()
        assert loss_n.device.type == "npu"
        assert loss_n.item() == pytest.approx(loss.item(), rel=1e-5)
        for (name, p), pn in zip(model.named_parameters(), model_n.parameters()):
            assert torch.allclose(pn.grad.cpu(), p.grad, rtol=1e-4, atol=1e-6), name
        opt.step()
        opt.zero_grad()
        opt_n.step()
        opt_n.zero_grad()
    for p, pn in zip(model.parameters(), model_n.parameters()):
        assert torch.allclose(pn.detach().cpu(), p.detach(), rtol=1e-4, atol=1e-6)


def test_decode_step_round_trips_and_meta_calls(npu, monkeypatch):
    """HF generate with the default dynamic cache (shapes change every token, issue 13): one
    synchronous round trip per token (transformers' stopping check reads a flag on the host),
    and the operators shape_rules covers never reach the meta device for new shapes; nor do
    the views it has rules for (the attention mask's slice grows every token)."""
    from flexnpu.ops import shape_rules
    from flexnpu.hook import tensor as T

    model = _tiny("qwen2").to("npu")
    c = npu.client
    syncs = [0]
    real_sync = c._sync

    def counting_sync(*a, **k):
        syncs[0] += 1
        return real_sync(*a, **k)

    metas: list[str] = []
    real_infer = T._infer

    def counting_infer(func, args, kwargs, w, info):
        if shape_rules.covered(func) or shape_rules.view_covered(func):
            metas.append(info.name)
        return real_infer(func, args, kwargs, w, info)

    monkeypatch.setattr(c, "_sync", counting_sync)
    monkeypatch.setattr(T, "_infer", counting_infer)
    g = torch.Generator().manual_seed(2)

    def gen(plen: int, n: int) -> None:
        ids = torch.randint(0, 128, (1, plen), generator=g).npu()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )

    gen(5, 2)  # first-use work (weights' metadata, the first launch plans) out of the count
    counts = []
    for plen, n in ((9, 6), (17, 12)):  # prompt lengths and cache sizes no earlier run had
        syncs[0] = 0
        metas.clear()
        gen(plen, n)
        counts.append((syncs[0], len(metas), list(metas)))
    (s1, m1, _), (s2, m2, names) = counts
    assert (s2 - s1) / 6 <= 1.0, counts  # per extra token: at most the stopping check
    assert m2 / 12 <= 1.0, names  # ~10 per token before the rules
    assert not [n for n in names if n in ("aten::slice.Tensor", "aten::select.int")], names


def _count_launches(npu, monkeypatch) -> list[str]:
    """The operators of every launch the client sends from now on (decoded from its payloads)."""
    from flexnpu import protocol as P

    c = npu.client
    launched: list[str] = []
    real_launch = c.launch_payload

    def counting_launch(payload, *a, **k):
        launched.append(P.decode_launch(bytes(payload)).op)
        return real_launch(payload, *a, **k)

    monkeypatch.setattr(c, "launch_payload", counting_launch)
    return launched


def test_linear_reaches_the_daemon_whole_without_grad_and_decomposed_with_it(npu, monkeypatch):
    """linear is one dispatch and one launch when nothing needs its gradient (instead of a
    transpose, views and addmm/mm through the front end); with a gradient it keeps torch's
    decomposition, which autograd differentiates."""
    import torch.nn.functional as F

    launched = _count_launches(npu, monkeypatch)
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    for args in ((x, w, b), (x, w), (x[0, 0], w, b), (x.transpose(0, 1), w, b)):
        launched.clear()
        with torch.no_grad():
            got = F.linear(*(t.npu() for t in args))
        torch.testing.assert_close(got.cpu(), F.linear(*args))
        assert launched.count("aten::linear.default") == 1, launched
        assert not {"aten::addmm.default", "aten::mm.default"} & set(launched)

    launched.clear()
    wg, wc = w.clone().npu().requires_grad_(), w.clone().requires_grad_()
    F.linear(x.npu(), wg, b.npu()).sum().backward()
    F.linear(x, wc, b).sum().backward()
    torch.testing.assert_close(wg.grad.cpu(), wc.grad)
    assert "aten::linear.default" not in launched


def test_sdpa_reaches_the_daemon_whole_without_grad_and_decomposed_with_it(npu, monkeypatch):
    """scaled_dot_product_attention is one launch (the backend's fused kernel) when nothing needs
    its gradient; with a gradient or dropout it keeps torch's math form, which autograd and the
    host's random generator need."""
    import torch.nn.functional as F

    launched = _count_launches(npu, monkeypatch)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, n, 8, generator=g).transpose(1, 2) for s, n in ((3, 4), (5, 2), (5, 2)))
    mask = torch.randn(1, 1, 3, 5, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with torch.no_grad():
        got = F.scaled_dot_product_attention(q.npu(), k.npu(), v.npu(), attn_mask=mask.npu(), enable_gqa=True)
    torch.testing.assert_close(got.cpu(), want)
    assert launched.count("aten::scaled_dot_product_attention.default") == 1
    assert "aten::bmm.default" not in launched and "aten::_safe_softmax.default" not in launched

    launched.clear()
    qg, qc = q.clone().npu().requires_grad_(), q.clone().requires_grad_()
    F.scaled_dot_product_attention(
        qg, k.npu(), v.npu(), attn_mask=mask.npu(), enable_gqa=True
    ).sum().backward()
    F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, enable_gqa=True).sum().backward()
    torch.testing.assert_close(qg.grad.cpu(), qc.grad)
    assert "aten::scaled_dot_product_attention.default" not in launched

    launched.clear()
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q.npu(), k.npu(), v.npu(), dropout_p=0.5, enable_gqa=True)
    assert out.shape == (1, 4, 3, 8)
    assert "aten::scaled_dot_product_attention.default" not in launched  # dropout: host random
