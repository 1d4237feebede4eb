"""The kubelet device plugin: FlexNPU's shared devices as a Kubernetes resource.

    flexnpu k8s-device-plugin --slots 4 --resource flexnpu.io/npu

Kubernetes places containers on nodes by the resources they request; a device plugin tells the
kubelet which devices of a resource a node has and what a container given some of them needs.
FlexNPU's daemons own the hardware and share each device among many processes, so this plugin
advertises SLOTS virtual devices per physical device (`npu<D>-slot<K>`) under one resource name,
and gives a container no device node: Allocate returns a mount of the node's runtime folder (the
daemons' control sockets) and the environment `flexnpu run` / the client library read
(FLEXNPU_RUNTIME_DIR, FLEXNPU_DEVICES, FLEXNPU_CLIENT_MEMORY_LIMIT, FLEXNPU_PHASE).

It speaks the kubelet device plugin API v1beta1 (gRPC over Unix sockets in the kubelet's
device-plugin folder): it serves DevicePlugin on <folder>/<endpoint>, registers that endpoint
with the kubelet's Registration service at <folder>/kubelet.sock, streams ListAndWatch updates
whenever a daemon's health changes (a daemon that stops answering makes its slots Unhealthy),
and registers again when the kubelet restarts (which removes plugin sockets).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from ..paths import SYSTEM_RUNTIME_DIR
from ..units import parse_bytes

log = logging.getLogger("flexnpu.k8s")

API_VERSION = "v1beta1"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"


def _stubs() -> tuple[Any, Any]:
    try:
        import grpc  # noqa: F401

        from . import api_pb2, api_pb2_grpc
    except ImportError as e:
        raise SystemExit(
            f"flexnpu k8s-device-plugin needs grpcio and protobuf ({e}); pip install 'flexnpu[k8s]'"
        ) from None
    return api_pb2, api_pb2_grpc


@dataclass
class PluginConfig:
    devices: list[int]
    slots: int = 4
    resource: str = "flexnpu.io/npu"
    kubelet_dir: Path = Path(KUBELET_DIR)
    endpoint: str = "flexnpu-npu.sock"
    runtime_dir: Path = SYSTEM_RUNTIME_DIR  # the daemons' sockets on the node
    container_runtime_dir: Path = SYSTEM_RUNTIME_DIR  # where a container sees them
    slot_memory: int | None = None  # device memory per slot (limit = slots x this)
    phase: str = "auto"
    health_interval: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def slot_ids(self) -> list[str]:
        return [f"npu{d}-slot{k}" for d in self.devices for k in range(self.slots)]


def parse_slot(device_id: str) -> tuple[int, int]:
    """`npu3-slot1` -> (3, 1); ValueError for anything else (the id comes from the kubelet)."""
    head, sep, tail = device_id.partition("-slot")
    if not sep or not head.startswith("npu") or not head[3:].isdigit() or not tail.isdigit():
        raise ValueError(f"not a FlexNPU slot id: {device_id!r}")
    return int(head[3:]), int(tail)


def daemon_healthy(runtime_dir: Path, device: int, timeout: float = 1.0) -> bool:
    """The device's daemon answers a status request."""
    from ..control import query

    try:
        return bool(query(str(runtime_dir / f"npu{device}.sock"), {"op": "status"}, timeout).get("ok"))
    except (OSError, ValueError, ConnectionError):
        return False


