/* FlexNPU native front end: device memory, host memory, copies, memset, IPC.
 *
 * Device addresses come from one large PROT_NONE reservation (MAP_NORESERVE: no memory behind
 * it), so the program can do pointer arithmetic on them as on hardware while a CPU access
 * faults as it would there. Each allocation is an entry (base, size, daemon handle) in a table
 * sorted by base; every copy/memset translates its address to (handle, offset) by binary search
 * (O(log n), under a reader lock) and refuses ranges that cross the allocation's end.
 *
 * Host memory from aclrtMallocHost lives in the shared arena, so copies between it and the
 * device are zero-copy (the daemon reads or writes it when the copy executes, in stream order).
 * Copies from ordinary (pageable) host memory are staged through the arena.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "fx_native.h"

struct fx_alloc {
    uint64_t base, size, span, handle, key;
    int dev, imported;
};

static pthread_rwlock_t t_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct fx_alloc *tab;
static size_t ntab, captab;
static uint8_t *va_base;
static uint64_t va_size, va_next;

#define VA_ALIGN 512u

static aclError reserve_va(void) {
    /* caller holds t_lock for writing */
    if (va_base) return ACL_SUCCESS;
    for (uint64_t sz = 1ull << 40; sz >= (1ull << 32); sz >>= 1) {
        void *p = mmap(NULL, sz, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p != MAP_FAILED) {
            va_size = sz;
            va_next = 1u << 21;
            __atomic_store_n(&va_base, (uint8_t *)p, __ATOMIC_RELEASE);   /* classify() reads it unlocked */    /* never hand out the very first bytes: 0-offset bugs stay visible */
            return ACL_SUCCESS;
        }
    }
    return fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "cannot reserve a device address range");
}

