/* FlexNPU shared-memory command ring: C core. See ring.h and docs/ring.md. */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef FUTEX2_PRIVATE
#define FUTEX2_PRIVATE 128
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1u
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 2u
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
#endif

#define DEFAULT_SPIN_NS 30000          /* tens of microseconds, then futex sleep */
#define DEFAULT_LIVENESS_NS 50000000   /* 50 ms: see LIVENESS_INTERVAL_S in __init__.py */

typedef _Atomic uint32_t au32;

/* FX_BROKEN_ORDERING exists only so the ThreadSanitizer test can prove it detects a missing
 * release/acquire pair (tests/test_ring_tsan.py builds ringpp with it and expects a report). */
#ifdef FX_BROKEN_ORDERING
#define FX_REL memory_order_relaxed
#define FX_ACQ memory_order_relaxed
#else
#define FX_REL memory_order_release
#define FX_ACQ memory_order_acquire
#endif

struct fx_ring {
    au32 *head;          /* shared, consumer stores, producer loads */
    au32 *tail;          /* shared, producer stores, consumer loads */
    au32 *cons_sleep;    /* futex word: 1 = consumer announced it sleeps */
    au32 *prod_sleep;    /* futex word: 1 = producer announced it sleeps (ring full) */
    uint8_t *slots;
    uint32_t mask, cap, esz;
    uint32_t local;      /* OUR index (tail if producer, head if consumer): private truth */
    uint32_t cached;     /* last value seen of the peer's index */
    int producer;
    fx_seg *seg;
    uint64_t wakes;      /* FUTEX_WAKE calls this side issued (process-local statistic) */
};

struct blk { uint64_t off, len; };

struct fx_seg {
    uint8_t *base;
    size_t size;
    int fd;
    int creator;
    struct fx_header *hdr;
    struct fx_ring sq, cq;
    int peer_fd, peer_pidfd, peer_pid, peer_dead;
    int64_t spin_ns, liveness_ns;
    /* arena allocator (creator side; process-local, never in shared memory) */
    struct blk *fr; uint32_t nfr, capfr;   /* free blocks sorted by offset */
    struct blk *al; uint32_t nal, capal;   /* allocated blocks sorted by offset */
    uint64_t arena_free;
    uint64_t arena_off, arena_size;   /* validated copies */
};

/* The doorbell also watches a few shared futex words ("bells") of other processes: wait_any
 * returns when one of them changed since it was last seen, and sleeps on them with futex_waitv.
 * A bell's poster wakes only if its `sleepers` count is non-zero, which wait_any raises around its
 * sleep (Dekker with the poster's increment of the bell, as coll.c does). The list belongs to the
 * thread that calls wait_any: watch, unwatch and wait_any are never called concurrently. */
#define FX_DOORBELL_WATCHES 8
struct fx_watch { au32 *bell; au32 *sleepers; uint32_t seen; };
struct fx_doorbell { au32 word; uint32_t nwatch; struct fx_watch w[FX_DOORBELL_WATCHES]; };

uint32_t fx_layout_version(void) { return FX_LAYOUT_VERSION; }
int64_t fx_liveness_ns_default(void) { return DEFAULT_LIVENESS_NS; }

/* ---------------------------------------------------------------- utils */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }
static inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

/* Shared (not private) futex ops: the words live in a MAP_SHARED memfd mapping
 * used by two processes, so FUTEX_PRIVATE_FLAG would key the wait on our mm only. */
static int futex_wait_shared(au32 *w, uint32_t val, int64_t rel_ns) {
    struct timespec ts, *tp = NULL;
    if (rel_ns >= 0) {
        ts.tv_sec = rel_ns / 1000000000LL;
        ts.tv_nsec = rel_ns % 1000000000LL;
        tp = &ts;
    }
    long rc = syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, val, tp, NULL, 0);
    return rc == 0 ? 0 : -errno;
}

static void futex_wake_shared(au32 *w) {
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Called by the side that just published (tail for a producer, head for a
 * consumer). Pairs with announce_and_recheck(): both do store; seq_cst fence;
 * load, so at least one of them sees the other's store (no lost wake-up). */
static inline void wake_if_sleeping(struct fx_ring *r, au32 *sleep_word) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(sleep_word, memory_order_relaxed) &&
        atomic_exchange_explicit(sleep_word, 0, memory_order_relaxed)) {
        futex_wake_shared(sleep_word);
        r->wakes++;
    }
}

/* ---------------------------------------------------------------- layout */

static uint64_t ring_bytes(uint32_t entries, uint32_t esz) {
    return round_up((uint64_t)FX_RING_CTRL + (uint64_t)entries * esz, 4096);
}

static int check_params(uint32_t sqn, uint32_t cqn, uint32_t sqe, uint32_t cqe, uint64_t arena,
                        char *err) {
    if (!is_pow2(sqn) || !is_pow2(cqn) || sqn > FX_MAX_ENTRIES || cqn > FX_MAX_ENTRIES) {
        if (err) snprintf(err, FX_ERRMSG_LEN, "ring entries must be powers of two in 1..%u (sq=%u cq=%u)",
                          FX_MAX_ENTRIES, sqn, cqn);
        return -1;
    }
    if (!is_pow2(sqe) || !is_pow2(cqe) || sqe < 8 || cqe < 8 || sqe > FX_MAX_ENTRY_SIZE ||
        cqe > FX_MAX_ENTRY_SIZE) {
        if (err) snprintf(err, FX_ERRMSG_LEN, "entry sizes must be powers of two in 8..%u (sqe=%u cqe=%u)",
                          FX_MAX_ENTRY_SIZE, sqe, cqe);
        return -1;
    }
    if (arena > (1ull << 40)) {
        if (err) snprintf(err, FX_ERRMSG_LEN, "arena of %llu bytes is too large (max 1 TiB)",
                          (unsigned long long)arena);
        return -1;
    }
    return 0;
}

