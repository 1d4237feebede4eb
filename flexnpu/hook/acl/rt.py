"""``acl.rt``: the AscendCL runtime (devices, contexts, streams, events, memory).

Signatures and return shapes follow pyACL (``ret`` or ``(value, ret)``); see docs/acl.md.
Everything lowers to the FlexNPU client of the device: device memory is a daemon allocation,
streams and events are daemon streams and events.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

from . import constants as C
from ._errors import AclFail, acl_api
from ._runtime import RT, Context, DevAlloc, Event, Stream, check_host_ptr, check_size, is_device_ptr

# ---------------------------------------------------------------------------------------------
# devices and contexts


@acl_api("acl.rt.set_device")
def set_device(device_id: int) -> int:
    with RT.lock:
        st = RT.attach(device_id)
        st.refcount += 1
        if not st.default_ctx or not RT.contexts.alive(st.default_ctx):
            st.default_ctx = RT.contexts.add(Context(device_id))
        RT.set_current_context(st.default_ctx)
    return C.ACL_SUCCESS


def _release_device(st: Any) -> None:
    """Last reset of a device: wait for its work, then drop everything this process made on it."""
    try:
        st.client.synchronize(None)
    finally:
        for slot, alloc in list(RT.allocs.items()):
            if alloc.device == st.device:
                del RT.allocs[slot]
                st.client.free(alloc.handle)
        for h, s in RT.streams.items():
            if s.device == st.device:
                RT.streams.pop(h)
                st.client.destroy_stream(s.sid)
        for h, e in RT.events.items():
            if e.device == st.device:
                RT.events.pop(h)
                st.client.destroy_event(e.eid)
        for h, c in RT.contexts.items():
            if c.device == st.device:
                RT.contexts.pop(h)
        st.default_ctx = 0


@acl_api("acl.rt.reset_device")
def reset_device(device_id: int) -> int:
    with RT.lock:
        st = RT.devices.get(device_id)
        if st is None or st.refcount <= 0:
            raise AclFail(
                C.ACL_ERROR_RT_INVALID_DEVICEID, f"device {device_id} was not set with acl.rt.set_device"
            )
        st.refcount -= 1
        if st.refcount == 0:
            _release_device(st)
    return C.ACL_SUCCESS


@acl_api("acl.rt.reset_device_force")
def reset_device_force(device_id: int) -> int:
    with RT.lock:
        st = RT.devices.get(device_id)
        if st is None or st.refcount <= 0:
            raise AclFail(
                C.ACL_ERROR_RT_INVALID_DEVICEID, f"device {device_id} was not set with acl.rt.set_device"
            )
        st.refcount = 0
        _release_device(st)
    return C.ACL_SUCCESS


@acl_api("acl.rt.get_device", fail=(0,))
def get_device() -> tuple[int, int]:
    return RT.current_device(), C.ACL_SUCCESS


@acl_api("acl.rt.get_device_count", fail=(0,))
def get_device_count() -> tuple[int, int]:
    from flexnpu.paths import list_sockets

    devices = {d for d, _ in list_sockets()} | {d for d, st in RT.devices.items()}
    if not devices:
        raise AclFail(
            C.ACL_ERROR_RT_NO_DEVICE,
            "no FlexNPU daemon is running (no control socket found); start one with "
            "`flexnpu daemon` or run the program under `flexnpu run`",
        )
    # Device ids are dense in AscendCL: count up to the highest served id.
    return max(devices) + 1, C.ACL_SUCCESS


@acl_api("acl.rt.get_run_mode", fail=(C.ACL_HOST,))
def get_run_mode() -> tuple[int, int]:
    # The program always runs on the host and the device sits behind the daemon.
    return C.ACL_HOST, C.ACL_SUCCESS


@acl_api("acl.rt.create_context", fail=(0,))
def create_context(device_id: int) -> tuple[int, int]:
    with RT.lock:
        st = RT.attach(device_id)
        # AscendCL: creating a context opens the device implicitly.
        st.refcount += 1
        ctx = RT.contexts.add(Context(device_id))
        RT.set_current_context(ctx)
    return ctx, C.ACL_SUCCESS


@acl_api("acl.rt.destroy_context")
def destroy_context(context: int) -> int:
    with RT.lock:
        ctx = RT.contexts.get(context)
        st = RT.devices[ctx.device]
        if context == st.default_ctx:
            raise AclFail(
                C.ACL_ERROR_RT_PARAM_INVALID,
                "the default context of a device is released by acl.rt.reset_device, "
                "not acl.rt.destroy_context",
            )
        RT.contexts.pop(context)
        st.refcount -= 1
        if st.refcount == 0:
            _release_device(st)
    return C.ACL_SUCCESS


@acl_api("acl.rt.set_context")
def set_context(context: int) -> int:
    RT.contexts.get(context)
    RT.set_current_context(context)
    return C.ACL_SUCCESS


@acl_api("acl.rt.get_context", fail=(0,))
def get_context() -> tuple[int, int]:
    return RT.current_context(), C.ACL_SUCCESS


# ---------------------------------------------------------------------------------------------
# streams


@acl_api("acl.rt.create_stream", fail=(0,))
def create_stream() -> tuple[int, int]:
    dev = RT.current_device()
    sid = RT.client(dev).create_stream()
    return RT.streams.add(Stream(dev, sid)), C.ACL_SUCCESS


@acl_api("acl.rt.create_stream_with_config", fail=(0,))
def create_stream_with_config(priority: int, flag: int) -> tuple[int, int]:
    dev = RT.current_device()
    # AscendCL priorities: 0 is the highest. The client takes larger = more urgent, like CUDA.
    sid = RT.client(dev).create_stream(priority=-int(priority))
    return RT.streams.add(Stream(dev, sid)), C.ACL_SUCCESS


@acl_api("acl.rt.destroy_stream")
def destroy_stream(stream: int) -> int:
    s = RT.streams.pop(stream)
    RT.client(s.device).destroy_stream(s.sid)
    return C.ACL_SUCCESS


destroy_stream_force = acl_api("acl.rt.destroy_stream_force")(destroy_stream.__wrapped__)


@acl_api("acl.rt.synchronize_stream")
def synchronize_stream(stream: int) -> int:
    s = RT.stream(stream)
    RT.client(s.device).synchronize(s.sid)
    return C.ACL_SUCCESS


@acl_api("acl.rt.synchronize_stream_with_timeout")
def synchronize_stream_with_timeout(stream: int, timeout: int) -> int:
    # The client waits with its own liveness checks; a dead daemon still surfaces as an error.
    s = RT.stream(stream)
    RT.client(s.device).synchronize(s.sid)
    return C.ACL_SUCCESS


@acl_api("acl.rt.stream_query", fail=(C.ACL_STREAM_STATUS_NOT_READY,))
def stream_query(stream: int) -> tuple[int, int]:
    s = RT.stream(stream)
    client = RT.client(s.device)
    query = getattr(client, "stream_query", None)
    if query is not None:
        done = bool(query(s.sid))
    else:  # no non-blocking query in the client yet: wait, which makes the answer exact
        client.synchronize(s.sid)
        done = True
    return (C.ACL_STREAM_STATUS_COMPLETE if done else C.ACL_STREAM_STATUS_NOT_READY), C.ACL_SUCCESS


@acl_api("acl.rt.synchronize_device")
def synchronize_device() -> int:
    RT.client().synchronize(None)
    return C.ACL_SUCCESS


synchronize_device_with_timeout = acl_api("acl.rt.synchronize_device_with_timeout")(
    lambda timeout: synchronize_device.__wrapped__()
)


# ---------------------------------------------------------------------------------------------
# events


@acl_api("acl.rt.create_event", fail=(0,))
def create_event() -> tuple[int, int]:
    dev = RT.current_device()
    eid = RT.client(dev).create_event()
    return RT.events.add(Event(dev, eid)), C.ACL_SUCCESS


@acl_api("acl.rt.create_event_with_flag", fail=(0,))
def create_event_with_flag(flag: int) -> tuple[int, int]:
    return create_event.__wrapped__()


create_event_ex_with_flag = acl_api("acl.rt.create_event_ex_with_flag", fail=(0,))(
    create_event_with_flag.__wrapped__
)


@acl_api("acl.rt.destroy_event")
def destroy_event(event: int) -> int:
    e = RT.events.pop(event)
    RT.client(e.device).destroy_event(e.eid)
    return C.ACL_SUCCESS


def _same_device(e: Event, s: Stream) -> None:
    if e.device != s.device:
        raise AclFail(
            C.ACL_ERROR_RT_STREAM_CONTEXT,
            f"event of device {e.device} used with a stream of device {s.device}",
        )


@acl_api("acl.rt.record_event")
def record_event(event: int, stream: int) -> int:
    e = RT.events.get(event)
    s = RT.stream(stream)
    _same_device(e, s)
    RT.client(e.device).record_event(e.eid, s.sid)
    e.recorded = True
    return C.ACL_SUCCESS


@acl_api("acl.rt.reset_event")
def reset_event(event: int, stream: int) -> int:
    e = RT.events.get(event)
    _same_device(e, RT.stream(stream))
    e.recorded = False
    return C.ACL_SUCCESS


def _event_done(e: Event) -> bool:
    if not e.recorded:
        return False
    client = RT.client(e.device)
    query = getattr(client, "event_query", None)
    if query is not None:
        return bool(query(e.eid))
    client.event_synchronize(e.eid)  # no non-blocking query in the client yet: wait for it
    return True


@acl_api("acl.rt.query_event_status", fail=(C.ACL_EVENT_RECORDED_STATUS_NOT_READY,))
def query_event_status(event: int) -> tuple[int, int]:
    done = _event_done(RT.events.get(event))
    return (C.ACL_EVENT_RECORDED_STATUS_COMPLETE if done else C.ACL_EVENT_RECORDED_STATUS_NOT_READY), 0


@acl_api("acl.rt.query_event", fail=(C.ACL_EVENT_STATUS_NOT_READY,))
def query_event(event: int) -> tuple[int, int]:
    done = _event_done(RT.events.get(event))
    return (C.ACL_EVENT_STATUS_COMPLETE if done else C.ACL_EVENT_STATUS_NOT_READY), C.ACL_SUCCESS


@acl_api("acl.rt.synchronize_event")
def synchronize_event(event: int) -> int:
    e = RT.events.get(event)
    if e.recorded:
        RT.client(e.device).event_synchronize(e.eid)
    return C.ACL_SUCCESS


synchronize_event_with_timeout = acl_api("acl.rt.synchronize_event_with_timeout")(
    lambda event, timeout: synchronize_event.__wrapped__(event)
)


@acl_api("acl.rt.stream_wait_event")
def stream_wait_event(stream: int, event: int) -> int:
    s = RT.stream(stream)
    e = RT.events.get(event)
    _same_device(e, s)
    RT.client(s.device).stream_wait_event(s.sid, e.eid)
    return C.ACL_SUCCESS


@acl_api("acl.rt.event_elapsed_time", fail=(0.0,))
def event_elapsed_time(start: int, end: int) -> tuple[float, int]:
    a, b = RT.events.get(start), RT.events.get(end)
    if a.device != b.device:
        raise AclFail(C.ACL_ERROR_RT_PARAM_INVALID, "events belong to different devices")
    if not (a.recorded and b.recorded):
        raise AclFail(C.ACL_ERROR_RT_PARAM_INVALID, "both events must be recorded first")
    return float(RT.client(a.device).event_elapsed_ms(a.eid, b.eid)), C.ACL_SUCCESS


# ---------------------------------------------------------------------------------------------
# memory


def _device_total(client: Any) -> int:
    try:
        return int(client.device_info().get("total_memory") or 0)
    except Exception:  # noqa: BLE001 - unknown size: no local check, the daemon still enforces
        return 0


@acl_api("acl.rt.malloc", fail=(0,))
def malloc(size: int, policy: int) -> tuple[int, int]:
    check_size(size, "size")
    if size == 0:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, "size must be > 0")
    if not isinstance(policy, int) or not C.valid_malloc_policy(policy):
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"invalid memory allocation policy {policy!r}")
    dev = RT.current_device()
    st = RT.device_state(dev)
    total = _device_total(st.client)
    if total and size > total:
        raise AclFail(
            C.ACL_ERROR_RT_MEMORY_ALLOCATION,
            f"cannot allocate {size} bytes: device {dev} has {total} bytes in total",
        )
    slot = RT.new_slot()
    # Synchronous, as aclrtMalloc is: an over-limit allocation fails here with its ACL code.
    handle = st.client.malloc(size, sync=True)
    alloc = DevAlloc(slot, dev, handle, size)
    RT.allocs[slot] = alloc
    return alloc.base, C.ACL_SUCCESS


malloc_align32 = acl_api("acl.rt.malloc_align32", fail=(0,))(malloc.__wrapped__)
malloc_cached = acl_api("acl.rt.malloc_cached", fail=(0,))(malloc.__wrapped__)


@acl_api("acl.rt.free")
def free(dev_ptr: int) -> int:
    alloc, off = RT.resolve(dev_ptr, 0)
    if off:
        raise AclFail(
            C.ACL_ERROR_RT_PARAM_INVALID,
            f"{dev_ptr:#x} is {off} bytes into an allocation; acl.rt.free takes the address "
            "acl.rt.malloc returned",
        )
    del RT.allocs[alloc.slot]
    RT.device_state(alloc.device).client.free(alloc.handle)
    return C.ACL_SUCCESS


class _HostBlock:
    """Host memory of acl.rt.malloc_host. Preferably a buffer in the shared arena of the current
    device's client, which the daemon reads and writes directly (zero-copy, truly asynchronous
    memcpy_async); else, or when the arena is full, private page-aligned memory."""

    def __init__(self, size: int, client: Any | None, device: int | None) -> None:
        self.size = size
        self.client: Any = None  # the device's Client (when off is set)
        self.device: int | None = None
        self.off: int | None = None  # arena offset, or None: private memory in map
        self.map: mmap.mmap | None = None
        if client is not None:
            try:
                self.off = client.host_alloc(size)
                self.client, self.device = client, device
                mv = client.host_view(self.off, size)
            except (MemoryError, AttributeError):
                self.off = None
        if self.off is None:
            self.map = mmap.mmap(-1, size)
            mv = memoryview(self.map)
        self.cbuf = (ctypes.c_char * size).from_buffer(mv)
        self.addr = ctypes.addressof(self.cbuf)

    def arena_offset(self, ptr: int, n: int, device: int) -> int | None:
        """Arena offset of [ptr, ptr + n) if it lies in this block, in `device`'s arena."""
        if (
            self.off is None
            or device != self.device
            or not (self.addr <= ptr and ptr + n <= self.addr + self.size)
        ):
            return None
        return self.off + (ptr - self.addr)

    def close(self) -> None:
        del self.cbuf
        if self.off is not None:
            self.client.host_free(self.off)
        else:
            assert self.map is not None  # off is None: the block lives in map
            self.map.close()