static size_t lower_bound(uint64_t addr) {   /* first i with tab[i].base > addr */
    size_t lo = 0, hi = ntab;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (tab[mid].base <= addr) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Finds address space for span bytes; caller holds t_lock for writing. 0 if none. */
static uint64_t place(uint64_t span) {
    if (va_next + span <= va_size) {
        uint64_t a = (uint64_t)(uintptr_t)va_base + va_next;
        va_next += span;
        return a;
    }
    uint64_t prev = (uint64_t)(uintptr_t)va_base + (1u << 21);
    for (size_t i = 0; i <= ntab; i++) {   /* the bump pointer ran out: first fit among the gaps */
        uint64_t next = i < ntab ? tab[i].base : (uint64_t)(uintptr_t)va_base + va_size;
        if (next >= prev + span) return prev;
        if (i < ntab) prev = tab[i].base + tab[i].span;
    }
    return 0;
}

static int insert(struct fx_alloc a) {
    if (ntab == captab) {
        size_t cap = captab ? captab * 2 : 1024;
        struct fx_alloc *t = realloc(tab, cap * sizeof *t);
        if (!t) return -1;
        tab = t;
        captab = cap;
    }
    size_t i = lower_bound(a.base);
    memmove(tab + i + 1, tab + i, (ntab - i) * sizeof *tab);
    tab[i] = a;
    ntab++;
    return 0;
}

void fx_mem_forget_device(int dev) {
    pthread_rwlock_wrlock(&t_lock);
    size_t j = 0;
    for (size_t i = 0; i < ntab; i++)
        if (tab[i].dev != dev) tab[j++] = tab[i];
    ntab = j;
    pthread_rwlock_unlock(&t_lock);
}

void fx_mem_after_fork(void) {
    pthread_rwlock_init(&t_lock, NULL);   /* the parent's threads may have held it */
    ntab = 0;                              /* the reservation stays: addresses are never reused across it */
}

/* ------------------------------------------------------------------ pointer classification */
enum { P_HOST, P_ARENA, P_DEV, P_BADDEV };

struct ptr {
    int kind;
    struct fx_dev *d;
    uint64_t handle, off, avail;    /* P_DEV: offset in the allocation, bytes to its end */
    uint64_t arena_off, arena_avail;
};

static void classify(const void *p, struct ptr *o) {
    uint64_t a = (uint64_t)(uintptr_t)p;
    memset(o, 0, sizeof *o);
    uint8_t *vb = __atomic_load_n(&va_base, __ATOMIC_ACQUIRE);
    if (vb && a >= (uint64_t)(uintptr_t)vb && a < (uint64_t)(uintptr_t)vb + va_size) {
        o->kind = P_BADDEV;
        pthread_rwlock_rdlock(&t_lock);
        size_t i = lower_bound(a);
        if (i > 0 && a < tab[i - 1].base + tab[i - 1].size) {
            struct fx_alloc *e = &tab[i - 1];
            o->kind = P_DEV;
            o->d = &fx_devs[e->dev];
            o->handle = e->handle;
            o->off = a - e->base;
            o->avail = e->size - o->off;
        }
        pthread_rwlock_unlock(&t_lock);
        return;
    }
    for (int i = 0; i < fx_ndev; i++) {
        struct fx_dev *d = &fx_devs[i];
        if (atomic_load(&d->state) != 1) continue;   /* acquire: arena is set before state */
        uint8_t *base = d->arena;
        if (base && (const uint8_t *)p >= base && (const uint8_t *)p < base + d->arena_size) {
            o->kind = P_ARENA;
            o->d = d;
            o->arena_off = (uint64_t)((const uint8_t *)p - base);
            o->arena_avail = d->arena_size - o->arena_off;
            return;
        }
    }
    o->kind = P_HOST;
}

static aclError dev_range(const struct ptr *p, const void *addr, size_t n, const char *what) {
    if (p->kind == P_BADDEV)
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: device address %p is not inside any live allocation "
                      "(freed, or never allocated)", what, addr);
    if (n > p->avail)
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: %zu bytes at %p cross the end of their allocation "
                      "(%llu bytes left in it)", what, n, addr, (unsigned long long)p->avail);
    if (atomic_load(&p->d->state) != 1)
        return fx_err(ACL_ERROR_RT_CONTEXT_NULL, "%s: the device of %p was reset", what, addr);
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ device memory */
static aclError dev_malloc(void **devPtr, size_t size, const char *what) {
    aclError rc;
    if (!devPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: devPtr is NULL", what);
    if (size == 0) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: size is 0", what);
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    uint64_t span = ((uint64_t)size + VA_ALIGN - 1) & ~(uint64_t)(VA_ALIGN - 1);
    pthread_rwlock_wrlock(&t_lock);
    rc = reserve_va();
    uint64_t base = rc ? 0 : place(span);
    /* hold the range with a zero-size placeholder until the daemon answers */
    if (!rc && (!base || insert((struct fx_alloc){base, 0, span, 0, 0, d->index, 0})))
        rc = fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: device address space exhausted", what);
    pthread_rwlock_unlock(&t_lock);
    if (rc) return rc;
    pthread_mutex_lock(&d->lock);
    uint64_t h = d->next_handle++;
    struct fx_sqe e = {.opcode = FXOP_MALLOC, .a = {h, size}};
    struct fx_cqe c;
    rc = fx_call_locked(d, &e, &c, NULL, 0, what);
    pthread_mutex_unlock(&d->lock);
    pthread_rwlock_wrlock(&t_lock);
    size_t i = lower_bound(base);
    if (i > 0 && tab[i - 1].base == base) {
        if (rc) {
            memmove(tab + i - 1, tab + i, (ntab - i) * sizeof *tab);
            ntab--;
        } else {
            tab[i - 1].size = size;
            tab[i - 1].handle = h;
        }
    }
    pthread_rwlock_unlock(&t_lock);
    if (!rc) *devPtr = (void *)(uintptr_t)base;
    return rc;
}

FX_API aclError aclrtMalloc(void **devPtr, size_t size, int policy) {
    (void)policy;
    return dev_malloc(devPtr, size, "aclrtMalloc");
}

FX_API aclError aclrtMallocAlign32(void **devPtr, size_t size, int policy) {
    (void)policy;
    return dev_malloc(devPtr, size, "aclrtMallocAlign32");
}

FX_API aclError aclrtMallocCached(void **devPtr, size_t size, int policy) {
    (void)policy;
    return dev_malloc(devPtr, size, "aclrtMallocCached");
}

FX_API aclError aclrtMallocWithCfg(void **devPtr, size_t size, int policy, void *cfg) {
    (void)policy;
    (void)cfg;
    return dev_malloc(devPtr, size, "aclrtMallocWithCfg");
}

FX_API aclError aclrtFree(void *devPtr) {
    if (!devPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtFree: devPtr is NULL");
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "aclrtFree before aclInit");
    uint64_t a = (uint64_t)(uintptr_t)devPtr;
    pthread_rwlock_wrlock(&t_lock);
    size_t i = va_base ? lower_bound(a) : 0;
    if (i == 0 || tab[i - 1].base != a || tab[i - 1].size == 0) {
        pthread_rwlock_unlock(&t_lock);
        return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtFree: %p is not the start of a live device allocation "
                      "(double free?)", devPtr);
    }
    struct fx_alloc e = tab[i - 1];
    memmove(tab + i - 1, tab + i, (ntab - i) * sizeof *tab);
    ntab--;
    pthread_rwlock_unlock(&t_lock);
    struct fx_dev *d = &fx_devs[e.dev];
    if (atomic_load(&d->state) != 1) return ACL_SUCCESS;   /* reset or lost: the daemon reclaimed it */
    struct fx_sqe s = {.opcode = FXOP_FREE, .a = {e.handle}};
    return fxn_push(d, &s);
}

