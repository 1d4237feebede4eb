"""Checkpoints of npu tensors in torch's standard format, as torch_npu writes them.

A checkpoint written under FlexNPU is an ordinary torch zip checkpoint: each npu tensor pickles as
``torch._utils._rebuild_tensor_v2`` over a storage whose location tag is ``npu:N``. The storage
bytes are a host copy of the tensor's whole daemon allocation, so views and tied weights that
share an allocation share one storage in the file (as torch does for device storages). Nothing
FlexNPU-specific is pickled, so:

* plain torch loads it with ``map_location="cpu"`` (or a dict/function mapping ``npu:N``);
* the real torch_npu loads it on an Ascend host (it registers ``npu`` as the PrivateUse1 name);
* FlexNPU loads it with ``weights_only=True`` and any ``map_location``, and loads checkpoints
  the real torch_npu wrote (the same tags).

How it hooks into torch (all public registration points of ``torch.serialization``):

* saving: ``NPUTensor.__reduce_ex__`` (``reduce_tensor``) hands torch a host ``UntypedStorage``
  marked with the npu location; a location tagger registered ahead of torch's ``cpu`` tagger
  (``register_package`` priority 5) reports ``npu:N`` for it;
* loading: the restorer registered with it turns a host storage restored to ``npu[:N]`` into a
  daemon allocation and returns a data-less npu storage standing for it; torch's
  ``_rebuild_tensor`` then calls ``empty(0, device=npu).set_(storage, ...)``, which the npu
  device turns into a tensor on that allocation (``set_from_storage``);
* ``UntypedStorage.npu()`` / ``.to("npu")`` (what ``map_location`` functions call) upload the same
  way; torch's generated versions would allocate through a PrivateUse1 allocator Python cannot
  provide.
"""

from __future__ import annotations

import collections
import itertools
import re
import weakref
from typing import Any

import torch

from flexnpu.hook import runtime

_LOCATION = re.compile(r"^npu(?::(\d+))?$")
_FAKE_PTR_BASE = 0xF1E0 << 44  # data pointers of npu storages are tokens, never dereferenced
_tokens = itertools.count(1)
_installed = False


# ------------------------------------------------------------------------------------- saving


def _host_storage(t) -> torch.UntypedStorage:
    """A host copy of the allocation behind npu tensor ``t`` (one per allocation while in use)."""
    from flexnpu.hook import tensor as T

    a = t._a
    ref = a.saved
    s = ref() if ref is not None else None
    if s is not None:
        return s
    dev = a.dev
    T._check_not_capturing(dev, "saving an npu tensor")
    if dev.pending:
        dev.flush_frees()
    buf = bytearray(a.nbytes)
    if a.nbytes:
        dev.client.memcpy_d2h_into(a.handle, 0, memoryview(buf), dev.stream)
    s = torch.frombuffer(buf, dtype=torch.uint8).untyped_storage() if a.nbytes else torch.UntypedStorage(0)
    s._flexnpu_location = f"npu:{dev.index}"  # type: ignore[attr-defined]  # our tag on torch's storage
    a.saved = weakref.ref(s)  # dies with the pickler's reference: the next save reads afresh
    return s


def reduce_tensor(t, proto: int):
    """``__reduce_ex__`` of an npu tensor: torch's own rebuild function over an ``npu:N`` storage."""
    storage = _host_storage(t)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=t.dtype, _internal=True)
    # torch.save never asks a storage to reduce itself (it records it by persistent id); plain
    # pickling does, and TypedStorage's own reduce writes torch's legacy format, whose loader
    # restores a storage before reading its bytes. Use the zip format there too.
    # (a weak reference: a cycle would keep the host copy, and a.saved, alive past this save)
    wtyped = weakref.ref(typed)
    typed.__reduce_ex__ = lambda proto: _reduce_storage(wtyped())  # type: ignore[method-assign]  # this instance only
    args: tuple[Any, ...] = (
        typed,
        t.storage_offset(),
        tuple(t.size()),
        t.stride(),
        t.requires_grad,
        collections.OrderedDict(),
    )
    if getattr(t, "_is_param", False):
        # nn.Parameter on npu: rebuild the tensor, then the parameter, as torch pickles parameters
        inner: tuple[Any, ...] = (
            torch._utils._rebuild_tensor_v2,
            (typed, t.storage_offset(), tuple(t.size()), t.stride(), False, collections.OrderedDict()),
        )
        return (
            torch._utils._rebuild_parameter,
            (_Reduced(*inner), t.requires_grad, collections.OrderedDict()),
        )
    return (torch._utils._rebuild_tensor_v2, args)


def _reduce_storage(typed):
    import io

    b = io.BytesIO()
    torch.save(typed, b)
    return (torch.storage._load_from_bytes, (b.getvalue(),))


