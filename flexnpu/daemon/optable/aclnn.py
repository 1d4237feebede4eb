"""The aclnn operators: ``aclnn::Xxx`` -> torch, one entry per signature of flexnpu/aclnn_api.py.

Each entry computes its result from the argument views and writes it into the caller's output
tensors with ``put`` (results are computed before anything is written, so an output that
overlaps an input is safe; the in-place form of register_value entries is used only where
nothing overlaps). Semantics follow CANN's aclnn reference: operators compute in the
promoted dtype of their inputs and cast to the output's dtype; ``Inplace*`` write ``selfRef``.

Where a result's size follows from scalar arguments (arange, linspace, repeat, pad, eye, the
embedding gradient's row count) it is checked against the caller's output *before* anything is
computed: the daemon never materialises more than the client declared and holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ...ops import aclnn_api as api
from . import Args, LaunchError, put, register, register_value

aten = torch.ops.aten


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the two views may touch the same bytes (same storage, overlapping spans)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        lo = int(t.storage_offset()) * t.element_size()
        last = sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1)
        return lo, lo + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _expect_shape(op: str, out: torch.Tensor, shape: Iterable[int], what: str = "out") -> None:
    shape = tuple(shape)
    if tuple(out.shape) != shape:
        raise LaunchError(f"{op}: {what} has shape {tuple(out.shape)}, the result has shape {shape}")


def _dims(t: torch.Tensor, dims: list[int] | None) -> list[int]:
    """aclnn's empty dim list means every dimension."""
    return list(range(t.dim())) if not dims else list(dims)


def _dim_size(t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0:
        return 1
    if not -t.dim() <= dim < t.dim():
        raise LaunchError(f"dimension {dim} out of range for a {t.dim()}-d tensor")
    return int(t.size(dim))


# ------------------------------------------------------------------ elementwise, generic
_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Exp2": torch.exp2,
    "Expm1": torch.expm1,
    "Log": torch.log,
    "Log2": torch.log2,
    "Log10": torch.log10,
    "Log1p": torch.log1p,
    "Sqrt": torch.sqrt,
    "Rsqrt": torch.rsqrt,
    "Reciprocal": torch.reciprocal,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Tanh": torch.tanh,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Erf": torch.erf,
    "Erfc": torch.erfc,
    "Sigmoid": torch.sigmoid,
    "Silu": F.silu,
    "Gelu": F.gelu,
    "Relu": torch.relu,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Trunc": torch.trunc,
    "Frac": torch.frac,
    "Sign": torch.sign,
    "LogicalNot": torch.logical_not,
    "BitwiseNot": torch.bitwise_not,
    "IsFinite": torch.isfinite,
    "IsInf": torch.isinf,
    "IsNan": torch.isnan,
    "Signbit": torch.signbit,
    "Mish": F.mish,
    "Hardswish": F.hardswish,
    "Hardsigmoid": F.hardsigmoid,
}


