"""The aclop operator table: AscendCL operator types (aclopCompileAndExecute, acl.op.execute_v2)
lowered to aten calls. One table for every front end that speaks aclop:

* the daemon (flexnpu/daemon/optable/aclop.py) registers ``aclop::<OpType>`` for every entry of
  OPS and runs the lowered calls on views of the client's memory, after checking them on torch's
  meta device (``meta_check``): this is the table that executes;
* the pyACL front end (flexnpu/hook/acl/op.py) lowers and meta-checks the same way before it
  sends ``aclop::<OpType>``, so shape, dtype and attribute mistakes come back synchronously as
  ACL_ERROR_OP_* codes where a program checks them (the daemon checks again: it trusts no client).

Each operator becomes one or more aten calls whose ``out=`` (or in-place ``self``) operand is an
output Operand, so results land in the memory the program passed. Attribute names and input
orders follow CANN's operator prototypes (e.g. MatMul: x1, x2, [bias]; transpose_x1/transpose_x2).
To add an operator: one ``@op`` entry here.

Operands are front-end neutral: shape/stride/offset (elements) plus an opaque ``ref`` (a client
handle, or the daemon's tensor) or host ``values`` (constant / host-placed inputs, usable only as
values: axes, perm, dims). This module has no dependency on either side (layer 0).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# AscendCL error codes the table reports (acl_base.h)
ACL_ERROR_INVALID_PARAM = 100000
ACL_ERROR_OP_INPUT_NOT_MATCH = 100021
ACL_ERROR_OP_OUTPUT_NOT_MATCH = 100022
ACL_ERROR_OP_ATTR_NOT_MATCH = 100023
ACL_ERROR_OP_NOT_FOUND = 100024
ACL_ERROR_UNSUPPORTED_DATA_TYPE = 100026

# aclDataType -> torch dtype (acl_base.h codes)
ACL_TO_TORCH: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float16,
    2: torch.int8,
    3: torch.int32,
    4: torch.uint8,
    6: torch.int16,
    7: torch.uint16,
    8: torch.uint32,
    9: torch.int64,
    10: torch.uint64,
    11: torch.float64,
    12: torch.bool,
    16: torch.complex64,
    17: torch.complex128,
    27: torch.bfloat16,
}
TORCH_TO_ACL: dict[torch.dtype, int] = {v: k for k, v in ACL_TO_TORCH.items()}

# Host-resident operands travel as values; more than this many is not an axes-like operand.
MAX_HOST_VALUES = 4096


class AclopError(ValueError):
    """An operator launch that does not fit the operator: ``code`` is the AscendCL error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


AclFail = AclopError  # the name the lowering functions below were written with


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Operand:
    """One tensor operand: where it lives and the view (shape/stride/offset in elements of
    dtype) the lowering wants of it."""

    role: str  # "input 0", "output 1": for messages
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements
    ref: Any = None  # device-resident: the front end's reference (client handle, daemon tensor)
    host: tuple[Any, ...] | None = None  # host-resident: its values (usable as values only)
    reader: Callable[[], list[Any]] | None = None  # reads a device operand's values (axes-like)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def acl_dtype(self) -> int:
        return TORCH_TO_ACL[self.dtype]

    def view(self, shape: tuple[int, ...], stride: tuple[int, ...], offset: int | None = None) -> Operand:
        return dataclasses.replace(
            self, shape=tuple(shape), stride=tuple(stride), offset=self.offset if offset is None else offset
        )

    def t(self) -> Operand:
        """Swap the last two dimensions (a transposed view, no data movement)."""
        if self.ndim < 2:
            raise AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, f"{self.role} needs >= 2 dims to transpose")
        s, st = list(self.shape), list(self.stride)
        s[-1], s[-2], st[-1], st[-2] = s[-2], s[-1], st[-2], st[-1]
        return self.view(tuple(s), tuple(st))

    def permute(self, perm: list[int]) -> Operand:
        n = self.ndim
        perm = [p + n if p < 0 else p for p in perm]
        if sorted(perm) != list(range(n)):
            raise AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, f"perm {perm} is not a permutation of {n} dims")
        return self.view(tuple(self.shape[p] for p in perm), tuple(self.stride[p] for p in perm))

    def reshaped(self, shape: tuple[int, ...]) -> Operand:
        if math.prod(shape) != math.prod(self.shape):
            raise AclFail(
                ACL_ERROR_OP_OUTPUT_NOT_MATCH,
                f"cannot view {self.role} of shape {list(self.shape)} as {list(shape)}",
            )
        return self.view(shape, contiguous_strides(shape))

    def narrow(self, dim: int, start: int, length: int) -> Operand:
        s = list(self.shape)
        s[dim] = length
        return self.view(tuple(s), self.stride, self.offset + start * self.stride[dim])

    def values(self) -> list[Any]:
        """Values of a small operand (axes, perm, shape, a fill value)."""
        if self.numel > MAX_HOST_VALUES:
            raise AclFail(
                ACL_ERROR_OP_INPUT_NOT_MATCH,
                f"{self.role} holds {self.numel} values; an axes-like operand holds at most {MAX_HOST_VALUES}",
            )
        if self.host is not None:
            return list(self.host)
        if self.reader is None:
            raise AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, f"cannot read the values of {self.role}")
        return self.reader()


