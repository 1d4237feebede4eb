"""The wire table and the launch codec: round trips, and garbage rejected cleanly."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexnpu import protocol as P
from flexnpu.protocol import TensorRef


def test_table_is_complete_and_records_fit():
    assert P.SQE.size == 64 and P.CQE.size == 32
    for op, spec in P.OPS.items():
        assert len(spec.args) <= 5, op
    rec = P.pack_sqe(P.Op.MEMSET, 1, 2, 3, 4, stream=7, user_data=9, flags=P.FLAG_SYNC)
    op, flags, stream, ud, poff, plen, *a = P.SQE.unpack(rec)
    assert (op, flags, stream, ud, a) == (P.Op.MEMSET, P.FLAG_SYNC, 7, 9, [1, 2, 3, 4, 0])


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
    st.sampled_from([torch.contiguous_format, torch.channels_last]),
)
_refs = st.builds(
    lambda h, nd, off, dt: TensorRef(h, dt, tuple(range(1, nd + 1)), tuple(range(nd, 0, -1)), off),
    st.integers(1, 2**32 - 1),
    st.integers(0, 6),
    st.integers(0, 1000),
    st.sampled_from([torch.float32, torch.float16, torch.int32]),
)
_values = st.recursive(
    st.one_of(_scalars, _refs),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    args=st.lists(_values, max_size=5).map(tuple),
    kwargs=st.dictionaries(st.text(min_size=1, max_size=10), _values, max_size=3),
    outs=st.lists(st.tuples(st.integers(0, 2**40), _refs), max_size=3),
)
def test_launch_round_trip(args, kwargs, outs):
    buf = P.encode_launch("aten::add.Tensor", args, kwargs, outs)
    got = P.decode_launch(buf)
    assert got.op == "aten::add.Tensor"
    assert got.args == args
    assert got.kwargs == kwargs
    assert got.outputs == outs


def test_device_arguments_are_replaced_by_the_daemon_device():
    buf = P.encode_launch(
        "aten::empty.memory_format",
        ([2, 3],),
        {"device": torch.device("npu", 3) if False else torch.device("cpu")},
        [],
    )
    got = P.decode_launch(buf, device="DAEMON")
    assert got.kwargs["device"] == "DAEMON"


def test_unencodable_arguments_fail_clearly():
    with pytest.raises(TypeError, match="cannot send"):
        P.encode_launch("aten::x", (object(),), {}, [])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_decoder(data):
    try:
        P.decode_launch(data)
    except P.DecodeError:
        pass


def test_bit_flipped_payloads_raise_decode_error_or_decode():
    rng = random.Random(1)
    good = P.encode_launch(
        "aten::mm",
        (TensorRef(1, torch.float32, (2, 3), (3, 1), 0), TensorRef(2, torch.float32, (3, 4), (4, 1), 0)),
        {},
        [(32, TensorRef(3, torch.float32, (2, 4), (4, 1), 0))],
    )
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        try:
            P.decode_launch(bytes(b))
        except P.DecodeError:
            pass
