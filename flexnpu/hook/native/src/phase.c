/* FlexNPU native front end: scheduling hints from native programs.
 *
 * `flexnpu run --phase prefill|decode` reaches a native program through FLEXNPU_PHASE, which the
 * attach message carries (core.c), so an unmodified program is scheduled as declared. Engines
 * that mix phases, or that want the flex policy's time-per-token clock, call these two
 * functions (not AscendCL: FlexNPU's own, exported from libascendcl.so, callable from C or
 * through ctypes; docs/native.md). They are the native twins of Client.set_phase and
 * Client.mark_step, and like them asynchronous: one ring push each.
 */
#define _GNU_SOURCE
#include <string.h>

#include "fx_native.h"

extern aclError fx_stream_dev_pub(aclrtStream s, struct fx_dev **d, uint32_t *sid);

/* phase: "auto", "prefill" or "decode" (flexnpu.protocol.PHASES, in that order). stream: the
 * stream the hint is for; NULL: the whole process on the calling thread's device (every stream,
 * and the streams it creates later). */
FX_API aclError flexnpuSetPhase(const char *phase, aclrtStream stream) {
    static const char *const names[] = {"auto", "prefill", "decode"};
    aclError rc;
    struct fx_dev *d;
    uint32_t sid = 0, code = 3;
    if (!phase) return fx_err(ACL_ERROR_INVALID_PARAM, "flexnpuSetPhase: phase is NULL");
    for (uint32_t i = 0; i < 3; i++)
        if (strcmp(phase, names[i]) == 0) code = i;
    if (code == 3)
        return fx_err(ACL_ERROR_INVALID_PARAM, "flexnpuSetPhase: phase must be auto, prefill or decode, not \"%.64s\"",
                      phase);
    if (stream) {
        if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    } else if (!(d = fx_cur(&rc))) {
        return rc;
    }
    struct fx_sqe e = {.opcode = FXOP_SET_PHASE, .a = {code, sid}};
    return fxn_push(d, &e);
}

/* One engine iteration (one output token) ends here on `stream` (NULL: the default stream): the
 * flex policy times decode iterations between marks. Not a barrier; ignored while the stream
 * is being captured (a graph replays kernels, not iteration boundaries: mark after the replay). */
FX_API aclError flexnpuMarkStep(aclrtStream stream) {
    aclError rc;
    struct fx_dev *d;
    uint32_t sid;
    if ((rc = fx_stream_dev_pub(stream, &d, &sid))) return rc;
    struct fx_sqe e = {.opcode = FXOP_STEP_MARK, .stream = sid};
    return fxn_push(d, &e);
}
