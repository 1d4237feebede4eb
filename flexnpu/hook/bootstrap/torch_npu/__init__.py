"""`torch_npu` under `flexnpu run`: the npu device is FlexNPU's (this shim is on PYTHONPATH only
there; without FlexNPU the real torch_npu package is imported as usual).

Besides registering the device it offers the few torch_npu fused ops that common libraries
import (transformers imports ``npu_fusion_attention`` as soon as torch_npu is present),
implemented with aten ops so they run through the daemon like everything else.
"""
from __future__ import annotations

import math

import torch

from flexnpu.hook import install_torch_device

install_torch_device()

npu = torch.npu
__version__ = "flexnpu-shim"
FLEXNPU = True

_CAUSAL_TOP_LEFT, _CAUSAL_BOTTOM_RIGHT = 2, 3


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    """torch_npu's fused attention for layouts BNSD/BSND/BSH/SBH (pse, padding_mask, varlen:
    unsupported). ``atten_mask`` is boolean, True = masked; sparse_mode 2/3 = causal aligned
    top-left/bottom-right. Returns torch_npu's 7-tuple; only the first element is computed."""
    if pse is not None or padding_mask is not None or actual_seq_qlen is not None or prefix is not None:
        raise NotImplementedError("npu_fusion_attention on FlexNPU: pse, padding_mask, prefix and varlen "
                                  "inputs are not supported")
    layout = input_layout.upper()

    def to_bnsd(t):
        if layout == "BNSD":
            return t
        if layout == "BSND":
            return t.transpose(1, 2)
        if layout == "BSH":
            b, s, h = t.shape
            return t.view(b, s, head_num, h // head_num).transpose(1, 2)
        if layout == "SBH":
            s, b, h = t.shape
            return t.view(s, b, head_num, h // head_num).permute(1, 2, 0, 3)
        raise NotImplementedError(f"npu_fusion_attention on FlexNPU: layout {input_layout!r} not supported")

    q, k, v = to_bnsd(query), to_bnsd(key), to_bnsd(value)
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if sparse_mode in (_CAUSAL_TOP_LEFT, _CAUSAL_BOTTOM_RIGHT):
        diag = 1 if sparse_mode == _CAUSAL_TOP_LEFT else sk - sq + 1
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(diag)
    elif atten_mask is not None:
        mask = atten_mask.to(torch.bool)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if keep_prob < 1.0:
        probs = torch.nn.functional.dropout(probs, p=1.0 - keep_prob)
    out = torch.matmul(probs, v)
    if layout == "BSND":
        out = out.transpose(1, 2).contiguous()
    elif layout == "BSH":
        out = out.transpose(1, 2).reshape(query.shape[0], sq, -1)
    elif layout == "SBH":
        out = out.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1)
    return (out, None, None, None, 0, 0, 0)
