"""The emulated accelerator backend in a real daemon, driven by real clients.

Kernel times are what the cost model predicts for the spec, in real time, as seen by a client's
synchronisation; kernels of different clients share compute and memory bandwidth as the
emulator's model says. Tolerances: a synchronous round trip through the daemon adds a little
(loop wake-up, meta inference, the reply), so a measured time may exceed the prediction by
15% + 10 ms on this shared 2-core machine, and may never be shorter than 97% of it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import psutil
import pytest
import torch

from flexnpu.client import Client
from flexnpu.errors import OutOfMemory, FlexNPUError
from flexnpu.protocol import TensorRef
from flexnpu.sched.costmodel import CostModel, aten_cost, copy_cost
from flexnpu.sched.emu import EmuDevice
from flexnpu.sched.specs import get_spec

SPEC = get_spec("910b")
MODEL = CostModel(SPEC)
BF = torch.bfloat16


def ref(h: int, shape: tuple, dtype=BF) -> TensorRef:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return TensorRef(h, dtype, tuple(shape), tuple(reversed(stride)), 0)


def nbytes(shape: tuple, dtype=BF) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class Mm:
    """One aten::mm [m,k] @ [k,n] with persistent inputs; launch() returns its output handle."""

    def __init__(self, c: Client, m: int, k: int, n: int) -> None:
        self.c, self.m, self.k, self.n = c, m, k, n
        self.a, self.b = c.malloc(nbytes((m, k))), c.malloc(nbytes((k, n)))
        self.cost = aten_cost(
            "aten::mm.default", [((m, k), "bfloat16"), ((k, n), "bfloat16")], [((m, n), "bfloat16")]
        )

    @property
    def predicted(self) -> float:
        return MODEL.predict(self.cost)

    def launch(self, stream: int = 0, free: bool = True) -> int:
        o = self.c.alloc_handle()
        self.c.launch(
            "aten::mm.default",
            (ref(self.a, (self.m, self.k)), ref(self.b, (self.k, self.n))),
            {},
            [(nbytes((self.m, self.n)), ref(o, (self.m, self.n)))],
            stream=stream,
        )
        if free:
            self.c.free(o)
        return o


def compute_bound(c: Client, ms: float) -> Mm:
    """Square bf16 matmul that the 910b model says takes `ms` milliseconds."""
    rate = SPEC.flops("bfloat16") * SPEC.gemm_eff
    n = round((ms / 1e3 * rate / 2) ** (1 / 3))
    return Mm(c, n, n, n)


def memory_bound(c: Client, ms: float) -> Mm:
    """GEMV-like [1,k]@[k,n] (weights streamed once) taking `ms` on the 910b model."""
    bw = SPEC.hbm_bw * SPEC.bw_eff
    k = 8192
    n = round(ms / 1e3 * bw / (2 * k))
    return Mm(c, 1, k, n)


def timed_sync(c: Client, fn, stream: int = 0) -> float:
    t = time.perf_counter()
    fn()
    c.synchronize(stream)
    return time.perf_counter() - t


def check_time(measured: float, predicted: float) -> None:
    assert predicted * 0.97 <= measured <= predicted * 1.15 + 0.010, (
        f"measured {measured * 1e3:.2f} ms, model predicts {predicted * 1e3:.2f} ms"
    )


def run_together(*jobs) -> tuple[float, list[float]]:
    """Run each job (a callable using its own client) in its own thread from one start line;
    returns (wall, per-job times)."""
    bar = threading.Barrier(len(jobs) + 1)
    out = [0.0] * len(jobs)

    def body(i, job):
        bar.wait(10)
        t = time.perf_counter()
        job()
        out[i] = time.perf_counter() - t

    ths = [threading.Thread(target=body, args=(i, j)) for i, j in enumerate(jobs)]
    for t in ths:
        t.start()
    bar.wait(10)
    t0 = time.perf_counter()
    for t in ths:
        t.join(30)
    assert not any(t.is_alive() for t in ths)
    return time.perf_counter() - t0, out


def predicted_together(*costs) -> list[float]:
    """Finish times of kernels submitted together on separate streams (virtual time)."""
    d = EmuDevice(SPEC)
    ks = [d.submit(i, c, 0.0) for i, c in enumerate(costs)]
    while not d.idle:
        d.advance(d.next_event_time())
    return [k.finished for k in ks]


@pytest.fixture
def emu(start_daemon):
    return start_daemon("--backend", "emu:910b")


@pytest.mark.timing  # real-time emulated kernels: needs a machine that is not overloaded
def test_kernel_takes_the_predicted_time_in_real_time(emu):
    with Client(0) as c:
        assert c.device_info()["emulated"] is True
        mm = compute_bound(c, 20)
        assert mm.predicted == pytest.approx(0.020, rel=0.02)
        timed_sync(c, mm.launch)  # first launch pays the meta inference of this shape
        times = [timed_sync(c, mm.launch) for _ in range(3)]
        check_time(statistics.median(times), mm.predicted)
        # stream order: five queued kernels run back to back, the sync sees their sum
        t = timed_sync(c, lambda: [mm.launch() for _ in range(5)])
        check_time(t, 5 * mm.predicted)


@pytest.mark.timing  # real-time emulated kernels: needs a machine that is not overloaded
def test_compute_and_memory_bound_kernels_overlap_two_compute_bound_do_not(emu):
    with Client(0) as c1, Client(0) as c2:
        comp, mem = compute_bound(c1, 40), memory_bound(c2, 40)
        comp2 = compute_bound(c2, 40)
        for k in (comp, mem, comp2):
            timed_sync(k.c, k.launch)
        check_time(timed_sync(c2, mem.launch), mem.predicted)

        wall, _ = run_together(lambda: timed_sync(c1, comp.launch), lambda: timed_sync(c2, mem.launch))
        pred = max(predicted_together(comp.cost, mem.cost))
        assert pred < 0.7 * (comp.predicted + mem.predicted)  # the model says: they overlap
        check_time(wall, pred)

        wall2, _ = run_together(lambda: timed_sync(c1, comp.launch), lambda: timed_sync(c2, comp2.launch))
        pred2 = max(predicted_together(comp.cost, comp2.cost))
        assert pred2 == pytest.approx(comp.predicted + comp2.predicted, rel=0.02)  # they share compute
        check_time(wall2, pred2)
        assert wall < 0.75 * wall2


def test_shape_only_allocations_hold_no_host_memory(emu):
    proc = psutil.Process(emu.pid)
    with Client(0) as c:
        rss0 = proc.memory_info().rss
        chunk = int(SPEC.mem_bytes) // 8
        hs = [c.malloc(chunk) for _ in range(7)]  # 7/8 of the emulated device's memory
        st = c.memory_stats()
        assert st["allocated"] == 7 * chunk and st["total"] == int(SPEC.mem_bytes)
        assert proc.memory_info().rss - rss0 < 256 << 20
        assert c.memcpy_d2h(hs[0], chunk - 4096, 4096) == bytes(4096)  # no values: zeros
        with pytest.raises(OutOfMemory, match="device out of memory"):
            c.malloc(2 * chunk, sync=True)  # more than the device has left
        for h in hs:
            c.free(h)
        assert c.memory_stats()["allocated"] == 0


def test_shape_only_launches_are_checked(emu):
    with Client(0) as c:
        a = c.malloc(nbytes((64, 32)))
        o = c.alloc_handle()
        # declared output shape differs from what mm returns
        c.launch(
            "aten::mm.default",
            (ref(a, (64, 32)), ref(a, (32, 64))),
            {},
            [(nbytes((64, 32)), ref(o, (64, 32)))],
        )
        with pytest.raises(FlexNPUError, match="returns"):
            c.synchronize(0)
        # a view beyond its allocation
        o2 = c.alloc_handle()
        c.launch(
            "aten::mm.default",
            (ref(a, (64, 64)), ref(a, (64, 64))),
            {},
            [(nbytes((64, 64)), ref(o2, (64, 64)))],
        )
        with pytest.raises(FlexNPUError, match="beyond"):
            c.synchronize(0)
        with pytest.raises(FlexNPUError, match="not supported"):
            c.launch("aten::from_file.default", (), {}, [])
            c.synchronize(0)
        # the daemon is fine and the output of a failed launch is unusable, not garbage
        c.launch(
            "aten::mm.default",
            (ref(a, (64, 32)), ref(a, (32, 64))),
            {},
            [(nbytes((64, 64)), ref(o2 + 1, (64, 64)))],
        )
        c.synchronize(0)


@pytest.mark.timing  # real-time emulated kernels: needs a machine that is not overloaded
def test_events_follow_emulated_completion(emu):
    with Client(0) as c:
        mm = compute_bound(c, 30)
        timed_sync(c, mm.launch)
        s1 = c.create_stream()
        e0, e1 = c.create_event(), c.create_event()
        c.record_event(e0, 0)
        mm.launch(0)
        c.record_event(e1, 0)
        assert c.event_query(e1) is False  # the kernel is still "running"
        c.stream_wait_event(s1, e1)  # s1's work starts after the kernel
        t = timed_sync(c, lambda: mm.launch(s1), stream=s1)
        check_time(t, 2 * mm.predicted)
        assert c.event_query(e1) is True
        check_time(c.event_elapsed_ms(e0, e1) / 1e3, mm.predicted)
        c.synchronize()


def test_emu_with_cpu_values_and_zero_copy_ipc(start_daemon, runtime_dir):
    start_daemon("--backend", "emu:910b+cpu")
    with Client(0) as a, Client(0) as b:
        assert a.device_info()["values"] is True
        data = bytes(range(256)) * 4096  # 1 MiB
        h = a.malloc(len(data))
        a.memcpy_h2d(h, 0, data)
        key = a.ipc_export(h)
        a.ipc_set_pids(key, [os.getpid()])  # both clients live in this process
        hb, n = b.ipc_import(key)
        assert n == len(data) and b.memcpy_d2h(hb, 0, len(data)) == data
        a.memset(h, 0, 7, 16)  # the importer sees the same memory
        assert b.memcpy_d2h(hb, 0, 16) == b"\x07" * 16
        assert b.memory_stats()["allocated"] == 0  # no second copy charged to the importer
        # a command completes at max(cpu execution, emulated finish): never before the model says
        big = 256 << 20
        src, dst = a.malloc(big), a.malloc(big)
        t = timed_sync(a, lambda: a.memcpy_d2d(dst, 0, src, 0, big))
        assert t >= MODEL.predict(copy_cost(big))
