"""AscendCL enum values and error codes, as pyACL programs pass and receive them.

Values follow CANN's public headers (include/external/acl/acl_base_rt.h, acl_rt.h and
error_codes/rt_error_codes.h in the CANN runtime repository); docs/acl.md cites them.
pyACL itself exports no constants: programs define their own (e.g. a sample's
``constant.py``), so these live here for FlexNPU's code, tests and examples.
"""

from __future__ import annotations

# --- aclError (acl_base_rt.h) -------------------------------------------------------------
ACL_SUCCESS = 0
ACL_ERROR_NONE = 0
ACL_ERROR_INVALID_PARAM = 100000
ACL_ERROR_UNINITIALIZE = 100001
ACL_ERROR_REPEAT_INITIALIZE = 100002
ACL_ERROR_INVALID_FILE = 100003
ACL_ERROR_INVALID_MODEL_ID = 100011
ACL_ERROR_OP_TYPE_NOT_MATCH = 100020
ACL_ERROR_OP_INPUT_NOT_MATCH = 100021
ACL_ERROR_OP_OUTPUT_NOT_MATCH = 100022
ACL_ERROR_OP_ATTR_NOT_MATCH = 100023
ACL_ERROR_OP_NOT_FOUND = 100024
ACL_ERROR_UNSUPPORTED_DATA_TYPE = 100026
ACL_ERROR_FORMAT_NOT_MATCH = 100027
ACL_ERROR_REPEAT_FINALIZE = 100037
ACL_ERROR_BAD_ALLOC = 200000
ACL_ERROR_API_NOT_SUPPORT = 200001
ACL_ERROR_INVALID_DEVICE = 200002
ACL_ERROR_MEMORY_ADDRESS_UNALIGNED = 200003
ACL_ERROR_RESOURCE_NOT_MATCH = 200004
ACL_ERROR_INVALID_RESOURCE_HANDLE = 200005
ACL_ERROR_FEATURE_UNSUPPORTED = 200006
ACL_ERROR_INTERNAL_ERROR = 500000
ACL_ERROR_FAILURE = 500001

# --- runtime error codes (error_codes/rt_error_codes.h) ------------------------------------
ACL_ERROR_RT_PARAM_INVALID = 107000
ACL_ERROR_RT_INVALID_DEVICEID = 107001
ACL_ERROR_RT_CONTEXT_NULL = 107002
ACL_ERROR_RT_STREAM_CONTEXT = 107003
ACL_ERROR_RT_INVALID_HANDLE = 107017
ACL_ERROR_RT_WAIT_TIMEOUT = 107019
ACL_ERROR_RT_FEATURE_NOT_SUPPORT = 207000
ACL_ERROR_RT_MEMORY_ALLOCATION = 207001
ACL_ERROR_RT_MEMORY_FREE = 207002
ACL_ERROR_RT_NO_DEVICE = 207004
ACL_ERROR_RT_NO_PERMISSION = 207006
ACL_ERROR_RT_INTERNAL_ERROR = 507000
ACL_ERROR_RT_SOC_VERSION = 507008
ACL_ERROR_RT_LOST_HEARTBEAT = 507010
ACL_ERROR_RT_AICORE_EXCEPTION = 507015

ERROR_NAMES: dict[int, str] = {
    v: k for k, v in sorted(globals().items()) if k.startswith("ACL_ERROR_") and isinstance(v, int) and v
}
ERROR_NAMES[0] = "ACL_SUCCESS"

# --- aclDataType ---------------------------------------------------------------------------
ACL_DT_UNDEFINED = -1
ACL_FLOAT = 0
ACL_FLOAT16 = 1
ACL_INT8 = 2
ACL_INT32 = 3
ACL_UINT8 = 4
ACL_INT16 = 6
ACL_UINT16 = 7
ACL_UINT32 = 8
ACL_INT64 = 9
ACL_UINT64 = 10
ACL_DOUBLE = 11
ACL_BOOL = 12
ACL_STRING = 13
ACL_COMPLEX64 = 16
ACL_COMPLEX128 = 17
ACL_BF16 = 27

# aclDataType -> (numpy dtype name, bytes per element). bf16 has no numpy type: None.
DTYPE_INFO: dict[int, tuple[str | None, int]] = {
    ACL_FLOAT: ("float32", 4),
    ACL_FLOAT16: ("float16", 2),
    ACL_INT8: ("int8", 1),
    ACL_INT32: ("int32", 4),
    ACL_UINT8: ("uint8", 1),
    ACL_INT16: ("int16", 2),
    ACL_UINT16: ("uint16", 2),
    ACL_UINT32: ("uint32", 4),
    ACL_INT64: ("int64", 8),
    ACL_UINT64: ("uint64", 8),
    ACL_DOUBLE: ("float64", 8),
    ACL_BOOL: ("bool", 1),
    ACL_COMPLEX64: ("complex64", 8),
    ACL_COMPLEX128: ("complex128", 16),
    ACL_BF16: (None, 2),
}

