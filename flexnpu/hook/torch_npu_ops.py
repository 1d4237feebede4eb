"""torch_npu's own fused operators, composed from aten ops (so they run on the daemon like any
other npu work, and autograd differentiates them where torch_npu does).

Signatures, defaults and output tuples follow torch_npu / op-plugin (``op_plugin_functions.yaml``
and the torch_npu API docs); docs/torch_npu_ops.md has the table and what each one leaves out.
Every function here is exported by the ``torch_npu`` shim FlexNPU puts on the path; a
``torch_npu.npu_*`` name that is not here raises an AttributeError naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INT_MAX = 2147483647

__all__ = [
    "npu_rms_norm",
    "npu_add_rms_norm",
    "npu_rotary_mul",
    "npu_apply_rotary_pos_emb",
    "npu_swiglu",
    "npu_fusion_attention",
    "npu_incre_flash_attention",
    "npu_prompt_flash_attention",
    "npu_moe_gating_top_k_softmax",
    "npu_format_cast",
    "npu_format_cast_",
    "get_npu_format",
    "npu_dtype_cast",
    "npu_confusion_transpose",
]


def _unsupported(op: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"torch_npu.{op} on FlexNPU: {what} is not supported")


# --------------------------------------------------------------------------------- norms


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """-> (y, rstd). Normalizes over the trailing ``gamma.dim()`` dims; rstd is float32 with
    those dims kept as 1 (torch_npu's shape), and carries no gradient."""
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    if not dims or tuple(self.shape[-gamma.dim() :]) != tuple(gamma.shape):
        raise ValueError(
            f"npu_rms_norm: gamma of shape {tuple(gamma.shape)} must match the trailing dims "
            f"of x {tuple(self.shape)}"
        )
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    y = (xf * rstd * gamma.float()).to(self.dtype)
    return y, rstd.detach()


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """-> (y, rstd, x) with x = x1 + x2 and (y, rstd) = npu_rms_norm(x, gamma, epsilon)."""
    x = x1 + x2
    if x.dtype != x1.dtype:
        x = x.to(x1.dtype)
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


# -------------------------------------------------------------------------------- rotary


def _rotate(x: torch.Tensor, mode: str, op: str) -> torch.Tensor:
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if mode == "interleave":
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    raise _unsupported(op, f"rotary_mode={mode!r}")


def npu_rotary_mul(
    self: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
    rotate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x * r1 + rotate(x) * r2 (RoPE); ``rotate`` (D x D) replaces the rotation by x @ rotate."""
    rot = torch.matmul(self, rotate) if rotate is not None else _rotate(self, rotary_mode, "npu_rotary_mul")
    return self * r1 + rot * r2


def npu_apply_rotary_pos_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "BSND",
    rotary_mode: str = "half",
):
    """RoPE on query and key in place (cos/sin broadcast as laid out); returns (query, key).
    If cos/sin are narrower than D, only the first cos.shape[-1] features rotate."""
    if layout.upper() not in ("BSND", "SBND", "BNSD", "TND"):
        raise _unsupported("npu_apply_rotary_pos_emb", f"layout={layout!r}")
    d = cos.shape[-1]
    for t in (query, key):
        part = t[..., :d] if d < t.shape[-1] else t
        rot = _rotate(part, rotary_mode, "npu_apply_rotary_pos_emb")
        part.copy_(part * cos + rot * sin)
    return query, key


# ------------------------------------------------------------------------------ activations


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """silu(A) * B where A, B are the two halves of x along ``dim`` (computed in float32)."""
    a, b = self.chunk(2, dim=dim)
    return (torch.nn.functional.silu(a.float()) * b.float()).to(self.dtype)


# ---------------------------------------------------------------------------------- attention


def _to_bnsd(t: torch.Tensor, layout: str, heads: int, op: str) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        b, s, h = t.shape
        return t.reshape(b, s, heads, h // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, h = t.shape
        return t.reshape(s, b, heads, h // heads).permute(1, 2, 0, 3)
    raise _unsupported(op, f"input_layout={layout!r}")


def _from_bnsd(o: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return o.contiguous()
    if layout == "BSND":
        return o.transpose(1, 2).contiguous()
    if layout == "BSH":
        b, n, s, d = o.shape
        return o.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        b, n, s, d = o.shape
        return o.permute(2, 0, 1, 3).reshape(s, b, n * d)
    raise AssertionError(layout)


def _band(sq: int, sk: int, pre: int, nxt: int, shift: int, device) -> torch.Tensor:
    """True where query row i may NOT see key j: outside shift - pre <= j - i <= shift + nxt."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    rel = j - i - shift
    return (rel > nxt) | (rel < -pre)


def _sparse_mask(
    op: str,
    atten_mask,
    sparse_mode: int,
    pre: int,
    nxt: int,
    sq: int,
    sk: int,
    device,
    default_band: bool = True,
):
    """The boolean mask (True = masked) the sparse mode describes, broadcastable to (B, N, Sq, Skv)."""
    if atten_mask is None:
        return None  # torch_npu: without atten_mask, sparse_mode/pre/next do not apply (full attention)
    if sparse_mode in (0, 1):
        m = atten_mask.to(torch.bool)
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            m = m.unsqueeze(1)
        m = m[..., :sq, :sk]
        if sparse_mode == 0 and default_band and (pre < sq or nxt < sk):
            m = m | _band(sq, sk, min(pre, INT_MAX), min(nxt, INT_MAX), 0, device)
        return m
    if sparse_mode == 2:  # causal, aligned top-left
        return _band(sq, sk, INT_MAX, 0, 0, device)
    if sparse_mode == 3:  # causal, aligned bottom-right
        return _band(sq, sk, INT_MAX, 0, sk - sq, device)
    if sparse_mode == 4:  # band between pre and next tokens, aligned bottom-right
        return _band(sq, sk, pre, nxt, sk - sq, device)
    raise _unsupported(op, f"sparse_mode={sparse_mode} (prefix/varlen-split modes)")


def _attend(q, k, v, scale: float, mask, pse=None, keep_prob: float = 1.0):
    """softmax(scale * q k^T + pse, masked) v on (B, N, S, D) tensors, in float32.
    Returns (out in q.dtype, row max, row sum of exp) ; fully masked rows give zeros."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if q.shape[1] % k.shape[1]:
            raise ValueError(
                f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
            )
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if pse is not None:
        s = s + pse.float()
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True).detach()
    mx = mx.masked_fill(mx == float("-inf"), 0.0)
    e = torch.exp(s - mx)
    sm = e.sum(dim=-1, keepdim=True)
    p = e / sm.clamp_min(torch.finfo(torch.float32).tiny)
    if keep_prob < 1.0:
        p = torch.nn.functional.dropout(p, p=1.0 - keep_prob)
    out = torch.matmul(p, v.float()).to(q.dtype)
    return out, mx, sm


def _segments(cum: Sequence[int], total: int, op: str, name: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    start = 0
    for c in cum:
        c = int(c)
        if c == 0 and out:  # trailing batches that do not take part
            out.append((start, start))
            continue
        if c < start or c > total:
            raise ValueError(f"{op}: {name} must be non-decreasing cumulative lengths within {total}")
        out.append((start, c))
        start = c
    return out


def npu_fusion_attention(
    query,
    key,
    value,
    head_num,
    input_layout,
    pse=None,
    padding_mask=None,
    atten_mask=None,
    scale=1.0,
    keep_prob=1.0,
    pre_tockens=INT_MAX,
    next_tockens=INT_MAX,
    inner_precise=0,
    prefix=None,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
    sparse_mode=0,
    gen_mask_parallel=True,
    sync=False,
    softmax_layout="",
    sink=None,
    dropout_mask=None,
    seed=0,
    offset=0,
):
    """torch_npu's training attention. Layouts BSH/SBH/BSND/BNSD and TND (varlen, cumulative
    actual_seq_qlen/kvlen); atten_mask True = masked; sparse_mode 0-4; pse added to the scaled
    scores; GQA. Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset,
    numels): softmax_max/sum are float32 with torch_npu's trailing 8 (NTD-ordered for TND);
    softmax_out is empty (reserved in torch_npu too)."""
    op = "npu_fusion_attention"
    if padding_mask is not None or prefix is not None or sink is not None or dropout_mask is not None:
        raise _unsupported(op, "padding_mask/prefix/sink/dropout_mask")
    layout = input_layout.upper()
    if layout == "TND":
        return _fusion_attention_tnd(
            query,
            key,
            value,
            head_num,
            pse,
            atten_mask,
            scale,
            keep_prob,
            pre_tockens,
            next_tockens,
            actual_seq_qlen,
            actual_seq_kvlen,
            sparse_mode,
        )
    q, k, v = (
        _to_bnsd(t, layout, head_num if t is query else _kv_heads(t, layout, query, head_num), op)
        for t in (query, key, value)
    )
    sq, sk = q.shape[2], k.shape[2]
    mask = _sparse_mask(op, atten_mask, sparse_mode, pre_tockens, next_tockens, sq, sk, q.device)
    out, mx, sm = _attend(q, k, v, scale, mask, pse, keep_prob)
    b, n = q.shape[0], q.shape[1]
    return (
        _from_bnsd(out, layout),
        mx.expand(b, n, sq, 8).contiguous(),
        sm.expand(b, n, sq, 8).contiguous(),
        torch.empty(0, dtype=query.dtype, device=query.device),
        0,
        0,
        0,
    )


def _kv_heads(t, layout: str, query, head_num: int) -> int:
    """Heads of key/value in a fused layout: H_kv / D, with D taken from the query."""
    if layout in ("BSH", "SBH"):
        d = query.shape[-1] // head_num
        return t.shape[-1] // d
    return head_num


def _fusion_attention_tnd(
    query, key, value, head_num, pse, atten_mask, scale, keep_prob, pre, nxt, qlen, kvlen, sparse_mode
):
    op = "npu_fusion_attention"
    if qlen is None or kvlen is None:
        raise ValueError(f"{op}: input_layout='TND' needs actual_seq_qlen and actual_seq_kvlen")
    if pse is not None:
        raise _unsupported(op, "pse with input_layout='TND'")
    qs = _segments(qlen, query.shape[0], op, "actual_seq_qlen")
    ks = _segments(kvlen, key.shape[0], op, "actual_seq_kvlen")
    if len(qs) != len(ks):
        raise ValueError(f"{op}: actual_seq_qlen and actual_seq_kvlen must have one entry per batch")
    outs, mxs, sms = [], [], []
    for (q0, q1), (k0, k1) in zip(qs, ks):
        if q1 == q0:
            continue
        q = query[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, N, s, D)
        k = key[k0:k1].transpose(0, 1).unsqueeze(0)
        v = value[k0:k1].transpose(0, 1).unsqueeze(0)
        mask = _sparse_mask(op, atten_mask, sparse_mode, pre, nxt, q1 - q0, k1 - k0, query.device)
        o, mx, sm = _attend(q, k, v, scale, mask, None, keep_prob)
        outs.append(o[0].transpose(0, 1))
        mxs.append(mx[0])
        sms.append(sm[0])
    out = torch.cat(outs, 0) if outs else query.new_zeros(0, *query.shape[1:-1], value.shape[-1])
    t_used = out.shape[0]
    if t_used < query.shape[0]:  # rows past the last batch
        out = torch.cat([out, out.new_zeros(query.shape[0] - t_used, *out.shape[1:])], 0)
    n = query.shape[1]
    mx = torch.cat(mxs, 1) if mxs else query.new_zeros(n, 0, 1, dtype=torch.float32)
    sm = torch.cat(sms, 1) if sms else query.new_zeros(n, 0, 1, dtype=torch.float32)
    return (
        out,
        mx.expand(n, mx.shape[1], 8).contiguous(),
        sm.expand(n, sm.shape[1], 8).contiguous(),
        torch.empty(0, dtype=query.dtype, device=query.device),
        0,
        0,
        0,
    )


def _lengths(lens, batch: int, op: str, name: str) -> list[int] | None:
    if lens is None:
        return None
    lens = [int(x) for x in (lens.tolist() if isinstance(lens, torch.Tensor) else lens)]
    if len(lens) == 1:
        return lens * batch
    if len(lens) < batch:
        raise ValueError(f"{op}: {name} needs 1 or at least B={batch} entries, got {len(lens)}")
    return lens[:batch]


def _valid_kv_mask(lens: list[int], sk: int, device) -> torch.Tensor:
    """(B, 1, 1, Skv) True where key position j >= the batch's valid length."""
    j = torch.arange(sk, device=device)
    lim = torch.tensor(lens, device=device).view(-1, 1, 1, 1)
    return j.view(1, 1, 1, -1) >= lim


