"""Tensors on the ``npu`` device: handles to daemon memory, with aten ops turned into launches.

An ``NPUTensor`` is a ``_make_wrapper_subclass`` tensor on ``npu:i`` (PyTorch's PrivateUse1 slot,
renamed). It carries only metadata plus ``_a``, a refcounted ``Alloc`` naming the daemon-side
allocation; views share their base's ``Alloc``, and the handle is freed when the last tensor on it
dies. Every aten op on such tensors reaches ``__torch_dispatch__`` (below autograd, so autograd
works unchanged) and is turned into one ``client.launch`` with no round trip:

* output metadata is inferred on the meta device once per (op, input metadata, scalar args) and
  cached, so the common path is a flat walk over the arguments plus a dict lookup;
* ops whose outputs alias an input (views) produce wrappers on the same allocation, no launch;
* in-place and ``out=`` ops launch with ``outputs=[]`` and return the tensor they mutated;
* ops that need values on the host (``.item()``, ``.cpu()``, data-dependent shapes such as
  ``nonzero``, random number generation, ops without a meta kernel) synchronize and run on the
  host's CPU torch, then upload results. Random numbers therefore follow ``torch.manual_seed``
  exactly as on CPU, and the daemon never touches a process-wide generator.

A call whose spec is cached (nearly every call of an eager loop) runs in C instead
(fastdispatch.c, _install_fast_dispatch below): the same walk, key, wrappers and launch, with
every other call handed back to dispatch() before anything is done, so dispatch() remains the
one definition of the behaviour.

Factories (``torch.empty/zeros/randn(..., device="npu")``) reach the PrivateUse1 backend
fallback (no npu tensor is involved yet, so there is no Python dispatch key), which allocates
with ``client.malloc`` and hands the rest (fill, arange, ...) to the same launch path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from flexnpu import ops as oprules
from flexnpu.ops import shape_rules
from flexnpu.hook import runtime
from flexnpu.protocol import TensorRef, encode_launch, encode_launch_template, fill_launch

aten = torch.ops.aten
_OpOverload = torch._ops.OpOverload

stats = {"hits": 0, "misses": 0, "rules": 0, "cpu_fallbacks": 0}


class PyAlloc:
    """A daemon allocation; freed (deferred to the next command) when the last tensor dies.
    (The C path's Alloc type does the same in C: fastdispatch.c; `Alloc` names the one in use.)"""

    __slots__ = ("dev", "handle", "nbytes", "graph", "saved")

    def __init__(self, dev: runtime.Device, handle: int, nbytes: int):
        self.dev = dev
        self.handle = handle
        self.nbytes = nbytes
        self.saved = None  # weakref to the host copy a torch.save in progress made
        self.graph = dev.capture  # allocations made during capture live as long as the graph
        dev.allocated += nbytes
        if dev.allocated > dev.peak:
            dev.peak = dev.allocated

    def __del__(self) -> None:
        try:
            d = self.dev
            d.allocated -= self.nbytes
            g = self.graph
            if g is None or (g._graph is None and d.capture is not g):
                g = d.capture  # (a graph that was reset no longer holds its memory)
            if g is not None:
                g._held.append(self.handle)  # the graph replays commands that use it
            else:
                d.pending.append(self.handle)  # never call the client from a destructor
                d.pending_bytes += self.nbytes
                if len(d.pending) >= runtime.FREE_BATCH or d.pending_bytes >= runtime.FREE_BYTES:
                    d.flush_due = True
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


Alloc: Any = PyAlloc  # the C path's type once it is installed (_install_fast_dispatch)

# Checkpoint and pickle support (flexnpu.hook.serialization) plugs itself in here when it is
# imported: it builds on this module, so this module must not import it.
SERIALIZATION: Any = None


class NPUTensor(torch.Tensor):
    """A tensor on the FlexNPU ``npu`` device (metadata here, data in the daemon)."""

    _a: PyAlloc
    # (TensorRef, cache-key part) for the current metadata, computed on first use. Metadata only
    # changes through this module (in-place view ops, resize_, `.data =`), which reset it.
    _rk: tuple[TensorRef, tuple[Any, ...]] | None

    # torch's documented idiom for subclasses; its stubs type these slots as plain functions
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]  # see above
        return dispatch(func, args, kwargs or {})

    if TYPE_CHECKING:
        # every op on an NPUTensor returns NPUTensors (dispatch above); torch's stubs say Tensor
        def detach(self) -> NPUTensor: ...

    # `param.data = other` swaps the TensorImpl's storage; keep the allocation in step with it.
    # (TensorBase.data is a getset descriptor; torch's stubs type it as a Tensor)
    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)  # type: ignore[attr-defined]

    @data.setter
    def data(self, value):
        torch._C.TensorBase.data.__set__(self, value)  # type: ignore[attr-defined]
        if isinstance(value, NPUTensor):
            self._a = value._a
        self._rk = None

    def __repr__(self, *, tensor_contents=None) -> str:  # type: ignore[override]  # stubs: -> Any
        # Format the host copy (one sync) instead of torch's element-wise formatting on device.
        with torch.no_grad():
            body = repr(to_cpu(self.detach()))
        suffix = f", device='{self.device}'"
        if self.grad_fn is not None:
            suffix += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            suffix += ", requires_grad=True"
        return body[:-1] + suffix + ")"

    __str__ = __repr__

    def tolist(self):
        return to_cpu(self.detach()).tolist()

    def numpy(self, *, force: bool = False):
        if not force:
            raise TypeError(
                f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to "
                "copy the tensor to host memory first."
            )
        return to_cpu(self.detach()).numpy()

    def __format__(self, spec: str) -> str:
        if self.dim() == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def __deepcopy__(self, memo):
        # torch's version deep-copies __dict__ over the clone's, which would hand the copy this
        # tensor's allocation; copy the values into a fresh allocation and the rest of __dict__
        if id(self) in memo:
            return memo[id(self)]
        import copy

        with torch.no_grad():
            new = self.clone()
        if self.requires_grad:
            new.requires_grad_()
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        for k, v in self.__dict__.items():
            if k not in ("_a", "_rk"):
                new.__dict__[k] = copy.deepcopy(v, memo)
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto):
        # pickling/torch.save: torch's standard format, storage tagged npu:N (serialization.py)
        return SERIALIZATION.reduce_tensor(self, proto)


