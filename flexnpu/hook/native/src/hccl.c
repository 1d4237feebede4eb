/* FlexNPU native front end: the HCCL C API (hccl.h of the torch_npu wheel) on the daemons'
 * collectives (flexnpu/daemon/collectives.py, docs/collectives.md).
 *
 * A communicator is the daemon's: HcclCommInitRootInfo sends COMM_INIT with the root info's
 * 16-byte id alone, and the daemons of the ranks exchange the rank -> device map among
 * themselves (a host rendezvous segment per id), so a root info shipped by the application
 * (torch_npu broadcasts it through its store) is all a rank needs. Joining never blocks: the
 * first collective waits, in stream order, for every rank to have joined.
 *
 * Collectives are stream-ordered COLLECTIVE records carrying (input, output) as 1-D tensor refs
 * of the caller's device allocations (native device addresses translated by the address table):
 * the data never passes through this process. Point-to-point is a broadcast on a two-rank
 * communicator: the communicator itself when it has two ranks, else one per peer derived from
 * the parent's id (both sides derive the same id, so no extra exchange). Grouped point-to-point
 * (HcclGroupStart/End, HcclBatchSendRecv) is issued pair by pair in one global order (the lower
 * rank's transfer first), so every rank's stream meets its peers' in an order that cannot
 * deadlock; the variable all-to-all (HcclAlltoAllV) is the same exchange over its blocks.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "fx_native.h"

typedef enum {
    HCCL_SUCCESS = 0, HCCL_E_PARA = 1, HCCL_E_PTR = 2, HCCL_E_MEMORY = 3, HCCL_E_INTERNAL = 4,
    HCCL_E_NOT_SUPPORT = 5, HCCL_E_NOT_FOUND = 6, HCCL_E_UNAVAIL = 7, HCCL_E_SYSCALL = 8,
    HCCL_E_TIMEOUT = 9, HCCL_E_OPEN_FILE_FAILURE = 10, HCCL_E_TCP_CONNECT = 11, HCCL_E_ROCE_CONNECT = 12,
    HCCL_E_TCP_TRANSFER = 13, HCCL_E_ROCE_TRANSFER = 14, HCCL_E_RUNTIME = 15, HCCL_E_DRV = 16,
    HCCL_E_PROFILING = 17, HCCL_E_CCE = 18, HCCL_E_NETWORK = 19, HCCL_E_AGAIN = 20, HCCL_E_REMOTE = 21,
    HCCL_E_SUSPENDING = 22, HCCL_E_OPRETRY_FAIL = 23, HCCL_E_OOM = 24, HCCL_E_RESERVED
} HcclResult;
typedef void *HcclComm;
typedef enum { HCCL_REDUCE_SUM = 0, HCCL_REDUCE_PROD = 1, HCCL_REDUCE_MAX = 2, HCCL_REDUCE_MIN = 3 } HcclReduceOp;
typedef int HcclDataType;
#define HCCL_ROOT_INFO_BYTES 4108
typedef struct HcclRootInfoDef { char internal[HCCL_ROOT_INFO_BYTES]; } HcclRootInfo;
typedef struct HcclCommConfigDef {
    char reserved[24];
    uint32_t hcclBufferSize;
    uint32_t hcclDeterministic;
    char hcclCommName[128];
    /* ... (only the name is read; the rest of the struct is the caller's) */
} HcclCommConfig;
typedef enum { HCCL_SEND = 0, HCCL_RECV = 1 } HcclSendRecvType;
typedef struct HcclSendRecvItemDef {
    HcclSendRecvType sendRecvType;
    void *buf;
    uint64_t count;
    HcclDataType dataType;
    uint32_t remoteRank;
} HcclSendRecvItem;
typedef union { int32_t value; } HcclConfigValue;

#define FX_TAG_COMM 0x8ull
#define ROOT_MAGIC "FXNPUHCCLROOT01"   /* 16 bytes with its NUL */
#define MAX_COMMS 4096
#define COMM_NAME_MAX 128

struct hcomm {
    int dev;                    /* logical device of the rank (fx_devs index) */
    uint32_t handle, rank, size;
    uint8_t id[FXP_COMM_ID_BYTES];
    uint32_t *pair;             /* per peer: the two-rank communicator's handle (size > 2), 0 none */
    void *barrier_buf;          /* 4 bytes of device memory for HcclBarrier */
    char name[COMM_NAME_MAX];
};

static pthread_mutex_t c_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hcomm *comms[MAX_COMMS];
static _Atomic uint32_t next_handle = 1;

/* ------------------------------------------------------------------ errors */
static HcclResult to_hccl(aclError rc) {
    switch (rc) {
    case ACL_SUCCESS: return HCCL_SUCCESS;
    case ACL_ERROR_INVALID_PARAM: case ACL_ERROR_RT_PARAM_INVALID: case ACL_ERROR_RT_INVALID_HANDLE:
    case ACL_ERROR_RT_STREAM_CONTEXT: return HCCL_E_PARA;
    case ACL_ERROR_RT_MEMORY_ALLOCATION: return HCCL_E_OOM;
    case ACL_ERROR_API_NOT_SUPPORT: case ACL_ERROR_RT_FEATURE_NOT_SUPPORT: return HCCL_E_NOT_SUPPORT;
    case ACL_ERROR_RT_NO_PERMISSION: return HCCL_E_UNAVAIL;
    case ACL_ERROR_RT_LOST_HEARTBEAT: return HCCL_E_REMOTE;
    default: return HCCL_E_RUNTIME;
    }
}

