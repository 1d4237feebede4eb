"""Operator names and the rules deciding which aten operators a client may run on the daemon.

One source of truth for the hook (flexnpu/hook/tensor.py), the torch backends
(flexnpu/daemon/backends/torch_exec.py) and the emulated backend (emu.py). Imports only torch and
flexnpu.protocol, so every side can use it.

The daemon runs an operator only if it is on the ALLOW list, and every entry there is classified:

* ``PLAIN``: no index inputs. The operator touches only the tensors it is given, at positions
  fixed by their shapes; the daemon's view bounds checks (every view inside its allocation, over
  a non-resizable storage) plus torch's own host-side shape checks keep it in bounds on every
  device.
* ``INDEXED``: some tensor argument holds *positions* (gather/scatter/index/embedding/loss
  targets ...). Kernels trust those values (on a GPU/NPU an out-of-range index is a device fault
  that kills the context of every client; some cpu kernels write out of bounds), so the daemon
  checks the range of every index tensor before the operator is launched (``check_indices``).
* everything else is refused: not listed (a deny list cannot keep up with aten), and in
  particular ``REFUSED`` (files, printing, process-global state, raw memory layout, resizing),
  which the hook does not even run on the host.

Operators that draw random numbers are listed where they are otherwise safe but refused on
backends that compute values (they would use the daemon's generator: results would not follow the
app's seed and clients would shift each other's draws); the hook runs them on the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterable

import torch

from ..protocol import TensorRef

__all__ = [
    "PLAIN",
    "INDEXED",
    "Rule",
    "ALLOW",
    "REFUSED",
    "UNINITIALIZED",
    "OpRefused",
    "parse_op_name",
    "resolve",
    "rule_of",
    "is_allowed",
    "host_fallback_ok",
    "check_indices",
    "bind_args",
    "tensor_refs",
]

PLAIN, INDEXED = "plain", "indexed"

_OP_NAME = re.compile(r"^aten::([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?$")


class OpRefused(ValueError):
    """An operator name that is malformed, unknown, or not allowed; the message says which."""


def parse_op_name(op: str) -> tuple[str, str]:
    """'aten::add.Tensor' -> ('add', 'Tensor'); overload defaults to 'default'."""
    m = _OP_NAME.match(op) if isinstance(op, str) and len(op) < 200 else None
    if m is None:
        raise OpRefused(f"malformed operator name {op!r} (expected 'aten::name.overload')")
    name, overload = m.group(1), m.group(2) or "default"
    if name.startswith("__") or overload.startswith("__"):
        raise OpRefused(f"malformed operator name {op!r}")
    return name, overload


# ---------------------------------------------------------------------------------------------
# index validation

IndexCheck = Callable[[dict], Iterable[tuple[Any, int, bool, str]]]
"""bound arguments -> (index tensor, size of the indexed extent, negatives wrap?, what)."""


@dataclass(frozen=True)
class Rule:
    kind: str  # PLAIN or INDEXED
    indices: IndexCheck | None = None  # INDEXED: yields every index tensor with its valid range


class IndexOutOfRange(IndexError):
    pass


def _dim_size(t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0:
        return 1  # torch treats a 0-d tensor as having one dimension of size 1 here
    if not -t.dim() <= dim < t.dim():
        raise IndexOutOfRange(f"dimension {dim} out of range for a {t.dim()}-d tensor")
    return t.size(dim)


def _along_dim(self_arg: str = "self", index_arg: str = "index", wrap: bool = False) -> IndexCheck:
    def check(b: dict):
        t = b[self_arg]
        yield b[index_arg], _dim_size(t, b["dim"]), wrap, f"{index_arg} (dimension {b['dim']})"

    return check


def _flat(index_arg: str = "index") -> IndexCheck:
    def check(b: dict):
        yield b[index_arg], b["self"].numel(), True, index_arg

    return check


def _advanced(b: dict):
    """x[i0, i1, ...]: integer index k indexes the dimension it lands on; masks consume mask.dim()."""
    t, d = b["self"], 0
    for idx in b["indices"]:
        if idx is None:
            d += 1
            continue
        if idx.dtype in (torch.bool, torch.uint8):
            d += idx.dim()  # a mask consumes its own dims (0-d: none); torch checks its shape
            continue
        if d >= t.dim():
            raise IndexOutOfRange(f"too many indices for a {t.dim()}-d tensor")
        yield idx, t.size(d), True, f"indices[{d}]"
        d += 1


def _embedding(b: dict):
    yield b["indices"], b["weight"].size(0) if b["weight"].dim() else 0, False, "indices"


def _embedding_backward(b: dict):
    yield b["indices"], int(b["num_weights"]), False, "indices"


def _embedding_renorm(b: dict):
    yield b["indices"], b["self"].size(0) if b["self"].dim() else 0, False, "indices"


def _classes(b: dict, class_dim: int) -> int:
    x = b["self"]
    return x.size(0) if x.dim() == 1 else x.size(class_dim)


def _nll(class_dim: int) -> IndexCheck:
    def check(b: dict):
        tgt = b["target"]
        ign = int(b.get("ignore_index", -100))
        # ignore_index entries are skipped by the kernel; every other target must name a class
        tgt = torch.where(tgt == ign, torch.zeros((), dtype=tgt.dtype, device=tgt.device), tgt)
        yield tgt, _classes(b, class_dim), False, "target"

    return check


def _max_pool_backward(spatial: int) -> IndexCheck:
    def check(b: dict):
        x = b["self"]
        n = 1
        for s in x.shape[-spatial:]:
            n *= s
        yield b["indices"], n, False, "indices"

    return check


def _targets(class_dim: int) -> IndexCheck:
    def check(b: dict):
        yield b["target"], _classes(b, class_dim), False, "target"

    return check


def _multilabel_targets(b: dict):
    # class indices, -1 ends a row's list: valid -1..C-1, checked as target+1 in 0..C
    tgt = b["target"]
    yield tgt + 1, _classes(b, 1) + 1, False, "target (+1)"


def _unpool(b: dict):
    n = 1
    for s in b["output_size"]:
        n *= int(s)
    yield b["indices"], n, False, "indices"


def _masked_scatter(b: dict):
    # the kernel reads one source element per True in the (broadcast) mask
    x, mask, src = b["self"], b["mask"], b["source"]
    count = torch.broadcast_to(mask, x.shape).sum()
    yield count.reshape(1), src.numel() + 1, False, "mask (count of True entries vs source elements)"


def bind_args(opov: Any, args: tuple, kwargs: dict) -> dict:
    """Arguments by schema name (defaults filled in)."""
    out: dict = {}
    schema_args = opov._schema.arguments
    for i, a in enumerate(schema_args):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def check_indices(rule: Rule, opov: Any, args: tuple, kwargs: dict) -> None:
    """Raise IndexError unless every index tensor of this launch is in range. Call with the
    tensors the operator will run on, before launching it (reads one min/max per index tensor;
    on a GPU/NPU that synchronizes with the stream, which is the price of not faulting)."""
    if rule.indices is None:
        return
    for idx, size, wrap, what in index_args(rule, opov, args, kwargs):
        check_index_range(opov._schema.name, idx, size, wrap, what)


def index_args(rule: Rule, opov: Any, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, int, bool, str]]:
    """The index tensors of a launch whose values need a range check: (tensor, size of the
    indexed dimension, negative indices allowed, what it is)."""
    if rule.indices is None:
        return []
    out = []
    for idx, size, wrap, what in rule.indices(bind_args(opov, args, kwargs)):
        if not isinstance(idx, torch.Tensor) or idx.numel() == 0:
            continue
        if idx.is_floating_point() or idx.is_complex():
            continue  # the kernel refuses non-integer indices itself
        if idx.dtype == torch.bool:
            continue  # masks: shape-checked by torch
        out.append((idx, size, wrap, what))
    return out


def check_index_range(name: str, idx: torch.Tensor, size: int, wrap: bool, what: str) -> None:
    """Raise IndexOutOfRange unless every value of the integer tensor `idx` indexes a dimension
    of `size` (from -size when `wrap`)."""
    if idx.numel() == 1:  # a decode step's position: one read, no reduction
        lo = hi = int(idx.item())
    else:
        lo_hi = torch.aminmax(idx.reshape(-1))
        lo, hi = int(lo_hi.min.item()), int(lo_hi.max.item())
    low = -size if wrap else 0
    if lo < low or hi >= size:
        bad = lo if lo < low else hi
        raise IndexOutOfRange(
            f"{name}: {what} holds {bad}, out of range for size {size} (valid: {low}..{size - 1})"
        )


# ---------------------------------------------------------------------------------------------
# the allow list

_P = Rule(PLAIN)


def _names(s: str) -> list[str]:
    return s.split()


# Elementwise (torch.Tag.pointwise, listed explicitly so a torch upgrade cannot widen the list).
_POINTWISE = _names("""
abs acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_left_shift
bitwise_not bitwise_or bitwise_right_shift bitwise_xor ceil celu clamp clamp_max clamp_min clip clone
conj_physical copysign cos cosh deg2rad digamma div elu eq erf erfc erfinv exp exp2 expm1 float_power
floor fmax fmin fmod frac frexp gcd ge gelu gelu_backward gt hardshrink hardsigmoid hardtanh heaviside
hypot i0 igamma igammac isfinite isinf isnan isneginf isposinf lcm ldexp le leaky_relu lerp lgamma log
log10 log1p log2 logaddexp logaddexp2 logical_and logical_not logical_or logical_xor logit
logit_backward lt masked_fill max maximum min minimum mish mul mvlgamma nan_to_num native_dropout_backward
ne neg nextafter polygamma positive pow rad2deg reciprocal relu relu6 remainder round rsqrt rsub selu sgn
sigmoid sigmoid_backward sign signbit silu silu_backward sin sinc sinh softplus softshrink sqrt square
sub tan tanh tanh_backward threshold threshold_backward true_divide trunc where xlogy
special_airy_ai special_bessel_j0 special_bessel_j1 special_bessel_y0 special_bessel_y1
special_chebyshev_polynomial_t special_chebyshev_polynomial_u special_chebyshev_polynomial_v
special_chebyshev_polynomial_w special_entr special_erfcx special_hermite_polynomial_h
special_hermite_polynomial_he special_i0e special_i1 special_i1e special_laguerre_polynomial_l
special_legendre_polynomial_p special_log_ndtr special_modified_bessel_i0 special_modified_bessel_i1
special_modified_bessel_k0 special_modified_bessel_k1 special_ndtri special_scaled_modified_bessel_k0
special_scaled_modified_bessel_k1 special_shifted_chebyshev_polynomial_t
special_shifted_chebyshev_polynomial_u special_shifted_chebyshev_polynomial_v
special_shifted_chebyshev_polynomial_w special_spherical_bessel_j0 special_xlog1py special_zeta
floor_divide complex polar _conj_physical
""")

_OTHER_PLAIN = _names("""
fill fill_ zero_ copy_ _to_copy _copy_from _local_scalar_dense
full full_like zeros zeros_like ones ones_like scalar_tensor arange linspace logspace eye
empty empty_like empty_strided new_empty new_empty_strided new_zeros new_ones new_full empty_permuted
cat stack hstack vstack repeat roll flip tril triu tril_indices triu_indices diag_embed
constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
replication_pad3d reflection_pad1d_backward reflection_pad2d_backward replication_pad1d_backward
replication_pad2d_backward
_unsafe_view view_copy expand_copy permute_copy slice_copy select_copy transpose_copy t_copy
unsqueeze_copy squeeze_copy detach_copy alias_copy diagonal_copy unfold_copy narrow_copy
split_copy split_with_sizes_copy unbind_copy unsafe_split unsafe_split_with_sizes unsafe_chunk
type_as lift lift_fresh_copy alias detach
view t transpose permute expand select slice squeeze unsqueeze split split_with_sizes chunk unbind
narrow diagonal unfold view_as_real view_as_complex _conj _neg_view real imag movedim
slice_backward select_backward diagonal_backward unfold_backward
slice_scatter select_scatter diagonal_scatter
sum mean prod amax amin argmax argmin all any std var std_mean var_mean norm linalg_vector_norm
logsumexp cumsum cumprod cummax cummin logcumsumexp count_nonzero aminmax nansum median nanmedian
kthvalue topk sort argsort mode
mm bmm addmm addmv addbmm baddbmm mv dot vdot _addmm_activation addr outer trace
matmul linear layer_norm rms_norm group_norm softmax log_softmax scaled_dot_product_attention
isin bucketize searchsorted clamp_min_ lerp_
_softmax _log_softmax _softmax_backward_data _log_softmax_backward_data _safe_softmax
native_layer_norm native_layer_norm_backward native_group_norm native_group_norm_backward
native_batch_norm native_batch_norm_backward _native_batch_norm_legit
_native_batch_norm_legit_no_training _native_batch_norm_legit_functional batch_norm_backward
_fused_rms_norm _fused_rms_norm_backward
convolution convolution_backward _convolution
max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool2d_backward avg_pool3d
avg_pool3d_backward _adaptive_avg_pool2d _adaptive_avg_pool2d_backward _adaptive_avg_pool3d
_adaptive_avg_pool3d_backward adaptive_max_pool2d
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d
upsample_linear1d upsample_trilinear3d upsample_nearest1d_backward upsample_nearest2d_backward
upsample_bilinear2d_backward _upsample_nearest_exact2d
im2col col2im pixel_shuffle pixel_unshuffle channel_shuffle
mse_loss mse_loss_backward l1_loss smooth_l1_loss smooth_l1_loss_backward huber_loss huber_loss_backward
binary_cross_entropy binary_cross_entropy_backward binary_cross_entropy_with_logits
soft_margin_loss soft_margin_loss_backward kl_div
hardtanh_backward leaky_relu_backward elu_backward softplus_backward mish_backward hardsigmoid_backward
hardswish hardswish_backward glu glu_backward log_sigmoid_forward log_sigmoid_backward
_prelu_kernel _prelu_kernel_backward gelu_ silu_ relu_ sigmoid_ tanh_
_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_flash_attention_for_cpu_backward
_scaled_dot_product_efficient_attention _scaled_dot_product_efficient_attention_backward
_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_backward
_scaled_dot_product_cudnn_attention _scaled_dot_product_cudnn_attention_backward
_scaled_dot_product_fused_attention_overrideable native_dropout
_batch_norm_with_update _batch_norm_with_update_functional _batch_norm_no_update
rot90 block_diag _chunk_cat dist renorm _cdist_forward _cdist_backward _pdist_forward _trilinear
_upsample_bilinear2d_aa _upsample_nearest_exact1d _upsample_nearest_exact3d adaptive_max_pool3d
grid_sampler_2d grid_sampler_3d grid_sampler_2d_backward grid_sampler_3d_backward
linalg_cholesky_ex linalg_inv_ex _linalg_det _linalg_slogdet _linalg_eigh _linalg_svd linalg_qr
_linalg_solve_ex linalg_lstsq linalg_eig linalg_lu_factor_ex linalg_lu linalg_solve_triangular
linalg_matrix_exp triangular_solve cholesky cholesky_solve cholesky_inverse geqrf ormqr
linalg_householder_product linalg_cross linalg_pinv _linalg_check_errors
_foreach_add _foreach_sub _foreach_mul _foreach_div _foreach_addcdiv _foreach_addcmul _foreach_lerp
_foreach_sqrt _foreach_neg _foreach_maximum _foreach_minimum _foreach_clamp_min _foreach_clamp_max
_foreach_norm _foreach_zero _foreach_pow _foreach_reciprocal _foreach_sign _foreach_abs _foreach_exp
_foreach_log _foreach_max
""")

# name -> how to find the index tensors of a launch (bound by schema argument names).
_INDEXED: dict[str, IndexCheck] = {
    "index": _advanced,
    "_unsafe_index": _advanced,
    "index_put": _advanced,
    "_unsafe_index_put": _advanced,
    "_index_put_impl": _advanced,
    "index_select": _along_dim(),
    "gather": _along_dim(),
    "scatter": _along_dim(),
    "scatter_add": _along_dim(),
    "scatter_reduce": _along_dim(),
    "index_add": _along_dim(),
    "index_copy": _along_dim(),
    "index_reduce": _along_dim(),
    "index_fill": _along_dim(wrap=True),
    "take": _flat(),
    "put": _flat(),
    "embedding": _embedding,
    "embedding_dense_backward": _embedding_backward,
    "embedding_renorm": _embedding_renorm,
    "nll_loss_forward": _nll(1),
    "nll_loss_backward": _nll(1),
    "nll_loss2d_forward": _nll(1),
    "nll_loss2d_backward": _nll(1),
    "max_pool2d_with_indices_backward": _max_pool_backward(2),
    "max_pool3d_with_indices_backward": _max_pool_backward(3),
    "masked_scatter": _masked_scatter,
    "multi_margin_loss": _targets(1),
    "multilabel_margin_loss_forward": _multilabel_targets,
    "adaptive_max_pool2d_backward": _max_pool_backward(2),
    "adaptive_max_pool3d_backward": _max_pool_backward(3),
    "max_unpool2d": _unpool,
    "max_unpool3d": _unpool,
}


def _build_allow() -> dict[str, Rule]:
    allow: dict[str, Rule] = {}
    for n in _POINTWISE + _OTHER_PLAIN:
        allow[n] = _P
    for n, chk in _INDEXED.items():
        allow[n] = Rule(INDEXED, chk)
    # in-place (x.add_) variants share the rule of their functional op: same arguments
    for n in list(allow):
        if not n.endswith("_") and hasattr(torch.ops.aten, n + "_"):
            allow.setdefault(n + "_", allow[n])
    return allow


ALLOW: dict[str, Rule] = _build_allow()

# Refused everywhere, including the hook's host fallback: files, printing, process-global state,
# raw memory layout (views with arbitrary sizes/strides), storage re-pointing and resizing.
REFUSED = frozenset(
    _names("""
