"""``acl.op``: single-operator execution (acl.op.execute_v2) and operator attributes.

An operator launch is one ``aclop::<OpType>`` LAUNCH, executed by the daemon's operator table
(flexnpu/daemon/optable/aclop.py), which lowers it with flexnpu/aclop_ops.py. The same lowering
runs here first, on torch's meta device, so that operand and attribute mistakes come back
synchronously as ACL_ERROR_OP_* codes where the program checks them. See docs/acl.md.
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import constants as C
from ._errors import AclFail, acl_api
from ._objects import ATTRS, BUFFERS, DESCS, OpAttr
from flexnpu.ops.aclop_ops import (
    ACL_TO_TORCH,
    MAX_HOST_VALUES,
    OPS,
    AclopError,
    Attrs,
    Operand,
    contiguous_strides,
)
from flexnpu.ops.aclop_ops import lower as lower_op
from ._runtime import RT, is_device_ptr
from flexnpu.protocol import TensorRef

# ---------------------------------------------------------------------------------------------
# attributes


def create_attr() -> int:
    return ATTRS.add(OpAttr())


def destroy_attr(attr: int) -> None:
    ATTRS._objs.pop(attr, None)


def _set(attr: int, name: Any, kind: str, value: Any) -> int:
    if not isinstance(name, str):
        raise TypeError("attribute name must be a str")
    ATTRS.get(attr).values[name] = (kind, value)
    return C.ACL_SUCCESS


def _as_list(values: Any, conv: type) -> list:
    if hasattr(values, "tolist") and not isinstance(values, list):  # numpy arrays, as pyACL accepts
        values = values.tolist()
    if not isinstance(values, list):
        raise TypeError("argument 3 is not list or numpy array")
    return [conv(v) for v in values]


set_attr_bool = acl_api("acl.op.set_attr_bool")(
    lambda attr, name, value: _set(attr, name, "bool", bool(value))
)
set_attr_int = acl_api("acl.op.set_attr_int")(lambda attr, name, value: _set(attr, name, "int", int(value)))
set_attr_float = acl_api("acl.op.set_attr_float")(
    lambda attr, name, value: _set(attr, name, "float", float(value))
)
set_attr_string = acl_api("acl.op.set_attr_string")(
    lambda attr, name, value: _set(attr, name, "string", str(value))
)
set_attr_list_bool = acl_api("acl.op.set_attr_list_bool")(
    lambda attr, name, values: _set(attr, name, "list_bool", _as_list(values, bool))
)
set_attr_list_int = acl_api("acl.op.set_attr_list_int")(
    lambda attr, name, values: _set(attr, name, "list_int", _as_list(values, int))
)
set_attr_list_float = acl_api("acl.op.set_attr_list_float")(
    lambda attr, name, values: _set(attr, name, "list_float", _as_list(values, float))
)
set_attr_list_string = acl_api("acl.op.set_attr_list_string")(
    lambda attr, name, values: _set(attr, name, "list_string", _as_list(values, str))
)
set_attr_list_list_int = acl_api("acl.op.set_attr_list_list_int")(
    lambda attr, name, values: _set(attr, name, "list_list_int", [_as_list(v, int) for v in values])
)


# ---------------------------------------------------------------------------------------------
# execution


def _host_values(role: str, desc: Any, raw: bytes) -> tuple[Any, ...]:
    np_dtype = C.DTYPE_INFO[desc.dtype][0]
    if np_dtype is None:
        raise AclFail(
            C.ACL_ERROR_OP_INPUT_NOT_MATCH, f"{role}: host values of data type {desc.dtype} cannot be read"
        )
    if desc.numel > MAX_HOST_VALUES:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{role}: a host-resident input holds at most {MAX_HOST_VALUES} values (it has {desc.numel}); "
            "put larger operands in device memory",
        )
    import numpy as np

    return tuple(np.frombuffer(raw, dtype=np_dtype, count=desc.numel).tolist())


def _operand(role: str, desc_h: Any, buf_h: Any, device: int, is_output: bool) -> Operand:
    desc = DESCS.get(desc_h)
    buf = BUFFERS.get(buf_h)
    dtype = ACL_TO_TORCH.get(desc.dtype)
    if dtype is None:
        raise AclFail(C.ACL_ERROR_UNSUPPORTED_DATA_TYPE, f"{role}: data type {desc.dtype} is not supported")
    if desc.fmt not in C.PLAIN_FORMATS:
        raise AclFail(
            C.ACL_ERROR_FORMAT_NOT_MATCH,
            f"{role}: format {desc.fmt} is a packed device layout; FlexNPU supports plain "
            "row-major formats (ND, NCHW, NHWC, ...)",
        )
    shape = tuple(desc.dims)
    strides = contiguous_strides(shape)
    nbytes = desc.nbytes
    if desc.const is not None and not is_output:
        return Operand(role, dtype, shape, strides, 0, host=_host_values(role, desc, desc.const))
    if buf.size < nbytes:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{role}: data buffer holds {buf.size} bytes, its descriptor needs {nbytes}",
        )
    if is_device_ptr(buf.addr):
        alloc, off = RT.resolve(buf.addr, nbytes, f"{role} buffer")
        if alloc.device != device:
            raise AclFail(
                C.ACL_ERROR_RT_STREAM_CONTEXT,
                f"{role} is memory of device {alloc.device}, the stream belongs to device {device}",
            )
        if off % max(desc.itemsize, 1):
            raise AclFail(
                C.ACL_ERROR_MEMORY_ADDRESS_UNALIGNED,
                f"{role}: address {buf.addr:#x} is not aligned to its {desc.itemsize}-byte elements",
            )
        client = RT.device_state(device).client

        def read(handle: int = alloc.handle, o: int = off, n: int = nbytes) -> list[Any]:
            return list(_host_values(role, desc, bytes(client.memcpy_d2h(handle, o, n))))

        return Operand(
            role, dtype, shape, strides, off // max(desc.itemsize, 1), ref=alloc.handle, reader=read
        )
    if is_output:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{role}: outputs must be device memory from acl.rt.malloc, got {buf.addr:#x}",
        )
    if buf.addr < 4096 and nbytes:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{role}: null data buffer address")
    # Host-resident input (ACL_MEMTYPE_HOST placement, or a host pointer): usable as values.
    raw = ctypes.string_at(buf.addr, nbytes) if nbytes else b""
    return Operand(role, dtype, shape, strides, 0, host=_host_values(role, desc, raw))


def _to_wire(x: Operand) -> Any:
    """An operand of an ``aclop::`` launch: a TensorRef, or a host operand's [dtype, shape, values]."""
    if x.ref is None:
        return [x.dtype, list(x.shape), list(x.host or ())]
    return TensorRef(x.ref, x.dtype, x.shape, x.stride, x.offset)