/* Records "what: detail" as the thread's error message (aclGetRecentErrMsg) and returns code. */
static HcclResult herr(HcclResult code, const char *what, const char *detail) {
    fx_err(code == HCCL_E_NOT_SUPPORT ? ACL_ERROR_API_NOT_SUPPORT : ACL_ERROR_INVALID_PARAM, "%s: %s", what, detail);
    return code;
}

FX_API const char *HcclGetErrorString(HcclResult code) {
    static const char *const names[] = {
        "success", "parameter error", "empty pointer", "memory error", "internal error", "not supported",
        "resource not found", "resource unavailable", "system call error", "timeout", "open file failure",
        "tcp connect failure", "roce connect failure", "tcp transfer failure", "roce transfer failure",
        "runtime error", "driver error", "profiling error", "cce error", "network error", "try again",
        "remote error", "communicator suspending", "retry constraint", "out of memory"};
    if ((unsigned)code < sizeof names / sizeof *names) return names[code];
    return "unknown HCCL error";
}

/* ------------------------------------------------------------------ communicators */
static HcclComm comm_handle(uint32_t slot, int dev) { return FX_HANDLE(FX_TAG_COMM, dev, slot); }

/* The communicator behind a handle, or NULL (forged, destroyed). Caller holds c_lock. */
static struct hcomm *comm_of(HcclComm c) {
    uint64_t v = (uint64_t)(uintptr_t)c;
    if (v >> 60 != FX_TAG_COMM) return NULL;
    uint32_t slot = (uint32_t)v;
    if (slot == 0 || slot >= MAX_COMMS) return NULL;
    struct hcomm *h = comms[slot];
    return h && (uint64_t)h->dev == ((v >> 32) & 0xFFFFFFF) ? h : NULL;
}

static double exec_timeout_s(void) {
    const char *e = getenv("HCCL_EXEC_TIMEOUT");   /* HCCL's own knob (seconds; 0 = unlimited) */
    double t = e && *e ? strtod(e, NULL) : 1800.0;
    return t <= 0 ? 24 * 3600.0 : t;
}

/* COMM_INIT with the id alone: the daemons exchange the device map. Returns the client handle. */
static aclError join(struct fx_dev *d, const uint8_t id[FXP_COMM_ID_BYTES], uint32_t rank, uint32_t size,
                     uint32_t *handle, const char *what) {
    uint32_t h = atomic_fetch_add(&next_handle, 1);
    pthread_mutex_lock(&d->lock);
    int64_t off = fx_stage_locked(d, id, FXP_COMM_ID_BYTES);
    aclError rc;
    if (off < 0) {
        rc = fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: no room in the shared arena", what);
    } else {
        struct fx_sqe e = {.opcode = FXOP_COMM_INIT, .payload_off = (uint32_t)off, .payload_len = FXP_COMM_ID_BYTES,
                           .a = {h, rank, size, (uint64_t)(exec_timeout_s() * 1000)}};
        struct fx_cqe c;
        rc = fx_call_locked(d, &e, &c, NULL, 0, what);
    }
    pthread_mutex_unlock(&d->lock);
    if (!rc) *handle = h;
    return rc;
}

static void leave(struct fx_dev *d, uint32_t handle) {
    struct fx_sqe e = {.opcode = FXOP_COMM_DESTROY, .a = {handle}};
    (void)fxn_push(d, &e);
}

FX_API HcclResult HcclGetRootInfo(HcclRootInfo *rootInfo) {
    if (!rootInfo) return herr(HCCL_E_PTR, "HcclGetRootInfo", "rootInfo is NULL");
    memset(rootInfo, 0, sizeof *rootInfo);
    memcpy(rootInfo->internal, ROOT_MAGIC, 16);
    uint8_t *id = (uint8_t *)rootInfo->internal + 16;
    size_t got = 0;
    while (got < FXP_COMM_ID_BYTES) {
        ssize_t n = getrandom(id + got, FXP_COMM_ID_BYTES - got, 0);
        if (n <= 0) return herr(HCCL_E_SYSCALL, "HcclGetRootInfo", "getrandom failed");
        got += (size_t)n;
    }
    return HCCL_SUCCESS;
}

FX_API HcclResult HcclGetRootInfoScalable(HcclRootInfo *rootInfo) { return HcclGetRootInfo(rootInfo); }

