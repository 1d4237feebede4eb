/* FlexNPU native front end: the C encoder of protocol.py's launch codec (see launch_enc.h). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch_enc.h"

/* aclDataType (acl_base_rt.h) -> wire dtype code and element size */
static const struct { int acl, wire, size; } DTYPES[] = {
    {0, FXDT_float32, 4},   {1, FXDT_float16, 2},  {2, FXDT_int8, 1},     {3, FXDT_int32, 4},
    {4, FXDT_uint8, 1},     {6, FXDT_int16, 2},    {7, FXDT_uint16, 2},   {8, FXDT_uint32, 4},
    {9, FXDT_int64, 8},     {10, FXDT_uint64, 8},  {11, FXDT_float64, 8}, {12, FXDT_bool, 1},
    {16, FXDT_complex64, 8}, {17, FXDT_complex128, 16}, {27, FXDT_bfloat16, 2},
    {35, FXDT_float8_e5m2, 1}, {36, FXDT_float8_e4m3fn, 1},
};

int fx_acl_dtype_to_wire(int acl) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
        if (DTYPES[i].acl == acl) return DTYPES[i].wire;
    return -1;
}

int fx_acl_dtype_size(int acl) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof *DTYPES; i++)
        if (DTYPES[i].acl == acl) return DTYPES[i].size;
    return 0;
}

void fx_enc_fail(struct fx_enc *e, aclError code, const char *fmt, ...) {
    if (e->err) return;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    e->err = fx_err(code, "%s: %s", e->what, msg);
}

static void put(struct fx_enc *e, const void *p, size_t n) {
    if (e->err) return;
    if (e->len + n > e->cap) {
        size_t cap = e->cap ? e->cap : 256;
        while (cap < e->len + n) cap *= 2;
        if (cap > FXP_MAX_PAYLOAD) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "operator arguments too large"); return; }
        uint8_t *b = realloc(e->buf, cap);
        if (!b) { fx_enc_fail(e, ACL_ERROR_BAD_ALLOC, "out of host memory"); return; }
        e->buf = b;
        e->cap = cap;
    }
    memcpy(e->buf + e->len, p, n);
    e->len += n;
}

static void u8(struct fx_enc *e, unsigned v) { uint8_t b = (uint8_t)v; put(e, &b, 1); }
static void u16(struct fx_enc *e, unsigned v) { uint16_t x = (uint16_t)v; put(e, &x, 2); }   /* x86-64 / aarch64: little-endian */

void fx_enc_begin(struct fx_enc *e, const char *op, const char *what) {
    memset(e, 0, sizeof *e);
    e->what = what;
    size_t n = strlen(op);
    if (n > FXL_MAX_NAME) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "operator name too long"); return; }
    u16(e, (unsigned)n);
    put(e, op, n);
}

static void seq(struct fx_enc *e, unsigned tag, unsigned n) {
    if (n > FXL_MAX_ITEMS) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "%u items in one argument (max %d)", n, FXL_MAX_ITEMS); return; }
    u8(e, tag);
    u16(e, n);
}

void fx_enc_tuple(struct fx_enc *e, unsigned n) { seq(e, FXT_TUPLE, n); }
void fx_enc_list(struct fx_enc *e, unsigned n) { seq(e, FXT_LIST, n); }
void fx_enc_count(struct fx_enc *e, unsigned n) {
    if (n > FXL_MAX_ITEMS) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "count %u too large", n); return; }
    u16(e, n);
}
void fx_enc_none(struct fx_enc *e) { u8(e, FXT_NONE); }
void fx_enc_bool(struct fx_enc *e, int v) { u8(e, v ? FXT_TRUE : FXT_FALSE); }
void fx_enc_int(struct fx_enc *e, int64_t v) { u8(e, FXT_INT); put(e, &v, 8); }
void fx_enc_float(struct fx_enc *e, double v) { u8(e, FXT_FLOAT); put(e, &v, 8); }
void fx_enc_complex(struct fx_enc *e, double re, double im) { u8(e, FXT_COMPLEX); put(e, &re, 8); put(e, &im, 8); }

