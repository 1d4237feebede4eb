/* FlexNPU native front end: queries and settings with a fixed or no-op answer.
 *
 * What the device reports: SoC FLEXNPU_NATIVE_SOC (default Ascend910B1, which makes torch_npu
 * launch operators through aclnn), CANN version FLEXNPU_NATIVE_CANN_VERSION (default 8.5.0).
 * Settings that only tune a real chip (saturation mode, operator timeouts, system parameters,
 * compile options) are validated and remembered, which is all a program can observe of them.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fx_native.h"

static const char *soc(void) {
    const char *s = getenv("FLEXNPU_NATIVE_SOC");
    return s && *s ? s : "Ascend910B1";
}

static const char *cann_version(void) {
    const char *s = getenv("FLEXNPU_NATIVE_CANN_VERSION");
    return s && *s ? s : "8.5.0";
}

FX_API const char *aclrtGetSocName(void) { return soc(); }

FX_API aclError aclrtGetVersion(int32_t *majorVersion, int32_t *minorVersion, int32_t *patchVersion) {
    if (!majorVersion || !minorVersion || !patchVersion) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetVersion: NULL output");
    *majorVersion = 1;
    *minorVersion = 0;
    *patchVersion = 0;
    return ACL_SUCCESS;
}

struct pkg_version { char version[128], major[64], minor[64], release[64], patch[64], reserved[128]; };

FX_API aclError aclsysGetCANNVersion(int name, struct pkg_version *v) {
    (void)name;
    if (!v) return fx_err(ACL_ERROR_INVALID_PARAM, "aclsysGetCANNVersion: version is NULL");
    memset(v, 0, sizeof *v);
    snprintf(v->version, sizeof v->version, "%s", cann_version());
    int a = 0, b = 0, c = 0;
    sscanf(cann_version(), "%d.%d.%d", &a, &b, &c);
    snprintf(v->major, sizeof v->major, "%d", a);
    snprintf(v->minor, sizeof v->minor, "%d", b);
    snprintf(v->release, sizeof v->release, "%d", c);
    return ACL_SUCCESS;
}

FX_API aclError aclsysGetVersionStr(char *pkgName, char *versionStr) {
    (void)pkgName;
    if (!versionStr) return fx_err(ACL_ERROR_INVALID_PARAM, "aclsysGetVersionStr: versionStr is NULL");
    snprintf(versionStr, 128, "%s", cann_version());
    return ACL_SUCCESS;
}

FX_API aclError aclsysGetVersionNum(char *pkgName, int32_t *versionNum) {
    (void)pkgName;
    if (!versionNum) return fx_err(ACL_ERROR_INVALID_PARAM, "aclsysGetVersionNum: versionNum is NULL");
    int a = 0, b = 0, c = 0;
    sscanf(cann_version(), "%d.%d.%d", &a, &b, &c);
    *versionNum = a * 10000000 + b * 100000 + c * 1000;
    return ACL_SUCCESS;
}

FX_API aclError aclGetCannAttribute(int attr, int32_t *value) {
    if (!value) return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetCannAttribute: value is NULL");
    /* INF_NAN mode and BF16 supported, JIT compile not needed */
    *value = attr == 0 || attr == 1 ? 1 : 0;
    return ACL_SUCCESS;
}

FX_API aclError aclGetCannAttributeList(const int **list, size_t *num) {
    static const int attrs[] = {0, 1};
    if (!list || !num) return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetCannAttributeList: NULL output");
    *list = attrs;
    *num = 2;
    return ACL_SUCCESS;
}

FX_API aclError aclGetDeviceCapability(uint32_t deviceId, int info, int64_t *value) {
    if (!value) return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetDeviceCapability: value is NULL");
    if ((int)deviceId >= fx_ndev && fx_ndev >= 0) return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "no device %u", deviceId);
    switch (info) {
    case 0: *value = 24; return ACL_SUCCESS;             /* AI cores (910B1) */
    case 1: *value = 48; return ACL_SUCCESS;             /* vector cores */
    case 2: *value = 192ll << 20; return ACL_SUCCESS;    /* L2 bytes */
    default: return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetDeviceCapability: unknown item %d", info);
    }
}

FX_API aclError aclrtGetDeviceInfo(uint32_t deviceId, int attr, int64_t *value) {
    if (!value) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceInfo: value is NULL");
    if ((int)deviceId >= fx_ndev && fx_ndev >= 0) return fx_err(ACL_ERROR_RT_INVALID_DEVICEID, "no device %u", deviceId);
    switch (attr) {
    case 1: *value = 6; return ACL_SUCCESS;              /* AI CPUs */
    case 101: case 102: *value = 24; return ACL_SUCCESS; /* AI / cube cores */
    case 201: *value = 48; return ACL_SUCCESS;           /* vector cores */
    default: return fx_err(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "aclrtGetDeviceInfo: attribute %d not reported", attr);
    }
}

