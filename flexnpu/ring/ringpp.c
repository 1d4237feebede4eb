/* Pure C drivers over the ring core (compiled on demand, not part of the extension):
 *
 *   ringpp floor N CPU_A CPU_B   fork two processes pinned to CPU_A/CPU_B, the child
 *                                attaches the memfd and echoes; prints one JSON line with
 *                                the round-trip p50/p99 (ns) of N calls and the one-way
 *                                throughput of single pushes: the hardware floor for the ring.
 *   ringpp threads N             two threads, same mapping (so ThreadSanitizer sees both
 *                                sides), random batch sizes and pauses, waits with futex
 *                                sleeps, checksums; exit status 0 = order and sums verified.
 *
 * Includes ring.c directly to reach its internals (one translation unit, no linking games).
 */
#define _GNU_SOURCE
#include "ring.c"

#include <pthread.h>
#include <sched.h>
#include <sys/wait.h>

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------ floor */

static int floor_mode(long n, int cpu_a, int cpu_b) {
    char err[FX_ERRMSG_LEN];
    fx_seg *s = fx_seg_create(1024, 1024, 64, 32, 4096, err);
    if (!s) { fprintf(stderr, "create: %s\n", err); return 2; }
    long tp_n = n * 20;
    pid_t pid = fork();
    if (pid == 0) {
        pin(cpu_b);
        int corrupt;
        fx_seg *a = fx_seg_attach(fx_seg_fd(s), err, &corrupt);
        if (!a) { fprintf(stderr, "attach: %s\n", err); _exit(2); }
        char rec[64];
        /* echo n+1 records (one warm-up), then sink tp_n records and ack */
        for (long i = 0; i < n + 1000; i++) {
            while (fx_pop(&a->sq, rec) == 0) if (fx_wait(&a->sq, 5.0) != FX_READY) _exit(3);
            while (fx_push(&a->cq, rec, 32) == 0) ;
        }
        for (long i = 0; i < tp_n; i++)
            while (fx_pop(&a->sq, rec) == 0) if (fx_wait(&a->sq, 5.0) != FX_READY) _exit(3);
        fx_push(&a->cq, rec, 32);
        _exit(0);
    }
    pin(cpu_a);
    char rec[64] = {1}, out[32];
    int64_t *lat = malloc(sizeof(int64_t) * n);
    for (long i = 0; i < 1000; i++) fx_call(&s->sq, &s->cq, rec, 32, out, 5.0);
    int64_t t_all = now_ns();
    for (long i = 0; i < n; i++) {
        int64_t t0 = now_ns();
        if (fx_call(&s->sq, &s->cq, rec, 32, out, 5.0) != FX_READY) { fprintf(stderr, "call failed\n"); return 3; }
        lat[i] = now_ns() - t0;
    }
    t_all = now_ns() - t_all;
    int64_t t0 = now_ns();
    for (long i = 0; i < tp_n; i++)
        while (fx_push(&s->sq, rec, 32) == 0) fx_wait_space(&s->sq, 5.0);
    while (fx_pop(&s->cq, out) == 0) if (fx_wait(&s->cq, 5.0) != FX_READY) return 3;
    int64_t tp = now_ns() - t0;
    int st;
    waitpid(pid, &st, 0);
    qsort(lat, n, sizeof(int64_t), cmp64);
    printf("{\"rtt_p50_ns\": %lld, \"rtt_p99_ns\": %lld, \"rtt_mean_ns\": %.1f, \"msgs_per_s\": %.0f}\n",
           (long long)lat[n / 2], (long long)lat[(n * 99) / 100], (double)t_all / n,
           tp_n / (tp * 1e-9));
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 4;
}

/* ------------------------------------------------------------------ threads (TSan) */

struct targ { fx_seg *seg; long n; int ok; unsigned seed; };

static unsigned rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return (*s >> 8); }

static void maybe_pause(unsigned *seed) {
    unsigned r = rnd(seed) % 1000;
    if (r < 3) { struct timespec ts = {0, 200000 + (rnd(seed) % 800000)}; nanosleep(&ts, NULL); }
    else if (r < 30) sched_yield();
}