def _restore_npu(cpu_t: torch.Tensor, index: int) -> torch.Tensor:
    """What checkpoints of earlier FlexNPU versions pickled; kept so that they still load."""
    return cpu_t.to(torch.device("npu", index))


_make_raw = torch.Tensor._make_wrapper_subclass
# The wrapper's (meta, never allocated) storage is declared huge so that torch's own bounds checks
# let us re-shape a wrapper in place (out= resizing, in-place view ops); real bounds live in the
# daemon, which checks every view against the actual allocation.
_WRAPPER_STORAGE = 1 << 48


def _make(cls, shape, strides, storage_offset, dtype, device):
    return _make_raw(
        cls,
        shape,
        strides=strides,
        storage_offset=storage_offset,
        dtype=dtype,
        device=device,
        storage_size=_WRAPPER_STORAGE,
    )


_torch_devices: dict[int, torch.device] = {}


def _tdev(index: int) -> torch.device:
    d = _torch_devices.get(index)
    if d is None:
        d = _torch_devices[index] = torch.device("npu", index)
    return d


def wrap(alloc: PyAlloc, shape, stride, offset: int, dtype: torch.dtype) -> NPUTensor:
    t = _make_raw(
        NPUTensor,
        shape,
        strides=stride,
        storage_offset=offset,
        dtype=dtype,
        device=_tdev(alloc.dev.index),
        storage_size=_WRAPPER_STORAGE,
    )
    t._a = alloc
    t._rk = None
    return t


def _extent_nbytes(shape, stride, offset: int, itemsize: int) -> int:
    last = offset
    for s, st in zip(shape, stride):
        if s == 0:
            return 0
        last += (s - 1) * st
    return (last + 1) * itemsize


_contig_strides = shape_rules.contiguous_strides


def new_empty(dev: runtime.Device, shape, dtype: torch.dtype, stride=None) -> NPUTensor:
    """Allocate daemon memory (client.malloc, async) and return an uninitialized npu tensor."""
    shape = tuple(int(s) for s in shape)
    stride = _contig_strides(shape) if stride is None else tuple(int(s) for s in stride)
    nbytes = _extent_nbytes(shape, stride, 0, dtype.itemsize)
    if dev.flush_due:
        dev.flush_frees()
    c = dev.client
    h = c.alloc_handle()
    c.malloc(nbytes, h)
    return wrap(Alloc(dev, h, nbytes), shape, stride, 0, dtype)


def ref_of(t: NPUTensor) -> TensorRef:
    rk = t._rk
    if rk is None:
        rk = _make_rk(t)
    return rk[0]


def _make_rk(t: NPUTensor) -> tuple:
    dt, sh, st, of = t.dtype, tuple(t.shape), t.stride(), t.storage_offset()
    rk = t._rk = (TensorRef(t._a.handle, dt, sh, st, of), (dt, sh, st, of))  # type: ignore[arg-type]  # of: SymInt only when traced
    return rk


# ---------------------------------------------------------------------------------------------
# host <-> device


def _check_not_capturing(dev: runtime.Device, what: str) -> None:
    if dev.capture is not None:
        raise RuntimeError(
            f"{what} needs the tensor's values on the host, which is not permitted "
            "while capturing an NPU graph (keep host reads out of the captured region)"
        )


def to_cpu(t: NPUTensor) -> torch.Tensor:
    """Synchronous device-to-host copy of ``t`` (a fresh contiguous CPU tensor)."""
    dev = t._a.dev
    _check_not_capturing(dev, "copying an npu tensor to the host")
    shape = tuple(t.shape)
    numel = t.numel()
    if numel == 0:
        return torch.empty(shape, dtype=t.dtype)
    if not t.is_contiguous():
        t = dispatch(aten.clone.default, (t,), {"memory_format": torch.contiguous_format})
    if dev.pending:
        dev.flush_frees()
    isz = t.dtype.itemsize
    buf = dev.client.memcpy_d2h(t._a.handle, t.storage_offset() * isz, numel * isz, dev.stream)
    return torch.frombuffer(buf, dtype=t.dtype).view(shape)


def _host_bytes(c: torch.Tensor):
    c = c.contiguous().reshape(-1)
    return c.view(torch.uint8).numpy() if c.numel() else b""


def to_npu(
    c: torch.Tensor, dev: runtime.Device, dtype: torch.dtype | None = None, non_blocking: bool = False
) -> NPUTensor:
    """Upload a host tensor into a fresh npu allocation (contiguous)."""
    from flexnpu.hook.pinned import copy_to_device

    if dtype is not None and c.dtype != dtype:
        c = c.to(dtype)
    c = c.detach().contiguous()
    t = new_empty(dev, c.shape, c.dtype)
    if c.numel() and not copy_to_device(t, c, non_blocking):  # pinned memory: straight from the arena
        dev.client.memcpy_h2d(t._a.handle, 0, _host_bytes(c), dev.stream)
    return t


