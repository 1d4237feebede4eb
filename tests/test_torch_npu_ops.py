"""torch_npu's fused operators (flexnpu/hook/torch_npu_ops.py) on the npu device against
independent plain-torch references on the CPU: forward, and backward where torch_npu has one."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _hookutil import npu  # noqa: F401  (fixture)
from flexnpu.hook import torch_npu_ops as tn

SHIM = Path(tn.__file__).parent / "bootstrap" / "torch_npu" / "__init__.py"


def _leaf(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _pair(t: torch.Tensor):
    """(cpu leaf, npu leaf) with the same values, both requiring grad."""
    return t.clone().requires_grad_(), t.clone().to("npu").requires_grad_()


def _close(a, b, tol=1e-5):
    a = a.detach().cpu() if a.device.type != "cpu" else a.detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a.float(), b.detach().float(), atol=tol, rtol=tol), (a - b).abs().max()


def _grads_match(cpu_leaves, npu_leaves, tol=1e-4):
    for c, n in zip(cpu_leaves, npu_leaves):
        assert n.grad is not None and str(n.grad.device) == "npu:0"
        _close(n.grad, c.grad, tol)


# ------------------------------------------------------------------------------------- norms


def _ref_rstd(x, nd):
    dims = tuple(range(x.dim() - nd, x.dim()))
    return 1 / torch.sqrt(x.float().pow(2).mean(dims, keepdim=True) + 1e-6)


@pytest.mark.parametrize("gshape", [(16,), (5, 16)])
def test_rms_norm(npu, gshape):
    xc, xn = _pair(_leaf(3, 5, 16))
    gc, gn = _pair(_leaf(*gshape, seed=1))
    y, rstd = tn.npu_rms_norm(xn, gn)
    ref = F.rms_norm(xc, gshape, gc, eps=1e-6)
    _close(y, ref)
    _close(rstd, _ref_rstd(xc, len(gshape)))
    assert rstd.dtype == torch.float32 and not rstd.requires_grad
    (y * torch.arange(16.0, device="npu")).sum().backward()
    (ref * torch.arange(16.0)).sum().backward()
    _grads_match([xc, gc], [xn, gn])
    yb, _ = tn.npu_rms_norm(xn.detach().bfloat16(), gn.detach().bfloat16(), 1e-5)
    assert yb.dtype == torch.bfloat16
    _close(yb, F.rms_norm(xc.detach().bfloat16().float(), gshape, gc.detach().bfloat16().float(), 1e-5), 2e-2)


def test_add_rms_norm(npu):
    (ac, an), (bc, bn), (gc, gn) = _pair(_leaf(4, 8)), _pair(_leaf(4, 8, seed=1)), _pair(_leaf(8, seed=2))
    y, rstd, x = tn.npu_add_rms_norm(an, bn, gn, epsilon=1e-5)
    s = ac + bc
    ref = F.rms_norm(s, (8,), gc, eps=1e-5)
    _close(x, s)
    _close(y, ref)
    assert rstd.shape == (4, 1)
    (y.sum() + x.pow(2).sum()).backward()
    (ref.sum() + s.pow(2).sum()).backward()
    _grads_match([ac, bc, gc], [an, bn, gn])


# ------------------------------------------------------------------------------------ rotary


def _ref_rope(x, cos, sin, mode):
    d = x.shape[-1]
    out = torch.empty_like(x)
    if mode == "half":
        h = d // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = torch.cat([x1 * cos[..., :h] - x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:]], -1)
    else:  # pairs (2i, 2i+1) rotate together
        ev, od = x[..., 0::2], x[..., 1::2]
        out = torch.stack(
            [ev * cos[..., 0::2] - od * sin[..., 0::2], od * cos[..., 1::2] + ev * sin[..., 1::2]], -1
        )
        out = out.flatten(-2)
    return out


@pytest.mark.parametrize("mode", ["half", "interleave"])
def test_rotary_mul(npu, mode):
    xc, xn = _pair(_leaf(2, 3, 5, 8))
    cc, cn = _pair(_leaf(1, 1, 5, 8, seed=1))
    sc, sn = _pair(_leaf(1, 1, 5, 8, seed=2))
    y = tn.npu_rotary_mul(xn, cn, sn, rotary_mode=mode)
    ref = _ref_rope(xc, cc, sc, mode)
    _close(y, ref)
    w = torch.randn(y.shape)
    (y * w.npu()).sum().backward()
    (ref * w).sum().backward()
    _grads_match([xc, cc, sc], [xn, cn, sn])


def test_rotary_mul_rotate_matrix(npu):
    x, c, s = _leaf(2, 4, 8), _leaf(2, 4, 8, seed=1), _leaf(2, 4, 8, seed=2)
    rot = torch.zeros(8, 8)
    for i in range(4):  # x @ rot == cat(-x2, x1): the half rotation as a matrix
        rot[i + 4, i] = -1.0
        rot[i, i + 4] = 1.0
    y = tn.npu_rotary_mul(x.npu(), c.npu(), s.npu(), rotate=rot.npu())
    _close(y, _ref_rope(x, c, s, "half"))


def test_apply_rotary_pos_emb_in_place(npu):
    q, k = _leaf(2, 5, 4, 8), _leaf(2, 5, 2, 8, seed=1)
    cos, sin = _leaf(2, 5, 1, 8, seed=2), _leaf(2, 5, 1, 8, seed=3)
    qn, kn = q.npu(), k.npu()
    qo, ko = tn.npu_apply_rotary_pos_emb(qn, kn, cos.npu(), sin.npu(), layout="BSND")
    assert qo is qn and ko is kn
    _close(qn, _ref_rope(q, cos, sin, "half"))
    _close(kn, _ref_rope(k, cos, sin, "half"))
    with pytest.raises(NotImplementedError, match="rotary_mode='quarter'"):
        tn.npu_apply_rotary_pos_emb(qn, kn, cos.npu(), sin.npu(), rotary_mode="quarter")


def test_swiglu(npu):
    xc, xn = _pair(_leaf(3, 4, 10))
    for dim in (-1, 1):
        xc.grad = xn.grad = None
        y = tn.npu_swiglu(xn, dim=dim)
        a, b = xc.chunk(2, dim=dim)
        ref = a * torch.sigmoid(a) * b
        _close(y, ref)
        y.pow(2).sum().backward()
        ref.pow(2).sum().backward()
        _grads_match([xc], [xn])


# --------------------------------------------------------------------------------- attention


def _sdpa(q, k, v, scale, masked=None, pse=None):
    """Reference on (B, N, S, D) with True = masked, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if pse is not None:
        bias = bias + pse
    if masked is not None:
        bias = bias.masked_fill(masked, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _bsnd(t):
    return t.transpose(1, 2)


def test_fusion_attention_causal_bsnd_with_grad(npu):
    B, N, Sq, Sk, D = 2, 4, 5, 7, 8
    qc, qn = _pair(_leaf(B, Sq, N, D))
    kc, kn = _pair(_leaf(B, Sk, N, D, seed=1))
    vc, vn = _pair(_leaf(B, Sk, N, D, seed=2))
    cmask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)  # transformers' compressed mask
    scale = 1 / math.sqrt(D)
    outs = tn.npu_fusion_attention(qn, kn, vn, N, "BSND", atten_mask=cmask.npu(), scale=scale, sparse_mode=3)
    assert len(outs) == 7 and outs[4:] == (0, 0, 0)
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None]
    bottom_right = j > i + (Sk - Sq)
    ref = _bsnd(_sdpa(_bsnd(qc), _bsnd(kc), _bsnd(vc), scale, bottom_right))
    _close(outs[0], ref)
    scores = (_bsnd(qc) @ _bsnd(kc).transpose(-1, -2) * scale).masked_fill(bottom_right, float("-inf"))
    mx = scores.amax(-1, keepdim=True)
    assert outs[1].shape == (B, N, Sq, 8)
    _close(outs[1][..., :1], mx)
    _close(outs[2][..., :1], torch.exp(scores - mx).sum(-1, keepdim=True))
    w = torch.randn(ref.shape)
    (outs[0] * w.npu()).sum().backward()
    (ref * w).sum().backward()
    _grads_match([qc, kc, vc], [qn, kn, vn])
    top_left = tn.npu_fusion_attention(
        qn, kn, vn, N, "BSND", atten_mask=cmask.npu(), scale=scale, sparse_mode=2
    )[0]
    _close(top_left, _bsnd(_sdpa(_bsnd(qc), _bsnd(kc), _bsnd(vc), scale, j > i)))


