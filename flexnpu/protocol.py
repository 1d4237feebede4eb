"""The wire protocol: the single source of truth both sides encode and decode from.

Every request is one fixed 64-byte submission record (SQE) on the client's SQ ring; every reply
is one 32-byte completion record (CQE) on its CQ ring. Anything larger than the SQE's five
argument words (launch arguments, host data, pid lists) travels in the client's data arena,
referenced by (offset, length) and copied out by the daemon before it is parsed.

    SQE  <HHIQII5Q   opcode u16 | flags u16 | stream u32 | user_data u64 |
                     payload_off u32 | payload_len u32 | a0..a4 u64
    CQE  <QiIQQ      user_data u64 | status i32 (flexnpu.errors.Err) | msg_len u32 |
                     value u64 | aux u64

A request with FLAG_SYNC set is answered by exactly one CQE carrying its user_data; a request
without it is answered only if it fails *at once* (malformed, bad handle): errors of
asynchronous work surface at the next synchronization of its stream, as in CUDA/AscendCL.
Error text for a sync reply is written to the client's mailbox (a region of its arena named at
attach) and its length put in msg_len.

OPS below is the table: opcode, name, whether it is synchronous, the meaning of a0..a4, the
payload kind and the reply. Both sides use it; nothing else defines the protocol.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

LAYOUT_VERSION = 2  # bumped on any change to SQE/CQE/OPS; checked at attach
SQE_SIZE = 64
CQE_SIZE = 32
SQE = struct.Struct("<HHIQII5Q")
CQE = struct.Struct("<QiIQQ")
assert SQE.size == SQE_SIZE and CQE.size == CQE_SIZE
# byte offsets of the SQE fields the client's C submit path writes (ring.Stager.submit)
SQE_AT_STREAM = struct.calcsize("<HH")
SQE_AT_PAYLOAD_OFF = struct.calcsize("<HHIQ")
SQE_AT_PAYLOAD_LEN = struct.calcsize("<HHIQI")

FLAG_SYNC = 0x1  # answer with a CQE
FLAG_DEFERRED = 0x2  # MEMCPY_H2D/D2H: the arena buffer is a user-owned host buffer, read or
# written when the copy executes (else H2D data is copied at drain time)
IPC_EXPORT_SAME_UID = 0x1  # IPC_EXPORT a1 flag: any process of the exporter's uid that knows the key may
# import it (AscendCL's ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION)
MAX_PAYLOAD = 64 << 20  # upper bound on one request's out-of-line data
MAX_NAME = 256  # op names, keys
MAX_DRAIN_BATCH = 64  # records the daemon pops from one SQ before preparing them; a client may
# reuse a payload's arena space once the SQ head is this far past it


class Op(IntEnum):
    NOP = 1
    DEVICE_INFO = 2
    DEVICE_SYNC = 3
    STREAM_CREATE = 10
    STREAM_DESTROY = 11
    STREAM_SYNC = 12
    STREAM_QUERY = 13
    EVENT_CREATE = 20
    EVENT_DESTROY = 21
    EVENT_RECORD = 22
    STREAM_WAIT_EVENT = 23
    EVENT_SYNC = 24
    EVENT_QUERY = 25
    EVENT_ELAPSED = 26
    MALLOC = 30
    FREE = 31
    MEMSET = 32
    MEMCPY_H2D = 33
    MEMCPY_D2H = 34
    MEMCPY_D2D = 35
    MEM_STATS = 36
    FREE_MANY = 37
    IPC_EXPORT = 40
    IPC_SET_PIDS = 41
    IPC_IMPORT = 42
    LAUNCH = 50
    GRAPH_BEGIN = 60
    GRAPH_END = 61
    GRAPH_REPLAY = 62
    GRAPH_DESTROY = 63
    SET_PHASE = 70
    STEP_MARK = 71
    COMM_INIT = 80
    COMM_DESTROY = 81
    COLLECTIVE = 82


class Payload(IntEnum):
    NONE = 0
    BYTES = 1  # raw bytes copied out at drain time (host data for small H2D copies)
    LAUNCH = 2  # encode_launch() format
    PIDS = 3  # little-endian u32 array
    ARENA = 4  # a host buffer in the arena the daemon reads/writes in stream order
    HANDLES = 5  # little-endian u32 array of device handles


@dataclass(frozen=True)
class OpSpec:
    op: Op
    args: tuple[str, ...]  # names of a0..a4 in order
    payload: Payload
    reply: str  # meaning of CQE value/aux for sync replies
    stream_ordered: bool  # executes in its stream's order (else at drain time)
    doc: str


def _s(op: Op, args: tuple[str, ...], payload: Payload, reply: str, ordered: bool, doc: str) -> OpSpec:
    return OpSpec(op, args, payload, reply, ordered, doc)


N, B, L, P, A, H = Payload.NONE, Payload.BYTES, Payload.LAUNCH, Payload.PIDS, Payload.ARENA, Payload.HANDLES

OPS: dict[Op, OpSpec] = {
    s.op: s
    for s in (
        _s(Op.NOP, (), N, "-", True, "no-op (benchmarks, liveness)"),
        _s(Op.DEVICE_INFO, (), N, "mailbox: JSON device description", False, "aclrtGetDeviceInfo"),
        _s(Op.DEVICE_SYNC, (), N, "first async error of any stream", False, "aclrtSynchronizeDevice"),
        _s(Op.STREAM_CREATE, ("stream_id", "priority"), N, "-", False, "aclrtCreateStreamWithConfig"),
        _s(Op.STREAM_DESTROY, (), N, "-", True, "aclrtDestroyStream (after the stream's queued work)"),
        _s(Op.STREAM_SYNC, (), N, "first async error of the stream", True, "aclrtSynchronizeStream"),
        _s(
            Op.STREAM_QUERY,
            ("stream_id",),
            N,
            "value: 1 if the stream has no pending work",
            False,
            "aclrtStreamQuery",
        ),
        _s(Op.EVENT_CREATE, ("event_id", "flags"), N, "-", False, "aclrtCreateEvent"),
        _s(Op.EVENT_DESTROY, ("event_id",), N, "-", False, "aclrtDestroyEvent"),
        _s(Op.EVENT_RECORD, ("event_id",), N, "-", True, "aclrtRecordEvent"),
        _s(Op.STREAM_WAIT_EVENT, ("event_id",), N, "-", True, "aclrtStreamWaitEvent"),
        _s(Op.EVENT_SYNC, ("event_id",), N, "-", False, "aclrtSynchronizeEvent"),
        _s(Op.EVENT_QUERY, ("event_id",), N, "value: 1 complete, 0 pending", False, "aclrtQueryEventStatus"),
        _s(
            Op.EVENT_ELAPSED,
            ("start_id", "end_id"),
            N,
            "value: float64 bits, ms",
            False,
            "aclrtEventElapsedTime",
        ),
        _s(Op.MALLOC, ("handle", "nbytes"), N, "-", False, "aclrtMalloc (client-chosen handle)"),
        _s(Op.FREE, ("handle",), N, "-", False, "aclrtFree"),
        _s(
            Op.FREE_MANY,
            (),
            H,
            "first handle not freed (unknown), if any",
            False,
            "aclrtFree of up to 4096 handles in one record (a front end's deferred frees)",
        ),
        _s(Op.MEMSET, ("handle", "offset", "value", "nbytes"), N, "-", True, "aclrtMemsetAsync"),
        _s(
            Op.MEMCPY_H2D,
            ("handle", "offset", "nbytes"),
            B,
            "-",
            True,
            "aclrtMemcpy[Async] host->device; with FLAG_DEFERRED the payload is read at execution",
        ),
        _s(Op.MEMCPY_D2H, ("handle", "offset", "nbytes"), A, "-", True, "aclrtMemcpy[Async] device->host"),
        _s(
            Op.MEMCPY_D2D,
            ("dst", "dst_offset", "src", "src_offset", "nbytes"),
            N,
            "-",
            True,
            "aclrtMemcpyAsync device->device",
        ),
        _s(Op.MEM_STATS, (), N, "mailbox: JSON memory statistics", False, "aclrtGetMemInfo"),
        _s(
            Op.IPC_EXPORT,
            ("handle", "flags"),
            N,
            "value: export key",
            False,
            "aclrtIpcMemGetExportKey (flags: IPC_EXPORT_SAME_UID)",
        ),
        _s(Op.IPC_SET_PIDS, ("key",), P, "-", False, "aclrtIpcMemSetImportPid"),
        _s(Op.IPC_IMPORT, ("key", "handle"), N, "value: nbytes", False, "aclrtIpcMemImportByKey"),
        _s(Op.LAUNCH, (), L, "-", True, "operator launch (aclopExecuteV2 / an aten op)"),
        _s(Op.GRAPH_BEGIN, ("graph_id",), N, "-", True, "begin capturing the stream into a graph"),
        _s(Op.GRAPH_END, ("graph_id",), N, "value: ops captured", True, "end capture"),
        _s(Op.GRAPH_REPLAY, ("graph_id",), N, "-", True, "replay a captured graph as one command"),
        _s(Op.GRAPH_DESTROY, ("graph_id",), N, "-", False, "free a captured graph"),
        _s(Op.SET_PHASE, ("phase", "stream_id"), N, "-", False, "phase hint for the stream's scheduler"),
        _s(
            Op.STEP_MARK,
            (),
            N,
            "-",
            True,
            "an engine iteration (one output token) ends here on this stream: "
            "the flex policy's TPOT clock; no barrier unless FLAG_SYNC; ignored while capturing",
        ),
        _s(
            Op.COMM_INIT,
            ("comm", "rank", "size", "timeout_ms"),
            B,
            "-",
            False,
            "join communicator `comm` (client-chosen handle) as `rank` of `size`; payload: 16-byte unique "
            "id + `size` u32 daemon device numbers, one per rank; or the id alone: the daemons exchange "
            "the device map themselves and the first collective waits for it (HcclCommInitRootInfo)",
        ),
        _s(Op.COMM_DESTROY, ("comm",), N, "-", False, "leave a communicator (HcclCommDestroy)"),
        _s(
            Op.COLLECTIVE,
            ("comm", "kind", "reduce_op", "root"),
            L,
            "-",
            True,
            "a collective on `comm` in stream order; payload: encode_launch(kind name, (input, output)); "
            "kind in COLL_KINDS, reduce_op in REDUCE_OPS, root a rank (broadcast)",
        ),
    )
}

# Collectives (Op.COLLECTIVE): wire codes are indices. Stable: only append.
COLL_KINDS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all")
REDUCE_OPS = ("sum", "avg", "prod", "min", "max", "band", "bor", "bxor")
COMM_ID_BYTES = 16
MAX_COMM_SIZE = 4096

PHASES = ("auto", "prefill", "decode")


def pack_sqe(
    op: Op,
    *args: int,
    stream: int = 0,
    user_data: int = 0,
    flags: int = 0,
    payload_off: int = 0,
    payload_len: int = 0,
) -> bytes:
    a = list(args) + [0] * (5 - len(args))
    return SQE.pack(op, flags, stream, user_data, payload_off, payload_len, *a)


# ---------------------------------------------------------------------------------------------
# Launch payloads: an operator name, its arguments and the outputs it must bind.
#
# A small tagged binary format, decoded by a strict parser that bounds every count and length:
# the daemon never unpickles or evaluates client data.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor argument on the wire: a strided view of one device allocation.

    offset is the storage offset in elements of dtype (as torch's storage_offset()).
    """

    handle: int
    dtype: Any  # torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0


