"""`flexnpu bench serve --realtime`: engines as real processes on real emu:910b daemons.

The end-to-end test runs the real benchmark (daemons, client processes, rings, the flex policy,
IPC export/import) with a tiny request count; the router tests check the dispatch rule alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu.bench._realtime import Router, plan_engines
from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import QWEN25_7B, step_kernels
from flexnpu.sched.specs import get_spec

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = {"static-partition", "naive-coloc", "static-coloc", "flexnpu", "static-disagg"}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_system_spans_the_same_devices(n):
    for system, p in (
        ("static-coloc", 0),
        ("flexnpu", 0),
        ("static-partition", 0),
        ("naive-coloc", 0),
        ("static-disagg", 1),
        ("static-disagg", n - 1),
    ):
        engines, entry, decoders = plan_engines(system, n, p)
        assert sorted({e["device"] for e in engines}) == list(range(n)), system
    engines, _, _ = plan_engines("flexnpu", n, 0)
    assert [e["role"] for e in engines if e["device"] == 1] == ["prefill", "decode"]
    with pytest.raises(ValueError):
        plan_engines("static-disagg", n, n)


def test_router_sends_to_the_least_loaded_device():
    _, entry, _ = plan_engines("flexnpu", 2, 0)
    r = Router(entry, [], {1: 4000, 2: 100, 3: 100, 4: 100})
    assert r.pick_entry(1) == 0  # tie: lowest device, its prefill instance
    assert r.pick_entry(2) == 2  # device 0 has 4000 prompt tokens queued
    assert r.pick_entry(3) == 2  # 164 + 164 < 4064
    r.first(0, 1)  # prompt 1 prefilled; it still decodes on device 0
    assert r._load(0) == 64
    assert r.pick_entry(4) == 0
    r.done(1, 1)  # finished by the decode instance of device 0
    assert r._load(0) == 164 and r._load(1) == 328


def test_router_disagg_hands_off_to_the_emptiest_decoder():
    _, entry, decoders = plan_engines("static-disagg", 4, 2)
    r = Router(entry, decoders, dict.fromkeys(range(5), 500))
    assert [r.pick_entry(i) for i in range(3)] == [0, 1, 0]
    r.first(0, 0)  # handed off: no longer load on prefill device 0
    assert r._load(0) == 564 and r._load(1) == 564
    assert r.pick_decoder(0) == 2 and r.pick_decoder(2) == 3 and r.pick_decoder(1) == 2
    r.done(2, 0)
    assert r.pick_decoder(3) == 2


@pytest.mark.timing  # engines on real-time emulated devices
def test_realtime_bench_end_to_end():
    # seed 3: outputs <= 166 tokens keep the run short; prompts up to 4147 tokens still need
    # several 2048-token prefill chunks in static-coloc and flexnpu
    n_dev, n_req = 2, 4
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexnpu",
            "bench",
            "serve",
            "--realtime",
            "--quick",
            "--json",
            "--devices",
            str(n_dev),
            "--requests",
            str(n_req),
            "--seed",
            "3",
            "--alphas",
            "0.75",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )  # a safety net: a busy shared host is slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["mode"] == "realtime" and out["emulated"] is True and out["devices"] == n_dev
    runs = out["runs"]
    assert {r["system"] for r in runs} == SYSTEMS
    # a decode iteration cannot beat reading the weights once: the emulator really took the time
    cm = CostModel(get_spec("910b"))
    solo_decode_ms = 1e3 * sum(cm.predict(k) for k in step_kernels(QWEN25_7B, [], [1]))
    for r in runs:
        assert r["devices"] == n_dev and r["requests"] == n_req and r["completed"] == n_req, r["system"]
        assert len({e.split("@")[1] for e in r["engines"]}) == n_dev, r["engines"]
        assert r["ttft_p50_ms"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"]
        assert r["tpot_p50_ms"] >= 0.8 * solo_decode_ms and r["tpot_p99_ms"] >= r["tpot_p50_ms"]
        assert r["throughput_tok_s"] > 0
        assert r["throughput_per_device_tok_s"] == pytest.approx(r["throughput_tok_s"] / n_dev)
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert r["mode"] == "realtime" and r["emulated"] is True
    flex = next(r for r in runs if r["system"] == "flexnpu")
    assert set(flex["daemon_policies"]) == {"flex"}
    kv = flex["kv_handoff"]
    assert kv["zero_copy"] is True and len(kv["per_device"]) == n_dev
    for d in kv["per_device"]:
        assert d["importer_allocated_bytes"] < d["kv_pool_bytes"] <= d["exporter_allocated_bytes"]
    dis = [r for r in runs if r["system"] == "static-disagg"]
    assert sum(1 for r in dis if r["best_split"]) == 1
    for r in dis:
        assert r["prefill_devices"] + r["decode_devices"] == n_dev and r["kv_link_gb_s"] > 0
    # the static core split runs through the daemon's partition policy; naive co-location on fifo
    part = next(r for r in runs if r["system"] == "static-partition")
    assert set(part["daemon_policies"]) == {"partition:0.75"} and part["alpha"] == 0.75 and part["best_alpha"]
    assert part["kv_handoff"]["zero_copy"] is True
    assert set(next(r for r in runs if r["system"] == "naive-coloc")["daemon_policies"]) == {"fifo"}
    s = out["summary"][0]
    assert s["best_disagg_split"] == "1:1" and s["slo_throughput_tok_s"]["flexnpu"] >= 0
    assert s["best_alpha"] == 0.75 and [r["alpha"] for r in s["vs_static_partition"]] == [0.75]
