/* FlexNPU native front end: streams and events.
 *
 * aclrtStream/aclrtEvent values are tagged integers (device, id), checked against the live set
 * of their device on every use: an unknown or destroyed stream gets ACL_ERROR_INVALID_PARAM, never
 * a dereference. NULL is the default stream (id 0) of the calling thread's device. The daemon
 * keeps the stream order and the events; creation, destruction, records and waits are
 * asynchronous (one ring push), synchronisations and queries are one round trip.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "fx_native.h"

/* ------------------------------------------------------------------ id sets */
static uint32_t hash32(uint32_t x) { x *= 0x9E3779B1u; return x ^ (x >> 15); }
#define TOMB 0xFFFFFFFFu

static int grow(struct fx_idset *s) {
    uint32_t cap = s->cap ? s->cap * 2 : 64;
    if (s->cap && (s->n + 1) * 4 < s->cap) cap = s->cap;   /* only tombstones: rehash in place */
    uint32_t *slot = calloc(cap, sizeof *slot);
    if (!slot) return -1;
    for (uint32_t i = 0; i < s->cap; i++) {
        uint32_t id = s->slot[i];
        if (!id || id == TOMB) continue;
        uint32_t j = hash32(id) & (cap - 1);
        while (slot[j]) j = (j + 1) & (cap - 1);
        slot[j] = id;
    }
    free(s->slot);
    s->slot = slot;
    s->cap = cap;
    s->tomb = 0;
    return 0;
}

int fx_idset_add(struct fx_idset *s, uint32_t id) {
    if ((s->n + s->tomb + 1) * 4 >= s->cap * 3 && grow(s)) return -1;
    uint32_t j = hash32(id) & (s->cap - 1);
    while (s->slot[j] && s->slot[j] != TOMB) {
        if (s->slot[j] == id) return 0;
        j = (j + 1) & (s->cap - 1);
    }
    if (s->slot[j] == TOMB) s->tomb--;
    s->slot[j] = id;
    s->n++;
    return 0;
}

int fx_idset_has(const struct fx_idset *s, uint32_t id) {
    if (!s->cap || !id || id == TOMB) return 0;
    uint32_t j = hash32(id) & (s->cap - 1);
    while (s->slot[j]) {
        if (s->slot[j] == id) return 1;
        j = (j + 1) & (s->cap - 1);
    }
    return 0;
}

int fx_idset_del(struct fx_idset *s, uint32_t id) {
    if (!s->cap || !id || id == TOMB) return 0;
    uint32_t j = hash32(id) & (s->cap - 1);
    while (s->slot[j]) {
        if (s->slot[j] == id) {
            s->slot[j] = TOMB;
            s->n--;
            s->tomb++;
            return 1;
        }
        j = (j + 1) & (s->cap - 1);
    }
    return 0;
}

void fx_idset_clear(struct fx_idset *s) {
    free(s->slot);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------ handles */
static int decode(void *h, uint64_t tag, int *dev, uint32_t *id) {
    uint64_t v = (uint64_t)(uintptr_t)h;
    if ((v >> 60) != tag) return -1;
    *dev = (int)((v >> 32) & 0xFFFFFFF);
    *id = (uint32_t)v;
    return *dev < fx_ndev ? 0 : -1;
}

/* Resolves a stream of the calling thread's device d. Caller does not hold d->lock. */
aclError fx_stream_id(struct fx_dev *d, aclrtStream s, uint32_t *sid) {
    if (!s) { *sid = 0; return ACL_SUCCESS; }
    int dev;
    uint32_t id;
    if (decode(s, FX_TAG_STREAM, &dev, &id))
        return fx_err(ACL_ERROR_INVALID_PARAM, "%p is not a stream", s);
    if (dev != d->index)
        return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "stream %p belongs to device %d, not the current device %d",
                      s, dev, d->index);
    pthread_mutex_lock(&d->lock);
    int ok = fx_idset_has(&d->streams, id);
    pthread_mutex_unlock(&d->lock);
    if (!ok) return fx_err(ACL_ERROR_INVALID_PARAM, "unknown stream %p (destroyed, or never created)", s);
    *sid = id;
    return ACL_SUCCESS;
}