static void *producer(void *p) {  /* creator side: pushes sq, pops cq acks */
    struct targ *t = p;
    fx_seg *s = t->seg;
    char buf[64 * 64];
    uint64_t seq = 0, acked = 0;
    while (seq < (uint64_t)t->n) {
        uint32_t k = 1 + rnd(&t->seed) % 40;
        if (seq + k > (uint64_t)t->n) k = (uint32_t)(t->n - seq);
        for (uint32_t i = 0; i < k; i++) {
            uint64_t v = seq + i, c = v * 0x9E3779B97F4A7C15ull;
            memcpy(buf + i * 64, &v, 8);
            memcpy(buf + i * 64 + 8, &c, 8);
        }
        uint32_t done = 0;
        while (done < k) {
            int64_t m = fx_push_batch(&s->sq, buf + done * 64, k - done);
            if (m < 0) { t->ok = 0; return NULL; }
            done += (uint32_t)m;
            if (done < k && fx_wait_space(&s->sq, 10.0) != FX_READY) { t->ok = 0; return NULL; }
        }
        seq += k;
        char a[32];
        while (fx_pop(&s->cq, a) == 1) memcpy(&acked, a, 8);
        maybe_pause(&t->seed);
    }
    char a[32];
    while (acked + 1 < (uint64_t)t->n) {
        if (fx_pop(&s->cq, a) == 1) { memcpy(&acked, a, 8); continue; }
        if (fx_wait(&s->cq, 10.0) != FX_READY) { t->ok = 0; return NULL; }
    }
    t->ok = 1;
    return NULL;
}

static void *consumer(void *p) {  /* attacher side: pops sq, pushes acks on cq */
    struct targ *t = p;
    fx_seg *s = t->seg;
    char buf[64 * 64];
    uint64_t expect = 0;
    while (expect < (uint64_t)t->n) {
        uint32_t want = 1 + rnd(&t->seed) % 64;
        int64_t m = fx_pop_batch(&s->sq, buf, want);
        if (m < 0) { t->ok = 0; return NULL; }
        if (m == 0) {
            if (fx_wait(&s->sq, 10.0) != FX_READY) { t->ok = 0; return NULL; }
            continue;
        }
        for (int64_t i = 0; i < m; i++) {
            uint64_t v, c;
            memcpy(&v, buf + i * 64, 8);
            memcpy(&c, buf + i * 64 + 8, 8);
            if (v != expect || c != v * 0x9E3779B97F4A7C15ull) {
                fprintf(stderr, "order/checksum mismatch at %llu (got %llu)\n",
                        (unsigned long long)expect, (unsigned long long)v);
                t->ok = 0;
                return NULL;
            }
            expect++;
        }
        uint64_t last = expect - 1;
        if (fx_push_wait(&s->cq, (const char *)&last, 8, 10.0) != FX_READY) { t->ok = 0; return NULL; }
        maybe_pause(&t->seed);
    }
    t->ok = 1;
    return NULL;
}

static int threads_mode(long n) {
    char err[FX_ERRMSG_LEN];
    fx_seg *s = fx_seg_create(64, 64, 64, 32, 4096, err);
    if (!s) { fprintf(stderr, "create: %s\n", err); return 2; }
    /* The attacher's view over the SAME mapping, so the sanitizer sees both sides' accesses. */
    fx_seg *a = seg_new();
    a->base = s->base; a->size = s->size; a->hdr = s->hdr; a->creator = 0;
    ring_init(a, &a->sq, s->hdr->sq_off, 64, 64, 0);
    ring_init(a, &a->cq, s->hdr->cq_off, 64, 32, 1);
    a->spin_ns = 2000;   /* short spins: exercise the futex sleep path often */
    s->spin_ns = 2000;
    struct targ tp = {s, n, 0, 12345}, tc = {a, n, 0, 777};
    pthread_t p1, p2;
    pthread_create(&p1, NULL, producer, &tp);
    pthread_create(&p2, NULL, consumer, &tc);
    pthread_join(p1, NULL);
    pthread_join(p2, NULL);
    printf("{\"producer_ok\": %d, \"consumer_ok\": %d, \"records\": %ld}\n", tp.ok, tc.ok, n);
    a->base = NULL;   /* shared mapping: unmapped once, by s */
    fx_seg_close(a);
    fx_seg_close(s);
    return tp.ok && tc.ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "floor"))
        return floor_mode(atol(argv[2]), argc > 3 ? atoi(argv[3]) : -1, argc > 4 ? atoi(argv[4]) : -1);
    if (argc >= 3 && !strcmp(argv[1], "threads")) return threads_mode(atol(argv[2]));
    fprintf(stderr, "usage: ringpp floor N [CPU_A CPU_B] | ringpp threads N\n");
    return 2;
}
