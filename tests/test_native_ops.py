"""Operators through the native front end: the REAL torch_npu (2.13.0, isolated folder) launches
aclnn operators from FlexNPU's libopapi.so; each call is one LAUNCH record `aclnn::<Name>` that
the daemon's operator table (flexnpu/daemon/optable) runs on its backend.

* the signature table (flexnpu/aclnn_api.py), the daemon table and the built library agree;
* every operator check of tests/native/torch_npu_ops.py matches the CPU (contiguous and strided);
* tiny Llama / Qwen2 models (random weights): greedy generate() tokens identical to the CPU run,
  one training step's loss and gradients within tolerance;
* an operator outside the table: torch_npu's own error naming it, the process survives;
* hand-crafted hostile aclnn launches through flexnpu.client: clear errors, the daemon survives.

torch_npu tests skip when the wheel is not installed for FlexNPU (`flexnpu install-torch-npu`).
One daemon serves the whole module (torch_npu start-up dominates; the daemon is shared state
these tests do not disturb).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DaemonProc
from _native import ROOT, compile_program, flexnpu_run_cmd, native_libs, run_env

from flexnpu.ops import aclnn_api
from flexnpu.protocol import TensorRef

SCRIPT = str(ROOT / "tests" / "native" / "torch_npu_ops.py")


def _need_wheel() -> None:
    from flexnpu.hook import native

    if not native.torch_npu_installed():
        pytest.skip(
            f"the real torch_npu is not installed for FlexNPU in {native.torch_npu_dir()}: "
            f"run `flexnpu install-torch-npu`"
        )


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """(runtime dir) of one CPU daemon shared by this module's tests."""
    d = tmp_path_factory.mktemp("ops") / "run"
    d.mkdir()
    proc = DaemonProc(d, 0, ["--backend", "cpu"])
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLEXNPU_RUNTIME_DIR", str(d))
            yield d
    finally:
        proc.stop()


