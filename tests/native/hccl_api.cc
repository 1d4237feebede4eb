// A plain HCCL program (C++, as hccl.h of the torch_npu wheel is C++) run under `flexnpu run`:
// two ranks (this process forks before aclInit), rank 0 ships the root info through a pipe, as an
// application would through its own channel. Checks what torch_npu's ProcessGroupHCCL does not
// call itself: HcclBarrier, grouped send/recv where both ranks send first, HcclBatchSendRecv,
// HcclAlltoAll, rank queries, and the error codes for forged, destroyed and malformed arguments.
// Usage: hccl_api DEV0 DEV1    (the npu index of each rank)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "acl/acl.h"
#include "third_party/hccl/inc/hccl/hccl.h"

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL rank %d %s:%d: ", g_rank, __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
#define EXPECT(call, want) do { int r_ = (int)(call); CHECK(r_ == (int)(want), "%s returned %d, expected %d (%s)", #call, r_, \
    (int)(want), aclGetRecentErrMsg()); } while (0)
#define OK(call) EXPECT(call, 0)
static int g_rank;

static void put(void *dev, const int32_t *host, size_t n) { OK(aclrtMemcpy(dev, n * 4, host, n * 4, ACL_MEMCPY_HOST_TO_DEVICE)); }
static void get(int32_t *host, const void *dev, size_t n) { OK(aclrtMemcpy(host, n * 4, dev, n * 4, ACL_MEMCPY_DEVICE_TO_HOST)); }

