/* Many threads on one device through FlexNPU's libascendcl.so, for ThreadSanitizer: each sets the
 * device itself (as torch_npu's task-queue thread does), creates its own stream and events,
 * allocates, copies asynchronously and synchronously, and checks its data; a churn thread
 * allocates and frees concurrently. Declares the calls itself (no CANN headers needed). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int aclError;
aclError aclInit(const char *);
aclError aclrtSetDevice(int32_t);
aclError aclrtCreateStream(void **);
aclError aclrtDestroyStream(void *);
aclError aclrtCreateEvent(void **);
aclError aclrtDestroyEvent(void *);
aclError aclrtRecordEvent(void *, void *);
aclError aclrtStreamWaitEvent(void *, void *);
aclError aclrtSynchronizeStream(void *);
aclError aclrtMalloc(void **, size_t, int);
aclError aclrtFree(void *);
aclError aclrtMallocHost(void **, size_t);
aclError aclrtFreeHost(void *);
aclError aclrtMemcpy(void *, size_t, const void *, size_t, int);
aclError aclrtMemcpyAsync(void *, size_t, const void *, size_t, int, void *);

static int rounds;
static _Atomic int bad;
#define T(x) do { if ((x) != 0) { fprintf(stderr, "%s failed\n", #x); bad++; return NULL; } } while (0)

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    void *s, *e, *dev, *pin;
    unsigned char host[4096], back[4096];
    T(aclrtSetDevice(0));
    T(aclrtCreateStream(&s));
    T(aclrtCreateEvent(&e));
    T(aclrtMalloc(&dev, 1 << 16, 0));
    T(aclrtMallocHost(&pin, 4096));
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < 4096; i++) host[i] = (unsigned char)(i + r * 7 + id);
        T(aclrtMemcpyAsync((char *)dev + (r % 16) * 4096, 4096, host, 4096, 1, s));
        T(aclrtRecordEvent(e, s));
        T(aclrtStreamWaitEvent(NULL, e));
        T(aclrtMemcpyAsync(pin, 4096, (char *)dev + (r % 16) * 4096, 4096, 2, s));
        T(aclrtSynchronizeStream(s));
        if (memcmp(pin, host, 4096)) { bad++; fprintf(stderr, "thread %d round %d: wrong data\n", id, r); }
        T(aclrtMemcpy(back, 4096, (char *)dev + (r % 16) * 4096, 4096, 2));
        if (memcmp(back, host, 4096)) { bad++; fprintf(stderr, "thread %d round %d: wrong sync data\n", id, r); }
    }
    T(aclrtFreeHost(pin));
    T(aclrtFree(dev));
    T(aclrtDestroyEvent(e));
    T(aclrtDestroyStream(s));
    return NULL;
}

static void *churn(void *arg) {
    (void)arg;
    T(aclrtSetDevice(0));
    for (int r = 0; r < rounds; r++) {
        void *p, *s;
        T(aclrtMalloc(&p, 4096 + (size_t)r, 0));
        T(aclrtCreateStream(&s));
        T(aclrtDestroyStream(s));
        T(aclrtFree(p));
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    rounds = argc > 2 ? atoi(argv[2]) : 100;
    pthread_t t[16];
    if (aclInit(NULL)) return 2;
    for (int i = 0; i < n && i < 15; i++) pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i);
    pthread_create(&t[15], NULL, churn, NULL);
    for (int i = 0; i < n && i < 15; i++) pthread_join(t[i], NULL);
    pthread_join(t[15], NULL);
    printf(bad ? "FAILED %d\n" : "OK\n", (int)bad);
    return bad != 0;
}