def _check_unquantized(op: str, **kw) -> None:
    used = [k for k, v in kw.items() if v is not None]
    if used:
        raise _unsupported(op, "quantization / paged-KV arguments (" + ", ".join(used) + ")")


def npu_prompt_flash_attention(
    query,
    key,
    value,
    *,
    padding_mask=None,
    atten_mask=None,
    pse_shift=None,
    actual_seq_lengths=None,
    deq_scale1=None,
    quant_scale1=None,
    deq_scale2=None,
    quant_scale2=None,
    quant_offset2=None,
    num_heads=1,
    scale_value=1.0,
    pre_tokens=INT_MAX,
    next_tokens=0,
    input_layout="BSH",
    num_key_value_heads=0,
    actual_seq_lengths_kv=None,
    sparse_mode=0,
):
    """Prefill attention: softmax(scale * Q K^T + pse_shift, atten_mask) V with layouts
    BSH/BSND/BNSD/BNSD_BSND/TND; atten_mask True/1 = masked; sparse_mode 0-4; GQA via
    num_key_value_heads; per-batch valid lengths of query (rows past it are zero) and key/value."""
    op = "npu_prompt_flash_attention"
    _check_unquantized(
        op,
        deq_scale1=deq_scale1,
        quant_scale1=quant_scale1,
        deq_scale2=deq_scale2,
        quant_scale2=quant_scale2,
        quant_offset2=quant_offset2,
    )
    layout = input_layout.upper()
    kvh = num_key_value_heads or num_heads
    if layout == "TND":
        if actual_seq_lengths is None or actual_seq_lengths_kv is None:
            raise ValueError(f"{op}: input_layout='TND' needs actual_seq_lengths and actual_seq_lengths_kv")
        return npu_fusion_attention(
            query,
            key,
            value,
            num_heads,
            "TND",
            atten_mask=atten_mask,
            scale=scale_value,
            pre_tockens=pre_tokens,
            next_tockens=next_tokens,
            actual_seq_qlen=list(actual_seq_lengths),
            actual_seq_kvlen=list(actual_seq_lengths_kv),
            sparse_mode=sparse_mode,
        )[0]
    in_layout, out_layout = ("BNSD", "BSND") if layout == "BNSD_BSND" else (layout, layout)
    q = _to_bnsd(query, in_layout, num_heads, op)
    k = _to_bnsd(key, in_layout, kvh, op)
    v = _to_bnsd(value, in_layout, kvh, op)
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    if sparse_mode == 0 and atten_mask is None:
        mask = None
    else:
        mask = _sparse_mask(op, atten_mask, sparse_mode, pre_tokens, next_tokens, sq, sk, q.device)
    kv_lens = _lengths(actual_seq_lengths_kv, b, op, "actual_seq_lengths_kv")
    if kv_lens is not None:
        kvm = _valid_kv_mask(kv_lens, sk, q.device)
        mask = kvm if mask is None else (mask | kvm)
    out, _, _ = _attend(q, k, v, scale_value, mask, pse_shift)
    q_lens = _lengths(actual_seq_lengths, b, op, "actual_seq_lengths")
    if q_lens is not None:
        rows = torch.arange(sq, device=q.device).view(1, 1, -1, 1) < torch.tensor(
            q_lens, device=q.device
        ).view(-1, 1, 1, 1)
        out = out * rows.to(out.dtype)
    return _from_bnsd(out, out_layout)