_HOST: dict[int, _HostBlock] = {}


def _host_block(ptr: int, n: int) -> _HostBlock | None:
    for b in _HOST.values():  # few blocks in practice; programs reuse their staging buffers
        if b.addr <= ptr and ptr + n <= b.addr + b.size:
            return b
    return None


def release_host_blocks() -> None:
    """Free every malloc_host block (before the clients owning their arenas are closed)."""
    while _HOST:
        _HOST.popitem()[1].close()


@acl_api("acl.rt.malloc_host", fail=(0,))
def malloc_host(size: int) -> tuple[int, int]:
    check_size(size, "size")
    if size == 0:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, "size must be > 0")
    try:
        dev = RT.current_device()
        client = RT.device_state(dev).client
    except AclFail:  # no device open yet: private host memory
        dev, client = None, None
    block = _HostBlock(size, client, dev)
    _HOST[block.addr] = block
    return block.addr, C.ACL_SUCCESS


@acl_api("acl.rt.free_host")
def free_host(host_ptr: int) -> int:
    block = _HOST.pop(host_ptr, None) if isinstance(host_ptr, int) else None
    if block is None:
        raise AclFail(
            C.ACL_ERROR_INVALID_PARAM,
            f"{host_ptr!r} is not memory from acl.rt.malloc_host (or was already freed)",
        )
    block.close()
    return C.ACL_SUCCESS


