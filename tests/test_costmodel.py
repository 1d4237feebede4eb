import json

import pytest

from flexnpu.sched.costmodel import (
    CostModel,
    aten_cost,
    attention_cost,
    collective_cost,
    linear_cost,
    load_corrections,
    matmul_cost,
    moe_cost,
    norm_cost,
)
from flexnpu.sched.models import QWEN25_7B, step_kernels
from flexnpu.sched.specs import SPECS, get_spec


def test_specs_have_sources_and_sane_figures():
    for s in SPECS.values():
        assert {"peak_flops", "hbm_bw", "mem_bytes", "launch_s", "link_bw"} <= set(s.sources)
        assert 1e14 < s.flops("bf16") < 2e15 and 1e12 <= s.hbm_bw < 5e12
    assert get_spec("H100").flops("bfloat16") == pytest.approx(989.4e12)
    with pytest.raises(ValueError, match="unknown device spec"):
        get_spec("tpu9")
    assert get_spec("cpu", measure_cpu=False).name == "cpu"


def test_matmul_hand_computed():
    c = aten_cost("aten::mm", [((64, 128), "float32"), ((128, 32), "float32")], [((64, 32), "float32")])
    assert c.flops == 2 * 64 * 128 * 32
    assert c.bytes == 4 * (64 * 128 + 128 * 32 + 64 * 32)
    a = aten_cost(
        "aten.addmm.default",
        [((32,), "bf16"), ((64, 128), "bf16"), ((128, 32), "bf16")],
        [((64, 32), "bf16")],
    )
    assert a.flops == 2 * 64 * 128 * 32 + 64 * 32 and a.op_class == "gemm"
    b = aten_cost("bmm", [((8, 16, 32), "float16"), ((8, 32, 4), "float16")], [((8, 16, 4), "float16")])
    assert b.flops == 2 * 8 * 16 * 32 * 4 and b.bytes == 2 * (8 * 16 * 32 + 8 * 32 * 4 + 8 * 16 * 4)
    lin = aten_cost(
        "linear", [((5, 7, 64), "bf16"), ((256, 64), "bf16"), ((256,), "bf16")], [((5, 7, 256), "bf16")]
    )
    assert lin.flops == 2 * 35 * 64 * 256 + 35 * 256
    assert linear_cost(35, 64, 256, "bf16").flops == 2 * 35 * 64 * 256
    assert matmul_cost(4, 4, 4, "float32", batch=2).bytes == 4 * 3 * 2 * 16


def test_attention_prefill_and_decode():
    # decode: 1 query over 1000 cached tokens, 32 heads, 8 KV heads, d=128, bf16
    d = attention_cost(2, 1, 1000, 32, 8, 128, "bf16", causal=False)
    assert d.flops == 2 * 2 * 32 * 1000 * 256 + 5 * 2 * 32 * 1000
    assert d.bytes == 2 * (32 * 128 * 2 + 1000 * 8 * 256 * 2 + 32 * 128 * 2)
    # causal prefill of 4 tokens with nothing cached: visible keys 1+2+3+4 = 10 = 4 * 2.5
    p = attention_cost(1, 4, 4, 1, 1, 8, "float32", causal=True)
    assert p.flops == 2 * 10 * 16 + 5 * 10
    s = aten_cost(
        "aten::scaled_dot_product_attention",
        [((1, 1, 4, 8), "float32")] * 3,
        [((1, 1, 4, 8), "float32")],
        {"is_causal": True},
    )
    assert s.flops == p.flops and s.op_class == "attention"


def test_moe_norm_collectives_views():
    m = moe_cost(tokens=1, hidden=16, inter=8, n_experts=4, top_k=2, dtype="bf16", router=False)
    assert m.flops == 2 * 2 * 16 * 8 * 3
    # 2 picks over 4 experts: expected distinct = 4 * (1 - (3/4)^2) = 1.75 experts' weights read
    assert m.bytes == pytest.approx(1.75 * 3 * 16 * 8 * 2 + 2 * 2 * (2 * 16 + 2 * 8 + 8))
    assert norm_cost(4, 10, "float32").flops == 160
    ar = collective_cost("all_reduce", 1000, 4)
    assert ar.link_bytes == pytest.approx(1500) and ar.op_class == "collective"
    assert aten_cost(
        "all_to_all_single", [((250,), "float32")], [], {"group_size": 4}
    ).link_bytes == pytest.approx(750)
    assert aten_cost("aten::view", [((4, 4), "float32")], [((16,), "float32")]).launches == 0
    e = aten_cost("aten::add.Tensor", [((10,), "float32"), ((10,), "float32")], [((10,), "float32")])
    assert e.flops == 10 and e.bytes == 120 and e.op_class == "elementwise"
    with pytest.raises(ValueError):
        aten_cost("aten::mm", [((4, 4), "float32")], [])


def test_roofline_and_launch():
    spec = get_spec("910b")
    cm = CostModel(spec)
    g = matmul_cost(4096, 4096, 4096, "bf16")
    comp = g.flops / (spec.flops("bf16") * spec.gemm_eff)
    assert cm.roofline(g) == pytest.approx(comp + spec.launch_s)
    assert cm.is_compute_bound(g)
    dec = attention_cost(64, 1, 2048, 28, 4, 128, "bf16", causal=False)
    assert cm.roofline(dec) == pytest.approx(dec.bytes / (spec.hbm_bw * spec.bw_eff) + spec.launch_s)
    assert not cm.is_compute_bound(dec)


def test_corrections_converge_bounded_and_roundtrip(tmp_path):
    cm = CostModel(get_spec("a100"))
    c = matmul_cost(1024, 1024, 1024)
    pred = cm.roofline(c)
    for _ in range(40):
        cm.observe(c, 2.0 * pred)
    assert cm.corrections.factor("gemm") == pytest.approx(2.0, rel=0.01)
    assert cm.predict(c) == pytest.approx(2 * pred, rel=0.01)
    cm.observe(c, 1e6)  # one absurd outlier moves the factor by at most alpha * log(max_ratio)
    assert cm.corrections.factor("gemm") < 2.0 * 16**0.2 + 1e-9
    assert cm.corrections.factor("attention") == 1.0
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"corrections": cm.corrections.to_dict()}))
    assert load_corrections(p).factor("gemm") == pytest.approx(cm.corrections.factor("gemm"))


def test_qwen_step_matches_parameter_count():
    # a decode step reads every weight once: 2 bytes/param for the 7.07B non-embedding params
    # (bf16; the 0.54B-entry input embedding is only gathered, not read in full)
    ks = step_kernels(QWEN25_7B, [], [1] * 1)
    by = sum(k.bytes for k in ks)
    assert 13.9e9 < by < 14.6e9
    fl = sum(k.flops for k in step_kernels(QWEN25_7B, [(1000, 0)], []))
    # 2 * 6.53B params (no embeddings; the LM head runs on 1 row) * tokens, + causal attention
    assert 2 * 6.5e9 * 1000 < fl < 2 * 6.8e9 * 1000
