"""The Kubernetes device plugin (issue 15 item 3) against an in-process fake kubelet: a real gRPC
Registration server on a Unix socket, and the kubelet's side of ListAndWatch and Allocate as a
gRPC client of the plugin, with the published v1beta1 API's generated stubs."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from concurrent import futures

import pytest

from conftest import ROOT

grpc = pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'flexnpu[k8s]')")

from flexnpu.k8s import api_pb2 as pb, api_pb2_grpc as pb_grpc  # noqa: E402
from flexnpu.k8s.plugin import DevicePlugin, PluginConfig, parse_slot  # noqa: E402

SLOTS = 3


class FakeKubelet(pb_grpc.RegistrationServicer):
    def __init__(self, folder) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{folder / 'kubelet.sock'}")
        self.server.start()

    def Register(self, request, context):
        self.requests.put(request)
        return pb.Empty()


@pytest.fixture
def kubelet_dir(tmp_path):
    d = tmp_path / "device-plugins"
    d.mkdir()
    return d


def _plugin_stub(kubelet_dir, endpoint):
    ch = grpc.insecure_channel(f"unix://{kubelet_dir / endpoint}")
    return ch, pb_grpc.DevicePluginStub(ch)


def test_registers_lists_allocates_and_follows_daemon_health(
    start_daemon, runtime_dir, kubelet_dir, tmp_path
):
    d0 = start_daemon(device=0)
    start_daemon(device=1)
    kubelet = FakeKubelet(kubelet_dir)
    container_view = tmp_path / "container-run"  # where the container sees the sockets
    container_view.mkdir()
    cfg = PluginConfig(
        devices=[0, 1],
        slots=SLOTS,
        kubelet_dir=kubelet_dir,
        runtime_dir=runtime_dir,
        container_runtime_dir=container_view,
        slot_memory=64 << 20,
        phase="decode",
        health_interval=0.2,
    )
    plugin = DevicePlugin(cfg)
    plugin.start()
    runner = threading.Thread(target=plugin.run_forever, daemon=True)
    runner.start()
    ch = None
    try:
        reg = kubelet.requests.get(timeout=10)
        assert (reg.version, reg.resource_name, reg.endpoint) == ("v1beta1", "flexnpu.io/npu", cfg.endpoint)
        assert reg.options.get_preferred_allocation_available
        ch, stub = _plugin_stub(kubelet_dir, reg.endpoint)
        opts = stub.GetDevicePluginOptions(pb.Empty(), timeout=10)
        assert opts.get_preferred_allocation_available and not opts.pre_start_required

        watch = stub.ListAndWatch(pb.Empty(), timeout=120)
        first = next(watch)
        assert sorted(d.ID for d in first.devices) == sorted(
            f"npu{d}-slot{k}" for d in (0, 1) for k in range(SLOTS)
        )
        assert {d.health for d in first.devices} == {"Healthy"}

        pref = stub.GetPreferredAllocation(
            pb.PreferredAllocationRequest(
                container_requests=[
                    pb.ContainerPreferredAllocationRequest(
                        available_deviceIDs=["npu0-slot2", "npu1-slot0", "npu1-slot1", "npu1-slot2"],
                        allocation_size=2,
                    )
                ]
            ),
            timeout=10,
        )
        ids = list(pref.container_responses[0].deviceIDs)
        assert len(ids) == 2 and len({parse_slot(i)[0] for i in ids}) == 1  # packed on one device

        resp = stub.Allocate(
            pb.AllocateRequest(
                container_requests=[pb.ContainerAllocateRequest(devices_ids=["npu1-slot0", "npu1-slot2"])]
            ),
            timeout=10,
        )
        c = resp.container_responses[0]
        assert dict(c.envs) == {
            "FLEXNPU_RUNTIME_DIR": str(container_view),
            "FLEXNPU_DEVICES": "1",
            "FLEXNPU_PHASE": "decode",
            "FLEXNPU_CLIENT_MEMORY_LIMIT": str(2 * (64 << 20)),
        }
        assert [(m.host_path, m.container_path) for m in c.mounts] == [
            (str(runtime_dir), str(container_view))
        ]
        assert not c.devices
        with pytest.raises(grpc.RpcError) as ei:
            stub.Allocate(
                pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["gpu0"])]),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        _attach_like_a_container(c, container_view)

        d0.stop()  # the daemon of device 0 dies
        update = next(watch)
        health = {d.ID: d.health for d in update.devices}
        assert {h for i, h in health.items() if i.startswith("npu0-")} == {"Unhealthy"}
        assert {h for i, h in health.items() if i.startswith("npu1-")} == {"Healthy"}
        watch.cancel()

        # the kubelet restarts: it wipes the folder; the plugin serves and registers again
        os.unlink(kubelet_dir / cfg.endpoint)
        assert kubelet.requests.get(timeout=30).endpoint == cfg.endpoint
    finally:
        if ch is not None:
            ch.close()
        plugin.stop()
        kubelet.server.stop(0)


PROBE = """
import os
from flexnpu.client import Client
dev = int(os.environ["FLEXNPU_DEVICES"].split(",")[0])
c = Client(dev)
h = c.malloc(1 << 20)
c.memcpy_h2d(h, 0, b"k8s" * 10)
assert bytes(c.memcpy_d2h(h, 0, 30)) == b"k8s" * 10
print("ATTACHED", dev, c.memory_limit, c.memory_stats()["limit"] if "limit" in c.memory_stats() else "", flush=True)
c.close()
"""


def _attach_like_a_container(c, container_view) -> None:
    """A process in a fresh environment (only what Allocate gave, plus the interpreter's paths)
    and, where possible, its own mount namespace with Allocate's mounts, attaches and works."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **dict(c.envs)}
    cmd = [sys.executable, "-c", PROBE]
    if (
        os.geteuid() == 0
        and shutil.which("unshare")
        and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    ):
        binds = " && ".join(f"mount --bind {m.host_path} {m.container_path}" for m in c.mounts)
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{binds} && exec "$@"',
            "sh",
            *cmd,
        ]
    else:
        # no mount namespace here: make the container path show the host folder another way
        os.rmdir(container_view)
        os.symlink(c.mounts[0].host_path, container_view)
        pytest.skip("cannot create a mount namespace; Allocate checked without the attach")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    words = r.stdout.split()
    assert words[:3] == ["ATTACHED", "1", str(2 * (64 << 20))], r.stdout
    assert not os.listdir(container_view)  # the bind mount lived only in that namespace
