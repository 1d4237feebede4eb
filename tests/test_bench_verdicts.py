"""`bench serve` ends with one verdict per target (issue 15 item 4)."""

from __future__ import annotations

from conftest import QUICK_SERVE_ARGS
from flexnpu.bench import serve


def _summary(disagg_pct: float, rates: list[tuple[float, float, float]]) -> dict:
    per_rate = [
        {"rate": r, "ttft_p50_reduction_pct": t, "tpot_p50_change_pct": p, "throughput_ratio": x}
        for r, (t, p, x) in zip((4.0, 8.0), rates)
    ]
    return {
        "workload": "chat",
        "flex_vs_static_disagg_goodput_pct": disagg_pct,
        "disagg_target_pct": 10,
        "vs_static_partition": per_rate,
        "vs_naive_coloc": [],
    }


def test_verdicts_take_the_worst_rate():
    vs = serve.verdicts([_summary(12.0, [(95, 1.0, 1.0), (90, 6.0, 0.99)])])
    by = {v["target"]: v for v in vs}
    assert len(vs) == 4  # goodput + TTFT/TPOT/throughput vs the one baseline with rates
    assert by["goodput vs static-disagg"]["met"] and by["goodput vs static-disagg"]["figure"] == "+12.0%"
    assert (
        not by["TTFT p50 vs static-partition"]["met"]
        and "-90.0% at rate 8.00" == by["TTFT p50 vs static-partition"]["figure"]
    )
    assert not by["TPOT p50 vs static-partition"]["met"] and by["TPOT p50 vs static-partition"][
        "figure"
    ].startswith("+6.0%")
    assert by["throughput vs static-partition"]["met"]


def test_quick_run_prints_verdict_lines_last(capsys):
    rc = serve.main(QUICK_SERVE_ARGS)
    assert rc == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    start = out.index("verdict (emulated):")
    lines = out[start + 1 : -2]  # then a blank line and the wall time
    # per flex system (flexnpu, flexnpu-tpot): goodput + (TTFT, TPOT, throughput vs static
    # partition, or "no rate"); the variant's lines carry its name
    n_flex = len(serve.FLEX_SYSTEMS)
    assert len(lines) in (2 * n_flex, 4 * n_flex), lines
    assert sum("flexnpu-tpot:" in line for line in lines) == len(lines) // n_flex, lines
    for line in lines:
        word = line.split()[0]
        assert word in ("MET", "NOT") and " target " in line, line