class DevicePluginServicer:
    """The DevicePlugin gRPC service (methods named as in api.proto)."""

    def __init__(self, cfg: PluginConfig) -> None:
        self.cfg = cfg
        self.pb, _ = _stubs()
        self.health: dict[int, bool] = {d: daemon_healthy(cfg.runtime_dir, d) for d in cfg.devices}
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()

    # -------------------------------------------------------------- health
    def check_health(self) -> bool:
        """Probe every daemon; True (and ListAndWatch streams a new list) if anything changed."""
        now = {d: daemon_healthy(self.cfg.runtime_dir, d) for d in self.cfg.devices}
        if now == self.health:
            return False
        for d in self.cfg.devices:
            if now[d] != self.health.get(d):
                log.warning("device %d is now %s", d, HEALTHY if now[d] else UNHEALTHY)
        with self._changed:
            self.health = now
            self._version += 1
            self._changed.notify_all()
        return True

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def _device_list(self) -> Any:
        pb = self.pb
        return pb.ListAndWatchResponse(
            devices=[
                pb.Device(ID=sid, health=HEALTHY if self.health.get(parse_slot(sid)[0]) else UNHEALTHY)
                for sid in self.cfg.slot_ids()
            ]
        )

    # -------------------------------------------------------------- rpc
    def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        return self.pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: Any, context: Any) -> Iterator[Any]:
        seen = -1
        while not self._stop.is_set() and context.is_active():
            with self._changed:
                if seen == self._version:
                    self._changed.wait(timeout=1.0)
                    if seen == self._version:
                        continue
                seen = self._version
                resp = self._device_list()
            yield resp

    def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        """Pack: a container's slots on as few devices as possible (best fit: the fullest device
        that still holds the whole request), so co-located instances share one device's daemon
        and scheduler; a request no device holds takes the emptiest devices first."""
        pb = self.pb
        out = []
        for req in request.container_requests:
            chosen = list(req.must_include_deviceIDs)
            need = max(0, req.allocation_size - len(chosen))
            free: dict[int, list[str]] = {}
            for sid in req.available_deviceIDs:
                if sid not in chosen:
                    try:
                        free.setdefault(parse_slot(sid)[0], []).append(sid)
                    except ValueError:
                        continue
            fits = sorted((d for d in free if len(free[d]) >= need), key=lambda d: (len(free[d]), d))
            order = fits[:1] if fits else sorted(free, key=lambda d: (-len(free[d]), d))
            for dev in order:
                take = sorted(free[dev], key=parse_slot)[
                    : need - (len(chosen) - len(req.must_include_deviceIDs))
                ]
                chosen += take
            out.append(
                pb.ContainerPreferredAllocationResponse(deviceIDs=chosen[: max(req.allocation_size, 0)])
            )
        return pb.PreferredAllocationResponse(container_responses=out)

    def Allocate(self, request: Any, context: Any) -> Any:
        import grpc

        pb, cfg = self.pb, self.cfg
        out = []
        for req in request.container_requests:
            try:
                slots = [parse_slot(sid) for sid in req.devices_ids]
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            per_device: dict[int, int] = {}
            for d, k in slots:
                if d not in cfg.devices or not 0 <= k < cfg.slots:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown slot npu{d}-slot{k}")
                per_device[d] = per_device.get(d, 0) + 1
            devices = sorted(per_device)
            envs = {
                "FLEXNPU_RUNTIME_DIR": str(cfg.container_runtime_dir),
                "FLEXNPU_DEVICES": ",".join(map(str, devices)),
                "FLEXNPU_PHASE": cfg.phase,
                **cfg.extra_env,
            }
            if cfg.slot_memory:
                # a client's limit covers its slots on one device (the most it holds on any)
                envs["FLEXNPU_CLIENT_MEMORY_LIMIT"] = str(cfg.slot_memory * max(per_device.values()))
            mounts = [
                pb.Mount(
                    container_path=str(cfg.container_runtime_dir),
                    host_path=str(cfg.runtime_dir),
                    read_only=False,
                )
            ]
            out.append(
                pb.ContainerAllocateResponse(
                    envs=envs, mounts=mounts, annotations={"flexnpu.io/slots": ",".join(req.devices_ids)}
                )
            )
        return pb.AllocateResponse(container_responses=out)

    def PreStartContainer(self, request: Any, context: Any) -> Any:
        return self.pb.PreStartContainerResponse()