def _host_view(ptr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")


def _memcpy(dst: int, dest_max: int, src: int, count: int, kind: int, stream: Any, wait: bool) -> int:
    check_size(dest_max, "dest_max")
    check_size(count, "count")
    if count > dest_max:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"count {count} exceeds dest_max {dest_max}")
    if not isinstance(kind, int) or not 0 <= kind <= C.ACL_MEMCPY_DEFAULT:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"invalid memcpy kind {kind!r}")
    # As in current AscendCL, the direction comes from the pointers themselves; `kind` is only
    # range-checked (older CANN validated it, newer releases document it as reserved).
    d_alloc = s_alloc = None
    if isinstance(dst, int) and is_device_ptr(dst):
        d_alloc, d_off = RT.resolve(dst, count, "dst")
    else:
        check_host_ptr(dst, "dst")
    if isinstance(src, int) and is_device_ptr(src):
        s_alloc, s_off = RT.resolve(src, count, "src")
    else:
        check_host_ptr(src, "src")
    sid = 0
    if stream not in (0, None):
        s = RT.stream(stream)
        sid = s.sid
        for a in (d_alloc, s_alloc):
            if a is not None and a.device != s.device and not (d_alloc and s_alloc):
                raise AclFail(
                    C.ACL_ERROR_RT_STREAM_CONTEXT,
                    f"memory of device {a.device} copied on a stream of device {s.device}",
                )
    if count == 0:
        return C.ACL_SUCCESS
    if d_alloc is None and s_alloc is None:
        ctypes.memmove(dst, src, count)
    elif s_alloc is None:
        assert d_alloc is not None  # not both None (above)
        client = RT.device_state(d_alloc.device).client
        block = _host_block(src, count)
        arena = block.arena_offset(src, count, d_alloc.device) if block else None
        if arena is not None:  # zero-copy: the daemon reads the malloc_host buffer itself
            client.memcpy_h2d_host(d_alloc.handle, d_off, arena, count, stream=sid, sync=wait)
        else:
            client.memcpy_h2d(d_alloc.handle, d_off, _host_view(src, count), stream=sid)
            if wait:
                client.synchronize(sid)
    elif d_alloc is None:
        client = RT.device_state(s_alloc.device).client
        block = _host_block(dst, count)
        arena = block.arena_offset(dst, count, s_alloc.device) if block else None
        if arena is not None:  # zero-copy: the daemon writes the malloc_host buffer itself
            client.memcpy_d2h_host(s_alloc.handle, s_off, arena, count, stream=sid, sync=wait)
        else:
            client.memcpy_d2h_into(s_alloc.handle, s_off, _host_view(dst, count), stream=sid)
    elif d_alloc.device == s_alloc.device:
        client = RT.device_state(d_alloc.device).client
        client.memcpy_d2d(d_alloc.handle, d_off, s_alloc.handle, s_off, count, stream=sid)
        if wait:
            client.synchronize(sid)
    else:  # between two devices (two daemons): stage through the host
        data = RT.device_state(s_alloc.device).client.memcpy_d2h(s_alloc.handle, s_off, count)
        dclient = RT.device_state(d_alloc.device).client
        dclient.memcpy_h2d(d_alloc.handle, d_off, data)
        if wait:
            dclient.synchronize(0)
    return C.ACL_SUCCESS