class DecodeError(ValueError):
    """A launch payload that does not parse: the client sent garbage."""


# Wire codes of dtypes. Stable: only append.
DTYPE_NAMES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint16",
    "uint32",
    "uint64",
)
LAYOUT_NAMES = ("strided", "sparse_coo")
MEMFMT_NAMES = ("contiguous_format", "preserve_format", "channels_last", "channels_last_3d")

(
    _T_NONE,
    _T_FALSE,
    _T_TRUE,
    _T_INT,
    _T_FLOAT,
    _T_COMPLEX,
    _T_STR,
    _T_LIST,
    _T_TUPLE,
    _T_DTYPE,
    _T_DEVICE,
    _T_LAYOUT,
    _T_MEMFMT,
    _T_TENSOR,
) = range(14)

MAX_DEPTH = 8
MAX_ITEMS = 4096
MAX_NDIM = 16
# Values one launch payload may decode to, all nesting levels together. A value is at least
# one byte on the wire but a Python object of 8-200 bytes once decoded: without a total, 16 MB
# of NONE tags decoded to 3.4 GB and stalled the daemon for 20 s. Real launches carry tens
# to a few thousand values (a cat of 4096 tensors is the widest the per-list limit allows).
MAX_LAUNCH_VALUES = 1 << 15

