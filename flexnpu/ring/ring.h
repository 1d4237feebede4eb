/* FlexNPU shared-memory command ring: C core.
 *
 * One segment (a sealed memfd) per client and device:
 *   [header page][SQ ring][CQ ring][data arena]
 * See docs/ring.md for the byte layout and the memory-ordering argument.
 *
 * Every cross-process index and flag is touched only here, with C11 atomics.
 * Python never reads or writes an index. Each process keeps its OWN index in
 * process-local memory (fx_ring.local) and only ever stores it to shared
 * memory: the peer may scribble on the shared copy and we must not follow it.
 */
#ifndef FLEXNPU_RING_H
#define FLEXNPU_RING_H
#include <stdint.h>
#include <stddef.h>

#define FX_MAGIC 0x475255504E584C46ull /* "FLXNPURG" little endian */
#define FX_LAYOUT_VERSION 1u
#define FX_HEADER_SIZE 4096u
#define FX_LINE 128u
#define FX_RING_CTRL 512u          /* head, tail, cons_sleep, prod_sleep: one 128 B line each */
#define FX_MAX_ENTRIES (1u << 20)
#define FX_MAX_ENTRY_SIZE 4096u

/* Shared header (first page). Only fields read at attach time are plain;
 * pids, heartbeat and closed are accessed atomically. */
struct fx_header {
    uint64_t magic;          /*   0 */
    uint32_t version;        /*   8 */
    uint32_t header_size;    /*  12 */
    uint32_t sq_entries;     /*  16 */
    uint32_t cq_entries;     /*  20 */
    uint32_t sqe_size;       /*  24 */
    uint32_t cqe_size;       /*  28 */
    uint64_t sq_off;         /*  32 */
    uint64_t cq_off;         /*  40 */
    uint64_t arena_off;      /*  48 */
    uint64_t arena_size;     /*  56 */
    uint64_t total_size;     /*  64 */
    int32_t creator_pid;     /*  72 */
    int32_t attacher_pid;    /*  76  atomic */
    uint64_t generation;     /*  80 */
    uint8_t _pad0[128 - 88];
    uint64_t heartbeat;      /* 128  atomic, own line */
    uint8_t _pad1[128 - 8];
    uint32_t closed;         /* 256  atomic, own line; 1 = creator closed, 2 = attacher closed */
    uint8_t _pad2[128 - 4];
};

#endif /* FLEXNPU_RING_H */

/* The declarations below are also fed to cffi's cdef (no preprocessor lines). */
#ifndef FLEXNPU_RING_DECLS
#define FLEXNPU_RING_DECLS
/* CDEF-BEGIN */
typedef struct fx_seg fx_seg;
typedef struct fx_ring fx_ring;
typedef struct fx_doorbell fx_doorbell;

/* size of the caller's buffer for an error message (fx_seg_create, fx_seg_attach) */
#define FX_ERRMSG_LEN 256

/* status codes returned by the wait/validate functions */
#define FX_READY 1
#define FX_TIMEOUT 0
#define FX_EPEERDEAD -1
#define FX_ECLOSED -2
#define FX_ECORRUPT -3
#define FX_EINTR -4
#define FX_EFULL -5
#define FX_EROLE -6

uint32_t fx_layout_version(void);
size_t fx_segment_size(uint32_t sq_entries, uint32_t cq_entries, uint32_t sqe_size,
                       uint32_t cqe_size, uint64_t arena_bytes);
/* creator: returns NULL and sets errmsg (FX_ERRMSG_LEN bytes) on failure */
fx_seg *fx_seg_create(uint32_t sq_entries, uint32_t cq_entries, uint32_t sqe_size,
                      uint32_t cqe_size, uint64_t arena_bytes, char *errmsg);
/* attacher: dups fd; returns NULL and sets errmsg; *corrupt=1 if the header is the problem */
fx_seg *fx_seg_attach(int fd, char *errmsg, int *corrupt);
void fx_seg_close(fx_seg *s);
int fx_seg_fd(fx_seg *s);
size_t fx_seg_size(fx_seg *s);
uint8_t *fx_seg_base(fx_seg *s);
int fx_seg_is_creator(fx_seg *s);
fx_ring *fx_seg_sq(fx_seg *s);
fx_ring *fx_seg_cq(fx_seg *s);
int32_t fx_seg_creator_pid(fx_seg *s);
int32_t fx_seg_attacher_pid(fx_seg *s);
uint64_t fx_seg_generation(fx_seg *s);
uint64_t fx_seg_heartbeat(fx_seg *s);
uint64_t fx_seg_beat(fx_seg *s);
uint64_t fx_seg_arena_off(fx_seg *s);
uint64_t fx_seg_arena_size(fx_seg *s);
uint32_t fx_seg_closed(fx_seg *s);
void fx_seg_close_notify(fx_seg *s);
/* peer liveness: fd (dup'ed) reaching EOF/HUP and/or pid exiting (pidfd). -1 = none.
 * returns 0, or -errno */
