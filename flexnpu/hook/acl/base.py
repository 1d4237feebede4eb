"""Top-level ``acl.*`` functions: init/finalize, tensor descriptors, data buffers, misc."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from . import constants as C
from ._errors import AclFail, acl_api, recent_message
from ._objects import BUFFERS, DESCS, DataBuffer, TensorDesc, validate_dims
from ._runtime import RT, check_size

VERSION = (1, 0, 0)  # the pyACL API level this layer implements, reported by get_version


@acl_api("acl.init")
def init(config_path: str | None = None) -> int:
    if config_path is not None and not isinstance(config_path, str):
        raise TypeError("acl.init args parse failed: config path must be a str")
    with RT.lock:
        if RT.initialized:
            raise AclFail(C.ACL_ERROR_REPEAT_INITIALIZE, "acl.init was already called")
        RT.initialized = True
    return C.ACL_SUCCESS


@acl_api("acl.finalize")
def finalize() -> int:
    with RT.lock:
        if not RT.initialized:
            raise AclFail(C.ACL_ERROR_REPEAT_FINALIZE, "acl.finalize without a matching acl.init")
        RT.initialized = False
    return C.ACL_SUCCESS


@acl_api("acl.get_version", fail=(0, 0, 0))
def get_version() -> tuple[int, int, int, int]:
    return (*VERSION, C.ACL_SUCCESS)


def get_soc_name() -> str:
    """The daemon's device name, e.g. 'cpu' or the accelerator it drives."""
    try:
        info = RT.client().device_info()
        return f"FlexNPU-{info.get('name') or info.get('device_type') or 'device'}"
    except Exception:  # noqa: BLE001 - no device open: still a string, as aclrtGetSocName
        return "FlexNPU"


def get_recent_err_msg() -> str | None:
    return recent_message()


def data_type_size(data_type: int) -> int:
    info = C.DTYPE_INFO.get(data_type)
    return info[1] if info else 0


def float16_to_float(value: int) -> float:
    return struct.unpack("<e", struct.pack("<H", value & 0xFFFF))[0]


def float_to_float16(value: float) -> int:
    # aclFloatToFloat16 saturates instead of producing inf
    v = max(-65504.0, min(65504.0, float(value))) if value == value else 65504.0
    return struct.unpack("<H", struct.pack("<e", v))[0]


# --- data buffers ------------------------------------------------------------------------------


def create_data_buffer(data: int, size: int) -> int:
    if not isinstance(data, int) or not isinstance(size, int) or size < 0 or data < 0:
        raise TypeError("acl.create_data_buffer args parse failed: (data: int, size: int)")
    return BUFFERS.add(DataBuffer(data, size))


@acl_api("acl.destroy_data_buffer")
def destroy_data_buffer(data_buffer: int) -> int:
    BUFFERS.pop(data_buffer)
    return C.ACL_SUCCESS


def get_data_buffer_addr(data_buffer: int) -> int:
    buf = BUFFERS._objs.get(data_buffer)
    return buf.addr if buf else 0


def get_data_buffer_size(data_buffer: int) -> int:
    buf = BUFFERS._objs.get(data_buffer)
    return buf.size if buf else 0


get_data_buffer_size_v2 = get_data_buffer_size


@acl_api("acl.update_data_buffer")
def update_data_buffer(data_buffer: int, data: int, size: int) -> int:
    buf = BUFFERS.get(data_buffer)
    check_size(size, "size")
    buf.addr, buf.size = data, size
    return C.ACL_SUCCESS


# --- tensor descriptors --------------------------------------------------------------------------


def create_tensor_desc(data_type: int, dims: list, format: int) -> int:  # noqa: A002 - pyACL's name
    if not isinstance(data_type, int) or not isinstance(format, int):
        raise TypeError("acl.create_tensor_desc args parse failed: (data_type: int, dims: list, format: int)")
    return DESCS.add(TensorDesc(data_type, validate_dims(dims), format))


def destroy_tensor_desc(desc: int) -> None:
    DESCS._objs.pop(desc, None)


def _desc(desc: int) -> TensorDesc | None:
    return DESCS._objs.get(desc)


def get_tensor_desc_type(desc: int) -> int:
    d = _desc(desc)
    return d.dtype if d else C.ACL_DT_UNDEFINED


def get_tensor_desc_format(desc: int) -> int:
    d = _desc(desc)
    return d.fmt if d else C.ACL_FORMAT_UNDEFINED


def get_tensor_desc_size(desc: int) -> int:
    d = _desc(desc)
    return d.nbytes if d else 0


def get_tensor_desc_element_count(desc: int) -> int:
    d = _desc(desc)
    return d.numel if d else 0


def get_tensor_desc_num_dims(desc: int) -> int:
    d = _desc(desc)
    return len(d.dims) if d else 0


def get_tensor_desc_dim(desc: int, index: int) -> int:
    d = _desc(desc)
    return d.dims[index] if d and 0 <= index < len(d.dims) else -1


@acl_api("acl.get_tensor_desc_dim_v2", fail=(-1,))
def get_tensor_desc_dim_v2(desc: int, index: int) -> tuple[int, int]:
    d = DESCS.get(desc)
    if not isinstance(index, int) or not 0 <= index < len(d.dims):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"dim index {index!r} out of range for {len(d.dims)} dims")
    return d.dims[index], C.ACL_SUCCESS


def get_tensor_desc_name(desc: int) -> str:
    d = _desc(desc)
    return d.name if d else ""


def set_tensor_desc_name(desc: int, name: str) -> None:
    d = _desc(desc)
    if d is not None:
        d.name = str(name)


@acl_api("acl.set_tensor_shape")
def set_tensor_shape(desc: int, dims: list) -> int:
    DESCS.get(desc).dims = validate_dims(dims)
    return C.ACL_SUCCESS


set_tensor_origin_shape = acl_api("acl.set_tensor_origin_shape")(set_tensor_shape.__wrapped__)
set_tensor_storage_shape = acl_api("acl.set_tensor_storage_shape")(set_tensor_shape.__wrapped__)


@acl_api("acl.set_tensor_format")
def set_tensor_format(desc: int, format: int) -> int:  # noqa: A002
    DESCS.get(desc).fmt = int(format)
    return C.ACL_SUCCESS


set_tensor_origin_format = acl_api("acl.set_tensor_origin_format")(set_tensor_format.__wrapped__)
set_tensor_storage_format = acl_api("acl.set_tensor_storage_format")(set_tensor_format.__wrapped__)


@acl_api("acl.set_tensor_const")
def set_tensor_const(desc: int, data: int, size: int) -> int:
    """Constant operand whose bytes live on the host (e.g. ReduceSum axes); copied now."""
    d = DESCS.get(desc)
    check_size(size, "size")
    if size < d.nbytes:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"const data of {size} bytes for a {d.nbytes}-byte tensor")
    d.const = ctypes.string_at(data, d.nbytes) if d.nbytes else b""
    return C.ACL_SUCCESS


@acl_api("acl.set_tensor_place_ment")
def set_tensor_place_ment(desc: int, mem_type: int) -> int:
    if mem_type not in (C.ACL_MEMTYPE_DEVICE, C.ACL_MEMTYPE_HOST, C.ACL_MEMTYPE_HOST_COMPILE_INDEPENDENT):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"invalid memory type {mem_type!r}")
    DESCS.get(desc).placement = mem_type
    return C.ACL_SUCCESS


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"acl.{name} is not implemented by FlexNPU's pyACL layer (see docs/acl.md for the supported API)"
    )
