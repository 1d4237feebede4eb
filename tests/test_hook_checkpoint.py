"""Checkpoints of npu tensors are standard torch checkpoints (storages tagged ``npu:N``, as
torch_npu writes them): FlexNPU -> plain torch, plain torch -> FlexNPU, torch_npu -> FlexNPU,
with weights_only on and every kind of map_location."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from _hookutil import hook_env
from conftest import child_env

# a subprocess with plain torch: no FlexNPU bootstrap, nothing named npu registered
_PLAIN = [sys.executable, "-c"]


def _plain(code: str, tmp_path) -> str:
    env = child_env()
    env.pop("FLEXNPU_RUNTIME_DIR", None)
    r = subprocess.run(_PLAIN + [code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def two_npus(tmp_path_factory):
    from conftest import DaemonProc

    d = tmp_path_factory.mktemp("ckpt-run")
    procs = [DaemonProc(d, 0, ["--backend", "cpu"]), DaemonProc(d, 1, ["--backend", "cpu"])]
    try:
        with hook_env(d, "0,1"):
            yield procs
    finally:
        for p in procs:
            p.stop()


def _reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=g)
    return {
        "w": base,
        "row": base[1],
        "col": base[:, 2],
        "half": torch.randn(3, generator=g).half(),
        "ids": torch.arange(5),
        "flag": torch.tensor([True, False]),
    }


def _pickled_text(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def test_flexnpu_checkpoint_loads_in_plain_torch(two_npus, tmp_path):
    ref = _reference()
    torch.save(ref, tmp_path / "ref.pt")
    on = {k: v.to("npu:1") for k, v in ref.items()}
    on["row"], on["col"] = on["w"][1], on["w"][:, 2]  # views of one allocation
    torch.save(on, tmp_path / "ck.pt")
    pk = _pickled_text(tmp_path / "ck.pt")
    assert b"flexnpu" not in pk and b"npu:1" in pk and b"_rebuild_tensor_v2" in pk
    out = _plain(
        "import torch\n"
        "ref = torch.load('ref.pt', weights_only=True)\n"
        "for ml in ('cpu', torch.device('cpu'), {'npu:1': 'cpu'}, lambda s, loc: s):\n"
        "    ck = torch.load('ck.pt', map_location=ml, weights_only=True)\n"
        "    assert ck.keys() == ref.keys()\n"
        "    for k in ref:\n"
        "        assert ck[k].device.type == 'cpu' and ck[k].dtype == ref[k].dtype and torch.equal(ck[k], ref[k]), k\n"
        "    assert ck['row'].untyped_storage().data_ptr() == ck['w'].untyped_storage().data_ptr()\n"
        "try:\n"
        "    torch.load('ck.pt', weights_only=True)\n"
        "except RuntimeError as e:\n"
        "    print('no-map:', e)\n",
        tmp_path,
    )
    # without map_location plain torch refuses exactly as it does for a torch_npu checkpoint
    assert "tagged with npu:1" in out


def test_plain_torch_checkpoint_loads_onto_npu(two_npus, tmp_path):
    _plain(
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "torch.manual_seed(0); [p.data.normal_() for p in m.parameters()]\n"
        "torch.save(m.state_dict(), 'cpu.pt')\n",
        tmp_path,
    )
    sd_cpu = torch.load(tmp_path / "cpu.pt", weights_only=True)
    for ml, dev in (
        ("npu", "npu:0"),
        ("npu:1", "npu:1"),
        (torch.device("npu", 1), "npu:1"),
        ({"cpu": "npu:1"}, "npu:1"),
        (lambda s, loc: s.npu(1), "npu:1"),
        (lambda s, loc: s.to(device="npu:0"), "npu:0"),
    ):
        sd = torch.load(tmp_path / "cpu.pt", map_location=ml, weights_only=True)
        for k, v in sd.items():
            assert str(v.device) == dev and torch.equal(v.cpu(), sd_cpu[k]), (ml, k)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to("npu")
    m.load_state_dict(torch.load(tmp_path / "cpu.pt", map_location="npu", weights_only=True))
    x = torch.randn(3, 4)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ref.load_state_dict(sd_cpu)
    assert torch.allclose(m(x.npu()).cpu(), ref(x), atol=1e-6)


def test_torch_npu_style_checkpoint_loads_under_flexnpu(two_npus, tmp_path):
    # torch_npu saves through torch's own _save: every storage is recorded with location_tag(),
    # which torch_npu's PrivateUse1 registration answers with "npu:<index>"
    _plain(
        "import torch\n"
        "torch.serialization.register_package(0, lambda s: 'npu:0', lambda s, loc: None)\n"
        "g = torch.Generator().manual_seed(7)\n"
        "base = torch.randn(4, 6, generator=g)\n"
        "torch.save({'w': base, 'row': base[1], 'b': torch.arange(3.0)}, 'tnpu.pt')\n",
        tmp_path,
    )
    assert b"npu:0" in _pickled_text(tmp_path / "tnpu.pt")
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    sd = torch.load(tmp_path / "tnpu.pt", weights_only=True)  # default: back onto npu:0
    assert {str(v.device) for v in sd.values()} == {"npu:0"}
    assert torch.equal(sd["w"].cpu(), base) and torch.equal(sd["row"].cpu(), base[1])
    assert sd["row"]._a is sd["w"]._a  # shared storage stays shared
    sd["w"][1].fill_(5.0)
    assert sd["row"].tolist() == [5.0] * 6
    sd1 = torch.load(tmp_path / "tnpu.pt", map_location={"npu:0": "npu:1"}, weights_only=True)
    assert str(sd1["b"].device) == "npu:1" and sd1["b"].tolist() == [0.0, 1.0, 2.0]
    cpu = torch.load(tmp_path / "tnpu.pt", map_location="cpu", weights_only=True)
    assert type(cpu["w"]) is torch.Tensor and torch.equal(cpu["w"], base)


def test_round_trip_under_flexnpu(two_npus, tmp_path):
    m = torch.nn.Linear(5, 3).to("npu")
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(2, 5, device="npu")).sum().backward()
    opt.step()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, tmp_path / "train.pt")
    ck = torch.load(tmp_path / "train.pt", map_location="npu", weights_only=True)
    for k, v in m.state_dict().items():
        assert torch.equal(ck["model"][k].cpu(), v.cpu())
    st = ck["opt"]["state"][0]
    assert str(st["exp_avg"].device) == "npu:0"
    assert torch.equal(st["exp_avg"].cpu(), opt.state[m.weight]["exp_avg"].cpu())
    # a whole module (parameters pickled as parameters)
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(m2.weight, torch.nn.Parameter) or getattr(m2.weight, "_is_param", False)
    assert m2.weight.requires_grad and torch.equal(m2.weight.cpu(), m.weight.cpu())
    # the host copy made for one save is not reused by the next
    w = torch.zeros(4, device="npu")
    torch.save(w, tmp_path / "a.pt")
    w.fill_(3.0)
    torch.save(w, tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", map_location="cpu").tolist() == [3.0] * 4
    # plain pickling and deepcopy keep values, device and independence
    p = pickle.loads(pickle.dumps(w))
    d = copy.deepcopy(w)
    assert str(p.device) == "npu:0" and p.tolist() == [3.0] * 4 and p._a is not w._a
    d.add_(1)
    assert d.tolist() == [4.0] * 4 and w.tolist() == [3.0] * 4


def test_checkpoint_of_earlier_flexnpu_versions_still_loads(two_npus, tmp_path):
    from flexnpu.hook.tensor import _restore_npu

    class Old:  # how earlier versions pickled an npu tensor
        def __reduce_ex__(self, proto):
            return (_restore_npu, (torch.arange(3.0), 0))

    torch.save({"x": Old()}, tmp_path / "old.pt")
    x = torch.load(tmp_path / "old.pt", weights_only=True)["x"]
    assert str(x.device) == "npu:0" and x.tolist() == [0.0, 1.0, 2.0]


def test_bad_locations(two_npus, tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "c.pt")
    with pytest.raises(RuntimeError, match="npu:5 is not available"):
        torch.load(tmp_path / "c.pt", map_location="npu:5", weights_only=True)


def test_npu_storages(two_npus):
    # torch would ask a PrivateUse1 allocator a Python backend cannot provide (it crashed)
    s = torch.UntypedStorage(16, device="npu:1")
    assert str(s.device) == "npu:1" and s.nbytes() == 16 and list(s.cpu()) == [0] * 16
    t = torch.empty(0, device="npu:1").set_(s, 1, (3,), (1,))
    t.fill_(2.0)
    assert torch.frombuffer(bytearray(s.cpu()), dtype=torch.float32).tolist() == [0.0, 2.0, 2.0, 2.0]
    h = torch.arange(4, dtype=torch.uint8).untyped_storage()
    assert list(h.npu(0).cpu()) == [0, 1, 2, 3] and list(h.to(device="npu:1").cpu()) == [0, 1, 2, 3]
    assert torch.UntypedStorage(4).device.type == "cpu"