from_file _print set_ resize_ resize resize_as_ resize_as _resize_output_ _resize_output
resize_as_sparse_ sparse_resize_ sparse_resize_and_clear_ as_strided as_strided_ as_strided_copy
as_strided_scatter _reshape_alias _reshape_alias_copy set_data _set_grad_enabled
_cufft_set_plan_cache_max_size _cufft_clear_plan_cache _cufft_get_plan_cache_size
_cufft_get_plan_cache_max_size record_stream _unsafe_set_version_counter
_set_check_sparse_tensor_invariants save load _share_memory_ share_memory_ _fused_sdp_choice
_assert_async _functional_assert_async sym_constrain_range _make_per_tensor_quantized_tensor
_make_per_channel_quantized_tensor _from_functional_tensor _to_functional_tensor _sync
_propagate_xla_data _nnz lift_fresh _debug_has_internal_overlap _pin_memory pin_memory
_unsafe_masked_index _unsafe_masked_index_put_accumulate
""")
)
# (_unsafe_masked_index*: index where a mask says so, out-of-range positions allowed elsewhere;
# no front end launches them and their mask-aligned range is not checked here: refused.)
_REFUSED_PREFIX = (
    "_nested",
    "_cufft",
    "_cudnn_rnn_flatten",
    "_foreach_copy",
    "_mps",
    "_cslt",
    "_sparse",
    "sparse_",
    "_to_sparse",
    "to_sparse",
    "_coalesce",
    "_mkldnn",
    "mkldnn",
    "quantize",
    "_fake_quantize",
    "fake_quantize",
    "_jagged",
    "_functionalize",
)

# Factories whose result torch leaves uninitialized: the daemon hands out a zeroed allocation
# instead of running them (their memory would show whatever the daemon's heap held before).
UNINITIALIZED = frozenset(_names("empty empty_like empty_strided new_empty new_empty_strided empty_permuted"))

_resolved: dict[tuple[str, bool], tuple[Any, Rule]] = {}


# Operators tagged random only for one argument: allowed when that argument asks for no
# randomness (the daemon checks it on every launch: check_not_random).
# name -> (argument name, position, the value that draws nothing)
SEEDED_ONLY_WITH: dict[str, tuple[str, int, Any]] = {
    "scaled_dot_product_attention": ("dropout_p", 4, 0.0),
}


def check_not_random(opov: Any, args: Any, kwargs: dict[str, Any]) -> None:
    """Raise OpRefused if a launch of an operator of SEEDED_ONLY_WITH asks for randomness."""
    spec = SEEDED_ONLY_WITH.get(opov._opname)
    if spec is None:
        return
    name, pos, ok = spec
    v = args[pos] if len(args) > pos else kwargs.get(name, ok)
    if v != ok or type(v) not in (int, float):
        raise OpRefused(
            f"{opov._opname} with {name}={v!r} is not allowed on FlexNPU: it would draw from "
            "the daemon's random generator (random numbers are generated on the host)"
        )


def resolve(op: str, values: bool = True) -> tuple[Any, Rule]:
    """(OpOverload, Rule) of an allowed "aten::name.overload", or raise OpRefused.

    ``values``: the backend computes values (cpu/cuda/npu/emu+cpu); then random operators are
    refused. A shape-only backend runs nothing, so it allows them."""
    hit = _resolved.get((op, values))
    if hit is not None:
        return hit
    name, overload = parse_op_name(op)
    try:
        opov = getattr(getattr(torch.ops.aten, name), overload)
    except (AttributeError, RuntimeError):
        raise OpRefused(f"unknown operator {op!r}: the backend's torch has no such aten op") from None
    if not isinstance(opov, torch._ops.OpOverload):
        raise OpRefused(f"unknown operator {op!r}")
    rule = ALLOW.get(name)
    if rule is None or name in REFUSED:
        raise OpRefused(
            f"operator {op!r} is not allowed on FlexNPU (not on the daemon's allow list of "
            "operators it can run safely for a client)"
        )
    tags = opov.tags
    if values and torch.Tag.nondeterministic_seeded in tags and name not in SEEDED_ONLY_WITH:
        raise OpRefused(
            f"operator {op!r} is not allowed on FlexNPU: it would draw from the daemon's "
            "random generator (random numbers are generated on the host)"
        )
    # In-place metadata changes (squeeze_, t_, ...) would alter the daemon's cached views; the
    # hook applies them client-side.
    if torch.Tag.inplace_view in tags:
        raise OpRefused(f"operator {op!r} is not allowed on FlexNPU: in-place view operators run client-side")
    if len(_resolved) > 8192:
        _resolved.clear()
    _resolved[(op, values)] = (opov, rule)
    return opov, rule


def rule_of(op: str, values: bool = True) -> Rule:
    return resolve(op, values)[1]


def is_allowed(op: str, values: bool = True) -> bool:
    """True if a client may launch ``op`` ("aten::name.overload") on the daemon."""
    try:
        resolve(op, values)
    except OpRefused:
        return False
    return True


def host_fallback_ok(name: str) -> bool:
    """May the hook run this aten op on the app's own host (values it needs from the device,
    data-dependent shapes, random numbers)? Everything but the REFUSED class."""
    return not (name in REFUSED or name.startswith(_REFUSED_PREFIX))


def tensor_refs(*values: Any) -> list[TensorRef]:
    """Every TensorRef in decoded launch values (nested lists, tuples and dict values), in no
    particular order: what a launch touches, for handle resolution and accounting."""
    out: list[TensorRef] = []
    stack: list[Any] = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, TensorRef):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return out
