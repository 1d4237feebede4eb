"""pyACL runtime (acl.rt, acl.util, descriptors) against a real CPU daemon."""

from __future__ import annotations

import numpy as np

from _acl_env import acl, acl_daemon, from_device, to_device  # noqa: F401 - fixtures
from flexnpu.hook.acl import constants as C


def test_init_finalize_and_repeats(acl):
    assert acl.init() == 0
    assert acl.init() == C.ACL_ERROR_REPEAT_INITIALIZE
    assert acl.finalize() == 0
    assert acl.finalize() == C.ACL_ERROR_REPEAT_FINALIZE
    assert "without a matching acl.init" in acl.get_recent_err_msg()
    assert acl.get_recent_err_msg() is None  # cleared once read


def test_device_and_context_lifecycle(acl):
    assert acl.rt.get_device() == (0, C.ACL_ERROR_RT_CONTEXT_NULL)
    assert acl.rt.set_device(0) == 0
    assert acl.rt.get_device() == (0, 0)
    assert acl.rt.get_run_mode() == (C.ACL_HOST, 0)
    ctx, ret = acl.rt.create_context(0)
    assert ret == 0 and acl.rt.get_context() == (ctx, 0)
    default_ctx = ctx
    assert acl.rt.set_device(7) == C.ACL_ERROR_RT_INVALID_DEVICEID
    assert "device 7" in acl.get_recent_err_msg()
    assert acl.rt.destroy_context(ctx) == 0
    assert acl.rt.destroy_context(ctx) == C.ACL_ERROR_RT_PARAM_INVALID
    assert "destroyed" in acl.get_recent_err_msg()
    assert acl.rt.set_context(default_ctx) == C.ACL_ERROR_RT_PARAM_INVALID
    assert acl.rt.reset_device(0) == 0
    assert acl.rt.reset_device(0) == C.ACL_ERROR_RT_INVALID_DEVICEID


def test_memcpy_round_trip_all_directions(acl):
    assert acl.rt.set_device(0) == 0
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    n = x.nbytes
    dev, ret = acl.rt.malloc(n, C.ACL_MEM_MALLOC_HUGE_FIRST)
    assert ret == 0
    assert acl.rt.memcpy(dev, n, acl.util.numpy_to_ptr(x), n, C.ACL_MEMCPY_HOST_TO_DEVICE) == 0
    dev2, _ = acl.rt.malloc(n, C.ACL_MEM_MALLOC_NORMAL_ONLY)
    assert acl.rt.memcpy(dev2, n, dev, n, C.ACL_MEMCPY_DEVICE_TO_DEVICE) == 0
    host, ret = acl.rt.malloc_host(n)
    assert ret == 0
    assert acl.rt.memcpy(host, n, dev2, n, C.ACL_MEMCPY_DEVICE_TO_HOST) == 0
    assert np.array_equal(acl.util.ptr_to_numpy(host, (4096,), C.NPY_FLOAT32), x)
    # host to host, and bytes_to_ptr / ptr_to_bytes as pyACL samples use them
    out = bytes(n)
    assert acl.rt.memcpy(acl.util.bytes_to_ptr(out), n, host, n, C.ACL_MEMCPY_HOST_TO_HOST) == 0
    assert np.array_equal(np.frombuffer(out, np.float32), x)
    assert acl.util.ptr_to_bytes(host, 8) == x[:2].tobytes()
    # pointer arithmetic into the middle of an allocation
    part = from_device(acl, dev + 400, (10,), np.float32)
    assert np.array_equal(part, x[100:110])
    assert acl.rt.free_host(host) == 0 and acl.rt.free(dev) == 0 and acl.rt.free(dev2) == 0


