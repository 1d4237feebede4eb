"""Daemon-side launch execution (flexnpu/daemon/backends/torch_exec.py) on real CPU torch.

Every argument is client-controlled: these tests send hostile views and outputs and check that
the executor refuses them with a clear error before touching memory out of range.
"""

from __future__ import annotations

import pytest
import torch

from flexnpu.daemon.backends.torch_exec import LaunchError, build_view, execute_launch, is_op_allowed
from flexnpu.protocol import TensorRef

CPU = torch.device("cpu")


class Mem:
    """A handle table like the daemon's: handle -> flat uint8 allocation."""

    def __init__(self):
        self.bufs: dict[int, torch.Tensor] = {}
        self.allocated = 0

    def put(self, h: int, t: torch.Tensor) -> TensorRef:
        t = t.contiguous()
        self.bufs[h] = t.reshape(-1).view(torch.uint8).clone()
        return TensorRef(h, t.dtype, tuple(t.shape), t.stride(), 0)

    def resolve(self, h: int) -> torch.Tensor:
        if h not in self.bufs:
            raise KeyError(f"handle {h} not owned")
        return self.bufs[h]

    def allocate(self, n: int) -> torch.Tensor:
        self.allocated += n
        return torch.empty(n, dtype=torch.uint8)

    def run(self, op, args, kwargs=None, outputs=()):
        bound = execute_launch(CPU, op, args, kwargs or {}, list(outputs), self.resolve, self.allocate)
        for h, buf in bound:
            self.bufs[h] = buf
        return bound

    def read(self, ref: TensorRef) -> torch.Tensor:
        return build_view(ref, self.bufs[ref.handle]).clone()


def out_ref(h, dtype, shape):
    stride = torch.empty(shape, device="meta").stride()
    n = dtype.itemsize
    for s in shape:
        n *= s
    return (n, TensorRef(h, dtype, tuple(shape), stride, 0))


def test_add_binds_fresh_output():
    m = Mem()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    ra, rb = m.put(1, a), m.put(2, b)
    nb, ro = out_ref(3, torch.float32, (3, 4))
    bound = m.run("aten::add.Tensor", (ra, rb), {"alpha": 2}, [(nb, ro)])
    assert [h for h, _ in bound] == [3]
    assert torch.equal(m.read(ro), a + 2 * b)


def test_views_with_offset_and_strides():
    m = Mem()
    base = torch.arange(24, dtype=torch.float32)
    m.put(1, base)
    v = TensorRef(1, torch.float32, (3, 2), (1, 4), 5)  # a transposed window at offset 5
    nb, ro = out_ref(2, torch.float32, (3, 2))
    m.run("aten::mul.Tensor", (v, 2.0), {}, [(nb, ro)])
    assert torch.equal(m.read(ro), base.as_strided((3, 2), (1, 4), 5) * 2)


def test_inplace_with_no_outputs_mutates_input():
    m = Mem()
    ra = m.put(1, torch.ones(4))
    assert m.run("aten::add_.Tensor", (ra, ra)) == []
    assert torch.equal(m.read(ra), torch.full((4,), 2.0))


def test_result_aliasing_an_input_is_copied():
    m = Mem()
    ra = m.put(1, torch.arange(6.0))
    # a client that launches a view op with a fresh output gets a copy, never a shared buffer
    nb, ro = out_ref(2, torch.float32, (6,))
    with pytest.raises(LaunchError, match="outputs=\\[\\]"):
        m.run("aten::alias.default", (ra,), {}, [(nb, ro)])
    nb, ro = out_ref(2, torch.float32, (6,))
    m.run("aten::clone.default", (ra,), {}, [(nb, ro)])
    assert m.bufs[2].data_ptr() != m.bufs[1].data_ptr()


@pytest.mark.parametrize(
    "ref,why",
    [
        (TensorRef(1, torch.float32, (4,), (1,), 1), "beyond the allocation"),  # one past the end
        (TensorRef(1, torch.float32, (2, 2), (3, 1), 0), "beyond the allocation"),  # strides reach out
        (TensorRef(1, torch.float32, (2,), (-1,), 1), "negative"),  # negative stride
        (TensorRef(1, torch.float32, (4,), (1,), -1), "offset"),  # negative offset
        (TensorRef(1, torch.float32, (1 << 62,), (1,), 0), "out of range"),  # overflow bait
        (TensorRef(1, torch.float32, (2, 2), (1 << 61, 1), 0), "not allowed"),  # stride overflow
        (TensorRef(1, torch.float32, (2, 2), (1,), 0), "rank"),  # rank mismatch
        (TensorRef(1, torch.float64, (3,), (1,), 0), "beyond the allocation"),  # wider dtype
        (TensorRef(1, torch.float32, (-1,), (1,), 0), "out of range"),  # negative size
        (TensorRef(1, torch.float32, (0,), (1,), 5), "offset"),  # empty but past end
    ],
)
def test_hostile_views_are_rejected(ref, why):
    m = Mem()
    m.put(1, torch.zeros(4))  # 16 bytes
    before = m.bufs[1].clone()
    with pytest.raises(LaunchError, match=why):
        m.run("aten::neg_.default", (ref,), {}, [])
    assert torch.equal(m.bufs[1], before)


