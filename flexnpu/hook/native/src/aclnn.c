/* FlexNPU native front end: the aclnn operator API's objects (libopapi.so).
 *
 * aclTensor, aclScalar, the arrays and lists are plain host objects holding what their create
 * call was given (a tensor's data pointer is a device address; it is translated to a daemon
 * handle only when an operator is prepared, so a tensor may be created before its memory is
 * touched). aclnnXxxGetWorkspaceSize (generated from flexnpu/aclnn_api.py into fx_aclnn.c)
 * encodes the whole call into an aclOpExecutor at once, so the caller may destroy its arguments
 * afterwards; the workspace size is always 0 (the daemon needs none). aclnnXxx pushes the
 * encoded LAUNCH record on the stream, asynchronously as on hardware, and frees the executor
 * unless it was made repeatable.
 *
 * Objects carry a magic word: a destroyed or foreign pointer handed back is refused (as far
 * as reading its first word allows) instead of being trusted.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fx_aclnn.h"

#define M_TENSOR 0x41544e53u
#define M_SCALAR 0x4153434cu
#define M_IARRAY 0x41494152u
#define M_FARRAY 0x41464152u
#define M_BARRAY 0x41424152u
#define M_TLIST 0x41544c53u
#define M_SLIST 0x41534c53u
#define M_EXEC 0x41455843u
#define M_DEAD 0xdeadbeefu

struct aclTensor {
    uint32_t magic;
    int dtype, format;
    uint64_t ndim, sndim;
    int64_t offset;
    void *data;
    int64_t *shape, *stride, *sdims;   /* point into the same allocation */
};

struct aclScalar {
    uint32_t magic;
    int dtype;
    union { double f; int64_t i; double c[2]; } v;
};

struct aclIntArray { uint32_t magic; uint64_t n; int64_t v[]; };
struct aclFloatArray { uint32_t magic; uint64_t n; float v[]; };
struct aclBoolArray { uint32_t magic; uint64_t n; bool v[]; };
struct aclTensorList { uint32_t magic; uint64_t n; aclTensor *v[]; };
struct aclScalarList { uint32_t magic; uint64_t n; aclScalar *v[]; };

struct aclOpExecutor {
    uint32_t magic;
    int repeatable;
    struct fx_enc enc;
};

#define LIVE(p, m) ((p) && *(const uint32_t *)(p) == (m))

/* ------------------------------------------------------------------ half / bfloat16 */
static double half_to_double(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 0) v = m / 1024.0 / 16384.0;
    else if (e == 31) v = m ? __builtin_nan("") : __builtin_inf();
    else v = (1.0 + m / 1024.0) * (double)(e >= 15 ? (double)(1u << (e - 15)) : 1.0 / (double)(1u << (15 - e)));
    return s ? -v : v;
}