def test_fusion_attention_layouts_gqa_pse_band(npu):
    B, N, KV, S, D = 2, 4, 2, 6, 8
    q, k, v = _leaf(B, N, S, D), _leaf(B, KV, S, D, seed=1), _leaf(B, KV, S, D, seed=2)
    pse = _leaf(1, N, S, S, seed=3)
    mask = _leaf(B, 1, S, S, seed=4) > 0.8
    mask[..., 0] = False  # no fully masked row
    ref = _sdpa(q, k, v, 0.3, mask, pse)
    out = tn.npu_fusion_attention(
        q.npu(), k.npu(), v.npu(), N, "BNSD", pse=pse.npu(), atten_mask=mask.npu(), scale=0.3, sparse_mode=1
    )[0]
    _close(out, ref)
    bsh = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
    out = tn.npu_fusion_attention(
        bsh(q).npu(), bsh(k).npu(), bsh(v).npu(), N, "BSH", pse=pse.npu(), atten_mask=mask.npu(), scale=0.3
    )[0]
    _close(out, bsh(ref))
    sbh = lambda t: bsh(t).transpose(0, 1).contiguous()  # noqa: E731
    out = tn.npu_fusion_attention(
        sbh(q).npu(),
        sbh(k).npu(),
        sbh(v).npu(),
        N,
        "SBH",
        pse=pse.npu(),
        atten_mask=mask.npu(),
        scale=0.3,
        sparse_mode=1,
    )[0]
    _close(out, sbh(ref))
    # band (sparse_mode 4): keys within pre tokens before and next tokens after the diagonal
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    band = (j - i > 1) | (j - i < -2)
    out = tn.npu_fusion_attention(
        q.npu(),
        k.npu(),
        v.npu(),
        N,
        "BNSD",
        atten_mask=torch.ones(2048, 2048).bool().npu(),
        scale=0.3,
        pre_tockens=2,
        next_tockens=1,
        sparse_mode=4,
    )[0]
    _close(out, _sdpa(q, k, v, 0.3, band))
    # no atten_mask: full attention whatever the sparse mode says
    _close(
        tn.npu_fusion_attention(q.npu(), k.npu(), v.npu(), N, "BNSD", scale=0.3, sparse_mode=3)[0],
        _sdpa(q, k, v, 0.3),
    )


