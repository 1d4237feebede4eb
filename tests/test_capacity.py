"""Goodput search and the TTFT floor (flexnpu/sched/capacity.py)."""
from __future__ import annotations

import math

import pytest

from flexnpu.sched.capacity import requests_for, sustainable_rate, ttft_floor, ttft_floors
from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import QWEN25_7B
from flexnpu.sched.policy import FlexPolicy
from flexnpu.sched.sim import SimConfig, metrics, simulate
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
    assert res.max_rate >= threshold / 4 ** (1 / 2 ** 8) - 1e-12
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
    assert requests_for(0.01, 1, 10) == 100          # never fewer than the minimum


def test_ttft_floor_is_a_lone_request_on_an_idle_device():
    # one request, nothing else: an engine whose budget holds the prompt serves it in exactly
    # the floor; chunking it (budget < prompt) or any other system can only be slower
    for prompt in (64, 1000, 5000):
        floor = ttft_floor(QWEN25_7B, CM, Request(0, 0.0, prompt, 4))
        assert floor > 0
        got = {}
        for system, cfg in (("static-coloc", SimConfig(max_batched_tokens=8192)),
                            ("static-coloc", SimConfig(max_batched_tokens=512)),
                            ("static-coloc-decode-first", None), ("flexnpu", None)):
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
    for system in ("static-coloc", "flexnpu", "static-coloc-decode-first"):
        reqs = generate("chat", 12.0, 60, seed=3)
        simulate(system, QWEN25_7B, CM, reqs, 2, 0, None,
                 policy_factory=lambda: FlexPolicy(default_tpot_budget_s=0.05))
        assert all(r.ttft >= f * (1 - 1e-9) for r, f in zip(reqs, floors)), system


def _goodput(system, n_prefill=0, duration=30.0):
    def attainment(rate):
        reqs = generate("long", rate * 4, requests_for(rate, 4, duration, 60), 1)
        simulate(system, QWEN25_7B, CM, reqs, 4, n_prefill, SimConfig(tpot_budget_s=0.05),
                 policy_factory=lambda: FlexPolicy(default_tpot_budget_s=0.05))
        return metrics(reqs, 8.0, 0.05)["slo_attainment"]
    return sustainable_rate(attainment, 0.5, 4.0, steps=4).max_rate


def test_flex_sustains_more_prefill_heavy_load_than_the_best_static_split():
    # the serving study's disaggregation finding at small scale (docs/scheduling.md): sharing
    # every device beats any fixed prefill:decode split of 4 devices on long prompts
    flex = _goodput("flexnpu")
    best = max(_goodput("static-disagg", p) for p in (2, 3))
    assert flex > 1.05 * best, (flex, best)