def _execute(
    op_type: Any, input_desc: Any, inputs: Any, output_desc: Any, outputs: Any, attr: Any, stream: Any
) -> int:
    if not isinstance(op_type, str):
        raise TypeError("acl.op.execute_v2 args parse failed: op_type must be a str")
    for arg in (input_desc, inputs, output_desc, outputs):
        if not isinstance(arg, list):
            raise TypeError("argument 2, 3, 4, or 5 is not list")
    if len(input_desc) != len(inputs) or len(output_desc) != len(outputs):
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{op_type}: {len(input_desc)} input descs for {len(inputs)} inputs, "
            f"{len(output_desc)} output descs for {len(outputs)} outputs",
        )
    if op_type not in OPS:
        raise AclFail(
            C.ACL_ERROR_OP_NOT_FOUND,
            f"operator type {op_type!r} is not supported by FlexNPU (supported: {', '.join(sorted(OPS))})",
        )
    values = {} if attr in (0, None) else ATTRS.get(attr).values
    s = RT.stream(stream)
    ins = [_operand(f"input {k}", d, b, s.device, False) for k, (d, b) in enumerate(zip(input_desc, inputs))]
    outs = [
        _operand(f"output {k}", d, b, s.device, True) for k, (d, b) in enumerate(zip(output_desc, outputs))
    ]
    try:
        lower_op(op_type, ins, outs, Attrs(op_type, values))
    except AclopError as e:
        raise AclFail(e.code, str(e)) from None
    client = RT.device_state(s.device).client
    kwargs = {name: v for name, (_kind, v) in values.items()}
    wire = ([_to_wire(x) for x in ins], [_to_wire(x) for x in outs])
    client.launch(f"aclop::{op_type}", wire, kwargs, [], stream=s.sid)
    return C.ACL_SUCCESS


