/* FlexNPU native front end: the aclop operator API (single operators by type name).
 *
 * aclTensorDesc / aclDataBuffer / aclopAttr are host objects of this library (they describe
 * operands; nothing touches the device until an execute). aclopCompileAndExecute[V2] /
 * aclopExecute[V2] / aclopCast turn one operator into one LAUNCH record named
 * `aclop::<OpType>`, encoded with launch_enc.c (the codec of flexnpu/protocol.py):
 *
 *     args   = ([input...], [output...])   a device operand: TensorRef of its data buffer,
 *                                          contiguous in the descriptor's shape; a constant or
 *                                          host-placed input: [dtype, [shape], [values]]
 *     kwargs = the attributes, by name     bool, int, float, str, lists of them, list of int lists
 *
 * The daemon's operator table (flexnpu/daemon/optable/aclop.py, lowering flexnpu/aclop_ops.py)
 * executes it; an operator type outside the table is refused there, by name. The first launch
 * of each operator type in a process is synchronous, so that such a refusal (and any mistake
 * in the first use of an operator) is returned by the call itself, where torch_npu and C
 * programs check it, as AscendCL reports compile failures; later launches are asynchronous, as
 * on hardware, and their failures surface at the stream's next synchronization.
 *
 * aclopCompile, aclopSetModelDir, aclopLoad, aclopUpdateParams, aclopSetCompileFlag are
 * accepted: there are no per-shape binaries to build or load.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fx_native.h"
#include "launch_enc.h"

#define DESC_MAGIC 0x44455343u   /* "DESC" */
#define BUF_MAGIC 0x42554646u    /* "BUFF" */
#define ATTR_MAGIC 0x41545452u   /* "ATTR" */
#define DEAD_MAGIC 0xDEADDEADu
#define MAX_DIMS 32
#define MAX_OPERANDS 4096
#define MAX_ATTR_VALUES 4096
#define MAX_HOST_VALUES 4096    /* aclop_ops.MAX_HOST_VALUES */
#define MAX_STR 255             /* protocol.MAX_NAME: strings on the wire */

#define ACL_ERROR_INVALID_FILE 100003
#define ACL_ERROR_OP_INPUT_NOT_MATCH 100021
#define ACL_ERROR_OP_OUTPUT_NOT_MATCH 100022
#define ACL_ERROR_OP_ATTR_NOT_MATCH 100023
#define ACL_ERROR_OP_NOT_FOUND 100024
#define ACL_ERROR_UNSUPPORTED_DATA_TYPE 100026
#define ACL_ERROR_FORMAT_NOT_MATCH 100027

enum { MEMTYPE_DEVICE = 0, MEMTYPE_HOST = 1, MEMTYPE_HOST_COMPILE_INDEPENDENT = 2 };

typedef struct aclTensorDesc {
    uint32_t magic;
    int dtype, format, storage_format, origin_format, placement;
    int ndim;                           /* -2: unknown rank (refused at execution) */
    int64_t dims[MAX_DIMS];
    char *name, *dyn_name;
    void *const_data;
    size_t const_len;
} aclTensorDesc;

typedef struct aclDataBuffer {
    uint32_t magic;
    void *data;
    size_t size;
} aclDataBuffer;

enum akind { A_BOOL, A_INT, A_FLOAT, A_STR, A_LBOOL, A_LINT, A_LFLOAT, A_LSTR, A_LLINT };

struct attr {
    char *name;
    enum akind kind;
    int64_t i;
    double f;
    char *s;
    int n;                 /* list length (lists of lists: number of lists) */
    int64_t *ints;         /* A_LINT; A_LLINT: all values, lens[k] of them per list */
    double *floats;
    uint8_t *bools;
    char **strs;
    int *lens;
};

typedef struct aclopAttr {
    uint32_t magic;
    struct attr *a;
    int n, cap;
} aclopAttr;

/* ------------------------------------------------------------------ data types and formats */
FX_API size_t aclDataTypeSize(int dataType) {
    int n = fx_acl_dtype_size(dataType);
    return n > 0 ? (size_t)n : 0;
}

static int plain_format(int f) {
    /* row-major layouts; the packed fractal / 5-D formats are device-specific tilings */
    switch (f) {
    case -1: case 0: case 1: case 2: case 16: case 27: case 30: case 35: case 47: return 1;
    default: return 0;
    }
}

/* ------------------------------------------------------------------ tensor descriptors */
static aclTensorDesc *desc_ok(const aclTensorDesc *d) {
    return d && d->magic == DESC_MAGIC ? (aclTensorDesc *)d : NULL;
}