static HcclResult init_comm(uint32_t nRanks, const uint8_t *id, uint32_t rank, const char *name, HcclComm *comm,
                            const char *what) {
    aclError rc;
    if (!comm) return herr(HCCL_E_PTR, what, "comm is NULL");
    if (nRanks == 0 || nRanks > FXP_MAX_COMM_SIZE || rank >= nRanks)
        return herr(HCCL_E_PARA, what, "rank or number of ranks out of range");
    struct fx_dev *d = fx_cur(&rc);   /* a rank's device is the caller's current device, as in HCCL */
    if (!d) return to_hccl(rc);
    struct hcomm *h = calloc(1, sizeof *h);
    if (!h) return HCCL_E_MEMORY;
    h->dev = d->index;
    h->rank = rank;
    h->size = nRanks;
    memcpy(h->id, id, FXP_COMM_ID_BYTES);
    if (nRanks > 2 && !(h->pair = calloc(nRanks, sizeof *h->pair))) { free(h); return HCCL_E_MEMORY; }
    snprintf(h->name, sizeof h->name, "%s", name && *name ? name : "");
    if (!h->name[0]) {
        for (int i = 0; i < 8; i++) snprintf(h->name + 2 * i, 3, "%02x", id[i]);
    }
    if ((rc = join(d, id, rank, nRanks, &h->handle, what))) { free(h->pair); free(h); return to_hccl(rc); }
    extern aclError aclrtMalloc(void **devPtr, size_t size, int policy);
    if ((rc = aclrtMalloc(&h->barrier_buf, 4, 0))) {
        leave(d, h->handle);
        free(h->pair);
        free(h);
        return to_hccl(rc);
    }
    pthread_mutex_lock(&c_lock);
    uint32_t slot = 0;
    for (uint32_t i = 1; i < MAX_COMMS; i++)
        if (!comms[i]) { slot = i; break; }
    if (slot) comms[slot] = h;
    pthread_mutex_unlock(&c_lock);
    if (!slot) {
        extern aclError aclrtFree(void *devPtr);
        aclrtFree(h->barrier_buf);
        leave(d, h->handle);
        free(h->pair);
        free(h);
        return herr(HCCL_E_UNAVAIL, what, "too many communicators in this process");
    }
    *comm = comm_handle(slot, d->index);
    return HCCL_SUCCESS;
}

static const uint8_t *root_id(const HcclRootInfo *r, const char *what) {
    if (!r || memcmp(r->internal, ROOT_MAGIC, 16) != 0) {
        fx_err(ACL_ERROR_INVALID_PARAM, "%s: the root info was not made by HcclGetRootInfo under FlexNPU", what);
        return NULL;
    }
    return (const uint8_t *)r->internal + 16;
}

FX_API HcclResult HcclCommInitRootInfo(uint32_t nRanks, const HcclRootInfo *rootInfo, uint32_t rank, HcclComm *comm) {
    const uint8_t *id = root_id(rootInfo, "HcclCommInitRootInfo");
    if (!id) return rootInfo ? HCCL_E_PARA : HCCL_E_PTR;
    return init_comm(nRanks, id, rank, NULL, comm, "HcclCommInitRootInfo");
}

FX_API HcclResult HcclCommInitRootInfoConfig(uint32_t nRanks, const HcclRootInfo *rootInfo, uint32_t rank,
                                             const HcclCommConfig *config, HcclComm *comm) {
    const uint8_t *id = root_id(rootInfo, "HcclCommInitRootInfoConfig");
    if (!id) return rootInfo ? HCCL_E_PARA : HCCL_E_PTR;
    char name[COMM_NAME_MAX] = "";
    if (config) {
        memcpy(name, config->hcclCommName, sizeof name);
        name[sizeof name - 1] = 0;
    }
    return init_comm(nRanks, id, rank, name, comm, "HcclCommInitRootInfoConfig");
}

/* Only the communicator name is configurable (HCCL_COMM_CONFIG_COMM_NAME = 2): capability 3. */
FX_API uint32_t HcclGetCommConfigCapability(void) { return 3; }

FX_API HcclResult HcclGetCommName(HcclComm comm, char *commName) {
    if (!commName) return HCCL_E_PTR;
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    if (h) memcpy(commName, h->name, COMM_NAME_MAX);
    pthread_mutex_unlock(&c_lock);
    return h ? HCCL_SUCCESS : herr(HCCL_E_PARA, "HcclGetCommName", "unknown communicator");
}

FX_API HcclResult HcclGetRankSize(HcclComm comm, uint32_t *rankSize) {
    if (!rankSize) return HCCL_E_PTR;
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    if (h) *rankSize = h->size;
    pthread_mutex_unlock(&c_lock);
    return h ? HCCL_SUCCESS : herr(HCCL_E_PARA, "HcclGetRankSize", "unknown communicator");
}

FX_API HcclResult HcclGetRankId(HcclComm comm, uint32_t *rank) {
    if (!rank) return HCCL_E_PTR;
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    if (h) *rank = h->rank;
    pthread_mutex_unlock(&c_lock);
    return h ? HCCL_SUCCESS : herr(HCCL_E_PARA, "HcclGetRankId", "unknown communicator");
}

/* Collective failures surface as the stream's error at its next synchronisation (the daemon
 * aborts the communicator for every rank); there is no separate asynchronous channel. */
FX_API HcclResult HcclGetCommAsyncError(HcclComm comm, HcclResult *asyncError) {
    if (!asyncError) return HCCL_E_PTR;
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    pthread_mutex_unlock(&c_lock);
    *asyncError = HCCL_SUCCESS;
    return h ? HCCL_SUCCESS : herr(HCCL_E_PARA, "HcclGetCommAsyncError", "unknown communicator");
}