def _copy_from_host(dst: NPUTensor, src: torch.Tensor, non_blocking: bool = False) -> NPUTensor:
    from flexnpu.hook.pinned import copy_to_device

    if copy_to_device(dst, src, non_blocking):  # pinned host memory: no staging copy
        return dst
    src = src.detach().to(dst.dtype).expand(dst.shape)
    dev = dst._a.dev
    if dst.is_contiguous():
        if dst.numel():
            if dev.flush_due:
                dev.flush_frees()
            dev.client.memcpy_h2d(
                dst._a.handle, dst.storage_offset() * dst.dtype.itemsize, _host_bytes(src), dev.stream
            )
        return dst
    tmp = to_npu(src, dev)
    dispatch(aten.copy_.default, (dst, tmp), {})
    return dst


# ---------------------------------------------------------------------------------------------
# op table


class OpInfo:
    """What dispatch needs to know of one operator, worked out on its first call. OpInfos are
    hashed by identity (C speed): the caches key on the OpInfo, not on the OpOverload, whose
    __hash__ is a Python method (it cost ~2 us per dispatch, hashed four times)."""

    __slots__ = (
        "func",
        "name",
        "special",
        "cpu",
        "allowed",
        "host_ok",
        "mutable",
        "value_free",
        "cpu_index_ok",
    )

    def __init__(self, func: _OpOverload):
        self.func = func  # keeps it alive, so its id keys _infos
        self.cpu_index_ok = func in _CPU_INDEX_OK
        self.name = f"{func.namespace}::{func._opname}.{func._overloadname}"
        self.special = _SPECIAL.get(func)
        schema = func._schema
        self.mutable = tuple(
            i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
        )
        tags = func.tags
        # Plain in-place ops (x.add_(y, alpha=lr), x.fill_(v), ...) return `self` whatever the
        # values of their scalar arguments, so scalars key the cache by type only: a changing
        # learning rate or fill value does not cost a meta run per call.
        self.value_free = (
            func._opname.endswith("_")
            and self.mutable == (0,)
            and all(r.alias_info is not None for r in schema.returns)
            and torch.Tag.inplace_view not in tags
        )
        self.cpu = False
        self.allowed = func.namespace == "aten" and oprules.is_allowed(self.name)
        # the host fallback runs in this process: any aten op but the refused class
        self.host_ok = func.namespace == "aten" and oprules.host_fallback_ok(func._opname)
        if torch.Tag.nondeterministic_seeded in tags and func._opname not in oprules.SEEDED_ONLY_WITH:
            # (ops random for one argument only reach this dispatch without asking for randomness:
            # scaled_dot_product_attention's dropout keeps its math form, sdpa_autograd_kernel)
            self.cpu = True  # random numbers come from the app's own (host) generator
            self.host_ok = func.namespace == "aten"
        elif any(not _is_tensor_type(r.type) for r in schema.returns) and func not in _SHAPE_ONLY:
            self.cpu = True  # returns host values (bool/number) computed from tensor contents
        if self.special is None and torch.Tag.inplace_view in tags:
            self.special = _inplace_view


def _is_tensor_type(t) -> bool:
    s = str(t)
    return s.startswith("Tensor") or s.startswith("Optional[Tensor]") or s.startswith("List[Tensor]")


_infos: dict[int, OpInfo] = {}  # by id(OpOverload): see OpInfo
_cache: dict[tuple, Any] = {}
_CACHE_MAX = 1 << 15


def _info(func) -> OpInfo:
    info = _infos.get(id(func))
    if info is None:
        info = _infos[id(func)] = OpInfo(func)
    return info


def _mixed_devices(a: str, b: str) -> RuntimeError:
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!"
    )


class _Walk:
    """Flat conversion of one call's arguments into wire arguments + a cache key."""

    __slots__ = ("dev", "flat", "key", "repl", "allow_cpu")

    def __init__(self, allow_cpu: bool = False):
        self.dev: runtime.Device | None = None
        self.flat: list[NPUTensor] = []
        self.key: list = []
        self.repl: dict[int, NPUTensor] | None = None
        self.allow_cpu = allow_cpu

    def tensor(self, a: torch.Tensor):
        if type(a) is not NPUTensor and not isinstance(a, NPUTensor):
            a = self._host_tensor(a)
        d = a._a.dev
        if d is not self.dev:
            if self.dev is None:
                self.dev = d
            else:
                raise _mixed_devices(f"npu:{self.dev.index}", f"npu:{d.index}")
        rk = a._rk
        if rk is None:
            rk = _make_rk(a)
        self.flat.append(a)
        self.key.append(rk[1])
        return rk[0]

    def _host_tensor(self, a: torch.Tensor) -> NPUTensor:
        # CPU scalars (0-dim) mix with device tensors in torch; so may index tensors when allowed.
        if a.device.type != "cpu" or (a.dim() != 0 and not self.allow_cpu):
            other = self.dev.index if self.dev is not None else runtime.current_index()
            raise _mixed_devices(f"npu:{other}", str(a.device))
        dev = self.dev or runtime.get(None)
        up = to_npu(a, dev)
        if self.repl is None:
            self.repl = {}
        self.repl[id(a)] = up
        return up

    def value(self, a):
        tp = type(a)
        if tp is NPUTensor:
            return self.tensor(a)
        if tp is int or tp is float or tp is bool:
            self.key.append((tp, a if (a or tp is not float) else str(a)))  # -0.0: see dispatch
            return a
        if a is None:
            self.key.append(None)
            return None
        if isinstance(a, torch.Tensor):
            return self.tensor(a)
        if tp is list or tp is tuple:
            self.key.append(tp)
            out = [self.value(v) for v in a]
            self.key.append(len(out))
            return out if tp is list else tuple(out)
        if tp is torch.device:
            if a.type == "npu" and self.dev is None:
                self.dev = runtime.get(a.index)
            self.key.append(a)
            return a
        if tp is complex:
            self.key.append((tp, repr(a)))  # signed zeros differ on the wire
            return a
        if isinstance(a, (torch.dtype, torch.layout, torch.memory_format, str, complex)):
            self.key.append((tp, a))
            return a
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise NotImplementedError("symbolic shapes are not supported on npu")
        raise NotImplementedError(f"argument of type {tp.__name__} cannot be sent to the npu daemon")


