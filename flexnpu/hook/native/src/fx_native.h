/* FlexNPU native front end: internal declarations shared by the C sources.
 *
 * The AscendCL types are declared here with the same ABI as the CANN headers the real torch_npu
 * wheel ships (torch_npu/include/acl/ *.h): handles are pointers, enums are int-sized, aclError is
 * int. tests/native/ compiles a program against those headers and links it to this library,
 * which is what proves the declarations match.
 */
#ifndef FX_NATIVE_H
#define FX_NATIVE_H
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "fx_proto.h"
#include "ring.h"

#define FX_API __attribute__((visibility("default")))

typedef int aclError;
typedef void *aclrtStream;
typedef void *aclrtEvent;
typedef void *aclrtContext;
typedef void *aclrtDrvMemHandle;

/* Return codes, as acl_base_rt.h and error_codes/rt_error_codes.h define them. */
#define ACL_SUCCESS 0
#define ACL_ERROR_INVALID_PARAM 100000
#define ACL_ERROR_UNINITIALIZE 100001
#define ACL_ERROR_REPEAT_INITIALIZE 100002
#define ACL_ERROR_REPEAT_FINALIZE 100037
#define ACL_ERROR_BAD_ALLOC 200000
#define ACL_ERROR_API_NOT_SUPPORT 200001
#define ACL_ERROR_INVALID_DEVICE 200002
#define ACL_ERROR_INVALID_RESOURCE_HANDLE 200005
#define ACL_ERROR_FEATURE_UNSUPPORTED 200006
#define ACL_ERROR_INTERNAL_ERROR 500000
#define ACL_ERROR_FAILURE 500001
#define ACL_ERROR_RT_PARAM_INVALID 107000
#define ACL_ERROR_RT_INVALID_DEVICEID 107001
#define ACL_ERROR_RT_CONTEXT_NULL 107002
#define ACL_ERROR_RT_STREAM_CONTEXT 107003
#define ACL_ERROR_RT_INVALID_HANDLE 107017
#define ACL_ERROR_RT_FEATURE_NOT_SUPPORT 207000
#define ACL_ERROR_RT_MEMORY_ALLOCATION 207001
#define ACL_ERROR_RT_MEMORY_FREE 207002
#define ACL_ERROR_RT_NO_DEVICE 207004
#define ACL_ERROR_RT_NO_PERMISSION 207006
#define ACL_ERROR_RT_NO_STREAM_RESOURCE 207008
#define ACL_ERROR_RT_INTERNAL_ERROR 507000
#define ACL_ERROR_RT_LOST_HEARTBEAT 507010
#define ACL_ERROR_RT_AICORE_EXCEPTION 507015
#define ACL_ERROR_RT_IPC_ERROR 507022

enum { FX_MEMCPY_H2H = 0, FX_MEMCPY_H2D = 1, FX_MEMCPY_D2H = 2, FX_MEMCPY_D2D = 3,
       FX_MEMCPY_DEFAULT = 4 };

#define FX_MAX_DEVICES 64
#define FX_MAILBOX (64u << 10)

/* Opaque handles handed to the application: tagged integers, never pointers into our memory,
 * so a destroyed or forged handle is recognised (and refused) instead of dereferenced. */
#define FX_TAG_STREAM 0x5ull
#define FX_TAG_EVENT 0x6ull
#define FX_TAG_CTX 0x7ull
#define FX_HANDLE(tag, dev, id) ((void *)(uintptr_t)(((tag) << 60) | ((uint64_t)(dev) << 32) | (uint64_t)(id)))

/* A set of u32 ids (open addressing; 0 is never an id). Caller locks. */
struct fx_idset { uint32_t *slot; uint32_t cap, n, tomb; };
int fx_idset_add(struct fx_idset *s, uint32_t id);     /* 0 ok, -1 no memory */
int fx_idset_has(const struct fx_idset *s, uint32_t id);
int fx_idset_del(struct fx_idset *s, uint32_t id);     /* 1 removed, 0 absent */
void fx_idset_clear(struct fx_idset *s);

struct fx_staged { uint64_t seq, off; };

/* One attachment of this process to one device's daemon. */
struct fx_dev {
    pthread_mutex_t lock;          /* submission order on the SQ, the arena allocator, tables */
    int index, phys;
    _Atomic int state;             /* 0 detached, 1 attached, 2 daemon lost */
    _Atomic int refs;              /* aclrtSetDevice count (aclrtResetDevice detaches at 0) */
    fx_seg *seg;
    int sock;
    uint8_t *arena;
    uint64_t arena_size, mbox_off;
    uint64_t next_ud, next_handle, pushed;
    uint32_t next_stream, next_event;
    struct fx_idset streams, events;
    struct fx_staged *stg; size_t stg_head, stg_n, stg_cap;
    int64_t memory_limit;          /* bytes, -1 none */
    int daemon_pid;
};

extern struct fx_dev fx_devs[FX_MAX_DEVICES];
extern int fx_ndev;

/* core.c */
int fx_initialized(void);
aclError fx_err(aclError code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
aclError fx_from_wire(int status, const char *msg, const char *what);
void fx_unsupported(const char *name, _Atomic int *once, int is_error);
int fx_verbose(void);
/* the calling thread's device (attached), or NULL with *rc set */
struct fx_dev *fx_cur(aclError *rc);
struct fx_dev *fx_dev_get(int index, aclError *rc);   /* attached device by logical index */
aclError fx_attach(struct fx_dev *d);
void fx_detach(struct fx_dev *d);
/* transport: caller holds d->lock */
aclError fx_push_locked(struct fx_dev *d, struct fx_sqe *e);
aclError fx_call_locked(struct fx_dev *d, struct fx_sqe *e, struct fx_cqe *out, char *msg, size_t msglen,
                        const char *what);
aclError fxn_call(struct fx_dev *d, struct fx_sqe *e, struct fx_cqe *out, char *msg, size_t msglen,
                 const char *what);
aclError fxn_push(struct fx_dev *d, struct fx_sqe *e);
int64_t fx_stage_locked(struct fx_dev *d, const void *src, uint64_t n);   /* arena offset or -1 */
void fx_reclaim_locked(struct fx_dev *d);
int fx_json_int(const char *json, const char *key, int64_t *out);        /* top-level key */
void fx_err_restore(const char *full);   /* put back a message taken with aclGetRecentErrMsg */
const char *aclGetRecentErrMsg(void);

/* stream.c */
aclError fx_stream_id(struct fx_dev *d, aclrtStream s, uint32_t *sid);   /* NULL = default stream */

/* graph.c */
void fx_graph_forget_device(int dev);
void fx_graph_after_fork(void);
void fx_aclop_after_fork(void);   /* aclop.c */
uint32_t fx_graph_capturing(int dev, uint32_t sid);   /* graph id the stream captures into, 0 none */

/* mem.c */
void fx_mem_forget_device(int dev);
void fx_mem_after_fork(void);
aclError fx_mem_lookup(const void *addr, struct fx_dev **d, uint64_t *handle, uint64_t *off, uint64_t *avail,
                       const char *what);
aclError fx_dev_addr(const void *p, uint64_t n, struct fx_dev **d, uint64_t *handle, uint64_t *off, const char *what);
aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid);
#endif