def test_async_copies_memset_on_a_stream(acl):
    assert acl.rt.set_device(0) == 0
    stream, ret = acl.rt.create_stream()
    assert ret == 0
    n = 1 << 20
    src = np.arange(n // 4, dtype=np.int32)
    hin, _ = acl.rt.malloc_host(n)
    hout, _ = acl.rt.malloc_host(n)
    acl.util.ptr_to_numpy(hin, (n // 4,), C.NPY_INT32)[:] = src
    dev, _ = acl.rt.malloc(n, 0)
    assert acl.rt.memcpy_async(dev, n, hin, n, C.ACL_MEMCPY_HOST_TO_DEVICE, stream) == 0
    assert acl.rt.memset_async(dev, n, 0x7F, 64, stream) == 0
    assert acl.rt.memcpy_async(hout, n, dev, n, C.ACL_MEMCPY_DEVICE_TO_HOST, stream) == 0
    assert acl.rt.synchronize_stream(stream) == 0
    got = acl.util.ptr_to_numpy(hout, (n,), C.NPY_UINT8)
    assert (got[:64] == 0x7F).all()
    assert np.array_equal(got[64:].view(np.int32), src[16:])
    assert acl.rt.memset(dev, n, 0, n) == 0
    assert not from_device(acl, dev, (n,), np.uint8).any()
    assert acl.rt.stream_query(stream) == (C.ACL_STREAM_STATUS_COMPLETE, 0)
    assert acl.rt.destroy_stream(stream) == 0
    assert acl.rt.synchronize_stream(stream) == C.ACL_ERROR_RT_PARAM_INVALID


def test_events_record_query_elapsed_and_wait(acl):
    assert acl.rt.set_device(0) == 0
    s1, _ = acl.rt.create_stream()
    s2, _ = acl.rt.create_stream()
    start, _ = acl.rt.create_event()
    end, ret = acl.rt.create_event()
    assert ret == 0
    assert acl.rt.query_event_status(end) == (C.ACL_EVENT_RECORDED_STATUS_NOT_READY, 0)
    assert acl.rt.event_elapsed_time(start, end)[1] == C.ACL_ERROR_RT_PARAM_INVALID
    dev, _ = acl.rt.malloc(1 << 22, 0)
    assert acl.rt.record_event(start, s1) == 0
    assert acl.rt.memset_async(dev, 1 << 22, 1, 1 << 22, s1) == 0
    assert acl.rt.record_event(end, s1) == 0
    # s2 waits for s1's memset, then copies: it must see the memset's bytes
    assert acl.rt.stream_wait_event(s2, end) == 0
    host = np.zeros(16, np.uint8)
    assert acl.rt.memcpy_async(acl.util.numpy_to_ptr(host), 16, dev, 16, 2, s2) == 0
    assert acl.rt.synchronize_stream(s2) == 0
    assert (host == 1).all()
    assert acl.rt.synchronize_event(end) == 0
    assert acl.rt.query_event_status(end) == (C.ACL_EVENT_RECORDED_STATUS_COMPLETE, 0)
    ms, ret = acl.rt.event_elapsed_time(start, end)
    assert ret == 0 and ms >= 0.0
    assert acl.rt.record_event(s1, s1) == C.ACL_ERROR_RT_PARAM_INVALID  # a stream is not an event
    assert acl.rt.destroy_event(start) == 0 and acl.rt.destroy_event(end) == 0
    assert acl.rt.synchronize_device() == 0


def test_bad_pointers_give_clear_errors(acl):
    assert acl.rt.set_device(0) == 0
    dev, _ = acl.rt.malloc(256, 0)
    host = np.zeros(512, np.uint8)
    hp = acl.util.numpy_to_ptr(host)
    # out of the allocation's bounds
    assert acl.rt.memcpy(hp, 512, dev, 512, 2) == C.ACL_ERROR_RT_PARAM_INVALID
    assert "exceed its allocation of 256 bytes" in acl.get_recent_err_msg()
    # count larger than dest_max
    assert acl.rt.memcpy(dev, 16, hp, 32, 1) == C.ACL_ERROR_INVALID_PARAM
    # null and made-up pointers
    assert acl.rt.memcpy(0, 16, hp, 16, 1) == C.ACL_ERROR_INVALID_PARAM
    assert "null" in acl.get_recent_err_msg()
    bogus = dev + (1234 << 40)
    assert acl.rt.memcpy(hp, 16, bogus, 16, 2) == C.ACL_ERROR_RT_PARAM_INVALID
    # freed pointer, double free, free of an interior pointer
    assert acl.rt.free(dev + 8) == C.ACL_ERROR_RT_PARAM_INVALID
    assert acl.rt.free(dev) == 0
    assert acl.rt.memcpy(hp, 16, dev, 16, 2) == C.ACL_ERROR_RT_PARAM_INVALID
    assert "freed" in acl.get_recent_err_msg()
    assert acl.rt.free(dev) == C.ACL_ERROR_RT_PARAM_INVALID
    assert acl.rt.free_host(hp) == C.ACL_ERROR_INVALID_PARAM  # not from malloc_host
    assert acl.rt.malloc(0, 0)[1] == C.ACL_ERROR_INVALID_PARAM
    assert acl.rt.malloc(16, 0xFFFF)[1] == C.ACL_ERROR_INVALID_PARAM
    assert acl.rt.memcpy(hp, 16, hp, 16, 9) == C.ACL_ERROR_INVALID_PARAM  # bad kind


def test_allocation_over_the_limit_is_reported(acl):
    assert acl.rt.set_device(0) == 0
    free, total, ret = acl.rt.get_mem_info(C.ACL_HBM_MEM)
    assert ret == 0 and total == 256_000_000 and 0 < free <= total
    # bigger than the device, or within the device but over this client's limit: aclrtMalloc is
    # synchronous, so both fail at the call itself
    dev, ret = acl.rt.malloc(1 << 50, 0)
    assert ret == C.ACL_ERROR_RT_MEMORY_ALLOCATION
    a, ret = acl.rt.malloc(200 << 20, 0)
    assert ret == 0
    b, ret = acl.rt.malloc(200 << 20, 0)
    assert (b, ret) == (0, C.ACL_ERROR_RT_MEMORY_ALLOCATION)
    assert "207001" in acl.get_recent_err_msg()
    assert acl.rt.synchronize_device() == 0  # nothing left over for the next sync
    assert acl.rt.free(a) == 0


def test_util_refuses_device_pointers(acl):
    import pytest

    assert acl.rt.set_device(0) == 0
    dev, _ = acl.rt.malloc(64, 0)
    with pytest.raises(ValueError, match="device memory"):
        acl.util.ptr_to_bytes(dev, 8)
    with pytest.raises(ValueError, match="device memory"):
        acl.util.ptr_to_numpy(dev, (2,), C.NPY_FLOAT32)


def test_tensor_desc_and_data_buffer(acl):
    desc = acl.create_tensor_desc(C.ACL_FLOAT16, [2, 3, 4], C.ACL_FORMAT_ND)
    assert acl.get_tensor_desc_type(desc) == C.ACL_FLOAT16
    assert acl.get_tensor_desc_format(desc) == C.ACL_FORMAT_ND
    assert acl.get_tensor_desc_num_dims(desc) == 3
    assert acl.get_tensor_desc_dim(desc, 2) == 4
    assert acl.get_tensor_desc_dim_v2(desc, 1) == (3, 0)
    assert acl.get_tensor_desc_dim_v2(desc, 5)[1] == C.ACL_ERROR_INVALID_PARAM
    assert acl.get_tensor_desc_element_count(desc) == 24
    assert acl.get_tensor_desc_size(desc) == 48
    assert acl.data_type_size(C.ACL_INT64) == 8
    buf = acl.create_data_buffer(0x1234000, 48)
    assert acl.get_data_buffer_addr(buf) == 0x1234000
    assert acl.get_data_buffer_size_v2(buf) == 48
    assert acl.destroy_data_buffer(buf) == 0
    assert acl.destroy_data_buffer(buf) == C.ACL_ERROR_INVALID_PARAM
    acl.destroy_tensor_desc(desc)
    assert acl.get_tensor_desc_size(desc) == 0
    assert acl.float16_to_float(acl.float_to_float16(1.5)) == 1.5


def test_submodules_import_like_pyacl(acl):
    import importlib

    assert importlib.import_module("acl.rt") is acl.rt
    import pytest

    with pytest.raises(AttributeError, match="not implemented by FlexNPU"):
        acl.rt.no_such_function  # noqa: B018
