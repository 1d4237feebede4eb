"""Operator cost model: FLOPs and bytes moved per op, roofline time, online correction.

Two entry points feed the same ``Cost`` record:
- ``aten_cost(op, inputs, outputs, attrs)`` costs one real launch from its aten name and the
  shapes/dtypes of its tensors (what the daemon sees on the wire);
- the ``*_cost`` helpers (matmul, attention, MoE, norms, ...) cost high-level layer pieces for
  the serving model (``flexnpu.sched.models``).

``CostModel`` turns a Cost into seconds on a ``DeviceSpec``: roofline
``max(compute, memory, link) + launches * launch_s``, times a per-op-class correction learnt
online from measured times (bounded EWMA of measured/predicted).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from flexnpu.sched.specs import DeviceSpec, canonical_dtype, dtype_bytes

# Op classes. Matrix-engine classes run on tensor/cube units; the rest on vector units.
GEMM, ATTENTION, MOE = "gemm", "attention", "moe"
ELEMENTWISE, NORM, SOFTMAX, EMBEDDING, COPY, COLLECTIVE, VIEW = (
    "elementwise",
    "norm",
    "softmax",
    "embedding",
    "copy",
    "collective",
    "view",
)
MATRIX_CLASSES = frozenset({GEMM, ATTENTION, MOE})
OP_CLASSES = (GEMM, ATTENTION, MOE, ELEMENTWISE, NORM, SOFTMAX, EMBEDDING, COPY, COLLECTIVE, VIEW)


@dataclass(frozen=True)
class Cost:
    """Work of one kernel (or an aggregate of kernels of one class)."""

    flops: float = 0.0
    bytes: float = 0.0  # device-memory bytes read + written
    link_bytes: float = 0.0  # bytes over the inter-device link (collectives, remote copies)
    op_class: str = ELEMENTWISE
    dtype: str = "bfloat16"
    launches: int = 1

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte (inf for pure compute)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def __add__(self, other: Cost) -> Cost:
        cls = (
            self.op_class
            if self.op_class == other.op_class
            else (self.op_class if self.flops + self.bytes >= other.flops + other.bytes else other.op_class)
        )
        return Cost(
            self.flops + other.flops,
            self.bytes + other.bytes,
            self.link_bytes + other.link_bytes,
            cls,
            self.dtype,
            self.launches + other.launches,
        )

    def scaled(self, k: float, launches: int | None = None) -> Cost:
        return Cost(
            self.flops * k,
            self.bytes * k,
            self.link_bytes * k,
            self.op_class,
            self.dtype,
            self.launches if launches is None else launches,
        )


def total(costs: Iterable[Cost]) -> Cost:
    out: Cost | None = None
    for c in costs:
        out = c if out is None else out + c
    return out if out is not None else Cost(launches=0)


# ---------------------------------------------------------------- high-level pieces


def matmul_cost(
    m: int,
    n: int,
    k: int,
    dtype: str = "bfloat16",
    batch: int = 1,
    bias: bool = False,
    weight_shared: bool = False,
) -> Cost:
    """C[b,m,n] = A[b,m,k] @ B[b,k,n] (+bias). weight_shared: one B for all batches (linear)."""
    e = dtype_bytes(dtype)
    flops = 2.0 * batch * m * n * k + (batch * m * n if bias else 0)
    b_elems = k * n if weight_shared else batch * k * n
    by = e * (batch * m * k + b_elems + batch * m * n + (n if bias else 0))
    return Cost(flops, by, 0.0, GEMM, canonical_dtype(dtype))


def linear_cost(tokens: int, in_f: int, out_f: int, dtype: str = "bfloat16", bias: bool = False) -> Cost:
    return matmul_cost(tokens, out_f, in_f, dtype, bias=bias, weight_shared=True)


def attention_cost(
    batch: int,
    q_len: int,
    kv_len: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: str = "bfloat16",
    causal: bool = True,
    v_head_dim: int | None = None,
    kv_bytes_per_token: float | None = None,
) -> Cost:
    """Fused (flash-style) attention of q_len new queries over kv_len cached keys per sequence.

    Prefill: q_len = prompt chunk, kv_len = tokens before it + chunk, causal.
    Decode: q_len = 1, kv_len = context. Scores are never materialised, so bytes = Q + K + V + O.
    kv_bytes_per_token overrides the K+V bytes per cached token (e.g. MLA's compressed latent).
    """
    e = dtype_bytes(dtype)
    dv = head_dim if v_head_dim is None else v_head_dim
    if causal and q_len > 1:
        # query i (0-based within the chunk) sees kv_len - q_len + i + 1 keys
        visible = (kv_len - q_len) + (q_len + 1) / 2.0
    else:
        visible = float(kv_len)
    flops = 2.0 * batch * n_heads * q_len * visible * (head_dim + dv)
    flops += 5.0 * batch * n_heads * q_len * visible  # online softmax: max, sub, exp, sum, scale
    kv_tok = n_kv_heads * (head_dim + dv) * e if kv_bytes_per_token is None else kv_bytes_per_token
    by = batch * (q_len * n_heads * head_dim * e + kv_len * kv_tok + q_len * n_heads * dv * e)
    return Cost(flops, by, 0.0, ATTENTION, canonical_dtype(dtype))


def expected_distinct_experts(assignments: float, n_experts: int) -> float:
    """Expected number of experts hit by `assignments` uniform random picks (balanced router)."""
    if assignments <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - 1.0 / n_experts) ** assignments)


def moe_cost(
    tokens: int,
    hidden: int,
    inter: int,
    n_experts: int,
    top_k: int,
    dtype: str = "bfloat16",
    gated: bool = True,
    router: bool = True,
) -> Cost:
    """Routed experts: top-k routing, one gated MLP (gate, up, down) GEMM set per hit expert.

    Weights are read once per expert that receives at least one token (a balanced router is
    assumed: the hit count is the expected number of distinct experts among tokens*top_k picks).
    """
    e = dtype_bytes(dtype)
    mats = 3 if gated else 2
    assign = tokens * top_k
    flops = 2.0 * assign * hidden * inter * mats
    hit = expected_distinct_experts(assign, n_experts)
    by = hit * mats * hidden * inter * e
    by += assign * e * (2 * hidden + (mats - 1) * inter + inter)  # x in, inter act, y out
    if router:
        flops += 2.0 * tokens * hidden * n_experts
        by += e * (tokens * hidden + hidden * n_experts + tokens * n_experts)
    return Cost(flops, by, 0.0, MOE, canonical_dtype(dtype))


def elementwise_cost(
    numel: int, n_inputs: int = 1, dtype: str = "bfloat16", flops_per_elem: float = 1.0, n_outputs: int = 1
) -> Cost:
    e = dtype_bytes(dtype)
    return Cost(
        flops_per_elem * numel, e * numel * (n_inputs + n_outputs), 0.0, ELEMENTWISE, canonical_dtype(dtype)
    )


def norm_cost(rows: int, hidden: int, dtype: str = "bfloat16", kind: str = "rms") -> Cost:
    """RMSNorm: square, sum, rsqrt, scale, weight (~4 FLOP/elem). LayerNorm adds mean/bias (~7)."""
    e = dtype_bytes(dtype)
    n = rows * hidden
    per = 4.0 if kind == "rms" else 7.0
    w = hidden * (1 if kind == "rms" else 2)
    return Cost(per * n, e * (2 * n + w), 0.0, NORM, canonical_dtype(dtype))


def softmax_cost(rows: int, cols: int, dtype: str = "bfloat16") -> Cost:
    n = rows * cols
    return Cost(5.0 * n, dtype_bytes(dtype) * 2 * n, 0.0, SOFTMAX, canonical_dtype(dtype))


def embedding_cost(tokens: int, hidden: int, dtype: str = "bfloat16", index_bytes: int = 8) -> Cost:
    e = dtype_bytes(dtype)
    return Cost(0.0, tokens * (2 * hidden * e + index_bytes), 0.0, EMBEDDING, canonical_dtype(dtype))


def copy_cost(nbytes: float, remote: bool = False, dtype: str = "bfloat16") -> Cost:
    """Device-local copy reads and writes nbytes; a remote copy also moves nbytes over the link."""
    if remote:
        return Cost(0.0, float(nbytes), float(nbytes), COPY, canonical_dtype(dtype))
    return Cost(0.0, 2.0 * nbytes, 0.0, COPY, canonical_dtype(dtype))


def collective_cost(kind: str, nbytes: float, n_devices: int, dtype: str = "bfloat16") -> Cost:
    """Bandwidth-optimal ring/pairwise algorithms; nbytes = this device's buffer size.

    all_reduce: 2(n-1)/n * nbytes on the link; all_gather / reduce_scatter: (n-1)/n * nbytes
    (nbytes = the full gathered buffer); all_to_all: (n-1)/n * nbytes.
    """
    n = max(1, n_devices)
    if n == 1:
        return Cost(0.0, 0.0, 0.0, COLLECTIVE, canonical_dtype(dtype), launches=0)
    frac = {
        "all_reduce": 2.0 * (n - 1) / n,
        "all_gather": (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
    }
    if kind not in frac:
        raise ValueError(f"unknown collective {kind!r}; choose from {sorted(frac)}")
    link = frac[kind] * nbytes
    e = dtype_bytes(dtype)
    reduce_flops = (n - 1) / n * nbytes / e if kind in ("all_reduce", "reduce_scatter") else 0.0
    return Cost(reduce_flops, 2.0 * link, link, COLLECTIVE, canonical_dtype(dtype))


# ---------------------------------------------------------------- aten launches


def _shape(t: Any) -> tuple[int, ...] | None:
    if t is None:
        return None
    if isinstance(t, Mapping):
        return tuple(int(x) for x in t["shape"])
    if hasattr(t, "shape"):
        return tuple(int(x) for x in t.shape)
    if isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], (tuple, list)):
        return tuple(int(x) for x in t[0])
    return None


def _dtype(t: Any) -> str:
    if isinstance(t, Mapping):
        return canonical_dtype(t.get("dtype", "float32"))
    if hasattr(t, "dtype"):
        return canonical_dtype(t.dtype)
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return canonical_dtype(t[1])
    return "float32"


def _numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _nbytes(t: Any) -> float:
    s = _shape(t)
    if s is None:
        return 0.0
    try:
        return float(_numel(s) * dtype_bytes(_dtype(t)))
    except ValueError:
        return float(_numel(s) * 4)


_VIEWS = frozenset(
    "view reshape _reshape_alias permute transpose t expand expand_as as_strided "
    "slice select unsqueeze squeeze _unsafe_view detach alias narrow unflatten "
    "flatten view_as split chunk unbind".split()
)
_COPIES = frozenset("copy _copy_from _copy_from_and_resize clone contiguous _to_copy to".split())
_SOFTMAX = frozenset("softmax _softmax log_softmax _log_softmax _safe_softmax".split())
_NORMS = {
    "layer_norm": "layer",
    "native_layer_norm": "layer",
    "rms_norm": "rms",
    "_fused_rms_norm": "rms",
    "npu_rms_norm": "rms",
    "group_norm": "layer",
    "native_group_norm": "layer",
    "batch_norm": "layer",
    "native_batch_norm": "layer",
}
_SDPA = frozenset(
    "scaled_dot_product_attention _scaled_dot_product_flash_attention "
    "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention "
    "_scaled_dot_product_attention_math _scaled_dot_product_fused_attention_overrideable "
    "_scaled_dot_product_flash_attention_for_cpu".split()
)
_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "allreduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "alltoall": "all_to_all",
}
_ZERO_FLOP = frozenset(
    "fill zero zeros empty empty_strided new_empty zeros_like ones_like "
    "full index_select gather scatter cat stack index index_put masked_fill "
    "where".split()
)


# aclnn operators (the native front end, flexnpu/aclnn_api.py) costed as their aten equivalents
_ACLNN_AS_ATEN = {
    "Mm": "mm",
    "Matmul": "matmul",
    "BatchMatMul": "bmm",
    "Addmm": "addmm",
    "InplaceAddmm": "addmm",
    "Baddbmm": "baddbmm",
    "Mv": "mv",
    "Dot": "dot",
}


def normalize_op_name(op: str) -> str:
    """'aten::addmm', 'aten.addmm.default', 'addmm_' -> 'addmm'; 'aclnn::Mm' -> 'mm'."""
    s = op.strip()
    if s.startswith("aclnn::"):
        return _ACLNN_AS_ATEN.get(s[7:], s[7:])
    for pre in ("aten::", "aten.", "torch.ops.aten.", "_c10d_functional.", "c10d::", "npu::", "npu."):
        if s.startswith(pre):
            s = s[len(pre) :]
    if "." in s:
        s = s.split(".", 1)[0]
    if s.endswith("_") and not s.startswith("_") or (s.endswith("_") and s.rstrip("_") in _COPIES):
        s = s.rstrip("_")
    return s


def aten_cost(
    op: str, inputs: Sequence[Any], outputs: Sequence[Any] = (), attrs: Mapping[str, Any] | None = None
) -> Cost:
    """Cost of one aten launch from its name and tensor metadata.

    inputs/outputs: tensors, or anything with .shape/.dtype, or (shape, dtype) pairs, or
    {"shape":..., "dtype":...}; non-tensor arguments may be passed as None. attrs: keyword
    attributes (is_causal, group_size for collectives, ...). Unknown ops are costed as
    elementwise over their tensors (read all inputs, write all outputs, 1 FLOP per output element).
    """
    attrs = dict(attrs or {})
    name = normalize_op_name(op)
    ins = [t for t in inputs if _shape(t) is not None]
    outs = [t for t in outputs if _shape(t) is not None]
    dt = _dtype(outs[0]) if outs else (_dtype(ins[0]) if ins else "float32")
    io_bytes = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
    out_numel = sum(_numel(_shape(t)) for t in outs)

    if name in _VIEWS:
        return Cost(0.0, 0.0, 0.0, VIEW, dt, launches=0)
    if name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "addmv", "mv", "dot"):
        if name in ("addmm", "baddbmm", "addbmm", "addmv"):
            mats = ins[1:3]
        elif name == "linear":
            mats = ins[0:2]
        else:
            mats = ins[0:2]
        if len(mats) < 2:
            raise ValueError(f"{op}: expected two matrix operands, got {len(mats)} tensors")
        a = _shape(mats[0])
        assert a is not None  # `ins` holds only tensors that have a shape
        k = a[-1] if a else 1
        if out_numel == 0:  # outputs not given: infer numel from operands
            b = _shape(mats[1])
            assert b is not None
            if name == "linear":
                out_numel = _numel(a[:-1]) * b[0]
            else:
                batch = _numel(a[:-2]) if len(a) > 2 else 1
                out_numel = batch * (a[-2] if len(a) > 1 else 1) * (b[-1] if len(b) > 1 else 1)
            io_bytes += out_numel * dtype_bytes(dt)
        flops = 2.0 * out_numel * k + (
            out_numel
            if name in ("addmm", "baddbmm", "addbmm", "addmv") or (name == "linear" and len(ins) > 2)
            else 0
        )
        return Cost(flops, io_bytes, 0.0, GEMM, dt)
    if name in _SDPA or name in (
        "npu_fusion_attention",
        "npu_prompt_flash_attention",
        "npu_incre_flash_attention",
        "npu_fused_infer_attention_score",
    ):
        qs, ks, vs = (_shape(t) for t in ins[:3])
        assert qs is not None and ks is not None  # `ins` holds only tensors that have a shape
        if len(qs) != 4 or len(ks) != 4:
            raise ValueError(f"{op}: expected 4-D (batch, heads, seq, dim) q/k/v, got {qs}, {ks}")
        batch, h, L, d = qs
        hk, S = ks[1], ks[2]
        dv = vs[3] if vs and len(vs) == 4 else d
        causal = bool(attrs.get("is_causal", False))
        c = attention_cost(batch, L, S, h, hk, d, dt, causal=causal, v_head_dim=dv)
        # use the real tensor bytes when given (strided / padded caches)
        return Cost(c.flops, max(c.bytes, io_bytes), 0.0, ATTENTION, dt)
    if name in _SOFTMAX:
        n = _numel(_shape(ins[0])) if ins else out_numel
        return Cost(5.0 * n, io_bytes or 2.0 * n * dtype_bytes(dt), 0.0, SOFTMAX, dt)
    if name in _NORMS:
        n = _numel(_shape(ins[0])) if ins else out_numel
        per = 4.0 if _NORMS[name] == "rms" else 7.0
        return Cost(per * n, io_bytes, 0.0, NORM, dt)
    if name in ("embedding", "embedding_bag"):
        w = ins[0]
        ws = _shape(w)
        assert ws is not None  # `ins` holds only tensors that have a shape
        e = dtype_bytes(_dtype(w))
        rows = out_numel // max(1, ws[-1]) if outs else _numel(_shape(ins[1]))
        by = 2.0 * rows * ws[-1] * e + (_nbytes(ins[1]) if len(ins) > 1 else 0)
        return Cost(0.0, by, 0.0, EMBEDDING, _dtype(w))
    if name in _COPIES:
        src = ins[-1] if name in ("copy", "_copy_from", "_copy_from_and_resize") else ins[0]
        nb = _nbytes(src)
        remote = bool(attrs.get("cross_device", False))
        return copy_cost(nb, remote=remote, dtype=dt)
    if name in _COLLECTIVES:
        n = int(attrs.get("group_size", attrs.get("world_size", 1)))
        nb = _nbytes(ins[0]) if ins else _nbytes(outs[0])
        if _COLLECTIVES[name] == "all_gather" and outs:
            nb = _nbytes(outs[0])
        return collective_cost(_COLLECTIVES[name], nb, n, dt)
    flops = (
        0.0 if name in _ZERO_FLOP else float(max(out_numel, max((_numel(_shape(t)) for t in ins), default=0)))
    )
    return Cost(flops, io_bytes, 0.0, ELEMENTWISE, dt)


# ---------------------------------------------------------------- roofline + correction


class Corrections:
    """Per-op-class multiplicative correction, measured/predicted, learnt online.

    EWMA in log space (so over- and under-prediction are symmetric), each observation's ratio
    clipped to [1/max_ratio, max_ratio] so one outlier (a page fault, a preemption) cannot
    wreck the model, and the factor itself bounded to the same range. Thread-safe.
    """

    def __init__(
        self,
        alpha: float = 0.2,
        max_ratio: float = 16.0,
        factors: Mapping[str, float] | None = None,
        counts: Mapping[str, int] | None = None,
    ):
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha, self.max_ratio = alpha, max_ratio
        self._log = {k: math.log(self._clip(v)) for k, v in (factors or {}).items()}
        self._n = dict(counts or {})
        self._lock = threading.Lock()

    def _clip(self, r: float) -> float:
        return min(self.max_ratio, max(1.0 / self.max_ratio, r))

    def factor(self, op_class: str) -> float:
        return math.exp(self._log.get(op_class, 0.0))

    def count(self, op_class: str) -> int:
        return self._n.get(op_class, 0)

    def observe(self, op_class: str, measured_s: float, predicted_s: float) -> float:
        if not (measured_s > 0 and predicted_s > 0 and math.isfinite(measured_s)):
            return self.factor(op_class)
        lr = math.log(self._clip(measured_s / predicted_s))
        with self._lock:
            n = self._n.get(op_class, 0)
            # first observations weigh more so a fresh model converges quickly
            a = max(self.alpha, 1.0 / (n + 1))
            cur = self._log.get(op_class, 0.0)
            self._log[op_class] = max(
                -math.log(self.max_ratio), min(math.log(self.max_ratio), (1 - a) * cur + a * lr)
            )
            self._n[op_class] = n + 1
            return math.exp(self._log[op_class])

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "max_ratio": self.max_ratio,
            "factors": {k: math.exp(v) for k, v in sorted(self._log.items())},
            "counts": dict(sorted(self._n.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Corrections:
        return cls(
            float(d.get("alpha", 0.2)),
            float(d.get("max_ratio", 16.0)),
            {k: float(v) for k, v in d.get("factors", {}).items()},
            {k: int(v) for k, v in d.get("counts", {}).items()},
        )


def default_corrections_path(spec_name: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexnpu"
    return base / f"corrections-{spec_name}.json"


def load_corrections(path: str | os.PathLike) -> Corrections:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return Corrections.from_dict(d.get("corrections", d))


class CostModel:
    """Roofline timing of Costs on one DeviceSpec, with online correction."""

    def __init__(self, spec: DeviceSpec, corrections: Corrections | None = None):
        self.spec = spec
        self.corrections = corrections or Corrections()

    def work(self, cost: Cost) -> tuple[float, float, float]:
        """(compute_s, memory_s, link_s): seconds each resource needs at full, achievable rate."""
        s = self.spec
        if cost.op_class in MATRIX_CLASSES:
            rate = s.flops(cost.dtype) * s.gemm_eff
        else:  # vector units: the non-tensor fp32 rate
            rate = s.flops("float32") * s.gemm_eff
        comp = cost.flops / rate if cost.flops else 0.0
        mem = cost.bytes / (s.hbm_bw * s.bw_eff) if cost.bytes else 0.0
        link = cost.link_bytes / (s.link_bw * s.link_eff) if cost.link_bytes else 0.0
        return comp, mem, link

    def roofline(self, cost: Cost) -> float:
        """Uncorrected solo time: max(compute, memory, link) + launch overhead."""
        return max(self.work(cost)) + cost.launches * self.spec.launch_s

    def predict(self, cost: Cost) -> float:
        """Corrected solo time of the kernel on an otherwise idle device."""
        return self.roofline(cost) * self.corrections.factor(cost.op_class)

    def observe(self, cost: Cost, measured_s: float) -> float:
        """Feed a measured execution time back; returns the class's new correction factor."""
        return self.corrections.observe(cost.op_class, measured_s, self.roofline(cost))

    def is_compute_bound(self, cost: Cost) -> bool:
        c, m, _ = self.work(cost)
        return c >= m
