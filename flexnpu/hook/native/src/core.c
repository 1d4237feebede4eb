/* FlexNPU native front end: initialisation, errors, attaching to the daemon, the transport.
 *
 * The attach handshake is the Python client's (flexnpu/client.py, flexnpu/daemon/control.py):
 * a length-prefixed JSON message over the daemon's unix socket carrying the segment memfd with
 * SCM_RIGHTS. Before the segment leaves this process the daemon's credentials are checked
 * (SO_PEERCRED: root or our own uid), so a socket planted by someone else gets nothing.
 * Every wait on the rings also watches the control socket and the daemon's pid: a daemon that
 * dies turns the next call into ACL_ERROR_RT_LOST_HEARTBEAT, never a hang.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "fx_native.h"

struct fx_dev fx_devs[FX_MAX_DEVICES];
int fx_ndev = -1;
static int phys_of[FX_MAX_DEVICES];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static _Atomic int g_init;            /* aclInit done and not finalized */
static _Atomic int g_verbose = -1;
static __thread int t_dev = -1;
static __thread char t_err[1024];
static __thread char t_err_out[1024];
static __thread int t_err_set;

/* ------------------------------------------------------------------ environment */
int fx_verbose(void) {
    int v = atomic_load(&g_verbose);
    if (v < 0) {
        const char *e = getenv("FLEXNPU_NATIVE_VERBOSE");
        v = e && *e && strcmp(e, "0") != 0;
        atomic_store(&g_verbose, v);
    }
    return v;
}

static void parse_devices(void) {
    const char *v = getenv("FLEXNPU_DEVICES");
    int n = 0;
    if (v && *v) {
        const char *p = v;
        while (*p && n < FX_MAX_DEVICES) {
            char *end;
            long x = strtol(p, &end, 10);
            if (end == p || x < 0) break;
            phys_of[n++] = (int)x;
            p = end;
            while (*p == ',' || *p == ' ') p++;
        }
    } else {
        /* not under `flexnpu run`: the devices whose daemon sockets exist, from 0 up */
        char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
        extern int fx_socket_path(int phys, char *out, size_t cap);
        struct stat st;
        while (n < FX_MAX_DEVICES && fx_socket_path(n, path, sizeof path) == 0 && stat(path, &st) == 0) {
            phys_of[n] = n;
            n++;
        }
    }
    fx_ndev = n;
}

/* A forked child does not inherit the attachment (the segment and socket are the parent's, and
 * locks may be held by threads that do not exist in the child): it starts detached, and its own
 * aclrtSetDevice attaches anew, as Client does in Python. */
static void after_fork_child(void) {
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        struct fx_dev *d = &fx_devs[i];
        pthread_mutex_init(&d->lock, NULL);
        if (d->seg) fx_seg_close(d->seg);   /* unmaps and closes this process's copies only */
        if (d->sock >= 0) close(d->sock);
        d->seg = NULL;
        d->sock = -1;
        d->arena = NULL;
        atomic_store(&d->state, 0);
        atomic_store(&d->refs, 0);
        fx_idset_clear(&d->streams);
        fx_idset_clear(&d->events);
        free(d->stg);
        d->stg = NULL;
        d->stg_cap = d->stg_n = d->stg_head = 0;
    }
    fx_mem_after_fork();
    fx_graph_after_fork();
    fx_aclop_after_fork();
    t_dev = -1;
}

static void global_init(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        pthread_mutex_init(&fx_devs[i].lock, NULL);
        fx_devs[i].index = i;
        fx_devs[i].sock = -1;
    }
    parse_devices();
    for (int i = 0; i < fx_ndev; i++) fx_devs[i].phys = phys_of[i];
}

static void ensure_global(void) { pthread_once(&g_once, global_init); }

int fx_initialized(void) { return atomic_load(&g_init); }

/* ------------------------------------------------------------------ errors */
aclError fx_err(aclError code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(t_err, sizeof t_err, "EL0000: [FlexNPU] error %d: ", code);
    if (n < 0) n = 0;
    vsnprintf(t_err + n, sizeof t_err - (size_t)n, fmt, ap);
    va_end(ap);
    t_err_set = 1;
    if (fx_verbose()) fprintf(stderr, "flexnpu native: %s\n", t_err);
    return code;
}