static int rank_main(int rank, int dev, int rfd, int wfd) {
    g_rank = rank;
    OK(aclInit(NULL));
    OK(aclrtSetDevice(dev));
    HcclRootInfo root;
    if (rank == 0) {
        EXPECT(HcclGetRootInfo(NULL), HCCL_E_PTR);
        OK(HcclGetRootInfo(&root));
        if (write(wfd, &root, sizeof root) != (ssize_t)sizeof root) return 2;
    } else if (read(rfd, &root, sizeof root) != (ssize_t)sizeof root) {
        return 2;
    }
    HcclComm comm = NULL, bogus = NULL;
    HcclRootInfo junk;
    memset(&junk, 7, sizeof junk);
    EXPECT(HcclCommInitRootInfo(2, &junk, rank, &bogus), HCCL_E_PARA);   // not a root info of ours
    EXPECT(HcclCommInitRootInfo(2, &root, 2, &bogus), HCCL_E_PARA);      // rank out of range
    OK(HcclCommInitRootInfo(2, &root, rank, &comm));
    uint32_t n = 0, me = 9;
    OK(HcclGetRankSize(comm, &n));
    OK(HcclGetRankId(comm, &me));
    CHECK(n == 2 && me == (uint32_t)rank, "size %u rank %u", n, me);
    CHECK(strcmp(HcclGetErrorString(HCCL_E_PARA), "parameter error") == 0, "error string");
    EXPECT(HcclGetRankSize((HcclComm)(uintptr_t)0x1234, &n), HCCL_E_PARA);  // forged handle

    aclrtStream s = NULL;
    OK(aclrtCreateStream(&s));
    void *a = NULL, *b = NULL;
    OK(aclrtMalloc(&a, 64 * 4, ACL_MEM_MALLOC_HUGE_FIRST));
    OK(aclrtMalloc(&b, 64 * 4, ACL_MEM_MALLOC_HUGE_FIRST));
    int32_t h[64], o[64];

    // all_reduce on a sub-range (pointer arithmetic on device addresses, as on hardware)
    for (int i = 0; i < 64; i++) h[i] = i * (rank + 1);
    put(a, h, 64);
    OK(HcclAllReduce((int32_t *)a + 8, (int32_t *)b + 8, 16, HCCL_DATA_TYPE_INT32, HCCL_REDUCE_SUM, comm, s));
    OK(aclrtSynchronizeStream(s));
    get(o, b, 64);
    for (int i = 8; i < 24; i++) CHECK(o[i] == 3 * i, "all_reduce[%d] = %d", i, o[i]);

    // both ranks send first, then receive, in a group: issued in one order on both sides
    for (int i = 0; i < 64; i++) h[i] = 1000 * rank + i;
    put(a, h, 64);
    OK(HcclGroupStart());
    OK(HcclSend(a, 32, HCCL_DATA_TYPE_INT32, 1 - rank, comm, s));
    OK(HcclRecv(b, 32, HCCL_DATA_TYPE_INT32, 1 - rank, comm, s));
    OK(HcclGroupEnd());
    OK(aclrtSynchronizeStream(s));
    get(o, b, 32);
    for (int i = 0; i < 32; i++) CHECK(o[i] == 1000 * (1 - rank) + i, "grouped recv[%d] = %d", i, o[i]);

    // the same as a batch, receive listed first
    HcclSendRecvItem items[2] = {{HCCL_RECV, (int32_t *)b + 32, 16, HCCL_DATA_TYPE_INT32, (uint32_t)(1 - rank)},
                                 {HCCL_SEND, (int32_t *)a + 16, 16, HCCL_DATA_TYPE_INT32, (uint32_t)(1 - rank)}};
    OK(HcclBatchSendRecv(items, 2, comm, s));
    OK(aclrtSynchronizeStream(s));
    get(o, b, 64);
    for (int i = 0; i < 16; i++) CHECK(o[32 + i] == 1000 * (1 - rank) + 16 + i, "batch recv[%d] = %d", i, o[32 + i]);

    // all-to-all: block q of rank r holds 100 r + q
    for (int i = 0; i < 8; i++) h[i] = 100 * rank + i / 4;
    put(a, h, 8);
    OK(HcclAlltoAll(a, 4, HCCL_DATA_TYPE_INT32, b, 4, HCCL_DATA_TYPE_INT32, comm, s));
    OK(aclrtSynchronizeStream(s));
    get(o, b, 8);
    for (int i = 0; i < 8; i++) CHECK(o[i] == 100 * (i / 4) + rank, "all_to_all[%d] = %d", i, o[i]);

    // the barrier is stream-ordered; rank 1 arrives late, rank 0 must wait for it
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (rank == 1) usleep(500000);
    OK(HcclBarrier(comm, s));
    OK(aclrtSynchronizeStream(s));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double waited = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    CHECK(waited >= 0.45, "the barrier let rank %d through after %.3f s, before its peer arrived", rank, waited);

    // malformed arguments: refused before anything is queued
    EXPECT(HcclAllReduce(h, b, 4, HCCL_DATA_TYPE_INT32, HCCL_REDUCE_SUM, comm, s), HCCL_E_PARA);  // host memory
    EXPECT(HcclAllReduce(a, b, 65, HCCL_DATA_TYPE_INT32, HCCL_REDUCE_SUM, comm, s), HCCL_E_PARA); // past the end
    EXPECT(HcclAllReduce(a, b, 4, HCCL_DATA_TYPE_INT128, HCCL_REDUCE_SUM, comm, s), HCCL_E_NOT_SUPPORT);
    EXPECT(HcclAllReduce(a, NULL, 4, HCCL_DATA_TYPE_INT32, HCCL_REDUCE_SUM, comm, s), HCCL_E_PTR);
    EXPECT(HcclAllReduce(a, b, 4, HCCL_DATA_TYPE_INT32, (HcclReduceOp)77, comm, s), HCCL_E_PARA);
    EXPECT(HcclBroadcast(a, 4, HCCL_DATA_TYPE_INT32, 2, comm, s), HCCL_E_PARA);                    // root
    EXPECT(HcclSend(a, 4, HCCL_DATA_TYPE_INT32, (uint32_t)rank, comm, s), HCCL_E_PARA);            // to itself
    EXPECT(HcclGroupEnd(), HCCL_E_PARA);                                                          // no group
    OK(aclrtSynchronizeStream(s));  // nothing bad was queued

    OK(HcclCommDestroy(comm));
    EXPECT(HcclCommDestroy(comm), HCCL_E_PARA);
    EXPECT(HcclAllReduce(a, b, 4, HCCL_DATA_TYPE_INT32, HCCL_REDUCE_SUM, comm, s), HCCL_E_PARA);  // destroyed
    OK(aclrtFree(a));
    OK(aclrtFree(b));
    OK(aclrtDestroyStream(s));
    OK(aclrtResetDevice(dev));
    OK(aclFinalize());
    if (!failures) printf("rank %d OK\n", rank);
    fflush(stdout);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int p[2];
    if (pipe(p)) return 2;
    pid_t child = fork();
    if (child == 0) return rank_main(1, atoi(argv[2]), p[0], p[1]);
    int rc = rank_main(0, atoi(argv[1]), p[0], p[1]);
    int st = 0;
    waitpid(child, &st, 0);
    return rc || !WIFEXITED(st) || WEXITSTATUS(st) ? 1 : 0;
}
