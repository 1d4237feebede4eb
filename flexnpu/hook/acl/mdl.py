"""``acl.mdl``: offline models (.om files) compiled by ATC for Ascend hardware.

FlexNPU backends execute aten operators through the daemon; none of them can run an offline
.om model, so every loading entry point fails with ACL_ERROR_FEATURE_UNSUPPORTED and a message
saying so (a missing file still reports ACL_ERROR_INVALID_FILE first, as AscendCL does).
Programs can use acl.op.execute_v2 or the torch ``npu`` device instead.
"""

from __future__ import annotations

import os
from typing import Any

from . import constants as C
from ._errors import AclFail, acl_api

_WHY = (
    "FlexNPU cannot execute offline .om models: its daemon backends run aten operators "
    "(use acl.op.execute_v2, or the torch 'npu' device, instead)"
)


def _unsupported(what: str) -> AclFail:
    return AclFail(C.ACL_ERROR_FEATURE_UNSUPPORTED, f"{what}: {_WHY}")


def _check_file(path: Any) -> None:
    if not isinstance(path, str):
        raise TypeError("model path must be a str")
    if not os.path.isfile(path):
        raise AclFail(C.ACL_ERROR_INVALID_FILE, f"model file {path!r} does not exist")


@acl_api("acl.mdl.load_from_file", fail=(0,))
def load_from_file(model_path: str) -> tuple[int, int]:
    _check_file(model_path)
    raise _unsupported(f"loading {model_path!r}")


@acl_api("acl.mdl.load_from_file_with_mem", fail=(0,))
def load_from_file_with_mem(
    model_path: str, work_ptr: int, work_size: int, weight_ptr: int, weight_size: int
) -> tuple[int, int]:
    _check_file(model_path)
    raise _unsupported(f"loading {model_path!r}")


@acl_api("acl.mdl.load_from_mem", fail=(0,))
def load_from_mem(model: int, model_size: int) -> tuple[int, int]:
    raise _unsupported("loading a model from memory")


@acl_api("acl.mdl.load_from_mem_with_mem", fail=(0,))
def load_from_mem_with_mem(
    model: int, model_size: int, work_ptr: int, work_size: int, weight_ptr: int, weight_size: int
) -> tuple[int, int]:
    raise _unsupported("loading a model from memory")


@acl_api("acl.mdl.query_size", fail=(0, 0))
def query_size(model_path: str) -> tuple[int, int, int]:
    _check_file(model_path)
    raise _unsupported(f"querying {model_path!r}")


def _no_model(model_id: Any) -> AclFail:
    return AclFail(C.ACL_ERROR_INVALID_MODEL_ID, f"model id {model_id!r} was never loaded ({_WHY})")


@acl_api("acl.mdl.execute")
def execute(model_id: int, input: int, output: int) -> int:  # noqa: A002 - pyACL's name
    raise _no_model(model_id)


@acl_api("acl.mdl.execute_async")
def execute_async(model_id: int, input: int, output: int, stream: int) -> int:  # noqa: A002
    raise _no_model(model_id)


@acl_api("acl.mdl.unload")
def unload(model_id: int) -> int:
    raise _no_model(model_id)


@acl_api("acl.mdl.get_desc")
def get_desc(model_desc: int, model_id: int) -> int:
    raise _no_model(model_id)


def __getattr__(name: str) -> Any:
    raise AttributeError(f"acl.mdl.{name} is not available: {_WHY}")