def dispatch(func, args, kwargs):
    """Run aten op ``func`` on npu tensors: launch it (or view/sync as the op requires)."""
    info = _infos.get(id(func))
    if info is None:
        info = _info(func)
    if info.special is not None:
        return info.special(func, args, kwargs, info)
    if info.cpu:
        return _cpu_fallback(func, args, kwargs, info)
    if kwargs:
        d = kwargs.get("device")
        if d is not None and d.type != "npu":  # e.g. x.new_zeros(3, device="cpu")
            return _cpu_fallback(func, args, kwargs, info, upload=False)
    w = _Walk(info.cpu_index_ok)
    value_free = info.value_free
    flat = w.flat
    key = w.key
    wargs = []
    dev = None
    # flat walk, fast paths for npu tensors and plain numbers (the overwhelming majority)
    for a in args:
        tp = type(a)
        if tp is NPUTensor:
            d = a._a.dev
            if d is not dev:
                if dev is None:
                    dev = w.dev = d
                else:
                    raise _mixed_devices(f"npu:{dev.index}", f"npu:{d.index}")
            rk = a._rk
            if rk is None:
                rk = _make_rk(a)
            flat.append(a)
            key.append(rk[1])
            wargs.append(rk[0])
        elif tp is int or tp is float or tp is bool:
            key.append(tp)
            if not value_free:
                # -0.0 == 0.0, but the payload (_enc_cache) tells them apart
                key.append(a if (a or tp is not float) else str(a))
            wargs.append(a)
        else:
            w.dev = dev
            wargs.append(w.value(a))
            dev = w.dev
    wkwargs = {}
    if kwargs:
        w.dev = dev
        for k, v in kwargs.items():
            key.append(k)
            if value_free and (type(v) is float or type(v) is int or type(v) is bool):
                key.append(type(v))
                wkwargs[k] = v
            else:
                wkwargs[k] = w.value(v)
        dev = w.dev
    if dev is None:
        dev = runtime.get(None)
    ckey = (info, *key)
    spec = _cache.get(ckey)
    if spec is None:
        spec = (
            _by_rule(func, wargs, wkwargs)
            or _by_view_rule(func, args, wargs, wkwargs)
            or _infer(func, args, kwargs, w, info)
        )
        if spec is None:  # no meta kernel / data-dependent: run it on the host
            return _cpu_fallback(func, args, kwargs, info)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[ckey] = spec
        stats["misses"] += 1
    else:
        stats["hits"] += 1
    tmpl, news, launch = spec
    if tmpl == "resize":
        for p, sh, st, of in news:
            resize_wrapper(flat[p], sh, st, of, keep=False)
        return dispatch(func, args, kwargs)
    if dev.flush_due:
        dev.flush_frees()
    c = dev.client
    if news:
        if not info.allowed:
            raise _denied(info)
        outs = []
        made = []
        tdev = _tdev(dev.index)
        for dt, sh, st, of, nb, kp in news:
            h = c.alloc_handle()
            t = _make_raw(
                NPUTensor,
                sh,
                strides=st,
                storage_offset=of,
                dtype=dt,
                device=tdev,
                storage_size=_WRAPPER_STORAGE,
            )
            t._a = Alloc(dev, h, nb)
            ref = TensorRef(h, dt, sh, st, of)
            t._rk = (ref, kp)
            made.append(t)
            outs.append((nb, ref))
        _launch(c, info, ckey, wargs, wkwargs, outs, flat, dev.stream)
        if tmpl == 0:
            return made[0]
        return _build(tmpl, made, flat)
    if launch:
        if not info.allowed:
            raise _denied(info)
        _launch(c, info, ckey, wargs, wkwargs, [], flat, dev.stream)
    return _build(tmpl, (), flat)


# Encoded launches per spec key: the key holds everything the payload holds but the handles
# (the op, every tensor's layout, every scalar's type and value), so a launch whose key was seen
# is the cached payload with its handles written in (protocol.fill_launch), not a new encoding.
# Not for value_free ops, whose keys leave scalar values out.
_enc_cache: dict[tuple, tuple[bytes, tuple[int, ...]]] = {}


