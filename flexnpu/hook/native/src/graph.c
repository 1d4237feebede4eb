/* FlexNPU native front end: captured graphs (aclmdlRI*) and stream attributes.
 *
 * torch.npu.NPUGraph (torch_npu/csrc/core/npu/NPUGraph.cpp) captures a stream with
 * aclmdlRICaptureBegin(stream, mode), asks aclmdlRICaptureGetInfo for the model being captured
 * (its caching allocator does so for every allocation during the capture, to route it to the
 * graph's private pool; aclmdlRIGetId turns the model into a capture id), ends with
 * aclmdlRICaptureEnd(stream, &model), replays with aclmdlRIExecuteAsync(model, stream) on any
 * stream and frees with aclmdlRIDestroy. These map one to one onto the daemon's capture and
 * one-record replay (GRAPH_BEGIN / GRAPH_END / GRAPH_REPLAY / GRAPH_DESTROY, as the Python
 * client uses them): a model handle is a tagged integer (device, graph id), never a pointer.
 *
 * The capture state of each stream is kept here as well as in the daemon, so the queries
 * torch_npu makes on every allocation are answered without a round trip, and a second begin /
 * an end without a begin get AscendCL's own codes before anything is sent.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "fx_native.h"

#define FX_TAG_MODEL 0x8ull

#define ACL_ERROR_RT_MODEL_CAPTURED 107026
#define ACL_ERROR_RT_STREAM_CAPTURED 107027
#define ACL_ERROR_RT_STREAM_NOT_CAPTURED 107029

enum { CAPTURE_STATUS_NONE = 0, CAPTURE_STATUS_ACTIVE = 1 };
enum { CAPTURE_MODE_GLOBAL = 0, CAPTURE_MODE_THREAD_LOCAL = 1, CAPTURE_MODE_RELAXED = 2 };

struct capture { uint32_t sid, gid; };

/* Per device: the streams being captured and the graphs that exist (captured, not destroyed).
 * Guarded by g_lock; a device's table is reset when it detaches (the daemon drops its graphs). */
static struct gdev {
    struct capture *cap;
    size_t ncap, capcap;
    struct fx_idset live;
    uint32_t next_gid;
} gdevs[FX_MAX_DEVICES];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int t_mode = CAPTURE_MODE_GLOBAL;

extern aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid);

void fx_graph_forget_device(int dev) {
    pthread_mutex_lock(&g_lock);
    struct gdev *g = &gdevs[dev];
    free(g->cap);
    g->cap = NULL;
    g->ncap = g->capcap = 0;
    fx_idset_clear(&g->live);
    g->next_gid = 0;
    pthread_mutex_unlock(&g_lock);
}

static pthread_mutex_t a_lock;   /* stream attributes, below */

void fx_graph_after_fork(void) {
    pthread_mutex_init(&g_lock, NULL);
    pthread_mutex_init(&a_lock, NULL);
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        free(gdevs[i].cap);
        fx_idset_clear(&gdevs[i].live);
        memset(&gdevs[i], 0, sizeof gdevs[i]);
    }
}

/* caller holds g_lock; index into g->cap or -1 */
static long find_capture(struct gdev *g, uint32_t sid) {
    for (size_t i = 0; i < g->ncap; i++)
        if (g->cap[i].sid == sid) return (long)i;
    return -1;
}

static long find_graph_capture(struct gdev *g, uint32_t gid) {
    for (size_t i = 0; i < g->ncap; i++)
        if (g->cap[i].gid == gid) return (long)i;
    return -1;
}

/* The graph a stream is capturing into, 0 if none (for the runtime calls that a capture
 * forbids). */
uint32_t fx_graph_capturing(int dev, uint32_t sid) {
    pthread_mutex_lock(&g_lock);
    long i = find_capture(&gdevs[dev], sid);
    uint32_t gid = i < 0 ? 0 : gdevs[dev].cap[i].gid;
    pthread_mutex_unlock(&g_lock);
    return gid;
}

