import pytest

from flexnpu.sched.costmodel import Cost, CostModel
from flexnpu.sched.emu import EmuDevice
from flexnpu.sched.specs import DeviceSpec

# A round-numbered device: 100 TFLOP/s, 1 TB/s, no efficiency losses, 0 launch, issue_frac 0.25
SPEC = DeviceSpec("t", {"bfloat16": 100e12, "float32": 100e12}, 1e12, 64e9, 0.0, 1e11,
                  gemm_eff=1.0, bw_eff=1.0, link_eff=1.0, issue_frac=0.25)
COMPUTE = Cost(flops=100e9, bytes=100e6, op_class="gemm")       # 1 ms compute, 0.1 ms memory
MEMORY = Cost(flops=1e9, bytes=1e9, op_class="attention")       # 0.01 ms compute, 1 ms memory
TOL = 1e-6  # exact model: the emulator must reproduce the closed-form numbers


def run(dev):
    out = []
    while not dev.idle:
        out += dev.advance(dev.next_event_time())
    return out


def test_solo_duration_is_roofline_plus_launch():
    spec = DeviceSpec(**{**SPEC.__dict__, "launch_s": 5e-6})
    d = EmuDevice(spec)
    k = d.submit("s", COMPUTE, 0.0)
    [done] = run(d)
    assert done is k and k.finished == pytest.approx(1e-3 + 5e-6, rel=TOL)
    assert k.slowdown == pytest.approx(1.0, rel=TOL)
    assert CostModel(spec).roofline(COMPUTE) == pytest.approx(k.duration, rel=TOL)


def test_two_compute_bound_share_compute():
    d = EmuDevice(SPEC)
    a, b = d.submit("a", COMPUTE, 0.0), d.submit("b", COMPUTE, 0.0)
    run(d)
    assert a.finished == pytest.approx(2e-3, rel=TOL) and b.finished == pytest.approx(2e-3, rel=TOL)


def test_compute_and_memory_bound_overlap():
    # demands per unit progress: A (c=1.0, m=0.1) ms, B (c=max(0.01, 0.25*1)=0.25, m=1.0) ms.
    # Equal dominant shares x: compute 1.0x + 0.25x <= 1, memory 0.1x + 1.0x <= 1 -> x = 0.8
    # (compute saturates). Both progress at 0.8/ms and end together at 1.25 ms.
    d = EmuDevice(SPEC)
    a, b = d.submit("a", COMPUTE, 0.0), d.submit("b", MEMORY, 0.0)
    run(d)
    assert b.finished == pytest.approx(1.25e-3, rel=TOL)
    assert a.finished == pytest.approx(1.25e-3, rel=TOL)
    # together 1.25 ms instead of 2 ms back to back: the complementary-resource win
    assert max(a.finished, b.finished) < 0.7 * 2e-3


def test_weights_favour_priority_stream():
    d = EmuDevice(SPEC)
    a = d.submit("a", COMPUTE, 0.0, weight=1.0)
    b = d.submit("b", COMPUTE, 0.0, weight=3.0)
    run(d)
    # b gets 3/4 of compute: done at 1/0.75 = 1.333 ms; a gets 1/4 until then, then all
    assert b.finished == pytest.approx(4e-3 / 3, rel=TOL)
    assert a.finished == pytest.approx(2e-3, rel=TOL)


def test_same_stream_is_serial_and_real_time_drive():
    d = EmuDevice(SPEC, now=100.0)
    k1 = d.submit("s", MEMORY, 100.0)
    k2 = d.submit("s", MEMORY, 100.0)
    assert d.next_event_time() == pytest.approx(100.001, rel=1e-12)
    assert d.advance(100.0005) == []          # nothing due yet
    k3 = d.submit("t", MEMORY, 100.0005)      # joins mid-flight: shares memory with k1
    done = d.advance(100.01)
    assert done[0] is k1 and set(done) == {k1, k2, k3}
    assert k2.started == pytest.approx(k1.finished) and k1.finished > 100.001  # slowed by k3
    with pytest.raises(ValueError, match="backwards"):
        d.submit("s", MEMORY, 99.0)


def test_predict_finish_does_not_disturb_state():
    d = EmuDevice(SPEC)
    a = d.submit("a", COMPUTE, 0.0)
    d.submit("b", MEMORY, 0.0)
    assert d.predict_finish(a) == pytest.approx(1.25e-3, rel=TOL)
    assert a.finished is None and not d.idle