FX_API aclError aclrtFreeWithDevSync(void *devPtr) { return aclrtFree(devPtr); }

FX_API aclError aclrtGetMemInfo(int attr, size_t *freeBytes, size_t *totalBytes) {
    aclError rc;
    (void)attr;
    if (!freeBytes || !totalBytes) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetMemInfo: NULL output");
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    char json[1024];
    struct fx_sqe e = {.opcode = FXOP_MEM_STATS};
    struct fx_cqe c;
    rc = fxn_call(d, &e, &c, json, sizeof json, "aclrtGetMemInfo");
    if (rc) return rc;
    int64_t used = 0, limit = -1, total = -1;
    fx_json_int(json, "allocated", &used);
    fx_json_int(json, "limit", &limit);
    fx_json_int(json, "total", &total);
    int64_t t = limit > 0 ? limit : total > 0 ? total : 0;
    *totalBytes = (size_t)t;
    *freeBytes = (size_t)(t > used ? t - used : 0);
    return ACL_SUCCESS;
}

FX_API aclError aclrtPointerGetAttributes(const void *ptr, void *attributes) {
    struct { uint32_t id; int type; uint32_t pageSize; uint32_t rsv[4]; } *at = attributes;
    if (!ptr || !at) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtPointerGetAttributes: NULL argument");
    struct ptr p;
    classify(ptr, &p);
    memset(at, 0, sizeof *at);
    if (p.kind == P_DEV) { at->id = (uint32_t)p.d->index; at->type = 1; at->pageSize = 2u << 20; }
    else if (p.kind == P_ARENA) { at->id = 0; at->type = 0; at->pageSize = 4096; }
    else if (p.kind == P_HOST) { at->type = 2; at->pageSize = 4096; }
    else return fx_err(ACL_ERROR_INVALID_PARAM, "%p is not inside a live allocation", ptr);
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ host memory (arena) */
FX_API aclError aclrtMallocHost(void **hostPtr, size_t size) {
    aclError rc;
    if (!hostPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: hostPtr is NULL");
    if (size == 0) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: size is 0");
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    pthread_mutex_lock(&d->lock);
    fx_reclaim_locked(d);
    int64_t off = fx_arena_alloc(d->seg, size, 64);
    pthread_mutex_unlock(&d->lock);
    if (off < 0)
        return fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocHost: %zu bytes do not fit in the shared host "
                      "arena (%llu bytes; set FLEXNPU_NATIVE_ARENA to enlarge it)", size,
                      (unsigned long long)d->arena_size);
    *hostPtr = d->arena + off;
    return ACL_SUCCESS;
}

FX_API aclError aclrtMallocHostWithCfg(void **ptr, uint64_t size, void *cfg) {
    (void)cfg;
    return aclrtMallocHost(ptr, (size_t)size);
}

FX_API aclError aclrtFreeHost(void *hostPtr) {
    if (!hostPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost: hostPtr is NULL");
    struct ptr p;
    classify(hostPtr, &p);
    if (p.kind != P_ARENA) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost: %p was not allocated by aclrtMallocHost", hostPtr);
    pthread_mutex_lock(&p.d->lock);
    int r = atomic_load(&p.d->state) == 1 ? fx_arena_free(p.d->seg, p.arena_off) : 0;
    pthread_mutex_unlock(&p.d->lock);
    if (r) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtFreeHost: %p is not a live host allocation (double free?)", hostPtr);
    return ACL_SUCCESS;
}

FX_API aclError aclrtFreeHostWithDevSync(void *hostPtr) { return aclrtFreeHost(hostPtr); }

/* ------------------------------------------------------------------ copies */
static uint64_t chunk_of(struct fx_dev *d) {
    uint64_t c = d->arena_size / 4;
    return c > (8u << 20) ? (8u << 20) : c < 4096 ? 4096 : c;
}

/* an arena buffer for a synchronous bounce copy; caller holds d->lock */
static int64_t bounce(struct fx_dev *d, uint64_t n) {
    fx_reclaim_locked(d);
    int64_t off = fx_arena_alloc(d->seg, n, 64);
    if (off < 0) {
        struct fx_sqe e = {.opcode = FXOP_NOP};
        struct fx_cqe c;
        if (fx_call_locked(d, &e, &c, NULL, 0, "staging barrier")) return -2;
        off = fx_arena_alloc(d->seg, n, 64);
    }
    return off;
}

static aclError h2d_pageable(struct fx_dev *d, uint64_t h, uint64_t doff, const uint8_t *src, uint64_t n,
                             uint32_t sid, int async, const char *what) {
    aclError rc = ACL_SUCCESS;
    uint64_t stage_max = d->arena_size / 16 < (4u << 20) ? d->arena_size / 16 : (4u << 20);
    if (async && n <= stage_max) {
        pthread_mutex_lock(&d->lock);
        int64_t off = fx_stage_locked(d, src, n);
        if (off >= 0) {
            struct fx_sqe e = {.opcode = FXOP_MEMCPY_H2D, .stream = sid, .payload_off = (uint32_t)off,
                               .payload_len = (uint32_t)n, .a = {h, doff, n}};
            rc = fx_push_locked(d, &e);
        }
        pthread_mutex_unlock(&d->lock);
        if (off >= 0) return rc;
    }
    /* large (or no staging space): synchronous bounce copies, in the stream's order */
    uint64_t chunk = chunk_of(d);
    for (uint64_t pos = 0; pos < n && !rc; pos += chunk) {
        uint64_t m = n - pos < chunk ? n - pos : chunk;
        pthread_mutex_lock(&d->lock);
        int64_t off = bounce(d, m);
        if (off < 0) rc = off == -2 ? ACL_ERROR_RT_LOST_HEARTBEAT : fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: no arena space", what);
        else {
            memcpy(d->arena + off, src + pos, m);
            struct fx_sqe e = {.opcode = FXOP_MEMCPY_H2D, .flags = FXP_FLAG_DEFERRED, .stream = sid,
                               .payload_off = (uint32_t)off, .payload_len = (uint32_t)m, .a = {h, doff + pos, m}};
            struct fx_cqe c;
            rc = fx_call_locked(d, &e, &c, NULL, 0, what);
            fx_arena_free(d->seg, (uint64_t)off);
        }
        pthread_mutex_unlock(&d->lock);
    }
    return rc;
}

static aclError d2h_pageable(struct fx_dev *d, uint8_t *dst, uint64_t h, uint64_t soff, uint64_t n, uint32_t sid,
                             const char *what) {
    aclError rc = ACL_SUCCESS;
    uint64_t chunk = chunk_of(d);
    for (uint64_t pos = 0; pos < n && !rc; pos += chunk) {
        uint64_t m = n - pos < chunk ? n - pos : chunk;
        pthread_mutex_lock(&d->lock);
        int64_t off = bounce(d, m);
        if (off < 0) rc = off == -2 ? ACL_ERROR_RT_LOST_HEARTBEAT : fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "%s: no arena space", what);
        else {
            struct fx_sqe e = {.opcode = FXOP_MEMCPY_D2H, .flags = FXP_FLAG_DEFERRED, .stream = sid,
                               .payload_off = (uint32_t)off, .payload_len = (uint32_t)m, .a = {h, soff + pos, m}};
            struct fx_cqe c;
            rc = fx_call_locked(d, &e, &c, NULL, 0, what);
            if (!rc) memcpy(dst + pos, d->arena + off, m);
            fx_arena_free(d->seg, (uint64_t)off);
        }
        pthread_mutex_unlock(&d->lock);
    }
    return rc;
}

static aclError submit(struct fx_dev *d, struct fx_sqe *e, int async, const char *what) {
    if (async) return fxn_push(d, e);
    struct fx_cqe c;
    return fxn_call(d, e, &c, NULL, 0, what);
}

/* A zero-copy copy between the arena and the device, in pieces of at most FXP_MAX_PAYLOAD bytes
 * (the daemon's bound on one request); all pieces on the same stream, only the last one waited
 * for when the copy is synchronous. */
static aclError arena_copy(struct fx_dev *d, int op, uint64_t h, uint64_t doff, uint64_t aoff, uint64_t n,
                           uint32_t sid, int async, const char *what) {
    for (uint64_t pos = 0; pos < n; pos += FXP_MAX_PAYLOAD) {
        uint64_t m = n - pos < FXP_MAX_PAYLOAD ? n - pos : FXP_MAX_PAYLOAD;
        struct fx_sqe e = {.opcode = (uint16_t)op, .flags = FXP_FLAG_DEFERRED, .stream = sid,
                           .payload_off = (uint32_t)(aoff + pos), .payload_len = (uint32_t)m, .a = {h, doff + pos, m}};
        aclError rc = submit(d, &e, async || pos + m < n, what);
        if (rc) return rc;
    }
    return ACL_SUCCESS;
}

static aclError do_memcpy(void *dst, size_t destMax, const void *src, size_t count, int kind,
                          aclrtStream stream, int async, const char *what) {
    aclError rc;
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "%s before aclInit", what);
    if (!dst || !src) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: %s is NULL", what, dst ? "src" : "dst");
    if (count > destMax) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: count %zu exceeds destMax %zu", what, count, destMax);
    if (kind == 5) kind = FX_MEMCPY_H2D;            /* HOST_TO_BUF_TO_DEVICE */
    if (kind == 6 || kind == 7) kind = FX_MEMCPY_D2D;
    if (kind < 0 || kind > FX_MEMCPY_DEFAULT) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: unknown copy kind %d", what, kind);
    struct ptr ps, pd;
    classify(src, &ps);
    classify(dst, &pd);
    int sdev = ps.kind == P_DEV || ps.kind == P_BADDEV, ddev = pd.kind == P_DEV || pd.kind == P_BADDEV;
    if (kind != FX_MEMCPY_DEFAULT) {
        int want_s = kind == FX_MEMCPY_D2H || kind == FX_MEMCPY_D2D, want_d = kind == FX_MEMCPY_H2D || kind == FX_MEMCPY_D2D;
        if (want_s != sdev || want_d != ddev)
            return fx_err(ACL_ERROR_INVALID_PARAM, "%s: kind %d does not match the pointers (src %p is %s, dst %p is %s)",
                          what, kind, src, sdev ? "device memory" : "host memory", dst, ddev ? "device memory" : "host memory");
    }
    /* the device and stream the copy runs on */
    struct fx_dev *d;
    uint32_t sid = 0;
    if (stream) {
        extern aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid);
        if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    } else if (!(d = fx_cur(&rc))) {
        if (sdev || ddev) return rc;
        d = NULL;
    }
    if (sdev && (rc = dev_range(&ps, src, count, what))) return rc;
    if (ddev && (rc = dev_range(&pd, dst, count, what))) return rc;
    if (count == 0) return ACL_SUCCESS;
    struct fx_dev *dd = ddev ? pd.d : sdev ? ps.d : d;
    if ((sdev && ddev && ps.d != pd.d) || (d && dd && d != dd))
        return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "%s: the memory and the stream are on different devices", what);
    d = dd;
    if (!sdev && !ddev) {                                   /* host to host */
        if (async && d) { if ((rc = aclrtSynchronizeStream(stream))) return rc; }
        memmove(dst, src, count);
        return ACL_SUCCESS;
    }
    if (sdev && ddev) {
        struct fx_sqe e = {.opcode = FXOP_MEMCPY_D2D, .stream = sid, .a = {pd.handle, pd.off, ps.handle, ps.off, count}};
        return submit(d, &e, async, what);
    }
    if (ddev) {                                             /* host to device */
        if (ps.kind == P_ARENA && ps.d == d) {
            if (count > ps.arena_avail) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: source crosses the end of the host arena", what);
            return arena_copy(d, FXOP_MEMCPY_H2D, pd.handle, pd.off, ps.arena_off, count, sid, async, what);
        }
        return h2d_pageable(d, pd.handle, pd.off, src, count, sid, async, what);
    }
    if (pd.kind == P_ARENA && pd.d == d) {                   /* device to pinned host */
        if (count > pd.arena_avail) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: destination crosses the end of the host arena", what);
        return arena_copy(d, FXOP_MEMCPY_D2H, ps.handle, ps.off, pd.arena_off, count, sid, async, what);
    }
    /* device to pageable host: completes before returning (also when asynchronous) */
    return d2h_pageable(d, dst, ps.handle, ps.off, count, sid, what);
}