aclError fx_from_wire(int status, const char *msg, const char *what) {
    int code;
    switch (status) {
    case FXE_SUCCESS: return ACL_SUCCESS;
    case FXE_INVALID_ARGUMENT: code = ACL_ERROR_INVALID_PARAM; break;
    case FXE_INVALID_HANDLE: code = ACL_ERROR_RT_INVALID_HANDLE; break;
    case FXE_OUT_OF_MEMORY: code = ACL_ERROR_RT_MEMORY_ALLOCATION; break;
    case FXE_OP_NOT_SUPPORTED: code = ACL_ERROR_API_NOT_SUPPORT; break;
    case FXE_OP_FAILED: code = ACL_ERROR_RT_AICORE_EXCEPTION; break;
    case FXE_PERMISSION_DENIED: code = ACL_ERROR_RT_NO_PERMISSION; break;
    case FXE_NOT_FOUND: code = ACL_ERROR_INVALID_PARAM; break;
    case FXE_BAD_STATE: code = ACL_ERROR_RT_PARAM_INVALID; break;
    case FXE_SHUTDOWN: code = ACL_ERROR_RT_LOST_HEARTBEAT; break;
    case FXE_UNSUPPORTED: code = ACL_ERROR_RT_FEATURE_NOT_SUPPORT; break;
    default: code = ACL_ERROR_RT_INTERNAL_ERROR; break;
    }
    return fx_err(code, "%s: %s (%s)", what, msg && *msg ? msg : "failed", fx_err_name(status));
}

void fx_err_restore(const char *full) {
    snprintf(t_err, sizeof t_err, "%s", full);
    t_err_set = full[0] != 0;
}

FX_API const char *aclGetRecentErrMsg(void) {
    /* The message is handed out once (as AscendCL does); "" rather than NULL when there is none,
     * so callers that print it unconditionally stay safe. */
    if (!t_err_set) return "";
    memcpy(t_err_out, t_err, sizeof t_err_out);
    t_err_set = 0;
    t_err[0] = 0;
    return t_err_out;
}

void fx_unsupported(const char *name, _Atomic int *once, int is_error) {
    if (atomic_exchange(once, 1) == 0 && fx_verbose())
        fprintf(stderr, "flexnpu native: unsupported AscendCL call %s (first call; %s)\n", name,
                is_error ? "returns ACL_ERROR_API_NOT_SUPPORT" : "does nothing, returns success");
    if (is_error) fx_err(ACL_ERROR_API_NOT_SUPPORT, "%s is not supported by FlexNPU's native front end", name);
}

/* ------------------------------------------------------------------ tiny JSON reader */
/* Skips one JSON value starting at p; returns the char after it, NULL if malformed. */
static const char *skip_ws(const char *p) { while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++; return p; }

static const char *skip_string(const char *p) {
    if (*p != '"') return NULL;
    for (p++; *p; p++) {
        if (*p == '\\') { if (!*++p) return NULL; continue; }
        if (*p == '"') return p + 1;
    }
    return NULL;
}

static const char *skip_value(const char *p, int depth) {
    p = skip_ws(p);
    if (depth > 32) return NULL;
    if (*p == '"') return skip_string(p);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = skip_ws(p + 1);
        if (*p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                p = skip_string(skip_ws(p));
                if (!p) return NULL;
                p = skip_ws(p);
                if (*p++ != ':') return NULL;
            }
            p = skip_value(p, depth + 1);
            if (!p) return NULL;
            p = skip_ws(p);
            if (*p == ',') { p++; continue; }
            if (*p == close) return p + 1;
            return NULL;
        }
    }
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ') p++;
    return p;
}

/* Finds a top-level key of a JSON object; returns a pointer to its value or NULL. */
static const char *json_find(const char *json, const char *key) {
    const char *p = skip_ws(json);
    if (*p++ != '{') return NULL;
    size_t klen = strlen(key);
    for (;;) {
        p = skip_ws(p);
        if (*p != '"') return NULL;
        const char *k = p + 1, *e = skip_string(p);
        if (!e) return NULL;
        p = skip_ws(e);
        if (*p++ != ':') return NULL;
        p = skip_ws(p);
        if ((size_t)(e - 1 - k) == klen && memcmp(k, key, klen) == 0) return p;
        p = skip_value(p, 1);
        if (!p) return NULL;
        p = skip_ws(p);
        if (*p++ != ',') return NULL;
    }
}