@acl_api("acl.rt.memcpy")
def memcpy(dst: int, dest_max: int, src: int, count: int, kind: int) -> int:
    return _memcpy(dst, dest_max, src, count, kind, None, wait=True)


@acl_api("acl.rt.memcpy_async")
def memcpy_async(dst: int, dest_max: int, src: int, count: int, kind: int, stream: int) -> int:
    return _memcpy(dst, dest_max, src, count, kind, stream, wait=False)


def _memset(ptr: int, max_count: int, value: int, count: int, stream: Any, wait: bool) -> int:
    check_size(max_count, "max_count")
    check_size(count, "count")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("value must be an int")
    if count > max_count:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"count {count} exceeds max_count {max_count}")
    byte = value & 0xFF  # like C memset: the value is converted to unsigned char
    if isinstance(ptr, int) and is_device_ptr(ptr):
        alloc, off = RT.resolve(ptr, count, "dev_ptr")
        s = RT.stream(stream) if stream not in (0, None) else Stream(alloc.device, 0)
        if s.device != alloc.device:
            raise AclFail(
                C.ACL_ERROR_RT_STREAM_CONTEXT,
                f"memory of device {alloc.device} set on a stream of device {s.device}",
            )
        if count:
            client = RT.device_state(alloc.device).client
            client.memset(alloc.handle, off, byte, count, stream=s.sid)
            if wait:
                client.synchronize(s.sid)
        return C.ACL_SUCCESS
    check_host_ptr(ptr, "dev_ptr")
    ctypes.memset(ptr, byte, count)
    return C.ACL_SUCCESS


@acl_api("acl.rt.memset")
def memset(dev_ptr: int, max_count: int, value: int, count: int) -> int:
    return _memset(dev_ptr, max_count, value, count, None, wait=True)


@acl_api("acl.rt.memset_async")
def memset_async(dev_ptr: int, max_count: int, value: int, count: int, stream: int) -> int:
    return _memset(dev_ptr, max_count, value, count, stream, wait=False)


@acl_api("acl.rt.get_mem_info", fail=(0, 0))
def get_mem_info(attr: int) -> tuple[int, int, int]:
    if not isinstance(attr, int) or not C.ACL_DDR_MEM <= attr <= C.ACL_HBM_MEM_P2P_NORMAL:
        raise AclFail(C.ACL_ERROR_INVALID_PARAM, f"invalid memory attribute {attr!r}")
    client = RT.client()
    stats = client.memory_stats()
    # One memory pool per device: every DDR/HBM attribute reports the same numbers.
    total = int(stats.get("limit") or 0) or _device_total(client)
    used = int(stats.get("reserved") or stats.get("allocated") or 0)
    return max(total - used, 0), total, C.ACL_SUCCESS


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"acl.rt.{name} is not implemented by FlexNPU's pyACL layer (see docs/acl.md for the supported API)"
    )