def test_fusion_attention_tnd_varlen(npu):
    N, D = 2, 4
    lens_q, lens_k = [3, 1, 4], [3, 2, 5]
    cq, ck = [3, 4, 8], [3, 5, 10]
    qc, qn = _pair(_leaf(8, N, D))
    kc, kn = _pair(_leaf(10, N, D, seed=1))
    vc, vn = _pair(_leaf(10, N, D, seed=2))
    cmask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    out = tn.npu_fusion_attention(
        qn,
        kn,
        vn,
        N,
        "TND",
        atten_mask=cmask.npu(),
        scale=0.5,
        actual_seq_qlen=cq,
        actual_seq_kvlen=ck,
        sparse_mode=3,
    )
    refs, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None]
        sub = lambda t, a, n: t[a : a + n].transpose(0, 1)[None]  # noqa: E731
        r = _sdpa(sub(qc, q0, lq), sub(kc, k0, lk), sub(vc, k0, lk), 0.5, j > i + (lk - lq))
        refs.append(r[0].transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    ref = torch.cat(refs)
    _close(out[0], ref)
    assert out[1].shape == (N, 8, 8)
    out[0].sum().backward()
    ref.sum().backward()
    _grads_match([qc, kc, vc], [qn, kn, vn])


def test_prompt_flash_attention(npu):
    B, N, KV, S, D = 2, 4, 2, 6, 8
    q, k, v = _leaf(B, N, S, D), _leaf(B, KV, S, D, seed=1), _leaf(B, KV, S, D, seed=2)
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    bsh = lambda t: t.transpose(1, 2).reshape(B, S, -1)  # noqa: E731
    out = tn.npu_prompt_flash_attention(
        bsh(q).npu(),
        bsh(k).npu(),
        bsh(v).npu(),
        atten_mask=causal.npu(),
        num_heads=N,
        num_key_value_heads=KV,
        scale_value=0.25,
        input_layout="BSH",
    )
    _close(out, bsh(_sdpa(q, k, v, 0.25, causal)))
    out = tn.npu_prompt_flash_attention(
        q.npu(),
        k.npu(),
        v.npu(),
        num_heads=N,
        num_key_value_heads=KV,
        scale_value=0.25,
        input_layout="BNSD_BSND",
    )
    _close(out, _sdpa(q, k, v, 0.25).transpose(1, 2))
    # per-batch valid kv lengths mask the tail keys; query rows past actual_seq_lengths are zero
    kvlen = torch.arange(S)[None, None, None] >= torch.tensor([4, 6]).view(B, 1, 1, 1)
    out = tn.npu_prompt_flash_attention(
        q.npu(),
        k.npu(),
        v.npu(),
        num_heads=N,
        num_key_value_heads=KV,
        scale_value=0.25,
        input_layout="BNSD",
        actual_seq_lengths=[5, 6],
        actual_seq_lengths_kv=[4, 6],
    ).cpu()
    ref = _sdpa(q, k, v, 0.25, kvlen)
    _close(out[1], ref[1])
    _close(out[0, :, :5], ref[0, :, :5])
    assert torch.count_nonzero(out[0, :, 5:]) == 0


def test_incre_flash_attention(npu):
    B, N, KV, S, D = 3, 4, 1, 9, 8
    q, k, v = _leaf(B, N, 1, D), _leaf(B, KV, S, D, seed=1), _leaf(B, KV, S, D, seed=2)
    lens = [9, 4, 6]
    masked = torch.arange(S)[None, None, None] >= torch.tensor(lens).view(B, 1, 1, 1)
    bsh = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], -1)  # noqa: E731
    out = tn.npu_incre_flash_attention(
        bsh(q).npu(),
        bsh(k).npu(),
        bsh(v).npu(),
        actual_seq_lengths=lens,
        num_heads=N,
        num_key_value_heads=KV,
        scale_value=1 / math.sqrt(D),
    )
    ref = _sdpa(q, k, v, 1 / math.sqrt(D), masked)
    _close(out, bsh(ref))
    am = masked.view(B, 1, 1, S).to(torch.uint8)  # 1 = masked, as torch_npu
    out = tn.npu_incre_flash_attention(
        q.npu(),
        k.npu(),
        v.npu(),
        atten_mask=am.npu(),
        num_heads=N,
        num_key_value_heads=KV,
        scale_value=1 / math.sqrt(D),
        input_layout="BNSD",
    )
    _close(out, ref)
    with pytest.raises(NotImplementedError, match="block_table"):
        tn.npu_incre_flash_attention(
            q.npu(),
            k.npu(),
            v.npu(),
            block_table=torch.zeros(1, 1, dtype=torch.int32),
            num_heads=N,
            input_layout="BNSD",
        )