int fx_json_int(const char *json, const char *key, int64_t *out) {
    const char *v = json_find(json, key);
    if (!v || !((*v >= '0' && *v <= '9') || *v == '-')) return -1;
    *out = strtoll(v, NULL, 10);
    return 0;
}

static int json_true(const char *json, const char *key) {
    const char *v = json_find(json, key);
    return v && strncmp(v, "true", 4) == 0;
}

static void json_str(const char *json, const char *key, char *out, size_t cap) {
    const char *v = json_find(json, key);
    out[0] = 0;
    if (!v || *v != '"') return;
    const char *e = skip_string(v);
    if (!e) return;
    size_t n = (size_t)(e - v - 2);
    if (n >= cap) n = cap - 1;
    memcpy(out, v + 1, n);
    out[n] = 0;
}

/* ------------------------------------------------------------------ attach */
int fx_socket_path(int phys, char *out, size_t cap) {
    /* flexnpu/paths.py, in C: FLEXNPU_RUNTIME_DIR, else /run/flexnpu for root, else
     * $XDG_RUNTIME_DIR/flexnpu, else /tmp/flexnpu-<uid>; a non-root user without a daemon of
     * their own uses the system daemons' socket. */
    const char *env = getenv("FLEXNPU_RUNTIME_DIR");
    int n;
    if (env && *env) {
        n = snprintf(out, cap, "%s/npu%d.sock", env, phys);
    } else {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (geteuid() == 0) n = snprintf(out, cap, "/run/flexnpu/npu%d.sock", phys);
        else if (xdg && *xdg) n = snprintf(out, cap, "%s/flexnpu/npu%d.sock", xdg, phys);
        else n = snprintf(out, cap, "/tmp/flexnpu-%u/npu%d.sock", (unsigned)geteuid(), phys);
        struct stat st;
        char sys[128];
        snprintf(sys, sizeof sys, "/run/flexnpu/npu%d.sock", phys);
        if (n > 0 && (size_t)n < cap && stat(out, &st) != 0 && stat(sys, &st) == 0)
            n = snprintf(out, cap, "%s", sys);
    }
    return (n > 0 && (size_t)n < cap) ? 0 : -1;
}