/* A stream handle names its device: calls on it work from any thread (torch_npu's task queue). */
static struct fx_dev *stream_dev(aclrtStream s, uint32_t *sid, aclError *rc) {
    if (!s) {
        struct fx_dev *d = fx_cur(rc);
        *sid = 0;
        return d;
    }
    int dev;
    uint32_t id;
    if (decode(s, FX_TAG_STREAM, &dev, &id)) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%p is not a stream", s);
        return NULL;
    }
    struct fx_dev *d = fx_dev_get(dev, rc);
    if (!d) return NULL;
    *rc = fx_stream_id(d, s, sid);
    return *rc ? NULL : d;
}

static struct fx_dev *event_dev(aclrtEvent e, uint32_t *eid, aclError *rc) {
    int dev;
    uint32_t id;
    if (!e || decode(e, FX_TAG_EVENT, &dev, &id)) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "%p is not an event", e);
        return NULL;
    }
    struct fx_dev *d = fx_dev_get(dev, rc);
    if (!d) return NULL;
    pthread_mutex_lock(&d->lock);
    int ok = fx_idset_has(&d->events, id);
    pthread_mutex_unlock(&d->lock);
    if (!ok) {
        *rc = fx_err(ACL_ERROR_INVALID_PARAM, "unknown event %p (destroyed, or never created)", e);
        return NULL;
    }
    *eid = id;
    return d;
}

/* ------------------------------------------------------------------ streams */
static aclError create_stream(aclrtStream *stream, int64_t priority) {
    aclError rc;
    if (!stream) return fx_err(ACL_ERROR_INVALID_PARAM, "stream is NULL");
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    uint32_t sid = d->next_stream++;
    struct fx_sqe e = {.opcode = FXOP_STREAM_CREATE, .a = {sid, (uint64_t)priority}};
    rc = fx_push_locked(d, &e);
    if (!rc && fx_idset_add(&d->streams, sid)) rc = fx_err(ACL_ERROR_RT_NO_STREAM_RESOURCE, "out of host memory");
    pthread_mutex_unlock(&d->lock);
    if (!rc) *stream = FX_HANDLE(FX_TAG_STREAM, d->index, sid);
    return rc;
}

FX_API aclError aclrtCreateStream(aclrtStream *stream) { return create_stream(stream, 0); }

FX_API aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag) {
    (void)flag;
    /* AscendCL: 0 is the highest priority; the daemon's scheduler takes larger = more urgent */
    return create_stream(stream, -(int64_t)(priority > 7 ? 7 : priority));
}