FX_API aclTensorDesc *aclCreateTensorDesc(int dataType, int numDims, const int64_t *dims, int format) {
    if (numDims != -2 && (numDims < 0 || numDims > MAX_DIMS || (numDims > 0 && !dims))) {
        fx_err(ACL_ERROR_INVALID_PARAM, "aclCreateTensorDesc: %d dimensions%s (at most %d)", numDims,
               numDims > 0 && !dims ? " but dims is NULL" : "", MAX_DIMS);
        return NULL;
    }
    aclTensorDesc *d = calloc(1, sizeof *d);
    if (!d) { fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
    d->magic = DESC_MAGIC;
    d->dtype = dataType;
    d->format = d->storage_format = d->origin_format = format;
    d->ndim = numDims;
    for (int k = 0; k < numDims; k++) d->dims[k] = dims[k];
    return d;
}

FX_API void aclDestroyTensorDesc(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return;
    d->magic = DEAD_MAGIC;
    free(d->name);
    free(d->dyn_name);
    free(d->const_data);
    free(d);
}

FX_API int aclGetTensorDescType(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    return d ? d->dtype : -1;   /* ACL_DT_UNDEFINED */
}

FX_API int aclGetTensorDescFormat(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    return d ? d->format : -1;  /* ACL_FORMAT_UNDEFINED */
}

FX_API size_t aclGetTensorDescElementCount(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || d->ndim < 0) return 0;
    size_t n = 1;
    for (int k = 0; k < d->ndim; k++) {
        if (d->dims[k] < 0) return 0;
        n *= (size_t)d->dims[k];
    }
    return n;
}

FX_API size_t aclGetTensorDescSize(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    return d ? aclGetTensorDescElementCount(d) * aclDataTypeSize(d->dtype) : 0;
}

FX_API size_t aclGetTensorDescNumDims(const aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return 0;
    return d->ndim < 0 ? (size_t)0xFFFFFFFFFFFFFFFEull /* ACL_UNKNOWN_RANK */ : (size_t)d->ndim;
}

FX_API int64_t aclGetTensorDescDim(const aclTensorDesc *desc, size_t index) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || d->ndim < 0 || index >= (size_t)d->ndim) return -1;
    return d->dims[index];
}

FX_API aclError aclGetTensorDescDimV2(const aclTensorDesc *desc, size_t index, int64_t *dimSize) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || !dimSize) return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetTensorDescDimV2: %s is NULL or invalid",
                                      d ? "dimSize" : "desc");
    if (d->ndim < 0 || index >= (size_t)d->ndim)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetTensorDescDimV2: index %zu, the descriptor has %d dims",
                      index, d->ndim);
    *dimSize = d->dims[index];
    return ACL_SUCCESS;
}

FX_API aclError aclGetTensorDescDimRange(const aclTensorDesc *desc, size_t index, size_t dimRangeNum,
                                         int64_t *dimRange) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || !dimRange || dimRangeNum < 2 || d->ndim < 0 || index >= (size_t)d->ndim)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetTensorDescDimRange: bad argument");
    dimRange[0] = dimRange[1] = d->dims[index];   /* static shapes: the range is the dimension */
    return ACL_SUCCESS;
}

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strnlen(s, 4096);
    char *p = malloc(n + 1);
    if (p) { memcpy(p, s, n); p[n] = 0; }
    return p;
}

FX_API void aclSetTensorDescName(aclTensorDesc *desc, const char *name) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return;
    free(d->name);
    d->name = dup_str(name);
}

FX_API const char *aclGetTensorDescName(aclTensorDesc *desc) {
    aclTensorDesc *d = desc_ok(desc);
    return d && d->name ? d->name : "";
}

static aclError set_dims(aclTensorDesc *desc, int numDims, const int64_t *dims, const char *what, int store) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: invalid tensor descriptor %p", what, (void *)desc);
    if (numDims < 0 || numDims > MAX_DIMS || (numDims > 0 && !dims))
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: %d dimensions (at most %d)", what, numDims, MAX_DIMS);
    if (store) {
        d->ndim = numDims;
        for (int k = 0; k < numDims; k++) d->dims[k] = dims[k];
    }
    return ACL_SUCCESS;
}

FX_API aclError aclSetTensorShape(aclTensorDesc *desc, int numDims, const int64_t *dims) {
    return set_dims(desc, numDims, dims, "aclSetTensorShape", 1);
}

/* The storage and origin shapes matter for the packed formats only, which are refused at
 * execution; for plain formats the data is the (view) shape, row-major. */
FX_API aclError aclSetTensorStorageShape(aclTensorDesc *desc, int numDims, const int64_t *dims) {
    return set_dims(desc, numDims, dims, "aclSetTensorStorageShape", 0);
}

FX_API aclError aclSetTensorOriginShape(aclTensorDesc *desc, int numDims, const int64_t *dims) {
    return set_dims(desc, numDims, dims, "aclSetTensorOriginShape", 0);
}

static aclError set_format(aclTensorDesc *desc, int format, int which, const char *what) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: invalid tensor descriptor %p", what, (void *)desc);
    if (which == 0) d->format = format;
    else if (which == 1) d->storage_format = format;
    else d->origin_format = format;
    return ACL_SUCCESS;
}

