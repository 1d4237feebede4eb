"""Measurements of the npu front-end: client-side cost per eager op, greedy decode tokens/s.

Used by ``flexnpu bench overhead`` (bench/overhead.py) and runnable on its own:
``python -m flexnpu.hook.measure [--quick] [--json]`` (needs a daemon, e.g. under
``flexnpu run``, or FLEXNPU_RUNTIME_DIR pointing at one). Decode uses a tiny Qwen2-style model
with a static KV cache, so one decode step has fixed shapes and can be captured as an NPU graph.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import torch


def _ensure_device() -> None:
    from flexnpu.hook import install_torch_device

    install_torch_device()


def eager_us_per_op(n: int = 2000, repeats: int = 5, null_client: bool = False) -> dict[str, float]:
    """Median client-side µs per small eager op (``y = x + x`` on 16 floats, no sync in the loop).

    With ``null_client`` the launches go to a client that drops them: the hook's own cost alone.
    """
    _ensure_device()
    from flexnpu.hook import runtime

    saved = None
    if null_client:
        saved = runtime._client_factory
        runtime.set_client_factory(lambda i: _NullClient())
    try:
        x = torch.ones(16, device="npu")
        for _ in range(200):
            y = x + x
        runtime.get(0).client.synchronize()
        client, total = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                y = x + x
            t1 = time.perf_counter()
            runtime.get(0).client.synchronize()
            t2 = time.perf_counter()
            client.append((t1 - t0) / n * 1e6)
            total.append((t2 - t0) / n * 1e6)
        del y
        return {
            "client_us_per_op": statistics.median(client),
            "with_execution_us_per_op": statistics.median(total),
        }
    finally:
        if null_client:
            runtime.set_client_factory(saved)


class _NullClient:
    """Accepts every command and does nothing (isolates the hook's cost from the ring's)."""

    def __init__(self):
        self.n = 0

    def alloc_handle(self) -> int:
        self.n += 1
        return self.n

    def malloc(self, nbytes, handle=None):
        return handle

    def launch(self, *a, **k):
        pass

    def free(self, h):
        pass

    def memcpy_h2d(self, *a, **k):
        pass

    def synchronize(self, stream=None):
        pass

    def set_phase(self, *a, **k):
        pass

    def mark_step(self, *a, **k):
        pass


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 128, vocab: int = 1000):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


def decode(
    model, device: str, mode: str = "eager", prompt_len: int = 16, new_tokens: int = 32
) -> dict[str, Any]:
    """Greedy decode with a static KV cache; ``mode`` is ``eager`` or ``graph`` (npu only).

    Returns tokens/s over the decode steps (prefill excluded) and the generated tokens.
    """
    from transformers import StaticCache

    m = copy.deepcopy(model).to(device)
    prompt = torch.randint(
        0, m.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        cache = StaticCache(config=m.config, max_cache_len=prompt_len + new_tokens + 1)
        out = m(
            input_ids=prompt.to(device),
            past_key_values=cache,
            cache_position=torch.arange(prompt_len, device=device),
            use_cache=True,
        )
        ids = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt_len], device=device)
        toks = [int(ids.item())]

        def step():
            logits = m(
                input_ids=ids,
                past_key_values=cache,
                cache_position=pos,
                position_ids=pos.unsqueeze(0),
                use_cache=True,
            ).logits
            ids.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        steps = new_tokens - 1
        if mode == "graph":
            # The capture records one step (and, in FlexNPU's daemon, runs it): count it as a token.
            g = torch.npu.NPUGraph()  # type: ignore[attr-defined]  # torch.npu: installed by the hook
            t0 = time.perf_counter()
            with torch.npu.graph(g):  # type: ignore[attr-defined]
                step()
            toks.append(int(ids.item()))
            for _ in range(steps - 1):
                g.replay()
                toks.append(int(ids.item()))
            dt = time.perf_counter() - t0
            g.reset()
        elif mode == "eager":
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
                toks.append(int(ids.item()))
            dt = time.perf_counter() - t0
        else:
            raise ValueError(f"mode must be eager or graph, not {mode!r}")
    return {"tokens_per_s": steps / dt, "tokens": toks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flexnpu.hook.measure",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer ops and tokens")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    _ensure_device()
    n_ops, n_tok = (500, 12) if args.quick else (2000, 32)
    res: dict[str, Any] = {}
    res["eager_hook_only"] = eager_us_per_op(n_ops, null_client=True)
    res["eager_real_client"] = eager_us_per_op(n_ops)
    model = tiny_model()
    direct = decode(model, "cpu", "eager", new_tokens=n_tok)
    eager = decode(model, "npu", "eager", new_tokens=n_tok)
    graph = decode(model, "npu", "graph", new_tokens=n_tok)
    res["decode"] = {
        "direct_cpu": direct["tokens_per_s"],
        "npu_eager": eager["tokens_per_s"],
        "npu_graph": graph["tokens_per_s"],
        "tokens_match": direct["tokens"] == eager["tokens"] == graph["tokens"],
    }
    if args.json:
        print(json.dumps(res))
    else:
        e, r, d = res["eager_hook_only"], res["eager_real_client"], res["decode"]
        print(f"eager op, hook only:        {e['client_us_per_op']:.1f} us")
        print(
            f"eager op, hook + client:    {r['client_us_per_op']:.1f} us (incl. daemon execution "
            f"{r['with_execution_us_per_op']:.1f} us)"
        )
        print(
            f"decode tokens/s: direct cpu {d['direct_cpu']:.1f}, npu eager {d['npu_eager']:.1f}, "
            f"npu graph {d['npu_graph']:.1f}; tokens match: {d['tokens_match']}"
        )
    return 0 if res["decode"]["tokens_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