def _native(rt: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    _need_wheel()
    native_libs()
    return subprocess.run(
        flexnpu_run_cmd(rt, "--interpose", "native", "--", sys.executable, SCRIPT, *args),
        env=run_env(rt),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _json_lines(r: subprocess.CompletedProcess[str]) -> list[dict]:
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert out, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out


# ------------------------------------------------------------------ tables agree
def test_signature_table_and_daemon_table_agree():
    from flexnpu.daemon import optable

    sigs = {"aclnn::" + n for n in aclnn_api.SIGNATURES}
    aclnn_entries = {op for op in optable.TABLE if op.startswith("aclnn::")}
    assert sigs == aclnn_entries, (sigs - aclnn_entries, aclnn_entries - sigs)
    for name, sig in aclnn_api.SIGNATURES.items():
        d = optable.TABLE["aclnn::" + name]
        assert d.params == tuple((p.name, p.kind) for p in sig.params), name


def test_libopapi_exports_both_phases_of_every_operator():
    lib = ctypes.CDLL(str(native_libs() / "libopapi.so"))
    for name in aclnn_api.SIGNATURES:
        getattr(lib, f"aclnn{name}")
        getattr(lib, f"aclnn{name}GetWorkspaceSize")
    for sym in (
        "aclCreateTensor",
        "aclCreateScalar",
        "aclCreateIntArray",
        "aclCreateTensorList",
        "aclDestroyTensor",
    ):
        getattr(lib, sym)


def test_c_program_runs_aclnn_add_and_mm_through_dlopen_libopapi(rt, tmp_path):
    prog = compile_program("aclnn_add.c", tmp_path / "aclnn_add", extra=["-ldl", "-lm"])
    r = subprocess.run(
        flexnpu_run_cmd(rt, "--", str(prog)),
        env=run_env(rt),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


# ------------------------------------------------------------------ the real torch_npu
def test_operators_match_cpu(rt):
    r = _native(rt, "ops")
    results = _json_lines(r)
    bad = [x for x in results if not x["ok"]]
    assert not bad, "\n".join(f"{x['check']}: {x['error']}\n{x.get('tb', '')}" for x in bad)
    from importlib import util

    spec = util.spec_from_file_location("torch_npu_ops_names", SCRIPT)
    assert spec is not None
    assert len(results) >= 10 and r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("model", ["llama", "qwen2", "gpt2"])
def test_generate_greedy_identical_to_cpu(rt, model):
    (res,) = _json_lines(_native(rt, "generate", model))
    assert res["npu"] == res["cpu"], res
    assert len(res["cpu"]) > 7


def test_training_step_matches_cpu(rt):
    (res,) = _json_lines(_native(rt, "train", "llama"))
    assert abs(res["loss_npu"] - res["loss_cpu"]) <= 1e-4 * max(1.0, abs(res["loss_cpu"])), res
    assert res["grad_rel_err"] < 1e-3, res


def test_random_operators_follow_the_apps_seed_and_sampling_generate_runs(rt):
    (res,) = _json_lines(_native(rt, "sample"))
    assert res["same_seed_same_draws"] and res["never_zero_prob"], res
    lo, hi = res["uniform_range"]
    assert 2.0 <= lo < hi <= 3.0, res
    mean, std = res["normal_mean_std"]
    assert abs(mean - 1.0) < 0.05 and abs(std - 0.5) < 0.05, res
    assert res["sampled_generate_repeatable"] and res["sampled_len"] == 11, res


def test_unsupported_operator_raises_torch_npu_error_naming_it(rt):
    (res,) = _json_lines(_native(rt, "unsupported"))
    assert res["raised"], res
    assert res["op"].lower() in res["error"].lower(), res
    assert res["after"] == res["after_cpu"], res  # the process and the device still work


def test_bench_overhead_native_generate_rows(rt):
    _need_wheel()
    native_libs()
    from flexnpu.bench import overhead

    rows = overhead._native_generate(True, 1, "cpu", "on")
    assert [r["name"] for r in rows] == ["native-hf-generate-tiny", "native-decode-graph"], rows
    for row in rows:  # HF generate (eager), and the static decoder captured with NPUGraph
        assert row["same_tokens"], row
        assert row["tokens_per_s"] > 0 and row["direct_tokens_per_s"] > 0 and row["ratio_vs_direct"] > 0, row
        assert row["repetitions"] == 1 and row["direct_spread_pct"] == 0.0, row  # one pair: no spread


# ------------------------------------------------------------------ hostile launches
def _alloc(c, data: torch.Tensor) -> int:
    h = c.malloc(data.numel() * data.element_size(), sync=True)
    c.memcpy_h2d(h, 0, data.numpy().tobytes())
    return h


def _ref(h: int, t: torch.Tensor, offset: int = 0) -> TensorRef:
    return TensorRef(h, t.dtype, tuple(t.shape), tuple(t.stride()), offset)


def _fails(c, op, args, kwargs=None, *, match: str) -> None:
    from flexnpu.errors import FlexNPUError

    c.launch(op, tuple(args), kwargs or {}, [])
    with pytest.raises(FlexNPUError) as e:
        c.synchronize()
    assert match.lower() in str(e.value).lower(), str(e.value)


def test_hostile_aclnn_launches_get_clear_errors_and_the_daemon_survives(rt):
    from flexnpu.client import Client

    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with Client(0) as c:
        hx, ho = _alloc(c, x), _alloc(c, torch.zeros(3, 4))
        rx, ro = _ref(hx, x), _ref(ho, x)
        # unknown operator: refused, named
        _fails(c, "aclnn::NoSuchOp", [rx, ro], match="aclnn::NoSuchOp")
        # wrong arity, wrong kinds, NULL where not optional
        _fails(c, "aclnn::Add", [rx, rx, ro], match="takes 4 arguments")
        _fails(c, "aclnn::Add", [rx, 3, 1, ro], match="must be a tensor")
        _fails(c, "aclnn::Adds", [rx, [1, 2], 1, ro], match="must be a scalar")
        _fails(c, "aclnn::Add", [rx, rx, 1, None], match="must not be NULL")
        _fails(c, "aclnn::Cast", [rx, "float", ro], match="must be a dtype")
        _fails(c, "aclnn::Cat", [[rx, 5], 0, ro], match="must be a tensor")
        _fails(c, "aclnn::Add", [rx, rx, 1, ro], {"bogus": 1}, match="unknown attribute")
        # a handle the client does not own, a view past the allocation's end
        _fails(
            c, "aclnn::Add", [TensorRef(999999, torch.float32, (3, 4), (4, 1), 0), rx, 1, ro], match="handle"
        )
        _fails(c, "aclnn::Add", [rx, rx, 1, TensorRef(ho, torch.float32, (3, 4), (4, 1), 4)], match="beyond")
        _fails(c, "aclnn::Add", [rx, rx, 1, TensorRef(ho, torch.float32, (3, 4), (-4, 1), 8)], match="stride")
        # an output that overlaps itself; a result of the wrong shape
        _fails(
            c,
            "aclnn::Adds",
            [rx, 1, 1, TensorRef(ho, torch.float32, (3, 4), (0, 1), 0)],
            match="overlaps itself",
        )
        _fails(c, "aclnn::Mm", [rx, _ref(hx, x.t()), _ref(ho, x), 0], match="shape")
        # index tensors out of range (would fault a device): refused before anything runs
        idx = torch.tensor([0, 7], dtype=torch.int64)
        hi = _alloc(c, idx)
        _fails(
            c,
            "aclnn::Embedding",
            [rx, _ref(hi, idx), TensorRef(ho, torch.float32, (2, 4), (4, 1), 0)],
            match="out of range",
        )
        _fails(c, "aclnn::IndexSelect", [rx, 0, _ref(hi, idx), ro], match="out of range")
        # result sizes from scalars are checked before anything is materialised
        _fails(
            c, "aclnn::Arange", [0, 1 << 40, 1, TensorRef(ho, torch.float32, (12,), (1,), 0)], match="arange"
        )
        _fails(c, "aclnn::Repeat", [rx, [1 << 20, 1 << 20], ro], match="shape")
        # fresh outputs are not part of an aclnn launch
        c.launch("aclnn::Add", (rx, rx, 1, ro), {}, [(48, TensorRef(777, torch.float32, (3, 4), (4, 1), 0))])
        with pytest.raises(Exception):
            c.synchronize()
        # and after all that, a good launch still runs and is right
        c.launch("aclnn::Add", (rx, rx, 2.0, ro), {}, [])
        c.synchronize()
        got = torch.frombuffer(bytearray(c.memcpy_d2h(ho, 0, 48)), dtype=torch.float32).reshape(3, 4)
        assert torch.equal(got, x + 2 * x)


def test_aclnn_matmul_launches_are_costed_in_flops_against_the_daemon_ceiling():
    """A stride-0 view makes a big matmul out of a few bytes: the per-launch FLOP ceiling
    (--max-launch-gflop) must see aclnn::Mm as a matmul, not as an elementwise op."""
    from types import SimpleNamespace

    from flexnpu.daemon.limits import LaunchLimits, LaunchTooLarge
    from flexnpu.protocol import Launch, Op

    big = TensorRef(1, torch.float32, (2000, 2000), (0, 0), 0)
    out = TensorRef(2, torch.float32, (2000, 2000), (2000, 1), 0)
    launch = Launch("aclnn::Mm", (big, big, out, 0), {}, [])
    limits = LaunchLimits.make(1.0, None, None)  # 1 GFLOP per launch; the Mm asks for 16
    with pytest.raises(LaunchTooLarge, match="GFLOP"):
        limits.check(SimpleNamespace(op=Op.LAUNCH, a=(launch, {}, {}), cost=None))
    small = Launch("aclnn::Mm", (TensorRef(1, torch.float32, (20, 20), (0, 0), 0),) * 2 + (out, 0), {}, [])
    limits.check(SimpleNamespace(op=Op.LAUNCH, a=(small, {}, {}), cost=None))


def test_aclnn_flash_attention_entry_matches_softmax_attention():
    """The daemon's FlashAttentionScore entry against plain softmax attention: a decode step
    with nothing masked (its fast path), a causal mask, a narrow band, and a fully masked row
    (zeros, not NaN); softmax max/sum are written to every slot of their last dim."""
    from flexnpu.daemon.optable import TABLE

    d = TABLE["aclnn::FlashAttentionScore"]
    g = torch.Generator().manual_seed(0)

    def run(s1, s2, mask=None, pre=2147483647, nxt=2147483647, n=2, dim=16):
        q, k, v = (torch.randn(1, n, s, dim, generator=g) for s in (s1, s2, s2))
        a = {p: None for p, _ in d.params}
        a.update(query=q, key=k, value=v, prefixOptional=[], scaleValue=dim**-0.5, keepProb=1.0)
        a.update(preTokens=pre, nextTokens=nxt, headNum=n, inputLayout="BNSD", innerPrecise=0, sparseMode=0)
        a.update(attenMaskOptional=mask, softmaxOutOut=torch.empty(0))
        a.update(softmaxMaxOut=torch.empty(1, n, s1, 8), softmaxSumOut=torch.empty(1, n, s1, 8))
        a["attentionOutOut"] = torch.empty(1, n, s1, dim)
        d.fn(a)
        s = (q @ k.transpose(-1, -2)) * dim**-0.5
        i, j = torch.arange(s1).unsqueeze(1), torch.arange(s2).unsqueeze(0)
        keep = torch.ones(s1, s2, dtype=torch.bool) if mask is None else ~mask
        keep = keep & (j <= i + nxt) & (j >= i - pre)
        s = s.masked_fill(~keep, float("-inf"))
        want = torch.nan_to_num(torch.softmax(s, -1)) @ v
        assert torch.allclose(a["attentionOutOut"], want, atol=1e-5), (s1, s2)
        mx = s.amax(-1).masked_fill(s.amax(-1).isinf(), 0)
        assert torch.allclose(a["softmaxMaxOut"], mx.unsqueeze(-1).expand(1, n, s1, 8))
        sm = torch.exp(s - mx.unsqueeze(-1)).sum(-1)
        assert torch.allclose(a["softmaxSumOut"], sm.unsqueeze(-1).expand(1, n, s1, 8), atol=1e-5)
        return a["attentionOutOut"]

    run(1, 9)  # a decode step
    run(5, 5, mask=torch.ones(5, 5, dtype=torch.bool).triu(1))  # causal prefill
    run(6, 6, pre=1, nxt=0)  # a band
    full = torch.zeros(3, 4, dtype=torch.bool)
    full[1] = True  # row 1 may attend nothing
    out = run(3, 4, mask=full)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
