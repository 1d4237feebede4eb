"""``acl.media``: DVPP memory. FlexNPU has no media engine; DVPP buffers are plain device memory
(on Ascend they come from a separate pool the DVPP hardware can address, which matters only to
the DVPP calls themselves). Image/video processing calls (vpc, jpegd, venc, ...) are not provided
and say so by name.
"""

from __future__ import annotations

from typing import Any

from . import constants as C
from . import rt
from ._errors import AclFail, acl_api

_DVPP: set[int] = set()


@acl_api("acl.media.dvpp_malloc", fail=(0,))
def dvpp_malloc(size: int) -> tuple[int, int]:
    ptr, _ = rt.malloc.__wrapped__(size, C.ACL_MEM_MALLOC_HUGE_FIRST)  # raises AclFail with the code
    _DVPP.add(ptr)
    return ptr, C.ACL_SUCCESS


@acl_api("acl.media.dvpp_free")
def dvpp_free(dev_ptr: int) -> int:
    if not isinstance(dev_ptr, int) or dev_ptr not in _DVPP:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{dev_ptr!r} is not memory from acl.media.dvpp_malloc (or was already freed)",
        )
    _DVPP.discard(dev_ptr)
    return rt.free.__wrapped__(dev_ptr)


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"acl.media.{name} is not implemented by FlexNPU's pyACL layer: FlexNPU has no "
        "DVPP media engine (image/video processing); acl.media.dvpp_malloc/dvpp_free "
        "give plain device memory (see docs/acl.md)"
    )