FX_API aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, int kind) {
    return do_memcpy(dst, destMax, src, count, kind, NULL, 0, "aclrtMemcpy");
}

FX_API aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count, int kind,
                                 aclrtStream stream) {
    return do_memcpy(dst, destMax, src, count, kind, stream, 1, "aclrtMemcpyAsync");
}

static aclError do_memset(void *devPtr, size_t maxCount, int32_t value, size_t count, aclrtStream stream,
                          int async, const char *what) {
    aclError rc;
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "%s before aclInit", what);
    if (!devPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: devPtr is NULL", what);
    if (count > maxCount) return fx_err(ACL_ERROR_INVALID_PARAM, "%s: count %zu exceeds maxCount %zu", what, count, maxCount);
    struct ptr p;
    classify(devPtr, &p);
    if (p.kind == P_HOST || p.kind == P_ARENA) {
        memset(devPtr, value, count);   /* AscendCL allows host memory here too */
        return ACL_SUCCESS;
    }
    if ((rc = dev_range(&p, devPtr, count, what))) return rc;
    uint32_t sid = 0;
    if (stream) {
        struct fx_dev *d;
        extern aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid);
        if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
        if (d != p.d) return fx_err(ACL_ERROR_RT_STREAM_CONTEXT, "%s: memory and stream on different devices", what);
    }
    if (count == 0) return ACL_SUCCESS;
    struct fx_sqe e = {.opcode = FXOP_MEMSET, .stream = sid, .a = {p.handle, p.off, (uint64_t)(value & 0xFF), count}};
    return submit(p.d, &e, async, what);
}

