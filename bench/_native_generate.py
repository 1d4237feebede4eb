"""Child of `flexnpu bench overhead`: HuggingFace greedy generate() (default dynamic KV cache) of a
Llama-style model with random weights, on one device; prints one JSON line.

    python _native_generate.py --device cpu|npu --layers L --hidden H --tokens N

`--device npu` is meant to run under `flexnpu run --interpose native` (the real torch_npu); the
same program with `--device cpu` outside FlexNPU is the direct baseline. One warm-up generate,
then the timed one (start-up and first-use costs excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=8)
    a = ap.parse_args()
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
    ids = torch.randint(0, 1024, (1, a.prompt), generator=torch.Generator().manual_seed(1)).to(a.device)

    def run() -> torch.Tensor:
        out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        return out.cpu()

    with torch.no_grad():
        run()
        t0 = time.perf_counter()
        out = run()
        dt = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": a.tokens / dt, "last_token": int(out[0, -1]), "seconds": dt}))


if __name__ == "__main__":
    main()