static aclError destroy_stream(aclrtStream stream) {
    aclError rc;
    uint32_t sid;
    if (!stream) return fx_err(ACL_ERROR_INVALID_PARAM, "the default stream cannot be destroyed");
    struct fx_dev *d = stream_dev(stream, &sid, &rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    if (!fx_idset_del(&d->streams, sid)) {
        pthread_mutex_unlock(&d->lock);
        return fx_err(ACL_ERROR_INVALID_PARAM, "stream %p was already destroyed", stream);
    }
    struct fx_sqe e = {.opcode = FXOP_STREAM_DESTROY, .stream = sid};
    rc = fx_push_locked(d, &e);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

FX_API aclError aclrtDestroyStream(aclrtStream stream) { return destroy_stream(stream); }
FX_API aclError aclrtDestroyStreamForce(aclrtStream stream) { return destroy_stream(stream); }

FX_API aclError aclrtSynchronizeStream(aclrtStream stream) {
    aclError rc;
    uint32_t sid;
    struct fx_dev *d = stream_dev(stream, &sid, &rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_STREAM_SYNC, .stream = sid};
    struct fx_cqe c;
    return fxn_call(d, &e, &c, NULL, 0, "aclrtSynchronizeStream");
}

FX_API aclError aclrtSynchronizeStreamWithTimeout(aclrtStream stream, int32_t timeout) {
    (void)timeout;
    return aclrtSynchronizeStream(stream);
}

FX_API aclError aclrtStreamQuery(aclrtStream stream, int *status) {
    aclError rc;
    uint32_t sid;
    if (!status) return fx_err(ACL_ERROR_INVALID_PARAM, "status is NULL");
    struct fx_dev *d = stream_dev(stream, &sid, &rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_STREAM_QUERY, .a = {sid}};
    struct fx_cqe c;
    rc = fxn_call(d, &e, &c, NULL, 0, "aclrtStreamQuery");
    if (!rc) *status = c.value ? 0 /* ACL_STREAM_STATUS_COMPLETE */ : 1 /* NOT_READY */;
    return rc;
}

FX_API aclError aclrtStreamGetId(aclrtStream stream, int32_t *streamId) {
    aclError rc;
    uint32_t sid;
    if (!streamId) return fx_err(ACL_ERROR_INVALID_PARAM, "streamId is NULL");
    struct fx_dev *d = stream_dev(stream, &sid, &rc);
    if (!d) return rc;
    *streamId = (int32_t)sid;
    return ACL_SUCCESS;
}

/* Settings of a stream that have no effect here: validated, accepted. */
FX_API aclError aclrtSetStreamFailureMode(aclrtStream stream, uint64_t mode) {
    aclError rc;
    uint32_t sid;
    (void)mode;
    return stream_dev(stream, &sid, &rc) ? ACL_SUCCESS : rc;
}

FX_API aclError aclrtSetStreamOverflowSwitch(aclrtStream stream, uint32_t flag) {
    aclError rc;
    uint32_t sid;
    (void)flag;
    return stream_dev(stream, &sid, &rc) ? ACL_SUCCESS : rc;
}

FX_API aclError aclrtGetStreamOverflowSwitch(aclrtStream stream, uint32_t *flag) {
    aclError rc;
    uint32_t sid;
    if (!flag) return fx_err(ACL_ERROR_INVALID_PARAM, "flag is NULL");
    if (!stream_dev(stream, &sid, &rc)) return rc;
    *flag = 0;
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ events */
static aclError create_event(aclrtEvent *event, uint32_t flag) {
    aclError rc;
    (void)flag;
    if (!event) return fx_err(ACL_ERROR_INVALID_PARAM, "event is NULL");
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    uint32_t eid = d->next_event++;
    struct fx_sqe e = {.opcode = FXOP_EVENT_CREATE, .a = {eid, flag}};
    rc = fx_push_locked(d, &e);
    if (!rc && fx_idset_add(&d->events, eid)) rc = fx_err(ACL_ERROR_BAD_ALLOC, "out of host memory");
    pthread_mutex_unlock(&d->lock);
    if (!rc) *event = FX_HANDLE(FX_TAG_EVENT, d->index, eid);
    return rc;
}

FX_API aclError aclrtCreateEvent(aclrtEvent *event) { return create_event(event, 0); }
FX_API aclError aclrtCreateEventWithFlag(aclrtEvent *event, uint32_t flag) { return create_event(event, flag); }
FX_API aclError aclrtCreateEventExWithFlag(aclrtEvent *event, uint32_t flag) { return create_event(event, flag); }

FX_API aclError aclrtDestroyEvent(aclrtEvent event) {
    aclError rc;
    uint32_t eid;
    struct fx_dev *d = event_dev(event, &eid, &rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    if (!fx_idset_del(&d->events, eid)) {
        pthread_mutex_unlock(&d->lock);
        return fx_err(ACL_ERROR_INVALID_PARAM, "event %p was already destroyed", event);
    }
    struct fx_sqe e = {.opcode = FXOP_EVENT_DESTROY, .a = {eid}};
    rc = fx_push_locked(d, &e);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

static aclError event_stream_op(aclrtEvent event, aclrtStream stream, int op, const char *what) {
    aclError rc;
    uint32_t eid, sid;
    struct fx_dev *d = event_dev(event, &eid, &rc);
    if (!d) return rc;
    struct fx_dev *ds = stream_dev(stream, &sid, &rc);
    if (!ds) return rc;
    if (ds != d) return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "%s: event and stream are on different devices", what);
    struct fx_sqe e = {.opcode = (uint16_t)op, .stream = sid, .a = {eid}};
    return fxn_push(d, &e);
}

FX_API aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream) {
    return event_stream_op(event, stream, FXOP_EVENT_RECORD, "aclrtRecordEvent");
}

FX_API aclError aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event) {
    return event_stream_op(event, stream, FXOP_STREAM_WAIT_EVENT, "aclrtStreamWaitEvent");
}

FX_API aclError aclrtStreamWaitEventWithTimeout(aclrtStream stream, aclrtEvent event, int32_t timeout) {
    (void)timeout;
    return aclrtStreamWaitEvent(stream, event);
}

FX_API aclError aclrtResetEvent(aclrtEvent event, aclrtStream stream) {
    aclError rc;
    uint32_t eid, sid;
    /* a recorded event stays recorded here; resetting has no observable effect on the daemon */
    if (!event_dev(event, &eid, &rc)) return rc;
    return stream_dev(stream, &sid, &rc) ? ACL_SUCCESS : rc;
}

FX_API aclError aclrtSynchronizeEvent(aclrtEvent event) {
    aclError rc;
    uint32_t eid;
    struct fx_dev *d = event_dev(event, &eid, &rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_EVENT_SYNC, .a = {eid}};
    struct fx_cqe c;
    return fxn_call(d, &e, &c, NULL, 0, "aclrtSynchronizeEvent");
}

FX_API aclError aclrtSynchronizeEventWithTimeout(aclrtEvent event, int32_t timeout) {
    (void)timeout;
    return aclrtSynchronizeEvent(event);
}

static aclError query(aclrtEvent event, int *done) {
    aclError rc;
    uint32_t eid;
    struct fx_dev *d = event_dev(event, &eid, &rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_EVENT_QUERY, .a = {eid}};
    struct fx_cqe c;
    rc = fxn_call(d, &e, &c, NULL, 0, "aclrtQueryEvent");
    if (!rc) *done = c.value != 0;
    return rc;
}

FX_API aclError aclrtQueryEvent(aclrtEvent event, int *status) {
    int done = 0;
    if (!status) return fx_err(ACL_ERROR_INVALID_PARAM, "status is NULL");
    aclError rc = query(event, &done);
    if (!rc) *status = done ? 0 /* ACL_EVENT_STATUS_COMPLETE */ : 1 /* NOT_READY */;
    return rc;
}

FX_API aclError aclrtQueryEventStatus(aclrtEvent event, int *status) {
    int done = 0;
    if (!status) return fx_err(ACL_ERROR_INVALID_PARAM, "status is NULL");
    aclError rc = query(event, &done);
    if (!rc) *status = done ? 1 /* ACL_EVENT_RECORDED_STATUS_COMPLETE */ : 0;
    return rc;
}

FX_API aclError aclrtQueryEventWaitStatus(aclrtEvent event, int *status) {
    int done = 0;
    if (!status) return fx_err(ACL_ERROR_INVALID_PARAM, "status is NULL");
    aclError rc = query(event, &done);
    if (!rc) *status = done ? 0 /* ACL_EVENT_WAIT_STATUS_COMPLETE */ : 1;
    return rc;
}

FX_API aclError aclrtEventElapsedTime(float *ms, aclrtEvent startEvent, aclrtEvent endEvent) {
    aclError rc;
    uint32_t e0, e1;
    if (!ms) return fx_err(ACL_ERROR_INVALID_PARAM, "ms is NULL");
    struct fx_dev *d = event_dev(startEvent, &e0, &rc);
    if (!d) return rc;
    struct fx_dev *d1 = event_dev(endEvent, &e1, &rc);
    if (!d1) return rc;
    if (d1 != d) return fx_err(ACL_ERROR_INVALID_PARAM, "events on different devices");
    struct fx_sqe e = {.opcode = FXOP_EVENT_ELAPSED, .a = {e0, e1}};
    struct fx_cqe c;
    rc = fxn_call(d, &e, &c, NULL, 0, "aclrtEventElapsedTime");
    if (!rc) {
        double v;
        memcpy(&v, &c.value, sizeof v);
        *ms = (float)v;
    }
    return rc;
}

/* for mem.c: the device and stream id of a stream handle (NULL: the thread's default stream) */
aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid) {
    aclError rc = ACL_SUCCESS;
    *d = stream_dev(s, sid, &rc);
    return *d ? ACL_SUCCESS : rc;
}