FX_API aclError aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count) {
    return do_memset(devPtr, maxCount, value, count, NULL, 0, "aclrtMemset");
}

FX_API aclError aclrtMemsetAsync(void *devPtr, size_t maxCount, int32_t value, size_t count, aclrtStream stream) {
    return do_memset(devPtr, maxCount, value, count, stream, 1, "aclrtMemsetAsync");
}

/* ------------------------------------------------------------------ IPC (export/import by key) */
#define KEY_PREFIX "flexnpu-ipc-"

static int parse_key(const char *key, int *phys, uint64_t *k) {
    if (!key || strncmp(key, KEY_PREFIX, strlen(KEY_PREFIX))) return -1;
    unsigned long long kk;
    if (sscanf(key + strlen(KEY_PREFIX), "%d-%llx", phys, &kk) != 2) return -1;
    *k = kk;
    return 0;
}

static struct fx_dev *dev_of_phys(int phys) {
    for (int i = 0; i < fx_ndev; i++)
        if (fx_devs[i].phys == phys && atomic_load(&fx_devs[i].state) == 1) return &fx_devs[i];
    return NULL;
}

FX_API aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len, uint64_t flags) {
    /* ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION (torch_npu's tensor sharing): no pid list,
     * but the daemon still admits only processes of the exporter's uid (and the key is unguessable) */
    if (flags & ~1ull) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: unknown flags %#llx", (unsigned long long)flags);
    if (!devPtr || !key) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: NULL argument");
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "aclrtIpcMemGetExportKey before aclInit");
    struct ptr p;
    classify(devPtr, &p);
    aclError rc = dev_range(&p, devPtr, size, "aclrtIpcMemGetExportKey");
    if (rc) return rc;
    if (p.off) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: %p is not the start of an allocation", devPtr);
    struct fx_sqe e = {.opcode = FXOP_IPC_EXPORT, .a = {p.handle, (flags & 1) ? FXP_IPC_EXPORT_SAME_UID : 0}};
    struct fx_cqe c;
    if ((rc = fxn_call(p.d, &e, &c, NULL, 0, "aclrtIpcMemGetExportKey"))) return rc;
    int n = snprintf(key, len, KEY_PREFIX "%d-%llx", p.d->phys, (unsigned long long)c.value);
    if (n < 0 || (size_t)n >= len) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: key buffer of %zu bytes too small", len);
    return ACL_SUCCESS;
}