Call = tuple[str, tuple[Any, ...], dict[str, Any]]

# The kind of an attribute value, as the aclopSetAttr* / acl.op.set_attr_* call that set it
# (the wire keeps Python types: bool, int, float, str, lists of them, lists of int lists, dtype).
ATTR_KINDS = (
    "bool",
    "int",
    "float",
    "string",
    "list_bool",
    "list_int",
    "list_float",
    "list_string",
    "list_list_int",
    "data_type",
)


def attr_kind(v: Any) -> str | None:
    """The set_attr kind a decoded attribute value came from; None if it is none of them."""
    t = type(v)
    if t is bool:
        return "bool"
    if t is int:
        return "int"
    if t is float:
        return "float"
    if t is str:
        return "string"
    if isinstance(v, torch.dtype):
        return "data_type"
    if t is list:
        if all(type(x) is bool for x in v):
            return "list_bool"
        if all(type(x) is int for x in v):
            return "list_int"
        if all(type(x) in (int, float) for x in v):
            return "list_float"
        if all(type(x) is str for x in v):
            return "list_string"
        if all(type(x) is list and all(type(y) is int for y in x) for x in v):
            return "list_list_int"
    return None


class Attrs:
    def __init__(self, op_type: str, values: dict[str, tuple[str, Any]]) -> None:
        self.op_type = op_type
        self.values = values

    @classmethod
    def from_wire(cls, op_type: str, kwargs: dict[str, Any]) -> Attrs:
        vals: dict[str, tuple[str, Any]] = {}
        for k, v in kwargs.items():
            kind = attr_kind(v)
            if not isinstance(k, str) or kind is None:
                raise AclFail(
                    ACL_ERROR_OP_ATTR_NOT_MATCH, f"{op_type}: attribute {k!r} has an unsupported value"
                )
            vals[k] = (kind, v)
        return cls(op_type, vals)

    def get(self, name: str, kind: str, default: Any) -> Any:
        if name not in self.values:
            return default
        k, v = self.values[name]
        ok = (
            k == kind
            or (kind == "float" and k == "int")
            or (kind == "int" and k == "bool")
            or (kind.startswith("list_") and k.startswith("list_") and v == [])  # an empty list is any list
            or (kind == "list_float" and k == "list_int")
        )
        if not ok:
            raise AclFail(
                ACL_ERROR_OP_ATTR_NOT_MATCH,
                f"{self.op_type}: attribute {name!r} must be set with acl.op.set_attr_{kind}, "
                f"not set_attr_{k}",
            )
        return v


@dataclass(frozen=True)
class OpSpec:
    n_in: tuple[int, int]  # min, max inputs (max -1: unbounded)
    n_out: tuple[int, int]
    lower: Callable[[list[Operand], list[Operand], Attrs], list[Call]]


OPS: dict[str, OpSpec] = {}


