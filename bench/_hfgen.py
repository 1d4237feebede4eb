"""HuggingFace ``generate()`` with its default dynamic KV cache: the eager loop users run.

Used by `flexnpu bench overhead`: the same code runs directly on a torch device and on FlexNPU's
`npu` device (in a child under `flexnpu run`). Every decode step has new shapes (the cache
grows by one position), and the timed run starts from a prompt length the warm-up never saw, so
no shape of the timed run was seen before: this measures the cold-shape path of the front end,
not its caches. The models are examples/generate.py's Qwen2-style causal LM (random weights).
Run as a script it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

# (name, layers, hidden): examples/generate.py's default model, and a 4-layer 1024-wide one
MODELS = (("default", 2, 128), ("h1024", 4, 1024))
VOCAB = 1000
WARM_PROMPT = 8  # the warm-up's prompt length; the timed runs use longer ones
PROMPT = 16


def build_model(layers: int, hidden: int, seed: int = 0) -> Any:
    """examples/generate.py's model: its own build_model, loaded from the checkout, so the
    benchmark measures exactly what the main example runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("_flexnpu_example_generate", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"{path}: the HF generate rows need a FlexNPU checkout (examples/)")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.build_model(layers, hidden, VOCAB, seed)


def _sync(device: str) -> None:
    mod = getattr(torch, device.split(":")[0], None)
    if device != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def ops_per_token(model: Any, device: str, prompt: torch.Tensor, tokens: int) -> float:
    """aten operators per generated token, counted with a TorchDispatchMode (the difference of
    two generations, so the prompt's prefill cancels out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (tokens, 2 * tokens):
        Count.n = 0
        with Count():
            _generate(model, prompt, n)
        counts.append(Count.n)
    _sync(device)
    return (counts[1] - counts[0]) / tokens


def _generate(model: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out


def run(device: str, layers: int, hidden: int, tokens: int, repeat: int) -> dict[str, Any]:
    model = build_model(layers, hidden).to(device)
    g = torch.Generator().manual_seed(1)
    warm = torch.randint(0, VOCAB, (1, WARM_PROMPT), generator=g).to(device)
    _generate(model, warm, 4)  # first-use costs (imports, allocator, kernels) out of the timing
    _sync(device)
    times = []
    last: list[int] = []
    for r in range(repeat):
        # a prompt length no earlier run used: every shape of this run is new to the caches
        plen = PROMPT + r * (tokens + 1)
        prompt = torch.randint(0, VOCAB, (1, plen), generator=g).to(device)
        t0 = time.perf_counter()
        out = _generate(model, prompt, tokens)
        last = out[0, plen:].cpu().tolist()  # reads synchronize
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    opt = ops_per_token(model, device, warm, 4)
    return {
        "device": device,
        "layers": layers,
        "hidden": hidden,
        "tokens": tokens,
        "tokens_per_s": tokens / t,
        "ops_per_token": opt,
        "last_tokens": last,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="timed generations per model (median)")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS))
    a = ap.parse_args()
    want = a.models.split(",")
    res = {
        name: run(a.device, layers, hidden, a.tokens, a.repeat)
        for name, layers, hidden in MODELS
        if name in want
    }
    print(json.dumps(res))