FX_API HcclResult HcclCommDestroy(HcclComm comm) {
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    if (h) comms[(uint32_t)(uintptr_t)comm] = NULL;
    pthread_mutex_unlock(&c_lock);
    if (!h) return herr(HCCL_E_PARA, "HcclCommDestroy", "unknown or destroyed communicator");
    aclError rc;
    struct fx_dev *d = fx_dev_get(h->dev, &rc);
    if (d) {
        leave(d, h->handle);
        for (uint32_t p = 0; h->pair && p < h->size; p++)
            if (h->pair[p]) leave(d, h->pair[p]);
        extern aclError aclrtFree(void *devPtr);
        aclrtFree(h->barrier_buf);
    }
    free(h->pair);
    free(h);
    return HCCL_SUCCESS;   /* a reset device already reclaimed everything */
}

/* Nothing to suspend: a communicator holds no device resources of its own. */
FX_API HcclResult HcclCommSuspend(HcclComm comm) { (void)comm; return HCCL_SUCCESS; }
FX_API HcclResult HcclCommResume(HcclComm comm) { (void)comm; return HCCL_SUCCESS; }

/* ------------------------------------------------------------------ one collective */
static int dtype_code(HcclDataType t, int *code, int *size) {
    switch (t) {
    case 0: *code = FXDT_int8; *size = 1; return 0;
    case 1: *code = FXDT_int16; *size = 2; return 0;
    case 2: *code = FXDT_int32; *size = 4; return 0;
    case 3: *code = FXDT_float16; *size = 2; return 0;
    case 4: *code = FXDT_float32; *size = 4; return 0;
    case 5: *code = FXDT_int64; *size = 8; return 0;
    case 6: *code = FXDT_uint64; *size = 8; return 0;
    case 7: *code = FXDT_uint8; *size = 1; return 0;
    case 8: *code = FXDT_uint16; *size = 2; return 0;
    case 9: *code = FXDT_uint32; *size = 4; return 0;
    case 10: *code = FXDT_float64; *size = 8; return 0;
    case 11: *code = FXDT_bfloat16; *size = 2; return 0;
    default: return -1;
    }
}

static int reduce_code(HcclReduceOp op) {
    switch (op) {
    case HCCL_REDUCE_SUM: return FXP_REDUCE_SUM;
    case HCCL_REDUCE_PROD: return FXP_REDUCE_PROD;
    case HCCL_REDUCE_MAX: return FXP_REDUCE_MAX;
    case HCCL_REDUCE_MIN: return FXP_REDUCE_MIN;
    default: return -1;
    }
}

static uint8_t *put_tensor(uint8_t *p, uint64_t handle, int dtype, uint64_t n, uint64_t off_elems) {
    *p++ = FXT_TENSOR;
    uint32_t h32 = (uint32_t)handle;
    memcpy(p, &h32, 4); p += 4;
    *p++ = (uint8_t)dtype;
    *p++ = 1;                                      /* one dimension */
    int64_t v[3] = {(int64_t)n, 1, (int64_t)off_elems};
    memcpy(p, v, sizeof v);
    return p + sizeof v;
}

struct buf { uint64_t handle, off; };

/* Resolves a device buffer of n elements (device must be d). */
static HcclResult buffer(struct fx_dev *d, const void *p, uint64_t n, int isz, struct buf *b, const char *what,
                         const char *which) {
    struct fx_dev *bd;
    if (!p) return herr(HCCL_E_PTR, what, which[4] == 's' ? "the send buffer is NULL" : "the receive buffer is NULL");
    if (n > (UINT64_MAX >> 4) / (uint64_t)isz) return herr(HCCL_E_PARA, what, "count too large");
    aclError rc = fx_dev_addr(p, n * (uint64_t)isz, &bd, &b->handle, &b->off, what);
    if (rc) return to_hccl(rc);
    if (bd != d) return herr(HCCL_E_PARA, what, "a buffer is memory of another device than the communicator's");
    if (b->off % (uint64_t)isz) return herr(HCCL_E_PARA, what, "a buffer is not aligned to its data type");
    if (b->handle >> 32) return herr(HCCL_E_INTERNAL, what, "allocation handle out of range");
    (void)which;
    return HCCL_SUCCESS;
}

/* Queues one COLLECTIVE on `stream` of the communicator's device. Counts are elements of the
 * input (nin) and output (nout). */