_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_C128 = struct.Struct("<dd")
_H = struct.Struct("<H")
_TENSOR_HEAD = struct.Struct("<IBB")
# sizes, strides and offset of a tensor of each rank (precompiled: a launch carries several)
_DIMS = [struct.Struct(f"<{2 * nd + 1}q") for nd in range(MAX_NDIM + 1)]
_OUT_HEAD = struct.Struct("<Q")

_dtype_code: dict[Any, int] | None = None  # torch.dtype -> wire code
_dtype_by_code: list[Any] | None = None
_layouts: list[Any] | None = None
_memfmts: list[Any] | None = None


def _tables() -> None:
    global _dtype_code, _dtype_by_code, _layouts, _memfmts
    import torch

    _dtype_by_code = [getattr(torch, n, None) for n in DTYPE_NAMES]
    _dtype_code = {d: i for i, d in enumerate(_dtype_by_code) if d is not None}
    _layouts = [getattr(torch, n) for n in LAYOUT_NAMES]
    _memfmts = [getattr(torch, n) for n in MEMFMT_NAMES]


def dtype_code(dtype: Any) -> int:
    if _dtype_code is None:
        _tables()
    try:
        return _dtype_code[dtype]  # type: ignore[index]  # _tables() set it
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be sent to a FlexNPU device") from None


