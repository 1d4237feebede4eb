/* A plain AscendCL runtime program (written for FlexNPU's tests, in the style of Ascend's
 * memcpy_host_device samples), compiled against the CANN headers the torch_npu wheel ships
 * and run unmodified under `flexnpu run`. Checks data and the documented error codes.
 * Usage: acl_runtime                  the full check
 *        acl_runtime oom BYTES        an allocation beyond the client's quota
 *        acl_runtime loss             READY, wait for a line on stdin (the test kills the daemon), then sync
 *        acl_runtime spin             READY, then copy host->device forever (the test SIGKILLs it)
 *        acl_runtime export PID       export 1 MiB of pattern to PID, print the key, wait for a line
 *        acl_runtime import KEY|-     import KEY (- : read it from stdin), check the pattern
 *        acl_runtime unsupported      call an API FlexNPU does not offer (kernel binaries) twice
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "acl/acl.h"
#include "acl/acl_op_compiler.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
#define EXPECT(call, want) do { aclError r_ = (call); CHECK(r_ == (want), "%s returned %d, expected %d (%s)", #call, r_, \
    (int)(want), aclGetRecentErrMsg()); } while (0)
#define OK(call) EXPECT(call, ACL_SUCCESS)

int main(int argc, char **argv) {
    void *dev = NULL;
    uint32_t count = 0;
    /* before aclInit */
    EXPECT(aclrtSetDevice(0), ACL_ERROR_UNINITIALIZE);
    EXPECT(aclrtMalloc(&dev, 64, ACL_MEM_MALLOC_HUGE_FIRST), ACL_ERROR_UNINITIALIZE);
    OK(aclInit(NULL));
    EXPECT(aclInit(NULL), ACL_ERROR_REPEAT_INITIALIZE);
    EXPECT(aclrtGetDeviceCount(NULL), ACL_ERROR_INVALID_PARAM);
    OK(aclrtGetDeviceCount(&count));
    CHECK(count >= 1, "device count %u", count);
    /* unset device */
    EXPECT(aclrtMalloc(&dev, 64, ACL_MEM_MALLOC_HUGE_FIRST), ACL_ERROR_RT_CONTEXT_NULL);
    EXPECT(aclrtSetDevice((int32_t)count), ACL_ERROR_RT_INVALID_DEVICEID);
    OK(aclrtSetDevice(0));
    int32_t cur = -1;
    OK(aclrtGetDevice(&cur));
    CHECK(cur == 0, "current device %d", cur);
    CHECK(aclrtGetSocName() && strlen(aclrtGetSocName()) > 0, "soc name");
    aclrtContext ctx = NULL;
    OK(aclrtGetCurrentContext(&ctx));
    OK(aclrtSetCurrentContext(ctx));

    if (argc >= 2 && strcmp(argv[1], "loss") == 0) {
        aclrtStream s = NULL;
        OK(aclrtCreateStream(&s));
        OK(aclrtMalloc(&dev, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
        printf("READY\n");
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
        aclError r = aclrtSynchronizeStream(s);
        printf("sync %d\n", r);
        r = aclrtMemcpy(dev, 4096, line, 4, ACL_MEMCPY_HOST_TO_DEVICE);
        printf("memcpy %d\n", r);
        return r == ACL_SUCCESS;
    }
    if (argc >= 2 && strcmp(argv[1], "spin") == 0) {
        size_t n = 8u << 20;
        unsigned char *buf = calloc(1, n);
        OK(aclrtMalloc(&dev, 8 * n, ACL_MEM_MALLOC_HUGE_FIRST));
        printf("READY\n");
        fflush(stdout);
        for (unsigned long i = 0;; i++) {
            buf[0] = (unsigned char)i;
            if (aclrtMemcpy((char *)dev + (i % 8) * n, n, buf, n, ACL_MEMCPY_HOST_TO_DEVICE)) return 4;
        }
    }
    if (argc == 3 && strcmp(argv[1], "export") == 0) {
        size_t n = 1u << 20;
        unsigned char *buf = malloc(n);
        for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 13 + 1);
        OK(aclrtMalloc(&dev, n, ACL_MEM_MALLOC_HUGE_FIRST));
        OK(aclrtMemcpy(dev, n, buf, n, ACL_MEMCPY_HOST_TO_DEVICE));
        char key[65];
        EXPECT(aclrtIpcMemGetExportKey(dev, n, key, 4, 0), ACL_ERROR_INVALID_PARAM);   /* buffer too small */
        OK(aclrtIpcMemGetExportKey(dev, n, key, sizeof key, 0));
        int32_t pid = atoi(argv[2]);
        OK(aclrtIpcMemSetImportPid(key, &pid, 1));
        printf("KEY %s\n", key);
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
        OK(aclrtIpcMemClose(key));
        OK(aclrtFree(dev));
        printf(failures ? "FAILED %d\n" : "OK\n", failures);
        return failures != 0;
    }
    if (argc == 3 && strcmp(argv[1], "import") == 0) {
        size_t n = 1u << 20;
        unsigned char *buf = malloc(n);
        char keybuf[128];
        const char *key = argv[2];
        if (strcmp(key, "-") == 0) {   /* the key comes on stdin, once this process is allowed */
            if (!fgets(keybuf, sizeof keybuf, stdin)) return 3;
            keybuf[strcspn(keybuf, "\n")] = 0;
            key = keybuf;
        }
        aclError r = aclrtIpcMemImportByKey(&dev, key, 0);
        if (r != ACL_SUCCESS) {
            printf("IMPORT %d %s\n", r, aclGetRecentErrMsg());
            return 2;
        }
        OK(aclrtMemcpy(buf, n, dev, n, ACL_MEMCPY_DEVICE_TO_HOST));
        int good = 1;
        for (size_t i = 0; i < n; i++) if (buf[i] != (unsigned char)(i * 13 + 1)) { good = 0; break; }
        CHECK(good, "imported memory holds the exporter's bytes");
        EXPECT(aclrtMemcpy(buf, n + 1, dev, n + 1, ACL_MEMCPY_DEVICE_TO_HOST), ACL_ERROR_INVALID_PARAM);
        OK(aclrtIpcMemClose(key));
        printf(failures ? "FAILED %d\n" : "OK\n", failures);
        return failures != 0;
    }
    if (argc >= 2 && strcmp(argv[1], "unsupported") == 0) {
        aclrtBinHandle bin = NULL;
        for (int i = 0; i < 2; i++)
            EXPECT(aclrtBinaryLoadFromData("", 1, NULL, &bin), ACL_ERROR_API_NOT_SUPPORT);
        CHECK(strstr(aclGetRecentErrMsg(), "aclrtBinaryLoadFromData") != NULL, "message names the call");
        printf(failures ? "FAILED %d\n" : "OK\n", failures);
        return failures != 0;
    }
    if (argc == 3 && strcmp(argv[1], "oom") == 0) {
        size_t big = (size_t)strtoull(argv[2], NULL, 10);
        EXPECT(aclrtMalloc(&dev, big, ACL_MEM_MALLOC_HUGE_FIRST), ACL_ERROR_RT_MEMORY_ALLOCATION);
        OK(aclrtMalloc(&dev, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
        OK(aclrtFree(dev));
        printf(failures ? "FAILED %d\n" : "OK\n", failures);
        return failures != 0;
    }

    const size_t N = 1 << 20;
    void *a = NULL, *b = NULL, *pinned = NULL;
    EXPECT(aclrtMalloc(NULL, N, ACL_MEM_MALLOC_HUGE_FIRST), ACL_ERROR_INVALID_PARAM);
    OK(aclrtMalloc(&a, N, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMalloc(&b, N, ACL_MEM_MALLOC_NORMAL_ONLY));
    CHECK(a && b && a != b, "distinct device pointers");
    OK(aclrtMallocHost(&pinned, N));
    unsigned char *host = malloc(N), *back = malloc(N);
    for (size_t i = 0; i < N; i++) host[i] = (unsigned char)(i * 7 + 3);

    /* device memory is not CPU memory: touching it faults, as on hardware */
    pid_t pid = fork();
    if (pid == 0) { volatile unsigned char x = *(volatile unsigned char *)a; (void)x; _exit(0); }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "a CPU read of device memory must fault (status %d)", st);

    /* a forked child starts detached: it attaches on its own and sees none of the parent's memory */
    pid = fork();
    if (pid == 0) {
        void *c = NULL;
        unsigned char one = 0;
        int ok = aclrtMemcpy(&one, 1, a, 1, ACL_MEMCPY_DEVICE_TO_HOST) != ACL_SUCCESS &&
                 aclrtMalloc(&c, 64, ACL_MEM_MALLOC_HUGE_FIRST) == ACL_ERROR_RT_CONTEXT_NULL &&
                 aclrtSetDevice(0) == ACL_SUCCESS && aclrtMalloc(&c, 64, ACL_MEM_MALLOC_HUGE_FIRST) == ACL_SUCCESS &&
                 aclrtMemcpy(c, 64, host, 64, ACL_MEMCPY_HOST_TO_DEVICE) == ACL_SUCCESS &&
                 aclrtMemcpy(&one, 1, (char *)c + 1, 1, ACL_MEMCPY_DEVICE_TO_HOST) == ACL_SUCCESS && one == host[1];
        _exit(ok ? 0 : 1);
    }
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child re-attaches on its own (status %d)", st);

    aclrtStream s1 = NULL, s2 = NULL;
    aclrtEvent ev = NULL, t0 = NULL, t1 = NULL;
    OK(aclrtCreateStream(&s1));
    OK(aclrtCreateStreamWithConfig(&s2, 0, 0));
    OK(aclrtCreateEvent(&ev));
    OK(aclrtCreateEventWithFlag(&t0, ACL_EVENT_TIME_LINE));
    OK(aclrtCreateEventWithFlag(&t1, ACL_EVENT_TIME_LINE));

    /* sync H2D, async D2D on s1, event, s2 waits, async D2H into pinned memory on s2 */
    OK(aclrtMemcpy(a, N, host, N, ACL_MEMCPY_HOST_TO_DEVICE));
    OK(aclrtRecordEvent(t0, s1));
    OK(aclrtMemcpyAsync(b, N, a, N, ACL_MEMCPY_DEVICE_TO_DEVICE, s1));
    OK(aclrtRecordEvent(ev, s1));
    OK(aclrtRecordEvent(t1, s1));
    OK(aclrtStreamWaitEvent(s2, ev));
    memset(pinned, 0, N);
    OK(aclrtMemcpyAsync(pinned, N, b, N, ACL_MEMCPY_DEVICE_TO_HOST, s2));
    OK(aclrtSynchronizeStream(s2));
    CHECK(memcmp(pinned, host, N) == 0, "D2H into pinned memory after D2D");
    OK(aclrtSynchronizeEvent(t1));
    float ms = -1;
    OK(aclrtEventElapsedTime(&ms, t0, t1));
    CHECK(ms >= 0, "elapsed %f", ms);
    aclrtEventRecordedStatus es = ACL_EVENT_RECORDED_STATUS_NOT_READY;
    OK(aclrtQueryEventStatus(ev, &es));
    CHECK(es == ACL_EVENT_RECORDED_STATUS_COMPLETE, "event status %d", es);
    aclrtStreamStatus ss = ACL_STREAM_STATUS_NOT_READY;
    OK(aclrtStreamQuery(s2, &ss));
    CHECK(ss == ACL_STREAM_STATUS_COMPLETE, "stream status %d", ss);

    /* pinned -> device async, pageable async (staged), sync D2H into pageable, offsets */
    for (size_t i = 0; i < N; i++) ((unsigned char *)pinned)[i] = (unsigned char)(255 - i % 251);
    OK(aclrtMemcpyAsync(a, N, pinned, N, ACL_MEMCPY_HOST_TO_DEVICE, s1));
    unsigned char small[1000];
    for (int i = 0; i < 1000; i++) small[i] = (unsigned char)(i ^ 0x5a);
    OK(aclrtMemcpyAsync((char *)a + 4096, 1000, small, 1000, ACL_MEMCPY_HOST_TO_DEVICE, s1));
    memset(small, 0, sizeof small);   /* the async copy took its own copy of the bytes */
    OK(aclrtSynchronizeStream(s1));
    OK(aclrtMemcpy(back, N, a, N, ACL_MEMCPY_DEVICE_TO_HOST));
    int good = 1;
    for (size_t i = 0; i < N; i++) {
        unsigned char want = (i >= 4096 && i < 5096) ? (unsigned char)((i - 4096) ^ 0x5a) : (unsigned char)(255 - i % 251);
        if (back[i] != want) { good = 0; break; }
    }
    CHECK(good, "pinned/pageable async H2D with an offset");
    /* memset */
    OK(aclrtMemset((char *)b + 10, N - 10, 0x7f, 100));
    OK(aclrtMemsetAsync(b, N, 0x11, 10, s1));
    OK(aclrtSynchronizeStream(s1));
    OK(aclrtMemcpy(back, 200, b, 200, ACL_MEMCPY_DEVICE_TO_HOST));
    CHECK(back[0] == 0x11 && back[9] == 0x11 && back[10] == 0x7f && back[109] == 0x7f && back[110] == host[110], "memset");
    /* default kind infers the direction */
    OK(aclrtMemcpy(back, 16, (char *)b + 10, 16, ACL_MEMCPY_DEFAULT));
    CHECK(back[0] == 0x7f, "ACL_MEMCPY_DEFAULT");

    /* pinned copies larger than one request's payload bound travel in pieces */
    {
        size_t big = (80u << 20) + 12345;
        void *dbig = NULL, *hbig = NULL;
        OK(aclrtMalloc(&dbig, big, ACL_MEM_MALLOC_HUGE_FIRST));
        OK(aclrtMallocHost(&hbig, big));
        for (size_t i = 0; i < big; i += 4096) ((unsigned char *)hbig)[i] = (unsigned char)(i >> 12);
        ((unsigned char *)hbig)[big - 1] = 0xab;
        OK(aclrtMemcpy(dbig, big, hbig, big, ACL_MEMCPY_HOST_TO_DEVICE));
        memset(hbig, 0, big);
        OK(aclrtMemcpyAsync(hbig, big, dbig, big, ACL_MEMCPY_DEVICE_TO_HOST, s1));
        OK(aclrtSynchronizeStream(s1));
        int okbig = ((unsigned char *)hbig)[big - 1] == 0xab;
        for (size_t i = 0; i < big && okbig; i += 4096) okbig = ((unsigned char *)hbig)[i] == (unsigned char)(i >> 12);
        CHECK(okbig, "80 MiB pinned round trip");
        OK(aclrtFree(dbig));
        OK(aclrtFreeHost(hbig));
    }

    /* memory information */
    size_t freeb = 0, total = 0;
    OK(aclrtGetMemInfo(ACL_HBM_MEM, &freeb, &total));
    CHECK(total > 0 && freeb <= total && total - freeb >= 2 * N, "mem info free %zu total %zu", freeb, total);

    /* documented errors */
    EXPECT(aclrtMemcpy((char *)a + N - 10, 100, host, 100, ACL_MEMCPY_HOST_TO_DEVICE), ACL_ERROR_INVALID_PARAM);
    CHECK(strstr(aclGetRecentErrMsg(), "end of their allocation") != NULL, "error message names the overrun");
    EXPECT(aclrtMemcpyAsync(back, N, (char *)b + 1, N, ACL_MEMCPY_DEVICE_TO_HOST, s1), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtMemcpy(back, 10, b, 100, ACL_MEMCPY_DEVICE_TO_HOST), ACL_ERROR_INVALID_PARAM);   /* count > destMax */
    EXPECT(aclrtMemcpy(NULL, 10, b, 10, ACL_MEMCPY_DEVICE_TO_HOST), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtMemcpy(back, 10, host, 10, ACL_MEMCPY_DEVICE_TO_HOST), ACL_ERROR_INVALID_PARAM);  /* kind lies */
    EXPECT(aclrtMemset(NULL, 10, 0, 10), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtCreateStream(NULL), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtEventElapsedTime(NULL, t0, t1), ACL_ERROR_INVALID_PARAM);
    aclrtStream dead = NULL;
    OK(aclrtCreateStream(&dead));
    OK(aclrtDestroyStream(dead));
    EXPECT(aclrtSynchronizeStream(dead), ACL_ERROR_INVALID_PARAM);                  /* unknown stream */
    EXPECT(aclrtMemcpyAsync(b, N, a, N, ACL_MEMCPY_DEVICE_TO_DEVICE, dead), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtSynchronizeStream((aclrtStream)(uintptr_t)0x1234), ACL_ERROR_INVALID_PARAM);  /* forged */
    EXPECT(aclrtDestroyStream(dead), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtRecordEvent((aclrtEvent)(uintptr_t)0x42, s1), ACL_ERROR_INVALID_PARAM);
    OK(aclrtFree(b));
    EXPECT(aclrtFree(b), ACL_ERROR_INVALID_PARAM);                                 /* double free */
    EXPECT(aclrtMemcpy(back, 10, b, 10, ACL_MEMCPY_DEVICE_TO_HOST), ACL_ERROR_INVALID_PARAM);  /* use after free */
    EXPECT(aclrtFree((char *)a + 8), ACL_ERROR_INVALID_PARAM);
    EXPECT(aclrtFreeHost(host), ACL_ERROR_INVALID_PARAM);                          /* not from MallocHost */
    EXPECT(aclrtMalloc(&dev, 0, ACL_MEM_MALLOC_HUGE_FIRST), ACL_ERROR_INVALID_PARAM);

    OK(aclrtDestroyEvent(ev));
    OK(aclrtDestroyEvent(t0));
    OK(aclrtDestroyEvent(t1));
    EXPECT(aclrtDestroyEvent(ev), ACL_ERROR_INVALID_PARAM);
    OK(aclrtDestroyStream(s1));
    OK(aclrtDestroyStream(s2));
    OK(aclrtFree(a));
    OK(aclrtFreeHost(pinned));
    OK(aclrtSynchronizeDevice());
    OK(aclrtResetDevice(0));
    OK(aclFinalize());
    free(host);
    free(back);
    printf(failures ? "FAILED %d\n" : "OK\n", failures);
    return failures != 0;
}
