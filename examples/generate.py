"""Greedy generation with a small Qwen2-style causal LM (random weights) on an Ascend NPU.

An ordinary torch_npu program: it runs on a real Ascend host, on FlexNPU's virtual `npu` device
under `flexnpu run -- python examples/generate.py`, and on the CPU when neither is present.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

try:
    import torch_npu  # noqa: F401  (Ascend's plugin, or FlexNPU's under `flexnpu run`)

    DEVICE = "npu" if torch.npu.is_available() else "cpu"
except ImportError:
    DEVICE = "cpu"


def build_model(layers: int, hidden: int, vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()

    model = build_model(args.layers, args.hidden, args.vocab, args.seed).to(DEVICE)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompt.to(DEVICE),
            attention_mask=torch.ones_like(prompt).to(DEVICE),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    dt = time.perf_counter() - t0
    tokens = out[0, args.prompt_len :].cpu().tolist()
    if args.json:
        print(
            json.dumps({"device": DEVICE, "seconds": dt, "tokens_per_s": len(tokens) / dt, "tokens": tokens})
        )
        return
    print(f"device: {DEVICE}")
    print(f"generated {len(tokens)} tokens in {dt:.2f} s ({len(tokens) / dt:.1f} tokens/s)")
    print("tokens:", " ".join(map(str, tokens)))


if __name__ == "__main__":
    main()
