import pytest

from flexnpu.sched.costmodel import Cost, CostModel
from flexnpu.sched.emu import EmuDevice
from flexnpu.sched.specs import DeviceSpec

# A round-numbered device: 100 TFLOP/s, 1 TB/s, no efficiency losses, 0 launch, issue_frac 0.25
SPEC = DeviceSpec(
    "t",
    {"bfloat16": 100e12, "float32": 100e12},
    1e12,
    64e9,
    0.0,
    1e11,
    gemm_eff=1.0,
    bw_eff=1.0,
    link_eff=1.0,
    issue_frac=0.25,
)
COMPUTE = Cost(flops=100e9, bytes=100e6, op_class="gemm")  # 1 ms compute, 0.1 ms memory
MEMORY = Cost(flops=1e9, bytes=1e9, op_class="attention")  # 0.01 ms compute, 1 ms memory
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
    assert d.advance(100.0005) == []  # nothing due yet
    k3 = d.submit("t", MEMORY, 100.0005)  # joins mid-flight: shares memory with k1
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


# ---------------------------------------------------------------- core partitions (hard caps)
NOSWITCH = DeviceSpec(**{**SPEC.__dict__, "repartition_s": 0.0})


def test_core_share_is_a_hard_cap_even_on_an_idle_device():
    d = EmuDevice(NOSWITCH)
    d.set_partition({"p": 0.5})
    k = d.submit("p", COMPUTE, 0.0)
    run(d)
    assert k.finished == pytest.approx(2e-3, rel=TOL)  # half the cores: twice the time, alone
    assert k.solo_s == pytest.approx(2e-3, rel=TOL)


def test_memory_bound_kernel_pulls_bandwidth_only_through_its_cores():
    # MEMORY needs 0.25 of compute per unit of bandwidth: on 0.1 of the cores it reaches 0.4 of
    # the bandwidth (2.5 ms); on 0.25 or more it gets all of it (1 ms)
    d = EmuDevice(NOSWITCH)
    d.set_partition({"few": 0.1, "enough": 0.3})
    a = d.submit("few", MEMORY, 0.0)
    run(d)
    b = d.submit("enough", MEMORY, d.now)
    run(d)
    assert a.duration == pytest.approx(2.5e-3, rel=TOL)
    assert b.duration == pytest.approx(1e-3, rel=TOL)


def test_partitions_isolate_compute_and_share_bandwidth_work_conserving():
    # P (compute-bound) on 0.7, D (memory-bound) on 0.3: P is capped at rate 0.7 (compute 0.7,
    # memory 0.07); D fills the rest of the bandwidth, 0.93 (its compute 0.2325 < 0.3), so
    # P ends at 1/0.7 ms and D at 1/0.93 ms: compute isolated, bandwidth shared
    d = EmuDevice(NOSWITCH)
    d.set_partition({"P": 0.7, "D": 0.3})
    p, dd = d.submit("P", COMPUTE, 0.0), d.submit("D", MEMORY, 0.0)
    run(d)
    assert dd.finished == pytest.approx(1e-3 / 0.93, rel=TOL)
    assert p.finished == pytest.approx(1e-3 / 0.7, rel=TOL)
    # bandwidth use never exceeds the device: P draws 0.07, D the rest
    use = [b / max(p.finished, dd.finished) for b in d.busy_time]
    assert use[0] <= 1 + 1e-9 and use[1] <= 1 + 1e-9


def test_two_capped_streams_never_exceed_the_device():
    d = EmuDevice(NOSWITCH)
    d.set_partition({"a": 0.8, "b": 0.8})  # oversubscribed shares still contend for one device
    a, b = d.submit("a", COMPUTE, 0.0), d.submit("b", COMPUTE, 0.0)
    run(d)
    assert a.finished == pytest.approx(2e-3, rel=TOL) and b.finished == pytest.approx(2e-3, rel=TOL)


def test_share_applies_at_operator_boundaries_and_a_change_costs():
    spec = DeviceSpec(**{**SPEC.__dict__, "repartition_s": 50e-6})
    d = EmuDevice(spec)
    k1 = d.submit("s", COMPUTE, 0.0)  # unpartitioned
    d.set_partition({"s": 0.5})  # while k1 runs: k1 keeps the whole device
    k2 = d.submit("s", COMPUTE, 0.0)
    k3 = d.submit("s", COMPUTE, 0.0)  # same share as k2: no further cost
    run(d)
    assert k1.duration == pytest.approx(1e-3, rel=TOL)
    assert k2.duration == pytest.approx(2e-3 + 50e-6, rel=TOL)
    assert k3.duration == pytest.approx(2e-3, rel=TOL)
    assert d.repartitions("s") == 1


def test_bad_shares_are_rejected():
    d = EmuDevice(SPEC)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            d.set_partition({"s": bad})
