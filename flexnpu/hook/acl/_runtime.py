"""Process-wide pyACL state: devices, contexts, streams, events and device pointers.

Device pointers are virtual: ``DEV_TAG | slot << 40 | byte_offset``. The slot names one
acl.rt.malloc allocation (mapped to a FlexNPU client handle), the low 40 bits are a byte offset,
so ``ptr + n`` pointer arithmetic works as on real device memory. DEV_TAG (bit 62) lies far above
any user-space host address on x86-64 and ARM64, so a pointer's kind is never ambiguous: host
pointers are real addresses and device pointers can never be dereferenced by mistake. Slots grow
monotonically (wrapping only after 4M allocations), so a freed pointer is reported as freed
instead of silently aliasing a newer allocation.

Contexts, streams, events, tensor descriptors, data buffers and op attributes are opaque ints
with a per-kind tag in bits 48..55, so passing one kind where another is expected is caught.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from collections.abc import Callable

from . import constants as C
from ._errors import AclFail

DEV_TAG = 1 << 62
SLOT_SHIFT = 40
OFFSET_MASK = (1 << SLOT_SHIFT) - 1
MAX_SLOT = (1 << 22) - 1
_TAG_SHIFT = 48

T = TypeVar("T")


class HandleTable(Generic[T]):
    """Opaque int handles for one kind of object, e.g. streams."""

    def __init__(self, kind: str, tag: int, missing_code: int) -> None:
        self.kind = kind
        self._base = tag << _TAG_SHIFT
        self._missing_code = missing_code
        self._objs: dict[int, T] = {}
        self._next = 1
        self._lock = threading.Lock()

    def add(self, obj: T) -> int:
        with self._lock:
            h = self._base | self._next
            self._next += 1
            self._objs[h] = obj
            return h

    def get(self, h: Any) -> T:
        obj = self._objs.get(h) if isinstance(h, int) else None
        if obj is None:
            raise AclFail(
                self._missing_code,
                f"{h!r} is not a live {self.kind}" + (" (it was destroyed)" if self.was_issued(h) else ""),
            )
        return obj

    def was_issued(self, h: Any) -> bool:
        return (
            isinstance(h, int)
            and (h >> _TAG_SHIFT) == (self._base >> _TAG_SHIFT)
            and 0 < (h & ((1 << _TAG_SHIFT) - 1)) < self._next
        )

    def alive(self, h: Any) -> bool:
        return h in self._objs

    def pop(self, h: Any) -> T:
        obj = self.get(h)
        with self._lock:
            self._objs.pop(h, None)
        return obj

    def items(self) -> list[tuple[int, T]]:
        with self._lock:
            return list(self._objs.items())


@dataclass
class DevAlloc:
    slot: int
    device: int
    handle: int  # FlexNPU client handle
    size: int

    @property
    def base(self) -> int:
        return DEV_TAG | (self.slot << SLOT_SHIFT)


@dataclass
class Context:
    device: int


@dataclass
class Stream:
    device: int
    sid: int  # client stream id (0 = the device's default stream)


@dataclass
class Event:
    device: int
    eid: int  # client event id
    recorded: bool = False


@dataclass
class DeviceState:
    device: int
    client: Any
    refcount: int = 0
    default_ctx: int = 0
    host_arena: list = field(default_factory=list)


def is_device_ptr(ptr: int) -> bool:
    return (ptr >> SLOT_SHIFT) >= (DEV_TAG >> SLOT_SHIFT) and ptr < (DEV_TAG << 1)


def default_client_factory(device: int) -> Any:
    from flexnpu.client import get_client

    return get_client(device)


class Runtime:
    """All pyACL state of this process. One instance: ``RT``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.client_factory: Callable[[int], Any] = default_client_factory
        self.initialized = False
        self.devices: dict[int, DeviceState] = {}
        self.contexts: HandleTable[Context] = HandleTable("context", 0xC7, C.ACL_ERROR_RT_PARAM_INVALID)
        self.streams: HandleTable[Stream] = HandleTable("stream", 0x57, C.ACL_ERROR_RT_PARAM_INVALID)
        self.events: HandleTable[Event] = HandleTable("event", 0xE7, C.ACL_ERROR_RT_PARAM_INVALID)
        self.allocs: dict[int, DevAlloc] = {}
        self._next_slot = 1
        self._tls = threading.local()
        self._last_ctx = 0  # fallback for threads that never called set_device/set_context

    # ---- devices and contexts ---------------------------------------------------------------
    def attach(self, device: int) -> DeviceState:
        st = self.devices.get(device)
        if st is not None:
            return st
        if not isinstance(device, int) or isinstance(device, bool) or device < 0:
            raise AclFail(C.ACL_ERROR_RT_INVALID_DEVICEID, f"invalid device id {device!r}")
        try:
            client = self.client_factory(device)
        except Exception as e:  # noqa: BLE001 - any attach failure means "no such device"
            raise AclFail(
                C.ACL_ERROR_RT_INVALID_DEVICEID,
                f"cannot attach to the FlexNPU daemon of device {device}: {e}",
            ) from e
        st = DeviceState(device, client)
        self.devices[device] = st
        return st

    def current_context(self) -> int:
        ctx = getattr(self._tls, "ctx", 0) or self._last_ctx
        if not ctx or not self.contexts.alive(ctx):
            raise AclFail(
                C.ACL_ERROR_RT_CONTEXT_NULL,
                "no current context: call acl.rt.set_device or acl.rt.set_context first",
            )
        return ctx

    def set_current_context(self, ctx: int) -> None:
        self._tls.ctx = ctx
        self._last_ctx = ctx

    def current_device(self) -> int:
        return self.contexts.get(self.current_context()).device

    def device_state(self, device: int) -> DeviceState:
        st = self.devices.get(device)
        if st is None or st.refcount <= 0:
            raise AclFail(
                C.ACL_ERROR_RT_INVALID_DEVICEID,
                f"device {device} is not open: call acl.rt.set_device({device}) first",
            )
        return st

    def client(self, device: int | None = None) -> Any:
        return self.device_state(self.current_device() if device is None else device).client

    # ---- streams and events -----------------------------------------------------------------
    def stream(self, handle: Any) -> Stream:
        """A stream handle as passed by the program; 0/None is the current device's default."""
        if handle in (0, None):
            return Stream(self.current_device(), 0)
        return self.streams.get(handle)

    # ---- device memory ----------------------------------------------------------------------
    def new_slot(self) -> int:
        with self.lock:
            for _ in range(MAX_SLOT):
                slot = self._next_slot
                self._next_slot = 1 if slot >= MAX_SLOT else slot + 1
                if slot not in self.allocs:
                    return slot
        raise AclFail(C.ACL_ERROR_RT_MEMORY_ALLOCATION, f"more than {MAX_SLOT} live allocations")

    def resolve(self, ptr: Any, nbytes: int, what: str = "device pointer") -> tuple[DevAlloc, int]:
        """The allocation holding [ptr, ptr + nbytes) and the byte offset of ptr in it."""
        if not isinstance(ptr, int) or isinstance(ptr, bool):
            raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} must be an int, got {type(ptr).__name__}")
        if not is_device_ptr(ptr):
            raise AclFail(
                C.ACL_ERROR_INVALID_PARAM, f"{what} {ptr:#x} is not device memory from acl.rt.malloc"
            )
        slot = (ptr - DEV_TAG) >> SLOT_SHIFT
        off = ptr & OFFSET_MASK
        alloc = self.allocs.get(slot)
        if alloc is None:
            freed = 0 < slot < MAX_SLOT
            raise AclFail(
                C.ACL_ERROR_RT_PARAM_INVALID,
                f"{what} {ptr:#x} does not point into live device memory"
                + (" (it was freed with acl.rt.free, or never allocated)" if freed else ""),
            )
        if nbytes < 0 or off + nbytes > alloc.size:
            raise AclFail(
                C.ACL_ERROR_RT_PARAM_INVALID,
                f"{what} {ptr:#x}: bytes [{off}, {off + nbytes}) exceed its allocation of {alloc.size} bytes",
            )
        return alloc, off

    def reset(self) -> None:
        """Forget everything (acl.finalize of the last user, and tests)."""
        self.__init__()  # type: ignore[misc]


RT = Runtime()


def check_host_ptr(ptr: Any, what: str) -> int:
    """Host pointers are real addresses; reject the values that can only be mistakes."""
    if not isinstance(ptr, int) or isinstance(ptr, bool):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} must be an int address, got {type(ptr).__name__}")
    if ptr < 4096:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} {ptr:#x} is a null/invalid host address")
    if is_device_ptr(ptr):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} {ptr:#x} is device memory, not host memory")
    if ptr >= DEV_TAG:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} {ptr:#x} is not a valid host address")
    return ptr


def check_size(n: Any, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} must be an int, got {type(n).__name__}")
    if n < 0:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"{what} must be >= 0, got {n}")
    return n


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
