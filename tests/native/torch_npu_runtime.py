"""Run by tests/test_native_torch_npu.py under `flexnpu run --interpose native`: the REAL
torch_npu (its C++ runtime, caching allocator and task queue) on FlexNPU's AscendCL libraries.
Only the runtime half is exercised here; operators: tests/native/torch_npu_ops.py.

    python torch_npu_runtime.py check     # everything below, prints OK
    python torch_npu_runtime.py status    # allocate, report, wait for stdin, empty_cache, report
    python torch_npu_runtime.py oom BYTES # allocate beyond --memory-limit
    python torch_npu_runtime.py share     # an npu tensor sent to a spawned process (torch_npu's IPC)
"""

import sys

import torch
import torch_npu  # noqa: F401  (the real one: flexnpu run puts its isolated folder on the path)


def check() -> None:
    assert "site-packages" not in torch_npu.__file__, torch_npu.__file__
    assert torch.npu.is_available()
    assert torch.npu.device_count() == 1
    torch.npu.set_device(0)
    assert torch.npu.current_device() == 0
    assert torch.npu.get_device_name(0).startswith("Ascend"), torch.npu.get_device_name(0)
    free, total = torch.npu.mem_get_info()
    assert 0 < free <= total, (free, total)

    e = torch.empty((3, 4), device="npu")
    assert e.device.type == "npu" and e.shape == (3, 4)

    g = torch.Generator().manual_seed(0)
    dtypes = [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.complex128,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ]
    for dt in dtypes:
        for n in (0, 1, 1000, (3 << 20) + 17):
            itemsize = torch.empty((), dtype=dt).element_size()
            raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
            if dt == torch.bool:
                raw = raw % 2
            x = raw.view(dt)
            y = x.to("npu")
            assert y.device.type == "npu" and y.dtype == dt
            back = y.cpu()
            assert torch.equal(back.view(torch.uint8), raw), (dt, n)

    # pinned host memory (aclrtMallocHost: the shared arena) and non-blocking copies
    p = torch.empty(1 << 20, dtype=torch.float32, pin_memory=True)
    assert p.is_pinned()
    p.copy_(torch.arange(1 << 20, dtype=torch.float32))
    d = p.to("npu", non_blocking=True)
    q = torch.empty_like(p, pin_memory=True)
    q.copy_(d, non_blocking=True)
    torch.npu.synchronize()
    assert torch.equal(q, p)

    # streams and events
    s = torch.npu.Stream()
    start, end = torch.npu.Event(enable_timing=True), torch.npu.Event(enable_timing=True)
    src = torch.arange(4096, dtype=torch.int64)
    with torch.npu.stream(s):
        start.record()
        dev = src.to("npu", non_blocking=True)
        end.record()
    torch.npu.current_stream().wait_stream(s)
    s.synchronize()
    end.synchronize()
    assert end.query() and s.query()
    assert start.elapsed_time(end) >= 0
    assert torch.equal(dev.cpu(), src)
    ev = torch.npu.Event()
    ev.record(s)
    torch.npu.current_stream().wait_event(ev)
    torch.npu.synchronize()

    # allocator statistics
    before = torch.npu.memory_allocated()
    big = torch.empty(8 << 20, dtype=torch.uint8, device="npu")
    assert torch.npu.memory_allocated() >= before + (8 << 20)
    del big
    torch.npu.empty_cache()
    print("OK")


def status() -> None:
    torch.npu.set_device(0)
    x = torch.empty(64 << 20, dtype=torch.uint8, device="npu")
    torch.npu.synchronize()
    print("ALLOCATED", torch.npu.memory_allocated(), torch.npu.memory_reserved(), flush=True)
    sys.stdin.readline()
    del x
    torch.npu.empty_cache()
    torch.npu.synchronize()
    print("EMPTIED", torch.npu.memory_allocated(), torch.npu.memory_reserved(), flush=True)
    sys.stdin.readline()


def oom(nbytes: int) -> None:
    torch.npu.set_device(0)
    try:
        torch.empty(nbytes, dtype=torch.uint8, device="npu")
    except torch.OutOfMemoryError as e:
        print("OOM", type(e).__name__, str(e).splitlines()[0])
        return
    print("NO OOM")


def _child(q, r) -> None:
    torch.npu.set_device(0)
    t = q.get()
    r.put(t.cpu().numpy().tobytes())


def share() -> None:
    import torch.multiprocessing as mp

    mp.set_start_method("spawn")
    torch.npu.set_device(0)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    d = x.to("npu")
    q, r = mp.Queue(), mp.Queue()
    p = mp.Process(target=_child, args=(q, r))
    p.start()
    q.put(d)
    got = r.get(timeout=240)
    p.join(60)
    assert got == x.numpy().tobytes() and p.exitcode == 0
    print("SHARED OK")


if __name__ == "__main__":
    {"check": lambda: check(), "status": status, "oom": lambda: oom(int(sys.argv[2])), "share": share}[
        sys.argv[1]
    ]()