size_t fx_segment_size(uint32_t sqn, uint32_t cqn, uint32_t sqe, uint32_t cqe, uint64_t arena) {
    if (check_params(sqn, cqn, sqe, cqe, arena, NULL)) return 0;
    return FX_HEADER_SIZE + ring_bytes(sqn, sqe) + ring_bytes(cqn, cqe) + round_up(arena, 4096);
}

static void ring_init(fx_seg *s, struct fx_ring *r, uint64_t off, uint32_t entries, uint32_t esz,
                      int producer) {
    uint8_t *b = s->base + off;
    r->head = (au32 *)(b + 0);
    r->tail = (au32 *)(b + FX_LINE);
    r->cons_sleep = (au32 *)(b + 2 * FX_LINE);
    r->prod_sleep = (au32 *)(b + 3 * FX_LINE);
    r->slots = b + FX_RING_CTRL;
    r->cap = entries;
    r->mask = entries - 1;
    r->esz = esz;
    r->producer = producer;
    r->seg = s;
    /* Our own index is read from shared memory exactly once, here; from now on
     * the private copy is the truth. The peer's index is validated on every use. */
    if (producer) {
        r->local = atomic_load_explicit(r->tail, memory_order_acquire);
        r->cached = atomic_load_explicit(r->head, memory_order_acquire);
    } else {
        r->local = atomic_load_explicit(r->head, memory_order_acquire);
        r->cached = r->local;   /* "empty": the first pop loads and validates the tail */
    }
}

static fx_seg *seg_new(void) {
    fx_seg *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->fd = -1;
    s->peer_fd = -1;
    s->peer_pidfd = -1;
    s->peer_pid = -1;
    s->spin_ns = DEFAULT_SPIN_NS;
    s->liveness_ns = DEFAULT_LIVENESS_NS;
    return s;
}

static uint64_t gen_counter;