FX_API aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num) {
    int phys;
    uint64_t k;
    if (parse_key(key, &phys, &k)) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: malformed key");
    if (!pid || num == 0 || num > 4096) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: bad pid list");
    struct fx_dev *d = dev_of_phys(phys);
    if (!d) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: key of a device this process does not use");
    pthread_mutex_lock(&d->lock);
    uint32_t buf[4096];
    for (size_t i = 0; i < num; i++) buf[i] = (uint32_t)pid[i];
    int64_t off = fx_stage_locked(d, buf, num * 4);
    aclError rc;
    if (off < 0) rc = fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "no arena space");
    else {
        struct fx_sqe e = {.opcode = FXOP_IPC_SET_PIDS, .payload_off = (uint32_t)off, .payload_len = (uint32_t)(num * 4), .a = {k}};
        struct fx_cqe c;
        rc = fx_call_locked(d, &e, &c, NULL, 0, "aclrtIpcMemSetImportPid");
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

FX_API aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags) {
    aclError rc;
    int phys;
    uint64_t k;
    (void)flags;
    if (!devPtr) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: devPtr is NULL");
    if (parse_key(key, &phys, &k)) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: malformed key");
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    if (d->phys != phys) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: the key is of another device");
    pthread_mutex_lock(&d->lock);
    uint64_t h = d->next_handle++;
    struct fx_sqe e = {.opcode = FXOP_IPC_IMPORT, .a = {k, h}};
    struct fx_cqe c;
    rc = fx_call_locked(d, &e, &c, NULL, 0, "aclrtIpcMemImportByKey");
    pthread_mutex_unlock(&d->lock);
    if (rc) return rc;
    uint64_t size = c.value ? c.value : 1;
    uint64_t span = (size + VA_ALIGN - 1) & ~(uint64_t)(VA_ALIGN - 1);
    pthread_rwlock_wrlock(&t_lock);
    rc = reserve_va();
    uint64_t base = rc ? 0 : place(span);
    if (!rc && (!base || insert((struct fx_alloc){base, size, span, h, k, d->index, 1})))
        rc = fx_err(ACL_ERROR_RT_MEMORY_ALLOCATION, "device address space exhausted");
    pthread_rwlock_unlock(&t_lock);
    if (rc) {
        struct fx_sqe f = {.opcode = FXOP_FREE, .a = {h}};
        fxn_push(d, &f);
        return rc;
    }
    *devPtr = (void *)(uintptr_t)base;
    return ACL_SUCCESS;
}