int fx_seg_set_peer(fx_seg *s, int fd, int pid);
int fx_seg_peer_alive(fx_seg *s);
void fx_seg_set_spin_ns(fx_seg *s, int64_t ns);
void fx_seg_set_liveness_ns(fx_seg *s, int64_t ns);
int64_t fx_liveness_ns_default(void);

/* arena allocator: metadata is process-local (creator side) */
int64_t fx_arena_alloc(fx_seg *s, uint64_t nbytes, uint64_t align);  /* -1 full, -2 bad args */
int fx_arena_free(fx_seg *s, uint64_t off);                         /* 0 ok, -1 not allocated */
uint64_t fx_arena_free_bytes(fx_seg *s);
uint64_t fx_arena_largest_free(fx_seg *s);
uint32_t fx_arena_nfree_blocks(fx_seg *s);

/* ring */
uint32_t fx_ring_entry_size(fx_ring *r);
uint32_t fx_ring_capacity(fx_ring *r);
int fx_ring_is_producer(fx_ring *r);
/* raw snapshot for error messages: local, cached, shared head, shared tail */
void fx_ring_snapshot(fx_ring *r, uint32_t *out4);
uint64_t fx_ring_wakes(fx_ring *r);   /* futex wakes issued by this side (statistic) */
int64_t fx_ring_pending(fx_ring *r);                 /* best effort; -3 if corrupt */
int fx_push(fx_ring *r, const char *rec, uint32_t len);   /* 1 pushed, 0 full, -3 corrupt */
int64_t fx_push_batch(fx_ring *r, const char *buf, uint32_t n); /* count pushed, or -3 */
int fx_push_wait(fx_ring *r, const char *rec, uint32_t len, double timeout);
int fx_pop(fx_ring *r, char *out);                /* 1 popped, 0 empty, -3 corrupt */
int64_t fx_pop_batch(fx_ring *r, char *out, uint32_t max_n);
int fx_wait(fx_ring *r, double timeout);             /* consumer: until non-empty */
int fx_wait_space(fx_ring *r, double timeout);       /* producer: until not full */
/* push rec on sq, wait for one cq record, pop it into out. */
int fx_call(fx_ring *sq, fx_ring *cq, const char *rec, uint32_t len, char *out,
            double timeout);
/* consumer of many rings; rings[i] must all be consumers. force_fallback for tests. */
fx_doorbell *fx_doorbell_new(void);
void fx_doorbell_free(fx_doorbell *d);
void fx_doorbell_ring(fx_doorbell *d);
/* watch another process's futex word (a collective segment's bell, its sleepers count): wait_any
 * returns when it changes. 0 ok (or already watched), -1 the list is full. */
int fx_doorbell_watch(fx_doorbell *d, uintptr_t bell, uintptr_t sleepers);
void fx_doorbell_unwatch(fx_doorbell *d, uintptr_t bell);
uint32_t fx_doorbell_nwatch(fx_doorbell *d);
int fx_wait_any(fx_ring **rings, uint32_t n, double timeout, fx_doorbell *d, int force_fallback);
int fx_have_futex_waitv(void);
/* consumers only: indices (into out, n entries) of rings with records, corrupt or closed */
uint32_t fx_ready_list(fx_ring **rings, uint32_t n, uint32_t *out);
/* pyfast.c: install FastRing and call() into the dict at this address (id(dict)) */
int fx_py_install(uintptr_t dict_addr);
/* coll.c: atomics on a collective communicator's shared segment (addresses inside the
 * caller's mapping). fx_coll_wait: 1 when every u64 at base+offs[i] >= target, 0 on timeout,
 * FX_COLL_ABORTED when the u64 at abort_addr is non-zero. */
#define FX_COLL_ABORTED -7
uint64_t fx_shm_load(uintptr_t addr);
void fx_shm_store(uintptr_t addr, uint64_t v);
uint64_t fx_shm_fetch_add(uintptr_t addr, uint64_t v);
int fx_shm_cas(uintptr_t addr, uint64_t expected, uint64_t desired);
void fx_coll_post(uintptr_t addr, uint64_t v, uintptr_t bell, uintptr_t sleepers);
int fx_coll_wait(uintptr_t base, const uint32_t *offs, uint32_t n, uint64_t target, uintptr_t abort_addr,
                 uintptr_t bell, uintptr_t sleepers, double timeout, int64_t spin_ns);
/* CDEF-END */
#endif
