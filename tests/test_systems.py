"""One registry of serving systems (flexnpu/sched/systems.py) for the simulator, the real-time
runs and `flexnpu bench serve`."""

from __future__ import annotations

import json

import pytest

from flexnpu.bench import serve
from flexnpu.sched.capacity import requests_for
from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import MODELS
from flexnpu.sched.sim import SimConfig, simulate
from flexnpu.sched.specs import get_spec
from flexnpu.sched.systems import System, parse_system
from flexnpu.sched.workload import generate


def test_names_are_the_strings_users_type_and_json_carries():
    assert [s.value for s in System] == [str(s) for s in System] == [f"{s}" for s in System]
    assert System.FLEXNPU == "flexnpu" and {System.STATIC_DISAGG: 1}["static-disagg"] == 1
    assert json.loads(json.dumps({"system": System.NAIVE_COLOC})) == {"system": "naive-coloc"}
    assert parse_system("static-coloc-decode-first") is System.DECODE_FIRST  # the former name
    with pytest.raises(ValueError, match="choose from static-partition"):
        parse_system("pd-magic")
    assert set(serve.SYSTEMS) == set(System) and set(serve.KNOBS) == set(System)
    assert all(s.description for s in System)


@pytest.mark.parametrize("system", list(System))
def test_every_system_simulates(system):
    reqs = generate("chat", 8.0, requests_for(4.0, 2, 2, min_requests=16), 1)
    cfg = SimConfig(flex_tpot_slack=0.05) if system == System.FLEXNPU_TPOT else SimConfig()
    n_prefill = 1 if system == System.STATIC_DISAGG else 0
    stats = simulate(system.value, MODELS["qwen2.5-7b"], CostModel(get_spec("910b")), reqs, 2, n_prefill, cfg)
    assert isinstance(stats, dict)
    assert all(r.finish is not None for r in reqs), system