FX_API aclError aclrtIpcMemClose(const char *key) {
    int phys;
    uint64_t k;
    if (parse_key(key, &phys, &k)) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtIpcMemClose: malformed key");
    pthread_rwlock_wrlock(&t_lock);
    struct fx_alloc e = {0};
    for (size_t i = 0; i < ntab; i++) {
        if (tab[i].imported && tab[i].key == k && fx_devs[tab[i].dev].phys == phys) {
            e = tab[i];
            memmove(tab + i, tab + i + 1, (ntab - i - 1) * sizeof *tab);
            ntab--;
            break;
        }
    }
    pthread_rwlock_unlock(&t_lock);
    if (!e.imported) return ACL_SUCCESS;   /* the exporter closing its key: the export lives until aclrtFree */
    struct fx_dev *d = &fx_devs[e.dev];
    if (atomic_load(&d->state) != 1) return ACL_SUCCESS;
    struct fx_sqe s = {.opcode = FXOP_FREE, .a = {e.handle}};
    return fxn_push(d, &s);
}

/* ------------------------------------------------------------------ virtual memory management */
/* torch_npu's expandable segments need physical handles mapped into reserved ranges; the
 * daemon has no such objects yet. A documented error makes torch_npu keep its plain allocator
 * (expandable segments are off unless PYTORCH_NPU_ALLOC_CONF asks for them). */