def test_as_strided_inside_an_op_cannot_escape_the_allocation():
    # as_strided is denied outright; and an out= tensor of the wrong size cannot grow its storage
    m = Mem()
    ra = m.put(1, torch.zeros(4))
    assert not is_op_allowed("aten::as_strided.default")
    with pytest.raises(LaunchError, match="not allowed"):
        m.run("aten::as_strided.default", (ra, (100,), (1,), 0), {}, [])
    small = m.put(2, torch.zeros(1))
    big = m.put(3, torch.zeros(1000))
    with pytest.raises(RuntimeError, match="not resizable"):
        m.run("aten::add.out", (big, big), {"out": small})
    assert m.bufs[2].numel() == 4  # untouched size


def test_outputs_must_match_what_the_op_returns():
    m = Mem()
    ra = m.put(1, torch.zeros(4))
    with pytest.raises(LaunchError, match="declared"):
        m.run("aten::neg.default", (ra,), {}, [out_ref(2, torch.float32, (5,))])
    with pytest.raises(LaunchError, match="outputs declared"):
        m.run("aten::neg.default", (ra,), {}, [])
    # under-declared bytes for the claimed layout
    with pytest.raises(LaunchError, match="beyond the allocation"):
        m.run("aten::neg.default", (ra,), {}, [(8, TensorRef(2, torch.float32, (4,), (1,), 0))])
    # a factory cannot be made to allocate more than it declares
    with pytest.raises(LaunchError, match="declared"):
        m.run(
            "aten::zeros.default", ([1 << 20],), {"dtype": torch.float32}, [out_ref(2, torch.float32, (4,))]
        )
    assert m.allocated == 0


def test_op_names_and_allowlist():
    assert (
        is_op_allowed("aten::add.Tensor") and is_op_allowed("aten::mm") and is_op_allowed("aten::t.default")
    )
    for bad in [
        "aten::from_file.default",
        "aten::set_.source_Tensor",
        "aten::resize_.default",
        "aten::_nested_view_from_buffer.default",
        "aten::normal_.default",
        "aten::bernoulli.default",
        "aten::_print.default",
        "prims::add.default",
        "os::system",
        "aten::__class__",
        "aten::add.__init__",
        "aten::no_such_op",
        "aten::add.NoSuchOverload",
        "",
        "aten::add.Tensor;x",
    ]:
        assert not is_op_allowed(bad), bad
    m = Mem()
    ra = m.put(1, torch.zeros(4))
    with pytest.raises(LaunchError, match="unknown operator 'aten::no_such_op'"):
        m.run("aten::no_such_op", (ra,))
    with pytest.raises(LaunchError, match="aten::from_file.default.*not allowed"):
        m.run("aten::from_file.default", ("/etc/passwd",), {}, [])


def test_bad_argument_types_and_handles():
    m = Mem()
    ra = m.put(1, torch.zeros(4))
    with pytest.raises(LaunchError, match="unsupported argument type"):
        m.run("aten::add.Tensor", (ra, object()), {}, [out_ref(2, torch.float32, (4,))])
    with pytest.raises(KeyError):
        m.run(
            "aten::neg.default",
            (TensorRef(9, torch.float32, (4,), (1,), 0),),
            {},
            [out_ref(2, torch.float32, (4,))],
        )


def test_device_args_are_rewritten_to_the_backend_device():
    m = Mem()
    nb, ro = out_ref(1, torch.int64, (5,))
    m.run("aten::arange.default", (5,), {"dtype": torch.int64, "device": torch.device("cuda", 3)}, [(nb, ro)])
    assert torch.equal(m.read(ro), torch.arange(5))


def test_multi_output_and_list_args():
    m = Mem()
    a = torch.randn(4, 5)
    ra = m.put(1, a)
    outs = [out_ref(2, torch.float32, (4,)), out_ref(3, torch.int64, (4,))]
    m.run("aten::max.dim", (ra, 1), {}, outs)
    v, i = a.max(1)
    assert torch.equal(m.read(outs[0][1]), v) and torch.equal(m.read(outs[1][1]), i)
    o = out_ref(4, torch.float32, (8, 5))
    m.run("aten::cat.default", ([ra, ra],), {}, [o])
    assert torch.equal(m.read(o[1]), torch.cat([a, a]))


def test_cached_views_survive_out_resizing_and_inplace_view_ops_are_denied():
    m = Mem()
    a = m.put(1, torch.ones(4))
    big = m.put(2, torch.zeros(8))
    nb, ro = out_ref(3, torch.float32, (8,))
    m.run("aten::clone.default", (big,), {}, [(nb, ro)])  # caches a view of handle 2 as (8,)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.run("aten::add.out", (a, a), {"out": big})  # torch shrinks `out` to (4,)
    nb, ro = out_ref(4, torch.float32, (8,))
    m.run("aten::clone.default", (big,), {}, [(nb, ro)])  # still the full (8,) view
    assert m.read(ro).tolist() == [2.0] * 4 + [0.0] * 4
    for op in (
        "aten::unsqueeze_.default",
        "aten::t_.default",
        "aten::squeeze_.dim",
        "aten::transpose_.default",
    ):
        assert not is_op_allowed(op), op