execute_v2 = acl_api("acl.op.execute_v2")(_execute)
execute = acl_api("acl.op.execute")(_execute)


# ---------------------------------------------------------------------------------------------
# operator handles (aclopCreateHandle / aclopExecWithHandle): the operator and its descriptors
# fixed once, executed many times with different buffers


class _OpHandle:
    __slots__ = ("op_type", "input_desc", "output_desc", "attr")

    def __init__(self, op_type: str, input_desc: list, output_desc: list, attr: Any):
        self.op_type, self.input_desc, self.output_desc, self.attr = op_type, input_desc, output_desc, attr


_HANDLES: dict[int, _OpHandle] = {}
_next_handle = iter(range(0x0B000001, 1 << 62))


@acl_api("acl.op.create_handle", fail=(0,))
def create_handle(op_type: str, input_desc: list, output_desc: list, attr: int) -> tuple[int, int]:
    if not isinstance(op_type, str):
        raise TypeError("acl.op.create_handle args parse failed: op_type must be a str")
    if not isinstance(input_desc, list) or not isinstance(output_desc, list):
        raise TypeError("argument 2 or 3 is not list")
    spec = OPS.get(op_type)
    if spec is None:
        raise AclFail(C.ACL_ERROR_OP_NOT_FOUND, f"operator type {op_type!r} is not supported by FlexNPU")
    for kind, n, (lo, hi), code in (
        ("inputs", len(input_desc), spec.n_in, C.ACL_ERROR_OP_INPUT_NOT_MATCH),
        ("outputs", len(output_desc), spec.n_out, C.ACL_ERROR_OP_OUTPUT_NOT_MATCH),
    ):
        if n < lo or (hi >= 0 and n > hi):
            raise AclFail(code, f"{op_type} takes {lo if lo == hi else f'{lo}..{hi}'} {kind}, got {n}")
    for d in input_desc + output_desc:
        DESCS.get(d)  # an invalid descriptor fails here, as at handle creation
    if attr not in (0, None):
        ATTRS.get(attr)
    h = next(_next_handle)
    _HANDLES[h] = _OpHandle(op_type, list(input_desc), list(output_desc), attr)
    return h, C.ACL_SUCCESS


@acl_api("acl.op.execute_with_handle")
def execute_with_handle(handle: int, inputs: list, outputs: list, stream: int) -> int:
    h = _HANDLES.get(handle) if isinstance(handle, int) else None
    if h is None:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{handle!r} is not a handle from acl.op.create_handle")
    return _execute(h.op_type, h.input_desc, inputs, h.output_desc, outputs, h.attr, stream)


def destroy_handle(handle: int) -> None:
    _HANDLES.pop(handle, None)


@acl_api("acl.op.update_params")
def update_params(op_type: str, input_desc: list, output_desc: list, attr: int) -> int:
    """Compiles nothing (FlexNPU has no per-shape operator binaries); checks the op is known."""
    if op_type not in OPS:
        raise AclFail(C.ACL_ERROR_OP_NOT_FOUND, f"operator type {op_type!r} is not supported by FlexNPU")
    return C.ACL_SUCCESS


@acl_api("acl.op.set_model_dir")
def set_model_dir(model_dir: str) -> int:
    """Compiled single-op models are not needed: operators run as aten kernels in the daemon."""
    import os

    if not isinstance(model_dir, str) or not os.path.isdir(model_dir):
        raise AclFail(C.ACL_ERROR_INVALID_FILE, f"model directory {model_dir!r} does not exist")
    return C.ACL_SUCCESS


@acl_api("acl.op.cast")
def cast(src_desc: int, src_buffer: int, dst_desc: int, dst_buffer: int, truncate: int, stream: int) -> int:
    return _execute("Cast", [src_desc], [src_buffer], [dst_desc], [dst_buffer], None, stream)


def supported_op_types() -> list[str]:
    """FlexNPU extension (not in pyACL): the operator types execute_v2 accepts."""
    return sorted(OPS)


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"acl.op.{name} is not implemented by FlexNPU's pyACL layer (see docs/acl.md for the supported API)"
    )
