"""Error codes carried in every reply, and the Python exceptions they become.

The codes are part of the wire protocol (see flexnpu/protocol.py): a daemon answers a bad
request with one of these, never by crashing or by silently ignoring it.
"""

from __future__ import annotations

from enum import IntEnum


class Err(IntEnum):
    SUCCESS = 0
    INVALID_ARGUMENT = 1  # malformed record or argument out of range
    INVALID_HANDLE = 2  # handle unknown to this client (never another client's object)
    OUT_OF_MEMORY = 3  # device memory or this client's limit exhausted
    OP_NOT_SUPPORTED = 4  # the backend does not run this operator (or it is denied)
    OP_FAILED = 5  # the operator raised on the device
    PERMISSION_DENIED = 6  # IPC import without permission, uid not allowed, ...
    NOT_FOUND = 7  # IPC key or graph unknown
    BAD_STATE = 8  # e.g. replaying a graph still being captured
    SHUTDOWN = 9  # the daemon is stopping
    INTERNAL = 10  # a daemon bug; the daemon stays up and logs it
    VERSION_MISMATCH = 11  # client and daemon speak different layout/protocol versions
    UNSUPPORTED = 12  # the call exists but this backend cannot do it
    COLLECTIVE_FAILED = 13  # a collective failed: a rank died, timed out or disagreed


class FlexNPUError(RuntimeError):
    """Base class of every error FlexNPU raises to applications."""

    code: Err = Err.INTERNAL

    def __init__(self, message: str, code: Err | int | None = None) -> None:
        if code is not None:
            try:
                self.code = Err(code)
            except ValueError:
                self.code = Err.INTERNAL
        super().__init__(message)


class InvalidArgument(FlexNPUError, ValueError):
    code = Err.INVALID_ARGUMENT


class InvalidHandle(FlexNPUError):
    code = Err.INVALID_HANDLE


class OutOfMemory(FlexNPUError, MemoryError):
    code = Err.OUT_OF_MEMORY


class OpNotSupported(FlexNPUError, NotImplementedError):
    code = Err.OP_NOT_SUPPORTED


class OpFailed(FlexNPUError):
    code = Err.OP_FAILED


class PermissionDenied(FlexNPUError, PermissionError):
    code = Err.PERMISSION_DENIED


class NotFound(FlexNPUError, LookupError):
    code = Err.NOT_FOUND


class BadState(FlexNPUError):
    code = Err.BAD_STATE


class VersionMismatch(FlexNPUError):
    code = Err.VERSION_MISMATCH


class Unsupported(FlexNPUError):
    code = Err.UNSUPPORTED


class CollectiveError(FlexNPUError):
    """A collective failed on its communicator (a rank died, timed out, or called it with other
    shapes or dtypes); the communicator is unusable afterwards, as an aborted NCCL/HCCL one."""

    code = Err.COLLECTIVE_FAILED


class DaemonLost(FlexNPUError):
    """The daemon serving this device died, stopped, or stopped answering."""

    code = Err.SHUTDOWN


class AttachError(FlexNPUError):
    """Could not attach to a daemon (none running, permission, version)."""


_BY_CODE: dict[Err, type[FlexNPUError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        InvalidHandle,
        OutOfMemory,
        OpNotSupported,
        OpFailed,
        PermissionDenied,
        NotFound,
        BadState,
        VersionMismatch,
        Unsupported,
        DaemonLost,
        CollectiveError,
    )
}


def error_for(code: int, message: str) -> FlexNPUError:
    """The exception an application sees for a reply carrying `code`."""
    try:
        err = Err(code)
    except ValueError:
        return FlexNPUError(f"{message} (unknown error code {code})", Err.INTERNAL)
    return _BY_CODE.get(err, FlexNPUError)(message, err)


def code_of(exc: BaseException) -> Err:
    """The wire code for an exception raised while serving a request."""
    if isinstance(exc, FlexNPUError):
        return exc.code
    if isinstance(exc, MemoryError):
        return Err.OUT_OF_MEMORY
    if isinstance(exc, NotImplementedError):
        return Err.OP_NOT_SUPPORTED
    if isinstance(exc, (ValueError, TypeError, IndexError, OverflowError)):
        return Err.INVALID_ARGUMENT
    return Err.OP_FAILED
