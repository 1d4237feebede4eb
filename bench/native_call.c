/* flexnpu bench call, native front: the client cost of AscendCL calls through FlexNPU's
 * libascendcl.so. Declares the few functions it uses itself (the benchmark must not need the
 * CANN headers). Prints one line per benchmark: name p50_us p99_us. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int aclError;
aclError aclInit(const char *);
aclError aclrtSetDevice(int32_t);
aclError aclrtCreateStream(void **);
aclError aclrtSynchronizeStream(void *);
aclError aclrtMalloc(void **, size_t, int);
aclError aclrtMallocHost(void **, size_t);
aclError aclrtMemcpyAsync(void *, size_t, const void *, size_t, int, void *);

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void report(const char *name, double *lat, int n) {
    qsort(lat, (size_t)n, sizeof *lat, cmp);
    printf("%s %.4f %.4f\n", name, lat[n / 2], lat[(int)(n * 0.99)]);
}

#define CHECK(x) do { aclError r_ = (x); if (r_) { fprintf(stderr, "%s = %d\n", #x, r_); return 1; } } while (0)

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    double *lat = malloc(sizeof(double) * (size_t)n);
    void *s = NULL, *dev = NULL, *pinned = NULL;
    char host[256];
    memset(host, 1, sizeof host);
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&s));
    CHECK(aclrtMalloc(&dev, 1 << 20, 0));
    CHECK(aclrtMallocHost(&pinned, 4096));
    for (int i = 0; i < 2000; i++) CHECK(aclrtSynchronizeStream(s));
    for (int i = 0; i < n; i++) {       /* a synchronous call on an idle stream: one round trip */
        double t = now_us();
        aclrtSynchronizeStream(s);
        lat[i] = now_us() - t;
    }
    report("native-sync-call", lat, n);
    for (int pass = 0; pass < 2; pass++) {   /* small async copies: pageable (staged) and pinned */
        const void *src = pass ? pinned : (const void *)host;
        for (int i = 0; i < n; i++) {
            double t = now_us();
            aclrtMemcpyAsync((char *)dev + (i % 1024) * 256, 256, src, 256, 1 /* H2D */, s);
            lat[i] = now_us() - t;
            if (i % 1024 == 1023) CHECK(aclrtSynchronizeStream(s));
        }
        CHECK(aclrtSynchronizeStream(s));
        report(pass ? "native-async-copy-pinned" : "native-async-copy", lat, n);
    }
    return 0;
}