class _Reduced:
    """Pickles as ``fn(*args)`` (nests torch's rebuild calls, as Parameter's pickling does)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce_ex__(self, proto):
        return (self.fn, self.args)


def _location_tag(storage) -> str | None:
    return getattr(storage, "_flexnpu_location", None)


# ------------------------------------------------------------------------------------ loading


def _index_of(location: str) -> int | None:
    m = _LOCATION.match(location)
    if m is None:
        return None
    return runtime.current_index() if m.group(1) is None else int(m.group(1))


def npu_storage_from_host(storage: torch.UntypedStorage, index: int | None) -> torch.UntypedStorage:
    """Upload a host storage into a fresh allocation on ``npu:index``; returns an npu storage
    standing for that allocation (its data pointer is a token: the bytes live in the daemon)."""
    from flexnpu.hook import tensor as T

    if storage.device.type != "cpu":
        raise RuntimeError(f"cannot move a storage on {storage.device} to npu directly; go through .cpu()")
    dev = runtime.get(index)
    nbytes = storage.nbytes()
    host = torch.empty(0, dtype=torch.uint8).set_(storage)
    t = T.to_npu(host, dev) if nbytes else T.new_empty(dev, (0,), torch.uint8)
    ptr = _FAKE_PTR_BASE + (next(_tokens) << 12)
    s: Any = torch._C._construct_storage_from_data_pointer(ptr, torch.device("npu", dev.index), nbytes)
    s._flexnpu_alloc = t._a
    return s


def _restore(storage, location: str):
    if not isinstance(location, str):
        return None
    index = _index_of(location)
    if index is None:
        return None
    if isinstance(storage, torch.storage.TypedStorage):
        storage = storage._untyped_storage
    if storage.device.type == "npu" and getattr(storage, "_flexnpu_alloc", None) is not None:
        if storage.device.index == index:
            return storage
        storage = storage_to_host(storage)
    return npu_storage_from_host(storage, index)


def storage_to_host(storage) -> torch.UntypedStorage:
    a = getattr(storage, "_flexnpu_alloc", None)
    if a is None:
        raise RuntimeError("this npu storage has no FlexNPU allocation behind it")
    from flexnpu.hook import tensor as T

    t = T.wrap(a, (a.nbytes,), (1,), 0, torch.uint8)
    return T.to_cpu(t).untyped_storage()


def set_from_storage(t, storage, offset: int, size, stride) -> Any:
    """``t.set_(storage, offset, size, stride)`` for an npu storage made by ``npu_storage_from_host``."""
    from flexnpu.hook import tensor as T

    a = getattr(storage, "_flexnpu_alloc", None)
    if a is None:
        raise NotImplementedError(
            "set_: re-pointing an npu tensor at storage that FlexNPU did not create is not supported"
        )
    if a.dev is not t._a.dev:
        raise RuntimeError(f"set_: the storage is on npu:{a.dev.index}, the tensor on npu:{t._a.dev.index}")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride) if stride is not None and len(stride) else T._contig_strides(size)
    need = T._extent_nbytes(size, stride, int(offset), t.dtype.itemsize)
    if need > a.nbytes:
        raise RuntimeError(f"set_: a view of {need} bytes does not fit the storage's {a.nbytes} bytes")
    t._a = a
    with torch._C._DisableTorchDispatch():
        torch.ops.aten.as_strided_.default(t, size, stride, int(offset))
    t._rk = None
    return t


# ------------------------------------------------------------------------ storage .npu()/.to()


def _storage_npu(self, device=None, non_blocking=False, **_: Any):
    idx = None
    if device is not None:
        d = torch.device("npu", device) if isinstance(device, int) else torch.device(device)
        idx = d.index
    return _restore(self, "npu" if idx is None else f"npu:{idx}")


def _guard_storage_constructor() -> None:
    """``torch.UntypedStorage(n, device="npu")`` would call torch's PrivateUse1 allocator, which a
    Python backend cannot register (it crashes the process): make it an npu storage over a fresh
    daemon allocation instead (zero-filled), the same kind ``torch.load`` produces."""
    base_new = torch._C.StorageBase.__new__

    def __new__(cls, *args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "npu":
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            host = base_new(cls, *args, **kw)
            if host.nbytes():
                host.fill_(0)
            return npu_storage_from_host(host, torch.device(dev).index)
        return base_new(cls, *args, **kwargs)

    torch.UntypedStorage.__new__ = __new__  # type: ignore[method-assign]  # patching torch is the point


def install() -> None:
    """Register the npu location tagger/restorer and the storage methods (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    # before torch's "cpu" (10) and PrivateUse1 (23) entries
    torch.serialization.register_package(5, _location_tag, _restore)
    torch.storage._StorageBase.npu = _storage_npu  # type: ignore[attr-defined]  # TypedStorage.npu wraps this one
    orig_to = torch.storage._StorageBase.to

    def to(self, *, device, non_blocking=False):
        d = torch.device(device)
        if d.type == "npu":
            return _storage_npu(self, d, non_blocking)
        if d.type == "cpu" and getattr(self, "_flexnpu_alloc", None) is not None:
            return storage_to_host(self)
        return orig_to(self, device=device, non_blocking=non_blocking)

    to.__doc__ = orig_to.__doc__
    torch.storage._StorageBase.to = to  # type: ignore[method-assign]  # patching torch is the point
    orig_cpu = torch.storage._StorageBase.cpu

    def cpu(self):
        if getattr(self, "_flexnpu_alloc", None) is not None:
            return storage_to_host(self)
        return orig_cpu(self)

    cpu.__doc__ = orig_cpu.__doc__
    torch.storage._StorageBase.cpu = cpu  # type: ignore[method-assign]  # patching torch is the point
    _guard_storage_constructor()
    from flexnpu.hook.tensor import _restore_npu

    # checkpoints written by earlier FlexNPU versions pickled this function
    torch.serialization.add_safe_globals([_restore_npu])


def _plug_into_tensor() -> None:
    """npu tensors pickle through this module; tensor.py cannot import it (this module builds
    on tensor.py), so it finds it in tensor.SERIALIZATION."""
    import sys

    from flexnpu.hook import tensor as T

    T.SERIALIZATION = sys.modules[__name__]


_plug_into_tensor()