def _launch(
    c, info: OpInfo, ckey: tuple, wargs: list, wkwargs: dict, outs: list, flat: list, stream: int
) -> None:
    if info.value_free:
        c.launch_payload(encode_launch(info.name, tuple(wargs), wkwargs, outs), stream)
        return
    tpl = _enc_cache.get(ckey)
    if tpl is None:
        tpl = encode_launch_template(info.name, tuple(wargs), wkwargs, outs)
        if len(_enc_cache) >= _CACHE_MAX:
            _enc_cache.clear()
        _enc_cache[ckey] = tpl
        c.launch_payload(tpl[0], stream)
        return
    handles = [t._a.handle for t in flat]
    for _, ref in outs:
        handles.append(ref.handle)
    c.launch_payload(fill_launch(tpl, handles), stream)


def _denied(info: OpInfo) -> NotImplementedError:
    if not info.name.startswith("aten::"):
        return NotImplementedError(
            f"operator {info.name} is not supported on npu: FlexNPU runs aten operators only"
        )
    return NotImplementedError(
        f"operator {info.name} is not supported on npu: the FlexNPU daemon does "
        "not allow it (it touches files, global state or raw memory layout)"
    )


def _build(tmpl, made, flat):
    kind = tmpl[0]
    if kind == "new":
        return made[tmpl[1]]
    if kind == "self":
        return flat[tmpl[1]]
    if kind == "view":
        _, p, dt, sh, st, of = tmpl
        src = flat[p]
        t = _make_raw(
            NPUTensor,
            sh,
            strides=st,
            storage_offset=of,
            dtype=dt,
            device=src.device,
            storage_size=_WRAPPER_STORAGE,
        )
        t._a = src._a
        t._rk = None
        return t
    if kind == "const":
        return tmpl[1]
    seq = [_build(x, made, flat) for x in tmpl[2]]
    return seq if tmpl[1] is list else tuple(seq)


def _meta_mapper(w: _Walk):
    memo: dict[int, torch.Tensor] = {}
    metas: list[torch.Tensor] = []
    repl = w.repl or {}

    def conv(a):
        if isinstance(a, torch.Tensor):
            if not isinstance(a, NPUTensor):
                a = repl.get(id(a), a)
            m = memo.get(id(a))
            if m is None:
                need = _extent_nbytes(a.shape, a.stride(), a.storage_offset(), 1)
                base = torch.empty(max(need, a.storage_offset()), dtype=a.dtype, device="meta")
                m = base.as_strided(tuple(a.shape), a.stride(), a.storage_offset())
                memo[id(a)] = m
            metas.append(m)
            return m
        if isinstance(a, (list, tuple)):
            out = [conv(v) for v in a]
            return out if isinstance(a, list) else tuple(out)
        if isinstance(a, torch.device):
            return torch.device("meta")
        return a

    return conv, metas


def _by_rule(func, wargs, wkwargs):
    """The spec of a fresh-output op from flexnpu.shape_rules (size-generic, no meta call)."""
    r = shape_rules.infer(func, wargs, wkwargs)
    if r is None:
        return None
    stats["rules"] += 1
    dt, sh, st = r
    return (0, ((dt, sh, st, 0, _extent_nbytes(sh, st, 0, dt.itemsize), (dt, sh, st, 0)),), True)


def _by_view_rule(func, args, wargs, wkwargs):
    """The spec of a view of the first argument from flexnpu.shape_rules.view (no meta call)."""
    if not args or type(args[0]) is not NPUTensor:
        return None  # (the template names the view's source by its place among the npu tensors)
    r = shape_rules.view(func, wargs, wkwargs)
    if r is None:
        return None
    stats["rules"] += 1
    return (("view", 0, *r), (), False)


_META_UNSUPPORTED = ("meta", "data-dependent", "data dependent", "dynamic", "symbolic")


def _infer(func, args, kwargs, w: _Walk, info: OpInfo):
    """(template, new-output specs, needs_launch) for this call, from a run on the meta device."""
    conv, metas = _meta_mapper(w)
    margs = conv(tuple(args))
    mkwargs = {k: conv(v) for k, v in kwargs.items()}
    before = [(tuple(m.shape), m.stride(), m.storage_offset()) for m in metas]
    try:
        r = func(*margs, **mkwargs)
    except NotImplementedError:
        return None
    except Exception as e:  # noqa: BLE001
        msg = str(e).lower()
        if any(s in msg for s in _META_UNSUPPORTED) or type(e).__name__ in (
            "DynamicOutputShapeException",
            "DataDependentOutputException",
            "UnsupportedOperatorException",
        ):
            return None
        raise
    in_storage: dict[int, int] = {}
    for p, m in enumerate(metas):
        in_storage.setdefault(m.untyped_storage()._cdata, p)
    news: list[tuple] = []
    kinds: set[str] = set()
    resizes: list[tuple] = []

    def tmpl(x):
        if isinstance(x, torch.Tensor):
            for p, m in enumerate(metas):
                if x is m:
                    if (tuple(m.shape), m.stride(), m.storage_offset()) != before[p]:
                        resizes.append((p, tuple(m.shape), tuple(m.stride()), m.storage_offset()))
                    kinds.add("self")
                    return ("self", p)
            vp = in_storage.get(x.untyped_storage()._cdata)
            if vp is not None:
                kinds.add("view")
                return ("view", vp, x.dtype, tuple(x.shape), tuple(x.stride()), x.storage_offset())
            sh, st, of = tuple(x.shape), tuple(x.stride()), x.storage_offset()
            news.append(
                (
                    x.dtype,
                    sh,
                    st,
                    of,
                    _extent_nbytes(sh, st, of, x.dtype.itemsize),  # type: ignore[arg-type]  # of: SymInt only when traced
                    (x.dtype, sh, st, of),
                )
            )
            kinds.add("new")
            return ("new", len(news) - 1)
        if isinstance(x, (list, tuple)):
            return ("seq", list if isinstance(x, list) else tuple, [tmpl(v) for v in x])
        return ("const", x)

    t = tmpl(r)
    if "new" in kinds and len(kinds) > 1:
        raise NotImplementedError(
            f"{info.name}: ops returning both fresh tensors and aliases of their "
            "inputs are not supported on npu"
        )
    if t == ("new", 0):
        t = 0  # the common case: one fresh tensor
    # views and identity returns need no device work; fresh outputs and mutations do
    launch = bool(news) or bool(info.mutable)
    if resizes:
        # out= tensors torch would resize: re-shape them first, then dispatch again
        return ("resize", tuple(resizes), False)
    return (t, tuple(news), launch)


