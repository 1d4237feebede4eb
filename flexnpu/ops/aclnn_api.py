"""The aclnn operator API: one C signature per operator, the single table both sides read.

CANN's two-phase operator API is, for every operator ``Xxx``::

    aclnnStatus aclnnXxxGetWorkspaceSize(<params>, uint64_t *workspaceSize, aclOpExecutor **executor);
    aclnnStatus aclnnXxx(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                         aclrtStream stream);

The native build (flexnpu/hook/native/build.py) generates both C functions for every entry of
``SIGNATURES`` from its parameter list (which must be the exact documented one: on x86-64 a
``double`` or ``float`` travels in an XMM register and an ``int8_t`` in the low byte of an integer
register, so a wrong width reads garbage). The call becomes one LAUNCH record named
``aclnn::Xxx`` whose positional arguments are the parameters in order (the launch codec of
flexnpu/protocol.py: aclTensor -> TensorRef, aclScalar -> int/float/bool/complex, arrays -> lists,
aclTensorList -> list of TensorRef, aclDataType -> torch dtype, NULL -> None). The daemon's
operator table (flexnpu/daemon/optable) checks every launch against the same parameter list.

Signatures come from CANN's aclnn reference and from the argument lists torch_npu's op-plugin
passes (``EXEC_NPU_CMD(aclnnXxx, args...)``: at::Tensor -> aclTensor*, Scalar -> aclScalar*,
IntArrayRef -> aclIntArray*, ScalarType -> aclDataType, the rest as is).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# parameter kinds (what the daemon accepts for the argument)
TENSOR, SCALAR, INT_ARRAY, FLOAT_ARRAY, BOOL_ARRAY, TENSOR_LIST, SCALAR_LIST = (
    "tensor",
    "scalar",
    "int_array",
    "float_array",
    "bool_array",
    "tensor_list",
    "scalar_list",
)
INT, FLOAT, BOOL, DTYPE, STR = "int", "float", "bool", "dtype", "str"
POINTER_KINDS = frozenset({TENSOR, SCALAR, INT_ARRAY, FLOAT_ARRAY, BOOL_ARRAY, TENSOR_LIST, SCALAR_LIST, STR})

_KIND_OF_TYPE = {
    "aclTensor*": TENSOR,
    "aclScalar*": SCALAR,
    "aclIntArray*": INT_ARRAY,
    "aclFloatArray*": FLOAT_ARRAY,
    "aclBoolArray*": BOOL_ARRAY,
    "aclTensorList*": TENSOR_LIST,
    "aclScalarList*": SCALAR_LIST,
    "char*": STR,
    "int64_t": INT,
    "int32_t": INT,
    "int": INT,
    "int8_t": INT,
    "uint64_t": INT,
    "uint32_t": INT,
    "uint8_t": INT,
    "bool": BOOL,
    "double": FLOAT,
    "float": FLOAT,
    "aclDataType": DTYPE,
}


@dataclass(frozen=True)
class Param:
    ctype: str  # as written in C, e.g. "const aclTensor *"
    name: str
    kind: str  # one of the kinds above


@dataclass(frozen=True)
class Signature:
    name: str  # "Add" (the C functions are aclnnAdd / aclnnAddGetWorkspaceSize)
    params: tuple[Param, ...]

    @property
    def op(self) -> str:
        return "aclnn::" + self.name


_DECL = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*\((.*)\)\s*$", re.S)


def parse(decl: str) -> Signature:
    """'Add(const aclTensor *self, const aclScalar *alpha, aclTensor *out)' -> Signature."""
    m = _DECL.match(decl)
    if m is None:
        raise ValueError(f"malformed aclnn signature {decl!r}")
    params = []
    for raw in (p.strip() for p in m.group(2).split(",") if p.strip()):
        pm = re.match(r"^(.*?)([A-Za-z_][A-Za-z0-9_]*)$", raw)
        if pm is None:
            raise ValueError(f"{m.group(1)}: malformed parameter {raw!r}")
        ctype, name = pm.group(1).strip(), pm.group(2)
        key = ctype.replace("const", "").replace(" ", "")
        if key not in _KIND_OF_TYPE:
            raise ValueError(f"{m.group(1)}: parameter type {ctype!r} is not supported")
        params.append(Param(ctype, name, _KIND_OF_TYPE[key]))
    return Signature(m.group(1), tuple(params))


# The operators the native front end exports. Keep in step with flexnpu/daemon/optable/aclnn.py
# (tests/test_native_ops.py checks that every signature has an implementation and vice versa).
_T, _O, _S, _IA = "const aclTensor *", "aclTensor *", "const aclScalar *", "const aclIntArray *"

# Elementwise unary operators: Xxx(self, out), with InplaceXxx(selfRef) where CANN has one.
UNARY = (
    "Abs Neg Exp Exp2 Expm1 Log Log2 Log10 Log1p Sqrt Rsqrt Reciprocal Sin Cos Tan Tanh Sinh Cosh Asin "
    "Acos Atan Erf Erfc Sigmoid Silu Gelu Relu Floor Ceil Round Trunc Frac Sign LogicalNot BitwiseNot "
    "IsFinite IsInf IsNan Signbit Mish Hardswish Hardsigmoid"
).split()
UNARY_INPLACE = (
    "Exp Exp2 Expm1 Log Log2 Log10 Log1p Sqrt Rsqrt Reciprocal Sin Cos Tan Tanh Sinh Cosh Asin Acos Atan "
    "Erf Erfc Sigmoid Relu Floor Frac LogicalNot Mish Hardswish Hardsigmoid"
).split()
# Binary operators of two tensors Xxx(self, other, out) and of a tensor and a scalar
# Xxxs / XxxScalar(self, other, out), with their in-place forms.
COMPARE = "Eq Ne Lt Le Gt Ge".split()
BINARY = (
    "Maximum Minimum LogicalAnd LogicalOr LogicalXor BitwiseAndTensor BitwiseOrTensor BitwiseXorTensor "
    "FloorDivide RemainderTensorTensor FmodTensor Atan2 PowTensorTensor Hypot"
).split()
BINARY_SCALAR = (
    "BitwiseAndScalar BitwiseOrScalar BitwiseXorScalar FloorDivides RemainderTensorScalar FmodScalar "
    "PowTensorScalar"
).split()

SIGNATURE_TEXT: tuple[str, ...] = (
    *(f"{n}({_T}self, {_O}out)" for n in UNARY),
    *(f"Inplace{n}({_O}selfRef)" for n in UNARY_INPLACE),
    *(f"{c}Tensor({_T}self, {_T}other, {_O}out)" for c in COMPARE),
    *(f"{c}Scalar({_T}self, {_S}other, {_O}out)" for c in COMPARE),
    *(f"Inplace{c}Tensor({_O}selfRef, {_T}other)" for c in COMPARE),
    *(f"Inplace{c}Scalar({_O}selfRef, {_S}other)" for c in COMPARE),
    *(f"{n}({_T}self, {_T}other, {_O}out)" for n in BINARY),
    *(f"{n}({_T}self, {_S}other, {_O}out)" for n in BINARY_SCALAR),
    "InplaceLogicalAnd(aclTensor *selfRef, const aclTensor *other)",
    "InplaceLogicalOr(aclTensor *selfRef, const aclTensor *other)",
    "InplaceBitwiseAndTensor(aclTensor *selfRef, const aclTensor *other)",
    "InplaceBitwiseAndScalar(aclTensor *selfRef, const aclScalar *other)",
    "InplacePowTensorScalar(aclTensor *selfRef, const aclScalar *exponent)",
    "InplacePowTensorTensor(aclTensor *selfRef, const aclTensor *exponent)",
    "PowScalarTensor(const aclScalar *self, const aclTensor *exponent, aclTensor *out)",
    "RemainderScalarTensor(const aclScalar *self, const aclTensor *other, aclTensor *out)",
    # -- arithmetic
    "Add(const aclTensor *self, const aclTensor *other, const aclScalar *alpha, aclTensor *out)",
    "Adds(const aclTensor *self, const aclScalar *other, const aclScalar *alpha, aclTensor *out)",
    "InplaceAdd(aclTensor *selfRef, const aclTensor *other, const aclScalar *alpha)",
    "InplaceAdds(aclTensor *selfRef, const aclScalar *other, const aclScalar *alpha)",
    "Sub(const aclTensor *self, const aclTensor *other, const aclScalar *alpha, aclTensor *out)",
    "Subs(const aclTensor *self, const aclScalar *other, const aclScalar *alpha, aclTensor *out)",
    "InplaceSub(aclTensor *selfRef, const aclTensor *other, const aclScalar *alpha)",
    "InplaceSubs(aclTensor *selfRef, const aclScalar *other, const aclScalar *alpha)",
    "Rsub(const aclTensor *self, const aclTensor *other, const aclScalar *alpha, aclTensor *out)",
    "Rsubs(const aclTensor *self, const aclScalar *other, const aclScalar *alpha, aclTensor *out)",
    "Mul(const aclTensor *self, const aclTensor *other, aclTensor *out)",
    "Muls(const aclTensor *self, const aclScalar *other, aclTensor *out)",
    "InplaceMul(aclTensor *selfRef, const aclTensor *other)",
    "InplaceMuls(aclTensor *selfRef, const aclScalar *other)",
    "Div(const aclTensor *self, const aclTensor *other, aclTensor *out)",
    "Divs(const aclTensor *self, const aclScalar *other, aclTensor *out)",
    "InplaceDiv(aclTensor *selfRef, const aclTensor *other)",
    "InplaceDivs(aclTensor *selfRef, const aclScalar *other)",
    "DivMod(const aclTensor *self, const aclTensor *other, int mode, aclTensor *out)",
    "DivMods(const aclTensor *self, const aclScalar *other, int mode, aclTensor *out)",
    "Addcmul(const aclTensor *self, const aclTensor *tensor1, const aclTensor *tensor2, const aclScalar *value, "
    "aclTensor *out)",
    "Addcdiv(const aclTensor *self, const aclTensor *tensor1, const aclTensor *tensor2, const aclScalar *value, "
    "aclTensor *out)",
    "InplaceAddcmul(aclTensor *selfRef, const aclTensor *tensor1, const aclTensor *tensor2, const aclScalar *value)",
    "InplaceAddcdiv(aclTensor *selfRef, const aclTensor *tensor1, const aclTensor *tensor2, const aclScalar *value)",
    "Lerp(const aclTensor *self, const aclTensor *end, const aclTensor *weight, aclTensor *out)",
    "Lerps(const aclTensor *self, const aclTensor *end, const aclScalar *weight, aclTensor *out)",
    "Clamp(const aclTensor *self, const aclScalar *clipValueMin, const aclScalar *clipValueMax, aclTensor *out)",
    "ClampMin(const aclTensor *self, const aclScalar *clipValueMin, aclTensor *out)",
    "ClampMax(const aclTensor *self, const aclScalar *clipValueMax, aclTensor *out)",
    "ClampTensor(const aclTensor *self, const aclTensor *clipValueMin, const aclTensor *clipValueMax, aclTensor *out)",
    "ClampMinTensor(const aclTensor *self, const aclTensor *clipValueMin, aclTensor *out)",
    "ClampMaxTensor(const aclTensor *self, const aclTensor *clipValueMax, aclTensor *out)",
    "SWhere(const aclTensor *condition, const aclTensor *self, const aclTensor *other, aclTensor *out)",
    "NanToNum(const aclTensor *self, float nan, float posInf, float negInf, aclTensor *out)",
    "Softplus(const aclTensor *self, const aclScalar *beta, const aclScalar *threshold, aclTensor *out)",
    "LeakyRelu(const aclTensor *self, const aclScalar *negativeSlope, aclTensor *out)",
    "Threshold(const aclTensor *self, const aclScalar *threshold, const aclScalar *value, aclTensor *out)",
    "GeluV2(const aclTensor *x, int64_t approximate, aclTensor *y)",
    "SiluBackward(const aclTensor *gradOutput, const aclTensor *self, aclTensor *gradInput)",
    "GeluBackward(const aclTensor *gradOutput, const aclTensor *self, aclTensor *gradInput)",
    "GeluBackwardV2(const aclTensor *gradOutput, const aclTensor *self, char *approximate, aclTensor *gradInput)",
    "SigmoidBackward(const aclTensor *gradOutput, const aclTensor *output, aclTensor *out)",
    "TanhBackward(const aclTensor *gradOutput, const aclTensor *output, aclTensor *out)",
    "ThresholdBackward(const aclTensor *gradOutput, const aclTensor *self, const aclScalar *threshold, "
    "aclTensor *out)",
    # -- copies, fills, casts, factories
    "InplaceCopy(aclTensor *selfRef, const aclTensor *src)",
    "InplaceOne(aclTensor *selfRef)",
    "InplaceZero(aclTensor *selfRef)",
    "InplaceFillScalar(aclTensor *selfRef, const aclScalar *value)",
    "InplaceFillTensor(aclTensor *selfRef, const aclTensor *value)",
    "InplaceMaskedFillScalar(aclTensor *selfRef, const aclTensor *mask, const aclScalar *value)",
    "InplaceMaskedFillTensor(aclTensor *selfRef, const aclTensor *mask, const aclTensor *value)",
    "Cast(const aclTensor *self, aclDataType dtype, aclTensor *out)",
    "Arange(const aclScalar *start, const aclScalar *end, const aclScalar *step, aclTensor *out)",
    "Linspace(const aclScalar *start, const aclScalar *end, int64_t steps, aclTensor *out)",
    "Triu(const aclTensor *self, int64_t diagonal, aclTensor *out)",
    "Tril(const aclTensor *self, int64_t diagonal, aclTensor *out)",
    "InplaceTriu(aclTensor *selfRef, int64_t diagonal)",
    "InplaceTril(aclTensor *selfRef, int64_t diagonal)",
    "Eye(int64_t n, int64_t m, aclTensor *out)",
    # -- shape
    "Cat(const aclTensorList *tensors, int64_t dim, aclTensor *out)",
    "Stack(const aclTensorList *tensors, int64_t dim, aclTensor *out)",
    "ConstantPadNd(const aclTensor *self, const aclIntArray *pad, const aclScalar *value, aclTensor *out)",
    "Repeat(const aclTensor *self, const aclIntArray *repeats, aclTensor *out)",
    "Flip(const aclTensor *self, const aclIntArray *dims, aclTensor *out)",
    "Roll(const aclTensor *self, const aclIntArray *shifts, const aclIntArray *dims, aclTensor *out)",
    "Expand(const aclTensor *self, const aclIntArray *size, aclTensor *out)",
    "Permute(const aclTensor *self, const aclIntArray *dims, aclTensor *out)",
    # -- reductions
    "ReduceSum(const aclTensor *self, const aclIntArray *dim, bool keepDim, aclDataType dtype, aclTensor *out)",
    "Mean(const aclTensor *self, const aclIntArray *dim, bool keepDim, aclDataType dtype, aclTensor *out)",
    "Amax(const aclTensor *self, const aclIntArray *dim, bool keepDim, aclTensor *out)",
    "Amin(const aclTensor *self, const aclIntArray *dim, bool keepDim, aclTensor *out)",
    "Max(const aclTensor *self, aclTensor *out)",
    "Min(const aclTensor *self, aclTensor *out)",
    "MaxDim(const aclTensor *self, int64_t dim, bool keepdim, aclTensor *out, aclTensor *indices)",
    "MinDim(const aclTensor *self, int64_t dim, bool keepdim, aclTensor *out, aclTensor *indices)",
    "ArgMax(const aclTensor *self, int64_t dim, bool keepdim, aclTensor *out)",
    "ArgMin(const aclTensor *self, int64_t dim, bool keepdim, aclTensor *out)",
    "Any(const aclTensor *self, const aclIntArray *dim, bool keepdim, aclTensor *out)",
    "All(const aclTensor *self, const aclIntArray *dim, bool keepdim, aclTensor *out)",
    "Prod(const aclTensor *self, aclDataType dtype, aclTensor *out)",
    "ProdDim(const aclTensor *self, int64_t dim, bool keepDim, aclDataType dtype, aclTensor *out)",
    "Cumsum(const aclTensor *self, int64_t dim, aclDataType dtype, aclTensor *out)",
    "Cumprod(const aclTensor *self, const aclScalar *dim, aclDataType dtype, aclTensor *out)",
    "LogSumExp(const aclTensor *self, const aclIntArray *dim, bool keepDim, aclTensor *out)",
    "VarCorrection(const aclTensor *self, const aclIntArray *dim, int64_t correction, bool keepdim, aclTensor *out)",
    "Std(const aclTensor *self, const aclIntArray *dim, int64_t correction, bool keepdim, aclTensor *out)",
    "VarMean(const aclTensor *self, const aclIntArray *dim, int64_t correction, bool keepdim, aclTensor *varOut, "
    "aclTensor *meanOut)",
    "LinalgVectorNorm(const aclTensor *self, const aclScalar *ord, const aclIntArray *dims, bool keepDims, "
    "aclDataType dtype, aclTensor *out)",
    "Norm(const aclTensor *self, const aclScalar *pScalar, const aclIntArray *dim, bool keepdim, aclTensor *out)",
    "Topk(const aclTensor *self, int64_t k, int64_t dim, bool largest, bool sorted, aclTensor *valuesOut, "
    "aclTensor *indicesOut)",
    "Sort(const aclTensor *self, bool stable, int64_t dim, bool descending, aclTensor *valuesOut, "
    "aclTensor *indicesOut)",
    "Argsort(const aclTensor *self, int64_t dim, bool descending, aclTensor *out)",
    # -- softmax and normalization
    "Softmax(const aclTensor *self, int64_t dim, aclTensor *out)",
    "LogSoftmax(const aclTensor *self, int64_t dim, aclTensor *out)",
    "SoftmaxBackward(const aclTensor *gradOutput, const aclTensor *output, int64_t dim, aclTensor *gradInput)",
    "LogSoftmaxBackward(const aclTensor *gradOutput, const aclTensor *output, int64_t dim, aclTensor *out)",
    "RmsNorm(const aclTensor *x, const aclTensor *gamma, double epsilon, aclTensor *yOut, aclTensor *rstdOut)",
    "RmsNormGrad(const aclTensor *dy, const aclTensor *x, const aclTensor *rstd, const aclTensor *gamma, "
    "aclTensor *dxOut, aclTensor *dgammaOut)",
    "LayerNorm(const aclTensor *input, const aclIntArray *normalizedShape, const aclTensor *weightOptional, "
    "const aclTensor *biasOptional, double eps, aclTensor *out, aclTensor *meanOutOptional, "
    "aclTensor *rstdOutOptional)",
    "LayerNormBackward(const aclTensor *gradOut, const aclTensor *input, const aclIntArray *normalizedShape, "
    "const aclTensor *mean, const aclTensor *rstd, const aclTensor *weightOptional, const aclTensor *biasOptional, "
    "const aclBoolArray *outputMask, aclTensor *gradInputOut, aclTensor *gradWeightOut, aclTensor *gradBiasOut)",
    "SwiGlu(const aclTensor *x, int64_t dim, aclTensor *out)",
    "SwiGluGrad(const aclTensor *yGrad, const aclTensor *x, int64_t dim, aclTensor *out)",
    "RotaryPositionEmbedding(const aclTensor *x, const aclTensor *cos, const aclTensor *sin, int64_t mode, "
    "aclTensor *out)",
    "NLLLoss(const aclTensor *self, const aclTensor *target, const aclTensor *weight, int64_t reduction, "
    "int64_t ignoreIndex, aclTensor *out, aclTensor *totalWeightOut)",
    "NLLLossBackward(const aclTensor *gradOutput, const aclTensor *self, const aclTensor *target, "
    "const aclTensor *weight, int64_t reduction, int64_t ignoreIndex, const aclTensor *totalWeight, aclTensor *out)",
    # -- indexing
    "Embedding(const aclTensor *weight, const aclTensor *indices, aclTensor *out)",
    "EmbeddingDenseBackward(const aclTensor *grad, const aclTensor *sortIndices, uint64_t numWeights, "
    "uint64_t paddingIdx, bool scaleGradByFreq, aclTensor *out)",
    "IndexSelect(const aclTensor *self, int64_t dim, const aclTensor *index, aclTensor *out)",
    "Gather(const aclTensor *self, int64_t dim, const aclTensor *index, aclTensor *out)",
    "Index(const aclTensor *self, const aclTensorList *indices, aclTensor *out)",
    "IndexPutImpl(aclTensor *selfRef, const aclTensorList *indices, const aclTensor *values, bool accumulate, "
    "bool unsafe)",
    "ScatterAdd(const aclTensor *self, int64_t dim, const aclTensor *index, const aclTensor *src, aclTensor *out)",
    "Scatter(const aclTensor *self, int64_t dim, const aclTensor *index, const aclTensor *src, int64_t reduce, "
    "aclTensor *out)",
    "ScatterValue(const aclTensor *self, int64_t dim, const aclTensor *index, const aclScalar *value, "
    "int64_t reduce, aclTensor *out)",
    "InplaceScatter(aclTensor *selfRef, int64_t dim, const aclTensor *index, const aclTensor *src, int64_t reduce)",
    "InplaceScatterValue(aclTensor *selfRef, int64_t dim, const aclTensor *index, const aclScalar *value, "
    "int64_t reduce)",
    "InplaceIndexCopy(aclTensor *selfRef, int64_t dim, const aclTensor *index, const aclTensor *source)",
    "InplaceIndexFill(aclTensor *selfRef, int64_t dim, const aclTensor *index, const aclScalar *value)",
    "IndexAdd(const aclTensor *self, int64_t dim, const aclTensor *index, const aclTensor *source, "
    "const aclScalar *alpha, aclTensor *out)",
    "MaskedSelect(const aclTensor *self, const aclTensor *mask, aclTensor *out)",
    # -- random numbers: torch_npu passes its generator's Philox (seed, offset) with every call
    "Multinomial(const aclTensor *self, int64_t numsamples, bool replacement, uint64_t seed, uint64_t offset, "
    "aclTensor *out)",
    "InplaceUniform(aclTensor *selfRef, double from, double to, uint64_t seed, uint64_t offset)",
    "InplaceNormal(aclTensor *selfRef, float mean, float std, int64_t seed, int64_t offset)",
    "InplaceRandom(aclTensor *selfRef, int64_t from, int64_t to, uint64_t seed, uint64_t offset)",
    "InplaceBernoulli(aclTensor *selfRef, const aclScalar *prob, uint64_t seed, uint64_t offset)",
    # -- fused attention (torch_npu's scaled_dot_product_attention / npu_fusion_attention)
    "FlashAttentionScore(const aclTensor *query, const aclTensor *key, const aclTensor *value, "
    "const aclTensor *realShiftOptional, const aclTensor *dropMaskOptional, const aclTensor *paddingMaskOptional, "
    "const aclTensor *attenMaskOptional, const aclIntArray *prefixOptional, double scaleValue, double keepProb, "
    "int64_t preTokens, int64_t nextTokens, int64_t headNum, char *inputLayout, int64_t innerPrecise, "
    "int64_t sparseMode, aclTensor *softmaxMaxOut, aclTensor *softmaxSumOut, aclTensor *softmaxOutOut, "
    "aclTensor *attentionOutOut)",
    "FlashAttentionScoreGrad(const aclTensor *query, const aclTensor *key, const aclTensor *value, "
    "const aclTensor *dy, const aclTensor *pseShiftOptional, const aclTensor *dropMaskOptional, "
    "const aclTensor *paddingMaskOptional, const aclTensor *attenMaskOptional, const aclTensor *softmaxMaxOptional, "
    "const aclTensor *softmaxSumOptional, const aclTensor *softmaxInOptional, const aclTensor *attentionInOptional, "
    "const aclIntArray *prefixOptional, double scaleValue, double keepProb, int64_t preTokens, int64_t nextTokens, "
    "int64_t headNum, char *inputLayout, int64_t innerPrecise, int64_t sparseMode, aclTensor *dqOut, "
    "aclTensor *dkOut, aclTensor *dvOut, aclTensor *dpseOut)",
    # -- matmul family
    "Matmul(const aclTensor *self, const aclTensor *mat2, aclTensor *out, int8_t cubeMathType)",
    "Mm(const aclTensor *self, const aclTensor *mat2, aclTensor *out, int8_t cubeMathType)",
    "BatchMatMul(const aclTensor *self, const aclTensor *mat2, aclTensor *out, int8_t cubeMathType)",
    "Addmm(const aclTensor *self, const aclTensor *mat1, const aclTensor *mat2, const aclScalar *beta, "
    "const aclScalar *alpha, aclTensor *out, int8_t cubeMathType)",
    "InplaceAddmm(aclTensor *selfRef, const aclTensor *mat1, const aclTensor *mat2, const aclScalar *beta, "
    "const aclScalar *alpha, int8_t cubeMathType)",
    "Baddbmm(const aclTensor *self, const aclTensor *batch1, const aclTensor *batch2, const aclScalar *beta, "
    "const aclScalar *alpha, aclTensor *out, int8_t cubeMathType)",
    "Mv(const aclTensor *self, const aclTensor *vec, aclTensor *out, int8_t cubeMathType)",
    "Dot(const aclTensor *self, const aclTensor *tensor, aclTensor *out)",
)

SIGNATURES: dict[str, Signature] = {s.name: s for s in map(parse, SIGNATURE_TEXT)}
if len(SIGNATURES) != len(SIGNATURE_TEXT):
    raise ValueError("an aclnn operator is listed twice")