def _float_input(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Integer inputs of floating functions compute in float32 (as aclnn's do, and torch's).
    Extra keyword arguments (``out=``) go to ``fn``."""

    def g(x: torch.Tensor, **kw: Any) -> torch.Tensor:
        if not (x.is_floating_point() or x.is_complex()) and fn not in _INT_OK:
            x = x.float()
        return fn(x, **kw)

    return g


# Unary functions that take out= (what register_value needs); the rest compute and put.
_UNARY_OUT: dict[str, Callable[..., torch.Tensor]] = {
    n: f
    for n, f in _UNARY.items()
    if f not in (F.silu, F.gelu, F.mish, F.hardswish, F.hardsigmoid)
    and n not in ("IsFinite", "IsInf", "IsNan", "Relu")
}
_UNARY_OUT["Silu"] = torch._C._nn.silu  # F.silu's own kernel; it takes out= (F.silu does not)


_INT_OK: set[Any] = {
    torch.abs,
    torch.neg,
    torch.sign,
    torch.logical_not,
    torch.bitwise_not,
    torch.isfinite,
    torch.isinf,
    torch.isnan,
    torch.signbit,
    torch.floor,
    torch.ceil,
    torch.round,
    torch.trunc,
    torch.relu,
}


def _reg_unary(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    f = _float_input(fn)
    if name in _UNARY_OUT:
        fo = _float_input(_UNARY_OUT[name])
        register_value(f"aclnn::{name}", lambda a, out: fo(a["self"], out=out))
    else:

        @register(f"aclnn::{name}", writes=["out"])
        def _op(a: Args) -> None:
            put(a["out"], f(a["self"]))

    if name in api.UNARY_INPLACE:

        @register(f"aclnn::Inplace{name}", writes=["selfRef"])
        def _iop(a: Args) -> None:
            put(a["selfRef"], f(a["selfRef"]), "selfRef")


for _n in api.UNARY:
    _reg_unary(_n, _UNARY[_n])

_COMPARE = {"Eq": torch.eq, "Ne": torch.ne, "Lt": torch.lt, "Le": torch.le, "Gt": torch.gt, "Ge": torch.ge}


def _reg_compare(name: str, fn: Callable[..., torch.Tensor]) -> None:
    for kind in ("Tensor", "Scalar"):
        register_value(f"aclnn::{name}{kind}", lambda a, out: fn(a["self"], a["other"], out=out))

        @register(f"aclnn::Inplace{name}{kind}", writes=["selfRef"])
        def _iop(a: Args) -> None:
            put(a["selfRef"], fn(a["selfRef"], a["other"]), "selfRef")


for _n, _f in _COMPARE.items():
    _reg_compare(_n, _f)


def _floor_divide(x: Any, y: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.floor_divide(x, y, out=out)


_BINARY: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
    "LogicalAnd": torch.logical_and,
    "LogicalOr": torch.logical_or,
    "LogicalXor": torch.logical_xor,
    "BitwiseAndTensor": torch.bitwise_and,
    "BitwiseOrTensor": torch.bitwise_or,
    "BitwiseXorTensor": torch.bitwise_xor,
    "FloorDivide": _floor_divide,
    "RemainderTensorTensor": torch.remainder,
    "FmodTensor": torch.fmod,
    "Atan2": torch.atan2,
    "PowTensorTensor": torch.pow,
    "Hypot": torch.hypot,
    "BitwiseAndScalar": torch.bitwise_and,
    "BitwiseOrScalar": torch.bitwise_or,
    "BitwiseXorScalar": torch.bitwise_xor,
    "FloorDivides": _floor_divide,
    "RemainderTensorScalar": torch.remainder,
    "FmodScalar": torch.fmod,
    "PowTensorScalar": torch.pow,
}


def _reg_binary(name: str, fn: Callable[..., torch.Tensor]) -> None:
    register_value(f"aclnn::{name}", lambda a, out: fn(a["self"], a["other"], out=out))


for _n in (*api.BINARY, *api.BINARY_SCALAR):
    _reg_binary(_n, _BINARY[_n])


def _reg_inplace_binary(name: str, fn: Callable[[Any, Any], torch.Tensor], other: str = "other") -> None:
    @register(f"aclnn::{name}", writes=["selfRef"])
    def _op(a: Args) -> None:
        put(a["selfRef"], fn(a["selfRef"], a[other]), "selfRef")


_reg_inplace_binary("InplaceLogicalAnd", torch.logical_and)
_reg_inplace_binary("InplaceLogicalOr", torch.logical_or)
_reg_inplace_binary("InplaceBitwiseAndTensor", torch.bitwise_and)
_reg_inplace_binary("InplaceBitwiseAndScalar", torch.bitwise_and)
_reg_inplace_binary("InplacePowTensorScalar", torch.pow, "exponent")
_reg_inplace_binary("InplacePowTensorTensor", torch.pow, "exponent")


@register("aclnn::PowScalarTensor", writes=["out"])
def _pow_st(a: Args) -> None:
    put(a["out"], torch.pow(a["self"], a["exponent"]))


@register("aclnn::RemainderScalarTensor", writes=["out"])
def _rem_st(a: Args) -> None:
    put(a["out"], torch.remainder(a["self"], a["other"]))


# ------------------------------------------------------------------ arithmetic
def _reg_alpha(name: str, fn: Callable[..., torch.Tensor], inplace: bool) -> None:
    if inplace:

        @register(f"aclnn::{name}", writes=["selfRef"])
        def _iop(a: Args) -> None:
            put(a["selfRef"], fn(a["selfRef"], a["other"], alpha=a["alpha"]), "selfRef")

    elif fn is _rsub:  # torch.rsub takes no out=

        @register(f"aclnn::{name}", writes=["out"])
        def _op(a: Args) -> None:
            put(a["out"], fn(a["self"], a["other"], alpha=a["alpha"]))

    else:
        register_value(f"aclnn::{name}", lambda a, out: fn(a["self"], a["other"], alpha=a["alpha"], out=out))


def _rsub(x: Any, y: Any, alpha: Any = 1) -> torch.Tensor:
    return torch.rsub(x, y, alpha=alpha)


_ALPHA_OPS: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = (
    ("Add", torch.add),
    ("Sub", torch.sub),
    ("Rsub", _rsub),
)
for _an, _af in _ALPHA_OPS:
    _reg_alpha(_an, _af, False)
    _reg_alpha(_an + "s", _af, False)
    if _an != "Rsub":
        _reg_alpha("Inplace" + _an, _af, True)
        _reg_alpha("Inplace" + _an + "s", _af, True)

_MULDIV: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = (("Mul", torch.mul), ("Div", torch.div))
for _mn, _mf in _MULDIV:
    _reg_binary(_mn, _mf)
    _reg_binary(_mn + "s", _mf)
    _reg_inplace_binary("Inplace" + _mn, _mf)
    _reg_inplace_binary("Inplace" + _mn + "s", _mf)

_DIV_MODES = {0: None, 1: "trunc", 2: "floor"}


def _divmod(a: Args) -> None:
    mode = a["mode"]
    if mode not in _DIV_MODES:
        raise LaunchError(f"DivMod: unknown mode {mode}")
    put(a["out"], torch.div(a["self"], a["other"], rounding_mode=_DIV_MODES[mode]))


register("aclnn::DivMod", writes=["out"])(_divmod)
register("aclnn::DivMods", writes=["out"])(_divmod)


@register("aclnn::Addcmul", writes=["out"])
def _addcmul(a: Args) -> None:
    put(a["out"], torch.addcmul(a["self"], a["tensor1"], a["tensor2"], value=a["value"]))


@register("aclnn::Addcdiv", writes=["out"])
def _addcdiv(a: Args) -> None:
    put(a["out"], torch.addcdiv(a["self"], a["tensor1"], a["tensor2"], value=a["value"]))


@register("aclnn::InplaceAddcmul", writes=["selfRef"])
def _iaddcmul(a: Args) -> None:
    put(a["selfRef"], torch.addcmul(a["selfRef"], a["tensor1"], a["tensor2"], value=a["value"]), "selfRef")


@register("aclnn::InplaceAddcdiv", writes=["selfRef"])
def _iaddcdiv(a: Args) -> None:
    put(a["selfRef"], torch.addcdiv(a["selfRef"], a["tensor1"], a["tensor2"], value=a["value"]), "selfRef")


@register("aclnn::Lerp", writes=["out"])
def _lerp(a: Args) -> None:
    put(a["out"], torch.lerp(a["self"], a["end"], a["weight"]))


@register("aclnn::Lerps", writes=["out"])
def _lerps(a: Args) -> None:
    put(a["out"], torch.lerp(a["self"], a["end"], a["weight"]))


@register("aclnn::Clamp", writes=["out"], optional=["clipValueMin", "clipValueMax"])
def _clamp(a: Args) -> None:
    put(a["out"], torch.clamp(a["self"], a["clipValueMin"], a["clipValueMax"]))


@register("aclnn::ClampMin", writes=["out"])
def _clamp_min(a: Args) -> None:
    put(a["out"], torch.clamp_min(a["self"], a["clipValueMin"]))


@register("aclnn::ClampMax", writes=["out"])
def _clamp_max(a: Args) -> None:
    put(a["out"], torch.clamp_max(a["self"], a["clipValueMax"]))


@register("aclnn::ClampTensor", writes=["out"], optional=["clipValueMin", "clipValueMax"])
def _clamp_t(a: Args) -> None:
    put(a["out"], torch.clamp(a["self"], a["clipValueMin"], a["clipValueMax"]))


@register("aclnn::ClampMinTensor", writes=["out"])
def _clamp_min_t(a: Args) -> None:
    put(a["out"], torch.clamp_min(a["self"], a["clipValueMin"]))


@register("aclnn::ClampMaxTensor", writes=["out"])
def _clamp_max_t(a: Args) -> None:
    put(a["out"], torch.clamp_max(a["self"], a["clipValueMax"]))


register_value("aclnn::SWhere", lambda a, out: torch.where(a["condition"], a["self"], a["other"], out=out))


@register("aclnn::NanToNum", writes=["out"])
def _nan_to_num(a: Args) -> None:
    put(a["out"], torch.nan_to_num(a["self"], a["nan"], a["posInf"], a["negInf"]))


@register("aclnn::Softplus", writes=["out"])
def _softplus(a: Args) -> None:
    put(a["out"], F.softplus(a["self"], a["beta"], a["threshold"]))


@register("aclnn::LeakyRelu", writes=["out"])
def _leaky_relu(a: Args) -> None:
    put(a["out"], F.leaky_relu(a["self"], a["negativeSlope"]))


@register("aclnn::Threshold", writes=["out"])
def _threshold(a: Args) -> None:
    put(a["out"], F.threshold(a["self"], a["threshold"], a["value"]))


_GELU_MODES = {0: "none", 1: "tanh"}


@register("aclnn::GeluV2", writes=["y"])
def _gelu2(a: Args) -> None:
    mode = _GELU_MODES.get(a["approximate"])
    if mode is None:
        raise LaunchError(f"GeluV2: unknown approximate mode {a['approximate']}")
    put(a["y"], F.gelu(a["x"], approximate=mode), "y")


@register("aclnn::SiluBackward", writes=["gradInput"])
def _silu_bw(a: Args) -> None:
    put(a["gradInput"], aten.silu_backward(a["gradOutput"], a["self"]), "gradInput")


@register("aclnn::GeluBackward", writes=["gradInput"])
def _gelu_bw(a: Args) -> None:
    put(a["gradInput"], aten.gelu_backward(a["gradOutput"], a["self"]), "gradInput")


@register("aclnn::GeluBackwardV2", writes=["gradInput"])
def _gelu_bw2(a: Args) -> None:
    if a["approximate"] not in ("none", "tanh"):
        raise LaunchError(f"GeluBackwardV2: unknown approximate mode {a['approximate']!r}")
    put(
        a["gradInput"],
        aten.gelu_backward(a["gradOutput"], a["self"], approximate=a["approximate"]),
        "gradInput",
    )


@register("aclnn::SigmoidBackward", writes=["out"])
def _sigmoid_bw(a: Args) -> None:
    put(a["out"], aten.sigmoid_backward(a["gradOutput"], a["output"]))


@register("aclnn::TanhBackward", writes=["out"])
def _tanh_bw(a: Args) -> None:
    put(a["out"], aten.tanh_backward(a["gradOutput"], a["output"]))


@register("aclnn::ThresholdBackward", writes=["out"])
def _threshold_bw(a: Args) -> None:
    put(a["out"], aten.threshold_backward(a["gradOutput"], a["self"], a["threshold"]))


# ------------------------------------------------------------------ copies, fills, casts, factories
# The in-place writers, as register_value entries whose destination is selfRef: value(a, None)
# is what selfRef holds afterwards (put casts it), value(a, selfRef) writes it there directly.
def _copy(a: Args, out: torch.Tensor | None) -> torch.Tensor:
    dst: torch.Tensor = a["selfRef"]
    src: torch.Tensor = a["src"]
    if out is not None:
        return out.copy_(src)  # broadcasts src and casts, as aclnnInplaceCopy does
    if _shares(dst, src):
        src = src.clone()
    return src.expand(dst.shape)


def _filler(value: Callable[[Args], Any]) -> Callable[[Args, torch.Tensor | None], torch.Tensor]:
    def v(a: Args, out: torch.Tensor | None) -> torch.Tensor:
        if out is not None:
            return out.fill_(value(a))
        return torch.full_like(a["selfRef"], value(a))

    return v


register_value("aclnn::InplaceCopy", _copy, dest="selfRef")
register_value("aclnn::InplaceOne", _filler(lambda a: 1), dest="selfRef")
register_value("aclnn::InplaceZero", _filler(lambda a: 0), dest="selfRef")
register_value("aclnn::InplaceFillScalar", _filler(lambda a: a["value"]), dest="selfRef")


@register("aclnn::InplaceFillTensor", writes=["selfRef"])
def _fill_t(a: Args) -> None:
    v = a["value"]
    if v.numel() != 1:
        raise LaunchError(f"InplaceFillTensor: value must hold one element, it holds {v.numel()}")
    a["selfRef"].fill_(v.reshape(()).clone())


@register("aclnn::InplaceMaskedFillScalar", writes=["selfRef"])
def _masked_fill(a: Args) -> None:
    put(a["selfRef"], a["selfRef"].masked_fill(a["mask"], a["value"]), "selfRef")


@register("aclnn::InplaceMaskedFillTensor", writes=["selfRef"])
def _masked_fill_t(a: Args) -> None:
    put(a["selfRef"], a["selfRef"].masked_fill(a["mask"], a["value"]), "selfRef")


@register("aclnn::Cast", writes=["out"])
def _cast(a: Args) -> None:
    put(a["out"], a["self"].to(a["dtype"]))


@register("aclnn::Arange", writes=["out"])
def _arange(a: Args) -> None:
    start, end, step, out = a["start"], a["end"], a["step"], a["out"]
    if any(isinstance(v, complex) for v in (start, end, step)) or step == 0:
        raise LaunchError(f"Arange: invalid range ({start}, {end}, {step})")
    n = max(0, math.ceil((end - start) / step))
    if n != out.numel() or out.dim() != 1:
        raise LaunchError(
            f"Arange: the range ({start}, {end}, {step}) has {n} values, out has shape {tuple(out.shape)}"
        )
    put(out, torch.arange(start, end, step, dtype=out.dtype, device=out.device))


@register("aclnn::Linspace", writes=["out"])
def _linspace(a: Args) -> None:
    out = a["out"]
    _expect_shape("Linspace", out, (a["steps"],))
    put(out, torch.linspace(a["start"], a["end"], a["steps"], dtype=out.dtype, device=out.device))


@register("aclnn::Eye", writes=["out"])
def _eye(a: Args) -> None:
    out = a["out"]
    _expect_shape("Eye", out, (a["n"], a["m"]))
    put(out, torch.eye(a["n"], a["m"], dtype=out.dtype, device=out.device))


_TRI: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = (("Triu", torch.triu), ("Tril", torch.tril))
for _tn, _tf in _TRI:

    def _mk(f: Callable[..., torch.Tensor], name: str) -> None:
        @register(f"aclnn::{name}", writes=["out"])
        def _op(a: Args) -> None:
            put(a["out"], f(a["self"], a["diagonal"]))

        @register(f"aclnn::Inplace{name}", writes=["selfRef"])
        def _iop(a: Args) -> None:
            put(a["selfRef"], f(a["selfRef"], a["diagonal"]), "selfRef")

    _mk(_tf, _tn)


# ------------------------------------------------------------------ shape
register_value("aclnn::Cat", lambda a, out: torch.cat(a["tensors"], a["dim"], out=out))


@register("aclnn::Stack", writes=["out"])
def _stack(a: Args) -> None:
    put(a["out"], torch.stack(a["tensors"], a["dim"]))


@register("aclnn::ConstantPadNd", writes=["out"])
def _pad(a: Args) -> None:
    x, pad, out = a["self"], a["pad"], a["out"]
    if len(pad) % 2 or len(pad) // 2 > x.dim():
        raise LaunchError(f"ConstantPadNd: {len(pad)} pad values for a {x.dim()}-d tensor")
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    _expect_shape("ConstantPadNd", out, shape)
    put(out, F.pad(x, pad, value=a["value"]))


@register("aclnn::Repeat", writes=["out"])
def _repeat(a: Args) -> None:
    x, reps, out = a["self"], a["repeats"], a["out"]
    if len(reps) < x.dim() or any(r < 0 for r in reps):
        raise LaunchError(f"Repeat: repeats {reps} for a {x.dim()}-d tensor")
    shape = [1] * (len(reps) - x.dim()) + list(x.shape)
    _expect_shape("Repeat", out, [s * r for s, r in zip(shape, reps)])
    put(out, x.repeat(reps))


@register("aclnn::Flip", writes=["out"])
def _flip(a: Args) -> None:
    put(a["out"], torch.flip(a["self"], a["dims"]))


@register("aclnn::Roll", writes=["out"])
def _roll(a: Args) -> None:
    put(a["out"], torch.roll(a["self"], a["shifts"], a["dims"]))


@register("aclnn::Expand", writes=["out"])
def _expand(a: Args) -> None:
    put(a["out"], a["self"].expand(a["size"]))  # a view: the size is checked against out by put


@register("aclnn::Permute", writes=["out"])
def _permute(a: Args) -> None:
    put(a["out"], a["self"].permute(a["dims"]))


# ------------------------------------------------------------------ reductions
@register("aclnn::ReduceSum", writes=["out"])
def _sum(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.sum(x, _dims(x, a["dim"]), keepdim=a["keepDim"], dtype=a["dtype"]))


def _mean(a: Args, out: torch.Tensor | None) -> torch.Tensor:
    x, dt = a["self"], a["dtype"]
    if not (x.is_floating_point() or x.is_complex()) and not (dt.is_floating_point or dt.is_complex):
        dt = torch.float32
    return torch.mean(x, _dims(x, a["dim"]), keepdim=a["keepDim"], dtype=dt, out=out)


register_value("aclnn::Mean", _mean)


@register("aclnn::Amax", writes=["out"])
def _amax(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.amax(x, _dims(x, a["dim"]), keepdim=a["keepDim"]))


@register("aclnn::Amin", writes=["out"])
def _amin(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.amin(x, _dims(x, a["dim"]), keepdim=a["keepDim"]))


@register("aclnn::Max", writes=["out"])
def _max(a: Args) -> None:
    put(a["out"], torch.max(a["self"]))


@register("aclnn::Min", writes=["out"])
def _min(a: Args) -> None:
    put(a["out"], torch.min(a["self"]))


def _reg_mindim(name: str, fn: Callable[..., Any]) -> None:
    @register(f"aclnn::{name}", writes=["out", "indices"])
    def _op(a: Args) -> None:
        v, i = fn(a["self"], a["dim"], a["keepdim"])
        put(a["out"], v)
        put(a["indices"], i, "indices")


_reg_mindim("MaxDim", torch.max)
_reg_mindim("MinDim", torch.min)


@register("aclnn::ArgMax", writes=["out"])
def _argmax(a: Args) -> None:
    put(a["out"], torch.argmax(a["self"], a["dim"], a["keepdim"]))


@register("aclnn::ArgMin", writes=["out"])
def _argmin(a: Args) -> None:
    put(a["out"], torch.argmin(a["self"], a["dim"], a["keepdim"]))


def _reg_anyall(name: str, fn: Callable[..., torch.Tensor]) -> None:
    @register(f"aclnn::{name}", writes=["out"])
    def _op(a: Args) -> None:
        x = a["self"]
        r = x.bool()
        for d in sorted((d % max(x.dim(), 1) for d in _dims(x, a["dim"])), reverse=True):
            r = fn(r, d, keepdim=a["keepdim"]) if x.dim() else r
        put(a["out"], r)


_reg_anyall("Any", torch.any)
_reg_anyall("All", torch.all)


@register("aclnn::Prod", writes=["out"])
def _prod(a: Args) -> None:
    put(a["out"], torch.prod(a["self"], dtype=a["dtype"]))


@register("aclnn::ProdDim", writes=["out"])
def _prod_dim(a: Args) -> None:
    put(a["out"], torch.prod(a["self"], a["dim"], keepdim=a["keepDim"], dtype=a["dtype"]))


@register("aclnn::Cumsum", writes=["out"])
def _cumsum(a: Args) -> None:
    put(a["out"], torch.cumsum(a["self"], a["dim"], dtype=a["dtype"]))


@register("aclnn::Cumprod", writes=["out"])
def _cumprod(a: Args) -> None:
    d = a["dim"]
    if type(d) is not int:
        raise LaunchError("Cumprod: dim must be an integer scalar")
    put(a["out"], torch.cumprod(a["self"], d, dtype=a["dtype"]))


@register("aclnn::LogSumExp", writes=["out"])
def _logsumexp(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.logsumexp(x, _dims(x, a["dim"]), keepdim=a["keepDim"]))


@register("aclnn::VarCorrection", writes=["out"])
def _var(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.var(x, _dims(x, a["dim"]), correction=a["correction"], keepdim=a["keepdim"]))


@register("aclnn::Std", writes=["out"])
def _std(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.std(x, _dims(x, a["dim"]), correction=a["correction"], keepdim=a["keepdim"]))


@register("aclnn::VarMean", writes=["varOut", "meanOut"])
def _var_mean(a: Args) -> None:
    x = a["self"]
    v, m = torch.var_mean(x, _dims(x, a["dim"]), correction=a["correction"], keepdim=a["keepdim"])
    put(a["varOut"], v, "varOut")
    put(a["meanOut"], m, "meanOut")


@register("aclnn::Norm", writes=["out"])
def _norm(a: Args) -> None:
    x = a["self"]
    put(a["out"], torch.linalg.vector_norm(x, a["pScalar"], _dims(x, a["dim"]), keepdim=a["keepdim"]))


@register("aclnn::LinalgVectorNorm", writes=["out"])
def _vector_norm(a: Args) -> None:
    x = a["self"]
    r = torch.linalg.vector_norm(x, a["ord"], _dims(x, a["dims"]), keepdim=a["keepDims"], dtype=a["dtype"])
    put(a["out"], r)


@register("aclnn::Topk", writes=["valuesOut", "indicesOut"])
def _topk(a: Args) -> None:
    x, k, dim = a["self"], a["k"], a["dim"]
    if not 0 <= k <= _dim_size(x, dim):
        raise LaunchError(f"Topk: k={k} out of range for dimension {dim} of size {_dim_size(x, dim)}")
    v, i = torch.topk(x, k, dim, largest=a["largest"], sorted=a["sorted"])
    put(a["valuesOut"], v, "valuesOut")
    put(a["indicesOut"], i, "indicesOut")


@register("aclnn::Sort", writes=["valuesOut", "indicesOut"])
def _sort(a: Args) -> None:
    v, i = torch.sort(a["self"], stable=a["stable"], dim=a["dim"], descending=a["descending"])
    put(a["valuesOut"], v, "valuesOut")
    put(a["indicesOut"], i, "indicesOut")


@register("aclnn::Argsort", writes=["out"])
def _argsort(a: Args) -> None:
    put(a["out"], torch.argsort(a["self"], dim=a["dim"], descending=a["descending"], stable=True))


# ------------------------------------------------------------------ softmax and normalization
@register("aclnn::Softmax", writes=["out"])
def _softmax(a: Args) -> None:
    put(a["out"], torch.softmax(a["self"], a["dim"]))


@register("aclnn::LogSoftmax", writes=["out"])
def _log_softmax(a: Args) -> None:
    put(a["out"], torch.log_softmax(a["self"], a["dim"]))


@register("aclnn::SoftmaxBackward", writes=["gradInput"])
def _softmax_bw(a: Args) -> None:
    g = a["gradOutput"]
    put(a["gradInput"], aten._softmax_backward_data(g, a["output"], a["dim"], g.dtype), "gradInput")


@register("aclnn::LogSoftmaxBackward", writes=["out"])
def _log_softmax_bw(a: Args) -> None:
    g = a["gradOutput"]
    put(a["out"], aten._log_softmax_backward_data(g, a["output"], a["dim"], g.dtype))


def _rms_axes(x: torch.Tensor, gamma: torch.Tensor) -> list[int]:
    if gamma.dim() > x.dim() or tuple(x.shape[x.dim() - gamma.dim() :]) != tuple(gamma.shape):
        raise LaunchError(f"RmsNorm: gamma {tuple(gamma.shape)} does not match x {tuple(x.shape)}")
    return list(range(x.dim() - gamma.dim(), x.dim()))


@register("aclnn::RmsNorm", writes=["yOut", "rstdOut"])
def _rms_norm(a: Args) -> None:
    x, gamma = a["x"], a["gamma"]
    axes = _rms_axes(x, gamma)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(axes, keepdim=True) + a["epsilon"])
    put(a["yOut"], (xf * rstd).to(x.dtype) * gamma, "yOut")
    put(a["rstdOut"], rstd, "rstdOut")


@register("aclnn::RmsNormGrad", writes=["dxOut", "dgammaOut"])
def _rms_norm_grad(a: Args) -> None:
    dy, x, rstd, gamma = a["dy"].float(), a["x"].float(), a["rstd"].float(), a["gamma"].float()
    axes = _rms_axes(x, gamma)
    n = math.prod(x.shape[i] for i in axes)
    xhat = x * rstd
    dxhat = dy * gamma
    dx = rstd * (dxhat - xhat * (dxhat * xhat).sum(axes, keepdim=True) / n)
    dgamma = (dy * xhat).sum(list(range(x.dim() - gamma.dim())))
    put(a["dxOut"], dx, "dxOut")
    put(a["dgammaOut"], dgamma, "dgammaOut")


@register(
    "aclnn::LayerNorm",
    writes=["out", "meanOutOptional", "rstdOutOptional"],
    optional=["weightOptional", "biasOptional", "meanOutOptional", "rstdOutOptional"],
)
def _layer_norm(a: Args) -> None:
    y, mean, rstd = aten.native_layer_norm(
        a["input"], a["normalizedShape"], a["weightOptional"], a["biasOptional"], a["eps"]
    )
    put(a["out"], y)
    if a["meanOutOptional"] is not None:
        put(a["meanOutOptional"], mean, "meanOutOptional")
    if a["rstdOutOptional"] is not None:
        put(a["rstdOutOptional"], rstd, "rstdOutOptional")


@register(
    "aclnn::LayerNormBackward",
    writes=["gradInputOut", "gradWeightOut", "gradBiasOut"],
    optional=["weightOptional", "biasOptional", "gradInputOut", "gradWeightOut", "gradBiasOut"],
)
def _layer_norm_bw(a: Args) -> None:
    mask = a["outputMask"]
    if len(mask) != 3:
        raise LaunchError("LayerNormBackward: outputMask must hold 3 values")
    gi, gw, gb = aten.native_layer_norm_backward(
        a["gradOut"],
        a["input"],
        a["normalizedShape"],
        a["mean"],
        a["rstd"],
        a["weightOptional"],
        a["biasOptional"],
        mask,
    )
    for name, v in (("gradInputOut", gi), ("gradWeightOut", gw), ("gradBiasOut", gb)):
        if a[name] is not None and v is not None:
            put(a[name], v, name)


def _swiglu_halves(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _dim_size(x, dim) % 2:
        raise LaunchError(f"SwiGlu: dimension {dim} of {tuple(x.shape)} is not even")
    a, b = x.chunk(2, dim)
    return a, b


@register("aclnn::SwiGlu", writes=["out"])
def _swiglu(a: Args) -> None:
    x1, x2 = _swiglu_halves(a["x"], a["dim"])
    put(a["out"], (F.silu(x1.float()) * x2.float()).to(a["x"].dtype))


@register("aclnn::SwiGluGrad", writes=["out"])
def _swiglu_grad(a: Args) -> None:
    with torch.enable_grad():
        x = a["x"].detach().float().requires_grad_()
        x1, x2 = _swiglu_halves(x, a["dim"])
        (g,) = torch.autograd.grad(F.silu(x1) * x2, (x,), a["yGrad"].float())
    put(a["out"], g)


@register("aclnn::RotaryPositionEmbedding", writes=["out"])
def _rotary(a: Args) -> None:
    x, cos, sin, mode = a["x"], a["cos"], a["sin"], a["mode"]
    if x.dim() == 0 or x.size(-1) % 2:
        raise LaunchError(f"RotaryPositionEmbedding: last dimension of {tuple(x.shape)} is not even")
    if mode == 0:  # rotate_half
        x1, x2 = x.chunk(2, -1)
        rot = torch.cat((-x2, x1), -1)
    elif mode == 1:  # interleaved pairs
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rot = torch.stack((-x2, x1), -1).flatten(-2)
    else:
        raise LaunchError(f"RotaryPositionEmbedding: mode {mode} is not supported")
    put(a["out"], x * cos + rot * sin)


def _nll_indices(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    x, tgt = a["self"], a["target"]
    classes = int(x.size(0) if x.dim() == 1 else x.size(1)) if x.dim() else 0
    ign = a["ignoreIndex"]
    tgt = torch.where(tgt == ign, torch.zeros((), dtype=tgt.dtype, device=tgt.device), tgt)
    yield tgt, classes, False, "target"


@register("aclnn::NLLLoss", writes=["out", "totalWeightOut"], optional=["weight"], indices=_nll_indices)
def _nll(a: Args) -> None:
    out, tw = aten.nll_loss_forward(a["self"], a["target"], a["weight"], a["reduction"], a["ignoreIndex"])
    put(a["out"], out)
    put(a["totalWeightOut"], tw, "totalWeightOut")


@register("aclnn::NLLLossBackward", writes=["out"], optional=["weight"], indices=_nll_indices)
def _nll_bw(a: Args) -> None:
    put(
        a["out"],
        aten.nll_loss_backward(
            a["gradOutput"],
            a["self"],
            a["target"],
            a["weight"],
            a["reduction"],
            a["ignoreIndex"],
            a["totalWeight"],
        ),
    )


# ------------------------------------------------------------------ indexing
def _emb_indices(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    w = a["weight"]
    yield a["indices"], int(w.size(0)) if w.dim() else 0, False, "indices"


@register("aclnn::Embedding", writes=["out"], indices=_emb_indices)
def _embedding(a: Args) -> None:
    put(a["out"], F.embedding(a["indices"], a["weight"]))


def _emb_bw_indices(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    yield a["sortIndices"], int(a["out"].size(0)) if a["out"].dim() else 0, False, "sortIndices"


@register("aclnn::EmbeddingDenseBackward", writes=["out"], indices=_emb_bw_indices)
def _embedding_bw(a: Args) -> None:
    grad, out, n = a["grad"], a["out"], a["numWeights"]
    _expect_shape("EmbeddingDenseBackward", out, (n, grad.size(-1) if grad.dim() else 1))
    pad = a["paddingIdx"]
    pad = pad if 0 <= pad < n else -1  # unsigned on the wire: "no padding" arrives as 2**64-1
    put(out, aten.embedding_dense_backward(grad, a["sortIndices"], n, pad, a["scaleGradByFreq"]))


def _along(self_arg: str, index_arg: str) -> Callable[[Args], Iterable[tuple[torch.Tensor, int, bool, str]]]:
    def check(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
        yield a[index_arg], _dim_size(a[self_arg], a["dim"]), False, index_arg

    return check


@register("aclnn::IndexSelect", writes=["out"], indices=_along("self", "index"))
def _index_select(a: Args) -> None:
    put(a["out"], torch.index_select(a["self"], a["dim"], a["index"]))


@register("aclnn::Gather", writes=["out"], indices=_along("self", "index"))
def _gather(a: Args) -> None:
    put(a["out"], torch.gather(a["self"], a["dim"], a["index"]))


def _advanced(a: Args, self_arg: str = "self") -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    """x[i0, i1, ...]: integer index k indexes dimension k; a mask consumes mask.dim() dims."""
    t, d = a[self_arg], 0
    for idx in a["indices"]:
        if _is_full_slice(idx):
            d += 1
            continue
        if idx.dtype in (torch.bool, torch.uint8):
            d += idx.dim()
            continue
        if d >= t.dim():
            raise LaunchError(f"too many indices for a {t.dim()}-d tensor")
        yield idx, int(t.size(d)), True, f"indices[{d}]"
        d += 1


def _is_full_slice(i: torch.Tensor) -> bool:
    # torch_npu's index lists hold an empty 1-d tensor (of self's dtype) for a full slice ":"
    return i.dim() == 1 and i.numel() == 0


def _index_list(idx: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [None if _is_full_slice(i) else i for i in idx]


@register("aclnn::Index", writes=["out"], indices=_advanced)
def _index(a: Args) -> None:
    put(a["out"], aten.index.Tensor(a["self"], _index_list(a["indices"])))


@register("aclnn::IndexPutImpl", writes=["selfRef"], indices=lambda a: _advanced(a, "selfRef"))
def _index_put(a: Args) -> None:
    dst, values = a["selfRef"], a["values"]
    if _shares(dst, values):
        values = values.clone()
    aten.index_put_(dst, _index_list(a["indices"]), values, a["accumulate"])


def _scatter_indices(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    yield a["index"], _dim_size(a["self"], a["dim"]), False, "index"


@register("aclnn::ScatterAdd", writes=["out"], indices=_scatter_indices)
def _scatter_add(a: Args) -> None:
    put(a["out"], torch.scatter_add(a["self"], a["dim"], a["index"], a["src"]))


_SCATTER_REDUCE = {0: None, 1: "add", 2: "multiply"}


def _scatter_into(x: torch.Tensor, a: Args, src: Any, op: str) -> torch.Tensor:
    red = a["reduce"]
    if red not in _SCATTER_REDUCE:
        raise LaunchError(f"{op}: unknown reduce {red}")
    r = _SCATTER_REDUCE[red]
    if r is None:
        return torch.scatter(x, a["dim"], a["index"], src)
    return torch.scatter(x, a["dim"], a["index"], src, reduce=r)


def _scatter_self_indices(a: Args) -> Iterable[tuple[torch.Tensor, int, bool, str]]:
    yield a["index"], _dim_size(a["selfRef"], a["dim"]), False, "index"


@register("aclnn::Scatter", writes=["out"], indices=_scatter_indices)
def _scatter(a: Args) -> None:
    put(a["out"], _scatter_into(a["self"], a, a["src"], "Scatter"))


@register("aclnn::ScatterValue", writes=["out"], indices=_scatter_indices)
def _scatter_value(a: Args) -> None:
    put(a["out"], _scatter_into(a["self"], a, a["value"], "ScatterValue"))


@register("aclnn::InplaceScatter", writes=["selfRef"], indices=_scatter_self_indices)
def _iscatter(a: Args) -> None:
    put(a["selfRef"], _scatter_into(a["selfRef"], a, a["src"], "InplaceScatter"), "selfRef")


@register("aclnn::InplaceScatterValue", writes=["selfRef"], indices=_scatter_self_indices)
def _iscatter_value(a: Args) -> None:
    put(a["selfRef"], _scatter_into(a["selfRef"], a, a["value"], "InplaceScatterValue"), "selfRef")


@register("aclnn::InplaceIndexCopy", writes=["selfRef"], indices=_along("selfRef", "index"))
def _index_copy(a: Args) -> None:
    put(a["selfRef"], a["selfRef"].index_copy(a["dim"], a["index"], a["source"]), "selfRef")


@register("aclnn::InplaceIndexFill", writes=["selfRef"], indices=_along("selfRef", "index"))
def _index_fill(a: Args) -> None:
    put(a["selfRef"], a["selfRef"].index_fill(a["dim"], a["index"], a["value"]), "selfRef")


@register("aclnn::IndexAdd", writes=["out"], indices=_along("self", "index"))
def _index_add(a: Args) -> None:
    put(a["out"], torch.index_add(a["self"], a["dim"], a["index"], a["source"], alpha=a["alpha"]))


@register("aclnn::MaskedSelect", writes=["out"])
def _masked_select(a: Args) -> None:
    r = torch.masked_select(a["self"], a["mask"])
    out = a["out"]
    if out.dim() != 1 or out.numel() < r.numel():
        raise LaunchError(f"MaskedSelect: out of shape {tuple(out.shape)} cannot hold {r.numel()} values")
    put(out[: r.numel()], r)


# ------------------------------------------------------------------ matmul family
register_value("aclnn::Matmul", lambda a, out: torch.matmul(a["self"], a["mat2"], out=out))
register_value("aclnn::Mm", lambda a, out: torch.mm(a["self"], a["mat2"], out=out))
register_value("aclnn::BatchMatMul", lambda a, out: torch.bmm(a["self"], a["mat2"], out=out))


@register("aclnn::Addmm", writes=["out"])
def _addmm(a: Args) -> None:
    put(a["out"], torch.addmm(a["self"], a["mat1"], a["mat2"], beta=a["beta"], alpha=a["alpha"]))


@register("aclnn::InplaceAddmm", writes=["selfRef"])
def _iaddmm(a: Args) -> None:
    r = torch.addmm(a["selfRef"], a["mat1"], a["mat2"], beta=a["beta"], alpha=a["alpha"])
    put(a["selfRef"], r, "selfRef")


@register("aclnn::Baddbmm", writes=["out"])
def _baddbmm(a: Args) -> None:
    put(a["out"], torch.baddbmm(a["self"], a["batch1"], a["batch2"], beta=a["beta"], alpha=a["alpha"]))


@register("aclnn::Mv", writes=["out"])
def _mv(a: Args) -> None:
    put(a["out"], torch.mv(a["self"], a["vec"]))


@register("aclnn::Dot", writes=["out"])
def _dot(a: Args) -> None:
    put(a["out"], torch.dot(a["self"], a["tensor"]))


# ------------------------------------------------------------------ fused attention
_TOKEN_MAX = 2147483647


def _to_bnsd(t: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A query/key/value tensor of the given layout as [B, N, S, D]."""
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.permute(0, 2, 1, 3)
    if layout in ("BSH", "SBH"):
        if t.dim() != 3 or heads <= 0 or t.size(2) % heads:
            raise LaunchError(f"FlashAttentionScore: {layout} tensor {tuple(t.shape)} with {heads} heads")
        x = t.reshape(t.size(0), t.size(1), heads, t.size(2) // heads)
        return x.permute(0, 2, 1, 3) if layout == "BSH" else x.permute(1, 2, 0, 3)
    raise LaunchError(f"FlashAttentionScore: input layout {layout!r} is not supported")


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.permute(0, 2, 1, 3)
    b, n, s, d = t.shape
    if layout == "BSH":
        return t.permute(0, 2, 1, 3).reshape(b, s, n * d)
    return t.permute(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _fa_dims(a: Args) -> tuple[str, int, int, int]:
    layout, n = a["inputLayout"], a["headNum"]
    if a["keepProb"] != 1.0 or a["dropMaskOptional"] is not None:
        raise LaunchError("FlashAttentionScore: dropout (keepProb < 1) is not supported")
    if a["paddingMaskOptional"] is not None or a["prefixOptional"]:
        raise LaunchError("FlashAttentionScore: padding masks and prefixes are not supported")
    q = _to_bnsd(a["query"], layout, n)
    if q.dim() != 4 or q.size(1) != n:
        raise LaunchError(f"FlashAttentionScore: query {tuple(a['query'].shape)} does not have {n} heads")
    return layout, n, int(q.size(2)), int(q.size(3))


def _fa_keep(a: Args, b: int, n: int, s1: int, s2: int, device: torch.device) -> torch.Tensor | None:
    """[B|1, N|1, S1, S2] bool: True where a query position may attend a key position."""
    mode, pre, nxt = a["sparseMode"], a["preTokens"], a["nextTokens"]
    if mode == 1 or (mode == 0 and a["attenMaskOptional"] is None and pre >= s1 + s2 and nxt >= s1 + s2):
        return None  # nothing masked (mode 0: a decode step's usual case): no index grids to build
    i = torch.arange(s1, device=device).unsqueeze(1)
    j = torch.arange(s2, device=device).unsqueeze(0)
    keep: torch.Tensor | None = None
    if mode == 0:  # (mode 1 masks nothing: returned above)
        m = a["attenMaskOptional"]
        if m is not None:
            if m.dtype not in (torch.bool, torch.uint8) or m.dim() not in (2, 4):
                raise LaunchError("FlashAttentionScore: attenMask must be a 2-d or 4-d bool/uint8 tensor")
            if tuple(m.shape[-2:]) != (s1, s2):
                raise LaunchError(
                    f"FlashAttentionScore: attenMask {tuple(m.shape)} for [S1, S2] = [{s1}, {s2}]"
                )
            keep = ~m.bool()  # Ascend masks mark what may NOT be attended
        if pre < s1 + s2 or nxt < s1 + s2:
            band = (j <= i + nxt) & (j >= i - pre)
            keep = band if keep is None else keep & band
    elif mode == 2:  # causal, aligned top-left
        keep = j <= i
    elif mode == 3:  # causal, aligned bottom-right
        keep = j <= i + (s2 - s1)
    elif mode == 4:  # band, aligned bottom-right
        keep = (j <= i + (s2 - s1) + nxt) & (j >= i + (s2 - s1) - pre)
    else:
        raise LaunchError(f"FlashAttentionScore: sparseMode {mode} is not supported")
    return keep


def _fa_forward(
    a: Args, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention [B,N,S1,D], row max [B,N,S1], row sum [B,N,S1]) in float32."""
    n = q.size(1)
    if k.size(1) != v.size(1) or k.size(1) == 0 or n % k.size(1):
        raise LaunchError(f"FlashAttentionScore: {n} query heads and {k.size(1)} key/value heads")
    if k.size(1) != n:  # grouped-query attention
        k = k.repeat_interleave(n // k.size(1), dim=1)
        v = v.repeat_interleave(n // v.size(1), dim=1)
    s = q.float() @ k.float().transpose(-1, -2)
    if pse is not None:
        s = s + pse.float()  # (not in place: pse may broadcast s to a larger shape)
    # s is a fresh tensor, so the softmax runs in place on it, except under autograd (the
    # gradient entry recomputes this forward, and autograd needs every step's input).
    grad = s.requires_grad
    s = s * a["scaleValue"] if grad else s.mul_(a["scaleValue"])
    keep = _fa_keep(a, q.size(0), n, q.size(2), k.size(2), q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    # A fully masked row (by the mask or by -inf in the additive pse): exp gives zeros, not
    # NaN. Without either, rows of finite inputs have finite maxima and nonzero sums, so a
    # decode step (the hot path) skips both guards.
    guard = keep is not None or pse is not None
    if guard:
        mx = mx.masked_fill(mx.isinf(), 0.0)
    e = torch.exp(s - mx) if grad else s.sub_(mx).exp_()
    sm = e.sum(-1, keepdim=True)
    div = sm.masked_fill(sm == 0, 1.0) if guard else sm
    p = e / div if grad else e.div_(div)
    return p @ v.float(), mx.squeeze(-1), sm.squeeze(-1)


@register(
    "aclnn::FlashAttentionScore",
    writes=["softmaxMaxOut", "softmaxSumOut", "attentionOutOut"],
    optional=[
        "realShiftOptional",
        "dropMaskOptional",
        "paddingMaskOptional",
        "attenMaskOptional",
        "prefixOptional",
    ],
)
def _flash_attention(a: Args) -> None:
    layout, n, _, _ = _fa_dims(a)
    q = _to_bnsd(a["query"], layout, n)
    kv_heads = n
    if layout in ("BSH", "SBH"):
        d = a["query"].size(2) // n
        kv_heads = a["key"].size(2) // d if d else 0
    k, v = _to_bnsd(a["key"], layout, kv_heads), _to_bnsd(a["value"], layout, kv_heads)
    out, mx, sm = _fa_forward(a, q, k, v, a["realShiftOptional"])
    res = _from_bnsd(out.to(a["attentionOutOut"].dtype), layout)
    put(a["attentionOutOut"], res, "attentionOutOut")
    for name, val in (("softmaxMaxOut", mx), ("softmaxSumOut", sm)):
        t = a[name]
        if t.numel():
            if t.dim() != 4 or t.shape[:3] != val.shape:
                raise LaunchError(
                    f"FlashAttentionScore: {name} has shape {tuple(t.shape)}, expected {tuple(val.shape)} + [8]"
                )
            t.copy_(val.unsqueeze(-1))  # the same value in each of the last dim's slots


@register(
    "aclnn::FlashAttentionScoreGrad",
    writes=["dqOut", "dkOut", "dvOut", "dpseOut"],
    optional=[
        "pseShiftOptional",
        "dropMaskOptional",
        "paddingMaskOptional",
        "attenMaskOptional",
        "softmaxMaxOptional",
        "softmaxSumOptional",
        "softmaxInOptional",
        "attentionInOptional",
        "prefixOptional",
        "dpseOut",
    ],
)
def _flash_attention_grad(a: Args) -> None:
    layout, n, _, _ = _fa_dims(a)
    kv_heads = n
    if layout in ("BSH", "SBH"):
        d = a["query"].size(2) // n
        kv_heads = a["key"].size(2) // d if d else 0
    # recompute the forward pass with autograd (float32) and take its gradients
    with torch.enable_grad():
        q0 = a["query"].detach().float().requires_grad_()
        k0 = a["key"].detach().float().requires_grad_()
        v0 = a["value"].detach().float().requires_grad_()
        out, _, _ = _fa_forward(
            a,
            _to_bnsd(q0, layout, n),
            _to_bnsd(k0, layout, kv_heads),
            _to_bnsd(v0, layout, kv_heads),
            a["pseShiftOptional"],
        )
        dq, dk, dv = torch.autograd.grad(_from_bnsd(out, layout), (q0, k0, v0), a["dy"].float())
    put(a["dqOut"], dq, "dqOut")
    put(a["dkOut"], dk, "dkOut")
    put(a["dvOut"], dv, "dvOut")


# ------------------------------------------------------------------ random numbers
# torch_npu advances its own generator's Philox state and passes (seed, offset) with each call,
# so draws follow the application's torch.npu.manual_seed and never the daemon's generator, and
# the same (seed, offset) gives the same numbers. They are not the numbers Ascend hardware
# draws (its Philox kernels are not reproduced), nor the CPU's.
def _generator(device: torch.device, seed: int, offset: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(((seed & 0xFFFFFFFFFFFFFFFF) * 0x9E3779B97F4A7C15 + offset) & 0x7FFFFFFFFFFFFFFF)
    return g


@register("aclnn::Multinomial", writes=["out"])
def _multinomial(a: Args) -> None:
    x, n, out = a["self"], a["numsamples"], a["out"]
    if x.dim() not in (1, 2) or n <= 0:
        raise LaunchError(f"Multinomial: {n} samples from a {x.dim()}-d tensor")
    _expect_shape("Multinomial", out, (*x.shape[:-1], n))
    g = _generator(x.device, a["seed"], a["offset"])
    put(out, torch.multinomial(x.float(), n, a["replacement"], generator=g))


@register("aclnn::InplaceUniform", writes=["selfRef"])
def _uniform(a: Args) -> None:
    t = a["selfRef"]
    t.uniform_(a["from"], a["to"], generator=_generator(t.device, a["seed"], a["offset"]))


@register("aclnn::InplaceNormal", writes=["selfRef"])
def _normal(a: Args) -> None:
    t = a["selfRef"]
    t.normal_(a["mean"], a["std"], generator=_generator(t.device, a["seed"], a["offset"]))


@register("aclnn::InplaceRandom", writes=["selfRef"])
def _random(a: Args) -> None:
    t = a["selfRef"]
    t.random_(a["from"], a["to"], generator=_generator(t.device, a["seed"], a["offset"]))


@register("aclnn::InplaceBernoulli", writes=["selfRef"])
def _bernoulli(a: Args) -> None:
    t, p = a["selfRef"], a["prob"]
    if not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise LaunchError(f"InplaceBernoulli: probability {p!r} out of [0, 1]")
    t.bernoulli_(float(p), generator=_generator(t.device, a["seed"], a["offset"]))
