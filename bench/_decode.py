"""A small Llama-style decoder with a static KV cache: one token per step, graph-capturable.

Used by `flexnpu bench overhead`: the same code runs directly on a torch device and on FlexNPU's
`npu` device (in a child under `flexnpu run`). Run as a script it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


class Decoder:
    def __init__(
        self, layers: int, hidden: int, heads: int, vocab: int, max_len: int, device: str, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        s = hidden**-0.5

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * s).to(device)

        self.h, self.nh, self.hd, self.max_len = hidden, heads, hidden // heads, max_len
        self.emb = w(vocab, hidden)
        self.layers = [
            dict(
                qkv=w(3 * hidden, hidden),
                o=w(hidden, hidden),
                up=w(2 * 2 * hidden, hidden),
                down=w(hidden, 2 * hidden),
                n1=torch.ones(hidden).to(device),
                n2=torch.ones(hidden).to(device),
            )
            for _ in range(layers)
        ]
        self.head = w(vocab, hidden)
        self.k = [torch.zeros(1, heads, max_len, self.hd).to(device) for _ in range(layers)]
        self.v = [torch.zeros(1, heads, max_len, self.hd).to(device) for _ in range(layers)]
        self.positions = torch.arange(max_len).to(device)

    @staticmethod
    def _norm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * wt

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok: (1,) int64 token; pos: (1,) int64 position. Returns the next token (1,)."""
        x = F.embedding(tok, self.emb)  # (1, h)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for i, L in enumerate(self.layers):
            y = self._norm(x, L["n1"])
            q, k, v = F.linear(y, L["qkv"]).view(1, 3, self.nh, 1, self.hd).unbind(1)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            att = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)
            x = x + F.linear(att.reshape(1, self.h), L["o"])
            gate, up = F.linear(self._norm(x, L["n2"]), L["up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L["down"])
        return torch.argmax(F.linear(self._norm(x, self.layers[-1]["n2"]), self.head), -1)


def run(device: str, mode: str, steps: int, layers: int, hidden: int, warmup: int = 3) -> dict:
    torch.manual_seed(0)
    m = Decoder(layers, hidden, 8, 2048, steps + warmup + 2, device)
    tok = torch.zeros(1, dtype=torch.long).to(device)
    pos = torch.zeros(1, dtype=torch.long).to(device)
    mod = getattr(torch, device.split(":")[0], None)
    sync = (lambda: mod.synchronize()) if device != "cpu" and hasattr(mod, "synchronize") else (lambda: None)
    tokens: list[int] = []
    with torch.no_grad():
        if mode == "graph":
            G = mod.NPUGraph if device.startswith("npu") else mod.CUDAGraph
            graph_ctx = mod.graph
            out = m.step(tok, pos)  # warm up outside the capture (as CUDA graphs need)
            sync()
            g = G()
            with graph_ctx(g):
                out = m.step(tok, pos)

            def one(i: int) -> None:
                pos.fill_(i)
                g.replay()
                tok.copy_(out)
        else:

            def one(i: int) -> None:
                nonlocal tok
                pos.fill_(i)
                tok = m.step(tok, pos)

        for i in range(warmup):
            one(i)
        sync()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            one(i)
        last = int(tok.item())  # reads synchronize
        dt = time.perf_counter() - t0
    tokens.append(last)
    return {
        "device": device,
        "mode": mode,
        "steps": steps,
        "seconds": dt,
        "tokens_per_s": steps / dt,
        "last_token": last,
    }


def eager_client_cost(device: str, n: int = 2000) -> float:
    """Microseconds of host time per small eager op issued without synchronizing."""
    a = torch.ones(64).to(device)
    b = torch.ones(64).to(device)
    for _ in range(50):
        a.add_(b)
    mod = getattr(torch, device.split(":")[0], None)
    if device != "cpu":
        mod.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        a.add_(b)
    dt = time.perf_counter() - t0
    if device != "cpu":
        mod.synchronize()
    return dt / n * 1e6


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="eager", choices=("eager", "graph", "opcost"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    if a.device.startswith("npu"):
        import torch_npu  # noqa: F401  (FlexNPU's under flexnpu run)
    if a.mode == "opcost":
        print(json.dumps({"eager_client_us_per_op": eager_client_cost(a.device)}))
    else:
        print(json.dumps(run(a.device, a.mode, a.steps, a.layers, a.hidden)))
