import pytest

from flexnpu.sched.costmodel import CostModel, attention_cost, matmul_cost
from flexnpu.sched.policy import (
    StaticPartitionPolicy,
    DeviceState,
    FlexPolicy,
    Op,
    Phase,
    StreamQueue,
    make_policy,
)
from flexnpu.sched.specs import get_spec

PRE = matmul_cost(2048, 3584, 3584, "bf16")  # ~1000 FLOP/B
DEC = attention_cost(32, 1, 2000, 28, 4, 128, "bf16", causal=False)  # ~5 FLOP/B


def dev(max_inflight=64):
    return DeviceState(CostModel(get_spec("910b")), max_inflight=max_inflight)


def fill(q, cost, n, t0=0.0, step=None):
    for i in range(n):
        q.push(Op(cost, t0 + i, step_end=(step is not None and (i + 1) % step == 0)))


def test_fifo_is_arrival_order_and_respects_depth():
    p, d = make_policy("fifo"), dev(max_inflight=3)
    a, b = StreamQueue("a"), StreamQueue("b")
    for q, c in ((a, PRE), (b, DEC), (a, PRE), (b, DEC)):
        q.push(Op(c, 0.0))
    out = p.select([a, b], d, 0.0)
    assert [x.queue.key for x in out] == ["a", "b", "a"]
    assert p.select([a, b], d, 0.0) == []  # device queue full
    p.complete(out[0].op, d, 1.0)
    assert [x.queue.key for x in p.select([a, b], d, 1.0)] == ["b"]


def test_priority_holds_lower_streams_while_higher_pending():
    p, d = make_policy("priority"), dev()
    lo, hi = StreamQueue("lo", priority=0), StreamQueue("hi", priority=2, max_inflight=1)
    fill(lo, PRE, 2)
    fill(hi, DEC, 2, t0=10)
    out = p.select([lo, hi], d, 0.0)
    assert [x.queue.key for x in out] == ["hi"] and out[0].weight == 16.0
    p.complete(out[0].op, d, 1.0)
    # hi's last op goes; with nothing of hi pending, lo may use the rest of the device
    out = p.select([lo, hi], d, 1.0)
    assert [x.queue.key for x in out] == ["hi", "lo", "lo"]
    assert [x.weight for x in out] == [16.0, 1.0, 1.0]


def test_phase_inference_from_intensity():
    ridge = get_spec("910b").ridge()
    q1, q2, q3 = StreamQueue("p"), StreamQueue("d"), StreamQueue("x", phase="prefill")
    fill(q1, PRE, 3)
    fill(q2, DEC, 3)
    fill(q3, DEC, 3)
    assert q1.effective_phase(ridge) is Phase.PREFILL
    assert q2.effective_phase(ridge) is Phase.DECODE
    assert q3.effective_phase(ridge) is Phase.PREFILL  # declared wins
    assert StreamQueue("new").effective_phase(ridge) is Phase.DECODE


def test_flex_decode_first_then_prefill_slots():
    p, d = FlexPolicy(max_prefill_slots=2), dev()
    pre, dec = StreamQueue("pre"), StreamQueue("dec")
    fill(pre, PRE, 5)
    fill(dec, DEC, 3, t0=100)  # decode arrived later but goes first
    out = p.select([pre, dec], d, 0.0)
    assert [x.queue.key for x in out] == ["dec"] * 3 + ["pre"] * 2
    # both phases busy: decode on its core share, prefill on the rest (on the share grid)
    assert out[0].share == p.decode_share and out[-1].share == pytest.approx(1 - p.decode_share)
    assert all(x.weight == 1.0 for x in out)
    # with no decode work prefill is not gated
    p2, d2 = FlexPolicy(max_prefill_slots=1), dev()
    pre2 = StreamQueue("pre")
    fill(pre2, PRE, 4)
    assert len(p2.select([pre2], d2, 0.0)) == 4


def test_flex_adapts_to_decode_budget():
    p, d = FlexPolicy(max_prefill_slots=4, default_tpot_budget_s=0.010), dev()
    pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
    fill(pre, PRE, 50)
    w0 = p.decode_share
    t = 0.0
    # decode iterations of 2 ops taking 30 ms > 10 ms budget: slots shrink to the floor, decode share rises
    for _ in range(3):
        fill(dec, DEC, 2, t0=t, step=2)
        for x in [x for x in p.select([pre, dec], d, t) if x.queue is dec]:
            p.complete(x.op, d, t + 0.030)
        t += 0.030
    assert p.prefill_slots == p.min_prefill_slots == 1 and p.decode_share > w0
    for o in [o for o in list(d.inflight.values()) if o.stream == "pre"]:
        p.complete(o, d, t)
    fill(dec, DEC, 2, t0=t, step=2)
    out = p.select([pre, dec], d, t)
    assert [x.queue.key for x in out].count("pre") == 1  # gated to one slot while decode busy
    for x in out:
        if x.queue is dec:
            p.complete(x.op, d, t + 0.002)
    # fast iterations (2 ms) -> slots grow back, decode share falls below where it started
    for _ in range(8):
        t += 0.002
        fill(dec, DEC, 2, t0=t, step=2)
        for x in [x for x in p.select([pre, dec], d, t) if x.queue is dec]:
            p.complete(x.op, d, t + 0.002)
    assert p.prefill_slots == 4 and p.decode_share < w0