def npu_incre_flash_attention(
    query,
    key,
    value,
    *,
    padding_mask=None,
    atten_mask=None,
    pse_shift=None,
    actual_seq_lengths=None,
    antiquant_scale=None,
    antiquant_offset=None,
    block_table=None,
    dequant_scale1=None,
    quant_scale1=None,
    dequant_scale2=None,
    quant_scale2=None,
    quant_offset2=None,
    kv_padding_size=None,
    num_heads=1,
    scale_value=1.0,
    input_layout="BSH",
    num_key_value_heads=0,
    block_size=0,
    inner_precise=1,
):
    """Decode attention (one query token per batch): softmax(scale * q K^T + pse_shift, atten_mask) V
    over the first actual_seq_lengths[b] keys; layouts BSH/BSND/BNSD; GQA via num_key_value_heads."""
    op = "npu_incre_flash_attention"
    _check_unquantized(
        op,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        block_table=block_table,
        dequant_scale1=dequant_scale1,
        quant_scale1=quant_scale1,
        dequant_scale2=dequant_scale2,
        quant_scale2=quant_scale2,
        quant_offset2=quant_offset2,
        kv_padding_size=kv_padding_size,
    )
    if isinstance(key, (list, tuple)):
        key, value = torch.cat(list(key), 0), torch.cat(list(value), 0)
    layout = input_layout.upper()
    if layout not in ("BSH", "BSND", "BNSD"):
        raise _unsupported(op, f"input_layout={input_layout!r}")
    kvh = num_key_value_heads or num_heads
    q = _to_bnsd(query, layout, num_heads, op)
    k = _to_bnsd(key, layout, kvh, op)
    v = _to_bnsd(value, layout, kvh, op)
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    mask = None
    if atten_mask is not None:
        m = atten_mask.to(torch.bool)
        m = m.reshape(m.shape[0], 1, 1, m.shape[-1]) if m.dim() in (2, 3) else m
        mask = m[..., :sk]
    lens = _lengths(actual_seq_lengths, b, op, "actual_seq_lengths")
    if lens is not None:
        kvm = _valid_kv_mask(lens, sk, q.device)
        mask = kvm if mask is None else (mask | kvm)
    out, _, _ = _attend(q, k, v, scale_value, mask, pse_shift)
    return _from_bnsd(out, layout)


