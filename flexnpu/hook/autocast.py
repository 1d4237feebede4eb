"""``torch.autocast("npu", dtype=...)``: the casting policy torch uses for CUDA, in Python.

torch registers autocast kernels for cuda/cpu in C++; for PrivateUse1 nothing is registered, so
without this every op under ``autocast("npu")`` fails. Kernels on AutocastPrivateUse1 (a fallthrough for all other ops)
casts floating-point tensor arguments of matmul-like ops to the autocast dtype and of
precision-sensitive ops to float32 (CUDA's lists, abridged), then re-dispatches below autocast.
Other ops pass through unchanged (they follow their inputs, as "promote" ops do on CUDA).
"""

from __future__ import annotations

import torch

_LOWER = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "matmul",
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "prelu",
        "addmv",
        "addr",
        "mv",
        "chain_matmul",
        "multi_dot",
        "scaled_dot_product_attention",
        "_scaled_dot_product_attention_math",
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
    }
)
_FP32 = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow",
        "softplus",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "frobenius_norm",
        "nuclear_norm",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "nll_loss2d",
        "nll_loss_nd",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "cdist",
        "renorm",
        "logsumexp",
        "softmax",
        "log_softmax",
        "_softmax",
        "_log_softmax",
        "cross_entropy_loss",
        "cumprod",
        "cumsum",
        "sum",
        "prod",
        "norm",
        "linalg_vector_norm",
        "rms_norm",
    }
)
_LOW_FLOATS = (torch.float16, torch.bfloat16)
_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)  # type: ignore[attr-defined]  # missing from torch's stubs


def _cast(x, dtype, only_from):
    if isinstance(x, torch.Tensor):
        if (
            x.is_floating_point()
            and x.dtype != dtype
            and (only_from is None or x.dtype in only_from)
            and x.device.type == "npu"
        ):
            return x.to(dtype)
        return x
    if isinstance(x, (list, tuple)):
        out = [_cast(v, dtype, only_from) for v in x]
        return out if isinstance(x, list) else tuple(out)
    return x


def _kernel(op, lower: bool):
    def kernel(*args, **kwargs):
        if lower:
            dt = torch.get_autocast_dtype("npu")
            args, kwargs = _cast(args, dt, None), {k: _cast(v, dt, None) for k, v in kwargs.items()}
        else:
            args = _cast(args, torch.float32, _LOW_FLOATS)
            kwargs = {k: _cast(v, torch.float32, _LOW_FLOATS) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)

    return kernel


def register(fallback_lib: torch.library.Library, aten_lib: torch.library.Library) -> None:
    """Pass every op through AutocastPrivateUse1, except the listed ones, which cast first."""
    fallback_lib.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    for names, lower in ((_LOWER, True), (_FP32, False)):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is None:
                continue
            for ov in packet.overloads():
                op = getattr(packet, ov)
                if any("out" == a.name for a in op._schema.arguments):
                    continue  # out= variants keep the caller's dtypes
                aten_lib.impl(
                    name if ov == "default" else f"{name}.{ov}", _kernel(op, lower), "AutocastPrivateUse1"
                )
