/* Operators from a plain AscendCL C program: aclopCompileAndExecute("Add") and friends (declared
 * by the CANN headers the torch_npu wheel ships: acl/acl.h, acl/acl_op_compiler.h) and aclnnAdd
 * looked up with dlopen("libopapi.so") as torch_npu does (the wheel ships no aclnn headers: the
 * few prototypes are declared below, as CANN documents them). Run under `flexnpu run`.
 * Usage: acl_op          everything; prints OK
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"
#include "acl/acl_op_compiler.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
#define EXPECT(call, want) do { aclError r_ = (call); CHECK(r_ == (want), "%s returned %d, expected %d (%s)", #call, r_, \
    (int)(want), aclGetRecentErrMsg()); } while (0)
#define OK(call) EXPECT(call, ACL_SUCCESS)

/* the aclnn API (CANN's aclnn_add.h, aclnn/acl_meta.h) */
typedef struct aclTensor aclTensor;
typedef struct aclScalar aclScalar;
typedef struct aclOpExecutor aclOpExecutor;
typedef aclTensor *(*CreateTensorFn)(const int64_t *, uint64_t, aclDataType, const int64_t *, int64_t, aclFormat,
                                     const int64_t *, uint64_t, void *);
typedef aclScalar *(*CreateScalarFn)(void *, aclDataType);
typedef int (*DestroyTensorFn)(const aclTensor *);
typedef int (*DestroyScalarFn)(const aclScalar *);
typedef int (*AddWsFn)(const aclTensor *, const aclTensor *, const aclScalar *, aclTensor *, uint64_t *, aclOpExecutor **);
typedef int (*AddFn)(void *, uint64_t, aclOpExecutor *, aclrtStream);

#define R 3
#define C 4
#define N (R * C)

static void *dev_from(const float *host, size_t n) {
    void *p = NULL;
    OK(aclrtMalloc(&p, n * sizeof(float), ACL_MEM_MALLOC_HUGE_FIRST));
    if (host) OK(aclrtMemcpy(p, n * sizeof(float), host, n * sizeof(float), ACL_MEMCPY_HOST_TO_DEVICE));
    return p;
}

static void to_host(float *host, const void *dev, size_t n) {
    OK(aclrtMemcpy(host, n * sizeof(float), dev, n * sizeof(float), ACL_MEMCPY_DEVICE_TO_HOST));
}

static int close_to(const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (fabsf(a[i] - b[i]) > 1e-5f * (1 + fabsf(b[i]))) return 0;
    return 1;
}