def op(*names: str, n_in: int | tuple[int, int] = 1, n_out: int | tuple[int, int] = 1) -> Callable[..., Any]:
    def reg(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = OpSpec(
            n_in if isinstance(n_in, tuple) else (n_in, n_in),
            n_out if isinstance(n_out, tuple) else (n_out, n_out),
            fn,
        )
        for n in names:
            OPS[n] = spec
        return fn

    return reg


def spec_of(op_type: str) -> OpSpec:
    spec = OPS.get(op_type) if isinstance(op_type, str) else None
    if spec is None:
        raise AclFail(
            ACL_ERROR_OP_NOT_FOUND,
            f"operator type {op_type!r} is not supported by FlexNPU (supported: {', '.join(sorted(OPS))})",
        )
    return spec


def _check_count(kind: str, n: int, bounds: tuple[int, int], op_type: str, code: int) -> None:
    lo, hi = bounds
    if n < lo or (hi >= 0 and n > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{'any' if hi < 0 else hi}"
        raise AclFail(code, f"{op_type} takes {want} {kind}, got {n}")


def lower(op_type: str, ins: list[Operand], outs: list[Operand], attrs: Attrs) -> list[Call]:
    """The aten calls of one operator launch, checked on the meta device. Raises AclopError."""
    spec = spec_of(op_type)
    _check_count("inputs", len(ins), spec.n_in, op_type, ACL_ERROR_OP_INPUT_NOT_MATCH)
    _check_count("outputs", len(outs), spec.n_out, op_type, ACL_ERROR_OP_OUTPUT_NOT_MATCH)
    calls = spec.lower(ins, outs, attrs)
    for _name, args, kwargs in calls:
        for x in _operands((args, kwargs)):
            if x.ref is None:
                raise AclFail(
                    ACL_ERROR_INVALID_PARAM,
                    f"{op_type}: {x.role} is host memory; tensor operands must be device memory "
                    "(aclrtMalloc + aclrtMemcpy)",
                )
    meta_check(op_type, calls)
    return calls


def _operands(x: Any) -> list[Operand]:
    if isinstance(x, Operand):
        return [x]
    if isinstance(x, (list, tuple)):
        return [o for v in x for o in _operands(v)]
    if isinstance(x, dict):
        return [o for v in x.values() for o in _operands(v)]
    return []


def _axis(a: int, ndim: int, role: str = "axis") -> int:
    if not -max(ndim, 1) <= a < max(ndim, 1):
        raise AclFail(ACL_ERROR_OP_ATTR_NOT_MATCH, f"{role} {a} out of range for {ndim} dims")
    return a + ndim if a < 0 else a


# ---- elementwise ---------------------------------------------------------------------------


def _binary(aten: str, **kw: Any) -> Callable:
    return lambda i, o, a: [(aten, (i[0], i[1]), {**kw, "out": o[0]})]


def _binary_self(aten: str) -> Callable:
    """x OP x (IsNan: x != x)."""
    return lambda i, o, a: [(aten, (i[0], i[0]), {"out": o[0]})]


def _unary(aten: str, *extra: Any, **kw: Any) -> Callable:
    return lambda i, o, a: [(aten, (i[0], *extra), {**kw, "out": o[0]})]


for _names, _aten in [
    (("Add", "AddV2"), "aten::add.out"),
    (("Sub",), "aten::sub.out"),
    (("Mul",), "aten::mul.out"),
    (("RealDiv",), "aten::div.out"),
    (("Maximum",), "aten::maximum.out"),
    (("Minimum",), "aten::minimum.out"),
    (("Pow",), "aten::pow.Tensor_Tensor_out"),
    (("FloorMod",), "aten::remainder.Tensor_out"),
    (("Equal",), "aten::eq.Tensor_out"),
    (("NotEqual",), "aten::ne.Tensor_out"),
    (("Less",), "aten::lt.Tensor_out"),
    (("LessEqual",), "aten::le.Tensor_out"),
    (("Greater",), "aten::gt.Tensor_out"),
    (("GreaterEqual",), "aten::ge.Tensor_out"),
    (("LogicalAnd",), "aten::logical_and.out"),
    (("LogicalOr",), "aten::logical_or.out"),
]:
    op(*_names, n_in=2)(_binary(_aten))

op("FloorDiv", n_in=2)(_binary("aten::div.out_mode", rounding_mode="floor"))


@op("Div", n_in=2)
def _div(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    # Integer Div truncates toward zero (C semantics); floating Div is true division.
    if i[0].dtype.is_floating_point or i[0].dtype.is_complex:
        return [("aten::div.out", (i[0], i[1]), {"out": o[0]})]
    return [("aten::div.out_mode", (i[0], i[1]), {"rounding_mode": "trunc", "out": o[0]})]


@op("SquaredDifference", n_in=2)
def _sqdiff(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::sub.out", (i[0], i[1]), {"out": o[0]}), ("aten::mul.out", (o[0], o[0]), {"out": o[0]})]


for _name, _aten in [
    ("Exp", "exp"),
    ("Log", "log"),
    ("Sqrt", "sqrt"),
    ("Rsqrt", "rsqrt"),
    ("Abs", "abs"),
    ("Neg", "neg"),
    ("Reciprocal", "reciprocal"),
    ("Square", "square"),
    ("Sin", "sin"),
    ("Cos", "cos"),
    ("Tanh", "tanh"),
    ("Sigmoid", "sigmoid"),
    ("Floor", "floor"),
    ("Ceil", "ceil"),
    ("Round", "round"),
    ("Sign", "sign"),
    ("Erf", "erf"),
    ("LogicalNot", "logical_not"),
    # what torch_npu sends through aclopCompileAndExecute for functions without an aclnn kernel
    ("Asin", "asin"),
    ("Acos", "acos"),
    ("Atan", "atan"),
    ("Asinh", "asinh"),
    ("Acosh", "acosh"),
    ("Atanh", "atanh"),
    ("Sinh", "sinh"),
    ("Cosh", "cosh"),
    ("Tan", "tan"),
    ("Erfc", "erfc"),
    ("Erfinv", "erfinv"),
    ("Expm1", "expm1"),
    ("Log1p", "log1p"),
    ("Digamma", "digamma"),
    ("Lgamma", "lgamma"),
    ("Trunc", "trunc"),
    ("Mish", "mish"),
    ("HardSwish", "hardswish"),
    ("HardSigmoid", "hardsigmoid"),
]:
    op(_name)(_unary(f"aten::{_aten}.out"))

op("Atan2", n_in=2)(_binary("aten::atan2.out"))
op("Hypot", n_in=2)(_binary("aten::hypot.out"))
op("IsNan")(_binary_self("aten::ne.Tensor_out"))


@op("FastGelu")
def _fast_gelu(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    # CANN: x / (1 + exp(-1.702|x|)) * exp(0.851(x - |x|)), which is x * sigmoid(1.702 x)
    return [
        ("aten::mul.Scalar_out", (i[0], 1.702), {"out": o[0]}),
        ("aten::sigmoid.out", (o[0],), {"out": o[0]}),
        ("aten::mul.out", (i[0], o[0]), {"out": o[0]}),
    ]


@op("Softplus")
def _softplus(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    beta, threshold = a.get("beta", "float", 1.0), a.get("threshold", "float", 20.0)
    return [("aten::softplus.out", (i[0], beta, threshold), {"out": o[0]})]


@op("Elu")
def _elu(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    alpha = a.get("alpha", "float", 1.0)
    scale, input_scale = a.get("scale", "float", 1.0), a.get("input_scale", "float", 1.0)
    return [("aten::elu.out", (i[0], alpha, scale, input_scale), {"out": o[0]})]


op("Relu")(_unary("aten::clamp_min.out", 0))
op("Relu6")(_unary("aten::clamp.out", 0, 6))
op("Gelu")(_unary("aten::gelu.out", approximate="tanh"))  # CANN Gelu is the tanh form


@op("LeakyRelu")
def _leaky(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::leaky_relu.out", (i[0], a.get("negative_slope", "float", 0.0)), {"out": o[0]})]


@op("Swish")
def _swish(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    scale = a.get("scale", "float", 1.0)
    if scale == 1.0:
        return [("aten::silu.out", (i[0],), {"out": o[0]})]
    return [
        ("aten::mul.Scalar_out", (i[0], scale), {"out": o[0]}),
        ("aten::sigmoid.out", (o[0],), {"out": o[0]}),
        ("aten::mul.out", (i[0], o[0]), {"out": o[0]}),
    ]


@op("Muls")
def _muls(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::mul.Scalar_out", (i[0], a.get("value", "float", 1.0)), {"out": o[0]})]


@op("Adds")
def _adds(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::add.Scalar_out", (i[0], a.get("value", "float", 0.0)), {"out": o[0]})]


@op("Axpy", n_in=2)
def _axpy(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::add.out", (i[1], i[0]), {"alpha": a.get("alpha", "float", 1.0), "out": o[0]})]


def _same_shape(x: Operand, y: Operand) -> None:
    if x.shape != y.shape:
        raise AclFail(
            ACL_ERROR_OP_OUTPUT_NOT_MATCH,
            f"{y.role} has shape {list(y.shape)} but {x.role} has {list(x.shape)}",
        )


@op("Identity")
def _identity(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    _same_shape(i[0], o[0])
    return [("aten::copy_", (o[0], i[0]), {})]


@op("Cast")
def _cast(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    set_as = a.values.get("dst_type")
    if set_as is not None and set_as[0] == "data_type":  # aclopSetAttrDataType
        dst = TORCH_TO_ACL.get(set_as[1], -1)
    else:
        dst = a.get("dst_type", "int", o[0].acl_dtype)
    if dst != o[0].acl_dtype:
        raise AclFail(
            ACL_ERROR_OP_ATTR_NOT_MATCH,
            f"Cast: dst_type {dst} differs from the output descriptor's type {o[0].acl_dtype}",
        )
    _same_shape(i[0], o[0])
    return [("aten::copy_", (o[0], i[0]), {})]


@op("Select", n_in=3)
def _select(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::where.self_out", (i[0], i[1], i[2]), {"out": o[0]})]


@op("ZerosLike")
def _zeros(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::fill_.Scalar", (o[0], 0), {})]


@op("OnesLike")
def _ones(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::fill_.Scalar", (o[0], 1), {})]


@op("Fill", n_in=2)
def _fill(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    dims = [int(d) for d in i[0].values()]
    if tuple(dims) != o[0].shape:
        raise AclFail(ACL_ERROR_OP_OUTPUT_NOT_MATCH, f"Fill: dims {dims} != output shape {list(o[0].shape)}")
    value = i[1]
    if value.numel != 1:
        raise AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, "Fill: value must hold exactly one element")
    if value.ref is None:
        return [("aten::fill_.Scalar", (o[0], value.values()[0]), {})]
    return [("aten::fill_.Tensor", (o[0], value.view((), ())), {})]


# ---- matrix products -----------------------------------------------------------------------


@op("MatMul", "MatMulV2", n_in=(2, 3))
def _matmul(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    x1, x2 = i[0], i[1]
    if x1.ndim != 2 or x2.ndim != 2:
        raise AclFail(
            ACL_ERROR_OP_INPUT_NOT_MATCH,
            f"MatMul takes 2-D inputs, got {list(x1.shape)} and {list(x2.shape)} (use BatchMatMul)",
        )
    if a.get("transpose_x1", "bool", False):
        x1 = x1.t()
    if a.get("transpose_x2", "bool", False):
        x2 = x2.t()
    if len(i) == 3:
        return [("aten::addmm.out", (i[2], x1, x2), {"out": o[0]})]
    return [("aten::mm.out", (x1, x2), {"out": o[0]})]


@op("BatchMatMul", "BatchMatMulV2", n_in=(2, 3))
def _bmm(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    x1, x2 = i[0], i[1]
    if a.get("adj_x1", "bool", False):
        x1 = x1.t()
    if a.get("adj_x2", "bool", False):
        x2 = x2.t()
    calls: list[Call] = [("aten::matmul.out", (x1, x2), {"out": o[0]})]
    if len(i) == 3:
        calls.append(("aten::add.out", (o[0], i[2]), {"out": o[0]}))
    return calls


# ---- softmax and reductions ----------------------------------------------------------------


def _softmax_like(aten: str) -> Callable:
    def lower(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
        axes = a.get("axes", "list_int", [-1])
        if len(axes) != 1:
            raise AclFail(ACL_ERROR_OP_ATTR_NOT_MATCH, f"softmax over {len(axes)} axes is not supported")
        return [(aten, (i[0], _axis(axes[0], i[0].ndim), False), {"out": o[0]})]

    return lower


op("SoftmaxV2", "Softmax")(_softmax_like("aten::_softmax.out"))
op("LogSoftmaxV2", "LogSoftmax")(_softmax_like("aten::_log_softmax.out"))


def _reduce(aten: str, with_dtype: bool, axes_from_attr: bool) -> Callable:
    def lower(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
        x = i[0]
        axes = a.get("axes", "list_int", []) if axes_from_attr else [int(v) for v in i[1].values()]
        keep = a.get("keep_dims", "bool", False)
        if not axes:
            if a.get("noop_with_empty_axes", "bool", True):
                _same_shape(x, o[0])
                return [("aten::copy_", (o[0], x), {})]
            axes = list(range(x.ndim))
        dims = sorted({_axis(int(d), x.ndim, "axes entry") for d in axes})
        args: tuple = (x, dims, keep)
        kwargs: dict = {"out": o[0]}
        if with_dtype:
            kwargs["dtype"] = None
        return [(aten, args, kwargs)]

    return lower


op("ReduceSum", n_in=2)(_reduce("aten::sum.IntList_out", True, False))
op("ReduceSumD")(_reduce("aten::sum.IntList_out", True, True))
op("ReduceMean", n_in=2)(_reduce("aten::mean.out", True, False))
op("ReduceMeanD")(_reduce("aten::mean.out", True, True))
op("ReduceMax", n_in=2)(_reduce("aten::amax.out", False, False))
op("ReduceMaxD")(_reduce("aten::amax.out", False, True))
op("ReduceMin", n_in=2)(_reduce("aten::amin.out", False, False))
op("ReduceMinD")(_reduce("aten::amin.out", False, True))


# ---- data movement -------------------------------------------------------------------------


@op("Transpose", n_in=2)
def _transpose(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return [("aten::copy_", (o[0], i[0].permute([int(p) for p in i[1].values()])), {})]


@op("TransposeD")
def _transpose_d(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    perm = a.get("perm", "list_int", None)
    if perm is None:
        raise AclFail(ACL_ERROR_OP_ATTR_NOT_MATCH, "TransposeD needs the 'perm' attribute")
    return [("aten::copy_", (o[0], i[0].permute(perm)), {})]


@op("Reshape", "Squeeze", "Unsqueeze", "ExpandDims", "Flatten", n_in=(1, 2))
def _reshape(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    # Same bytes, new shape: the output descriptor says which.
    return [("aten::copy_", (o[0], i[0].reshaped(o[0].shape)), {})]


def _concat(i: list[Operand], o: list[Operand], dim: int) -> list[Call]:
    return [("aten::cat.out", (list(i), _axis(dim, i[0].ndim)), {"out": o[0]})]


@op("ConcatD", "ConcatV2D", n_in=(1, -1))
def _concat_d(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return _concat(i, o, a.get("concat_dim", "int", 0))


@op("ConcatV2", n_in=(2, -1))
def _concat_v2(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return _concat(i[:-1], o, int(i[-1].values()[0]))


@op("Concat", n_in=(2, -1))
def _concat_tf(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return _concat(i[1:], o, int(i[0].values()[0]))


@op("SplitD", n_out=(1, -1))
def _split_d(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    x = i[0]
    dim = _axis(a.get("split_dim", "int", 0), x.ndim, "split_dim")
    n = a.get("num_split", "int", len(o))
    if n != len(o) or x.shape[dim] % n:
        raise AclFail(
            ACL_ERROR_OP_OUTPUT_NOT_MATCH,
            f"SplitD: {len(o)} outputs cannot split dim {dim} of size {x.shape[dim]} into {n}",
        )
    step = x.shape[dim] // n
    return [("aten::copy_", (o[k], x.narrow(dim, k * step, step)), {}) for k in range(n)]


def _slice(x: Operand, o: Operand, offsets: list[int], size: list[int], op_type: str) -> list[Call]:
    if len(offsets) != x.ndim or len(size) != x.ndim:
        raise AclFail(
            ACL_ERROR_OP_INPUT_NOT_MATCH,
            f"{op_type}: offsets {offsets} and size {size} need one entry per dim of {list(x.shape)}",
        )
    v = x
    for d, (off, n) in enumerate(zip(offsets, size)):
        n = x.shape[d] - off if n == -1 else n
        if off < 0 or n < 0 or off + n > x.shape[d]:
            raise AclFail(
                ACL_ERROR_OP_INPUT_NOT_MATCH,
                f"{op_type}: [{off}, {off + n}) is outside dim {d} of size {x.shape[d]}",
            )
        v = v.narrow(d, off, n)
    return [("aten::copy_", (o, v), {})]


@op("Slice", n_in=3)
def _slice_v(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    return _slice(i[0], o[0], [int(v) for v in i[1].values()], [int(v) for v in i[2].values()], "Slice")


@op("SliceD")
def _slice_d(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    offsets, size = a.get("offsets", "list_int", None), a.get("size", "list_int", None)
    if offsets is None or size is None:
        raise AclFail(ACL_ERROR_OP_ATTR_NOT_MATCH, "SliceD needs the 'offsets' and 'size' attributes")
    return _slice(i[0], o[0], list(offsets), list(size), "SliceD")


@op("GatherV2", n_in=3)
def _gather(i: list[Operand], o: list[Operand], a: Attrs) -> list[Call]:
    axis = _axis(int(i[2].values()[0]), i[0].ndim)
    if i[1].ndim != 1:
        raise AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, "GatherV2: only 1-D indices are supported")
    return [("aten::index_select.out", (i[0], axis, i[1]), {"out": o[0]})]


# ---- meta validation -----------------------------------------------------------------------


def resolve_aten(name: str) -> Any:
    ns, _, rest = name.partition("::")
    base, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, ns), base), overload or "default")


def _meta(x: Any, made: dict[int, torch.Tensor]) -> Any:
    if isinstance(x, Operand):
        t = made.get(id(x))
        if t is None:
            t = made[id(x)] = torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta")
        return t
    if isinstance(x, (list, tuple)):
        return type(x)(_meta(v, made) for v in x)
    if isinstance(x, dict):
        return {k: _meta(v, made) for k, v in x.items()}
    return x


def signature(x: Any) -> Any:
    if isinstance(x, Operand):
        return ("T", x.dtype, x.shape, x.stride, x.role)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(signature(v) for v in x))
    if isinstance(x, dict):
        return tuple(sorted((k, signature(v)) for k, v in x.items()))
    return x


_checked: dict[Any, AclFail | None] = {}


def meta_check(op_type: str, calls: list[Call]) -> None:
    """Run the calls on meta tensors; raise AclFail with the reason if torch would reject them."""
    key = (op_type, signature(calls))
    if key in _checked:
        err = _checked[key]
        if err is not None:
            raise err
        return
    err = None
    for name, args, kwargs in calls:
        made: dict[int, torch.Tensor] = {}
        margs, mkwargs = _meta(args, made), _meta(kwargs, made)
        out = kwargs.get("out", args[0] if name.endswith("_") or "_." in name else None)
        expect = out.shape if isinstance(out, Operand) else None
        try:
            with warnings.catch_warnings():  # the resize warning: reported below as a mismatch
                warnings.simplefilter("ignore")
                resolve_aten(name)(*margs, **mkwargs)
        except Exception as e:  # noqa: BLE001 - any rejection is the program's operand mistake
            err = AclFail(ACL_ERROR_OP_INPUT_NOT_MATCH, f"{op_type} ({name}): {e}")
            break
        if expect is not None and tuple(made[id(out)].shape) != expect:
            err = AclFail(
                ACL_ERROR_OP_OUTPUT_NOT_MATCH,
                f"{op_type}: output descriptor has shape {list(expect)} but the result has "
                f"shape {list(made[id(out)].shape)}",
            )
            break
    if len(_checked) > 4096:
        _checked.clear()
    _checked[key] = err
    if err is not None:
        raise err
