"""How pyACL calls fail: an ACL error code returned in the call's usual return shape, plus a
message kept for acl.get_recent_err_msg() and logged (logger ``flexnpu.acl``) so a program that
only prints the code still leaves a readable reason on stderr."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Generic, ParamSpec, Protocol, TypeVar
from collections.abc import Callable

from . import constants as C

log = logging.getLogger("flexnpu.acl")
_recent = threading.local()

P = ParamSpec("P")
R = TypeVar("R")


class AclApi(Protocol, Generic[P, R]):
    """A pyACL entry point made by acl_api: callable as the implementation, which stays
    reachable (without the error translation) as ``__wrapped__``."""

    __wrapped__: Callable[P, R]
    __acl_name__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...


class AclFail(Exception):
    """Raised inside the implementation; the API wrapper turns it into a return code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def describe(code: int) -> str:
    return f"{code} ({C.ERROR_NAMES.get(code, 'unknown ACL error')})"


def record(api_name: str, code: int, message: str) -> None:
    text = f"{api_name} failed with error {describe(code)}: {message}"
    _recent.msg = text
    log.error("%s", text)


def recent_message() -> str | None:
    """Last failure message of this thread, cleared once read (as aclGetRecentErrMsg does)."""
    msg = getattr(_recent, "msg", None)
    _recent.msg = None
    return msg


# FlexNPU wire error (flexnpu.errors.Err name) -> the ACL code a real device reports for it.
_BY_ERR = {
    "INVALID_ARGUMENT": C.ACL_ERROR_RT_PARAM_INVALID,
    "INVALID_HANDLE": C.ACL_ERROR_RT_PARAM_INVALID,
    "OUT_OF_MEMORY": C.ACL_ERROR_RT_MEMORY_ALLOCATION,
    "OP_NOT_SUPPORTED": C.ACL_ERROR_OP_NOT_FOUND,
    "OP_FAILED": C.ACL_ERROR_RT_AICORE_EXCEPTION,
    "PERMISSION_DENIED": C.ACL_ERROR_RT_NO_PERMISSION,
    "NOT_FOUND": C.ACL_ERROR_RT_PARAM_INVALID,
    "BAD_STATE": C.ACL_ERROR_RT_PARAM_INVALID,
    "SHUTDOWN": C.ACL_ERROR_RT_LOST_HEARTBEAT,
    "INTERNAL": C.ACL_ERROR_RT_INTERNAL_ERROR,
    "VERSION_MISMATCH": C.ACL_ERROR_RT_SOC_VERSION,
    "UNSUPPORTED": C.ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
}


def flexnpu_error_code(err: BaseException) -> int:
    """Map a client-side FlexNPUError to the ACL code a real device would report for it."""
    if type(err).__name__ == "DaemonLost":
        return C.ACL_ERROR_RT_LOST_HEARTBEAT
    code = getattr(err, "code", None)
    return _BY_ERR.get(getattr(code, "name", ""), C.ACL_ERROR_RT_INTERNAL_ERROR)


def _is_flexnpu_error(err: BaseException) -> bool:
    return any(c.__name__ == "FlexNPUError" for c in type(err).__mro__)


def acl_api(api_name: str, fail: tuple[Any, ...] = ()) -> Callable[[Callable[P, R]], AclApi[P, R]]:
    """Wrap an implementation so AclFail / FlexNPUError become pyACL-style return values.

    ``fail`` are the placeholder values returned before the code on failure, e.g. ``(0,)`` for
    ``dev_ptr, ret = acl.rt.malloc(...)``. Functions returning a bare ``ret`` use ``()``.
    Argument type errors still raise TypeError, as pyACL's own argument parsing does.
    """

    def wrap(fn: Callable[P, R]) -> AclApi[P, R]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except AclFail as e:
                record(api_name, e.code, e.message)
                return (*fail, e.code) if fail else e.code
            except Exception as e:  # noqa: BLE001 - only FlexNPU errors are translated
                if not _is_flexnpu_error(e):
                    raise
                code = flexnpu_error_code(e)
                record(api_name, code, f"{type(e).__name__}: {e}")
                return (*fail, code) if fail else code

        inner.__acl_name__ = api_name  # type: ignore[attr-defined]
        return inner  # type: ignore[return-value]

    return wrap
