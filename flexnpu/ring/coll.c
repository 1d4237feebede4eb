/* FlexNPU collectives: the cross-process words of a communicator's shared segment.
 *
 * The daemons of one communicator map one shared segment (flexnpu/daemon/collectives.py lays it
 * out). Every cross-process counter and flag in it is read and written here, with C11 atomics:
 * acquire loads, release stores, and a seq_cst fence between announcing a sleep and rechecking,
 * exactly as the command ring does (ring.c). Python only passes addresses inside its own mapping.
 *
 * Waiting: spin briefly, then sleep on the segment's `bell` (a shared futex word every post
 * increments). A poster wakes only if someone announced a sleep on `sleepers`.
 */
#include "ring.h"

#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef _Atomic uint64_t a64;
typedef _Atomic uint32_t a32;

static inline int64_t c_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void c_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

uint64_t fx_shm_load(uintptr_t addr) {
    return atomic_load_explicit((a64 *)addr, memory_order_acquire);
}

void fx_shm_store(uintptr_t addr, uint64_t v) {
    atomic_store_explicit((a64 *)addr, v, memory_order_release);
}

uint64_t fx_shm_fetch_add(uintptr_t addr, uint64_t v) {
    return atomic_fetch_add_explicit((a64 *)addr, v, memory_order_acq_rel);
}

int fx_shm_cas(uintptr_t addr, uint64_t expected, uint64_t desired) {
    return atomic_compare_exchange_strong_explicit((a64 *)addr, &expected, desired,
                                                   memory_order_acq_rel, memory_order_acquire);
}

void fx_coll_post(uintptr_t addr, uint64_t v, uintptr_t bell, uintptr_t sleepers) {
    atomic_store_explicit((a64 *)addr, v, memory_order_release);
    atomic_fetch_add_explicit((a32 *)bell, 1, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit((a32 *)sleepers, memory_order_relaxed))
        syscall(SYS_futex, (uint32_t *)bell, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

static int all_ge(uintptr_t base, const uint32_t *offs, uint32_t n, uint64_t target) {
    for (uint32_t i = 0; i < n; i++)
        if (atomic_load_explicit((a64 *)(base + offs[i]), memory_order_acquire) < target) return 0;
    return 1;
}

int fx_coll_wait(uintptr_t base, const uint32_t *offs, uint32_t n, uint64_t target, uintptr_t abort_addr,
                 uintptr_t bell, uintptr_t sleepers, double timeout, int64_t spin_ns) {
    a64 *ab = (a64 *)abort_addr;
    int64_t t0 = c_now_ns();
    int64_t deadline = t0 + (int64_t)(timeout * 1e9);
    int64_t spin_end = t0 + spin_ns < deadline ? t0 + spin_ns : deadline;
    for (uint32_t i = 0;; i++) {
        /* readiness first: a peer that finished its part and then aborted (its client exited)
         * still left valid data for this step */
        if (all_ge(base, offs, n, target)) return FX_READY;
        if (atomic_load_explicit(ab, memory_order_acquire)) return FX_COLL_ABORTED;
        if ((i & 15) == 15 && c_now_ns() >= spin_end) break;
        c_relax();
    }
    for (;;) {
        uint32_t seen = atomic_load_explicit((a32 *)bell, memory_order_acquire);
        atomic_fetch_add_explicit((a32 *)sleepers, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        int rc = FX_TIMEOUT;
        if (all_ge(base, offs, n, target)) rc = FX_READY;
        else if (atomic_load_explicit(ab, memory_order_acquire)) rc = FX_COLL_ABORTED;
        else {
            int64_t now = c_now_ns();
            if (now < deadline) {
                int64_t rel = deadline - now;
                struct timespec ts = {rel / 1000000000LL, rel % 1000000000LL};
                /* shared futex (never FUTEX_PRIVATE): the poster is another process */
                syscall(SYS_futex, (uint32_t *)bell, FUTEX_WAIT, seen, &ts, NULL, 0);
                rc = 2;   /* recheck */
            }
        }
        atomic_fetch_sub_explicit((a32 *)sleepers, 1, memory_order_relaxed);
        if (rc != 2) return rc;
        if (all_ge(base, offs, n, target)) return FX_READY;
        if (atomic_load_explicit(ab, memory_order_acquire)) return FX_COLL_ABORTED;
        if (c_now_ns() >= deadline) return FX_TIMEOUT;
    }
}
