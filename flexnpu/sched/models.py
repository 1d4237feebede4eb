"""Model shapes for the serving study and the per-iteration kernels they launch.

An engine iteration (a batch of prefill chunks and/or decode tokens) becomes a short list of
aggregated kernels: for each of ``slices`` groups of layers, one "dense" kernel (norms,
projections, MLP / MoE, residuals) and one "attention" kernel, then the LM head. Aggregating
same-class work of identical layers keeps every kernel's roofline exact (all layers in a group
have the same compute:memory ratio), while keeping dense and attention work separate keeps the
serialisation of a compute-bound GEMM and a memory-bound KV read that a mixed batch really has.
One launch per aggregated kernel models graph mode (ACL graph / CUDA graph replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

from flexnpu.sched.costmodel import (
    ATTENTION,
    GEMM,
    MOE,
    Cost,
    attention_cost,
    collective_cost,
    elementwise_cost,
    embedding_cost,
    linear_cost,
    moe_cost,
    norm_cost,
    total,
)
from flexnpu.sched.specs import dtype_bytes


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act_dtype: str = "bfloat16"  # activations and KV cache
    weight_dtype: str = "bfloat16"  # GEMM weights (int8 = W8A8 GEMMs)
    qkv_bias: bool = False
    # MoE (DeepSeek-V3 style); n_experts == 0 means dense
    n_experts: int = 0
    top_k: int = 0
    n_shared: int = 0
    moe_inter: int = 0
    first_dense: int = 0
    ep: int = 1  # expert-parallel degree (experts spread over ep devices)
    # MLA (multi-head latent attention)
    mla: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token per device (all layers)."""
        e = dtype_bytes(self.act_dtype)
        per_layer = (
            (self.kv_lora_rank + self.rope_dim) * e if self.mla else 2 * self.n_kv_heads * self.head_dim * e
        )
        return self.n_layers * per_layer

    def _attn_params(self) -> float:
        h, d = self.hidden, self.head_dim
        if self.mla:
            qk = self.head_dim + self.rope_dim
            return (
                h * self.q_lora_rank
                + self.q_lora_rank * self.n_heads * qk
                + h * (self.kv_lora_rank + self.rope_dim)
                + self.kv_lora_rank * self.n_heads * (self.head_dim + self.v_head_dim)
                + self.n_heads * self.v_head_dim * h
            )
        return h * (self.n_heads + 2 * self.n_kv_heads) * d + self.n_heads * d * h

    def weight_bytes_per_device(self) -> float:
        """Weights resident on one device (experts split over `ep` devices, the rest replicated)."""
        w = dtype_bytes(self.weight_dtype)
        p = 2 * self.vocab * self.hidden + self.n_layers * self._attn_params()
        if self.n_experts:
            moe_layers = self.n_layers - self.first_dense
            p += self.first_dense * 3 * self.hidden * self.intermediate
            p += moe_layers * (
                self.n_shared * 3 * self.hidden * self.moe_inter
                + self.hidden * self.n_experts
                + self.n_experts / self.ep * 3 * self.hidden * self.moe_inter
            )
        else:
            p += self.n_layers * 3 * self.hidden * self.intermediate
        return p * w

    def kv_capacity_tokens(
        self, mem_bytes: float, usable: float = 0.9, activation_reserve: float = 4 * 2**30
    ) -> int:
        free = mem_bytes * usable - self.weight_bytes_per_device() - activation_reserve
        if free <= 0:
            raise ValueError(
                f"{self.name} does not fit: weights {self.weight_bytes_per_device() / 2**30:.1f} GiB "
                f"on a {mem_bytes / 2**30:.0f} GiB device"
            )
        return int(free // self.kv_bytes_per_token)


# Qwen2.5-7B-Instruct config.json: hidden_size 3584, num_hidden_layers 28, num_attention_heads
# 28, num_key_value_heads 4, intermediate_size 18944, vocab_size 152064, head_dim 3584/28 = 128,
# QKV projections with bias, untied embeddings; bf16.
QWEN25_7B = ModelShape(
    "qwen2.5-7b",
    n_layers=28,
    hidden=3584,
    n_heads=28,
    n_kv_heads=4,
    head_dim=128,
    intermediate=18944,
    vocab=152064,
    qkv_bias=True,
)

# DeepSeek-V3 / R1 config.json: hidden 7168, 61 layers (first_k_dense_replace 3, dense
# intermediate 18432), 128 heads, MLA q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128,
# qk_rope_head_dim 64, v_head_dim 128; 256 routed experts, 8 per token, 1 shared, moe
# intermediate 2048, vocab 129280. Approximations (documented in docs/scheduling.md): W8A8 INT8
# GEMMs as in Huawei's CloudMatrix-Infer deployment, bf16 MLA latent KV cache, balanced router,
# data-parallel attention with expert parallelism over ep=16 devices (all-to-all dispatch and
# combine over the scale-up link), MTP/speculative decoding ignored, lock-step imbalance ignored.
DEEPSEEK_V3 = ModelShape(
    "deepseek-r1",
    n_layers=61,
    hidden=7168,
    n_heads=128,
    n_kv_heads=1,
    head_dim=128,
    intermediate=18432,
    vocab=129280,
    weight_dtype="int8",
    n_experts=256,
    top_k=8,
    n_shared=1,
    moe_inter=2048,
    first_dense=3,
    ep=16,
    mla=True,
    q_lora_rank=1536,
    kv_lora_rank=512,
    rope_dim=64,
    v_head_dim=128,
)

MODELS = {"qwen2.5-7b": QWEN25_7B, "deepseek-r1": DEEPSEEK_V3}


def _attn_kernel(m: ModelShape, chunks: Sequence[tuple[int, int]], decode_ctx: Sequence[int]) -> Cost:
    """One layer's attention: prefill chunks (q_len, tokens already cached) and decode tokens."""
    parts = []
    a = m.act_dtype
    for q, before in chunks:
        if m.mla:  # prefill: naive MLA (decompress K/V from the latent), 128 heads x (192 | 128)
            parts.append(
                attention_cost(
                    1,
                    q,
                    before + q,
                    m.n_heads,
                    m.n_heads,
                    m.head_dim + m.rope_dim,
                    a,
                    causal=True,
                    v_head_dim=m.v_head_dim,
                    kv_bytes_per_token=(m.kv_lora_rank + m.rope_dim) * dtype_bytes(a),
                )
            )
        else:
            parts.append(
                attention_cost(1, q, before + q, m.n_heads, m.n_kv_heads, m.head_dim, a, causal=True)
            )
    if decode_ctx:
        n = len(decode_ctx)
        mean_ctx = max(1, round(sum(decode_ctx) / n))
        if m.mla:  # decode: absorbed MLA, all heads attend the shared 576-wide latent (MQA-like)
            parts.append(
                attention_cost(
                    n,
                    1,
                    mean_ctx,
                    m.n_heads,
                    1,
                    m.kv_lora_rank + m.rope_dim,
                    a,
                    causal=False,
                    v_head_dim=m.kv_lora_rank,
                )
            )
        else:
            parts.append(attention_cost(n, 1, mean_ctx, m.n_heads, m.n_kv_heads, m.head_dim, a, causal=False))
    c = total(parts)
    return Cost(c.flops, c.bytes, 0.0, ATTENTION, a, launches=1)


def _dense_kernel(
    m: ModelShape, tokens: int, chunks: Sequence[tuple[int, int]], n_decode: int, moe_layer: bool
) -> Cost:
    """One layer's non-attention work for `tokens` tokens."""
    w, a, h = m.weight_dtype, m.act_dtype, m.hidden
    parts = [
        norm_cost(tokens, h, a),
        norm_cost(tokens, h, a),
        elementwise_cost(tokens * h, 2, a),
        elementwise_cost(tokens * h, 2, a),
    ]
    if m.mla:
        qk = m.head_dim + m.rope_dim
        parts += [
            linear_cost(tokens, h, m.q_lora_rank, w),
            norm_cost(tokens, m.q_lora_rank, a),
            linear_cost(tokens, m.q_lora_rank, m.n_heads * qk, w),
            linear_cost(tokens, h, m.kv_lora_rank + m.rope_dim, w),
            linear_cost(tokens, m.n_heads * m.v_head_dim, h, w),
        ]
        prefill_kv = sum(before + q for q, before in chunks)
        if prefill_kv:  # decompress K/V for the prefill chunks' full context
            parts.append(linear_cost(prefill_kv, m.kv_lora_rank, m.n_heads * (m.head_dim + m.v_head_dim), w))
        if n_decode:  # absorbed W_UK / W_UV per head
            parts.append(linear_cost(n_decode * m.n_heads, m.head_dim, m.kv_lora_rank, w))
            parts.append(linear_cost(n_decode * m.n_heads, m.kv_lora_rank, m.v_head_dim, w))
    else:
        parts += [
            linear_cost(tokens, h, (m.n_heads + 2 * m.n_kv_heads) * m.head_dim, w, bias=m.qkv_bias),
            elementwise_cost(tokens * (m.n_heads + m.n_kv_heads) * m.head_dim, 2, a, 4.0),  # RoPE
            linear_cost(tokens, m.n_heads * m.head_dim, h, w),
        ]
    if moe_layer:
        parts.append(linear_cost(tokens, h, m.n_experts, w))  # router
        parts.append(moe_cost(tokens, h, m.moe_inter, max(1, m.n_experts // m.ep), m.top_k, w, router=False))
        parts.append(linear_cost(tokens, h, 2 * m.n_shared * m.moe_inter, w))
        parts.append(linear_cost(tokens, m.n_shared * m.moe_inter, h, w))
        # dispatch + combine: each token's hidden state to its top_k experts and back
        parts.append(collective_cost("all_to_all", tokens * m.top_k * h * dtype_bytes(w), m.ep, w))
        parts.append(collective_cost("all_to_all", tokens * m.top_k * h * dtype_bytes(a), m.ep, a))
    else:
        inter = m.intermediate
        parts += [
            linear_cost(tokens, h, 2 * inter, w),
            elementwise_cost(tokens * inter, 2, a, 5.0),
            linear_cost(tokens, inter, h, w),
        ]
    c = total(parts)
    return Cost(c.flops, c.bytes, c.link_bytes, MOE if moe_layer else GEMM, w, launches=1)


def step_kernels(
    m: ModelShape,
    chunks: Sequence[tuple[int, int]] = (),
    decode_ctx: Sequence[int] = (),
    slices: int = 2,
    logits_rows: int | None = None,
) -> list[Cost]:
    """Kernels of one engine iteration.

    chunks: prefill pieces as (chunk tokens, tokens of the same prompt already cached);
    decode_ctx: context length of each decoding sequence (one new token each);
    logits_rows: rows through the LM head (default: decodes + chunks).
    """
    tokens = sum(q for q, _ in chunks) + len(decode_ctx)
    if tokens == 0:
        return []
    n_dec = len(decode_ctx)
    attn = _attn_kernel(m, chunks, decode_ctx)
    dense = _dense_kernel(m, tokens, chunks, n_dec, moe_layer=False)
    moe = _dense_kernel(m, tokens, chunks, n_dec, moe_layer=True) if m.n_experts else None
    n_moe = m.n_layers - m.first_dense if m.n_experts else 0
    n_dense = m.n_layers - n_moe
    out: list[Cost] = []
    slices = max(1, min(slices, m.n_layers))
    for s in range(slices):
        lo, hi = s * m.n_layers // slices, (s + 1) * m.n_layers // slices
        nl = hi - lo
        nd = max(0, min(hi, n_dense) - lo)
        nm = nl - nd
        body = [dense.scaled(nd, 1)] if nd else []
        if nm:
            assert moe is not None  # nm > 0 only for MoE models
            body.append(moe.scaled(nm, 1))
        b = total(body)
        out.append(Cost(b.flops, b.bytes, b.link_bytes, b.op_class, b.dtype, 1))
        out.append(attn.scaled(nl, 1))
    rows = (n_dec + len(chunks)) if logits_rows is None else logits_rows
    head = total(
        [
            embedding_cost(tokens, m.hidden, m.act_dtype),
            norm_cost(rows, m.hidden, m.act_dtype),
            linear_cost(rows, m.hidden, m.vocab, m.weight_dtype),
        ]
    )
    out.append(Cost(head.flops, head.bytes, 0.0, GEMM, m.weight_dtype, 1))
    return out
