"""Prefill in one process, decode in another, the KV cache handed over without a copy.

Under FlexNPU both processes run on the same (virtual) npu device: the prefill instance fills
the KV cache and exports it with torch.npu.ipc_export; the decode instance imports it with
torch.npu.ipc_import and keeps generating. The daemon shares the very same device memory
(aclrtIpcMemGetExportKey/ImportByKey semantics), so nothing is copied. Without FlexNPU (no npu
device) the same steps run in one process, and the tokens are the same.

    flexnpu run -- python examples/pd_handoff.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

try:
    import torch_npu  # noqa: F401

    DEVICE = "npu" if torch.npu.is_available() else "cpu"
except ImportError:
    DEVICE = "cpu"

LAYERS, HIDDEN, HEADS, VOCAB, MAX_LEN = 2, 128, 4, 512, 64


class TinyDecoder:
    """A small decoder with a static KV cache (one tensor per layer for K and for V)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: (torch.randn(*s, generator=g) * HIDDEN**-0.5).to(DEVICE)  # noqa: E731
        self.emb, self.head = w(VOCAB, HIDDEN), w(VOCAB, HIDDEN)
        self.layers = [(w(3 * HIDDEN, HIDDEN), w(HIDDEN, HIDDEN), w(HIDDEN, HIDDEN)) for _ in range(LAYERS)]
        hd = HIDDEN // HEADS
        self.k = [torch.zeros(1, HEADS, MAX_LEN, hd).to(DEVICE) for _ in range(LAYERS)]
        self.v = [torch.zeros(1, HEADS, MAX_LEN, hd).to(DEVICE) for _ in range(LAYERS)]
        self.positions = torch.arange(MAX_LEN).to(DEVICE)

    def step(self, tok: int, pos: int) -> int:
        x = F.embedding(torch.tensor([tok]).to(DEVICE), self.emb)
        p = torch.tensor([pos]).to(DEVICE)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for i, (qkv, o, mlp) in enumerate(self.layers):
            q, k, v = F.linear(x, qkv).view(1, 3, HEADS, 1, HIDDEN // HEADS).unbind(1)
            self.k[i].index_copy_(2, p, k)
            self.v[i].index_copy_(2, p, v)
            a = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)
            x = x + F.linear(a.reshape(1, HIDDEN), o)
            x = x + F.gelu(F.linear(x, mlp))
        return int(torch.argmax(F.linear(x, self.head), -1).item())


def prefill(m: TinyDecoder, prompt: list[int]) -> int:
    tok = 0
    for pos, t in enumerate(prompt):
        tok = m.step(t, pos)
    return tok  # the first generated token


def decode(m: TinyDecoder, first: int, start: int, n: int) -> list[int]:
    out, tok = [first], first
    for pos in range(start, start + n - 1):
        tok = m.step(tok, pos)
        out.append(tok)
    return out


def role_prefill(prompt: list[int]) -> None:
    m = TinyDecoder()
    first = prefill(m, prompt)
    decode_pid = int(sys.stdin.readline())
    kv = [torch.npu.ipc_export(t, pids=[decode_pid]) for t in m.k + m.v]
    print(json.dumps({"first": first, "kv": kv}), flush=True)
    sys.stdin.readline()  # keep our tensors alive until decode has imported them


def role_decode(start: int, n: int) -> None:
    print(os.getpid(), flush=True)
    msg = json.loads(sys.stdin.readline())
    m = TinyDecoder()  # same weights (a real engine would import those too)
    shared = [torch.npu.ipc_import(d) for d in msg["kv"]]
    m.k, m.v = shared[:LAYERS], shared[LAYERS:]
    print(json.dumps(decode(m, msg["first"], start, n)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("both", "prefill", "decode"), default="both")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    prompt = [int(x) for x in torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(7))]
    if args.role == "prefill":
        return role_prefill(prompt)
    if args.role == "decode":
        return role_decode(len(prompt), args.new_tokens)
    if DEVICE != "npu":  # no FlexNPU: both phases in this process
        m = TinyDecoder()
        tokens = decode(m, prefill(m, prompt), len(prompt), args.new_tokens)
        mode = "one process (cpu)"
    else:
        me = [sys.executable, os.path.abspath(__file__), "--new-tokens", str(args.new_tokens), "--role"]
        pre = subprocess.Popen(me + ["prefill"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        dec = subprocess.Popen(me + ["decode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        pre.stdin.write(dec.stdout.readline())
        pre.stdin.flush()
        dec.stdin.write(pre.stdout.readline())
        dec.stdin.flush()
        tokens = json.loads(dec.stdout.readline())
        pre.stdin.write("done\n")
        pre.stdin.flush()
        for p in (pre, dec):
            if p.wait(60) != 0:
                sys.exit(f"{p.args[-1]} instance failed")
        mode = "prefill and decode processes, KV cache shared zero-copy"
    print(f"mode: {mode}")
    print("tokens:", " ".join(map(str, tokens)))


if __name__ == "__main__":
    main()
