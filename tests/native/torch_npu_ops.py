"""Run by tests/test_native_ops.py under `flexnpu run --interpose native`: the REAL torch_npu
launching operators through FlexNPU's aclnn API (libopapi.so), executed by the daemon's
operator table, compared with the same computation on the CPU.

    python torch_npu_ops.py ops [NAME...]   # every check below (or the named ones); one JSON line each
    python torch_npu_ops.py unsupported     # an operator outside the table: torch_npu's error
    python torch_npu_ops.py generate MODEL  # greedy generate() of a tiny random model, npu vs cpu
    python torch_npu_ops.py train MODEL     # one training step: loss and gradients, npu vs cpu
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch_npu  # noqa: F401  (the real one: flexnpu run puts its isolated folder on the path)

CHECKS: dict[str, Callable[[str], Any]] = {}


def check(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    CHECKS[fn.__name__] = fn
    return fn


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def strided(t: torch.Tensor, dev: str) -> torch.Tensor:
    """t on dev as a non-contiguous view (a transposed copy transposed back, then every other
    column of a wider tensor): the operator sees strides, not a dense block."""
    w = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    w[..., ::2] = t
    w = w.to(dev)
    return w[..., ::2]


def both(dev: str, *ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(dev) for t in ts]


# ------------------------------------------------------------------ elementwise
@check
def add(dev: str) -> Any:
    a, b = both(dev, rand(3, 5), rand(3, 5, seed=1))
    return [a + b, a + 1.5, torch.add(a, b, alpha=2.0), a - b, a - 2, a * b, a * 3, a / (b.abs() + 1), a / 4]


@check
def add_strided(dev: str) -> Any:
    a, b = strided(rand(4, 6), dev), strided(rand(4, 6, seed=1), dev)
    return [a + b, a * b, a - 1, a / 2]


@check
def add_broadcast_dtypes(dev: str) -> Any:
    a = rand(2, 3, 4).to(dev)
    b = rand(4, seed=2).to(dev)
    i = torch.arange(4, dtype=torch.int64).to(dev)
    return [a + b, a * i, i + 1, i * 2, (a.half() + b.half()).float(), (a.bfloat16() * 2).float()]


@check
def inplace(dev: str) -> Any:
    a, b = both(dev, rand(3, 4), rand(3, 4, seed=1))
    a.add_(b)
    a.mul_(2)
    a.sub_(1)
    a.div_(3)
    a.add_(1.0, alpha=2)
    c = rand(2, 8).to(dev)
    c[:, ::2].mul_(10)  # strided in place
    return [a, c]


@check
def copy_fill(dev: str) -> Any:
    a = rand(4, 6).to(dev)
    t = a.t().contiguous()
    z = torch.zeros(3, 4, device=dev)
    o = torch.ones(2, 3, dtype=torch.int64, device=dev)
    f = torch.full((2, 2), 7.5, device=dev)
    d = torch.empty(4, 6, device=dev)
    d.copy_(a)
    e = torch.empty(6, 4, dtype=torch.float16, device=dev)
    e.copy_(a.t())  # strided source, cast
    s = torch.zeros(4, 12, device=dev)
    s[:, ::2] = a  # strided destination
    return [t, z, o, f, d, e.float(), s]


@check
def matmul(dev: str) -> Any:
    a, b = both(dev, rand(5, 7), rand(7, 3, seed=1))
    x3, y3 = both(dev, rand(2, 5, 7), rand(2, 7, 3, seed=1))
    return [a @ b, a.t().t() @ b, x3 @ y3, x3 @ b, torch.matmul(a, b[:, 0])]


@check
def unary(dev: str) -> Any:
    x = rand(3, 8).to(dev)
    p = x.abs() + 0.5
    s = strided(rand(3, 8, seed=3), dev)
    out = [
        x.abs(),
        -x,
        x.exp(),
        p.log(),
        p.sqrt(),
        p.rsqrt(),
        p.reciprocal(),
        x.sin(),
        x.cos(),
        x.tanh(),
        x.sigmoid(),
        torch.nn.functional.silu(x),
        torch.nn.functional.gelu(x),
        torch.relu(x),
        x.floor(),
        x.ceil(),
        x.round(),
        x.sign(),
        torch.erf(x),
        s.exp(),
        s.neg(),
        torch.nn.functional.silu(s),
    ]
    y = x.clone()
    y.exp_()
    z = s.clone()
    z.sigmoid_()
    return out + [y, z]


@check
def compare_logical(dev: str) -> Any:
    a, b = both(dev, rand(4, 5), rand(4, 5, seed=1))
    m = a > 0
    return [
        a == b,
        a != 0,
        a < b,
        a <= 0.1,
        a > b,
        a >= 0,
        m & (b > 0),
        m | (b > 0),
        ~m,
        torch.logical_not(m),
        torch.maximum(a, b),
        torch.minimum(a, b),
        torch.where(m, a, b),
        torch.where(m, a, 0.0),
        a.masked_fill(m, -1.0),
        a.masked_fill(~m, float("-inf")).clamp(min=-5),
        a.clamp(-0.5, 0.5),
        a.pow(2),
        a.abs().pow(0.5),
        torch.pow(2.0, a),
    ]


@check
def reductions(dev: str) -> Any:
    x = rand(3, 4, 5).to(dev)
    s = strided(rand(4, 6, seed=4), dev)
    i = torch.arange(12, dtype=torch.int64).reshape(3, 4).to(dev)
    return [
        x.sum(),
        x.sum(-1),
        x.sum((0, 2), keepdim=True),
        x.mean(-1),
        x.mean(),
        x.amax(1),
        x.max(),
        x.max(-1).values,
        x.max(-1).indices,
        x.argmax(-1),
        x.argmax(),
        x.min(0).values,
        x.argmin(1),
        s.sum(0),
        s.mean(1),
        i.sum(),
        i.sum(0),
        (x > 0).any(),
        (x > 0).all(-1),
        (x > 0).any(1),
        x.cumsum(1),
        i.cumsum(0),
        x.prod(-1),
        x.std(-1),
        x.var(0),
        torch.logsumexp(x, -1),
        torch.norm(x, dim=-1),
    ]


@check
def softmax_norms(dev: str) -> Any:
    x = rand(2, 3, 8).to(dev)
    w, b = both(dev, rand(8, seed=5), rand(8, seed=6))
    s = strided(rand(3, 8, seed=7), dev)
    return [
        torch.softmax(x, -1),
        torch.log_softmax(x, -1),
        torch.softmax(x, 1),
        torch.softmax(s, -1),
        torch.nn.functional.layer_norm(x, (8,), w, b),
        torch.nn.functional.layer_norm(x, (8,)),
        torch.nn.functional.rms_norm(x, (8,), w, 1e-6),
    ]


@check
def indexing(dev: str) -> Any:
    w = rand(10, 4).to(dev)
    idx = torch.tensor([[1, 3, 9], [0, 0, 2]]).to(dev)
    x = rand(5, 6).to(dev)
    j = torch.tensor([4, 0, 2]).to(dev)
    g = torch.tensor([[0, 5], [1, 1], [2, 3], [0, 0], [5, 4]]).to(dev)
    y = torch.zeros(5, 6, device=dev)
    y.scatter_(1, g, x[:, :2])
    z = torch.zeros(5, 6, device=dev).scatter_add(1, g, x[:, :2])
    m = x > 0
    q = x.clone()
    q[j] = 0.5
    r = x.clone()
    r[:, 1] = rand(5, seed=9).to(dev)
    return [
        torch.nn.functional.embedding(idx, w),
        x.index_select(0, j),
        x.index_select(1, j),
        x[j],
        x[:, j],
        x.gather(1, g),
        y,
        z,
        q,
        r,
        x[1:4:2, ::3],
        x[-1],
        x[j, j],
    ]


@check
def shapes(dev: str) -> Any:
    a, b = both(dev, rand(2, 3), rand(2, 3, seed=1))
    s = strided(rand(2, 3, seed=2), dev)
    return [
        torch.cat([a, b], 0),
        torch.cat([a, b, s], 1),
        torch.stack([a, b]),
        torch.stack([a, s], -1),
        a.t().contiguous(),
        a.unsqueeze(0).expand(4, 2, 3).contiguous(),
        a.repeat(2, 2),
        a.flip(1),
        torch.nn.functional.pad(a, (1, 2), value=3.0),
        torch.triu(rand(4, 4).to(dev)),
        torch.tril(rand(4, 4).to(dev), -1),
        a.transpose(0, 1) * 2,
        a.reshape(3, 2) + 0,
        torch.roll(a, 1, 1),
    ]


@check
def factories(dev: str) -> Any:
    return [
        torch.arange(10, device=dev),
        torch.arange(1, 7, 2, device=dev, dtype=torch.float32),
        torch.arange(0.0, 1.0, 0.25, device=dev),
        torch.full((2, 3), -2, device=dev),
        torch.zeros(3, dtype=torch.int32, device=dev),
        torch.ones(2, 2, dtype=torch.bool, device=dev),
        torch.linspace(0, 1, 5, device=dev),
        torch.eye(3, device=dev),
        torch.ones(3, 3, device=dev).triu(1).bool(),
    ]


@check
def topk_sort(dev: str) -> Any:
    x = rand(3, 10).to(dev)
    v, i = torch.topk(x, 4, dim=-1)
    v2, i2 = torch.topk(x, 2, dim=0, largest=False)
    sv, si = torch.sort(x, -1, descending=True)
    return [v, i, v2, i2, sv, si, torch.argsort(x, -1)]


@check
def casts(dev: str) -> Any:
    x = (rand(3, 4) * 10).to(dev)
    return [
        x.int(),
        x.long(),
        x.half(),
        x.bfloat16(),
        (x > 0).float(),
        x.to(torch.int8),
        strided(rand(3, 4), dev).half(),
    ]


@check
def matmul_family(dev: str) -> Any:
    a, b = both(dev, rand(4, 6), rand(6, 5, seed=1))
    c = rand(5, seed=2).to(dev)
    x, y = both(dev, rand(3, 4, 6), rand(3, 6, 5, seed=1))
    lin = torch.nn.functional.linear(a, rand(5, 6, seed=3).to(dev), c)
    return [
        torch.mm(a, b),
        torch.bmm(x, y),
        torch.addmm(c, a, b),
        torch.addmm(c, a, b, beta=0.5, alpha=2),
        torch.baddbmm(rand(3, 4, 5).to(dev), x, y),
        lin,
        torch.mv(a, rand(6).to(dev)),
        torch.dot(c, c),
        a.t() @ a,
        (a.half() @ b.half()).float(),
        strided(rand(4, 6), dev) @ b,
    ]


@check
def attention(dev: str) -> Any:
    q, k, v = both(dev, rand(1, 4, 6, 8), rand(1, 2, 6, 8, seed=1), rand(1, 2, 6, 8, seed=2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = torch.ones(6, 6, dtype=torch.bool).tril().to(dev)
    return [
        sdpa(q, k, v, is_causal=True, enable_gqa=True),
        sdpa(q, k, v, enable_gqa=True),
        sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
        sdpa(q[:, :, -1:], k, v, enable_gqa=True),
    ]


@check
def fused_npu_ops(dev: str) -> Any:
    """torch_npu's fused operators against their reference formulas on the CPU."""
    x, g = both(dev, rand(2, 3, 8), rand(8, seed=1))
    cos, sin = both(dev, rand(1, 3, 8, seed=2), rand(1, 3, 8, seed=3))
    if dev == "cpu":
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        rms = x * rstd * g
        x1, x2 = x.chunk(2, -1)
        rot = x * cos + torch.cat((-x2, x1), -1) * sin
        swi = torch.nn.functional.silu(x1) * x2
        return [rms, rstd, rot, swi]
    rms, rstd = torch_npu.npu_rms_norm(x, g, 1e-6)
    rot = torch_npu.npu_rotary_mul(x, cos, sin)
    swi = torch_npu.npu_swiglu(x, -1)
    return [rms, rstd, rot, swi]