static double bf16_to_double(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ------------------------------------------------------------------ tensors */
FX_API aclTensor *aclCreateTensor(const int64_t *viewDims, uint64_t viewDimsNum, int dataType, const int64_t *stride,
                                  int64_t offset, int format, const int64_t *storageDims, uint64_t storageDimsNum,
                                  void *tensorData) {
    if (viewDimsNum > FXL_MAX_NDIM || storageDimsNum > FXL_MAX_NDIM || (viewDimsNum && !viewDims) ||
        (storageDimsNum && !storageDims)) {
        fx_err(ACLNN_ERR_PARAM_INVALID, "aclCreateTensor: bad dimensions (%llu view, %llu storage)",
               (unsigned long long)viewDimsNum, (unsigned long long)storageDimsNum);
        return NULL;
    }
    aclTensor *t = calloc(1, sizeof *t + sizeof(int64_t) * (2 * viewDimsNum + storageDimsNum));
    if (!t) return NULL;
    t->magic = M_TENSOR;
    t->dtype = dataType;
    t->format = format;
    t->ndim = viewDimsNum;
    t->sndim = storageDimsNum;
    t->offset = offset;
    t->data = tensorData;
    t->shape = (int64_t *)(t + 1);
    t->stride = t->shape + viewDimsNum;
    t->sdims = t->stride + viewDimsNum;
    if (viewDimsNum) memcpy(t->shape, viewDims, sizeof(int64_t) * viewDimsNum);
    if (stride && viewDimsNum) memcpy(t->stride, stride, sizeof(int64_t) * viewDimsNum);
    else {   /* no strides: contiguous */
        int64_t s = 1;
        for (uint64_t i = viewDimsNum; i-- > 0;) { t->stride[i] = s; s *= viewDims[i] > 1 ? viewDims[i] : 1; }
    }
    if (storageDimsNum) memcpy(t->sdims, storageDims, sizeof(int64_t) * storageDimsNum);
    return t;
}

FX_API aclnnStatus aclDestroyTensor(const aclTensor *tensor) {
    if (!tensor) return ACLNN_SUCCESS;
    if (!LIVE(tensor, M_TENSOR)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclDestroyTensor: not a live aclTensor");
    ((aclTensor *)tensor)->magic = M_DEAD;
    free((void *)tensor);
    return ACLNN_SUCCESS;
}

static aclnnStatus get_dims(const aclTensor *t, const int64_t *src, uint64_t n, int64_t **out, uint64_t *num,
                            const char *what) {
    if (!LIVE(t, M_TENSOR) || !out || !num) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "%s: bad arguments", what);
    *out = malloc(sizeof(int64_t) * (n ? n : 1));   /* the caller frees it (delete[] in C++ callers) */
    if (!*out) return fx_err(ACLNN_ERR_INNER, "%s: out of memory", what);
    if (n) memcpy(*out, src, sizeof(int64_t) * n);
    *num = n;
    return ACLNN_SUCCESS;
}

FX_API aclnnStatus aclGetViewShape(const aclTensor *t, int64_t **viewDims, uint64_t *viewDimsNum) {
    return get_dims(t, t ? t->shape : NULL, t ? t->ndim : 0, viewDims, viewDimsNum, "aclGetViewShape");
}
FX_API aclnnStatus aclGetStorageShape(const aclTensor *t, int64_t **dims, uint64_t *num) {
    return get_dims(t, t ? t->sdims : NULL, t ? t->sndim : 0, dims, num, "aclGetStorageShape");
}
FX_API aclnnStatus aclGetViewStrides(const aclTensor *t, int64_t **dims, uint64_t *num) {
    return get_dims(t, t ? t->stride : NULL, t ? t->ndim : 0, dims, num, "aclGetViewStrides");
}
FX_API aclnnStatus aclGetViewOffset(const aclTensor *t, int64_t *offset) {
    if (!LIVE(t, M_TENSOR) || !offset) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclGetViewOffset: bad arguments");
    *offset = t->offset;
    return ACLNN_SUCCESS;
}
FX_API aclnnStatus aclGetFormat(const aclTensor *t, int *format) {
    if (!LIVE(t, M_TENSOR) || !format) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclGetFormat: bad arguments");
    *format = t->format;
    return ACLNN_SUCCESS;
}
FX_API aclnnStatus aclGetDataType(const aclTensor *t, int *dataType) {
    if (!LIVE(t, M_TENSOR) || !dataType) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclGetDataType: bad arguments");
    *dataType = t->dtype;
    return ACLNN_SUCCESS;
}

/* ------------------------------------------------------------------ scalars */
FX_API aclScalar *aclCreateScalar(void *value, int dataType) {
    if (!value) { fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclCreateScalar: value is NULL"); return NULL; }
    aclScalar *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->magic = M_SCALAR;
    s->dtype = dataType;
    const void *p = value;
    switch (dataType) {
    case 0: s->v.f = *(const float *)p; break;
    case 1: s->v.f = half_to_double(*(const uint16_t *)p); break;
    case 27: s->v.f = bf16_to_double(*(const uint16_t *)p); break;
    case 11: s->v.f = *(const double *)p; break;
    case 2: s->v.i = *(const int8_t *)p; break;
    case 3: s->v.i = *(const int32_t *)p; break;
    case 4: s->v.i = *(const uint8_t *)p; break;
    case 6: s->v.i = *(const int16_t *)p; break;
    case 7: s->v.i = *(const uint16_t *)p; break;
    case 8: s->v.i = *(const uint32_t *)p; break;
    case 9: s->v.i = *(const int64_t *)p; break;
    case 10: s->v.i = (int64_t)*(const uint64_t *)p; break;
    case 12: s->v.i = *(const bool *)p; break;
    case 16: s->v.c[0] = ((const float *)p)[0]; s->v.c[1] = ((const float *)p)[1]; break;
    case 17: s->v.c[0] = ((const double *)p)[0]; s->v.c[1] = ((const double *)p)[1]; break;
    default:
        free(s);
        fx_err(ACLNN_ERR_PARAM_INVALID, "aclCreateScalar: aclDataType %d is not supported", dataType);
        return NULL;
    }
    return s;
}

FX_API aclnnStatus aclDestroyScalar(const aclScalar *scalar) {
    if (!scalar) return ACLNN_SUCCESS;
    if (!LIVE(scalar, M_SCALAR)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclDestroyScalar: not a live aclScalar");
    ((aclScalar *)scalar)->magic = M_DEAD;
    free((void *)scalar);
    return ACLNN_SUCCESS;
}

/* ------------------------------------------------------------------ arrays and lists */
#define ARRAY(Type, Elem, MAGIC, Create, Destroy)                                             \
    FX_API Type *Create(const Elem *value, uint64_t size) {                                  \
        if ((size && !value) || size > FXL_MAX_ITEMS) {                                      \
            fx_err(ACLNN_ERR_PARAM_INVALID, #Create ": bad array (%llu items)", (unsigned long long)size); \
            return NULL;                                                                     \
        }                                                                                    \
        Type *a = calloc(1, sizeof *a + sizeof(Elem) * (size ? size : 1));                   \
        if (!a) return NULL;                                                                 \
        a->magic = MAGIC;                                                                    \
        a->n = size;                                                                         \
        if (size) memcpy((void *)a->v, value, sizeof(Elem) * size);                          \
        return a;                                                                            \
    }                                                                                        \
    FX_API aclnnStatus Destroy(const Type *a) {                                              \
        if (!a) return ACLNN_SUCCESS;                                                        \
        if (!LIVE(a, MAGIC)) return fx_err(ACLNN_ERR_PARAM_INVALID, #Destroy ": not a live object"); \
        ((Type *)a)->magic = M_DEAD;                                                         \
        free((void *)a);                                                                     \
        return ACLNN_SUCCESS;                                                                \
    }

ARRAY(aclIntArray, int64_t, M_IARRAY, aclCreateIntArray, aclDestroyIntArray)
ARRAY(aclFloatArray, float, M_FARRAY, aclCreateFloatArray, aclDestroyFloatArray)
ARRAY(aclBoolArray, bool, M_BARRAY, aclCreateBoolArray, aclDestroyBoolArray)

/* A tensor (scalar) list owns its elements: destroying it destroys them (torch_npu's op-plugin
 * releases only the list). */
FX_API aclTensorList *aclCreateTensorList(const aclTensor *const *value, uint64_t size) {
    if ((size && !value) || size > FXL_MAX_ITEMS) {
        fx_err(ACLNN_ERR_PARAM_INVALID, "aclCreateTensorList: bad list (%llu items)", (unsigned long long)size);
        return NULL;
    }
    aclTensorList *l = calloc(1, sizeof *l + sizeof(aclTensor *) * (size ? size : 1));
    if (!l) return NULL;
    l->magic = M_TLIST;
    l->n = size;
    for (uint64_t i = 0; i < size; i++) l->v[i] = (aclTensor *)value[i];
    return l;
}

FX_API aclnnStatus aclDestroyTensorList(const aclTensorList *l) {
    if (!l) return ACLNN_SUCCESS;
    if (!LIVE(l, M_TLIST)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclDestroyTensorList: not a live list");
    for (uint64_t i = 0; i < l->n; i++) aclDestroyTensor(l->v[i]);
    ((aclTensorList *)l)->magic = M_DEAD;
    free((void *)l);
    return ACLNN_SUCCESS;
}

FX_API aclScalarList *aclCreateScalarList(const aclScalar *const *value, uint64_t size) {
    if ((size && !value) || size > FXL_MAX_ITEMS) {
        fx_err(ACLNN_ERR_PARAM_INVALID, "aclCreateScalarList: bad list (%llu items)", (unsigned long long)size);
        return NULL;
    }
    aclScalarList *l = calloc(1, sizeof *l + sizeof(aclScalar *) * (size ? size : 1));
    if (!l) return NULL;
    l->magic = M_SLIST;
    l->n = size;
    for (uint64_t i = 0; i < size; i++) l->v[i] = (aclScalar *)value[i];
    return l;
}

FX_API aclnnStatus aclDestroyScalarList(const aclScalarList *l) {
    if (!l) return ACLNN_SUCCESS;
    if (!LIVE(l, M_SLIST)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclDestroyScalarList: not a live list");
    for (uint64_t i = 0; i < l->n; i++) aclDestroyScalar(l->v[i]);
    ((aclScalarList *)l)->magic = M_DEAD;
    free((void *)l);
    return ACLNN_SUCCESS;
}

FX_API aclnnStatus aclGetIntArraySize(const aclIntArray *a, uint64_t *size) {
    if (!LIVE(a, M_IARRAY) || !size) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclGetIntArraySize: bad arguments");
    *size = a->n;
    return ACLNN_SUCCESS;
}
FX_API aclnnStatus aclGetTensorListSize(const aclTensorList *l, uint64_t *size) {
    if (!LIVE(l, M_TLIST) || !size) return fx_err(ACLNN_ERR_PARAM_NULLPTR, "aclGetTensorListSize: bad arguments");
    *size = l->n;
    return ACLNN_SUCCESS;
}

/* ------------------------------------------------------------------ encoding arguments */
void fx_arg_tensor(struct fx_enc *e, const aclTensor *t) {
    if (!t) { fx_enc_none(e); return; }
    if (!LIVE(t, M_TENSOR)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclTensor argument is not a live tensor"); return; }
    fx_enc_tensor(e, t->data, t->dtype, t->shape, t->stride, t->ndim, t->offset);
}

void fx_arg_scalar(struct fx_enc *e, const aclScalar *s) {
    if (!s) { fx_enc_none(e); return; }
    if (!LIVE(s, M_SCALAR)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclScalar argument is not a live scalar"); return; }
    switch (s->dtype) {
    case 0: case 1: case 11: case 27: fx_enc_float(e, s->v.f); break;
    case 12: fx_enc_bool(e, (int)s->v.i); break;
    case 16: case 17: fx_enc_complex(e, s->v.c[0], s->v.c[1]); break;
    default: fx_enc_int(e, s->v.i); break;
    }
}

void fx_arg_int_array(struct fx_enc *e, const aclIntArray *a) {
    if (!a) { fx_enc_none(e); return; }
    if (!LIVE(a, M_IARRAY)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclIntArray argument is not live"); return; }
    fx_enc_list(e, (unsigned)a->n);
    for (uint64_t i = 0; i < a->n; i++) fx_enc_int(e, a->v[i]);
}

void fx_arg_float_array(struct fx_enc *e, const aclFloatArray *a) {
    if (!a) { fx_enc_none(e); return; }
    if (!LIVE(a, M_FARRAY)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclFloatArray argument is not live"); return; }
    fx_enc_list(e, (unsigned)a->n);
    for (uint64_t i = 0; i < a->n; i++) fx_enc_float(e, a->v[i]);
}

void fx_arg_bool_array(struct fx_enc *e, const aclBoolArray *a) {
    if (!a) { fx_enc_none(e); return; }
    if (!LIVE(a, M_BARRAY)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclBoolArray argument is not live"); return; }
    fx_enc_list(e, (unsigned)a->n);
    for (uint64_t i = 0; i < a->n; i++) fx_enc_bool(e, a->v[i]);
}

void fx_arg_tensor_list(struct fx_enc *e, const aclTensorList *l) {
    if (!l) { fx_enc_none(e); return; }
    if (!LIVE(l, M_TLIST)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclTensorList argument is not live"); return; }
    fx_enc_list(e, (unsigned)l->n);
    for (uint64_t i = 0; i < l->n; i++) fx_arg_tensor(e, l->v[i]);
}

void fx_arg_scalar_list(struct fx_enc *e, const aclScalarList *l) {
    if (!l) { fx_enc_none(e); return; }
    if (!LIVE(l, M_SLIST)) { fx_enc_fail(e, ACLNN_ERR_PARAM_INVALID, "an aclScalarList argument is not live"); return; }
    fx_enc_list(e, (unsigned)l->n);
    for (uint64_t i = 0; i < l->n; i++) fx_arg_scalar(e, l->v[i]);
}

/* ------------------------------------------------------------------ executors */
aclOpExecutor *fx_exec_new(const char *op, const char *what, unsigned nargs) {
    aclOpExecutor *x = calloc(1, sizeof *x);
    if (!x) return NULL;
    x->magic = M_EXEC;
    fx_enc_begin(&x->enc, op, what);
    fx_enc_tuple(&x->enc, nargs);
    return x;
}

aclnnStatus fx_exec_ready(aclOpExecutor *x, uint64_t *workspaceSize, aclOpExecutor **executor, const char *what) {
    if (!x) return fx_err(ACLNN_ERR_INNER, "%s: out of memory", what);
    aclnnStatus rc = x->enc.err;
    if (!rc && (!workspaceSize || !executor))
        rc = fx_err(ACLNN_ERR_PARAM_NULLPTR, "%s: workspaceSize or executor is NULL", what);
    if (!rc && !fx_initialized()) rc = fx_err(ACL_ERROR_UNINITIALIZE, "%s before aclInit", what);
    if (rc) {
        fx_enc_free(&x->enc);
        x->magic = M_DEAD;
        free(x);
        return rc;
    }
    fx_enc_count(&x->enc, 0);   /* no keyword arguments */
    fx_enc_count(&x->enc, 0);   /* no fresh outputs: aclnn writes the tensors it is given */
    *workspaceSize = 0;
    *executor = x;
    return ACLNN_SUCCESS;
}

static void exec_free(aclOpExecutor *x) {
    fx_enc_free(&x->enc);
    x->magic = M_DEAD;
    free(x);
}

aclnnStatus fx_exec_run(void *workspace, uint64_t workspaceSize, aclOpExecutor *x, aclrtStream stream,
                        const char *what) {
    (void)workspace;
    (void)workspaceSize;
    if (!LIVE(x, M_EXEC)) return fx_err(ACLNN_ERR_PARAM_INVALID, "%s: executor is not a live aclOpExecutor", what);
    const char *prev = x->enc.what;
    x->enc.what = what;
    aclnnStatus rc = fx_enc_submit(&x->enc, stream, 0);
    x->enc.what = prev;
    if (!x->repeatable) exec_free(x);
    return rc;
}

FX_API aclnnStatus aclSetAclOpExecutorRepeatable(aclOpExecutor *x) {
    if (!LIVE(x, M_EXEC)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclSetAclOpExecutorRepeatable: not a live executor");
    x->repeatable = 1;
    return ACLNN_SUCCESS;
}

FX_API aclnnStatus aclDestroyAclOpExecutor(aclOpExecutor *x) {
    if (!x) return ACLNN_SUCCESS;
    if (!LIVE(x, M_EXEC)) return fx_err(ACLNN_ERR_PARAM_INVALID, "aclDestroyAclOpExecutor: not a live executor");
    exec_free(x);
    return ACLNN_SUCCESS;
}

/* a throwaway encoder that swallows a failed executor's arguments */
static struct fx_enc g_sink = {.err = ACLNN_ERR_INNER};

struct fx_enc *fx_exec_enc(aclOpExecutor *x) { return x ? &x->enc : &g_sink; }