# ---------------------------------------------------------------------------------------------
# host fallback


def _cpu_fallback(func, args, kwargs, info: OpInfo, upload: bool = True):
    """Run ``func`` on host copies of its npu inputs, write back mutated inputs, upload outputs."""
    if not info.host_ok:
        raise _denied(info)
    stats["cpu_fallbacks"] += 1
    devs: list[runtime.Device] = []
    originals: dict[int, NPUTensor] = {}
    memo: dict[int, torch.Tensor] = {}

    def down(a):
        if isinstance(a, NPUTensor):
            c = memo.get(id(a))
            if c is None:
                if not devs:
                    devs.append(a._a.dev)
                elif a._a.dev is not devs[0]:
                    raise _mixed_devices(f"npu:{devs[0].index}", f"npu:{a._a.dev.index}")
                _check_not_capturing(a._a.dev, info.name)
                c = to_cpu(a).clone()
                memo[id(a)] = c
                originals[id(c)] = a
            return c
        if isinstance(a, torch.Tensor):
            if a.dim() != 0 and func not in _CPU_INDEX_OK and devs:
                raise _mixed_devices(f"npu:{devs[0].index}", str(a.device))
            return a
        if isinstance(a, (list, tuple)):
            out = [down(v) for v in a]
            return out if isinstance(a, list) else tuple(out)
        if isinstance(a, torch.device) and a.type == "npu":
            if not devs:
                devs.append(runtime.get(a.index))
            return torch.device("cpu")
        return a

    if not upload:  # the op targets another device: its results stay there
        return func(*down(tuple(args)), **{k: down(v) for k, v in kwargs.items()})

    cargs = down(tuple(args))
    ckwargs = {k: down(v) for k, v in kwargs.items()}
    dev = devs[0] if devs else runtime.get(None)
    _check_not_capturing(dev, info.name)
    try:
        r = func(*cargs, **ckwargs)
    except Exception as e:
        if info.name.split("::")[1].split(".")[0] not in str(e):
            raise (
                type(e)(f"{info.name} on npu: {e}")
                if type(e) in (RuntimeError, ValueError, TypeError, NotImplementedError)
                else e
            )
        raise
    # mutated arguments go back to the device
    schema_args = func._schema.arguments
    for i in info.mutable:
        a = args[i] if i < len(args) else kwargs.get(schema_args[i].name)
        items = a if isinstance(a, (list, tuple)) else [a]
        for x in items:
            if isinstance(x, NPUTensor):
                _copy_from_host(x, memo[id(x)])

    def up(x):
        if isinstance(x, torch.Tensor):
            o = originals.get(id(x))
            if o is not None:
                return o
            return to_npu(x, dev)
        if isinstance(x, (list, tuple)):
            out = [up(v) for v in x]
            return out if isinstance(x, list) else tuple(out)
        return x

    return up(r)


# ---------------------------------------------------------------------------------------------
# special ops


def _copy_(func, args, kwargs, info):
    dst, src = args[0], args[1]
    if isinstance(dst, NPUTensor):
        if isinstance(src, NPUTensor):
            if src._a.dev is dst._a.dev:
                return _generic(aten.copy_.default, (dst, src), {}, _info(aten.copy_.default))
            return _copy_from_host(dst, to_cpu(src))
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return _copy_from_host(dst, src, non_blocking)
    # host destination
    dst.copy_(to_cpu(src))
    return dst


def _generic(func, args, kwargs, info):
    special, info.special = info.special, None
    try:
        return dispatch(func, args, kwargs)
    finally:
        info.special = special


def _to_copy(func, args, kwargs, info):
    t = args[0]
    target = kwargs.get("device")
    dtype = kwargs.get("dtype")
    if target is None or (target.type == "npu" and (target.index is None or target.index == t.device.index)):
        if not isinstance(t, NPUTensor):  # host tensor to npu: composite path did it already
            return _generic(func, args, kwargs, info)
        return _generic(func, args, kwargs, info)
    host = to_cpu(t) if isinstance(t, NPUTensor) else t
    mf = kwargs.get("memory_format")
    if target.type == "cpu":
        out = host.to(dtype=dtype or host.dtype, memory_format=mf or torch.preserve_format, copy=False)
        if kwargs.get("pin_memory"):
            out = out.pin_memory()
        return out
    if target.type == "npu":
        return to_npu(host, runtime.get(target.index), dtype, bool(kwargs.get("non_blocking", False)))
    raise RuntimeError(f"cannot copy an npu tensor to {target} directly; go through .cpu()")