#define VMM_UNSUPPORTED(name) \
    fx_err(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "%s: virtual memory management is not supported by FlexNPU " \
           "(do not set expandable_segments:True in PYTORCH_NPU_ALLOC_CONF)", name)

FX_API aclError aclrtReserveMemAddress(void **virPtr, size_t size, size_t alignment, void *expectPtr, uint64_t flags) {
    (void)virPtr; (void)size; (void)alignment; (void)expectPtr; (void)flags;
    return VMM_UNSUPPORTED("aclrtReserveMemAddress");
}
FX_API aclError aclrtReleaseMemAddress(void *virPtr) { (void)virPtr; return VMM_UNSUPPORTED("aclrtReleaseMemAddress"); }
FX_API aclError aclrtMallocPhysical(aclrtDrvMemHandle *handle, size_t size, const void *prop, uint64_t flags) {
    (void)handle; (void)size; (void)prop; (void)flags;
    return VMM_UNSUPPORTED("aclrtMallocPhysical");
}
FX_API aclError aclrtFreePhysical(aclrtDrvMemHandle handle) { (void)handle; return VMM_UNSUPPORTED("aclrtFreePhysical"); }
FX_API aclError aclrtMapMem(void *virPtr, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags) {
    (void)virPtr; (void)size; (void)offset; (void)handle; (void)flags;
    return VMM_UNSUPPORTED("aclrtMapMem");
}
FX_API aclError aclrtUnmapMem(void *virPtr) { (void)virPtr; return VMM_UNSUPPORTED("aclrtUnmapMem"); }
FX_API aclError aclrtMemExportToShareableHandle(aclrtDrvMemHandle handle, int handleType, uint64_t flags,
                                                uint64_t *shareableHandle) {
    (void)handle; (void)handleType; (void)flags; (void)shareableHandle;
    return VMM_UNSUPPORTED("aclrtMemExportToShareableHandle");
}
FX_API aclError aclrtMemImportFromShareableHandle(uint64_t shareableHandle, int32_t deviceId, aclrtDrvMemHandle *handle) {
    (void)shareableHandle; (void)deviceId; (void)handle;
    return VMM_UNSUPPORTED("aclrtMemImportFromShareableHandle");
}
FX_API aclError aclrtMemSetPidToShareableHandle(uint64_t shareableHandle, int32_t *pid, size_t pidNum) {
    (void)shareableHandle; (void)pid; (void)pidNum;
    return VMM_UNSUPPORTED("aclrtMemSetPidToShareableHandle");
}

/* ------------------------------------------------------------------ for hccl.c */
/* A device buffer of n bytes at p: its device, allocation handle and offset, or an error if it is
 * not inside one live allocation (HCCL buffers are native device addresses, as on hardware). */
aclError fx_dev_addr(const void *p, uint64_t n, struct fx_dev **d, uint64_t *handle, uint64_t *off, const char *what) {
    struct ptr o;
    classify(p, &o);
    if (o.kind != P_DEV && o.kind != P_BADDEV)
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: %p is not a device address", what, p);
    aclError rc = dev_range(&o, p, n, what);
    if (rc) return rc;
    *d = o.d;
    *handle = o.handle;
    *off = o.off;
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ operator arguments */
/* A device address named by an operator argument -> its device, allocation handle and offset
 * (launch_enc.c turns it into a TensorRef; the daemon checks the view against the allocation). */
aclError fx_mem_lookup(const void *addr, struct fx_dev **d, uint64_t *handle, uint64_t *off, uint64_t *avail,
                       const char *what) {
    struct ptr p;
    classify(addr, &p);
    if (p.kind == P_HOST || p.kind == P_ARENA)
        return fx_err(ACL_ERROR_INVALID_PARAM, "%s: tensor data %p is not device memory", what, addr);
    aclError rc = dev_range(&p, addr, 0, what);
    if (rc) return rc;
    *d = p.d;
    *handle = p.handle;
    *off = p.off;
    *avail = p.avail;
    return ACL_SUCCESS;
}