static int64_t env_bytes(const char *name, int64_t dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end;
    double x = strtod(v, &end);
    while (*end == ' ') end++;
    int64_t mul = 1;
    switch (*end | 0x20) {
    case 'k': mul = end[1] == 'i' || end[1] == 'I' ? 1ll << 10 : 1000; break;
    case 'm': mul = end[1] == 'i' || end[1] == 'I' ? 1ll << 20 : 1000000; break;
    case 'g': mul = end[1] == 'i' || end[1] == 'I' ? 1ll << 30 : 1000000000; break;
    case 't': mul = end[1] == 'i' || end[1] == 'I' ? 1ll << 40 : 1000000000000ll; break;
    default: break;
    }
    return x > 0 ? (int64_t)(x * (double)mul) : dflt;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, char *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

aclError fx_attach(struct fx_dev *d) {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char err[256];
    if (fx_socket_path(d->phys, path, sizeof path))
        return fx_err(ACL_ERROR_RT_NO_DEVICE, "socket path of device %d too long", d->phys);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return fx_err(ACL_ERROR_RT_INTERNAL_ERROR, "socket: %s", strerror(errno));
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(s);
        return fx_err(ACL_ERROR_RT_NO_DEVICE, "no FlexNPU daemon serves device %d (nothing listening at %s: %s); "
                      "run the program under `flexnpu run`", d->phys, path, strerror(e));
    }
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0 || (cred.uid != 0 && cred.uid != getuid())) {
        close(s);
        return fx_err(ACL_ERROR_RT_NO_PERMISSION, "the process at %s (uid %d) is not a daemon of root or of "
                      "this user; not handing it this process's memory", path, (int)cred.uid);
    }
    struct timeval tv = {.tv_sec = 30};   /* the handshake never hangs the program */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    uint64_t arena = (uint64_t)env_bytes("FLEXNPU_NATIVE_ARENA", 1ll << 30);
    if (arena > (4ull << 30) - (1u << 20)) arena = (4ull << 30) - (1u << 20);   /* payload offsets are u32 */
    fx_seg *seg = fx_seg_create(4096, 256, FXP_SQE_SIZE, FXP_CQE_SIZE, arena, err);
    if (!seg) {
        close(s);
        return fx_err(ACL_ERROR_RT_INTERNAL_ERROR, "cannot create the shared segment: %s", err);
    }
    int64_t mbox = fx_arena_alloc(seg, FX_MAILBOX, 64);
    int64_t limit = env_bytes("FLEXNPU_CLIENT_MEMORY_LIMIT", -1);
    const char *phase = getenv("FLEXNPU_PHASE");
    if (!phase || (strcmp(phase, "prefill") && strcmp(phase, "decode"))) phase = "auto";
    char body[512], lim[32];
    if (limit > 0) snprintf(lim, sizeof lim, "%lld", (long long)limit);
    else strcpy(lim, "null");
    int blen = snprintf(body + 4, sizeof body - 4,
                        "{\"op\":\"attach\",\"layout_version\":%d,\"mailbox\":[%lld,%u],\"phase\":\"%s\","
                        "\"memory_limit\":%s,\"front\":\"native\"}",
                        FXP_LAYOUT_VERSION, (long long)mbox, FX_MAILBOX, phase, lim);
    uint32_t len32 = (uint32_t)blen;
    memcpy(body, &len32, 4);
    int fd = fx_seg_fd(seg);
    struct iovec iov = {.iov_base = body, .iov_len = 4 + (size_t)blen};
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    ssize_t sent;
    do sent = sendmsg(s, &mh, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    uint32_t rlen = 0;
    char *reply = NULL;
    aclError rc = ACL_SUCCESS;
    if (sent <= 0 || (sent < 4 + blen && write_all(s, body + sent, (size_t)(4 + blen - sent))))
        rc = fx_err(ACL_ERROR_RT_NO_DEVICE, "attach to the daemon at %s failed: %s", path, strerror(errno));
    else if (read_all(s, (char *)&rlen, 4) || rlen > (1u << 20) || !(reply = calloc(1, rlen + 1)) ||
             read_all(s, reply, rlen))
        rc = fx_err(ACL_ERROR_RT_NO_DEVICE, "the daemon at %s did not answer the attach request", path);
    else if (!json_true(reply, "ok")) {
        char why[256];
        json_str(reply, "error", why, sizeof why);
        rc = fx_err(ACL_ERROR_RT_NO_DEVICE, "the daemon at %s refused to attach this process: %s", path,
                    why[0] ? why : "no reason given");
    }
    if (rc) {
        free(reply);
        fx_seg_close(seg);
        close(s);
        return rc;
    }
    int64_t v;
    d->daemon_pid = fx_json_int(reply, "daemon_pid", &v) == 0 ? (int)v : -1;
    d->memory_limit = fx_json_int(reply, "memory_limit", &v) == 0 ? v : -1;
    free(reply);
    tv.tv_sec = 0;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    fx_seg_set_peer(seg, s, d->daemon_pid > 0 ? d->daemon_pid : -1);
    fx_seg_set_spin_ns(seg, 30000);
    d->seg = seg;
    d->sock = s;
    d->arena = fx_seg_base(seg) + fx_seg_arena_off(seg);
    d->arena_size = fx_seg_arena_size(seg);
    d->mbox_off = (uint64_t)mbox;
    d->next_ud = 1;
    d->next_handle = 1;
    d->next_stream = 1;
    d->next_event = 1;
    d->pushed = 0;
    d->stg_head = d->stg_n = 0;
    atomic_store(&d->state, 1);
    return ACL_SUCCESS;
}

void fx_detach(struct fx_dev *d) {
    /* caller holds d->lock */
    atomic_store(&d->state, 0);
    fx_mem_forget_device(d->index);
    fx_graph_forget_device(d->index);
    if (d->seg) fx_seg_close(d->seg);
    if (d->sock >= 0) close(d->sock);
    d->seg = NULL;
    d->sock = -1;
    d->arena = NULL;
    fx_idset_clear(&d->streams);
    fx_idset_clear(&d->events);
    free(d->stg);
    d->stg = NULL;
    d->stg_cap = d->stg_n = d->stg_head = 0;
}

static aclError lost(struct fx_dev *d, int rc) {
    atomic_store(&d->state, 2);
    return fx_err(ACL_ERROR_RT_LOST_HEARTBEAT, "the FlexNPU daemon for device %d (pid %d) %s; the device state "
                  "of this process is gone", d->phys, d->daemon_pid,
                  rc == FX_ECLOSED ? "stopped" : rc == FX_ECORRUPT ? "corrupted the rings" : "died");
}

