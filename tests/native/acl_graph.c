/* Captured graphs (aclmdlRI*) and FlexNPU's phase hints from a plain AscendCL C program, compiled
 * against the CANN headers the torch_npu wheel ships and run unmodified under `flexnpu run`.
 * Usage: acl_graph            capture copies and a memset, replay 50 times with new inputs,
 *                             every documented error; prints OK
 *        acl_graph phase      READY, wait for a line; flexnpuSetPhase("prefill") and 5 step
 *                             marks; MARKED, wait for a line
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"

/* FlexNPU's own exports (docs/native.md): not in the CANN headers */
extern aclError flexnpuSetPhase(const char *phase, aclrtStream stream);
extern aclError flexnpuMarkStep(aclrtStream stream);

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
#define EXPECT(call, want) do { aclError r_ = (call); CHECK(r_ == (want), "%s returned %d, expected %d (%s)", #call, r_, \
    (int)(want), aclGetRecentErrMsg()); } while (0)
#define OK(call) EXPECT(call, ACL_SUCCESS)

#define N 4096

static int phase(void) {
    aclrtStream s = NULL;
    OK(aclrtCreateStream(&s));
    EXPECT(flexnpuSetPhase("lunch", NULL), ACL_ERROR_INVALID_PARAM);
    EXPECT(flexnpuSetPhase(NULL, NULL), ACL_ERROR_INVALID_PARAM);
    EXPECT(flexnpuMarkStep((aclrtStream)0x1234), ACL_ERROR_INVALID_PARAM);
    printf("READY\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    OK(flexnpuSetPhase("prefill", NULL));
    OK(flexnpuSetPhase("decode", s));
    void *dev = NULL;
    OK(aclrtMalloc(&dev, N, ACL_MEM_MALLOC_HUGE_FIRST));
    for (int i = 0; i < 5; i++) {
        OK(aclrtMemsetAsync(dev, N, i, N, NULL));
        OK(flexnpuMarkStep(NULL));
    }
    OK(aclrtSynchronizeStream(NULL));
    printf(failures ? "FAILED\n" : "MARKED\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    return failures != 0;
}

int main(int argc, char **argv) {
    OK(aclInit(NULL));
    OK(aclrtSetDevice(0));
    if (argc >= 2 && strcmp(argv[1], "phase") == 0) return phase();

    aclrtStream s = NULL, other = NULL;
    OK(aclrtCreateStream(&s));
    OK(aclrtCreateStream(&other));
    void *a = NULL, *b = NULL, *pinned = NULL;
    unsigned char *host = malloc(N), *want = malloc(N);
    OK(aclrtMalloc(&a, N, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMalloc(&b, N, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMallocHost(&pinned, N));

    aclmdlRICaptureStatus st = ACL_MODEL_RI_CAPTURE_STATUS_ACTIVE;
    aclmdlRI m0 = NULL, m = NULL;
    OK(aclmdlRICaptureGetInfo(s, &st, &m0));
    CHECK(st == ACL_MODEL_RI_CAPTURE_STATUS_NONE && m0 == NULL, "not capturing yet: status %d", (int)st);
    EXPECT(aclmdlRICaptureEnd(s, &m), ACL_ERROR_RT_STREAM_NOT_CAPTURED);
    EXPECT(aclmdlRICaptureBegin(s, (aclmdlRICaptureMode)7), ACL_ERROR_INVALID_PARAM);

    /* stream attributes: NPUGraph switches ACL_STREAM_ATTR_CACHE_OP_INFO on the captured stream */
    aclrtStreamAttrValue v = {0};
    v.cacheOpInfoSwitch = 1;
    OK(aclrtSetStreamAttribute(s, ACL_STREAM_ATTR_CACHE_OP_INFO, &v));
    memset(&v, 0, sizeof v);
    OK(aclrtGetStreamAttribute(s, ACL_STREAM_ATTR_CACHE_OP_INFO, &v));
    CHECK(v.cacheOpInfoSwitch == 1, "attribute read back %u", v.cacheOpInfoSwitch);
    EXPECT(aclrtSetStreamAttribute(s, (aclrtStreamAttr)99, &v), ACL_ERROR_INVALID_PARAM);

    aclmdlRICaptureMode mode = ACL_MODEL_RI_CAPTURE_MODE_RELAXED;
    OK(aclmdlRICaptureThreadExchangeMode(&mode));
    CHECK(mode == ACL_MODEL_RI_CAPTURE_MODE_GLOBAL, "previous mode %d", (int)mode);
    OK(aclmdlRICaptureThreadExchangeMode(&mode));

    /* capture: pinned host -> a, a -> b, memset a */
    OK(aclmdlRICaptureBegin(s, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL));
    EXPECT(aclmdlRICaptureBegin(s, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL), ACL_ERROR_RT_STREAM_CAPTURED);
    OK(aclmdlRICaptureGetInfo(s, &st, &m0));
    CHECK(st == ACL_MODEL_RI_CAPTURE_STATUS_ACTIVE && m0 != NULL, "capturing: status %d", (int)st);
    uint32_t id0 = 0, id = 0;
    OK(aclmdlRIGetId(m0, &id0));
    OK(aclmdlRICaptureGetInfo(other, &st, &m));
    CHECK(st == ACL_MODEL_RI_CAPTURE_STATUS_NONE, "the other stream is not captured");
    EXPECT(aclmdlRIExecuteAsync(m0, other), ACL_ERROR_RT_MODEL_CAPTURED);
    EXPECT(aclmdlRIDestroy(m0), ACL_ERROR_RT_MODEL_CAPTURED);
    OK(aclrtMemcpyAsync(a, N, pinned, N, ACL_MEMCPY_HOST_TO_DEVICE, s));
    OK(aclrtMemcpyAsync(b, N, a, N, ACL_MEMCPY_DEVICE_TO_DEVICE, s));
    OK(aclrtMemsetAsync(a, N, 0x5A, N, s));
    /* a synchronization of the captured stream would never finish on hardware: refused */
    CHECK(aclrtSynchronizeStream(s) != ACL_SUCCESS, "synchronizing a captured stream succeeded");
    (void)aclGetRecentErrMsg();
    OK(aclmdlRICaptureEnd(s, &m));
    CHECK(m == m0 && m != NULL, "model from CaptureEnd %p, from GetInfo %p", m, m0);
    OK(aclmdlRIGetId(m, &id));
    CHECK(id == id0 && id != 0, "ids %u %u", id, id0);
    OK(aclmdlRICaptureGetInfo(s, &st, &m0));
    CHECK(st == ACL_MODEL_RI_CAPTURE_STATUS_NONE, "capture over: status %d", (int)st);

    /* 50 replays, each with new input in the pinned buffer: the replay reads it when it runs */
    for (int r = 0; r < 50 && !failures; r++) {
        for (int i = 0; i < N; i++) ((unsigned char *)pinned)[i] = want[i] = (unsigned char)(i * 7 + r * 13 + 1);
        OK(aclrtMemset(b, N, 0, N));
        OK(aclmdlRIExecuteAsync(m, r % 2 ? s : other));
        OK(aclrtSynchronizeStream(r % 2 ? s : other));
        OK(aclrtMemcpy(host, N, b, N, ACL_MEMCPY_DEVICE_TO_HOST));
        CHECK(memcmp(host, want, N) == 0, "replay %d: b holds the wrong bytes", r);
        OK(aclrtMemcpy(host, N, a, N, ACL_MEMCPY_DEVICE_TO_HOST));
        CHECK(host[0] == 0x5A && host[N - 1] == 0x5A, "replay %d: a was not memset", r);
    }
    /* synchronous execution, on the default stream */
    for (int i = 0; i < N; i++) ((unsigned char *)pinned)[i] = want[i] = (unsigned char)(255 - i);
    OK(aclmdlRIExecute(m, -1));
    OK(aclrtMemcpy(host, N, b, N, ACL_MEMCPY_DEVICE_TO_HOST));
    CHECK(memcmp(host, want, N) == 0, "aclmdlRIExecute: b holds the wrong bytes");

    /* forged and destroyed models */
    EXPECT(aclmdlRIExecuteAsync((aclmdlRI)0x1234, s), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclmdlRIExecuteAsync((aclmdlRI)((uintptr_t)m + 77), s), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclmdlRIGetId(NULL, &id), ACL_ERROR_INVALID_PARAM);
    OK(aclmdlRIDestroy(m));
    EXPECT(aclmdlRIDestroy(m), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclmdlRIExecuteAsync(m, s), ACL_ERROR_INVALID_PARAM);

    /* an empty capture is a graph too; a capture on the default stream works as on any other */
    OK(aclmdlRICaptureBegin(NULL, ACL_MODEL_RI_CAPTURE_MODE_THREAD_LOCAL));
    OK(aclmdlRICaptureEnd(NULL, &m));
    OK(aclmdlRIExecuteAsync(m, s));
    OK(aclrtSynchronizeStream(s));
    OK(aclmdlRIDestroy(m));

    /* a capture left open when the program resets the device is dropped with it */
    OK(aclmdlRICaptureBegin(other, ACL_MODEL_RI_CAPTURE_MODE_GLOBAL));
    OK(aclrtFree(a));
    OK(aclrtFree(b));
    OK(aclrtFreeHost(pinned));
    OK(aclrtResetDevice(0));
    OK(aclrtSetDevice(0));
    OK(aclmdlRICaptureGetInfo(NULL, &st, &m));
    CHECK(st == ACL_MODEL_RI_CAPTURE_STATUS_NONE, "after a reset nothing is captured");
    OK(aclrtResetDevice(0));
    OK(aclFinalize());
    printf(failures ? "FAILED %d\n" : "OK\n", failures);
    return failures != 0;
}