def sample() -> dict[str, Any]:
    """Random operators: they follow torch.npu.manual_seed (same seed, same draws) and have the
    right distribution shape; the draws themselves are not the CPU's."""
    torch.npu.manual_seed(123)
    probs = torch.tensor([[0.0, 0.2, 0.8], [1.0, 0.0, 0.0]]).npu()
    m1 = torch.multinomial(probs, 50, replacement=True).cpu()
    u1 = torch.empty(1000, device="npu").uniform_(2.0, 3.0).cpu()
    n1 = torch.empty(4000, device="npu").normal_(1.0, 0.5).cpu()
    torch.npu.manual_seed(123)
    m2 = torch.multinomial(probs, 50, replacement=True).cpu()
    u2 = torch.empty(1000, device="npu").uniform_(2.0, 3.0).cpu()
    model = tiny_model("llama").to("npu")
    ids = torch.randint(0, 128, (1, 5), generator=_g(1)).npu()
    torch.npu.manual_seed(7)
    s1 = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9).cpu()
    torch.npu.manual_seed(7)
    s2 = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9).cpu()
    return {
        "same_seed_same_draws": bool(torch.equal(m1, m2) and torch.equal(u1, u2)),
        "never_zero_prob": bool((m1[0] != 0).all() and (m1[1] == 0).all()),
        "uniform_range": [u1.min().item(), u1.max().item()],
        "normal_mean_std": [n1.mean().item(), n1.std().item()],
        "sampled_generate_repeatable": bool(torch.equal(s1, s2)),
        "sampled_len": int(s1.shape[1]),
    }


