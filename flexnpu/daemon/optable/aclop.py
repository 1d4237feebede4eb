"""The aclop operators: ``aclop::<OpType>`` for every operator type of flexnpu/aclop_ops.py.

A launch carries ``(inputs, outputs)`` and the operator's attributes as keyword arguments:
each input is a tensor (a bounds-checked view of the client's allocation) or a host operand
``[dtype, shape, values]`` (AscendCL's constant / host-placed inputs: axes, perm, dims), each
output a tensor. This is what aclopCompileAndExecute (native front end) and acl.op.execute_v2
(pyACL front end) send. The operator is lowered by the shared table (aclop_ops.lower: the same
function the pyACL front end checks with before sending), checked on torch's meta device, and
its aten calls run on views of the client's memory: every derived view (transpose, narrow,
reshape) is an ``as_strided`` of an allocation-sized storage, which torch bounds-checks, and
indexing operators get the same range check as aten launches (``torch_exec.validate_indices``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...ops import aclop_ops as T
from ... import ops
from ..backends.torch_exec import LaunchError, validate_indices
from ..backends.torch_exec import _resolve as resolve_aten
from . import Args, register

# aclop operators take attributes of any name (CANN's prototypes have many; the lowering reads
# the ones it knows): the table gathers them under this key
_ATTRS = "*"


def _host_operand(op: str, role: str, v: list[Any]) -> T.Operand:
    if (
        len(v) != 3
        or not isinstance(v[0], torch.dtype)
        or not isinstance(v[1], list)
        or not isinstance(v[2], list)
    ):
        raise LaunchError(f"aclop::{op}: {role} must be a tensor or [dtype, shape, values]")
    dtype, shape, values = v
    if (
        dtype not in T.TORCH_TO_ACL
        or len(shape) > 16
        or not all(type(d) is int and 0 <= d <= T.MAX_HOST_VALUES for d in shape)
        or math.prod(shape) != len(values)
        or not all(type(x) in (bool, int, float) for x in values)
    ):
        raise LaunchError(f"aclop::{op}: {role} is a malformed host operand")
    shp = tuple(shape)
    return T.Operand(role, dtype, shp, T.contiguous_strides(shp), 0, host=tuple(values))


def _device_operand(role: str, t: torch.Tensor) -> T.Operand:
    return T.Operand(
        role,
        t.dtype,
        tuple(t.shape),
        tuple(t.stride()),
        int(t.storage_offset()),
        ref=t,
        reader=lambda: t.reshape(-1).tolist(),
    )


def _operands(op: str, v: Any, what: str, host_ok: bool) -> list[T.Operand]:
    if not isinstance(v, list):
        raise LaunchError(f"aclop::{op}: {what} must be a list")
    out = []
    for k, x in enumerate(v):
        role = f"{what[:-1]} {k}"
        if isinstance(x, torch.Tensor):
            out.append(_device_operand(role, x))
        elif host_ok and isinstance(x, list):
            out.append(_host_operand(op, role, x))
        else:
            raise LaunchError(f"aclop::{op}: {role} must be a tensor")
    return out


def _materialize(x: Any) -> Any:
    if isinstance(x, T.Operand):
        base: torch.Tensor = x.ref  # lower() refused host operands as tensors
        if (x.shape, x.stride, x.offset) == (tuple(base.shape), tuple(base.stride()), base.storage_offset()):
            return base
        return torch.as_strided(base, x.shape, x.stride, x.offset)
    if isinstance(x, list):
        return [_materialize(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_materialize(v) for v in x)
    if isinstance(x, dict):
        return {k: _materialize(v) for k, v in x.items()}
    return x


def run(op: str, a: Args) -> None:
    ins = _operands(op, a.pop("inputs"), "inputs", True)
    outs = _operands(op, a.pop("outputs"), "outputs", False)
    attrs = T.Attrs.from_wire(op, a.get(_ATTRS) or {})
    for name, args, kwargs in T.lower(op, ins, outs, attrs):
        opov, rule = resolve_aten(name)
        margs, mkwargs = _materialize(args), _materialize(kwargs)
        if rule is not None and rule.kind == ops.INDEXED:
            validate_indices(name, opov, rule, margs, mkwargs)
        opov(*margs, **mkwargs)


def _entry(op: str) -> Any:
    return lambda a: run(op, a)


for _op in sorted(T.OPS):
    register(f"aclop::{_op}", [("inputs", "any"), ("outputs", "any")], attrs={_ATTRS: "any"})(_entry(_op))
