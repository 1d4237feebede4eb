"""Child of `flexnpu bench overhead`: HuggingFace greedy generate() (default dynamic KV cache) of a
Llama-style model with random weights, on one device; prints one JSON line.

    python _native_generate.py --device cpu|npu --layers L --hidden H --tokens N

`--device npu` is meant to run under `flexnpu run --interpose native` (the real torch_npu); the
same program with `--device cpu` outside FlexNPU is the direct baseline. A short warm-up generate
(an 8-token prompt, 4 new tokens: start-up and first-use costs excluded on both sides), then the
timed one from a longer prompt: as in bench/_hfgen.py, no shape of the timed run was seen before,
so the daemon meets every growing shape (the KV cache, attention, the masks) for the first time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

WARM_PROMPT, WARM_TOKENS = 8, 4  # the warm-up; the timed run's prompt is longer than both together


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16, help="the timed run's prompt length (> 12)")
    a = ap.parse_args()
    if a.prompt <= WARM_PROMPT + WARM_TOKENS:
        ap.error(f"--prompt must exceed {WARM_PROMPT + WARM_TOKENS}: the timed run's shapes must be new")
    if a.device == "npu":
        import torch_npu  # noqa: F401  (the real one, under flexnpu run --interpose native)

        torch.npu.set_device(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, a.hidden // 64)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=a.prompt + a.tokens + 8,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(a.device)
    g = torch.Generator().manual_seed(1)
    warm = torch.randint(0, 1024, (1, WARM_PROMPT), generator=g).to(a.device)
    ids = torch.randint(0, 1024, (1, a.prompt), generator=g).to(a.device)

    def run(prompt: torch.Tensor, n: int) -> torch.Tensor:
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out.cpu()

    with torch.no_grad():
        run(warm, WARM_TOKENS)  # sequence lengths 8..12: the timed run's start at 16
        t0 = time.perf_counter()
        out = run(ids, a.tokens)
        dt = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": a.tokens / dt, "last_token": int(out[0, -1]), "seconds": dt}))


if __name__ == "__main__":
    main()
