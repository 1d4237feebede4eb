/* FlexNPU native front end: the launch codec of flexnpu/protocol.py (encode_launch), in C.
 *
 * One operator call (aclnn or aclop) becomes one LAUNCH record whose payload is
 *     u16 name_len | name | args (a TUPLE value) | u16 n_kwargs | (STR key, value)* | u16 n_outputs
 * with the tagged values of protocol.py (tags and dtype codes generated into fx_proto.h). The
 * native front end never declares fresh outputs: operators write into tensors the caller
 * allocated, so n_outputs is 0.
 *
 * Usage: fx_enc_begin(&e, "aclnn::Add", "aclnnAdd"); fx_enc_tuple(&e, 4); <4 values>;
 * fx_enc_count(&e, 0) (no kwargs); fx_enc_count(&e, 0) (no outputs); fx_enc_submit(&e, stream, 0);
 * fx_enc_free(&e). Errors are sticky: the first one (bad address, unknown dtype, too large) is
 * kept in e.err with its message in aclGetRecentErrMsg, every later call does nothing.
 */
#ifndef FX_LAUNCH_ENC_H
#define FX_LAUNCH_ENC_H
#include "fx_native.h"

struct fx_enc {
    uint8_t *buf;
    size_t len, cap;
    aclError err;           /* first error, ACL_SUCCESS while none */
    struct fx_dev *dev;     /* the device of the tensors seen so far (all must agree) */
    const char *what;       /* the API name, for messages */
};

/* aclDataType -> wire dtype code (FXDT_*), -1 if it has no torch dtype */
int fx_acl_dtype_to_wire(int acl_dtype);
/* bytes per element of an aclDataType we can send (0 if none) */
int fx_acl_dtype_size(int acl_dtype);

void fx_enc_begin(struct fx_enc *e, const char *op, const char *what);
void fx_enc_tuple(struct fx_enc *e, unsigned n);
void fx_enc_list(struct fx_enc *e, unsigned n);
void fx_enc_count(struct fx_enc *e, unsigned n);    /* raw u16: kwargs / outputs count */
void fx_enc_none(struct fx_enc *e);
void fx_enc_bool(struct fx_enc *e, int v);
void fx_enc_int(struct fx_enc *e, int64_t v);
void fx_enc_float(struct fx_enc *e, double v);
void fx_enc_complex(struct fx_enc *e, double re, double im);
void fx_enc_str(struct fx_enc *e, const char *s);
void fx_enc_dtype(struct fx_enc *e, int acl_dtype);  /* an aclDataType argument */
/* A tensor: `data` is a device address (the storage base), `offset` the view's storage offset
 * in elements. Becomes TensorRef(handle, dtype, shape, stride, offset from the allocation's
 * start in elements). A tensor with no elements and no storage (data NULL) travels as the
 * tuple ("empty", dtype, [shape]). */
void fx_enc_tensor(struct fx_enc *e, const void *data, int acl_dtype, const int64_t *shape, const int64_t *stride,
                   uint64_t ndim, int64_t offset);
void fx_enc_fail(struct fx_enc *e, aclError code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Push the record on `stream` (NULL: the thread's device, default stream). Asynchronous unless
 * `sync`: like an operator on hardware, a failure then surfaces at the stream's next sync. */
aclError fx_enc_submit(struct fx_enc *e, aclrtStream stream, int sync);
void fx_enc_free(struct fx_enc *e);
#endif
