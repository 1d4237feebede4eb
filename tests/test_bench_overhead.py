"""`bench overhead` repeats until the direct runs agree and prints its caveats (issue 15 item 4)."""

from __future__ import annotations

from flexnpu.bench import overhead


def test_spread_and_settling_rule():
    assert overhead.spread([10.0, 10.5, 10.2]) < 0.10
    assert abs(overhead.spread([10.0, 50.0, 12.0]) - 40 / 12) < 1e-9
    runs = {"direct-eager": [100.0, 104.0], "direct-graph": [101.0, 103.0]}
    assert overhead.settled(runs, native_graph=False)
    runs["direct-graph"].append(20.0)  # the 5x outlier the issue saw
    assert not overhead.settled(runs, native_graph=False)
    assert not overhead.settled({"direct-eager": [100.0], "direct-graph": [100.0]}, native_graph=True)


def test_tiny_run_reports_spread_and_caveats(capsys):
    rc = overhead.main(
        ["--quick", "--steps", "3", "--layers", "1", "--hidden", "64", "--repeat", "1", "--max-repeat", "1"]
        + ["--native", "off", "--no-hf"]  # the generate() rows have their own tests
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "spread %" in out and "medians of 1)" in out
    assert "caveat: CPU has no native graphs" in out  # in the table output, not only in --json


def test_daemon_build_says_when_the_daemons_would_run_a_partial_build(monkeypatch, tmp_path, pe):
    """The figures name what the daemons ran: a stale or missing compiled executor, or the C hot
    path switched off, is reported (and becomes a caveat), not measured silently."""
    from flexnpu.daemon import compiled

    monkeypatch.delenv("FLEXNPU_DAEMON_HOTPATH", raising=False)
    full = overhead.daemon_build()
    assert full["compiled_executor"] and full["hot_path"] == "c" and full["why"] == ""
    monkeypatch.setattr(compiled, "build_dir", lambda: tmp_path)  # nothing built there
    monkeypatch.setenv("FLEXNPU_DAEMON_HOTPATH", "0")
    partial = overhead.daemon_build()
    assert not partial["compiled_executor"] and partial["hot_path"] == "python"
    assert "not built or stale" in partial["why"] and "FLEXNPU_DAEMON_HOTPATH=0" in partial["why"]


def test_hf_generate_child_counts_ops_and_times_new_shapes():
    """The HF generate rows' child (bench/_hfgen.py): tokens/s over shapes no warm-up saw, and
    the aten operators per token from a dispatch mode (what added_us_per_op divides by)."""
    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    from flexnpu.bench import _hfgen

    r = _hfgen.run("cpu", layers=1, hidden=64, tokens=3, repeat=1)
    assert r["tokens_per_s"] > 0 and len(r["last_tokens"]) == 3
    assert 20 < r["ops_per_token"] < 400  # one layer: tens of operators per token


def test_first_run_row_runs_the_main_example_cold_on_both_sides(tmp_path, monkeypatch):
    """The first-run row: examples/generate.py --json directly (CPU) and under `flexnpu run`
    (the npu device of a fresh embedded daemon), the same greedy tokens on both."""
    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    monkeypatch.setattr(overhead, "_RUNTIME_DIR", str(tmp_path))
    row = overhead.first_run_row("cpu", 1)
    assert isinstance(row, dict), row
    assert row["flexnpu_device"] == "npu" and row["tokens"] == 24
    assert row["same_tokens"]
    assert row["direct_tokens_per_s"] > 0 and row["flexnpu_tokens_per_s"] > 0
    assert "cpu backend only" in overhead.first_run_row("cuda", 1)