# ---------------------------------------------------------------------------------- MoE routing


def npu_moe_gating_top_k_softmax(x: torch.Tensor, finished: torch.Tensor | None = None, k: int = 1):
    """-> (y, expert_idx, row_idx): top-k of softmax(x) over experts (y in x's dtype, indices
    int32); rows marked ``finished`` get expert index E (= number of experts); row_idx[r, j] = j*R + r
    over the R flattened rows."""
    if x.dim() not in (2, 3):
        raise ValueError(f"npu_moe_gating_top_k_softmax: x must be 2-D or 3-D, got {x.dim()}-D")
    e = x.shape[-1]
    if not 0 < k <= e:
        raise ValueError(f"npu_moe_gating_top_k_softmax: k={k} must be in 1..{e}")
    p = torch.softmax(x.float(), dim=-1)
    y, idx = torch.topk(p, k, dim=-1)
    idx = idx.to(torch.int32)
    if finished is not None:
        idx = torch.where(finished.to(torch.bool).unsqueeze(-1), torch.full_like(idx, e), idx)
    rows = x.numel() // e
    row_idx = (
        torch.arange(rows * k, dtype=torch.int32, device=x.device).view(k, rows).t().reshape(*x.shape[:-1], k)
    )
    return y.to(x.dtype), idx, row_idx.contiguous()