FX_API aclError aclSetTensorFormat(aclTensorDesc *desc, int format) {
    return set_format(desc, format, 0, "aclSetTensorFormat");
}
FX_API aclError aclSetTensorStorageFormat(aclTensorDesc *desc, int format) {
    return set_format(desc, format, 1, "aclSetTensorStorageFormat");
}
FX_API aclError aclSetTensorOriginFormat(aclTensorDesc *desc, int format) {
    return set_format(desc, format, 2, "aclSetTensorOriginFormat");
}

FX_API aclError aclSetTensorPlaceMent(aclTensorDesc *desc, int memType) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d) return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorPlaceMent: invalid tensor descriptor");
    if (memType < MEMTYPE_DEVICE || memType > MEMTYPE_HOST_COMPILE_INDEPENDENT)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorPlaceMent: unknown memory type %d", memType);
    d->placement = memType;
    return ACL_SUCCESS;
}

FX_API aclError aclSetTensorConst(aclTensorDesc *desc, void *dataBuffer, size_t length) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || !dataBuffer || !length)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorConst: %s", d ? "empty data" : "invalid tensor descriptor");
    if (length > (size_t)MAX_HOST_VALUES * 16)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorConst: %zu bytes; a constant input holds at most %d values",
                      length, MAX_HOST_VALUES);
    void *p = malloc(length);
    if (!p) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    memcpy(p, dataBuffer, length);
    free(d->const_data);
    d->const_data = p;
    d->const_len = length;
    return ACL_SUCCESS;
}

FX_API aclError aclSetTensorDynamicInput(aclTensorDesc *desc, const char *dynamicInputName) {
    aclTensorDesc *d = desc_ok(desc);
    if (!d || !dynamicInputName) return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorDynamicInput: bad argument");
    free(d->dyn_name);
    d->dyn_name = dup_str(dynamicInputName);
    return ACL_SUCCESS;
}

FX_API aclError aclSetTensorShapeRange(aclTensorDesc *desc, size_t dimsCount, int64_t dimsRange[][2]) {
    (void)dimsRange;
    aclTensorDesc *d = desc_ok(desc);
    if (!d || dimsCount > MAX_DIMS) return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorShapeRange: bad argument");
    return ACL_SUCCESS;   /* ranges serve compilation for dynamic shapes; shapes here are static */
}

FX_API aclError aclSetTensorValueRange(aclTensorDesc *desc, size_t valueCount, int64_t valueRange[][2]) {
    (void)valueCount; (void)valueRange;
    return desc_ok(desc) ? ACL_SUCCESS : fx_err(ACL_ERROR_INVALID_PARAM, "aclSetTensorValueRange: invalid descriptor");
}

/* ------------------------------------------------------------------ data buffers */
static aclDataBuffer *buf_ok(const aclDataBuffer *b) {
    return b && b->magic == BUF_MAGIC ? (aclDataBuffer *)b : NULL;
}