static int model_decode(void *m, int *dev, uint32_t *gid) {
    uint64_t v = (uint64_t)(uintptr_t)m;
    if ((v >> 60) != FX_TAG_MODEL) return -1;
    *dev = (int)((v >> 32) & 0xFFFFFFF);
    *gid = (uint32_t)v;
    return *dev < fx_ndev && *gid ? 0 : -1;
}

/* A model handle of an attached device; live = 1: a captured graph, 0: also one being captured. */
static struct fx_dev *model_dev(void *m, uint32_t *gid, int live_only, const char *what, aclError *rc) {
    int dev;
    if (!m || model_decode(m, &dev, gid)) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%s: %p is not a model", what, m);
        return NULL;
    }
    struct fx_dev *d = fx_dev_get(dev, rc);
    if (!d) return NULL;
    pthread_mutex_lock(&g_lock);
    int live = fx_idset_has(&gdevs[dev].live, *gid);
    int capturing = !live && find_graph_capture(&gdevs[dev], *gid) >= 0;
    pthread_mutex_unlock(&g_lock);
    if (live || (capturing && !live_only)) return d;
    *rc = capturing ? fx_err(ACL_ERROR_RT_MODEL_CAPTURED, "%s: model %p is still being captured", what, m)
                    : fx_err(ACL_ERROR_INVALID_PARAM, "%s: unknown model %p (destroyed, or never captured)", what, m);
    return NULL;
}

/* ------------------------------------------------------------------ capture */
FX_API aclError aclmdlRICaptureBegin(aclrtStream stream, int mode) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if (mode < CAPTURE_MODE_GLOBAL || mode > CAPTURE_MODE_RELAXED)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureBegin: unknown capture mode %d", mode);
    if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    pthread_mutex_lock(&d->lock);   /* the begin record and the table change in the same order */
    pthread_mutex_lock(&g_lock);
    struct gdev *g = &gdevs[d->index];
    if (find_capture(g, sid) >= 0) {
        rc = fx_err(ACL_ERROR_RT_STREAM_CAPTURED, "aclmdlRICaptureBegin: stream %p is already being captured", stream);
    } else if (g->ncap == g->capcap) {
        size_t cap = g->capcap ? g->capcap * 2 : 8;
        struct capture *a = realloc(g->cap, cap * sizeof *a);
        if (!a) rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
        else { g->cap = a; g->capcap = cap; }
    }
    if (!rc) {
        uint32_t gid = ++g->next_gid;
        if (!gid) gid = ++g->next_gid;   /* 2^32 captures later: 0 is never a graph */
        struct fx_sqe e = {.opcode = FXOP_GRAPH_BEGIN, .stream = sid, .a = {gid}};
        rc = fx_push_locked(d, &e);
        if (!rc) g->cap[g->ncap++] = (struct capture){sid, gid};
    }
    pthread_mutex_unlock(&g_lock);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

FX_API aclError aclmdlRICaptureGetInfo(aclrtStream stream, int *status, void **modelRI) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if (!status) return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureGetInfo: status is NULL");
    *status = CAPTURE_STATUS_NONE;
    if (modelRI) *modelRI = NULL;
    if ((rc = fx_stream_dev_pub(stream, &d, &sid)))
        return stream ? rc : ACL_SUCCESS;   /* the default stream of a thread without a device: not capturing */
    pthread_mutex_lock(&g_lock);
    long i = find_capture(&gdevs[d->index], sid);
    if (i >= 0) {
        *status = CAPTURE_STATUS_ACTIVE;
        if (modelRI) *modelRI = FX_HANDLE(FX_TAG_MODEL, d->index, gdevs[d->index].cap[i].gid);
    }
    pthread_mutex_unlock(&g_lock);
    return ACL_SUCCESS;
}

