"""Host-side pyACL objects: tensor descriptors, data buffers and operator attributes.

None of these touch the device; they only describe operands for acl.op.execute_v2, exactly as
aclTensorDesc / aclDataBuffer / aclopAttr do in AscendCL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import constants as C
from ._errors import AclFail
from ._runtime import HandleTable


@dataclass
class TensorDesc:
    dtype: int
    dims: list[int]
    fmt: int
    name: str = ""
    const: bytes | None = None  # acl.set_tensor_const
    placement: int = C.ACL_MEMTYPE_DEVICE

    @property
    def itemsize(self) -> int:
        info = C.DTYPE_INFO.get(self.dtype)
        return info[1] if info else 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class DataBuffer:
    addr: int
    size: int


@dataclass
class OpAttr:
    values: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> (kind, value)


DESCS: HandleTable[TensorDesc] = HandleTable("tensor desc", 0xD5, C.ACL_ERROR_INVALID_PARAM)
BUFFERS: HandleTable[DataBuffer] = HandleTable("data buffer", 0xDB, C.ACL_ERROR_INVALID_PARAM)
ATTRS: HandleTable[OpAttr] = HandleTable("op attr", 0xA7, C.ACL_ERROR_INVALID_PARAM)


def validate_dims(dims: Any) -> list[int]:
    if not isinstance(dims, list):
        raise TypeError("argument 2 is not list")
    out = []
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise TypeError(f"dims must be ints, got {d!r}")
        if d < 0:
            raise AclFail(
                C.ACL_ERROR_INVALID_PARAM, f"dims {dims}: dynamic (negative) dimensions are not supported"
            )
        out.append(d)
    return out