def test_make_policy_rejects_unknown():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery")


# ---------------------------------------------------------------- core shares (the hardware lever)


def test_flex_shares_only_while_both_phases_have_work():
    p = FlexPolicy()
    assert p.shares(decode_busy=True, prefill_busy=False) == (None, None)  # whole device
    assert p.shares(decode_busy=False, prefill_busy=True) == (None, None)
    d, pre = p.shares(True, True)
    assert d + pre == pytest.approx(1.0)  # conservation
    assert FlexPolicy(partition=False).shares(True, True) == (None, None)  # cpu: ordering only
    # decode alone on the device: its ops carry no share
    p2, dv = FlexPolicy(), dev()
    dq = StreamQueue("dec", phase="decode")
    fill(dq, DEC, 2)
    assert [x.share for x in p2.select([dq], dv, 0.0)] == [None, None]


def test_flex_shares_stay_on_the_grid_and_within_floors():
    p, d = FlexPolicy(default_tpot_budget_s=0.010, share_step=1 / 8), dev()
    pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
    fill(pre, PRE, 400)
    t, seen = 0.0, set()
    for slow in [True] * 10 + [False] * 30 + [True] * 3:
        fill(dec, DEC, 2, t0=t, step=2)
        for x in p.select([pre, dec], d, t):
            seen.add((x.queue.key, x.share))
            if x.queue is dec:
                p.complete(x.op, d, t + (0.030 if slow else 0.001))
        t += 0.030
        assert p.min_decode_share <= p.decode_share <= p.max_decode_share
        assert p.prefill_slots >= p.min_prefill_slots
    for key, share in seen:
        assert share is not None and (share * 8) == pytest.approx(round(share * 8))  # 1/8 grid
        assert 1 / 8 <= share <= 7 / 8  # neither starves
    assert {s for k, s in seen if k == "dec"} >= {1 / 8, 7 / 8}  # both floors were reached


def test_static_partition_is_fixed_and_not_work_conserving():
    p, d = StaticPartitionPolicy(alpha=0.75), dev()
    pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
    fill(pre, PRE, 3)
    out = p.select([pre], d, 0.0)  # prefill alone still runs on its 3/4
    assert [x.share for x in out] == [0.75] * 3
    fill(dec, DEC, 2, t0=10)
    assert [x.share for x in p.select([pre, dec], d, 0.0)] == [0.25, 0.25]
    with pytest.raises(ValueError):
        StaticPartitionPolicy(alpha=1.0)


# ---------------------------------------------------------------- TPOT-keeping variant (decode floor)


def _decode_iteration(p, d, pre, dec, cost, t, n=2, dt=0.001):
    """One decode iteration of n ops beside busy prefill: returns the decode ops' shares."""
    fill(dec, cost, n, t0=t, step=n)
    shares = []
    for x in p.select([pre, dec], d, t):
        if x.queue is dec:
            shares.append(x.share)
            p.complete(x.op, d, t + dt)
    return shares


def _floor_by_hand(cost, d, slack, step=1 / 8):
    """The smallest grid share whose emulated time is within 1 + slack of the whole device's."""
    comp, mem, link = d.model.work(cost)
    need = max(comp, d.model.spec.issue_frac * mem)
    for k in range(1, 8):
        if max(need / (k * step), mem, link) <= (1 + slack) * max(need, mem, link) + 1e-15:
            return k * step
    return 7 * step


def test_flex_tpot_variant_keeps_decode_on_its_bandwidth_floor():
    # fast decode iterations drive the AIMD share to its 1/8 floor; the variant's decode floor
    # (memory-bound decode needs issue_frac = 1/4 of the cores for the whole HBM bandwidth) holds
    p, d = FlexPolicy(default_tpot_budget_s=0.050, tpot_slack=0.05), dev()
    pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
    fill(pre, PRE, 400)
    assert p.decode_floor is None  # no decode iteration measured yet
    t, shares = 0.0, []
    for _ in range(30):
        shares += _decode_iteration(p, d, pre, dec, DEC, t)
        t += 0.002
    assert p.decode_share == p.min_decode_share == 1 / 8  # the AIMD alone would give decode 1/8
    assert d.model.spec.issue_frac == 0.25 and p.decode_floor == 0.25 == _floor_by_hand(DEC, d, 0.05)
    assert all(s >= 0.25 for s in shares[2:]) and shares[-1] == 0.25  # once measured, never below
    d_share, p_share = p.shares(True, True)
    assert (d_share, p_share) == (0.25, 0.75)  # prefill gets the rest (conservation)
    # the default policy (no slack) spends that slack on prefill: 1/8
    p0, d0 = FlexPolicy(default_tpot_budget_s=0.050), dev()
    pre0, dec0 = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
    fill(pre0, PRE, 400)
    for i in range(30):
        _decode_iteration(p0, d0, pre0, dec0, DEC, 0.002 * i)
    assert p0.decode_floor is None and p0.shares(True, True) == (0.125, 0.875)