struct fx_dev *fx_dev_get(int index, aclError *rc) {
    ensure_global();
    if (!fx_initialized()) { *rc = fx_err(ACL_ERROR_UNINITIALIZE, "aclInit has not been called"); return NULL; }
    if (index < 0 || index >= fx_ndev) {
        *rc = fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist (%d device(s))", index, fx_ndev);
        return NULL;
    }
    struct fx_dev *d = &fx_devs[index];
    int st = atomic_load(&d->state);
    if (st == 1) return d;
    if (st == 2) { *rc = lost(d, FX_EPEERDEAD); return NULL; }
    *rc = fx_err(ACL_ERROR_RT_CONTEXT_NULL, "device %d is not set (call aclrtSetDevice first)", index);
    return NULL;
}

struct fx_dev *fx_cur(aclError *rc) {
    ensure_global();
    if (!fx_initialized()) { *rc = fx_err(ACL_ERROR_UNINITIALIZE, "aclInit has not been called"); return NULL; }
    if (t_dev < 0) { *rc = fx_err(ACL_ERROR_RT_CONTEXT_NULL, "no device set in this thread (call aclrtSetDevice)"); return NULL; }
    return fx_dev_get(t_dev, rc);
}

/* ------------------------------------------------------------------ transport */
aclError fx_push_locked(struct fx_dev *d, struct fx_sqe *e) {
    if (atomic_load(&d->state) != 1) return d->state == 2 ? lost(d, FX_EPEERDEAD)
                                             : fx_err(ACL_ERROR_RT_CONTEXT_NULL, "device %d was reset", d->index);
    fx_ring *sq = fx_seg_sq(d->seg);
    int rc = fx_push(sq, (const char *)e, FXP_SQE_SIZE);
    while (rc == 0 || rc == FX_EINTR) {
        rc = fx_push_wait(sq, (const char *)e, FXP_SQE_SIZE, -1.0);
        if (rc == FX_READY) rc = 1;
    }
    if (rc < 0) return lost(d, rc);
    d->pushed++;
    return ACL_SUCCESS;
}

