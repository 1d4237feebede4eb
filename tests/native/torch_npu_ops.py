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
        return {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]}


def tiny_model(kind: str) -> Any:
    """A tiny decoder-only model with random (seeded) weights, on the CPU."""
    import transformers as tf

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
    return {"model": kind, "loss_cpu": loss_cpu, "loss_npu": out.loss.item(), "grad_rel_err": worst, "worst": worst_name}


def main(argv: list[str]) -> int:
    torch.npu.set_device(0)
    mode = argv[1] if len(argv) > 1 else "ops"
    if mode == "ops":
        names = argv[2:] or list(CHECKS)
        for n in names:
            print(json.dumps(_compare(n, CHECKS[n])), flush=True)
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
