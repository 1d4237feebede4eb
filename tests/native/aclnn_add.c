/* A plain AscendCL program using the aclnn operator API the way CANN's samples do: the runtime
 * from libascendcl.so, the operators looked up with dlopen("libopapi.so") + dlsym, two-phase
 * calls (GetWorkspaceSize, then the launch on a stream). The aclnn prototypes are spelled out
 * here as CANN's aclnn headers declare them (the torch_npu wheel ships the AscendCL headers only).
 * Checks results (contiguous, a transposed view, a double scalar, an int8_t parameter) and that
 * an operator fed mismatched shapes fails at the stream's sync with the operator named.
 * Prints OK.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"

typedef struct aclTensor aclTensor;
typedef struct aclScalar aclScalar;
typedef struct aclOpExecutor aclOpExecutor;
typedef int aclnnStatus;

typedef aclTensor *(*CreateTensor)(const int64_t *, uint64_t, aclDataType, const int64_t *, int64_t, aclFormat,
                                   const int64_t *, uint64_t, void *);
typedef aclScalar *(*CreateScalar)(void *, aclDataType);
typedef aclnnStatus (*DestroyTensor)(const aclTensor *);
typedef aclnnStatus (*DestroyScalar)(const aclScalar *);
typedef aclnnStatus (*AddWs)(const aclTensor *, const aclTensor *, const aclScalar *, aclTensor *, uint64_t *,
                             aclOpExecutor **);
typedef aclnnStatus (*MmWs)(const aclTensor *, const aclTensor *, aclTensor *, int8_t, uint64_t *, aclOpExecutor **);
typedef aclnnStatus (*Run)(void *, uint64_t, aclOpExecutor *, aclrtStream);

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
#define OK(call) do { int r_ = (call); CHECK(r_ == 0, "%s returned %d (%s)", #call, r_, aclGetRecentErrMsg()); } while (0)

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (!p) { fprintf(stderr, "missing %s\n", name); exit(2); }
    return p;
}

int main(void) {
    void *lib = dlopen("libopapi.so", RTLD_NOW);
    if (!lib) { fprintf(stderr, "dlopen libopapi.so: %s\n", dlerror()); return 2; }
    CreateTensor createTensor = (CreateTensor)sym(lib, "aclCreateTensor");
    CreateScalar createScalar = (CreateScalar)sym(lib, "aclCreateScalar");
    DestroyTensor destroyTensor = (DestroyTensor)sym(lib, "aclDestroyTensor");
    DestroyScalar destroyScalar = (DestroyScalar)sym(lib, "aclDestroyScalar");
    AddWs addWs = (AddWs)sym(lib, "aclnnAddGetWorkspaceSize");
    Run add = (Run)sym(lib, "aclnnAdd");
    MmWs mmWs = (MmWs)sym(lib, "aclnnMmGetWorkspaceSize");
    Run mm = (Run)sym(lib, "aclnnMm");

    OK(aclInit(NULL));
    OK(aclrtSetDevice(0));
    aclrtStream stream;
    OK(aclrtCreateStream(&stream));

    enum { R = 2, C = 3 };
    float a[R * C], b[C * R], out[R * C], want[R * C];
    for (int i = 0; i < R * C; i++) { a[i] = (float)i; b[i] = (float)(10 * i); }
    void *da, *db, *dout;
    OK(aclrtMalloc(&da, sizeof a, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMalloc(&db, sizeof b, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMalloc(&dout, 4 * sizeof out, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMemcpy(da, sizeof a, a, sizeof a, ACL_MEMCPY_HOST_TO_DEVICE));
    OK(aclrtMemcpy(db, sizeof b, b, sizeof b, ACL_MEMCPY_HOST_TO_DEVICE));

    /* out = a + 2.5 * b^T, b stored [C, R] and viewed transposed: shape [R, C], strides [1, R] */
    int64_t shape[2] = {R, C}, contig[2] = {C, 1}, trans[2] = {1, R}, sdims[1] = {R * C};
    aclTensor *ta = createTensor(shape, 2, ACL_FLOAT, contig, 0, ACL_FORMAT_ND, sdims, 1, da);
    aclTensor *tb = createTensor(shape, 2, ACL_FLOAT, trans, 0, ACL_FORMAT_ND, sdims, 1, db);
    aclTensor *to = createTensor(shape, 2, ACL_FLOAT, contig, 0, ACL_FORMAT_ND, sdims, 1, dout);
    double alpha = 2.5;
    aclScalar *sa = createScalar(&alpha, ACL_DOUBLE);
    uint64_t ws = 1;
    aclOpExecutor *ex = NULL;
    OK(addWs(ta, tb, sa, to, &ws, &ex));
    CHECK(ws == 0 && ex != NULL, "workspace %llu executor %p", (unsigned long long)ws, (void *)ex);
    OK(add(NULL, ws, ex, stream));
    OK(aclrtSynchronizeStream(stream));
    OK(aclrtMemcpy(out, sizeof out, dout, sizeof out, ACL_MEMCPY_DEVICE_TO_HOST));
    for (int i = 0; i < R; i++)
        for (int j = 0; j < C; j++) want[i * C + j] = a[i * C + j] + 2.5f * b[j * R + i];
    for (int i = 0; i < R * C; i++) CHECK(fabsf(out[i] - want[i]) < 1e-5f, "add[%d] = %g, want %g", i, out[i], want[i]);

    /* out2 [R, R] = a [R, C] @ b [C, R], at a storage offset of 8 elements in dout */
    int64_t bshape[2] = {C, R}, bstr[2] = {R, 1}, oshape[2] = {R, R}, ostr[2] = {R, 1}, osd[1] = {4 * R * C};
    aclTensor *tb2 = createTensor(bshape, 2, ACL_FLOAT, bstr, 0, ACL_FORMAT_ND, sdims, 1, db);
    aclTensor *to2 = createTensor(oshape, 2, ACL_FLOAT, ostr, 8, ACL_FORMAT_ND, osd, 1, dout);
    OK(mmWs(ta, tb2, to2, 1, &ws, &ex));
    OK(mm(NULL, ws, ex, stream));
    OK(aclrtSynchronizeStream(stream));
    float mo[R * R];
    OK(aclrtMemcpy(mo, sizeof mo, (char *)dout + 8 * sizeof(float), sizeof mo, ACL_MEMCPY_DEVICE_TO_HOST));
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            float s = 0;
            for (int k = 0; k < C; k++) s += a[i * C + k] * b[k * R + j];
            CHECK(fabsf(mo[i * R + j] - s) < 1e-3f, "mm[%d,%d] = %g, want %g", i, j, mo[i * R + j], s);
        }

    /* mismatched shapes: accepted at launch (asynchronous, as on hardware), reported at the sync */
    int64_t bad[2] = {C, C};
    aclTensor *tbad = createTensor(bad, 2, ACL_FLOAT, contig, 0, ACL_FORMAT_ND, sdims, 1, db);
    OK(addWs(ta, tbad, sa, to, &ws, &ex));
    OK(add(NULL, ws, ex, stream));
    int rc = aclrtSynchronizeStream(stream);
    const char *msg = aclGetRecentErrMsg();
    CHECK(rc != 0 && strstr(msg, "aclnn::Add"), "bad shapes: rc %d msg %s", rc, msg);
    OK(aclrtSynchronizeStream(stream));   /* the error is reported once; the stream goes on */

    destroyTensor(ta); destroyTensor(tb); destroyTensor(to); destroyTensor(tb2); destroyTensor(to2); destroyTensor(tbad);
    destroyScalar(sa);
    OK(aclrtFree(da)); OK(aclrtFree(db)); OK(aclrtFree(dout));
    OK(aclrtDestroyStream(stream));
    OK(aclrtResetDevice(0));
    OK(aclFinalize());
    if (failures) return 1;
    printf("OK\n");
    return 0;
}