aclError fxn_push(struct fx_dev *d, struct fx_sqe *e) {
    pthread_mutex_lock(&d->lock);
    aclError rc = fx_push_locked(d, e);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

static void release_staged_all(struct fx_dev *d) {
    for (size_t i = 0; i < d->stg_n; i++)
        fx_arena_free(d->seg, d->stg[(d->stg_head + i) % d->stg_cap].off);
    d->stg_head = d->stg_n = 0;
}

aclError fx_call_locked(struct fx_dev *d, struct fx_sqe *e, struct fx_cqe *out, char *msg, size_t msglen,
                        const char *what) {
    e->flags |= FXP_FLAG_SYNC;
    e->user_data = d->next_ud++;
    aclError rc = fx_push_locked(d, e);
    if (rc) return rc;
    fx_ring *cq = fx_seg_cq(d->seg);
    for (;;) {
        int r = fx_pop(cq, (char *)out);
        if (r == 1) break;
        if (r < 0) return lost(d, r);
        r = fx_wait(cq, -1.0);
        if (r < 0 && r != FX_EINTR) return lost(d, r);
    }
    if (out->user_data != e->user_data) {
        atomic_store(&d->state, 2);
        return fx_err(ACL_ERROR_RT_INTERNAL_ERROR, "protocol error: reply %llu for request %llu",
                      (unsigned long long)out->user_data, (unsigned long long)e->user_data);
    }
    release_staged_all(d);   /* everything pushed before this request has been copied out */
    uint32_t n = out->msg_len < FX_MAILBOX ? out->msg_len : FX_MAILBOX;
    if (msg && msglen) {
        size_t m = n < msglen - 1 ? n : msglen - 1;
        memcpy(msg, d->arena + d->mbox_off, m);
        msg[m] = 0;
    }
    if (out->status) {
        char text[512];
        size_t m = n < sizeof text - 1 ? n : sizeof text - 1;
        memcpy(text, d->arena + d->mbox_off, m);
        text[m] = 0;
        return fx_from_wire(out->status, text, what);
    }
    return ACL_SUCCESS;
}

aclError fxn_call(struct fx_dev *d, struct fx_sqe *e, struct fx_cqe *out, char *msg, size_t msglen,
                 const char *what) {
    pthread_mutex_lock(&d->lock);
    aclError rc = fx_call_locked(d, e, out, msg, msglen, what);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

void fx_reclaim_locked(struct fx_dev *d) {
    int64_t pending = fx_ring_pending(fx_seg_sq(d->seg));
    if (pending < 0) return;
    uint64_t consumed = d->pushed - (uint64_t)pending;
    while (d->stg_n) {
        struct fx_staged *s = &d->stg[d->stg_head];
        if (s->seq + 2 * FXP_MAX_DRAIN_BATCH >= consumed) break;
        fx_arena_free(d->seg, s->off);
        d->stg_head = (d->stg_head + 1) % d->stg_cap;
        d->stg_n--;
    }
}

int64_t fx_stage_locked(struct fx_dev *d, const void *src, uint64_t n) {
    /* Host data of an asynchronous copy from pageable memory: copied into the arena now, copied
     * out by the daemon when it drains the request; the space is reused once the daemon is
     * MAX_DRAIN_BATCH records past it (or after any synchronous reply). */
    fx_reclaim_locked(d);
    int64_t off = fx_arena_alloc(d->seg, n ? n : 1, 64);
    if (off < 0) {
        struct fx_sqe e = {.opcode = FXOP_NOP};
        struct fx_cqe c;
        if (fx_call_locked(d, &e, &c, NULL, 0, "staging barrier")) return -1;
        off = fx_arena_alloc(d->seg, n ? n : 1, 64);
        if (off < 0) return -1;
    }
    if (d->stg_n == d->stg_cap) {
        size_t cap = d->stg_cap ? d->stg_cap * 2 : 256;
        struct fx_staged *a = malloc(cap * sizeof *a);
        if (!a) { fx_arena_free(d->seg, (uint64_t)off); return -1; }
        for (size_t i = 0; i < d->stg_n; i++) a[i] = d->stg[(d->stg_head + i) % d->stg_cap];
        free(d->stg);
        d->stg = a;
        d->stg_cap = cap;
        d->stg_head = 0;
    }
    d->stg[(d->stg_head + d->stg_n) % d->stg_cap] = (struct fx_staged){d->pushed, (uint64_t)off};
    d->stg_n++;
    memcpy(d->arena + off, src, n);
    return off;
}

/* ------------------------------------------------------------------ init, devices, contexts */
FX_API aclError aclInit(const char *configPath) {
    (void)configPath;
    ensure_global();
    int expected = 0;
    if (!atomic_compare_exchange_strong(&g_init, &expected, 1))
        return fx_err(ACL_ERROR_REPEAT_INITIALIZE, "aclInit was already called");
    return ACL_SUCCESS;
}

FX_API aclError aclFinalize(void) {
    ensure_global();
    int expected = 1;
    if (!atomic_compare_exchange_strong(&g_init, &expected, 0))
        return fx_err(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize without aclInit");
    return ACL_SUCCESS;
}

FX_API aclError aclFinalizeReference(uint64_t *refCount) {
    if (refCount) *refCount = 0;
    return aclFinalize();
}

FX_API aclError aclrtGetDeviceCount(uint32_t *count) {
    ensure_global();
    if (!count) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: count is NULL");
    *count = (uint32_t)fx_ndev;
    return ACL_SUCCESS;
}

FX_API aclError aclrtSetDevice(int32_t deviceId) {
    ensure_global();
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "aclrtSetDevice before aclInit");
    if (deviceId < 0 || deviceId >= fx_ndev)
        return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist (%d device(s))", deviceId, fx_ndev);
    struct fx_dev *d = &fx_devs[deviceId];
    aclError rc = ACL_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&d->state) != 1) {
        pthread_mutex_lock(&d->lock);
        if (atomic_load(&d->state) == 2) fx_detach(d);
        rc = fx_attach(d);
        pthread_mutex_unlock(&d->lock);
    }
    if (!rc) atomic_fetch_add(&d->refs, 1);
    pthread_mutex_unlock(&g_lock);
    if (!rc) t_dev = deviceId;
    return rc;
}