void fx_enc_str(struct fx_enc *e, const char *s) {
    if (!s) { fx_enc_none(e); return; }
    size_t n = strnlen(s, FXL_MAX_NAME + 1);
    if (n > FXL_MAX_NAME) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "string argument longer than %d bytes", FXL_MAX_NAME); return; }
    u8(e, FXT_STR);
    u16(e, (unsigned)n);
    put(e, s, n);
}

void fx_enc_dtype(struct fx_enc *e, int acl) {
    int w = fx_acl_dtype_to_wire(acl);
    if (w < 0) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "aclDataType %d is not supported", acl); return; }
    u8(e, FXT_DTYPE);
    u8(e, (unsigned)w);
}

void fx_enc_tensor(struct fx_enc *e, const void *data, int acl, const int64_t *shape, const int64_t *stride,
                   uint64_t ndim, int64_t offset) {
    if (e->err) return;
    int w = fx_acl_dtype_to_wire(acl), size = fx_acl_dtype_size(acl);
    if (w < 0) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "tensor of aclDataType %d is not supported", acl); return; }
    if (ndim > FXL_MAX_NDIM) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "tensor with %llu dimensions (max %d)", (unsigned long long)ndim, FXL_MAX_NDIM); return; }
    if (ndim && (!shape || !stride)) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "tensor without shape or strides"); return; }
    int numel = 1;   /* has elements */
    for (uint64_t i = 0; i < ndim; i++) if (shape[i] == 0) numel = 0;
    if (!data) {
        if (numel) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "tensor with elements but no data"); return; }
        /* no storage at all: the daemon makes an empty tensor of this dtype and shape */
        fx_enc_tuple(e, 3);
        fx_enc_str(e, "empty");
        u8(e, FXT_DTYPE);
        u8(e, (unsigned)w);
        fx_enc_list(e, (unsigned)ndim);
        for (uint64_t i = 0; i < ndim; i++) fx_enc_int(e, shape[i]);
        return;
    }
    struct fx_dev *d;
    uint64_t h, off, avail;
    aclError rc = fx_mem_lookup(data, &d, &h, &off, &avail, e->what);
    if (rc) { e->err = rc; return; }
    if (e->dev && e->dev != d) { fx_enc_fail(e, ACL_ERROR_RT_STREAM_CONTEXT, "tensors on different devices"); return; }
    e->dev = d;
    if (h > UINT32_MAX) { fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "device handle out of range"); return; }
    if (off % (uint64_t)size) {
        fx_enc_fail(e, ACL_ERROR_INVALID_PARAM, "tensor data %p is not aligned to its %d-byte elements", data, size);
        return;
    }
    u8(e, FXT_TENSOR);
    uint32_t h32 = (uint32_t)h;
    put(e, &h32, 4);
    u8(e, (unsigned)w);
    u8(e, (unsigned)ndim);
    put(e, shape, 8 * ndim);
    put(e, stride, 8 * ndim);
    int64_t o = (int64_t)(off / (uint64_t)size) + offset;   /* the daemon bounds-checks the view */
    put(e, &o, 8);
}

aclError fx_enc_submit(struct fx_enc *e, aclrtStream stream, int sync) {
    if (e->err) return e->err;
    aclError rc;
    struct fx_dev *d;
    uint32_t sid = 0;
    if (stream) {
        if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    } else if (!(d = fx_cur(&rc))) {
        return rc;
    }
    if (e->dev && e->dev != d)
        return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "%s: the tensors and the stream are on different devices", e->what);
    pthread_mutex_lock(&d->lock);
    int64_t off = fx_stage_locked(d, e->buf, e->len);
    if (off < 0) {
        pthread_mutex_unlock(&d->lock);
        return fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: no arena space for the operator's arguments", e->what);
    }
    struct fx_sqe q = {.opcode = FXOP_LAUNCH, .stream = sid, .payload_off = (uint32_t)off, .payload_len = (uint32_t)e->len};
    if (sync) {
        struct fx_cqe c;
        rc = fx_call_locked(d, &q, &c, NULL, 0, e->what);
    } else {
        rc = fx_push_locked(d, &q);
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

void fx_enc_free(struct fx_enc *e) {
    free(e->buf);
    e->buf = NULL;
    e->len = e->cap = 0;
}
