"""Goodput search and the TTFT floor (flexnpu/sched/capacity.py)."""

from __future__ import annotations

import math

import pytest

from flexnpu.sched.capacity import (
    continuous_split_bound,
    requests_for,
    sustainable_rate,
    ttft_floor,
    ttft_floors,
)
from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import QWEN25_7B
from flexnpu.sched.policy import FlexPolicy
from flexnpu.sched.sim import SimConfig, simulate
from flexnpu.sched.specs import ASCEND_910B
from flexnpu.sched.workload import Request, generate

CM = CostModel(ASCEND_910B)


def step(threshold):
    return lambda rate: 1.0 if rate <= threshold else 0.5


@pytest.mark.parametrize("threshold", [0.3, 1.0, 3.7, 9.9])
def test_bisection_finds_the_crossing_within_its_resolution(threshold):
    res = sustainable_rate(step(threshold), 1.0, 4.0, steps=8)
    assert res.bracketed
    assert res.max_rate <= threshold
    # resolution: the final bracket is (initial or expanded, at most 4x wide) ** (1 / 2**8)
    assert res.max_rate >= threshold / 4 ** (1 / 2**8) - 1e-12
    assert all(a == (1.0 if r <= threshold else 0.5) for r, a in res.probes)


def test_bisection_reports_bounds_it_could_not_bracket():
    never = sustainable_rate(lambda r: 0.0, 1.0, 2.0, max_expand=2)
    assert never.max_rate == 0 and not never.bracketed
    always = sustainable_rate(lambda r: 1.0, 1.0, 2.0, max_expand=2)
    assert not always.bracketed and always.max_rate == 8.0
    with pytest.raises(ValueError):
        sustainable_rate(lambda r: 1.0, 2.0, 1.0)


def test_probe_length_scales_with_rate_and_devices():
    assert requests_for(2.0, 4, 60) == 480
    assert requests_for(0.01, 1, 10) == 100  # never fewer than the minimum


def test_ttft_floor_is_a_lone_request_on_an_idle_device():
    # one request, nothing else: an engine whose budget holds the prompt serves it in exactly
    # the floor; chunking it (budget < prompt) or any other system can only be slower
    for prompt in (64, 1000, 5000):
        floor = ttft_floor(QWEN25_7B, CM, Request(0, 0.0, prompt, 4))
        assert floor > 0
        got = {}
        for system, cfg in (
            ("static-coloc", SimConfig(max_batched_tokens=8192)),
            ("static-coloc", SimConfig(max_batched_tokens=512)),
            ("decode-first", None),
            ("flexnpu", None),
            ("naive-coloc", None),
            ("static-partition", SimConfig(partition_alpha=0.75)),
        ):
            req = Request(0, 0.0, prompt, 4)
            simulate(system, QWEN25_7B, CM, [req], 1, 0, cfg)
            got[(system, cfg.max_batched_tokens if cfg else 0)] = req.ttft
            assert req.ttft >= floor * (1 - 1e-9), (system, prompt)
        assert math.isclose(got[("static-coloc", 8192)], floor, rel_tol=1e-9)
        if prompt > 512:
            assert got[("static-coloc", 512)] > floor


def test_no_system_beats_the_floor_under_load():
    reqs0 = generate("chat", 12.0, 60, seed=3)
    floors = ttft_floors(QWEN25_7B, CM, reqs0)
    for system in ("static-coloc", "flexnpu", "decode-first", "static-partition", "naive-coloc"):
        reqs = generate("chat", 12.0, 60, seed=3)
        simulate(
            system,
            QWEN25_7B,
            CM,
            reqs,
            2,
            0,
            None,
            policy_factory=lambda: FlexPolicy(default_tpot_budget_s=0.05),
        )
        assert all(r.ttft >= f * (1 - 1e-9) for r, f in zip(reqs, floors)), system


def test_continuous_split_bound_from_integer_splits():
    # 4 devices; a prefill device sustains 12 req/s, a decode device 6, so split p sustains
    # min(12p, 6(4-p)) / 4 per device: 3.0, 3.0, 1.5 for p = 1, 2, 3. A continuous split
    # (1/3 prefill) would sustain 12*6/(12+6) = 4.0: what the bound must recover
    splits = [(1, 3.0), (2, 3.0), (3, 1.5)]
    bound = continuous_split_bound(splits, 4)
    assert bound == pytest.approx(4.0)
    assert bound >= max(r for _, r in splits)
    assert continuous_split_bound([(1, 0.0)], 4) == 0.0