static HcclResult collective(struct hcomm *h, uint32_t handle, int kind, int op, uint32_t root, const void *in,
                             uint64_t nin, const void *out, uint64_t nout, HcclDataType dt, aclrtStream stream,
                             const char *what) {
    aclError rc;
    int code, isz;
    if (dtype_code(dt, &code, &isz)) return herr(HCCL_E_NOT_SUPPORT, what, "data type not supported");
    struct fx_dev *d;
    uint32_t sid;
    if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return to_hccl(rc);
    if (d->index != h->dev)
        return herr(HCCL_E_PARA, what, "the stream belongs to another device than the communicator");
    if (nin == 0 && nout == 0) return HCCL_SUCCESS;
    struct buf bi, bo;
    HcclResult r;
    if ((r = buffer(d, in, nin, isz, &bi, what, "the send buffer"))) return r;
    if ((r = buffer(d, out, nout, isz, &bo, what, "the receive buffer"))) return r;
    static const char *const names[] = {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"};
    const char *name = names[kind];
    uint8_t payload[128], *p = payload;
    uint16_t nl = (uint16_t)strlen(name);
    memcpy(p, &nl, 2); p += 2;
    memcpy(p, name, nl); p += nl;
    *p++ = FXT_TUPLE;
    uint16_t two = 2, zero = 0;
    memcpy(p, &two, 2); p += 2;
    p = put_tensor(p, bi.handle, code, nin, bi.off / (uint64_t)isz);
    p = put_tensor(p, bo.handle, code, nout, bo.off / (uint64_t)isz);
    memcpy(p, &zero, 2); p += 2;   /* no keyword arguments */
    memcpy(p, &zero, 2); p += 2;   /* no outputs */
    uint32_t len = (uint32_t)(p - payload);
    pthread_mutex_lock(&d->lock);
    int64_t off = fx_stage_locked(d, payload, len);
    if (off < 0) {
        rc = fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: no room in the shared arena", what);
    } else {
        struct fx_sqe e = {.opcode = FXOP_COLLECTIVE, .stream = sid, .payload_off = (uint32_t)off,
                           .payload_len = len, .a = {handle, (uint64_t)kind, (uint64_t)op, root}};
        rc = fx_push_locked(d, &e);
    }
    pthread_mutex_unlock(&d->lock);
    return to_hccl(rc);
}

/* Looks a communicator up and copies what the call needs (it may be destroyed meanwhile). */
static HcclResult get(HcclComm comm, struct hcomm *out, const char *what) {
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    if (h) *out = *h;
    pthread_mutex_unlock(&c_lock);
    return h ? HCCL_SUCCESS : herr(HCCL_E_PARA, what, "unknown or destroyed communicator");
}

FX_API HcclResult HcclAllReduce(void *sendBuf, void *recvBuf, uint64_t count, HcclDataType dataType,
                                HcclReduceOp op, HcclComm comm, aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclAllReduce");
    if (r) return r;
    int rop = reduce_code(op);
    if (rop < 0) return herr(HCCL_E_PARA, "HcclAllReduce", "unknown reduce op");
    return collective(&h, h.handle, FXP_COLL_ALL_REDUCE, rop, 0, sendBuf, count, recvBuf, count, dataType, stream,
                      "HcclAllReduce");
}

/* Only the root's receive buffer is written, as in HCCL: the other ranks reduce into a scratch
 * allocation, freed at once (the daemon holds an allocation a queued collective uses until it
 * has run). */
FX_API HcclResult HcclReduce(void *sendBuf, void *recvBuf, uint64_t count, HcclDataType dataType, HcclReduceOp op,
                             uint32_t root, HcclComm comm, aclrtStream stream) {
    const char *what = "HcclReduce";
    struct hcomm h;
    HcclResult r = get(comm, &h, what);
    if (r) return r;
    int rop = reduce_code(op), code, isz;
    if (rop < 0) return herr(HCCL_E_PARA, what, "unknown reduce op");
    if (root >= h.size) return herr(HCCL_E_PARA, what, "root out of range");
    if (dtype_code(dataType, &code, &isz)) return herr(HCCL_E_NOT_SUPPORT, what, "data type not supported");
    if (h.rank == root || count == 0)
        return collective(&h, h.handle, FXP_COLL_ALL_REDUCE, rop, 0, sendBuf, count, recvBuf, count, dataType, stream,
                          what);
    extern aclError aclrtMalloc(void **devPtr, size_t size, int policy);
    extern aclError aclrtFree(void *devPtr);
    aclError rc;
    struct fx_dev *cur = fx_cur(&rc);
    if (!cur) return to_hccl(rc);
    if (cur->index != h.dev)
        return herr(HCCL_E_PARA, what, "the calling thread's current device is not the communicator's");
    if (count > (UINT64_MAX >> 4) / (uint64_t)isz) return herr(HCCL_E_PARA, what, "count too large");
    void *scratch = NULL;
    if ((rc = aclrtMalloc(&scratch, count * (uint64_t)isz, 0))) return to_hccl(rc);
    r = collective(&h, h.handle, FXP_COLL_ALL_REDUCE, rop, 0, sendBuf, count, scratch, count, dataType, stream, what);
    aclrtFree(scratch);
    return r;
}

FX_API HcclResult HcclBroadcast(void *buf, uint64_t count, HcclDataType dataType, uint32_t root, HcclComm comm,
                                aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclBroadcast");
    if (r) return r;
    if (root >= h.size) return herr(HCCL_E_PARA, "HcclBroadcast", "root out of range");
    return collective(&h, h.handle, FXP_COLL_BROADCAST, 0, root, buf, count, buf, count, dataType, stream,
                      "HcclBroadcast");
}

FX_API HcclResult HcclAllGather(void *sendBuf, void *recvBuf, uint64_t sendCount, HcclDataType dataType,
                                HcclComm comm, aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclAllGather");
    if (r) return r;
    return collective(&h, h.handle, FXP_COLL_ALL_GATHER, 0, 0, sendBuf, sendCount, recvBuf, sendCount * h.size,
                      dataType, stream, "HcclAllGather");
}

FX_API HcclResult HcclReduceScatter(void *sendBuf, void *recvBuf, uint64_t recvCount, HcclDataType dataType,
                                    HcclReduceOp op, HcclComm comm, aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclReduceScatter");
    if (r) return r;
    int rop = reduce_code(op);
    if (rop < 0) return herr(HCCL_E_PARA, "HcclReduceScatter", "unknown reduce op");
    return collective(&h, h.handle, FXP_COLL_REDUCE_SCATTER, rop, 0, sendBuf, recvCount * h.size, recvBuf,
                      recvCount, dataType, stream, "HcclReduceScatter");
}

FX_API HcclResult HcclAlltoAll(const void *sendBuf, uint64_t sendCount, HcclDataType sendType, const void *recvBuf,
                               uint64_t recvCount, HcclDataType recvType, HcclComm comm, aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclAlltoAll");
    if (r) return r;
    if (sendType != recvType || sendCount != recvCount)
        return herr(HCCL_E_PARA, "HcclAlltoAll", "send and receive counts and types must be equal");
    return collective(&h, h.handle, FXP_COLL_ALL_TO_ALL, 0, 0, sendBuf, sendCount * h.size, recvBuf,
                      recvCount * h.size, sendType, stream, "HcclAlltoAll");
}

FX_API HcclResult HcclBarrier(HcclComm comm, aclrtStream stream) {
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclBarrier");
    if (r) return r;
    return collective(&h, h.handle, FXP_COLL_ALL_REDUCE, FXP_REDUCE_MAX, 0, h.barrier_buf, 1, h.barrier_buf, 1,
                      2 /* int32 */, stream, "HcclBarrier");
}

/* ------------------------------------------------------------------ point to point */
/* The two-rank communicator for (h, peer): h itself when it has two ranks; else one derived from
 * h's id and the pair (both sides derive the same id), joined at the pair's first use. Returns its
 * handle and this rank's rank in it. */
static HcclResult pair_of(struct hcomm *copy, HcclComm comm, uint32_t peer, uint32_t *handle, uint32_t *me,
                          const char *what) {
    if (peer >= copy->size || peer == copy->rank) return herr(HCCL_E_PARA, what, "invalid peer rank");
    uint32_t lo = copy->rank < peer ? copy->rank : peer, hi = copy->rank < peer ? peer : copy->rank;
    *me = copy->rank == lo ? 0 : 1;
    if (copy->size == 2) { *handle = copy->handle; *me = copy->rank; return HCCL_SUCCESS; }
    pthread_mutex_lock(&c_lock);
    struct hcomm *h = comm_of(comm);
    uint32_t got = h ? h->pair[peer] : 0;
    pthread_mutex_unlock(&c_lock);
    if (!h) return herr(HCCL_E_PARA, what, "unknown or destroyed communicator");
    if (got) { *handle = got; return HCCL_SUCCESS; }
    uint8_t id[FXP_COMM_ID_BYTES];
    memcpy(id, copy->id, sizeof id);
    uint64_t mix[2] = {((uint64_t)lo << 32 | hi) * 0x9E3779B97F4A7C15ull ^ 0x7032702d50324bull,
                       ((uint64_t)hi << 32 | lo) * 0xBF58476D1CE4E5B9ull};
    for (int i = 0; i < FXP_COMM_ID_BYTES; i++) id[i] ^= ((uint8_t *)mix)[i];
    aclError rc;
    struct fx_dev *d = fx_dev_get(copy->dev, &rc);
    if (!d) return to_hccl(rc);
    uint32_t ph;
    if ((rc = join(d, id, *me, 2, &ph, what))) return to_hccl(rc);
    pthread_mutex_lock(&c_lock);
    h = comm_of(comm);
    if (h && !h->pair[peer]) { h->pair[peer] = ph; ph = 0; }
    else if (h) got = h->pair[peer];
    pthread_mutex_unlock(&c_lock);
    if (ph) leave(d, ph);   /* another thread joined it first, or the communicator is gone */
    if (!h) return herr(HCCL_E_PARA, what, "communicator destroyed meanwhile");
    *handle = got ? got : h->pair[peer];
    return HCCL_SUCCESS;
}

static HcclResult p2p(int send, void *buf, uint64_t count, HcclDataType dt, uint32_t peer, HcclComm comm,
                      aclrtStream stream, const char *what) {
    struct hcomm h;
    HcclResult r = get(comm, &h, what);
    if (r) return r;
    uint32_t ph, me;
    if ((r = pair_of(&h, comm, peer, &ph, &me, what))) return r;
    uint32_t root = send ? me : (h.size == 2 ? peer : 1 - me);
    return collective(&h, ph, FXP_COLL_BROADCAST, 0, root, buf, count, buf, count, dt, stream, what);
}

/* Grouped point-to-point (HcclGroupStart .. HcclGroupEnd): deferred, then issued in the global
 * pair order. Collectives inside a group are issued at once (each is already ordered alike on
 * every rank). */
struct p2p_op { int send; void *buf; uint64_t count; HcclDataType dt; uint32_t peer, rank; HcclComm comm;
                aclrtStream stream; size_t seq; };
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_depth;
static struct p2p_op *g_ops;
static size_t g_n, g_cap;

static int op_order(const void *a, const void *b) {
    const struct p2p_op *x = a, *y = b;
    if ((uintptr_t)x->comm != (uintptr_t)y->comm) return (uintptr_t)x->comm < (uintptr_t)y->comm ? -1 : 1;
    if (x->peer != y->peer) return x->peer < y->peer ? -1 : 1;
    /* with one peer: the transfer from the lower rank first (a send if we are the lower) */
    int xf = x->send == (x->rank < x->peer), yf = y->send == (y->rank < y->peer);
    if (xf != yf) return xf ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static HcclResult issue_sorted(struct p2p_op *ops, size_t n, const char *what) {
    qsort(ops, n, sizeof *ops, op_order);
    HcclResult first = HCCL_SUCCESS;
    for (size_t i = 0; i < n; i++) {
        HcclResult r = p2p(ops[i].send, ops[i].buf, ops[i].count, ops[i].dt, ops[i].peer, ops[i].comm, ops[i].stream,
                           what);
        if (r && !first) first = r;
    }
    return first;
}

static HcclResult p2p_or_defer(int send, void *buf, uint64_t count, HcclDataType dt, uint32_t peer, HcclComm comm,
                               aclrtStream stream, const char *what) {
    pthread_mutex_lock(&g_lock);
    if (g_depth > 0) {
        struct hcomm h;
        HcclResult r = get(comm, &h, what);
        if (!r && g_n == g_cap) {
            size_t cap = g_cap ? g_cap * 2 : 64;
            struct p2p_op *a = realloc(g_ops, cap * sizeof *a);
            if (!a) r = HCCL_E_MEMORY;
            else { g_ops = a; g_cap = cap; }
        }
        if (!r) g_ops[g_n] = (struct p2p_op){send, buf, count, dt, peer, h.rank, comm, stream, g_n}, g_n++;
        pthread_mutex_unlock(&g_lock);
        return r;
    }
    pthread_mutex_unlock(&g_lock);
    return p2p(send, buf, count, dt, peer, comm, stream, what);
}

FX_API HcclResult HcclSend(void *sendBuf, uint64_t count, HcclDataType dataType, uint32_t destRank, HcclComm comm,
                           aclrtStream stream) {
    return p2p_or_defer(1, sendBuf, count, dataType, destRank, comm, stream, "HcclSend");
}

FX_API HcclResult HcclRecv(void *recvBuf, uint64_t count, HcclDataType dataType, uint32_t srcRank, HcclComm comm,
                           aclrtStream stream) {
    return p2p_or_defer(0, recvBuf, count, dataType, srcRank, comm, stream, "HcclRecv");
}

FX_API HcclResult HcclGroupStart(void) {
    pthread_mutex_lock(&g_lock);
    g_depth++;
    pthread_mutex_unlock(&g_lock);
    return HCCL_SUCCESS;
}

FX_API HcclResult HcclGroupEnd(void) {
    pthread_mutex_lock(&g_lock);
    if (g_depth == 0) {
        pthread_mutex_unlock(&g_lock);
        return herr(HCCL_E_PARA, "HcclGroupEnd", "no group started");
    }
    struct p2p_op *ops = NULL;
    size_t n = 0;
    if (--g_depth == 0 && g_n) {
        ops = g_ops;
        n = g_n;
        g_ops = NULL;
        g_n = g_cap = 0;
    }
    pthread_mutex_unlock(&g_lock);
    HcclResult r = n ? issue_sorted(ops, n, "HcclGroupEnd") : HCCL_SUCCESS;
    free(ops);
    return r;
}

FX_API HcclResult HcclBatchSendRecv(HcclSendRecvItem *items, uint32_t itemNum, HcclComm comm, aclrtStream stream) {
    if (!items && itemNum) return HCCL_E_PTR;
    struct hcomm h;
    HcclResult r = get(comm, &h, "HcclBatchSendRecv");
    if (r) return r;
    struct p2p_op *ops = calloc(itemNum ? itemNum : 1, sizeof *ops);
    if (!ops) return HCCL_E_MEMORY;
    for (uint32_t i = 0; i < itemNum; i++) {
        if (items[i].sendRecvType != HCCL_SEND && items[i].sendRecvType != HCCL_RECV) {
            free(ops);
            return herr(HCCL_E_PARA, "HcclBatchSendRecv", "unknown item type");
        }
        ops[i] = (struct p2p_op){items[i].sendRecvType == HCCL_SEND, items[i].buf, items[i].count, items[i].dataType,
                                 items[i].remoteRank, h.rank, comm, stream, i};
    }
    r = issue_sorted(ops, itemNum, "HcclBatchSendRecv");
    free(ops);
    return r;
}

/* Variable all-to-all: block j of the send buffer (sendCounts[j] elements at sdispls[j]) goes to
 * rank j, which receives it at rdispls[me]: one exchange per pair of ranks in the global pair
 * order, plus a device copy of this rank's own block. Counts and displacements are u64 host
 * arrays, in elements, as hccl.h documents. */
FX_API HcclResult HcclAlltoAllV(const void *sendBuf, const void *sendCounts, const void *sdispls,
                                HcclDataType sendType, const void *recvBuf, const void *recvCounts,
                                const void *rdispls, HcclDataType recvType, HcclComm comm, aclrtStream stream) {
    const char *what = "HcclAlltoAllV";
    struct hcomm h;
    HcclResult r = get(comm, &h, what);
    if (r) return r;
    if (sendType != recvType) return herr(HCCL_E_PARA, what, "send and receive types must be equal");
    if (!sendCounts || !sdispls || !recvCounts || !rdispls) return HCCL_E_PTR;
    int code, isz;
    if (dtype_code(sendType, &code, &isz)) return herr(HCCL_E_NOT_SUPPORT, what, "data type not supported");
    const uint64_t *sc = sendCounts, *sd = sdispls, *rcn = recvCounts, *rd = rdispls;
    struct p2p_op *ops = calloc(2 * (size_t)h.size, sizeof *ops);
    if (!ops) return HCCL_E_MEMORY;
    size_t n = 0;
    for (uint32_t j = 0; j < h.size; j++) {
        if (j == h.rank) continue;
        if (sc[j]) ops[n] = (struct p2p_op){1, (uint8_t *)sendBuf + sd[j] * (uint64_t)isz, sc[j], sendType, j, h.rank,
                                           comm, stream, n}, n++;
        if (rcn[j]) ops[n] = (struct p2p_op){0, (uint8_t *)recvBuf + rd[j] * (uint64_t)isz, rcn[j], sendType, j,
                                            h.rank, comm, stream, n}, n++;
    }
    uint32_t me = h.rank;
    if (sc[me] != rcn[me]) {
        free(ops);
        return herr(HCCL_E_PARA, what, "this rank's block to itself has different send and receive counts");
    }
    if (sc[me]) {
        extern aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count, int kind,
                                         aclrtStream stream);
        uint64_t bytes = sc[me] * (uint64_t)isz;
        aclError rc = aclrtMemcpyAsync((uint8_t *)recvBuf + rd[me] * (uint64_t)isz, bytes,
                                       (const uint8_t *)sendBuf + sd[me] * (uint64_t)isz, bytes, FX_MEMCPY_D2D, stream);
        if (rc) { free(ops); return to_hccl(rc); }
    }
    r = issue_sorted(ops, n, what);
    free(ops);
    return r;
}

/* Scatter: the root's send buffer holds `count` elements per rank, in rank order; rank j
 * receives block j. The root sends each other rank its block over the pair's communicator (the
 * global pair order, as the grouped point-to-point) and copies its own on the device; the other
 * ranks receive one block. torch_npu's ProcessGroupHCCL::scatter calls it. */
FX_API HcclResult HcclScatter(void *sendBuf, void *recvBuf, uint64_t count, HcclDataType dataType, uint32_t root,
                              HcclComm comm, aclrtStream stream) {
    const char *what = "HcclScatter";
    struct hcomm h;
    HcclResult r = get(comm, &h, what);
    if (r) return r;
    if (root >= h.size) return herr(HCCL_E_PARA, what, "root out of range");
    int code, isz;
    if (dtype_code(dataType, &code, &isz)) return herr(HCCL_E_NOT_SUPPORT, what, "data type not supported");
    if (count == 0) return HCCL_SUCCESS;
    if (!recvBuf || (h.rank == root && !sendBuf)) return HCCL_E_PTR;
    if (count > (UINT64_MAX >> 8) / (uint64_t)isz / h.size) return herr(HCCL_E_PARA, what, "count too large");
    uint64_t bytes = count * (uint64_t)isz;
    if (h.rank != root) {
        struct p2p_op op = {0, recvBuf, count, dataType, root, h.rank, comm, stream, 0};
        return issue_sorted(&op, 1, what);
    }
    struct p2p_op *ops = calloc(h.size, sizeof *ops);
    if (!ops) return HCCL_E_MEMORY;
    size_t n = 0;
    for (uint32_t j = 0; j < h.size; j++)
        if (j != root)
            ops[n] = (struct p2p_op){1, (uint8_t *)sendBuf + j * bytes, count, dataType, j, h.rank, comm, stream, n},
            n++;
    extern aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count, int kind,
                                     aclrtStream stream);
    aclError rc = aclrtMemcpyAsync(recvBuf, bytes, (const uint8_t *)sendBuf + root * bytes, bytes, FX_MEMCPY_D2D,
                                   stream);
    r = rc ? to_hccl(rc) : issue_sorted(ops, n, what);
    free(ops);
    return r;
}

/* Root-info based configuration knobs HCCL exposes globally: accepted, nothing to configure. */
FX_API HcclResult HcclSetConfig(int config, HcclConfigValue configValue) {
    (void)config; (void)configValue;
    return HCCL_SUCCESS;
}