int main(void) {
    OK(aclInit(NULL));
    OK(aclrtSetDevice(0));
    aclrtStream s = NULL;
    OK(aclrtCreateStream(&s));
    float a[N], b[N], out[N], want[N];
    for (int i = 0; i < N; i++) { a[i] = (float)i * 0.5f - 2; b[i] = (float)(i % 5) + 0.25f; }
    void *da = dev_from(a, N), *db = dev_from(b, N), *dout = dev_from(NULL, N);

    int64_t dims[2] = {R, C};
    aclTensorDesc *desc = aclCreateTensorDesc(ACL_FLOAT, 2, dims, ACL_FORMAT_ND);
    CHECK(desc != NULL, "aclCreateTensorDesc");
    CHECK(aclGetTensorDescType(desc) == ACL_FLOAT && aclGetTensorDescFormat(desc) == ACL_FORMAT_ND, "desc type/format");
    CHECK(aclGetTensorDescNumDims(desc) == 2 && aclGetTensorDescElementCount(desc) == N, "desc dims");
    CHECK(aclGetTensorDescSize(desc) == N * sizeof(float), "desc size %zu", aclGetTensorDescSize(desc));
    int64_t dim = 0;
    OK(aclGetTensorDescDimV2(desc, 1, &dim));
    CHECK(dim == C, "dim 1 = %lld", (long long)dim);
    EXPECT(aclGetTensorDescDimV2(desc, 2, &dim), ACL_ERROR_INVALID_PARAM);
    aclSetTensorDescName(desc, "x");
    CHECK(strcmp(aclGetTensorDescName(desc), "x") == 0, "desc name");
    CHECK(aclDataTypeSize(ACL_FLOAT16) == 2, "aclDataTypeSize");

    aclDataBuffer *ba = aclCreateDataBuffer(da, N * sizeof(float)), *bb = aclCreateDataBuffer(db, N * sizeof(float));
    aclDataBuffer *bo = aclCreateDataBuffer(dout, N * sizeof(float));
    CHECK(aclGetDataBufferAddr(ba) == da && aclGetDataBufferSizeV2(ba) == N * sizeof(float), "data buffer");

    /* Add: the first launch of a type is synchronous, later ones asynchronous */
    const aclTensorDesc *in2[2] = {desc, desc}, *out1[1] = {desc};
    const aclDataBuffer *inb[2] = {ba, bb};
    aclDataBuffer *outb[1] = {bo};
    OK(aclopSetModelDir("."));
    EXPECT(aclopSetModelDir("/no/such/dir"), ACL_ERROR_INVALID_FILE);
    OK(aclopCompile("Add", 2, in2, 1, out1, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL));
    for (int rep = 0; rep < 3; rep++) {
        OK(aclopCompileAndExecute("Add", 2, in2, inb, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s));
        OK(aclrtSynchronizeStream(s));
        to_host(out, dout, N);
        for (int i = 0; i < N; i++) want[i] = a[i] + b[i];
        CHECK(close_to(out, want, N), "Add (repetition %d)", rep);
    }

    /* MatMul with attributes: (3x4) x (3x4)^T */
    int64_t d33[2] = {R, R};
    aclTensorDesc *desc33 = aclCreateTensorDesc(ACL_FLOAT, 2, d33, ACL_FORMAT_ND);
    void *dmm = dev_from(NULL, R * R);
    aclDataBuffer *bmm = aclCreateDataBuffer(dmm, R * R * sizeof(float));
    aclopAttr *attr = aclopCreateAttr();
    OK(aclopSetAttrBool(attr, "transpose_x1", 0));
    OK(aclopSetAttrBool(attr, "transpose_x2", 1));
    const aclTensorDesc *omm[1] = {desc33};
    aclDataBuffer *obmm[1] = {bmm};
    OK(aclopCompileAndExecute("MatMul", 2, in2, inb, 1, omm, obmm, attr, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s));
    OK(aclrtSynchronizeStream(s));
    float mm[R * R], wmm[R * R];
    to_host(mm, dmm, R * R);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            float acc = 0;
            for (int k = 0; k < C; k++) acc += a[i * C + k] * b[j * C + k];
            wmm[i * R + j] = acc;
        }
    CHECK(close_to(mm, wmm, R * R), "MatMul with transpose_x2");

    /* ReduceSum with its axes as a constant input (aclSetTensorConst), keep_dims from an attribute */
    int64_t axes[1] = {1}, d1[1] = {1}, dr[2] = {R, 1};
    aclTensorDesc *daxes = aclCreateTensorDesc(ACL_INT64, 1, d1, ACL_FORMAT_ND);
    OK(aclSetTensorConst(daxes, axes, sizeof axes));
    aclTensorDesc *dred = aclCreateTensorDesc(ACL_FLOAT, 2, dr, ACL_FORMAT_ND);
    void *dsum = dev_from(NULL, R);
    aclDataBuffer *bsum = aclCreateDataBuffer(dsum, R * sizeof(float)), *bnull = aclCreateDataBuffer(NULL, 0);
    aclopAttr *kd = aclopCreateAttr();
    OK(aclopSetAttrBool(kd, "keep_dims", 1));
    const aclTensorDesc *inr[2] = {desc, daxes}, *outr[1] = {dred};
    const aclDataBuffer *inrb[2] = {ba, bnull};
    aclDataBuffer *outrb[1] = {bsum};
    OK(aclopCompileAndExecute("ReduceSum", 2, inr, inrb, 1, outr, outrb, kd, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s));
    OK(aclrtSynchronizeStream(s));
    float sum[R], wsum[R];
    to_host(sum, dsum, R);
    for (int i = 0; i < R; i++) { wsum[i] = 0; for (int k = 0; k < C; k++) wsum[i] += a[i * C + k]; }
    CHECK(close_to(sum, wsum, R), "ReduceSum over a constant axis");

    /* every attribute kind travels (an attribute the lowering does not read is accepted) */
    aclopAttr *all = aclopCreateAttr();
    int64_t li[3] = {1, 2, 3}, l0[2] = {4, 5};
    const int64_t *ll[2] = {li, l0};
    int lens[2] = {3, 2};
    float lf[2] = {0.5f, 1.5f};
    uint8_t lb[2] = {1, 0};
    const char *ls[2] = {"a", "bc"};
    aclDataType ldt[2] = {ACL_FLOAT, ACL_INT32};
    OK(aclopSetAttrInt(all, "i", -7));
    OK(aclopSetAttrFloat(all, "f", 2.5f));
    OK(aclopSetAttrString(all, "s", "text"));
    OK(aclopSetAttrDataType(all, "dt", ACL_FLOAT16));
    OK(aclopSetAttrListInt(all, "li", 3, li));
    OK(aclopSetAttrListFloat(all, "lf", 2, lf));
    OK(aclopSetAttrListBool(all, "lb", 2, lb));
    OK(aclopSetAttrListString(all, "ls", 2, ls));
    OK(aclopSetAttrListDataType(all, "ldt", 2, ldt));
    OK(aclopSetAttrListListInt(all, "lli", 2, lens, ll));
    OK(aclopSetAttrInt(all, "i", 8));   /* setting a name again replaces it */
    EXPECT(aclopSetAttrInt(NULL, "x", 1), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclopSetAttrListInt(all, "neg", -1, li), ACL_ERROR_INVALID_PARAM);
    OK(aclopExecuteV2("Add", 2, (aclTensorDesc **)in2, (aclDataBuffer **)inb, 1, (aclTensorDesc **)out1, outb, all, s));
    OK(aclrtSynchronizeStream(s));

    /* Cast through aclopCast: float -> int32 */
    aclTensorDesc *di = aclCreateTensorDesc(ACL_INT32, 2, dims, ACL_FORMAT_ND);
    void *dint = NULL;
    OK(aclrtMalloc(&dint, N * 4, ACL_MEM_MALLOC_HUGE_FIRST));
    aclDataBuffer *bint = aclCreateDataBuffer(dint, N * 4);
    OK(aclopCast(desc, ba, di, bint, 0, s));
    OK(aclrtSynchronizeStream(s));
    int32_t ints[N];
    OK(aclrtMemcpy(ints, sizeof ints, dint, sizeof ints, ACL_MEMCPY_DEVICE_TO_HOST));
    int cast_ok = 1;
    for (int i = 0; i < N; i++) cast_ok &= ints[i] == (int32_t)a[i];
    CHECK(cast_ok, "aclopCast float -> int32");

    /* mistakes: an operator outside the table (named, synchronously), bad objects, packed formats */
    EXPECT(aclopCompileAndExecute("NoSuchOp", 2, in2, inb, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s),
           ACL_ERROR_OP_NOT_FOUND);
    aclopCompileAndExecute("NoSuchOp", 2, in2, inb, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s);
    CHECK(strstr(aclGetRecentErrMsg(), "NoSuchOp") != NULL, "the refusal names the operator");
    OK(aclrtSynchronizeStream(s));   /* nothing was left behind on the stream */
    const aclTensorDesc *bad[2] = {desc, (const aclTensorDesc *)b};
    EXPECT(aclopCompileAndExecute("Add", 2, bad, inb, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s),
           ACL_ERROR_INVALID_PARAM);
    aclTensorDesc *nz = aclCreateTensorDesc(ACL_FLOAT, 2, dims, ACL_FORMAT_FRACTAL_NZ);
    const aclTensorDesc *innz[2] = {nz, desc};
    EXPECT(aclopCompileAndExecute("Add", 2, innz, inb, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s),
           ACL_ERROR_FORMAT_NOT_MATCH);
    aclDataBuffer *small = aclCreateDataBuffer(da, 8);
    const aclDataBuffer *insm[2] = {small, bb};
    EXPECT(aclopCompileAndExecute("Add", 2, in2, insm, 1, out1, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s),
           ACL_ERROR_INVALID_PARAM);
    /* a shape mistake in the first use of a type is returned by the call */
    const aclTensorDesc *omis[1] = {desc33};
    CHECK(aclopCompileAndExecute("Sub", 2, in2, inb, 1, omis, outb, NULL, ACL_ENGINE_SYS, ACL_COMPILE_SYS, NULL, s) != 0,
          "Sub into a wrong output shape succeeded");
    (void)aclGetRecentErrMsg();
    OK(aclrtSynchronizeStream(s));

    /* aclnnAdd through dlopen("libopapi.so"), as torch_npu finds it */
    void *h = dlopen("libopapi.so", RTLD_NOW | RTLD_LOCAL);
    CHECK(h != NULL, "dlopen libopapi.so: %s", dlerror());
    if (h) {
        CreateTensorFn mk = (CreateTensorFn)dlsym(h, "aclCreateTensor");
        CreateScalarFn mks = (CreateScalarFn)dlsym(h, "aclCreateScalar");
        DestroyTensorFn rmt = (DestroyTensorFn)dlsym(h, "aclDestroyTensor");
        DestroyScalarFn rms = (DestroyScalarFn)dlsym(h, "aclDestroyScalar");
        AddWsFn ws = (AddWsFn)dlsym(h, "aclnnAddGetWorkspaceSize");
        AddFn add = (AddFn)dlsym(h, "aclnnAdd");
        CHECK(mk && mks && rmt && rms && ws && add, "aclnn symbols in libopapi.so");
        if (mk && mks && rmt && rms && ws && add) {
            int64_t strides[2] = {C, 1};
            aclTensor *ta = mk(dims, 2, ACL_FLOAT, strides, 0, ACL_FORMAT_ND, dims, 2, da);
            aclTensor *tb = mk(dims, 2, ACL_FLOAT, strides, 0, ACL_FORMAT_ND, dims, 2, db);
            aclTensor *to = mk(dims, 2, ACL_FLOAT, strides, 0, ACL_FORMAT_ND, dims, 2, dout);
            float alpha = 2.0f;
            aclScalar *sa = mks(&alpha, ACL_FLOAT);
            uint64_t wsize = 1;
            aclOpExecutor *ex = NULL;
            CHECK(ws(ta, tb, sa, to, &wsize, &ex) == 0 && ex != NULL, "aclnnAddGetWorkspaceSize");
            CHECK(add(NULL, wsize, ex, s) == 0, "aclnnAdd");
            OK(aclrtSynchronizeStream(s));
            to_host(out, dout, N);
            for (int i = 0; i < N; i++) want[i] = a[i] + 2.0f * b[i];
            CHECK(close_to(out, want, N), "aclnnAdd(a, b, alpha=2)");
            rmt(ta); rmt(tb); rmt(to); rms(sa);
        }
        dlclose(h);
    }

    aclopDestroyAttr(attr);
    aclopDestroyAttr(kd);
    aclopDestroyAttr(all);
    OK(aclDestroyDataBuffer(ba));
    EXPECT(aclDestroyDataBuffer(NULL), ACL_ERROR_INVALID_PARAM);
    aclDestroyDataBuffer(bb); aclDestroyDataBuffer(bo); aclDestroyDataBuffer(bmm); aclDestroyDataBuffer(bsum);
    aclDestroyDataBuffer(bnull); aclDestroyDataBuffer(bint); aclDestroyDataBuffer(small);
    aclDestroyTensorDesc(desc); aclDestroyTensorDesc(desc33); aclDestroyTensorDesc(daxes); aclDestroyTensorDesc(dred);
    aclDestroyTensorDesc(di); aclDestroyTensorDesc(nz);
    OK(aclrtResetDevice(0));
    OK(aclFinalize());
    printf(failures ? "FAILED %d\n" : "OK\n", failures);
    return failures != 0;
}