def test_flex_tpot_floor_follows_the_decode_batch_and_the_slack():
    d = dev()
    big = matmul_cost(256, 3584, 37888, "bf16")  # a large decode batch's FFN: ~200 FLOP/B, compute-heavy
    for slack in (0.0, 0.05, 0.5, 1.0):
        floors = []
        for cost in (DEC, big):
            p = FlexPolicy(tpot_slack=slack)
            pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
            fill(pre, PRE, 10)
            _decode_iteration(p, d, pre, dec, cost, 0.0)
            assert p.decode_floor == min(_floor_by_hand(cost, d, slack), 7 / 8)
            floors.append(p.decode_floor)
        assert floors[1] >= floors[0]  # more compute per byte: decode needs more cores
    # a larger slack never raises the floor; the floor never takes prefill's last grid step
    fl = []
    for slack in (0.0, 0.05, 0.5, 1.0, 3.0):
        p = FlexPolicy(tpot_slack=slack)
        pre, dec = StreamQueue("pre", phase="prefill"), StreamQueue("dec", phase="decode")
        fill(pre, PRE, 10)
        _decode_iteration(p, d, pre, dec, big, 0.0)
        fl.append(p.decode_floor)
    assert fl == sorted(fl, reverse=True) and max(fl) <= 7 / 8 and min(fl) >= 1 / 8
    with pytest.raises(ValueError):
        FlexPolicy(tpot_slack=-0.1)


def test_flex_tpot_floor_keeps_the_largest_decode_stream_and_no_share_when_alone():
    d = dev()
    big = matmul_cost(256, 3584, 37888, "bf16")
    p = FlexPolicy(tpot_slack=0.05)
    pre = StreamQueue("pre", phase="prefill")
    small_q, big_q = StreamQueue("d1", phase="decode"), StreamQueue("d2", phase="decode")
    fill(pre, PRE, 10)
    _decode_iteration(p, d, pre, big_q, big, 0.0)
    hi = p.decode_floor
    _decode_iteration(p, d, pre, small_q, DEC, 0.01)
    assert p.decode_floor == hi > _floor_by_hand(DEC, d, 0.05)  # the small stream does not lower it
    # decode alone on the device: whole device, the floor does not impose a share
    q = StreamQueue("d3", phase="decode")
    fill(q, DEC, 2)
    assert [x.share for x in p.select([q], dev(), 1.0)] == [None, None]


def test_an_iteration_dispatched_before_the_previous_one_ends_still_times_from_its_first_op():
    """An engine that never waits per token has iteration k+1's kernels dispatched while k's
    last one runs. Each iteration keeps its own start and predicted cost: the one that
    starts early is timed from the previous iteration's end, not from whichever of its ops
    happened to be dispatched after that end (which had timed two 5 ms kernels as 6.8 ms)."""
    p, d = make_policy("fifo"), dev()
    q = StreamQueue("dec", phase="decode")
    fill(q, DEC, 4, step=2)  # two iterations of two ops
    a1, a2, b1, b2 = (x.op for x in p.select([q], d, 0.0))
    assert [len(q.open_steps), q.steps] == [2, 0]
    p.complete(a1, d, 0.005)
    p.complete(a2, d, 0.010)
    assert q.steps == 1 and q.last_step_time == pytest.approx(0.010)
    assert q.last_step_pred == pytest.approx(a1.predicted_s + a2.predicted_s)
    p.complete(b1, d, 0.015)
    p.complete(b2, d, 0.020)
    assert q.steps == 2 and q.last_step_time == pytest.approx(0.010)  # 0.010 -> 0.020, not 0.0 -> 0.020
    assert q.last_step_pred == pytest.approx(b1.predicted_s + b2.predicted_s)
    assert not q.open_steps
    # after an idle gap the next iteration starts at its first dispatch again
    fill(q, DEC, 1, step=1)
    [c] = (x.op for x in p.select([q], d, 1.0))
    p.complete(c, d, 1.003)
    assert q.steps == 3 and q.last_step_time == pytest.approx(0.003)


def test_an_iteration_whose_ops_straddle_one_dispatch_round_keeps_all_its_ops():
    """The case the daemon hit: iteration k+1's first op dispatched before k closed, its
    second after. Both belong to k+1, whose time runs from k's end."""
    p, d = make_policy("fifo"), dev(max_inflight=3)
    q = StreamQueue("dec", phase="decode")
    fill(q, DEC, 4, step=2)
    a1, a2, b1 = (x.op for x in p.select([q], d, 0.0))
    p.complete(a1, d, 0.005)
    [b2] = (x.op for x in p.select([q], d, 0.005))
    p.complete(a2, d, 0.010)
    p.complete(b1, d, 0.015)
    p.complete(b2, d, 0.020)
    assert q.steps == 2 and q.last_step_time == pytest.approx(0.010)
    assert q.last_step_pred == pytest.approx(b1.predicted_s + b2.predicted_s)