def dtype_from_code(code: int) -> Any:
    if _dtype_by_code is None:
        _tables()
    if not 0 <= code < len(_dtype_by_code) or _dtype_by_code[code] is None:  # type: ignore[arg-type,index]  # _tables() set it
        raise DecodeError(f"unknown dtype code {code}")
    return _dtype_by_code[code]  # type: ignore[index]


def _enc(out: bytearray, v: Any, depth: int, hpos: list[int] | None = None) -> None:
    """Append value ``v``; ``hpos`` (if given) collects the offset of each tensor's handle."""
    if depth > MAX_DEPTH:
        raise TypeError("launch arguments nest too deeply")
    t = type(v)
    if v is None:
        out.append(_T_NONE)
    elif t is bool:
        out.append(_T_TRUE if v else _T_FALSE)
    elif t is int:
        out.append(_T_INT)
        out += _I64.pack(v)
    elif t is float:
        out.append(_T_FLOAT)
        out += _F64.pack(v)
    elif t is TensorRef:
        nd = len(v.shape)
        out.append(_T_TENSOR)
        if hpos is not None:
            hpos.append(len(out))
        out += _TENSOR_HEAD.pack(v.handle, dtype_code(v.dtype), nd)
        if nd <= MAX_NDIM:
            out += _DIMS[nd].pack(*v.shape, *v.stride, v.offset)
        else:  # the daemon refuses it; send it anyway so that it reports why
            out += struct.pack(f"<{2 * nd + 1}q", *v.shape, *v.stride, v.offset)
    elif t is list or t is tuple:
        if len(v) > MAX_ITEMS:
            raise TypeError("too many launch arguments")
        out.append(_T_LIST if t is list else _T_TUPLE)
        out += _H.pack(len(v))
        for x in v:
            _enc(out, x, depth + 1, hpos)
    elif t is str:
        b = v.encode()
        if len(b) > MAX_NAME:
            raise TypeError("string argument too long")
        out.append(_T_STR)
        out += _H.pack(len(b))
        out += b
    elif t is complex:
        out.append(_T_COMPLEX)
        out += _C128.pack(v.real, v.imag)
    else:
        _enc_torch(out, v)


def _enc_torch(out: bytearray, v: Any) -> None:
    import torch

    if isinstance(v, torch.dtype):
        out.append(_T_DTYPE)
        out.append(dtype_code(v))
    elif isinstance(v, torch.device):
        out.append(_T_DEVICE)  # the daemon substitutes its own device
    elif isinstance(v, torch.layout):
        out.append(_T_LAYOUT)
        out.append(LAYOUT_NAMES.index(str(v).split(".")[-1]))
    elif isinstance(v, torch.memory_format):
        out.append(_T_MEMFMT)
        out.append(MEMFMT_NAMES.index(str(v).split(".")[-1]))
    elif isinstance(v, bool):  # numpy bools and friends
        out.append(_T_TRUE if v else _T_FALSE)
    elif isinstance(v, int):
        _enc(out, int(v), 0)
    elif isinstance(v, float):
        _enc(out, float(v), 0)
    else:
        raise TypeError(f"cannot send an argument of type {type(v).__name__} to a FlexNPU device")