# ------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)])
def test_moe_gating_top_k_softmax(npu, shape):
    x = _leaf(*shape).half()
    fin = torch.zeros(shape[:-1], dtype=torch.bool)
    fin.view(-1)[1] = True
    y, idx, row = tn.npu_moe_gating_top_k_softmax(x.npu(), fin.npu(), k=3)
    p = torch.softmax(x.float(), -1)
    ry, ridx = p.topk(3, -1)
    assert y.dtype == torch.float16 and idx.dtype == torch.int32 and row.dtype == torch.int32
    _close(y, ry.half(), 1e-3)
    ridx = ridx.to(torch.int32)
    ridx[fin] = shape[-1]  # finished rows route to expert E
    assert torch.equal(idx.cpu(), ridx)
    rows = fin.numel()
    ref_row = torch.arange(rows * 3, dtype=torch.int32).reshape(3, rows).t().reshape(*shape[:-1], 3)
    assert torch.equal(row.cpu(), ref_row)


# ---------------------------------------------------------------------- format / dtype / layout


def test_format_and_dtype_cast(npu):
    x = torch.randn(2, 3).npu()
    y = tn.npu_format_cast(x, 29)
    assert tn.get_npu_format(y) == 29 and tn.get_npu_format(x) == 2
    assert torch.equal(y.cpu(), x.cpu()) and y._a is x._a
    xc, xn = _pair(torch.tensor([0.0, 0.5, -1.25]))
    h = tn.npu_dtype_cast(xn, 5)  # c10 ScalarType 5 = float16
    assert h.dtype == torch.float16
    assert tn.npu_dtype_cast(xn, dtype=torch.int).cpu().tolist() == [0, 0, -1]
    (h.float() * 3).sum().backward()
    assert xn.grad.cpu().tolist() == [3.0, 3.0, 3.0]


def test_confusion_transpose(npu):
    xc, xn = _pair(_leaf(2, 3, 4, 6))
    y = tn.npu_confusion_transpose(xn, (0, 2, 1, 3), (2, 4, 18), True)
    ref = xc.permute(0, 2, 1, 3).reshape(2, 4, 18)
    assert y.shape == (2, 4, 18) and y.is_contiguous()
    _close(y, ref)
    y2 = tn.npu_confusion_transpose(xn, (0, 2, 1), (2, 12, 6), False)
    ref2 = xc.reshape(2, 12, 6).permute(0, 2, 1)
    assert y2.shape == (2, 6, 12)
    _close(y2, ref2)
    (y.sum() * 2 + (y2 * y2).sum()).backward()
    (ref.sum() * 2 + (ref2 * ref2).sum()).backward()
    _grads_match([xc], [xn])


def test_shim_exports_and_names_missing_ops(npu):
    spec = importlib.util.spec_from_file_location("_torch_npu_shim_under_test", SHIM)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in tn.__all__:
        assert getattr(mod, name) is getattr(tn, name)
    assert mod.npu is torch.npu
    with pytest.raises(
        AttributeError, match=r"torch_npu\.npu_grouped_matmul is not provided under FlexNPU.*npu_rms_norm"
    ):
        mod.npu_grouped_matmul
    assert not hasattr(mod, "npu_mla_prolog")  # feature checks fall back cleanly