FX_API aclDataBuffer *aclCreateDataBuffer(void *data, size_t size) {
    aclDataBuffer *b = calloc(1, sizeof *b);
    if (!b) { fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
    b->magic = BUF_MAGIC;
    b->data = data;
    b->size = size;
    return b;
}

FX_API aclError aclDestroyDataBuffer(const aclDataBuffer *dataBuffer) {
    aclDataBuffer *b = buf_ok(dataBuffer);
    if (!b) return fx_err(ACL_ERROR_INVALID_PARAM, "aclDestroyDataBuffer: invalid data buffer %p", (void *)dataBuffer);
    b->magic = DEAD_MAGIC;
    free(b);
    return ACL_SUCCESS;
}

FX_API aclError aclUpdateDataBuffer(aclDataBuffer *dataBuffer, void *data, size_t size) {
    aclDataBuffer *b = buf_ok(dataBuffer);
    if (!b) return fx_err(ACL_ERROR_INVALID_PARAM, "aclUpdateDataBuffer: invalid data buffer %p", (void *)dataBuffer);
    b->data = data;
    b->size = size;
    return ACL_SUCCESS;
}

FX_API void *aclGetDataBufferAddr(const aclDataBuffer *dataBuffer) {
    aclDataBuffer *b = buf_ok(dataBuffer);
    return b ? b->data : NULL;
}

FX_API uint32_t aclGetDataBufferSize(const aclDataBuffer *dataBuffer) {
    aclDataBuffer *b = buf_ok(dataBuffer);
    return b ? (uint32_t)b->size : 0;
}

FX_API size_t aclGetDataBufferSizeV2(const aclDataBuffer *dataBuffer) {
    aclDataBuffer *b = buf_ok(dataBuffer);
    return b ? b->size : 0;
}

/* ------------------------------------------------------------------ attributes */
static aclopAttr *attr_ok(const aclopAttr *a) {
    return a && a->magic == ATTR_MAGIC ? (aclopAttr *)a : NULL;
}

FX_API aclopAttr *aclopCreateAttr(void) {
    aclopAttr *a = calloc(1, sizeof *a);
    if (!a) { fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
    a->magic = ATTR_MAGIC;
    return a;
}

static void attr_clear(struct attr *e) {
    free(e->s);
    free(e->ints);
    free(e->floats);
    free(e->bools);
    free(e->lens);
    if (e->strs)
        for (int k = 0; k < e->n; k++) free(e->strs[k]);
    free(e->strs);
    char *name = e->name;
    memset(e, 0, sizeof *e);
    e->name = name;
}

FX_API void aclopDestroyAttr(const aclopAttr *attr) {
    aclopAttr *a = attr_ok(attr);
    if (!a) return;
    for (int k = 0; k < a->n; k++) {
        attr_clear(&a->a[k]);
        free(a->a[k].name);
    }
    free(a->a);
    a->magic = DEAD_MAGIC;
    free(a);
}

/* the entry for `name` (replacing an earlier value, as AscendCL does), cleared; NULL on error */
static struct attr *attr_slot(aclopAttr *attr, const char *name, int n, const char *what, aclError *rc) {
    aclopAttr *a = attr_ok(attr);
    *rc = ACL_SUCCESS;
    if (!a) { *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%s: invalid attribute object %p", what, (void *)attr); return NULL; }
    if (!name || !*name || strnlen(name, MAX_STR + 1) > MAX_STR) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%s: the attribute name is NULL, empty or longer than %d bytes", what, MAX_STR);
        return NULL;
    }
    if (n < 0 || n > MAX_ATTR_VALUES) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%s(%s): %d values (at most %d)", what, name, n, MAX_ATTR_VALUES);
        return NULL;
    }
    for (int k = 0; k < a->n; k++)
        if (strcmp(a->a[k].name, name) == 0) {
            attr_clear(&a->a[k]);
            return &a->a[k];
        }
    if (a->n >= MAX_OPERANDS) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%s: too many attributes", what);
        return NULL;
    }
    if (a->n == a->cap) {
        int cap = a->cap ? a->cap * 2 : 8;
        struct attr *p = realloc(a->a, (size_t)cap * sizeof *p);
        if (!p) { *rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
        a->a = p;
        a->cap = cap;
    }
    struct attr *e = &a->a[a->n];
    memset(e, 0, sizeof *e);
    if (!(e->name = dup_str(name))) { *rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
    a->n++;
    return e;
}

#define SET_SCALAR(fn, T, kind_, field, conv)                                         \
    FX_API aclError fn(aclopAttr *attr, const char *attrName, T attrValue) {         \
        aclError rc;                                                                  \
        struct attr *e = attr_slot(attr, attrName, 0, #fn, &rc);                     \
        if (!e) return rc;                                                            \
        e->kind = kind_;                                                              \
        e->field = conv;                                                              \
        return ACL_SUCCESS;                                                           \
    }

SET_SCALAR(aclopSetAttrBool, uint8_t, A_BOOL, i, attrValue != 0)
SET_SCALAR(aclopSetAttrInt, int64_t, A_INT, i, attrValue)
SET_SCALAR(aclopSetAttrFloat, float, A_FLOAT, f, (double)attrValue)
SET_SCALAR(aclopSetAttrDataType, int, A_INT, i, attrValue)   /* the aclDataType code, as an int */

FX_API aclError aclopSetAttrString(aclopAttr *attr, const char *attrName, const char *attrValue) {
    aclError rc;
    if (!attrValue) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrString: value is NULL");
    if (strnlen(attrValue, MAX_STR + 1) > MAX_STR)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrString: value longer than %d bytes", MAX_STR);
    struct attr *e = attr_slot(attr, attrName, 0, "aclopSetAttrString", &rc);
    if (!e) return rc;
    e->kind = A_STR;
    if (!(e->s = dup_str(attrValue))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    return ACL_SUCCESS;
}

static void *copy_array(const void *src, size_t n, size_t size, aclError *rc) {
    void *p = malloc(n ? n * size : 1);
    if (!p) { *rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); return NULL; }
    if (n) memcpy(p, src, n * size);
    return p;
}

FX_API aclError aclopSetAttrListBool(aclopAttr *attr, const char *attrName, int numValues, const uint8_t *values) {
    aclError rc;
    if (numValues > 0 && !values) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListBool: values is NULL");
    struct attr *e = attr_slot(attr, attrName, numValues, "aclopSetAttrListBool", &rc);
    if (!e) return rc;
    e->kind = A_LBOOL;
    e->n = numValues;
    return (e->bools = copy_array(values, (size_t)numValues, 1, &rc)) ? ACL_SUCCESS : rc;
}

FX_API aclError aclopSetAttrListInt(aclopAttr *attr, const char *attrName, int numValues, const int64_t *values) {
    aclError rc;
    if (numValues > 0 && !values) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListInt: values is NULL");
    struct attr *e = attr_slot(attr, attrName, numValues, "aclopSetAttrListInt", &rc);
    if (!e) return rc;
    e->kind = A_LINT;
    e->n = numValues;
    return (e->ints = copy_array(values, (size_t)numValues, sizeof(int64_t), &rc)) ? ACL_SUCCESS : rc;
}

FX_API aclError aclopSetAttrListDataType(aclopAttr *attr, const char *attrName, int numValues, const int *values) {
    aclError rc;
    if (numValues > 0 && !values) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListDataType: values is NULL");
    struct attr *e = attr_slot(attr, attrName, numValues, "aclopSetAttrListDataType", &rc);
    if (!e) return rc;
    e->kind = A_LINT;
    e->n = numValues;
    if (!(e->ints = malloc(((size_t)numValues + 1) * sizeof(int64_t)))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    for (int k = 0; k < numValues; k++) e->ints[k] = values[k];
    return ACL_SUCCESS;
}

FX_API aclError aclopSetAttrListFloat(aclopAttr *attr, const char *attrName, int numValues, const float *values) {
    aclError rc;
    if (numValues > 0 && !values) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListFloat: values is NULL");
    struct attr *e = attr_slot(attr, attrName, numValues, "aclopSetAttrListFloat", &rc);
    if (!e) return rc;
    e->kind = A_LFLOAT;
    e->n = numValues;
    if (!(e->floats = malloc(((size_t)numValues + 1) * sizeof(double)))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    for (int k = 0; k < numValues; k++) e->floats[k] = values[k];
    return ACL_SUCCESS;
}

FX_API aclError aclopSetAttrListString(aclopAttr *attr, const char *attrName, int numValues, const char **values) {
    aclError rc;
    if (numValues > 0 && !values) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListString: values is NULL");
    for (int k = 0; k < numValues; k++)
        if (!values[k] || strnlen(values[k], MAX_STR + 1) > MAX_STR)
            return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListString: value %d is NULL or longer than %d bytes", k, MAX_STR);
    struct attr *e = attr_slot(attr, attrName, numValues, "aclopSetAttrListString", &rc);
    if (!e) return rc;
    e->kind = A_LSTR;
    if (!(e->strs = calloc((size_t)numValues + 1, sizeof(char *)))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    for (int k = 0; k < numValues; k++) {
        if (!(e->strs[k] = dup_str(values[k]))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
        e->n = k + 1;
    }
    return ACL_SUCCESS;
}

FX_API aclError aclopSetAttrListListInt(aclopAttr *attr, const char *attrName, int numLists, const int *numValues,
                                        const int64_t *const values[]) {
    aclError rc;
    if (numLists > 0 && (!numValues || !values))
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListListInt: numValues or values is NULL");
    size_t total = 0;
    for (int k = 0; k < numLists; k++) {
        if (numValues[k] < 0 || (numValues[k] > 0 && !values[k]))
            return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListListInt: list %d is malformed", k);
        total += (size_t)numValues[k];
    }
    if (total > MAX_ATTR_VALUES)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclopSetAttrListListInt: %zu values (at most %d)", total, MAX_ATTR_VALUES);
    struct attr *e = attr_slot(attr, attrName, numLists, "aclopSetAttrListListInt", &rc);
    if (!e) return rc;
    e->kind = A_LLINT;
    e->n = numLists;
    if (!(e->lens = copy_array(numValues, (size_t)numLists, sizeof(int), &rc))) return rc;
    if (!(e->ints = malloc((total + 1) * sizeof(int64_t)))) return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    size_t pos = 0;
    for (int k = 0; k < numLists; k++)
        for (int j = 0; j < numValues[k]; j++) e->ints[pos++] = values[k][j];
    return ACL_SUCCESS;
}

static void enc_attr(struct fx_enc *e, const struct attr *a) {
    fx_enc_str(e, a->name);
    switch (a->kind) {
    case A_BOOL: fx_enc_bool(e, (int)a->i); break;
    case A_INT: fx_enc_int(e, a->i); break;
    case A_FLOAT: fx_enc_float(e, a->f); break;
    case A_STR: fx_enc_str(e, a->s); break;
    case A_LBOOL: fx_enc_list(e, (unsigned)a->n); for (int k = 0; k < a->n; k++) fx_enc_bool(e, a->bools[k] != 0); break;
    case A_LINT: fx_enc_list(e, (unsigned)a->n); for (int k = 0; k < a->n; k++) fx_enc_int(e, a->ints[k]); break;
    case A_LFLOAT: fx_enc_list(e, (unsigned)a->n); for (int k = 0; k < a->n; k++) fx_enc_float(e, a->floats[k]); break;
    case A_LSTR: fx_enc_list(e, (unsigned)a->n); for (int k = 0; k < a->n; k++) fx_enc_str(e, a->strs[k]); break;
    case A_LLINT: {
        fx_enc_list(e, (unsigned)a->n);
        size_t pos = 0;
        for (int k = 0; k < a->n; k++) {
            fx_enc_list(e, (unsigned)a->lens[k]);
            for (int j = 0; j < a->lens[k]; j++) fx_enc_int(e, a->ints[pos++]);
        }
        break;
    }
    }
}

/* ------------------------------------------------------------------ operands */
static float half_to_float(uint16_t h) {
    uint32_t s = (uint32_t)(h >> 15) << 31, ex = (h >> 10) & 0x1F, m = h & 0x3FF;
    float f;
    if (ex == 0) f = ldexpf((float)m, -24);
    else if (ex == 31) f = m ? NAN : INFINITY;
    else f = ldexpf((float)(m | 0x400), (int)ex - 25);
    return s ? -f : f;
}

/* One host value of `dtype` at p into the launch (constants and host-placed inputs). */
static void enc_host_value(struct fx_enc *e, int dtype, const uint8_t *p) {
    switch (dtype) {
    case 0: { float v; memcpy(&v, p, 4); fx_enc_float(e, v); break; }
    case 1: { uint16_t v; memcpy(&v, p, 2); fx_enc_float(e, half_to_float(v)); break; }
    case 27: { uint16_t v; memcpy(&v, p, 2); uint32_t w = (uint32_t)v << 16; float f; memcpy(&f, &w, 4); fx_enc_float(e, f); break; }
    case 11: { double v; memcpy(&v, p, 8); fx_enc_float(e, v); break; }
    case 2: fx_enc_int(e, (int8_t)p[0]); break;
    case 4: fx_enc_int(e, p[0]); break;
    case 6: { int16_t v; memcpy(&v, p, 2); fx_enc_int(e, v); break; }
    case 7: { uint16_t v; memcpy(&v, p, 2); fx_enc_int(e, v); break; }
    case 3: { int32_t v; memcpy(&v, p, 4); fx_enc_int(e, v); break; }
    case 8: { uint32_t v; memcpy(&v, p, 4); fx_enc_int(e, v); break; }
    case 9: { int64_t v; memcpy(&v, p, 8); fx_enc_int(e, v); break; }
    case 10: { uint64_t v; memcpy(&v, p, 8); fx_enc_int(e, (int64_t)v); break; }
    case 12: fx_enc_bool(e, p[0] != 0); break;
    default: fx_enc_fail(e, ACL_ERROR_UNSUPPORTED_DATA_TYPE, "host values of data type %d cannot be read", dtype);
    }
}

static void enc_operand(struct fx_enc *e, const char *op, const char *role, int k, const aclTensorDesc *desc,
                        const aclDataBuffer *buf, int is_output) {
    aclTensorDesc *d = desc_ok(desc);
    aclDataBuffer *b = buf_ok(buf);
    if (!d) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: invalid tensor descriptor %p", op, role, k, (void *)desc); return; }
    int isz = fx_acl_dtype_size(d->dtype);
    if (isz <= 0 || fx_acl_dtype_to_wire(d->dtype) < 0) {
        fx_enc_fail(e, ACL_ERROR_UNSUPPORTED_DATA_TYPE, "%s: %s %d: data type %d is not supported", op, role, k, d->dtype);
        return;
    }
    if (!plain_format(d->format) || !plain_format(d->storage_format)) {
        fx_enc_fail(e, ACL_ERROR_FORMAT_NOT_MATCH, "%s: %s %d: format %d is a packed device layout; FlexNPU supports "
                    "plain row-major formats (ND, NCHW, NHWC, ...)", op, role, k,
                    plain_format(d->format) ? d->storage_format : d->format);
        return;
    }
    if (d->ndim < 0) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: unknown rank", op, role, k); return; }
    int64_t strides[MAX_DIMS];
    uint64_t numel = 1;
    for (int j = d->ndim - 1; j >= 0; j--) {
        if (d->dims[j] < 0 || d->dims[j] > (1ll << 40)) {
            fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: dimension %d is %lld (dynamic shapes are not supported)",
                        op, role, k, j, (long long)d->dims[j]);
            return;
        }
        strides[j] = (int64_t)numel;
        numel *= (uint64_t)(d->dims[j] ? d->dims[j] : 1);
        if (numel > (1ull << 48)) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d is too large", op, role, k); return; }
    }
    for (int j = 0; j < d->ndim; j++) if (d->dims[j] == 0) numel = 0;
    uint64_t nbytes = numel * (uint64_t)isz;
    const uint8_t *host = NULL;
    if (!is_output && d->const_data) {
        if (d->const_len < nbytes) {
            fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: constant of %zu bytes, the descriptor needs %llu", op,
                        role, k, d->const_len, (unsigned long long)nbytes);
            return;
        }
        host = d->const_data;
    } else if (!b) {
        fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: invalid data buffer %p", op, role, k, (void *)buf);
        return;
    } else if (b->size < nbytes) {
        fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: data buffer holds %zu bytes, its descriptor needs %llu",
                    op, role, k, b->size, (unsigned long long)nbytes);
        return;
    } else if (!is_output && d->placement != MEMTYPE_DEVICE) {
        if (!b->data && nbytes) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: NULL host data", op, role, k); return; }
        host = b->data;
    }
    if (host || (!is_output && numel == 0 && !(b && b->data))) {
        if (numel > MAX_HOST_VALUES) {
            fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%s: %s %d: a host-resident input holds at most %d values (it has "
                        "%llu); put larger operands in device memory", op, role, k, MAX_HOST_VALUES, (unsigned long long)numel);
            return;
        }
        fx_enc_list(e, 3);
        fx_enc_dtype(e, d->dtype);
        fx_enc_list(e, (unsigned)d->ndim);
        for (int j = 0; j < d->ndim; j++) fx_enc_int(e, d->dims[j]);
        fx_enc_list(e, (unsigned)numel);
        for (uint64_t j = 0; j < numel; j++) enc_host_value(e, d->dtype, host + j * (uint64_t)isz);
        return;
    }
    fx_enc_tensor(e, b->data, d->dtype, d->dims, strides, (uint64_t)d->ndim, 0);
}

/* ------------------------------------------------------------------ execution */
/* Operator types that have run once in this process: their later launches are asynchronous. */
#define SEEN_CAP 1024
static char *seen[SEEN_CAP];
static int nseen;
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;

void fx_aclop_after_fork(void) { pthread_mutex_init(&seen_lock, NULL); }

static int was_seen(const char *op) {
    pthread_mutex_lock(&seen_lock);
    int r = 0;
    for (int k = 0; k < nseen && !r; k++) r = strcmp(seen[k], op) == 0;
    pthread_mutex_unlock(&seen_lock);
    return r;
}

static void mark_seen(const char *op) {
    pthread_mutex_lock(&seen_lock);
    int r = 0;
    for (int k = 0; k < nseen && !r; k++) r = strcmp(seen[k], op) == 0;
    if (!r && nseen < SEEN_CAP && (seen[nseen] = dup_str(op))) nseen++;
    pthread_mutex_unlock(&seen_lock);
}

static aclError exec_op(const char *what, const char *opType, int numInputs, const aclTensorDesc *const inputDesc[],
                        const aclDataBuffer *const inputs[], int numOutputs, const aclTensorDesc *const outputDesc[],
                        aclDataBuffer *const outputs[], const aclopAttr *attr, aclrtStream stream) {
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "%s before aclInit", what);
    if (!opType || !*opType || strnlen(opType, 200) >= 200)
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: the operator type is NULL, empty or too long", what);
    if (numInputs < 0 || numInputs > MAX_OPERANDS || numOutputs < 0 || numOutputs > MAX_OPERANDS ||
        (numInputs && (!inputDesc || !inputs)) || (numOutputs && (!outputDesc || !outputs)))
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s(%s): %d inputs, %d outputs, or their arrays are NULL", what, opType,
                      numInputs, numOutputs);
    aclopAttr *a = NULL;
    if (attr && !(a = attr_ok(attr)))
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s(%s): invalid attribute object %p", what, opType, (void *)attr);
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    char name[256];
    snprintf(name, sizeof name, "aclop::%s", opType);
    struct fx_enc e;
    fx_enc_begin(&e, name, what);
    fx_enc_tuple(&e, 2);
    fx_enc_list(&e, (unsigned)numInputs);
    for (int k = 0; k < numInputs; k++) enc_operand(&e, opType, "input", k, inputDesc[k], inputs[k], 0);
    fx_enc_list(&e, (unsigned)numOutputs);
    for (int k = 0; k < numOutputs; k++) enc_operand(&e, opType, "output", k, outputDesc[k], outputs[k], 1);
    fx_enc_count(&e, a ? (unsigned)a->n : 0);
    for (int k = 0; a && k < a->n; k++) enc_attr(&e, &a->a[k]);
    fx_enc_count(&e, 0);
    /* the first launch of a type answers synchronously (not while capturing: a capture
     * cannot wait) */
    int sync = !was_seen(opType) && !fx_graph_capturing(d->index, sid);
    rc = fx_enc_submit(&e, stream, sync);
    fx_enc_free(&e);
    if (rc == ACL_SUCCESS && sync) mark_seen(opType);
    if (rc == ACL_ERROR_API_NOT_SUPPORT) {
        /* the daemon's table does not know the type: AscendCL's code for it, the message kept */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", aclGetRecentErrMsg());
        const char *body = strstr(msg, "] error ");
        body = body ? strstr(body, ": ") : NULL;
        return fx_err(ACL_ERROR_OP_NOT_FOUND, "%s", body ? body + 2 : msg);
    }
    return rc;
}

FX_API aclError aclopCompileAndExecute(const char *opType, int numInputs, const aclTensorDesc *const inputDesc[],
                                       const aclDataBuffer *const inputs[], int numOutputs,
                                       const aclTensorDesc *const outputDesc[], aclDataBuffer *const outputs[],
                                       const aclopAttr *attr, int engineType, int compileFlag, const char *opPath,
                                       aclrtStream stream) {
    (void)engineType; (void)compileFlag; (void)opPath;
    return exec_op("aclopCompileAndExecute", opType, numInputs, inputDesc, inputs, numOutputs, outputDesc, outputs,
                   attr, stream);
}

FX_API aclError aclopCompileAndExecuteV2(const char *opType, int numInputs, aclTensorDesc *inputDesc[],
                                         aclDataBuffer *inputs[], int numOutputs, aclTensorDesc *outputDesc[],
                                         aclDataBuffer *outputs[], aclopAttr *attr, int engineType, int compileFlag,
                                         const char *opPath, aclrtStream stream) {
    /* V2 may update the output descriptors with inferred shapes; the table checks that the given
     * ones are right, so they are left as they are */
    (void)engineType; (void)compileFlag; (void)opPath;
    return exec_op("aclopCompileAndExecuteV2", opType, numInputs, (const aclTensorDesc *const *)inputDesc,
                   (const aclDataBuffer *const *)inputs, numOutputs, (const aclTensorDesc *const *)outputDesc, outputs,
                   attr, stream);
}

FX_API aclError aclopExecute(const char *opType, int numInputs, const aclTensorDesc *const inputDesc[],
                             const aclDataBuffer *const inputs[], int numOutputs, const aclTensorDesc *const outputDesc[],
                             aclDataBuffer *const outputs[], const aclopAttr *attr, aclrtStream stream) {
    return exec_op("aclopExecute", opType, numInputs, inputDesc, inputs, numOutputs, outputDesc, outputs, attr, stream);
}

FX_API aclError aclopExecuteV2(const char *opType, int numInputs, aclTensorDesc *inputDesc[], aclDataBuffer *inputs[],
                               int numOutputs, aclTensorDesc *outputDesc[], aclDataBuffer *outputs[], aclopAttr *attr,
                               aclrtStream stream) {
    return exec_op("aclopExecuteV2", opType, numInputs, (const aclTensorDesc *const *)inputDesc,
                   (const aclDataBuffer *const *)inputs, numOutputs, (const aclTensorDesc *const *)outputDesc, outputs,
                   attr, stream);
}

FX_API aclError aclopCast(const aclTensorDesc *srcDesc, const aclDataBuffer *srcBuffer, const aclTensorDesc *dstDesc,
                          aclDataBuffer *dstBuffer, uint8_t truncate, aclrtStream stream) {
    (void)truncate;
    aclTensorDesc *dd = desc_ok(dstDesc);
    if (!dd) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopCast: invalid destination descriptor");
    aclopAttr *a = aclopCreateAttr();
    if (!a) return ACL_ERROR_BAD_ALLOC;
    aclError rc = aclopSetAttrInt(a, "dst_type", dd->dtype);
    if (!rc) rc = exec_op("aclopCast", "Cast", 1, &srcDesc, &srcBuffer, 1, &dstDesc, &dstBuffer, a, stream);
    aclopDestroyAttr(a);
    return rc;
}

/* ------------------------------------------------------------------ compilation: nothing to do */
static aclError check_descs(const char *what, const char *opType, int n, const aclTensorDesc *const descs[]) {
    if (!opType || !*opType) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: the operator type is NULL or empty", what);
    if (n < 0 || n > MAX_OPERANDS || (n && !descs)) return fx_err(ACL_ERROR_INVALID_PARAM, "%s(%s): bad descriptor array", what, opType);
    for (int k = 0; k < n; k++)
        if (!desc_ok(descs[k])) return fx_err(ACL_ERROR_INVALID_PARAM, "%s(%s): invalid tensor descriptor %d", what, opType, k);
    return ACL_SUCCESS;
}

FX_API aclError aclopCompile(const char *opType, int numInputs, const aclTensorDesc *const inputDesc[], int numOutputs,
                             const aclTensorDesc *const outputDesc[], const aclopAttr *attr, int engineType,
                             int compileFlag, const char *opPath) {
    (void)engineType; (void)compileFlag; (void)opPath;
    aclError rc = check_descs("aclopCompile", opType, numInputs, inputDesc);
    if (!rc) rc = check_descs("aclopCompile", opType, numOutputs, outputDesc);
    if (!rc && attr && !attr_ok(attr)) rc = fx_err(ACL_ERROR_INVALID_PARAM, "aclopCompile(%s): invalid attribute object", opType);
    return rc;   /* operators run as the daemon's kernels: there is no binary to build */
}

FX_API aclError aclopUpdateParams(const char *opType, int numInputs, const aclTensorDesc *const inputDesc[],
                                  int numOutputs, const aclTensorDesc *const outputDesc[], const aclopAttr *attr) {
    return aclopCompile(opType, numInputs, inputDesc, numOutputs, outputDesc, attr, 0, 0, NULL);
}

FX_API aclError aclopSetModelDir(const char *modelDir) {
    struct stat st;
    if (!modelDir || stat(modelDir, &st) != 0 || !S_ISDIR(st.st_mode))
        return fx_err(ACL_ERROR_INVALID_FILE, "aclopSetModelDir: %s is not a directory", modelDir ? modelDir : "(null)");
    return ACL_SUCCESS;   /* compiled single-operator models are not needed */
}

FX_API aclError aclopLoad(const void *model, size_t modelSize) {
    if (!model || !modelSize) return fx_err(ACL_ERROR_INVALID_PARAM, "aclopLoad: empty model");
    return ACL_SUCCESS;
}

FX_API aclError aclopSetCompileFlag(int flag) {
    (void)flag;
    return ACL_SUCCESS;
}