FX_API aclError aclmdlRICaptureEnd(aclrtStream stream, void **modelRI) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if (!modelRI) return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureEnd: modelRI is NULL");
    *modelRI = NULL;
    if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    pthread_mutex_lock(&d->lock);
    pthread_mutex_lock(&g_lock);
    struct gdev *g = &gdevs[d->index];
    long i = find_capture(g, sid);
    uint32_t gid = i < 0 ? 0 : g->cap[i].gid;
    if (i >= 0) g->cap[i] = g->cap[--g->ncap];   /* the capture is over whatever the daemon says */
    pthread_mutex_unlock(&g_lock);
    if (!gid) {
        pthread_mutex_unlock(&d->lock);
        return fx_err(ACL_ERROR_RT_STREAM_NOT_CAPTURED, "aclmdlRICaptureEnd: stream %p is not being captured", stream);
    }
    /* Synchronous: the reply carries what went wrong during the capture (an operator the
     * daemon refused), as AscendCL reports an invalidated capture at its end. */
    struct fx_sqe e = {.opcode = FXOP_GRAPH_END, .stream = sid, .a = {gid}};
    struct fx_cqe c;
    rc = fx_call_locked(d, &e, &c, NULL, 0, "aclmdlRICaptureEnd");
    if (rc == ACL_SUCCESS) {
        pthread_mutex_lock(&g_lock);
        if (fx_idset_add(&g->live, gid)) rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
        pthread_mutex_unlock(&g_lock);
    }
    if (rc && atomic_load(&d->state) == 1) {
        /* a failed capture leaves no graph behind; synchronous, so "never created" is not left
         * as an error for a later call to find */
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", aclGetRecentErrMsg());
        struct fx_sqe x = {.opcode = FXOP_GRAPH_DESTROY, .a = {gid}};
        (void)fx_call_locked(d, &x, &c, NULL, 0, "aclmdlRICaptureEnd");
        fx_err_restore(saved);
    } else if (!rc) {
        *modelRI = FX_HANDLE(FX_TAG_MODEL, d->index, gid);
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

FX_API aclError aclmdlRICaptureThreadExchangeMode(int *mode) {
    /* The mode decides which other threads' unsafe calls a capture forbids on hardware; the
     * daemon refuses what would break a capture on the captured stream itself, whatever the
     * mode, so the value is only kept (per thread, as AscendCL keeps it) and handed back. */
    if (!mode) return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureThreadExchangeMode: mode is NULL");
    if (*mode < CAPTURE_MODE_GLOBAL || *mode > CAPTURE_MODE_RELAXED)
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRICaptureThreadExchangeMode: unknown mode %d", *mode);
    int old = t_mode;
    t_mode = *mode;
    *mode = old;
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ models */
FX_API aclError aclmdlRIGetId(void *modelRI, uint32_t *modelRIId) {
    aclError rc;
    uint32_t gid;
    if (!modelRIId) return fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRIGetId: modelRIId is NULL");
    if (!model_dev(modelRI, &gid, 0, "aclmdlRIGetId", &rc)) return rc;
    *modelRIId = gid;
    return ACL_SUCCESS;
}

FX_API aclError aclmdlRIExecuteAsync(void *modelRI, aclrtStream stream) {
    aclError rc;
    uint32_t gid, sid;
    struct fx_dev *d = model_dev(modelRI, &gid, 1, "aclmdlRIExecuteAsync", &rc), *ds;
    if (!d) return rc;
    if ((rc = fx_stream_dev_pub(stream, &ds, &sid))) return rc;
    if (ds != d)
        return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "aclmdlRIExecuteAsync: model of device %d, stream of device %d",
                      d->index, ds->index);
    struct fx_sqe e = {.opcode = FXOP_GRAPH_REPLAY, .stream = sid, .a = {gid}};
    return fxn_push(d, &e);
}

FX_API aclError aclmdlRIExecute(void *modelRI, int32_t timeout) {
    aclError rc;
    uint32_t gid;
    (void)timeout;   /* the daemon never leaves a replay pending forever */
    struct fx_dev *d = model_dev(modelRI, &gid, 1, "aclmdlRIExecute", &rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_GRAPH_REPLAY, .stream = 0, .a = {gid}};
    struct fx_cqe c;
    return fxn_call(d, &e, &c, NULL, 0, "aclmdlRIExecute");
}

FX_API aclError aclmdlRIDestroy(void *modelRI) {
    aclError rc;
    uint32_t gid;
    struct fx_dev *d = model_dev(modelRI, &gid, 1, "aclmdlRIDestroy", &rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    pthread_mutex_lock(&g_lock);
    int had = fx_idset_del(&gdevs[d->index].live, gid);
    pthread_mutex_unlock(&g_lock);
    if (had) {
        /* after the replays already queued: the daemon keeps a replayed graph's commands alive
         * until they ran */
        struct fx_sqe e = {.opcode = FXOP_GRAPH_DESTROY, .a = {gid}};
        rc = fx_push_locked(d, &e);
    } else {
        rc = fx_err(ACL_ERROR_INVALID_PARAM, "aclmdlRIDestroy: model %p was already destroyed", modelRI);
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

/* ------------------------------------------------------------------ stream attributes */
/* NPUGraph sets ACL_STREAM_ATTR_CACHE_OP_INFO on the captured stream (CANN >= 8.5); the other
 * attributes tune a real chip. All are validated, remembered per stream and read back. */
#define ATTR_MAX 5
struct sattr { int dev; uint32_t sid; uint32_t attr; uint32_t v[4]; };
static struct sattr *attrs;
static size_t nattrs, capattrs;
static pthread_mutex_t a_lock = PTHREAD_MUTEX_INITIALIZER;   /* also declared above */

static aclError attr_check(aclrtStream stream, uint32_t attr, const void *value, const char *what,
                           struct fx_dev **d, uint32_t *sid) {
    if (!value) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: value is NULL", what);
    if (attr < 1 || attr > ATTR_MAX) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: unknown attribute %u", what, attr);
    return fx_stream_dev_pub(stream, d, sid);
}

FX_API aclError aclrtSetStreamAttribute(aclrtStream stream, int stmAttrType, void *value) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if ((rc = attr_check(stream, (uint32_t)stmAttrType, value, "aclrtSetStreamAttribute", &d, &sid))) return rc;
    pthread_mutex_lock(&a_lock);
    size_t i = 0;
    while (i < nattrs && !(attrs[i].dev == d->index && attrs[i].sid == sid && attrs[i].attr == (uint32_t)stmAttrType)) i++;
    if (i == nattrs) {
        if (nattrs == capattrs) {
            size_t cap = capattrs ? capattrs * 2 : 16;
            struct sattr *a = realloc(attrs, cap * sizeof *a);
            if (!a) { pthread_mutex_unlock(&a_lock); return fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory"); }
            attrs = a;
            capattrs = cap;
        }
        attrs[nattrs++] = (struct sattr){.dev = d->index, .sid = sid, .attr = (uint32_t)stmAttrType};
    }
    memcpy(attrs[i].v, value, sizeof attrs[i].v);
    pthread_mutex_unlock(&a_lock);
    return ACL_SUCCESS;
}

FX_API aclError aclrtGetStreamAttribute(aclrtStream stream, int stmAttrType, void *value) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if ((rc = attr_check(stream, (uint32_t)stmAttrType, value, "aclrtGetStreamAttribute", &d, &sid))) return rc;
    memset(value, 0, 16);
    pthread_mutex_lock(&a_lock);
    for (size_t i = 0; i < nattrs; i++)
        if (attrs[i].dev == d->index && attrs[i].sid == sid && attrs[i].attr == (uint32_t)stmAttrType)
            memcpy(value, attrs[i].v, sizeof attrs[i].v);
    pthread_mutex_unlock(&a_lock);
    return ACL_SUCCESS;
}