def _local_scalar_dense(func, args, kwargs, info):
    return to_cpu(args[0]).item()


def _identity(func, args, kwargs, info):
    return args[0]


def _noop(func, args, kwargs, info):
    return None


def _false(func, args, kwargs, info):
    return False


def _inplace_view(func, args, kwargs, info):
    """squeeze_/unsqueeze_/transpose_/as_strided_/...: new metadata, same allocation."""
    t = args[0]
    m = torch.empty(
        max(_extent_nbytes(t.shape, t.stride(), t.storage_offset(), 1), t.storage_offset()),
        dtype=t.dtype,
        device="meta",
    ).as_strided(tuple(t.shape), t.stride(), t.storage_offset())
    margs = (m,) + tuple(args[1:])
    func(*margs, **kwargs)
    with torch._C._DisableTorchDispatch():
        aten.as_strided_.default(t, tuple(m.shape), m.stride(), m.storage_offset())
    t._rk = None
    return t


def resize_wrapper(t: NPUTensor, shape, stride, offset: int, keep: bool) -> None:
    """Give ``t`` new metadata in place; move it to a fresh allocation if it no longer fits."""
    nb = _extent_nbytes(shape, stride, offset, t.dtype.itemsize)
    old = t._a
    if nb > old.nbytes:
        dev = old.dev
        if dev.flush_due:
            dev.flush_frees()
        c = dev.client
        h = c.alloc_handle()
        c.malloc(nb, h)
        new = Alloc(dev, h, nb)
        if keep and old.nbytes:
            c.memcpy_d2d(h, 0, old.handle, 0, old.nbytes, dev.stream)
        t._a = new
    with torch._C._DisableTorchDispatch():
        aten.as_strided_.default(t, shape, stride, offset)
    t._rk = None


def _resize_(func, args, kwargs, info):
    t, size = args[0], tuple(args[1])
    if size == tuple(t.shape):
        return t
    resize_wrapper(t, size, _contig_strides(size), t.storage_offset(), keep=True)
    return t


def _set_(func, args, kwargs, info):
    raise NotImplementedError(f"{info.name}: re-pointing an npu tensor at other storage is not supported")


def _set_storage(func, args, kwargs, info):
    """``t.set_(storage, offset, size, stride)``: torch's checkpoint loader (``_rebuild_tensor``)."""
    set_from_storage = SERIALIZATION.set_from_storage
    t = args[0]
    if not isinstance(t, NPUTensor):
        return _set_(func, args, kwargs, info)
    storage = args[1] if len(args) > 1 else kwargs["source"]
    if func is aten.set_.source_Storage:
        return set_from_storage(t, storage, 0, (storage.nbytes() // t.dtype.itemsize,), (1,))
    offset = args[2] if len(args) > 2 else kwargs.get("storage_offset", 0)
    size = args[3] if len(args) > 3 else kwargs.get("size", ())
    stride = args[4] if len(args) > 4 else kwargs.get("stride", ())
    return set_from_storage(t, storage, offset, size, stride)


def _set_tensor(func, args, kwargs, info):
    """``t.set_(src)``: ``t`` becomes another tensor on ``src``'s allocation (same device)."""
    t, src = args[0], args[1]
    if not (isinstance(t, NPUTensor) and isinstance(src, NPUTensor)):
        return _set_(func, args, kwargs, info)
    if src._a.dev is not t._a.dev:
        raise _mixed_devices(f"npu:{t._a.dev.index}", f"npu:{src._a.dev.index}")
    if src.dtype != t.dtype:
        raise RuntimeError(f"set_: expected a source of dtype {t.dtype}, got {src.dtype}")
    t._a = src._a
    with torch._C._DisableTorchDispatch():
        aten.as_strided_.default(t, tuple(src.shape), src.stride(), src.storage_offset())
    t._rk = None
    return t


def _empty_memory_format(func, args, kwargs, info):
    dev, dtype = _factory_dev_dtype(kwargs)
    size = tuple(args[0])
    mf = kwargs.get("memory_format")
    stride = None
    if mf == torch.channels_last and len(size) == 4:
        stride = (
            torch.empty(0, device="meta")
            .new_empty(size, device="meta")
            .to(memory_format=torch.channels_last)
            .stride()
        )
    return new_empty(dev, size, dtype, stride)


def _empty_strided(func, args, kwargs, info):
    dev, dtype = _factory_dev_dtype(kwargs)
    return new_empty(dev, tuple(args[0]), dtype, tuple(args[1]))


def _factory_dev_dtype(kwargs):
    d = kwargs.get("device")
    dev = runtime.get(d.index if d is not None else None)
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    if kwargs.get("layout") not in (None, torch.strided):
        raise NotImplementedError(f"layout {kwargs.get('layout')} is not supported on npu")
    return dev, dtype


_SPECIAL: dict[Any, Any] = {
    aten.copy_.default: _copy_,
    aten._copy_from.default: lambda f, a, k, i: _copy_(f, (a[1], a[0], *a[2:]), k, i),
    aten._copy_from_and_resize.default: lambda f, a, k, i: _copy_(f, (a[1], a[0]), {}, i),
    aten._to_copy.default: _to_copy,
    aten._local_scalar_dense.default: _local_scalar_dense,
    aten.lift_fresh.default: _identity,
    aten.detach_.default: _identity,
    aten.record_stream.default: _noop,
    aten.is_pinned.default: _false,
    aten.resize_.default: _resize_,
    aten.set_.source_Tensor: _set_tensor,
    aten.set_.source_Storage: _set_storage,
    aten.set_.source_Storage_storage_offset: _set_storage,
    aten.set_.default: _set_,
    aten.empty.memory_format: _empty_memory_format,
    aten.empty_strided.default: _empty_strided,
}


# ops returning host values that depend only on shapes (safe to compute on the meta device)
def _ops(*names: str) -> frozenset:
    out = set()
    for n in names:
        packet, _, overload = n.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.add(op)
    return frozenset(out)


_SHAPE_ONLY = _ops(
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "sym_size.int",
    "sym_stride.int",
    "sym_numel",
    "sym_storage_offset",
    "dim",
    "size.int",
    "stride.int",
    "is_contiguous",
    "is_contiguous.memory_format",
)
# ops whose index arguments may live on the host, as with CUDA
_CPU_INDEX_OK = frozenset(
    {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
)


def backend_fallback(op, *args, **kwargs):
    """PrivateUse1 kernel for every op reached without an npu tensor (factories on device npu)."""
    return dispatch(op, args, kwargs)


_SDPA_OP = aten.scaled_dot_product_attention.default


def sdpa_autograd_kernel(*args, **kwargs):
    """AutogradPrivateUse1 kernel of scaled_dot_product_attention. torch decomposes the op into
    its math form above every backend; that is what autograd needs, so it stays the path when a
    gradient is recorded or dropout is asked for (random numbers come from the app's generator,
    on the host). Otherwise the op goes below autograd whole, to this device's dispatch, and
    the daemon runs it as one launch with its backend's fused kernel."""
    try:
        oprules.check_not_random(_SDPA_OP, args, kwargs)  # what the daemon will accept
        random = False
    except oprules.OpRefused:
        random = True
    if random or (
        torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args[:4], kwargs.get("attn_mask")))
    ):
        return _SDPA_OP.decompose(*args, **kwargs)
    with torch._C._AutoDispatchBelowAutograd():
        return _SDPA_OP(*args, **kwargs)


_LINEAR_OP = aten.linear.default


def linear_autograd_kernel(*args, **kwargs):
    """AutogradPrivateUse1 kernel of linear. torch decomposes linear above every backend into a
    transpose, views and addmm/mm (four dispatches through this front end for one launch); when
    no gradient is recorded it goes below autograd whole instead: one dispatch, one launch, the
    daemon's backend decomposes it natively. With a gradient, the decomposition autograd needs."""
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values())
    ):
        return _LINEAR_OP.decompose(*args, **kwargs)
    with torch._C._AutoDispatchBelowAutograd():
        return _LINEAR_OP(*args, **kwargs)