def encode_launch(
    op: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], outputs: list[tuple[int, TensorRef]]
) -> bytes:
    """Serialize one operator launch. Raises TypeError for arguments that cannot travel."""
    return bytes(_encode_launch(op, args, kwargs, outputs, None))


def encode_launch_template(
    op: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], outputs: list[tuple[int, TensorRef]]
) -> tuple[bytes, tuple[int, ...]]:
    """encode_launch, plus the offset of each tensor's handle in payload order (args depth
    first, kwargs, outputs): fill_launch() then encodes the same launch naming other handles
    without walking its arguments again."""
    hpos: list[int] = []
    payload = bytes(_encode_launch(op, args, kwargs, outputs, hpos))
    return payload, tuple(hpos)


_U32 = struct.Struct("<I")


def fill_launch(template: tuple[bytes, tuple[int, ...]], handles: Any) -> bytearray:
    """The payload of encode_launch_template's launch with its tensors naming ``handles``."""
    payload, offsets = template
    if len(handles) != len(offsets):
        raise ValueError(f"launch template has {len(offsets)} tensors, {len(handles)} handles given")
    b = bytearray(payload)
    pack = _U32.pack_into
    for off, h in zip(offsets, handles):
        pack(b, off, h)
    return b


def _encode_launch(
    op: str,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    outputs: list[tuple[int, TensorRef]],
    hpos: list[int] | None,
) -> bytearray:
    out = bytearray()
    name = op.encode()
    if len(name) > MAX_NAME:
        raise TypeError("operator name too long")
    out += _H.pack(len(name))
    out += name
    _enc(out, tuple(args), 0, hpos)
    out += _H.pack(len(kwargs))
    for k, v in kwargs.items():
        _enc(out, k, 0)
        _enc(out, v, 1, hpos)
    out += _H.pack(len(outputs))
    for nbytes, ref in outputs:
        out += _OUT_HEAD.pack(nbytes)
        _enc(out, ref, 0, hpos)
    return out


