"""torch.distributed backend "hccl" for the FlexNPU ``npu`` device.

``init_process_group("hccl")`` (or ``"npu:hccl"``, ``"cpu:gloo,npu:hccl"``) under ``flexnpu run``
creates a :class:`ProcessGroupHCCL`. Collectives on npu tensors become one stream-ordered
``Op.COLLECTIVE`` command on the tensor's device stream: the daemons that own the ranks' devices
carry them out between the ranks' allocations (flexnpu/daemon/collectives.py), so nothing passes
through this process. Like NCCL/HCCL, the returned work handles complete on the host at once and
the collective is ordered on the stream: reading the result (``.cpu()``, ``.item()``) or
``torch.npu.synchronize()`` waits for it and raises its error (a rank that died, a timeout, ranks
that disagree). ``barrier()`` and ``work.wait()`` with ``FLEXNPU_BLOCKING_WAIT=1`` block the host.

Communicators are created lazily, on the first collective of a group on a device, by all ranks
of the group together: rank 0 draws a 16-byte id, every rank publishes its daemon device, all
through the group's store (env://, tcp://, file:// all work). send/recv use a two-rank
communicator per pair of ranks, created on their first exchange. CPU tensors go to a gloo
process group made on first use with the same store, so ``"hccl"`` alone also serves them.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# (not in torch's stubs)
from torch._C._distributed_c10d import _create_work_from_future  # type: ignore[attr-defined]
from torch.futures import Future

from flexnpu import protocol as P
from flexnpu.hook import runtime

__all__ = ["ProcessGroupHCCL", "register"]

_REDUCE = None


def _reduce_name(op: Any) -> str:
    global _REDUCE
    if _REDUCE is None:
        R = dist.ReduceOp
        _REDUCE = {
            R.SUM: "sum",
            R.AVG: "avg",
            R.PRODUCT: "prod",
            R.MIN: "min",
            R.MAX: "max",
            R.BAND: "band",
            R.BOR: "bor",
            R.BXOR: "bxor",
        }
    op = getattr(op, "op", op)  # options carry a ReduceOp; the table is keyed by its RedOpType
    try:
        return _REDUCE[op]
    except (KeyError, TypeError):
        raise ValueError(f"reduce op {op} is not supported by the FlexNPU hccl backend") from None


def _done(result: Any) -> Any:
    fut: Future = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


def _is_npu(t: torch.Tensor) -> bool:
    return t.device.type == "npu"


# We implement the backend side of ProcessGroup: c10d calls these methods with (tensors, options),
# a protocol torch's stubs (the user-facing overloads, a (store, rank, size) constructor) do not
# describe, so the base is typed loosely.
_ProcessGroup: Any = dist.ProcessGroup


class ProcessGroupHCCL(_ProcessGroup):
    """A torch.distributed process group whose npu collectives run in the FlexNPU daemons."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._store = store
        self._timeout_s = (
            timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout or 1800)
        )
        self._comms: dict[int, int] = {}  # npu index -> communicator handle of that client
        self._pairs: dict[tuple[int, int], tuple[int, int]] = {}  # (npu, peer) -> (handle, pair rank)
        self._created = 0
        self._last_dev: runtime.Device | None = None
        self._pair_count: dict[int, int] = {}
        self._gloo: dist.ProcessGroupGloo | None = None
        self._blocking = os.environ.get("FLEXNPU_BLOCKING_WAIT", "0") == "1"

    def getBackendName(self) -> str:
        return "hccl"

    def __repr__(self) -> str:
        return f"ProcessGroupHCCL(flexnpu, rank {self.rank()} of {self.size()})"

    # ------------------------------------------------------------------ communicators
    def _rendezvous(self, key: str, rank: int, size: int, dev: runtime.Device) -> tuple[bytes, list[int]]:
        st = self._store
        if rank == 0:
            st.set(f"{key}/id", secrets.token_bytes(P.COMM_ID_BYTES))
        st.set(f"{key}/dev/{rank}", str(dev.daemon_index))
        cid = bytes(st.get(f"{key}/id"))
        devs = [int(st.get(f"{key}/dev/{r}")) for r in range(size)]
        return cid, devs

    def _comm(self, dev: runtime.Device) -> int:
        # One communicator per device, as ProcessGroupHCCL/NCCL: every rank of a group must keep
        # using the same device with it (use a new group to change devices).
        self._last_dev = dev
        h = self._comms.get(dev.index)
        if h is None:
            key = f"flexnpu/comm/{self._created}"
            self._created += 1
            cid, devs = self._rendezvous(key, self.rank(), self.size(), dev)
            h = self._comms[dev.index] = dev.client.comm_init(
                cid, self.rank(), self.size(), devs, self._timeout_s
            )
        return h

    def _pair(self, dev: runtime.Device, peer: int) -> tuple[int, int]:
        if not 0 <= peer < self.size() or peer == self.rank():
            raise ValueError(f"invalid peer rank {peer} for rank {self.rank()} of {self.size()}")
        got = self._pairs.get((dev.index, peer))
        if got is None:
            lo, hi = sorted((self.rank(), peer))
            me = 0 if self.rank() == lo else 1
            nth = self._pair_count.get(peer, 0)  # same count on both sides: they pair up in order
            self._pair_count[peer] = nth + 1
            cid, devs = self._rendezvous(f"flexnpu/p2p/{lo}-{hi}/{nth}", me, 2, dev)
            got = self._pairs[(dev.index, peer)] = (
                dev.client.comm_init(cid, me, 2, devs, self._timeout_s),
                me,
            )
        return got

    def _gloo_pg(self) -> Any:
        if self._gloo is None:
            store = dist.PrefixStore("flexnpu-gloo/", self._store)
            self._gloo = dist.ProcessGroupGloo(
                store, self.rank(), self.size(), timedelta(seconds=self._timeout_s)
            )
        return self._gloo

    # ------------------------------------------------------------------ one collective
    @staticmethod
    def _device_of(tensors: list[torch.Tensor]) -> runtime.Device:
        idx = None
        for t in tensors:
            if not _is_npu(t):
                raise ValueError(f"hccl collectives need all tensors on npu (got one on {t.device})")
            if idx is None:
                idx = t.device.index
            elif t.device.index != idx:
                raise ValueError(f"hccl collective tensors on different devices: npu:{idx} and {t.device}")
        return runtime.get(idx)

    def _run(
        self,
        kind: str,
        inp: torch.Tensor,
        out: torch.Tensor,
        op: str = "sum",
        root: int = 0,
        comm: int | None = None,
    ) -> None:
        from flexnpu.hook.tensor import ref_of

        dev = self._device_of([inp, out])
        if not inp.is_contiguous():
            inp = inp.contiguous()
        target = None
        if not out.is_contiguous():
            target, out = out, torch.empty_like(out, memory_format=torch.contiguous_format)
            if kind in ("all_reduce", "broadcast"):
                out.copy_(inp)
                inp = out
        if comm is None:
            comm = self._comm(dev)
        if dev.flush_due:
            dev.flush_frees()
        # inp and out are npu tensors (NPUTensor), as _device_of checked
        i_ref, o_ref = ref_of(inp), ref_of(out)  # type: ignore[arg-type]
        dev.client.collective(comm, kind, i_ref, o_ref, op, root, dev.stream)
        if target is not None:
            target.copy_(out)
        if self._blocking:
            dev.client.synchronize(dev.stream)

    # ------------------------------------------------------------------ torch.distributed API
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        if tensors and not _is_npu(tensors[0]):
            return self._gloo_pg().allreduce(tensors, opts)
        op = _reduce_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        for t in tensors:
            self._run("all_reduce", t, t, op)
        return _done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        if tensors and not _is_npu(tensors[0]):
            return self._gloo_pg().broadcast(tensors, opts)
        for t in tensors:
            self._run("broadcast", t, t, root=opts.rootRank)
        return _done(tensors)

    def allgather(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        if inputs and not _is_npu(inputs[0]):
            return self._gloo_pg().allgather(output_lists, inputs, opts)
        for outs, inp in zip(output_lists, inputs):
            if len(outs) != self.size():
                raise ValueError(f"all_gather needs {self.size()} output tensors, got {len(outs)}")
            flat = torch.empty((self.size() * inp.numel(),), dtype=inp.dtype, device=inp.device)
            self._run("all_gather", inp, flat)
            for i, o in enumerate(outs):
                o.copy_(flat[i * inp.numel() : (i + 1) * inp.numel()].view(o.shape))
        return _done(output_lists)

    def _allgather_base(self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None) -> Any:
        if not _is_npu(inp):
            return self._gloo_pg()._allgather_base(output, inp, opts)
        self._run("all_gather", inp, output)
        return _done([output])

    all_gather_single = _allgather_base

    def allgather_coalesced(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.allgather(output_lists, inputs, opts)

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for o, i in zip(outputs, inputs):
            self._allgather_base(o, i, opts)
        return _done(outputs)

    def reduce_scatter(
        self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        if outputs and not _is_npu(outputs[0]):
            return self._gloo_pg().reduce_scatter(outputs, input_lists, opts)
        op = _reduce_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        for out, ins in zip(outputs, input_lists):
            if len(ins) != self.size():
                raise ValueError(f"reduce_scatter needs {self.size()} input tensors, got {len(ins)}")
            flat = torch.cat([t.reshape(-1) for t in ins])
            self._run("reduce_scatter", flat, out, op)
        return _done(outputs)

    def _reduce_scatter_base(self, output: torch.Tensor, inp: torch.Tensor, opts: Any = None) -> Any:
        if not _is_npu(inp):
            return self._gloo_pg()._reduce_scatter_base(output, inp, opts)
        op = _reduce_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        self._run("reduce_scatter", inp, output, op)
        return _done([output])

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        for o, i in zip(outputs, inputs):
            self._reduce_scatter_base(o, i, opts)
        return _done(outputs)

    def alltoall_base(
        self,
        output: torch.Tensor,
        inp: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        if not _is_npu(inp):
            return self._gloo_pg().alltoall_base(output, inp, output_split_sizes, input_split_sizes, opts)
        n = self.size()
        if not output_split_sizes and not input_split_sizes:
            self._run("all_to_all", inp, output)
            return _done([output])
        rows_in = inp.shape[0] if inp.dim() else 1
        rows_out = output.shape[0] if output.dim() else 1
        ins = list(input_split_sizes) or [rows_in // n] * n
        outs = list(output_split_sizes) or [rows_out // n] * n
        if len(ins) != n or len(outs) != n or sum(ins) != rows_in or sum(outs) != rows_out:
            raise ValueError("all_to_all_single: split sizes do not match the tensors")
        # Uneven splits: pad every block to the largest block of any rank, exchange, unpad.
        m = torch.tensor([max(ins + outs)], dtype=torch.int64, device=inp.device)
        self._run("all_reduce", m, m, "max")
        big = int(m.cpu().item())
        rest = tuple(inp.shape[1:])
        send = torch.zeros((n * big, *rest), dtype=inp.dtype, device=inp.device)
        off = 0
        for j, k in enumerate(ins):
            if k:
                send[j * big : j * big + k].copy_(inp[off : off + k])
            off += k
        recv = torch.empty_like(send)
        self._run("all_to_all", send, recv)
        off = 0
        for j, k in enumerate(outs):
            if k:
                output[off : off + k].copy_(recv[j * big : j * big + k])
            off += k
        return _done([output])

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        if inputs and not _is_npu(inputs[0]):
            return self._gloo_pg().alltoall(outputs, inputs, opts)
        flat_in = torch.cat([t.reshape(-1) for t in inputs])
        flat_out = torch.empty(
            (sum(t.numel() for t in outputs),), dtype=outputs[0].dtype, device=outputs[0].device
        )
        self.alltoall_base(flat_out, flat_in, [t.numel() for t in outputs], [t.numel() for t in inputs], opts)
        off = 0
        for t in outputs:
            t.copy_(flat_out[off : off + t.numel()].view(t.shape))
            off += t.numel()
        return _done(outputs)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> Any:
        if tensors and not _is_npu(tensors[0]):
            return self._gloo_pg().send(tensors, dst, tag)
        for t in tensors:
            dev = self._device_of([t])
            h, me = self._pair(dev, dst)
            self._run("broadcast", t, t, root=me, comm=h)
        return _done(tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> Any:
        if tensors and not _is_npu(tensors[0]):
            return self._gloo_pg().recv(tensors, src, tag)
        for t in tensors:
            dev = self._device_of([t])
            h, me = self._pair(dev, src)
            self._run("broadcast", t, t, root=1 - me, comm=h)
        return _done(tensors)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> Any:
        raise NotImplementedError("recv from any source is not supported by the FlexNPU hccl backend")

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        if tensors and not _is_npu(tensors[0]):
            return self._gloo_pg().reduce(tensors, opts)
        op = _reduce_name(opts.reduceOp)
        for t in tensors:
            if self.rank() == opts.rootRank:
                self._run("all_reduce", t, t, op)
            else:
                tmp = t.clone()
                self._run("all_reduce", tmp, tmp, op)
        return _done(tensors)

    def gather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Any:
        if inputs and not _is_npu(inputs[0]):
            return self._gloo_pg().gather(output_lists, inputs, opts)
        inp = inputs[0]
        flat = torch.empty((self.size() * inp.numel(),), dtype=inp.dtype, device=inp.device)
        self._run("all_gather", inp, flat)
        if self.rank() == opts.rootRank:
            for i, o in enumerate(output_lists[0]):
                o.copy_(flat[i * inp.numel() : (i + 1) * inp.numel()].view(o.shape))
        return _done(output_lists)

    def scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any) -> Any:
        if outputs and not _is_npu(outputs[0]):
            return self._gloo_pg().scatter(outputs, input_lists, opts)
        out = outputs[0]
        n = out.numel()
        if self.rank() == opts.rootRank:
            flat = torch.cat([t.reshape(-1) for t in input_lists[0]])
        else:
            flat = torch.empty((self.size() * n,), dtype=out.dtype, device=out.device)
        self._run("broadcast", flat, flat, root=opts.rootRank)
        out.copy_(flat[self.rank() * n : (self.rank() + 1) * n].view(out.shape))
        return _done(outputs)

    def barrier(self, opts: Any = None) -> Any:
        dev = self._last_dev or runtime.get(None)  # the group's device, else the current one
        t = torch.zeros((1,), dtype=torch.int32, device=torch.device("npu", dev.index))
        self._run("all_reduce", t, t)
        dev.client.synchronize(dev.stream)  # a barrier blocks the host, as ProcessGroupHCCL's does
        return _done([t])


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> ProcessGroupHCCL:
    return ProcessGroupHCCL(store, rank, size, timeout)


_registered = False


def register() -> None:
    """Make "hccl" (and "npu:hccl") a torch.distributed backend. Idempotent."""
    global _registered
    if _registered:
        return
    if "hccl" not in dist.Backend.backend_list or "HCCL" not in dist.Backend._plugins:
        dist.Backend.register_backend("hccl", _create, devices=["npu"])
    _registered = True