class DevicePlugin:
    """Serve, register, watch health, re-register after a kubelet restart."""

    def __init__(self, cfg: PluginConfig) -> None:
        self.cfg = cfg
        self.pb, self.pb_grpc = _stubs()
        self.servicer = DevicePluginServicer(cfg)
        self.socket = cfg.kubelet_dir / cfg.endpoint
        self.server: Any = None
        self._stop = threading.Event()

    def start(self) -> None:
        import grpc

        if self.socket.exists() or self.socket.is_symlink():
            self.socket.unlink()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.pb_grpc.add_DevicePluginServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()
        self.register()

    def register(self, timeout: float = 10.0) -> None:
        import grpc

        kubelet = self.cfg.kubelet_dir / "kubelet.sock"
        with grpc.insecure_channel(f"unix://{kubelet}") as ch:
            stub = self.pb_grpc.RegistrationStub(ch)
            stub.Register(
                self.pb.RegisterRequest(
                    version=API_VERSION,
                    endpoint=self.cfg.endpoint,
                    resource_name=self.cfg.resource,
                    options=self.pb.DevicePluginOptions(get_preferred_allocation_available=True),
                ),
                timeout=timeout,
            )
        log.info(
            "registered %s (%d devices x %d slots) with the kubelet at %s",
            self.cfg.resource,
            len(self.cfg.devices),
            self.cfg.slots,
            kubelet,
        )

    def stop(self) -> None:
        self._stop.set()
        self.servicer.stop()
        if self.server is not None:
            self.server.stop(grace=1).wait()
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass

    def run_forever(self) -> None:
        """Health checks every health_interval; a vanished socket means the kubelet restarted
        (it wipes the folder): serve and register again."""
        while not self._stop.wait(self.cfg.health_interval):
            self.servicer.check_health()
            if not self.socket.exists():
                log.warning("plugin socket %s is gone (kubelet restart?); registering again", self.socket)
                try:
                    self.server.stop(grace=0)
                    self.start()
                except Exception as e:  # noqa: BLE001 - the kubelet may still be starting: retry
                    log.warning("registration failed: %s; retrying", e)


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--devices",
        default=env("FLEXNPU_K8S_DEVICES", "0"),
        help="physical devices to advertise, e.g. 0,1 (default 0)",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=int(env("FLEXNPU_K8S_SLOTS", "4")),
        help="virtual slots per device (default 4)",
    )
    p.add_argument(
        "--resource",
        default=env("FLEXNPU_K8S_RESOURCE", "flexnpu.io/npu"),
        help="extended resource name (default flexnpu.io/npu)",
    )
    p.add_argument(
        "--kubelet-dir",
        type=Path,
        default=Path(env("FLEXNPU_K8S_KUBELET_DIR", KUBELET_DIR)),
        help=f"the kubelet's device-plugin folder (default {KUBELET_DIR})",
    )
    p.add_argument("--endpoint", default="flexnpu-npu.sock", help="this plugin's socket name in that folder")
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=Path(env("FLEXNPU_RUNTIME_DIR", str(SYSTEM_RUNTIME_DIR))),
        help="the daemons' runtime folder on the node (default /run/flexnpu)",
    )
    p.add_argument(
        "--container-runtime-dir",
        type=Path,
        default=None,
        help="where containers see it (default: the same path)",
    )
    p.add_argument(
        "--slot-memory",
        default=env("FLEXNPU_K8S_SLOT_MEMORY"),
        help="device memory per slot, e.g. 16GiB: a container's limit is its slots x this",
    )
    p.add_argument(
        "--phase",
        default=env("FLEXNPU_K8S_PHASE", "auto"),
        choices=("auto", "prefill", "decode"),
        help="FLEXNPU_PHASE given to containers (a pod's own env wins)",
    )
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between daemon health checks")
    p.add_argument("--log-level", default=env("FLEXNPU_LOG_LEVEL", "info"))


def config_from_args(args: argparse.Namespace) -> PluginConfig:
    try:
        devices = sorted({int(x) for x in str(args.devices).split(",") if x.strip()})
    except ValueError:
        raise SystemExit(
            f"flexnpu k8s-device-plugin: --devices takes numbers like 0,1, not {args.devices!r}"
        ) from None
    if not devices or args.slots < 1:
        raise SystemExit("flexnpu k8s-device-plugin: needs at least one device and one slot")
    return PluginConfig(
        devices=devices,
        slots=args.slots,
        resource=args.resource,
        kubelet_dir=args.kubelet_dir,
        endpoint=args.endpoint,
        runtime_dir=args.runtime_dir,
        container_runtime_dir=args.container_runtime_dir or args.runtime_dir,
        slot_memory=parse_bytes(args.slot_memory) if args.slot_memory else None,
        phase=args.phase,
        health_interval=args.health_interval,
    )


def run(args: argparse.Namespace) -> int:
    import signal

    from ..logging_setup import setup_logging

    setup_logging(args.log_level)
    plugin = DevicePlugin(config_from_args(args))
    signal.signal(signal.SIGTERM, lambda *_: plugin._stop.set())
    signal.signal(signal.SIGINT, lambda *_: plugin._stop.set())
    while True:
        try:
            plugin.start()
            break
        except Exception as e:  # noqa: BLE001 - the kubelet may not be up yet
            log.warning("cannot register with the kubelet yet (%s); retrying in 5 s", e)
            plugin.server.stop(grace=0) if plugin.server is not None else None
            if plugin._stop.wait(5):
                return 0
    try:
        plugin.run_forever()
    finally:
        plugin.stop()
    return 0