class _Reader:
    __slots__ = ("buf", "pos", "device", "budget")

    def __init__(self, buf: bytes, device: Any) -> None:
        self.buf = buf
        self.pos = 0
        self.device = device
        # every value costs one unit: decoding work and memory stay linear in the payload
        # and bounded per launch, whatever its nesting
        self.budget = MAX_LAUNCH_VALUES

    def take(self, n: int) -> bytes:
        p = self.pos
        if n < 0 or p + n > len(self.buf):
            raise DecodeError("launch payload truncated")
        self.pos = p + n
        return self.buf[p : p + n]

    def u8(self) -> int:
        if self.pos >= len(self.buf):
            raise DecodeError("launch payload truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        n: int = _H.unpack(self.take(2))[0]
        return n

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise DecodeError("launch arguments nest too deeply")
        self.budget -= 1
        if self.budget < 0:
            raise DecodeError(f"launch payload holds more than {MAX_LAUNCH_VALUES} values")
        t = self.u8()
        if t == _T_NONE:
            return None
        if t == _T_FALSE:
            return False
        if t == _T_TRUE:
            return True
        if t == _T_INT:
            return _I64.unpack(self.take(8))[0]
        if t == _T_FLOAT:
            return _F64.unpack(self.take(8))[0]
        if t == _T_TENSOR:
            buf, p = self.buf, self.pos
            if p + 6 > len(buf):
                raise DecodeError("launch payload truncated")
            handle, code, nd = _TENSOR_HEAD.unpack_from(buf, p)
            if nd > MAX_NDIM:
                raise DecodeError(f"tensor with {nd} dimensions")
            dims = _DIMS[nd]
            end = p + 6 + dims.size
            if end > len(buf):
                raise DecodeError("launch payload truncated")
            vals = dims.unpack_from(buf, p + 6)
            self.pos = end
            return TensorRef(handle, dtype_from_code(code), vals[:nd], vals[nd : 2 * nd], vals[2 * nd])
        if t == _T_LIST or t == _T_TUPLE:
            n = self.u16()
            if n > MAX_ITEMS:
                raise DecodeError("too many items")
            if n > self.budget or n > len(self.buf) - self.pos:
                # each item needs a byte and a unit of budget: refuse before building anything
                raise DecodeError(
                    f"launch payload holds more than {MAX_LAUNCH_VALUES} values"
                    if n > self.budget
                    else "launch payload truncated"
                )
            items = [self.value(depth + 1) for _ in range(n)]
            return items if t == _T_LIST else tuple(items)
        if t == _T_STR:
            try:
                return self.take(self.u16()).decode()
            except UnicodeDecodeError:
                raise DecodeError("string argument is not UTF-8") from None
        if t == _T_COMPLEX:
            re, im = _C128.unpack(self.take(16))
            return complex(re, im)
        if t == _T_DTYPE:
            return dtype_from_code(self.u8())
        if t == _T_DEVICE:
            return self.device
        if t == _T_LAYOUT:
            if _layouts is None:
                _tables()
            i = self.u8()
            if i >= len(_layouts):  # type: ignore[arg-type]
                raise DecodeError("unknown layout")
            return _layouts[i]  # type: ignore[index]
        if t == _T_MEMFMT:
            if _memfmts is None:
                _tables()
            i = self.u8()
            if i >= len(_memfmts):  # type: ignore[arg-type]
                raise DecodeError("unknown memory format")
            return _memfmts[i]  # type: ignore[index]
        raise DecodeError(f"unknown argument tag {t}")


def split_launch(buf: bytes) -> tuple[bytes, tuple[int, ...]] | None:
    """(structure, handles) of a launch payload: the payload with every tensor's handle zeroed,
    and the handles in payload order (the order decode_launch meets TensorRefs: args depth
    first, then kwargs, then outputs). Two payloads with equal structure decode to the same
    launch up to which allocations they name. None if the payload is malformed or names more
    than 256 tensors (decode_launch then says what is wrong). One C pass (ring/pyfast.c)."""
    from .ring.segment import launch_split

    r: tuple[bytes, tuple[int, ...]] | None = launch_split(buf)
    return r


def split_launch_offsets(buf: bytes) -> tuple[bytes, tuple[int, ...], tuple[int, ...]] | None:
    """split_launch, with every tensor's storage offset zeroed in the structure too and returned
    apart, in the same order as the handles: (structure, handles, offsets)."""
    from .ring.segment import launch_split

    r: tuple[bytes, tuple[int, ...], tuple[int, ...]] | None = launch_split(buf, True)
    return r


def split_launch_dims(
    buf: bytes,
) -> (
    tuple[bytes, tuple[int, ...], tuple[int, ...], tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]] | None
):
    """split_launch_offsets, with every tensor's sizes and strides zeroed in the structure too
    (its dtype and rank stay) and returned apart: (structure, handles, offsets, dims), dims[k] =
    (sizes, strides) of the k-th tensor as the payload has them (not validated)."""
    from .ring.segment import launch_split

    r = launch_split(buf, 2)
    return r  # type: ignore[no-any-return]


@dataclass(slots=True)
class Launch:
    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[tuple[int, TensorRef]]
    values: int = 0  # values decoded (what holding this launch costs the daemon, roughly)


def decode_launch(buf: bytes, device: Any = None) -> Launch:
    """Parse a launch payload; raises DecodeError on anything malformed. `device` replaces
    every device argument (a client cannot name the daemon's devices)."""
    r = _Reader(buf, device)
    try:
        op = r.take(r.u16()).decode()
    except UnicodeDecodeError:
        raise DecodeError("operator name is not UTF-8") from None
    args = r.value(0)
    if not isinstance(args, tuple):
        raise DecodeError("launch arguments must be a tuple")
    kwargs = {}
    nk = r.u16()
    if nk > MAX_ITEMS:
        raise DecodeError("too many keyword arguments")
    for _ in range(nk):
        k = r.value(1)
        if not isinstance(k, str):
            raise DecodeError("keyword name must be a string")
        kwargs[k] = r.value(1)
    outputs = []
    n = r.u16()
    if n > MAX_ITEMS:
        raise DecodeError("too many outputs")
    for _ in range(n):
        nbytes = _OUT_HEAD.unpack(r.take(8))[0]
        ref = r.value(0)
        if not isinstance(ref, TensorRef):
            raise DecodeError("output descriptor must be a tensor")
        outputs.append((nbytes, ref))
    if r.pos != len(buf):
        raise DecodeError("trailing bytes after launch payload")
    return Launch(op, args, kwargs, outputs, MAX_LAUNCH_VALUES - r.budget)