FX_API aclError aclrtGetRunMode(int *runMode) {
    if (!runMode) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetRunMode: runMode is NULL");
    *runMode = 1;   /* ACL_HOST: the program runs on the host, the device is remote */
    return ACL_SUCCESS;
}

FX_API aclError aclrtDeviceGetBareTgid(int32_t *pid) {
    if (!pid) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtDeviceGetBareTgid: pid is NULL");
    *pid = (int32_t)getpid();   /* the pid the daemon's IPC allow-lists name */
    return ACL_SUCCESS;
}

/* ---- compile options: remembered per option, read back as set */
#define NOPTS 64
static char *opts[NOPTS];
static pthread_mutex_t opt_lock = PTHREAD_MUTEX_INITIALIZER;

FX_API aclError aclSetCompileopt(int opt, const char *value) {
    if (opt < 0 || opt >= NOPTS || !value) return fx_err(ACL_ERROR_INVALID_PARAM, "aclSetCompileopt: bad option %d", opt);
    char *v = strdup(value);
    if (!v) return fx_err(ACL_ERROR_BAD_ALLOC, "out of memory");
    pthread_mutex_lock(&opt_lock);
    free(opts[opt]);
    opts[opt] = v;
    pthread_mutex_unlock(&opt_lock);
    return ACL_SUCCESS;
}

FX_API size_t aclGetCompileoptSize(int opt) {
    (void)opt;
    return 256;   /* torch_npu refuses a size of 0 */
}

FX_API aclError aclGetCompileopt(int opt, char *value, size_t length) {
    if (opt < 0 || opt >= NOPTS || !value || !length) return fx_err(ACL_ERROR_INVALID_PARAM, "aclGetCompileopt: bad argument");
    pthread_mutex_lock(&opt_lock);
    snprintf(value, length, "%s", opts[opt] ? opts[opt] : "");
    pthread_mutex_unlock(&opt_lock);
    return ACL_SUCCESS;
}

/* ---- system parameters and timeouts */
static int64_t sysparams[16];

FX_API aclError aclrtSetSysParamOpt(int opt, int64_t value) {
    if (opt < 0 || opt >= 16) return fx_err(ACL_ERROR_INVALID_PARAM, "unknown system parameter %d", opt);
    __atomic_store_n(&sysparams[opt], value, __ATOMIC_RELAXED);
    return ACL_SUCCESS;
}
FX_API aclError aclrtCtxSetSysParamOpt(int opt, int64_t value) { return aclrtSetSysParamOpt(opt, value); }
FX_API aclError aclrtGetSysParamOpt(int opt, int64_t *value) {
    if (opt < 0 || opt >= 16 || !value) return fx_err(ACL_ERROR_INVALID_PARAM, "unknown system parameter %d", opt);
    *value = __atomic_load_n(&sysparams[opt], __ATOMIC_RELAXED);
    return ACL_SUCCESS;
}
FX_API aclError aclrtCtxGetSysParamOpt(int opt, int64_t *value) { return aclrtGetSysParamOpt(opt, value); }

static int sat_mode;
FX_API aclError aclrtSetDeviceSatMode(int mode) {
    if (mode < 0 || mode > 1) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtSetDeviceSatMode: mode %d", mode);
    __atomic_store_n(&sat_mode, mode, __ATOMIC_RELAXED);
    return ACL_SUCCESS;
}
FX_API aclError aclrtGetDeviceSatMode(int *mode) {
    if (!mode) return fx_err(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceSatMode: mode is NULL");
    *mode = __atomic_load_n(&sat_mode, __ATOMIC_RELAXED);
    return ACL_SUCCESS;
}

FX_API aclError aclrtSetOpExecuteTimeOut(uint32_t timeout) { (void)timeout; return ACL_SUCCESS; }
FX_API aclError aclrtSetOpExecuteTimeOutWithMs(uint32_t timeout) { (void)timeout; return ACL_SUCCESS; }
FX_API aclError aclrtSetOpExecuteTimeOutV2(uint64_t timeout, uint64_t *actualTimeout) {
    if (actualTimeout) *actualTimeout = timeout;
    return ACL_SUCCESS;
}
FX_API aclError aclrtSetOpWaitTimeout(uint32_t timeout) { (void)timeout; return ACL_SUCCESS; }

/* no callbacks are ever queued, so there is nothing to report */
FX_API aclError aclrtProcessReport(int32_t timeout) { (void)timeout; return ACL_SUCCESS; }