# ------------------------------------------------------------------ main
def _compare(name: str, fn: Callable[[str], Any]) -> dict[str, Any]:
    try:
        got = fn("npu")
        want = fn("cpu")
        got = got if isinstance(got, (list, tuple)) else [got]
        want = want if isinstance(want, (list, tuple)) else [want]
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            g = g.cpu()
            assert g.dtype == w.dtype, f"result {i}: dtype {g.dtype} != {w.dtype}"
            assert g.shape == w.shape, f"result {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            if g.is_floating_point():
                tol = 1e-2 if g.dtype in (torch.float16, torch.bfloat16) else 1e-5
                assert torch.allclose(g.float(), w.float(), rtol=tol, atol=tol), f"result {i}: values differ"
            else:
                assert torch.equal(g, w), f"result {i}: values differ"
        return {"check": name, "ok": True}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {
            "check": name,
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "tb": traceback.format_exc()[-1500:],
        }


def tiny_model(kind: str) -> Any:
    """A tiny decoder-only model with random (seeded) weights, on the CPU."""
    import transformers as tf

    if kind == "gpt2":  # LayerNorm, GELU (tanh form), Conv1D = addmm, learned positions
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        ).eval()
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }[kind]
    cfg = cfg_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def generate(kind: str, new_tokens: int = 12) -> dict[str, Any]:
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (1, 7), generator=_g(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        model.to("npu")
        got = model.generate(ids.to("npu"), max_new_tokens=new_tokens, do_sample=False).cpu()
    return {"model": kind, "cpu": want[0].tolist(), "npu": got[0].tolist()}


def train(kind: str) -> dict[str, Any]:
    model = tiny_model(kind).train()
    ids = torch.randint(0, 128, (2, 9), generator=_g(2))
    out = model(ids, labels=ids)
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_cpu = out.loss.item()
    model.zero_grad(set_to_none=True)
    model.to("npu")
    out = model(ids.to("npu"), labels=ids.to("npu"))
    out.loss.backward()
    worst, worst_name = 0.0, ""
    for n, p in model.named_parameters():
        g = p.grad.cpu()
        err = ((g - want[n]).abs().max() / (want[n].abs().max() + 1e-6)).item()
        if err > worst:
            worst, worst_name = err, n
    return {
        "model": kind,
        "loss_cpu": loss_cpu,
        "loss_npu": out.loss.item(),
        "grad_rel_err": worst,
        "worst": worst_name,
    }


def unsupported() -> dict[str, Any]:
    """bitwise_left_shift: torch_npu has only an aclnn path for it (aclnnLeftShift), which
    FlexNPU's operator table does not have."""
    a = torch.arange(4, dtype=torch.int32)
    res: dict[str, Any] = {"op": "LeftShift", "raised": False, "error": ""}
    try:
        torch.bitwise_left_shift(a.to("npu"), a.to("npu"))
        torch.npu.synchronize()
    except RuntimeError as e:
        res["raised"], res["error"] = True, str(e)[:2000]
    res["after"] = (a.to("npu") * 3 + 1).cpu().tolist()
    res["after_cpu"] = (a * 3 + 1).tolist()
    return res


def main(argv: list[str]) -> int:
    torch.npu.set_device(0)
    mode = argv[1] if len(argv) > 1 else "ops"
    if mode == "ops":
        names = argv[2:] or list(CHECKS)
        for n in names:
            print(json.dumps(_compare(n, CHECKS[n])), flush=True)
        return 0
    if mode == "sample":
        print(json.dumps(sample()), flush=True)
        return 0
    if mode == "unsupported":
        print(json.dumps(unsupported()), flush=True)
        return 0
    if mode == "generate":
        print(json.dumps(generate(argv[2])), flush=True)
        return 0
    if mode == "train":
        print(json.dumps(train(argv[2])), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