fx_seg *fx_seg_create(uint32_t sqn, uint32_t cqn, uint32_t sqe, uint32_t cqe, uint64_t arena,
                      char *err) {
    if (check_params(sqn, cqn, sqe, cqe, arena, err)) return NULL;
    arena = round_up(arena, 4096);
    size_t total = fx_segment_size(sqn, cqn, sqe, cqe, arena);
    fx_seg *s = seg_new();
    if (!s) { snprintf(err, FX_ERRMSG_LEN, "out of memory"); return NULL; }
    s->creator = 1;
    s->fd = (int)syscall(SYS_memfd_create, "flexnpu-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (s->fd < 0) { snprintf(err, FX_ERRMSG_LEN, "memfd_create: %s", strerror(errno)); goto fail; }
    if (ftruncate(s->fd, (off_t)total) < 0) {
        snprintf(err, FX_ERRMSG_LEN, "ftruncate(%zu): %s", total, strerror(errno)); goto fail;
    }
    /* Seal the size: an attacher must never SIGBUS because the creator shrank the file. */
    if (fcntl(s->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        snprintf(err, FX_ERRMSG_LEN, "memfd seals: %s", strerror(errno)); goto fail;
    }
    s->base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (s->base == MAP_FAILED) { s->base = NULL; snprintf(err, FX_ERRMSG_LEN, "mmap: %s", strerror(errno)); goto fail; }
    s->size = total;
    struct fx_header *h = (struct fx_header *)s->base;
    s->hdr = h;
    h->version = FX_LAYOUT_VERSION;
    h->header_size = FX_HEADER_SIZE;
    h->sq_entries = sqn; h->cq_entries = cqn; h->sqe_size = sqe; h->cqe_size = cqe;
    h->sq_off = FX_HEADER_SIZE;
    h->cq_off = h->sq_off + ring_bytes(sqn, sqe);
    h->arena_off = h->cq_off + ring_bytes(cqn, cqe);
    h->arena_size = arena;
    h->total_size = total;
    h->creator_pid = (int32_t)getpid();
    atomic_store_explicit((_Atomic int32_t *)&h->attacher_pid, 0, memory_order_relaxed);
    h->generation = ((uint64_t)now_ns() << 16) ^ ((uint64_t)getpid() << 40) ^
                    __atomic_add_fetch(&gen_counter, 1, __ATOMIC_RELAXED);
    /* magic last, released: the header is complete before anyone can see it valid */
    atomic_store_explicit((_Atomic uint64_t *)&h->magic, FX_MAGIC, memory_order_release);
    s->arena_off = h->arena_off;
    s->arena_size = arena;
    ring_init(s, &s->sq, h->sq_off, sqn, sqe, 1);
    ring_init(s, &s->cq, h->cq_off, cqn, cqe, 0);
    s->capfr = 16;
    s->fr = malloc(sizeof(struct blk) * s->capfr);
    s->capal = 16;
    s->al = malloc(sizeof(struct blk) * s->capal);
    if (!s->fr || !s->al) { snprintf(err, FX_ERRMSG_LEN, "out of memory"); goto fail; }
    if (arena) { s->fr[0].off = 0; s->fr[0].len = arena; s->nfr = 1; }
    s->arena_free = arena;
    return s;
fail:
    fx_seg_close(s);
    return NULL;
}

fx_seg *fx_seg_attach(int fd, char *err, int *corrupt) {
    *corrupt = 0;
    fx_seg *s = seg_new();
    if (!s) { snprintf(err, FX_ERRMSG_LEN, "out of memory"); return NULL; }
    s->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (s->fd < 0) { snprintf(err, FX_ERRMSG_LEN, "dup(%d): %s", fd, strerror(errno)); goto fail; }
    struct stat st;
    if (fstat(s->fd, &st) < 0) { snprintf(err, FX_ERRMSG_LEN, "fstat: %s", strerror(errno)); goto fail; }
    *corrupt = 1;
    if (!S_ISREG(st.st_mode)) { snprintf(err, FX_ERRMSG_LEN, "segment fd is not a memfd/regular file"); goto fail; }
    int seals = fcntl(s->fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        snprintf(err, FX_ERRMSG_LEN, "segment memfd is not sealed against shrinking (seals=%d)", seals);
        goto fail;
    }
    if ((uint64_t)st.st_size < FX_HEADER_SIZE || (uint64_t)st.st_size > (1ull << 41)) {
        snprintf(err, FX_ERRMSG_LEN, "segment size %lld is out of range", (long long)st.st_size); goto fail;
    }
    s->size = (size_t)st.st_size;
    s->base = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    if (s->base == MAP_FAILED) {
        s->base = NULL; *corrupt = 0;
        snprintf(err, FX_ERRMSG_LEN, "mmap: %s", strerror(errno)); goto fail;
    }
    /* Copy the header out once and validate the copy: the creator may keep writing. */
    struct fx_header h;
    memcpy(&h, s->base, sizeof(h));
    if (atomic_load_explicit((_Atomic uint64_t *)s->base, memory_order_acquire) != FX_MAGIC ||
        h.magic != FX_MAGIC) {
        snprintf(err, FX_ERRMSG_LEN, "bad magic 0x%016llx (not a FlexNPU ring segment)",
                 (unsigned long long)h.magic);
        goto fail;
    }
    if (h.version != FX_LAYOUT_VERSION) {
        snprintf(err, FX_ERRMSG_LEN, "layout version %u, this build speaks %u", h.version, FX_LAYOUT_VERSION);
        goto fail;
    }
    if (h.header_size != FX_HEADER_SIZE) { snprintf(err, FX_ERRMSG_LEN, "bad header size %u", h.header_size); goto fail; }
    if (check_params(h.sq_entries, h.cq_entries, h.sqe_size, h.cqe_size, h.arena_size, err)) goto fail;
    uint64_t sq_off = FX_HEADER_SIZE;
    uint64_t cq_off = sq_off + ring_bytes(h.sq_entries, h.sqe_size);
    uint64_t arena_off = cq_off + ring_bytes(h.cq_entries, h.cqe_size);
    if (h.sq_off != sq_off || h.cq_off != cq_off || h.arena_off != arena_off) {
        snprintf(err, FX_ERRMSG_LEN, "inconsistent offsets sq=%llu cq=%llu arena=%llu",
                 (unsigned long long)h.sq_off, (unsigned long long)h.cq_off,
                 (unsigned long long)h.arena_off);
        goto fail;
    }
    if (h.arena_size % 4096 || arena_off + h.arena_size != h.total_size ||
        h.total_size != (uint64_t)st.st_size) {
        snprintf(err, FX_ERRMSG_LEN, "sizes inconsistent: arena_off=%llu arena=%llu total=%llu, file is %lld bytes",
                 (unsigned long long)arena_off, (unsigned long long)h.arena_size,
                 (unsigned long long)h.total_size, (long long)st.st_size);
        goto fail;
    }
    *corrupt = 0;
    s->hdr = (struct fx_header *)s->base;
    s->creator = 0;
    s->arena_off = arena_off;
    s->arena_size = h.arena_size;
    ring_init(s, &s->sq, sq_off, h.sq_entries, h.sqe_size, 0);
    ring_init(s, &s->cq, cq_off, h.cq_entries, h.cqe_size, 1);
    atomic_store_explicit((_Atomic int32_t *)&s->hdr->attacher_pid, (int32_t)getpid(),
                          memory_order_release);
    return s;
fail:
    fx_seg_close(s);
    return NULL;
}

void fx_seg_close(fx_seg *s) {
    if (!s) return;
    if (s->base) munmap(s->base, s->size);
    if (s->fd >= 0) close(s->fd);
    if (s->peer_fd >= 0) close(s->peer_fd);
    if (s->peer_pidfd >= 0) close(s->peer_pidfd);
    free(s->fr);
    free(s->al);
    free(s);
}

int fx_seg_fd(fx_seg *s) { return s->fd; }
size_t fx_seg_size(fx_seg *s) { return s->size; }
uint8_t *fx_seg_base(fx_seg *s) { return s->base; }
int fx_seg_is_creator(fx_seg *s) { return s->creator; }
fx_ring *fx_seg_sq(fx_seg *s) { return &s->sq; }
fx_ring *fx_seg_cq(fx_seg *s) { return &s->cq; }
int32_t fx_seg_creator_pid(fx_seg *s) { return s->hdr->creator_pid; }
int32_t fx_seg_attacher_pid(fx_seg *s) {
    return atomic_load_explicit((_Atomic int32_t *)&s->hdr->attacher_pid, memory_order_acquire);
}
uint64_t fx_seg_generation(fx_seg *s) { return s->hdr->generation; }
uint64_t fx_seg_heartbeat(fx_seg *s) {
    return atomic_load_explicit((_Atomic uint64_t *)&s->hdr->heartbeat, memory_order_acquire);
}
uint64_t fx_seg_beat(fx_seg *s) {
    return atomic_fetch_add_explicit((_Atomic uint64_t *)&s->hdr->heartbeat, 1,
                                     memory_order_release) + 1;
}
uint64_t fx_seg_arena_off(fx_seg *s) { return s->arena_off; }
uint64_t fx_seg_arena_size(fx_seg *s) { return s->arena_size; }
uint32_t fx_seg_closed(fx_seg *s) {
    return atomic_load_explicit((au32 *)&s->hdr->closed, memory_order_seq_cst);
}

void fx_seg_close_notify(fx_seg *s) {
    atomic_store_explicit((au32 *)&s->hdr->closed, s->creator ? 1u : 2u, memory_order_seq_cst);
    /* Every waiter rechecks `closed` after its seq_cst fence, so clearing the sleep
     * words and waking here cannot be missed (same argument as for data). */
    struct fx_ring *rs[2] = {&s->sq, &s->cq};
    for (int i = 0; i < 2; i++) {
        atomic_exchange_explicit(rs[i]->cons_sleep, 0, memory_order_seq_cst);
        futex_wake_shared(rs[i]->cons_sleep);
        atomic_exchange_explicit(rs[i]->prod_sleep, 0, memory_order_seq_cst);
        futex_wake_shared(rs[i]->prod_sleep);
    }
}

/* ---------------------------------------------------------------- liveness */

int fx_seg_set_peer(fx_seg *s, int fd, int pid) {
    if (s->peer_fd >= 0) { close(s->peer_fd); s->peer_fd = -1; }
    if (s->peer_pidfd >= 0) { close(s->peer_pidfd); s->peer_pidfd = -1; }
    s->peer_pid = -1;
    s->peer_dead = 0;
    if (fd >= 0) {
        s->peer_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (s->peer_fd < 0) return -errno;
    }
    if (pid > 0) {
        int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (pfd >= 0) {
            s->peer_pidfd = pfd;
        } else if (errno == ESRCH) {
            s->peer_dead = 1;
        } else {
            s->peer_pid = pid;   /* no pidfd (old kernel): kill(pid, 0), zombies look alive */
        }
    }
    return 0;
}

int fx_seg_peer_alive(fx_seg *s) {
    if (s->peer_dead) return 0;
    struct pollfd p[2];
    int n = 0;
    if (s->peer_fd >= 0) { p[n].fd = s->peer_fd; p[n].events = POLLRDHUP; p[n].revents = 0; n++; }
    if (s->peer_pidfd >= 0) { p[n].fd = s->peer_pidfd; p[n].events = POLLIN; p[n].revents = 0; n++; }
    if (n && poll(p, n, 0) > 0) {
        for (int i = 0; i < n; i++)
            if (p[i].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL | (p[i].fd == s->peer_pidfd ? POLLIN : 0)))
                s->peer_dead = 1;
    }
    if (s->peer_pid > 0 && kill(s->peer_pid, 0) < 0 && errno == ESRCH) s->peer_dead = 1;
    return !s->peer_dead;
}

void fx_seg_set_spin_ns(fx_seg *s, int64_t ns) { s->spin_ns = ns < 0 ? 0 : ns; }
void fx_seg_set_liveness_ns(fx_seg *s, int64_t ns) { s->liveness_ns = ns < 1000000 ? 1000000 : ns; }

/* ---------------------------------------------------------------- arena */

static int blk_reserve(struct blk **a, uint32_t *cap, uint32_t need) {
    if (need <= *cap) return 0;
    uint32_t nc = *cap * 2;
    while (nc < need) nc *= 2;
    struct blk *p = realloc(*a, sizeof(struct blk) * nc);
    if (!p) return -1;
    *a = p; *cap = nc;
    return 0;
}

static uint32_t blk_lower(struct blk *a, uint32_t n, uint64_t off) { /* first i: a[i].off >= off */
    uint32_t lo = 0, hi = n;
    while (lo < hi) { uint32_t m = (lo + hi) / 2; if (a[m].off < off) lo = m + 1; else hi = m; }
    return lo;
}

int64_t fx_arena_alloc(fx_seg *s, uint64_t nbytes, uint64_t align) {
    if (!s->creator || nbytes == 0 || !is_pow2(align) || align > 4096) return -2;
    if (nbytes > s->arena_free) return -1;
    /* room for a possible 3-way split and the allocated record */
    if (blk_reserve(&s->fr, &s->capfr, s->nfr + 2) || blk_reserve(&s->al, &s->capal, s->nal + 1))
        return -1;
    for (uint32_t i = 0; i < s->nfr; i++) {
        struct blk b = s->fr[i];
        uint64_t start = round_up(b.off, align);
        if (start - b.off >= b.len || b.len - (start - b.off) < nbytes) continue;
        uint64_t pre = start - b.off, post = b.len - pre - nbytes;
        /* replace block i by [pre][post] pieces (0, 1 or 2 blocks) */
        struct blk pieces[2]; int np = 0;
        if (pre) { pieces[np].off = b.off; pieces[np].len = pre; np++; }
        if (post) { pieces[np].off = start + nbytes; pieces[np].len = post; np++; }
        memmove(&s->fr[i + np], &s->fr[i + 1], sizeof(struct blk) * (s->nfr - i - 1));
        for (int k = 0; k < np; k++) s->fr[i + k] = pieces[k];
        s->nfr = s->nfr - 1 + np;
        uint32_t j = blk_lower(s->al, s->nal, start);
        memmove(&s->al[j + 1], &s->al[j], sizeof(struct blk) * (s->nal - j));
        s->al[j].off = start; s->al[j].len = nbytes;
        s->nal++;
        s->arena_free -= nbytes;
        return (int64_t)start;
    }
    return -1;
}

int fx_arena_free(fx_seg *s, uint64_t off) {
    if (!s->creator) return -1;
    uint32_t j = blk_lower(s->al, s->nal, off);
    if (j >= s->nal || s->al[j].off != off) return -1;
    struct blk b = s->al[j];
    memmove(&s->al[j], &s->al[j + 1], sizeof(struct blk) * (s->nal - j - 1));
    s->nal--;
    s->arena_free += b.len;
    uint32_t i = blk_lower(s->fr, s->nfr, b.off);
    int merge_prev = i > 0 && s->fr[i - 1].off + s->fr[i - 1].len == b.off;
    int merge_next = i < s->nfr && b.off + b.len == s->fr[i].off;
    if (merge_prev && merge_next) {
        s->fr[i - 1].len += b.len + s->fr[i].len;
        memmove(&s->fr[i], &s->fr[i + 1], sizeof(struct blk) * (s->nfr - i - 1));
        s->nfr--;
    } else if (merge_prev) {
        s->fr[i - 1].len += b.len;
    } else if (merge_next) {
        s->fr[i].off = b.off;
        s->fr[i].len += b.len;
    } else {
        /* capacity was reserved at alloc time (nfr+2), so this cannot fail */
        if (blk_reserve(&s->fr, &s->capfr, s->nfr + 1)) return -2;
        memmove(&s->fr[i + 1], &s->fr[i], sizeof(struct blk) * (s->nfr - i));
        s->fr[i] = b;
        s->nfr++;
    }
    return 0;
}

uint64_t fx_arena_free_bytes(fx_seg *s) { return s->creator ? s->arena_free : 0; }
uint64_t fx_arena_largest_free(fx_seg *s) {
    uint64_t m = 0;
    for (uint32_t i = 0; i < s->nfr; i++) if (s->fr[i].len > m) m = s->fr[i].len;
    return m;
}
uint32_t fx_arena_nfree_blocks(fx_seg *s) { return s->nfr; }

/* ---------------------------------------------------------------- ring ops */

uint32_t fx_ring_entry_size(fx_ring *r) { return r->esz; }
uint32_t fx_ring_capacity(fx_ring *r) { return r->cap; }
int fx_ring_is_producer(fx_ring *r) { return r->producer; }
uint64_t fx_ring_wakes(fx_ring *r) { return r->wakes; }
void fx_ring_snapshot(fx_ring *r, uint32_t *o) {
    o[0] = r->local; o[1] = r->cached;
    o[2] = atomic_load_explicit(r->head, memory_order_relaxed);
    o[3] = atomic_load_explicit(r->tail, memory_order_relaxed);
}

/* Consumer: records available, refreshing the cached tail when needed.
 * Acquire on tail pairs with the producer's release store of tail, so the
 * slot contents written before that store are visible to our copy. */
static inline int64_t cons_avail(fx_ring *r, int refresh) {
    uint32_t n = r->cached - r->local;
    if (n == 0 || refresh) {
        uint32_t t = atomic_load_explicit(r->tail, FX_ACQ);
        n = t - r->local;
        if (n > r->cap) return FX_ECORRUPT;   /* never follow (nor cache) a scribbled tail */
        r->cached = t;
    }
    return n;
}

/* Producer: free slots. Acquire on head pairs with the consumer's release of
 * head: its copy-out of the slots finished before we overwrite them. */
static inline int64_t prod_space(fx_ring *r, uint32_t want) {
    uint32_t used = r->local - r->cached;
    if (used > r->cap) return FX_ECORRUPT;   /* only possible from a bad index seen at attach */
    if (r->cap - used < want) {
        uint32_t h = atomic_load_explicit(r->head, memory_order_acquire);
        used = r->local - h;
        if (used > r->cap) return FX_ECORRUPT;   /* never follow (nor cache) a scribbled head */
        r->cached = h;
    }
    return r->cap - used;
}

int64_t fx_ring_pending(fx_ring *r) {
    uint32_t h, t;
    if (r->producer) { h = atomic_load_explicit(r->head, memory_order_acquire); t = r->local; }
    else { h = r->local; t = atomic_load_explicit(r->tail, memory_order_acquire); }
    uint32_t n = t - h;
    return n > r->cap ? FX_ECORRUPT : (int64_t)n;
}

static inline void put_slot(fx_ring *r, uint32_t idx, const char *rec, uint32_t len) {
    uint8_t *dst = r->slots + (size_t)(idx & r->mask) * r->esz;
    memcpy(dst, rec, len);
    if (len < r->esz) memset(dst + len, 0, r->esz - len);
}

int fx_push(fx_ring *r, const char *rec, uint32_t len) {
    if (!r->producer) return FX_EROLE;
    if (len > r->esz) len = r->esz;   /* Python checks; defensive */
    int64_t sp = prod_space(r, 1);
    if (sp < 0) return (int)sp;
    if (sp == 0) return 0;
    put_slot(r, r->local, rec, len);
    r->local++;
    atomic_store_explicit(r->tail, r->local, FX_REL);
    wake_if_sleeping(r, r->cons_sleep);
    return 1;
}

int64_t fx_push_batch(fx_ring *r, const char *buf, uint32_t n) {
    if (!r->producer) return FX_EROLE;
    int64_t sp = prod_space(r, n);
    if (sp < 0) return sp;
    uint32_t k = n < sp ? n : (uint32_t)sp;
    if (k == 0) return 0;
    uint32_t idx = r->local & r->mask;
    uint32_t first = r->cap - idx < k ? r->cap - idx : k;   /* up to the wrap */
    memcpy(r->slots + (size_t)idx * r->esz, buf, (size_t)first * r->esz);
    if (k > first) memcpy(r->slots, buf + (size_t)first * r->esz, (size_t)(k - first) * r->esz);
    r->local += k;
    atomic_store_explicit(r->tail, r->local, FX_REL);   /* ONE tail store */
    wake_if_sleeping(r, r->cons_sleep);
    return k;
}

int fx_pop(fx_ring *r, char *out) {
    if (r->producer) return FX_EROLE;
    int64_t n = cons_avail(r, 0);
    if (n <= 0) return (int)n;
    memcpy(out, r->slots + (size_t)(r->local & r->mask) * r->esz, r->esz);
    r->local++;
    atomic_store_explicit(r->head, r->local, memory_order_release);
    wake_if_sleeping(r, r->prod_sleep);
    return 1;
}

int64_t fx_pop_batch(fx_ring *r, char *out, uint32_t max_n) {
    if (r->producer) return FX_EROLE;
    int64_t n = cons_avail(r, 1);
    if (n <= 0) return n;
    uint32_t k = max_n < n ? max_n : (uint32_t)n;
    if (k == 0) return 0;
    uint32_t idx = r->local & r->mask;
    uint32_t first = r->cap - idx < k ? r->cap - idx : k;
    memcpy(out, r->slots + (size_t)idx * r->esz, (size_t)first * r->esz);
    if (k > first) memcpy(out + (size_t)first * r->esz, r->slots, (size_t)(k - first) * r->esz);
    r->local += k;
    atomic_store_explicit(r->head, r->local, memory_order_release);
    wake_if_sleeping(r, r->prod_sleep);
    return k;
}

/* ---------------------------------------------------------------- waiting */

/* ready(): >0 ready, 0 not yet, <0 error */
static inline int64_t ready_cons(fx_ring *r) { return cons_avail(r, 1); }
static inline int64_t ready_prod(fx_ring *r) { return prod_space(r, r->cap); }

/* Generic wait: spin for spin_ns, then announce sleep on `word`, fence, recheck,
 * futex-sleep in slices of at most liveness_ns, checking `closed` and the peer. */
static int wait_generic(fx_ring *r, int consumer, double timeout) {
    fx_seg *s = r->seg;
    au32 *word = consumer ? r->cons_sleep : r->prod_sleep;
    int64_t t0 = now_ns();
    int64_t deadline = timeout < 0 ? INT64_MAX : t0 + (int64_t)(timeout * 1e9);
    int64_t n;
#define READY() (consumer ? ready_cons(r) : ready_prod(r))
    n = READY();
    if (n) return n > 0 ? FX_READY : (int)n;
    int64_t spin_end = t0 + s->spin_ns;
    if (spin_end > deadline) spin_end = deadline;
    for (uint32_t i = 1;; i++) {
        cpu_relax();
        n = READY();
        if (n) return n > 0 ? FX_READY : (int)n;
        if ((i & 63) == 0 && now_ns() >= spin_end) break;
    }
    int64_t next_live = 0;
    for (;;) {
        atomic_store_explicit(word, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        n = READY();
        if (n) {
            atomic_store_explicit(word, 0, memory_order_relaxed);
            return n > 0 ? FX_READY : (int)n;
        }
        if (atomic_load_explicit((au32 *)&s->hdr->closed, memory_order_relaxed)) {
            atomic_store_explicit(word, 0, memory_order_relaxed);
            return FX_ECLOSED;
        }
        int64_t now = now_ns();
        if (now >= next_live) {
            if (!fx_seg_peer_alive(s)) { atomic_store_explicit(word, 0, memory_order_relaxed); return FX_EPEERDEAD; }
            next_live = now + s->liveness_ns;
        }
        if (now >= deadline) { atomic_store_explicit(word, 0, memory_order_relaxed); return FX_TIMEOUT; }
        int64_t slice = next_live - now;
        if (deadline - now < slice) slice = deadline - now;
        int rc = futex_wait_shared(word, 1, slice);
        if (rc == -EINTR) {
            n = READY();
            atomic_store_explicit(word, 0, memory_order_relaxed);
            return n ? (n > 0 ? FX_READY : (int)n) : FX_EINTR;
        }
    }
#undef READY
}

int fx_wait(fx_ring *r, double timeout) {
    if (r->producer) return FX_EROLE;
    return wait_generic(r, 1, timeout);
}

int fx_wait_space(fx_ring *r, double timeout) {
    if (!r->producer) return FX_EROLE;
    int64_t sp = prod_space(r, 1);
    if (sp) return sp > 0 ? FX_READY : (int)sp;
    return wait_generic(r, 0, timeout);
}

static double left_s(int64_t t0, double timeout) {
    if (timeout < 0) return -1.0;
    double l = timeout - (now_ns() - t0) * 1e-9;
    return l < 0 ? 0 : l;
}

int fx_push_wait(fx_ring *r, const char *rec, uint32_t len, double timeout) {
    if (!r->producer) return FX_EROLE;
    int64_t t0 = now_ns();
    for (;;) {
        int rc = fx_push(r, rec, len);
        if (rc) return rc > 0 ? FX_READY : rc;
        rc = wait_generic(r, 0, left_s(t0, timeout));
        if (rc != FX_READY) return rc;
    }
}

int fx_call(fx_ring *sq, fx_ring *cq, const char *rec, uint32_t len, char *out,
            double timeout) {
    if (!sq->producer || cq->producer) return FX_EROLE;
    int64_t t0 = now_ns();
    int rc = fx_push_wait(sq, rec, len, timeout);
    if (rc != FX_READY) return rc;
    for (;;) {
        rc = fx_pop(cq, out);
        if (rc) return rc > 0 ? FX_READY : rc;
        rc = wait_generic(cq, 1, left_s(t0, timeout));
        if (rc != FX_READY) return rc;
    }
}

/* ---------------------------------------------------------------- wait_any */

struct futex_waitv_k { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t reserved; };

static int waitv_state = -1;   /* -1 unknown, 0 missing, 1 present */

/* Indices of the rings that have records, are corrupt, or whose segment is closed: what the
 * caller must look at, found in one pass over shared memory instead of one call per ring. */
uint32_t fx_ready_list(fx_ring **rings, uint32_t n, uint32_t *out) {
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        fx_ring *r = rings[i];
        if (cons_avail(r, 1) != 0
            || atomic_load_explicit((au32 *)&r->seg->hdr->closed, memory_order_relaxed))
            out[k++] = i;
    }
    return k;
}

int fx_have_futex_waitv(void) {
    if (waitv_state < 0) {
        /* probe: an empty/invalid call returns EINVAL when the syscall exists */
        long rc = syscall(SYS_futex_waitv, NULL, 0, 0, NULL, 0);
        waitv_state = !(rc < 0 && errno == ENOSYS);
    }
    return waitv_state;
}

fx_doorbell *fx_doorbell_new(void) { return calloc(1, sizeof(fx_doorbell)); }
void fx_doorbell_free(fx_doorbell *d) { free(d); }
void fx_doorbell_ring(fx_doorbell *d) {
    if (atomic_exchange_explicit(&d->word, 1, memory_order_seq_cst) == 0)
        syscall(SYS_futex, (uint32_t *)&d->word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

int fx_doorbell_watch(fx_doorbell *d, uintptr_t bell, uintptr_t sleepers) {
    for (uint32_t i = 0; i < d->nwatch; i++)
        if ((uintptr_t)d->w[i].bell == bell) return 0;
    if (d->nwatch >= FX_DOORBELL_WATCHES) return -1;
    struct fx_watch *w = &d->w[d->nwatch];
    w->bell = (au32 *)bell;
    w->sleepers = (au32 *)sleepers;
    /* taken before the caller's own check of what the bell announces, so a post between that
     * check and the next wait still shows as a change */
    w->seen = atomic_load_explicit(w->bell, memory_order_acquire);
    d->nwatch++;
    return 0;
}

void fx_doorbell_unwatch(fx_doorbell *d, uintptr_t bell) {
    for (uint32_t i = 0; i < d->nwatch; i++)
        if ((uintptr_t)d->w[i].bell == bell) {
            d->w[i] = d->w[--d->nwatch];
            return;
        }
}

uint32_t fx_doorbell_nwatch(fx_doorbell *d) { return d->nwatch; }

static int watch_changed(fx_doorbell *d) {
    int hit = 0;
    for (uint32_t i = 0; i < d->nwatch; i++) {
        uint32_t v = atomic_load_explicit(d->w[i].bell, memory_order_acquire);
        if (v != d->w[i].seen) { d->w[i].seen = v; hit = 1; }
    }
    return hit;
}

static void watch_sleepers(fx_doorbell *d, int delta) {
    for (uint32_t i = 0; i < (d ? d->nwatch : 0); i++) {
        if (delta > 0) atomic_fetch_add_explicit(d->w[i].sleepers, 1, memory_order_relaxed);
        else atomic_fetch_sub_explicit(d->w[i].sleepers, 1, memory_order_relaxed);
    }
}

static int any_ready(fx_ring **rings, uint32_t n, fx_doorbell *d) {
    if (d && atomic_exchange_explicit(&d->word, 0, memory_order_acquire)) return 1;
    if (d && d->nwatch && watch_changed(d)) return 1;
    for (uint32_t i = 0; i < n; i++) {
        fx_ring *r = rings[i];
        int64_t k = cons_avail(r, 1);
        if (k != 0) return 1;   /* ready, or corrupt: the caller's pop reports it */
        if (atomic_load_explicit((au32 *)&r->seg->hdr->closed, memory_order_relaxed)) return 1;
    }
    return 0;
}

int fx_wait_any(fx_ring **rings, uint32_t n, double timeout, fx_doorbell *d, int force_fallback) {
    for (uint32_t i = 0; i < n; i++) if (rings[i]->producer) return FX_EROLE;
    int64_t t0 = now_ns();
    int64_t deadline = timeout < 0 ? INT64_MAX : t0 + (int64_t)(timeout * 1e9);
    if (any_ready(rings, n, d)) return FX_READY;
    int64_t spin_ns = n ? rings[0]->seg->spin_ns : DEFAULT_SPIN_NS;
    int64_t spin_end = t0 + spin_ns < deadline ? t0 + spin_ns : deadline;
    for (uint32_t i = 1;; i++) {
        cpu_relax();
        if (any_ready(rings, n, d)) return FX_READY;
        if ((i & 15) == 0 && now_ns() >= spin_end) break;
    }
    /* futex_waitv takes at most 128 words. Beyond that it waits on the doorbell and the first
     * rings (the caller puts the recently active ones first), in slices that grow to 10 ms,
     * rechecking every ring between slices: a busy client is woken at once however many idle
     * ones are attached, an idle one within a slice of becoming busy. */
    int use_waitv = !force_fallback && fx_have_futex_waitv();
    uint32_t extra = d ? 1 + d->nwatch : 0;
    uint32_t nwait = n + extra <= 128 ? n : 128 - extra;
    int sliced = nwait < n;
    struct futex_waitv_k stackv[128];
    int64_t slice_ns = 200000;   /* fallback: sliced waits, growing to 10 ms */
    int rc = FX_TIMEOUT;
    watch_sleepers(d, +1);
    for (;;) {
        for (uint32_t i = 0; i < n; i++) atomic_store_explicit(rings[i]->cons_sleep, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if (any_ready(rings, n, d)) { rc = FX_READY; break; }
        int64_t now = now_ns();
        if (now >= deadline) { rc = FX_TIMEOUT; break; }
        if (use_waitv) {
            uint32_t k = 0;
            for (uint32_t i = 0; i < nwait; i++) {
                stackv[k].val = 1; stackv[k].uaddr = (uintptr_t)rings[i]->cons_sleep;
                stackv[k].flags = FUTEX2_SIZE_U32; stackv[k].reserved = 0; k++;
            }
            if (d) {
                stackv[k].val = 0; stackv[k].uaddr = (uintptr_t)&d->word;
                stackv[k].flags = FUTEX2_SIZE_U32 | FUTEX2_PRIVATE; stackv[k].reserved = 0; k++;
                for (uint32_t i = 0; i < d->nwatch; i++) {   /* other processes' bells: shared */
                    stackv[k].val = d->w[i].seen; stackv[k].uaddr = (uintptr_t)d->w[i].bell;
                    stackv[k].flags = FUTEX2_SIZE_U32; stackv[k].reserved = 0; k++;
                }
            }
            struct timespec ts, *tp = NULL;
            int64_t until = deadline;
            if (sliced) {
                if (now + slice_ns < until) until = now + slice_ns;
                if (slice_ns < 10000000) slice_ns *= 2;
            }
            if (until != INT64_MAX) {   /* futex_waitv takes an absolute CLOCK_MONOTONIC time */
                ts.tv_sec = until / 1000000000LL; ts.tv_nsec = until % 1000000000LL; tp = &ts;
            }
            long r = k ? syscall(SYS_futex_waitv, stackv, k, 0, tp, CLOCK_MONOTONIC) : -1;
            if (!k) {   /* nothing to wait on: sleep until the deadline */
                struct timespec st = {0, 10000000};
                nanosleep(&st, NULL);
            } else if (r < 0 && errno == ENOSYS) {
                use_waitv = 0;
            } else if (r < 0 && errno == EINTR) {
                rc = any_ready(rings, n, d) ? FX_READY : FX_EINTR;
                break;
            }
        } else {
            /* without futex_waitv a watched bell is seen between slices: keep them short */
            if (d && d->nwatch && slice_ns > 1000000) slice_ns = 1000000;
            int64_t sl = slice_ns < deadline - now ? slice_ns : deadline - now;
            struct timespec ts = {sl / 1000000000LL, sl % 1000000000LL};
            long r;
            if (d) r = syscall(SYS_futex, (uint32_t *)&d->word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
            else if (n) { r = futex_wait_shared(rings[0]->cons_sleep, 1, sl); if (r < 0) { errno = (int)-r; r = -1; } }
            else r = nanosleep(&ts, NULL);
            if (r < 0 && errno == EINTR) {
                rc = any_ready(rings, n, d) ? FX_READY : FX_EINTR;
                break;
            }
            if (slice_ns < 10000000) slice_ns *= 2;
        }
    }
    watch_sleepers(d, -1);
    for (uint32_t i = 0; i < n; i++) atomic_store_explicit(rings[i]->cons_sleep, 0, memory_order_relaxed);
    return rc;
}