# --- aclFormat -----------------------------------------------------------------------------
ACL_FORMAT_UNDEFINED = -1
ACL_FORMAT_NCHW = 0
ACL_FORMAT_NHWC = 1
ACL_FORMAT_ND = 2
ACL_FORMAT_NC1HWC0 = 3
ACL_FORMAT_FRACTAL_Z = 4
ACL_FORMAT_HWCN = 16
ACL_FORMAT_NDHWC = 27
ACL_FORMAT_FRACTAL_NZ = 29
ACL_FORMAT_NCDHW = 30
ACL_FORMAT_NC = 35
ACL_FORMAT_NCL = 47
# Layouts that are plain row-major arrays; fractal/5-D packed layouts are not supported.
PLAIN_FORMATS = frozenset(
    {
        ACL_FORMAT_UNDEFINED,
        ACL_FORMAT_NCHW,
        ACL_FORMAT_NHWC,
        ACL_FORMAT_ND,
        ACL_FORMAT_HWCN,
        ACL_FORMAT_NDHWC,
        ACL_FORMAT_NCDHW,
        ACL_FORMAT_NC,
        ACL_FORMAT_NCL,
    }
)

# --- aclMemType (tensor placement) ---------------------------------------------------------
ACL_MEMTYPE_DEVICE = 0
ACL_MEMTYPE_HOST = 1
ACL_MEMTYPE_HOST_COMPILE_INDEPENDENT = 2

# --- aclrtMemcpyKind -----------------------------------------------------------------------
ACL_MEMCPY_HOST_TO_HOST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_DEVICE_TO_DEVICE = 3
ACL_MEMCPY_DEFAULT = 4

# --- aclrtMemMallocPolicy ------------------------------------------------------------------
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEM_MALLOC_HUGE_ONLY = 1
ACL_MEM_MALLOC_NORMAL_ONLY = 2
ACL_MEM_MALLOC_HUGE_FIRST_P2P = 3
ACL_MEM_MALLOC_HUGE_ONLY_P2P = 4
ACL_MEM_MALLOC_NORMAL_ONLY_P2P = 5
ACL_MEM_MALLOC_HUGE1G_ONLY = 6
ACL_MEM_MALLOC_HUGE1G_ONLY_P2P = 7
ACL_MEM_TYPE_LOW_BAND_WIDTH = 0x0100
ACL_MEM_TYPE_HIGH_BAND_WIDTH = 0x1000
ACL_MEM_ACCESS_USER_SPACE_READONLY = 0x100000
_POLICY_BASE = 0xFF
_POLICY_FLAGS = (
    ACL_MEM_TYPE_LOW_BAND_WIDTH | ACL_MEM_TYPE_HIGH_BAND_WIDTH | ACL_MEM_ACCESS_USER_SPACE_READONLY
)


def valid_malloc_policy(policy: int) -> bool:
    """Placement policies only steer page size / HBM vs DDR on real hardware; any documented
    combination is accepted (the daemon's backend chooses placement), garbage is not."""
    return (
        policy >= 0
        and (policy & _POLICY_BASE) <= ACL_MEM_MALLOC_HUGE1G_ONLY_P2P
        and (policy & ~(_POLICY_BASE | _POLICY_FLAGS)) == 0
    )


# --- aclrtMemAttr (get_mem_info) -----------------------------------------------------------
ACL_DDR_MEM = 0
ACL_HBM_MEM = 1
ACL_DDR_MEM_HUGE = 2
ACL_DDR_MEM_NORMAL = 3
ACL_HBM_MEM_HUGE = 4
ACL_HBM_MEM_NORMAL = 5
ACL_DDR_MEM_P2P_HUGE = 6
ACL_DDR_MEM_P2P_NORMAL = 7
ACL_HBM_MEM_P2P_HUGE = 8
ACL_HBM_MEM_P2P_NORMAL = 9

# --- aclrtRunMode --------------------------------------------------------------------------
ACL_DEVICE = 0
ACL_HOST = 1

# --- event / stream status -----------------------------------------------------------------
ACL_EVENT_STATUS_COMPLETE = 0  # acl.rt.query_event (deprecated API)
ACL_EVENT_STATUS_NOT_READY = 1
ACL_EVENT_RECORDED_STATUS_NOT_READY = 0  # acl.rt.query_event_status
ACL_EVENT_RECORDED_STATUS_COMPLETE = 1
ACL_STREAM_STATUS_COMPLETE = 0
ACL_STREAM_STATUS_NOT_READY = 1

# --- NumPy C type numbers, as acl.util.ptr_to_numpy takes them -----------------------------
NPY_BOOL = 0
NPY_INT8 = 1
NPY_UINT8 = 2
NPY_INT16 = 3
NPY_UINT16 = 4
NPY_INT32 = 5
NPY_UINT32 = 6
NPY_INT64 = 7
NPY_UINT64 = 8
NPY_LONGLONG = 9
NPY_ULONGLONG = 10
NPY_FLOAT32 = 11
NPY_DOUBLE = 12
NPY_FLOAT16 = 23