# ------------------------------------------------------------------------- format / dtype / layout

ACL_FORMAT_ND = 2


def npu_format_cast(self: torch.Tensor, acl_format, customize_dtype=None, input_dtype=None) -> torch.Tensor:
    """FlexNPU keeps every tensor in ND layout, so values never change: the result shares the
    tensor's memory and remembers the requested format for get_npu_format."""
    fmt = acl_format if isinstance(acl_format, int) else get_npu_format(acl_format)
    out = self.view(self.shape)
    out._npu_format = int(fmt)  # type: ignore[attr-defined]  # our own tag, read by get_npu_format
    return out


def npu_format_cast_(self: torch.Tensor, src, customize_dtype=None, input_dtype=None) -> torch.Tensor:
    self._npu_format = int(src if isinstance(src, int) else get_npu_format(src))  # type: ignore[attr-defined]  # our tag
    return self


def get_npu_format(t: torch.Tensor) -> int:
    return int(getattr(t, "_npu_format", ACL_FORMAT_ND))


# c10::ScalarType numbering, which torch_npu's integer dtype arguments use
_SCALAR_TYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    9: torch.complex64,
    10: torch.complex128,
    11: torch.bool,
    15: torch.bfloat16,
}


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return _SCALAR_TYPES[int(d)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"npu_dtype_cast: unsupported dtype {d!r}") from None


def npu_dtype_cast(self: torch.Tensor, dtype, input_dtype=None) -> torch.Tensor:
    """``self.to(dtype)`` (dtype as torch.dtype or c10 ScalarType number); differentiable."""
    return self.to(_dtype(dtype))


def npu_confusion_transpose(
    self: torch.Tensor, perm: Sequence[int], shape: Sequence[int], transpose_first: bool
) -> torch.Tensor:
    """permute-then-reshape (transpose_first) or reshape-then-permute, contiguous result."""
    if transpose_first:
        return self.permute(*perm).reshape(*shape).contiguous()
    return self.reshape(*shape).permute(*perm).contiguous()