FX_API aclError aclrtResetDevice(int32_t deviceId) {
    ensure_global();
    if (!fx_initialized()) return fx_err(ACL_ERROR_UNINITIALIZE, "aclrtResetDevice before aclInit");
    if (deviceId < 0 || deviceId >= fx_ndev)
        return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist", deviceId);
    struct fx_dev *d = &fx_devs[deviceId];
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&d->refs) > 0 && atomic_fetch_sub(&d->refs, 1) == 1) {
        /* last reference: the daemon reclaims everything this process held on the device */
        pthread_mutex_lock(&d->lock);
        fx_detach(d);
        pthread_mutex_unlock(&d->lock);
    }
    pthread_mutex_unlock(&g_lock);
    if (t_dev == deviceId && atomic_load(&d->state) != 1) t_dev = -1;
    return ACL_SUCCESS;
}

FX_API aclError aclrtResetDeviceForce(int32_t deviceId) {
    ensure_global();
    if (deviceId < 0 || deviceId >= fx_ndev)
        return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist", deviceId);
    atomic_store(&fx_devs[deviceId].refs, 1);
    return aclrtResetDevice(deviceId);
}

FX_API aclError aclrtGetDevice(int32_t *deviceId) {
    ensure_global();
    if (!deviceId) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: deviceId is NULL");
    if (t_dev < 0 || atomic_load(&fx_devs[t_dev].state) == 0)
        return fx_err(ACL_ERROR_RT_CONTEXT_NULL, "no device set in this thread");
    *deviceId = t_dev;
    return ACL_SUCCESS;
}

FX_API aclError aclrtCreateContext(aclrtContext *context, int32_t deviceId) {
    if (!context) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtCreateContext: context is NULL");
    aclError rc = aclrtSetDevice(deviceId);
    if (rc) return rc;
    *context = FX_HANDLE(FX_TAG_CTX, deviceId, 1);
    return ACL_SUCCESS;
}

static int ctx_dev(aclrtContext c) {
    uint64_t v = (uint64_t)(uintptr_t)c;
    if ((v >> 60) != FX_TAG_CTX) return -1;
    int dev = (int)((v >> 32) & 0xFFFFFFF);
    return dev < fx_ndev ? dev : -1;
}

FX_API aclError aclrtDestroyContext(aclrtContext context) {
    ensure_global();
    if (ctx_dev(context) < 0) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtDestroyContext: unknown context");
    return ACL_SUCCESS;
}

FX_API aclError aclrtSetCurrentContext(aclrtContext context) {
    ensure_global();
    int dev = ctx_dev(context);
    if (dev < 0) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtSetCurrentContext: unknown context");
    if (atomic_load(&fx_devs[dev].state) != 1) return aclrtSetDevice(dev);
    t_dev = dev;
    return ACL_SUCCESS;
}

FX_API aclError aclrtGetCurrentContext(aclrtContext *context) {
    ensure_global();
    if (!context) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetCurrentContext: context is NULL");
    if (t_dev < 0 || atomic_load(&fx_devs[t_dev].state) == 0)
        return fx_err(ACL_ERROR_RT_CONTEXT_NULL, "no context in this thread");
    *context = FX_HANDLE(FX_TAG_CTX, t_dev, 1);
    return ACL_SUCCESS;
}

FX_API aclError aclrtSynchronizeDevice(void) {
    aclError rc;
    struct fx_dev *d = fx_cur(&rc);
    if (!d) return rc;
    struct fx_sqe e = {.opcode = FXOP_DEVICE_SYNC};
    struct fx_cqe c;
    return fxn_call(d, &e, &c, NULL, 0, "aclrtSynchronizeDevice");
}

FX_API aclError aclrtSynchronizeDeviceWithTimeout(int32_t timeout) {
    (void)timeout;   /* the daemon never leaves a synchronisation pending forever */
    return aclrtSynchronizeDevice();
}

FX_API aclError aclrtDeviceCanAccessPeer(int32_t *canAccessPeer, int32_t deviceId, int32_t peerDeviceId) {
    ensure_global();
    if (!canAccessPeer) return fx_err(ACL_ERROR_INVALID_PARAM, "canAccessPeer is NULL");
    if (deviceId < 0 || deviceId >= fx_ndev || peerDeviceId < 0 || peerDeviceId >= fx_ndev)
        return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "no such device");
    *canAccessPeer = 0;   /* copies between devices are not supported yet */
    return ACL_SUCCESS;
}

FX_API aclError aclrtDeviceEnablePeerAccess(int32_t peerDeviceId, uint32_t flags) {
    (void)flags;
    return fx_err(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "peer access to device %d is not supported", peerDeviceId);
}
