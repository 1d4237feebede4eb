"""``acl.op``: single-operator execution (acl.op.execute_v2) and operator attributes.

Operator types are lowered to aten calls in ``_ops``; see docs/acl.md for the supported list.
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import constants as C
from ._errors import AclFail, acl_api
from ._objects import ATTRS, BUFFERS, DESCS, OpAttr
from ._ops import ACL_TO_TORCH, OPS, Attrs, Operand, contiguous_strides, meta_check
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
    base = Operand(role, desc, dtype, shape, contiguous_strides(shape), 0)
    nbytes = desc.nbytes
    if desc.const is not None and not is_output:
        return Operand(**{**base.__dict__, "host": desc.const})
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

        def read(handle: int = alloc.handle, o: int = off, n: int = nbytes) -> bytes:
            return bytes(client.memcpy_d2h(handle, o, n))

        return Operand(
            **{
                **base.__dict__,
                "offset": off // max(desc.itemsize, 1),
                "handle": alloc.handle,
                "reader": read,
            }
        )
    if is_output:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{role}: outputs must be device memory from acl.rt.malloc, got {buf.addr:#x}",
        )
    if buf.addr < 4096 and nbytes:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{role}: null data buffer address")
    # Host-resident input (ACL_MEMTYPE_HOST placement, or a host pointer): usable as values.
    return Operand(**{**base.__dict__, "host": ctypes.string_at(buf.addr, nbytes) if nbytes else b""})


def _to_wire(x: Any, op_type: str) -> Any:
    if isinstance(x, Operand):
        if x.handle is None:
            raise AclFail(
                C.ACL_ERROR_INVALID_PARAM,
                f"{op_type}: {x.role} is host memory; tensor operands must be device memory "
                "(acl.rt.malloc + acl.rt.memcpy)",
            )
        return TensorRef(x.handle, x.dtype, x.shape, x.stride, x.offset)
    if isinstance(x, list):
        return [_to_wire(v, op_type) for v in x]
    if isinstance(x, tuple):
        return tuple(_to_wire(v, op_type) for v in x)
    if isinstance(x, dict):
        return {k: _to_wire(v, op_type) for k, v in x.items()}
    return x


def _check_count(kind: str, n: int, bounds: tuple[int, int], op_type: str, code: int) -> None:
    lo, hi = bounds
    if n < lo or (hi >= 0 and n > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{'any' if hi < 0 else hi}"
        raise AclFail(code, f"{op_type} takes {want} {kind}, got {n}")


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
    spec = OPS.get(op_type)
    if spec is None:
        raise AclFail(
            C.ACL_ERROR_OP_NOT_FOUND,
            f"operator type {op_type!r} is not supported by FlexNPU (supported: {', '.join(sorted(OPS))})",
        )
    _check_count("inputs", len(inputs), spec.n_in, op_type, C.ACL_ERROR_OP_INPUT_NOT_MATCH)
    _check_count("outputs", len(outputs), spec.n_out, op_type, C.ACL_ERROR_OP_OUTPUT_NOT_MATCH)
    attrs = Attrs(op_type, {} if attr in (0, None) else ATTRS.get(attr).values)
    s = RT.stream(stream)
    ins = [_operand(f"input {k}", d, b, s.device, False) for k, (d, b) in enumerate(zip(input_desc, inputs))]
    outs = [
        _operand(f"output {k}", d, b, s.device, True) for k, (d, b) in enumerate(zip(output_desc, outputs))
    ]
    calls = spec.lower(ins, outs, attrs)
    meta_check(op_type, calls)
    client = RT.device_state(s.device).client
    wire = [(name, _to_wire(args, op_type), _to_wire(kwargs, op_type)) for name, args, kwargs in calls]
    for name, args, kwargs in wire:
        client.launch(name, args, kwargs, [], stream=s.sid)
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
    _check_count("inputs", len(input_desc), spec.n_in, op_type, C.ACL_ERROR_OP_INPUT_NOT_MATCH)
    _check_count("outputs", len(output_desc), spec.n_out, op_type, C.ACL_ERROR_OP_OUTPUT_NOT_MATCH)
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