EXPLICIT_KERNELS = (
    "empty.memory_format",
    "empty_strided",
    "copy_",
    "_copy_from",
    "_copy_from_and_resize",
    "_to_copy",
    "_local_scalar_dense",
    "fill_.Scalar",
    "zero_",
    "resize_",
    "full",
    "zeros",
    "ones",
    "arange",
    "arange.start",
    "arange.start_step",
    "full_like",
    "zeros_like",
    "ones_like",
    "scalar_tensor",
)


def kernel_for(name: str):
    packet, _, overload = name.partition(".")
    op = getattr(getattr(aten, packet), overload or "default")

    def kernel(*args, **kwargs):
        return _dispatch_entry(op, args, kwargs)

    kernel.__name__ = f"npu_{packet}"
    return kernel


# ---------------------------------------------------------------------------------------------
# the compiled hot path


def _fast_config() -> dict[str, Any]:
    """What the C path works on: this module's caches, types and Python fallbacks."""
    return {
        "infos": _infos,
        "cache": _cache,
        "enc_cache": _enc_cache,
        "stats": stats,
        "tensor_type": NPUTensor,
        "alloc_type": Alloc,
        "ref_type": TensorRef,
        "make_raw": _make_raw,
        "wrapper_storage": _WRAPPER_STORAGE,
        "tdevs": _torch_devices,
        "tdev": _tdev,
        "fallback": dispatch,
        "make_rk": _make_rk,
        "launch": _launch,
        "build": _build,
        "plain_types": (torch.dtype, torch.layout, torch.memory_format, str),
        "device_type": torch.device,
        "get_device": runtime.get,
        "runtime": runtime,
    }


def _install_fast_dispatch() -> Any:
    """dispatch() for calls whose spec is cached, in C (fastdispatch.c): the same walk, key,
    wrappers and launch, several times cheaper per operator; every other call comes back to
    dispatch() above. None (Python only) when $FLEXNPU_FASTDISPATCH is 0 or the module is not
    built."""
    if os.environ.get("FLEXNPU_FASTDISPATCH", "1").strip() == "0":
        return None
    try:
        from flexnpu.hook._dispatch_core import lib
    except ImportError:
        return None
    ns: dict[str, Any] = {}
    if lib.fxd_install(id(ns)) != 0:  # id() is the dict's address in CPython
        return None
    global Alloc
    Alloc = ns["Alloc"]  # before any tensor exists: every allocation is one of its instances
    ns["configure"](_fast_config())
    # torch calls cls.__torch_dispatch__(func, types, args, kwargs): the C function, bound
    NPUTensor.__torch_dispatch__ = classmethod(ns["torch_dispatch"])  # type: ignore[assignment, method-assign]
    return ns


FAST = _install_fast_dispatch()
# the PrivateUse1 kernels (factories, copies) take the same path
_dispatch_entry = FAST["dispatch"] if FAST is not None else dispatch
