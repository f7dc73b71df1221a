"""Which pod holds which GPU, from the kubelet's PodResources API (v1) on its Unix socket.

Why: without the host's PIDs (no hostPID) NVML's processes cannot be told apart, and an allocated GPU
with no process on it looks idle; the kubelet still knows which pod and container each GPU was given to.
A background thread asks `List` every few seconds (and `GetAllocatableResources` now and then, to see
whether every GPU id the kubelet uses can be matched to a GPU here) and publishes an immutable mapping
GPU UUID -> holders, which the tracker reads per step. Socket calls never happen in a scrape or a
sampling round. A missing socket, a kubelet that does not answer within the deadline, or a reply that
does not decode costs this source only: counted by reason, logged once per change of state, and the
last good mapping is kept for `max_age_seconds`.

Why protobuf by hand: the two requests are empty messages (zero bytes on the wire) and the replies are
five small message types of strings and repeated fields whose numbers the v1 API has frozen
(podresources_v1.proto, checked by the tests). Decoding them takes a few dozen lines, skips unknown
fields like any protobuf reader and turns anything malformed into one error; generated _pb2 modules
would add the protobuf runtime and tie wattson to the protoc version that generated them. grpcio (a
wheel on PyPI) does the HTTP/2 and gRPC framing.

Device ids (`ContainerDevices.device_ids`) are whatever the device plugin calls its devices:

* NVIDIA's plugin: GPU UUIDs (`GPU-...`), MIG device UUIDs (`MIG-...`; `MIG-GPU-<uuid>/<gi>/<ci>` before
  driver R470), with `--device-id-strategy=index` NVML indexes (`0`, MIG `0:1` = parent index, MIG device
  index), and replicas of time-sliced or MPS-shared GPUs as `<id>::<n>`;
* GKE's plugin: `nvidia0` (the /dev/nvidia minor number), MIG partitions `nvidia0/gi1` (GPU instance id),
  time-shared GPUs `nvidia0/vgpu2` and `nvidia0/gi1/vgpu2`.

MIG devices map to their parent GPU (power and energy are measured per physical GPU) with the GPU instance
id where it is known, so a MIG process can be matched to the pod holding its instance.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from ..logfmt import kv
from .cgroup import KIND_POD, Workload
from .snapshot import KubeletStatus

if TYPE_CHECKING:
    from ..config import WorkloadsConfig

log = logging.getLogger("wattson.workloads.kubelet")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# Exclusive GPUs, time-sliced replicas renamed by the NVIDIA plugin, and MIG profiles (mixed strategy).
DEFAULT_GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*")

# wattson_workload_attribution_info{method}: no process seen (or no process list), the step went to the
# pods the kubelet allocated the GPU to.
METHOD_POD_ALLOCATION = "pod_allocation"

# wattson_kubelet_podresources_errors_total{reason}
ERROR_REASONS = ("socket_missing", "permission_denied", "unavailable", "timeout", "unimplemented", "malformed",
                 "rpc_error")

LIST_METHOD = "/v1.PodResourcesLister/List"
ALLOCATABLE_METHOD = "/v1.PodResourcesLister/GetAllocatableResources"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the kubelet's own limit for this API
ALLOCATABLE_EVERY_SECONDS = 60.0  # allocatable devices change only with the device plugin's configuration
INVENTORY_RETRY_SECONDS = 60.0  # an unknown device id asks NVML for MIG devices again at most this often


# -- protobuf wire format ----------------------------------------------------------------------------------


class MalformedReply(ValueError):
    """A reply that is not the message it should be."""


_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise MalformedReply("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise MalformedReply("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of one message; values of length-delimited
    fields are their bytes, of the others their integer."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MalformedReply("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise MalformedReply("length-delimited field runs past the end")
            yield number, wire, buf[pos:pos + size]
            pos += size
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > len(buf):
                raise MalformedReply("fixed-size field runs past the end")
            yield number, wire, int.from_bytes(buf[pos:pos + size], "little")
            pos += size
        else:
            raise MalformedReply(f"unsupported wire type {wire}")


def _bytes(wire: int, value: int | bytes, what: str) -> bytes:
    if wire != _LEN or not isinstance(value, bytes):
        raise MalformedReply(f"{what}: expected a length-delimited field, got wire type {wire}")
    return value


def _string(wire: int, value: int | bytes, what: str) -> str:
    try:
        return _bytes(wire, value, what).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedReply(f"{what}: not UTF-8") from None


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: tuple[ContainerDevices, ...]


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: tuple[ContainerResources, ...]


def _container_devices(buf: bytes) -> ContainerDevices:
    resource, ids = "", []
    for number, wire, value in _fields(buf):
        if number == 1:
            resource = _string(wire, value, "ContainerDevices.resource_name")
        elif number == 2:
            ids.append(_string(wire, value, "ContainerDevices.device_ids"))
    return ContainerDevices(resource, tuple(ids))


def _container_resources(buf: bytes) -> ContainerResources:
    name, devices = "", []
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _string(wire, value, "ContainerResources.name")
        elif number == 2:
            devices.append(_container_devices(_bytes(wire, value, "ContainerResources.devices")))
    return ContainerResources(name, tuple(devices))


def _pod_resources(buf: bytes) -> PodResources:
    name, namespace, containers = "", "", []
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _string(wire, value, "PodResources.name")
        elif number == 2:
            namespace = _string(wire, value, "PodResources.namespace")
        elif number == 3:
            containers.append(_container_resources(_bytes(wire, value, "PodResources.containers")))
    if not name or not namespace:
        raise MalformedReply("a pod without name or namespace")
    return PodResources(name, namespace, tuple(containers))


def decode_list_response(buf: bytes) -> tuple[PodResources, ...]:
    """ListPodResourcesResponse -> its pods. Raises MalformedReply."""
    return tuple(_pod_resources(_bytes(wire, value, "ListPodResourcesResponse.pod_resources"))
                 for number, wire, value in _fields(buf) if number == 1)


def decode_allocatable_response(buf: bytes) -> tuple[ContainerDevices, ...]:
    """AllocatableResourcesResponse -> its devices (CPU ids and memory are skipped). Raises MalformedReply."""
    return tuple(_container_devices(_bytes(wire, value, "AllocatableResourcesResponse.devices"))
                 for number, wire, value in _fields(buf) if number == 1)


# -- the gRPC client ---------------------------------------------------------------------------------------


class PodResourcesError(Exception):
    """A failed call; `reason` is one of ERROR_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason if reason in ERROR_REASONS else "rpc_error"


class PodResourcesClient:
    """Unary calls to the kubelet over its Unix socket, each with a deadline.

    The channel is made again when a call fails for want of a connection, or when the socket file was
    replaced (a kubelet restart recreates it): gRPC's own reconnection backs off for up to two minutes,
    and the socket's directory, not the socket, is what a DaemonSet mounts, so the new one is right there.
    """

    def __init__(self, socket_path: str, timeout_seconds: float) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds
        self._channel: Any = None
        self._socket_id: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def list(self) -> tuple[PodResources, ...]:
        return self._call(LIST_METHOD, decode_list_response)  # type: ignore[no-any-return]

    def allocatable(self) -> tuple[ContainerDevices, ...]:
        return self._call(ALLOCATABLE_METHOD, decode_allocatable_response)  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        channel, self._channel, self._socket_id = self._channel, None, None
        if channel is not None:
            try:
                channel.close()
            except Exception:  # closing a broken channel: nothing left to release
                pass

    def _call(self, method: str, decode: Callable[[bytes], Any]) -> Any:
        # gRPC's core writes lines of its own to stderr (a GOAWAY at each kubelet restart), outside wattson's
        # logfmt; keep them to errors unless the user asked for more.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        try:
            import grpc
        except ImportError as exc:  # a declared dependency; only a broken install lacks it
            raise PodResourcesError("rpc_error", f"grpcio is not installed: {exc}") from None
        with self._lock:
            channel = self._connect(grpc)
        try:
            reply = channel.unary_unary(method)(b"", timeout=self.timeout_seconds)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            reason = {grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.UNAVAILABLE: "unavailable",
                      grpc.StatusCode.UNIMPLEMENTED: "unimplemented"}.get(code, "rpc_error")
            if reason in ("timeout", "unavailable"):
                self.close()  # start from a fresh connection next time
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise PodResourcesError(reason, f"{method}: {getattr(code, 'name', code)}: {details}") from None
        except ValueError as exc:  # grpc raises it for a channel closed under the call (stop())
            raise PodResourcesError("unavailable", f"{method}: {exc}") from None
        except Exception as exc:  # anything else grpc may raise: this source's failure, never the caller's
            raise PodResourcesError("rpc_error", f"{method}: {type(exc).__name__}: {exc}") from None
        if not isinstance(reply, bytes):
            raise PodResourcesError("malformed", f"{method}: reply is {type(reply).__name__}, not bytes")
        try:
            return decode(reply)
        except MalformedReply as exc:
            raise PodResourcesError("malformed", f"{method}: {exc}") from None

    def _connect(self, grpc: ModuleType) -> Any:
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            self._close()
            raise PodResourcesError("socket_missing", f"{self.socket_path} does not exist") from None
        except PermissionError:
            self._close()
            raise PodResourcesError("permission_denied", f"cannot reach {self.socket_path}") from None
        except OSError as exc:
            self._close()
            raise PodResourcesError("unavailable", f"{self.socket_path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            self._close()
            raise PodResourcesError("socket_missing", f"{self.socket_path} is not a socket")
        if not os.access(self.socket_path, os.W_OK):
            self._close()
            raise PodResourcesError("permission_denied", f"no write permission on {self.socket_path} "
                                    "(connecting to a Unix socket needs it; the kubelet's is root's)")
        socket_id = (st.st_dev, st.st_ino, st.st_ctime_ns)  # a new socket may reuse the inode number
        if self._channel is not None and socket_id != self._socket_id:
            log.debug("kubelet socket was recreated; reconnecting", extra=kv(socket=self.socket_path))
            self._close()
        if self._channel is None:
            # Over a Unix socket the authority would be the path, which HTTP/2 servers reject.
            self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(self.socket_path)}", options=[
                ("grpc.default_authority", "localhost"),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
                ("grpc.enable_http_proxy", 0),
            ])
            self._socket_id = socket_id
        return self._channel


# -- device ids -> this host's GPUs -----------------------------------------------------------------------


@dataclass(frozen=True)
class MigDevice:
    uuid: str  # MIG-...
    gpu_instance: int | None = None  # NVML GPU instance id, as GpuProcess.gpu_instance_id
    index: int | None = None  # NVML's MIG device index on the parent (the NVIDIA plugin's `0:<index>`)


@dataclass(frozen=True)
class GpuAliases:
    """Every name a device plugin may give one of this host's GPUs."""

    uuid: str
    index: int  # NVML index
    minor: int | None = None  # /dev/nvidia<minor>, where known
    migs: tuple[MigDevice, ...] = ()


@dataclass(frozen=True)
class DeviceRef:
    gpu_uuid: str
    gpu_instance: int | None  # MIG GPU instance, where the id names one and it is known
    replica: bool  # a share of a time-sliced or MPS-shared device


_REPLICA = re.compile(r"^(.+)::(\d+)$")  # NVIDIA plugin: <id>::<replica>
_GKE = re.compile(r"^nvidia(\d+)(?:/gi(\d+))?(?:/vgpu(\d+))?$")
_INDEX = re.compile(r"^(\d+)(?::(\d+))?$")
_OLD_MIG = re.compile(r"^MIG-(GPU-[0-9A-Fa-f-]+)/(\d+)/(\d+)$")  # drivers before R470
_MIG_SLICES = re.compile(r"(?:^|[/.-])mig-(\d+)g\.")  # nvidia.com/mig-3g.40gb: 3 compute slices


class DeviceMap:
    """Device id -> (GPU UUID, GPU instance, replica); immutable once built."""

    def __init__(self, gpus: Sequence[GpuAliases]) -> None:
        self.gpus = tuple(gpus)
        self._by_uuid = {g.uuid.lower(): g for g in gpus}
        self._by_index = {g.index: g for g in gpus}
        self._by_minor = {g.minor: g for g in gpus if g.minor is not None}
        self._migs = {m.uuid.lower(): (g, m) for g in gpus for m in g.migs}

    def resolve(self, device_id: str) -> DeviceRef | None:
        text, replica = device_id.strip(), False
        m = _REPLICA.match(text)
        if m:
            text, replica = m.group(1), True
        upper = text.upper()
        if upper.startswith("GPU-"):
            gpu = self._by_uuid.get(text.lower())
            return DeviceRef(gpu.uuid, None, replica) if gpu else None
        m = _OLD_MIG.match(text)
        if m:
            gpu = self._by_uuid.get(m.group(1).lower())
            return DeviceRef(gpu.uuid, int(m.group(2)), replica) if gpu else None
        if upper.startswith("MIG-"):
            hit = self._migs.get(text.lower())
            return DeviceRef(hit[0].uuid, hit[1].gpu_instance, replica) if hit else None
        m = _GKE.match(text)
        if m:
            number = int(m.group(1))
            gpu = self._by_minor.get(number) if self._by_minor else self._by_index.get(number)
            if gpu is None:
                return None
            gi = int(m.group(2)) if m.group(2) is not None else None
            return DeviceRef(gpu.uuid, gi, replica or m.group(3) is not None)
        m = _INDEX.match(text)
        if m:
            gpu = self._by_index.get(int(m.group(1)))
            if gpu is None:
                return None
            gi = None
            if m.group(2) is not None:
                mig_index = int(m.group(2))
                gi = next((d.gpu_instance for d in gpu.migs if d.index == mig_index), None)
            return DeviceRef(gpu.uuid, gi, replica)
        return None


def identity_inventory(gpus: Callable[[], Sequence[Any]]) -> Callable[[], list[GpuAliases]]:
    """UUIDs and indexes of the sampler's GPUs: all a backend without NVML handles can tell."""
    def inventory() -> list[GpuAliases]:
        return [GpuAliases(g.identity.uuid, g.identity.index) for g in list(gpus())]
    return inventory


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(value).split("\0", 1)[0].strip()


def nvml_inventory(nvml: ModuleType, gpus: Callable[[], Sequence[Any]]) -> Callable[[], list[GpuAliases]]:
    """UUIDs, indexes, minor numbers and MIG devices (UUID, GPU instance, index) from NVML, per GPU the
    sampler reads; anything NVML does not answer is left unknown. Runs in the kubelet thread, rarely."""
    def inventory() -> list[GpuAliases]:
        out = []
        for g in list(gpus()):
            ident = g.identity
            handle = getattr(g.device, "handle", None)
            if handle is None:
                out.append(GpuAliases(ident.uuid, ident.index))
                continue
            minor: int | None
            try:
                minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
            except Exception:  # not supported (WSL, some vGPUs) or transient: index is the fallback
                minor = None
            migs: list[MigDevice] = []
            if ident.mig_enabled:
                try:
                    count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
                except Exception as exc:
                    log.debug("cannot count MIG devices", extra=kv(gpu=ident.index, err=str(exc)))
                    count = 0
                for i in range(count):
                    try:
                        mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
                        uuid = _text(nvml.nvmlDeviceGetUUID(mig))
                    except Exception:  # NotFound: no MIG device in this slot
                        continue
                    gi: int | None
                    try:
                        gi = int(nvml.nvmlDeviceGetGpuInstanceId(mig))
                    except Exception:
                        gi = None
                    migs.append(MigDevice(uuid, gi, i))
            out.append(GpuAliases(ident.uuid, ident.index, minor, tuple(migs)))
        return out
    return inventory


# -- the source ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodHold:
    """One GPU device (or a share of it) the kubelet allocated to a container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_id: str
    gpu_instance: int | None  # MIG GPU instance, where known
    replica: bool  # a time-sliced / shared replica
    slices: int  # MIG compute slices from the resource name (mig-3g.40gb: 3); 0 for a whole GPU or a replica


@dataclass(frozen=True)
class _Mapping:
    holds: Mapping[str, tuple[PodHold, ...]]  # GPU UUID -> holders, sorted
    fetched: float  # monotonic time of the List it came from


_EMPTY = _Mapping(MappingProxyType({}), float("-inf"))


class PodResourcesSource:
    """Polls the kubelet from its own thread and serves, lock-free, what it last learned.

    Read from the GPU reader threads: holds(), allocation_weights(), assign(), learn(); from the
    sampler thread: status.
    """

    def __init__(self, client: PodResourcesClient, inventory: Callable[[], Sequence[GpuAliases]], *,
                 resources: Sequence[str] = DEFAULT_GPU_RESOURCES, interval_seconds: float = 5.0,
                 max_age_seconds: float = 60.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.inventory = inventory
        self.resources = tuple(resources)
        self.interval_seconds = interval_seconds
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self.monotonic = monotonic
        self.status = KubeletStatus(None, (), None, 0)
        self._mapping = _EMPTY
        self._device_map: DeviceMap | None = None
        self._inventory_at = float("-inf")
        self._errors: dict[str, int] = {}
        self._condition: str | None = None  # "ok" or the last failure's reason, for logging changes only
        self._allocatable_supported = True
        self._allocatable_at = float("-inf")
        self._allocatable_unmapped: frozenset[str] = frozenset()
        self._logged_unmapped: frozenset[str] = frozenset()
        # (namespace, pod) -> the pod's workload as a visible process of it resolved (with its UID)
        self._learned: dict[tuple[str, str], Workload] = {}
        self._learned_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the GPU reader threads ----------------------------------------------------------------------------

    def holds(self, uuid: str) -> tuple[PodHold, ...]:
        """The pods holding this GPU per the last List, () when none do or that List is too old to trust."""
        mapping = self._mapping
        if self.monotonic() - mapping.fetched > self.max_age_seconds:
            return ()
        return mapping.holds.get(uuid, ())

    def learn(self, workload: Workload) -> None:
        """Remember the identity a visible process of a pod resolved to (its UID, owner), so the steps
        charged to that pod through the kubelet land on the same series."""
        if workload.kind != KIND_POD or not workload.pod or not workload.namespace:
            return
        key = (workload.namespace, workload.pod)
        if self._learned.get(key) != workload:
            with self._learned_lock:
                self._learned[key] = workload

    def workload(self, namespace: str, pod: str) -> Workload:
        """The pod's workload: the one its processes resolved to, else `namespace/name` (the API has no UID)."""
        known = self._learned.get((namespace, pod))
        return known if known is not None else Workload(KIND_POD, f"{namespace}/{pod}", pod=pod, namespace=namespace)

    def allocation_weights(self, holds: Sequence[PodHold]) -> list[tuple[Workload, Fraction]]:
        """Each holding pod's weight: its MIG compute slices on this GPU, else 1 (a whole GPU, or any number
        of replicas of a shared one: replicas buy no more GPU time)."""
        slices: dict[tuple[str, str], int] = {}
        for h in holds:
            key = (h.namespace, h.pod)
            slices[key] = slices.get(key, 0) + h.slices
        return [(self.workload(ns, pod), Fraction(max(1, n))) for (ns, pod), n in sorted(slices.items())]

    def assign(self, holds: Sequence[PodHold], unresolved: Sequence[tuple[int | None, Fraction]],
               resolved_pods: Collection[tuple[str, str]]) -> list[tuple[Workload | None, Fraction]]:
        """Give the weights of processes wattson cannot identify (no /proc entry: no hostPID) to the pods
        holding the GPU: under MIG to the pod holding the process's GPU instance; preferring pods none of whose
        processes were identified on this GPU. None: no holder fits (the caller keeps it unattributed)."""
        out: list[tuple[Workload | None, Fraction]] = []
        for gpu_instance, weight in unresolved:
            candidates = list(holds)
            if gpu_instance is not None:
                candidates = ([h for h in holds if h.gpu_instance == gpu_instance]
                              or [h for h in holds if h.gpu_instance is None])
            if not candidates:
                out.append((None, weight))
                continue
            unseen = [h for h in candidates if (h.namespace, h.pod) not in resolved_pods]
            pods = self.allocation_weights(unseen or candidates)
            total = sum((w for _, w in pods), Fraction(0))
            out.extend((workload, weight * w / total) for workload, w in pods)
        return out

    # -- the poll thread -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kubelet-podresources", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug here must not end the thread: the next poll tries again
                log.exception("kubelet PodResources poll failed")
            self._stop.wait(self.interval_seconds)

    def poll_once(self) -> None:
        """One List (and, now and then, GetAllocatableResources); publishes the mapping and the status."""
        try:
            pods = self.client.list()
        except PodResourcesError as exc:
            self._failed(exc)
            return
        fetched = self.monotonic()
        holds, unmapped = self._holds(pods)
        self._check_allocatable(fetched)
        self._mapping = _Mapping(MappingProxyType(holds), fetched)
        self._forget_gone_pods({(p.namespace, p.name) for p in pods})
        unmapped |= self._allocatable_unmapped
        if unmapped - self._logged_unmapped:
            log.warning("kubelet names GPU devices that match none of this host's GPUs; their pods are not "
                        "charged through the kubelet", extra=kv(devices=",".join(sorted(unmapped)[:8]),
                                                               count=len(unmapped)))
        self._logged_unmapped = frozenset(unmapped)
        if self._condition != "ok":
            log.info("kubelet PodResources API answering", extra=kv(
                socket=self.client.socket_path, pods=len(pods), gpus_held=len(holds)))
            self._condition = "ok"
        self.status = KubeletStatus(True, tuple(sorted(self._errors.items())), self.clock(), len(unmapped))

    def _failed(self, exc: PodResourcesError) -> None:
        self._errors[exc.reason] = self._errors.get(exc.reason, 0) + 1
        if self._condition != exc.reason:
            log.warning("kubelet PodResources API not usable; pods holding GPUs are charged from the last good "
                        "answer for max_age_seconds, then only through their visible processes",
                        extra=kv(socket=self.client.socket_path, reason=exc.reason, err=str(exc)))
            self._condition = exc.reason
        prev = self.status
        self.status = KubeletStatus(False, tuple(sorted(self._errors.items())), prev.last_success,
                                    prev.unmapped_devices)

    def _is_gpu(self, resource: str) -> bool:
        return any(fnmatch.fnmatchcase(resource, pattern) for pattern in self.resources)

    def _devices(self, ids: Collection[str]) -> DeviceMap:
        """The device map, built again from the inventory when it is missing, or when it cannot map an id
        (a MIG device created since, a GPU found again after a driver reload), at most every
        INVENTORY_RETRY_SECONDS."""
        now = self.monotonic()
        devices = self._device_map
        stale = devices is None or (now - self._inventory_at >= INVENTORY_RETRY_SECONDS
                                    and any(devices.resolve(i) is None for i in ids))
        if stale:
            self._inventory_at = now
            try:
                devices = DeviceMap(self.inventory())
            except Exception:
                log.exception("GPU inventory for the kubelet's device ids failed")
                devices = devices or DeviceMap(())
            self._device_map = devices
        assert devices is not None
        return devices

    def _holds(self, pods: Sequence[PodResources]) -> tuple[dict[str, tuple[PodHold, ...]], set[str]]:
        entries = [(pod, container, dev.resource_name, device_id)
                   for pod in pods for container in pod.containers for dev in container.devices
                   if self._is_gpu(dev.resource_name) for device_id in dev.device_ids]
        devices = self._devices({e[3] for e in entries})
        by_gpu: dict[str, set[PodHold]] = {}
        unmapped: set[str] = set()
        for pod, container, resource, device_id in entries:
            ref = devices.resolve(device_id)
            if ref is None:
                unmapped.add(device_id)
                continue
            m = _MIG_SLICES.search(resource)
            slices = int(m.group(1)) if m else (1 if ref.gpu_instance is not None else 0)
            by_gpu.setdefault(ref.gpu_uuid, set()).add(PodHold(
                pod.namespace, pod.name, container.name, resource, device_id, ref.gpu_instance, ref.replica,
                slices))
        return {uuid: tuple(sorted(h, key=_hold_order)) for uuid, h in by_gpu.items()}, unmapped

    def _check_allocatable(self, now: float) -> None:
        """Which GPU ids the kubelet can hand out that cannot be mapped here (a naming wattson does not know
        shows before any pod asks for such a GPU). Optional: a kubelet without it is asked once."""
        if not self._allocatable_supported or now - self._allocatable_at < ALLOCATABLE_EVERY_SECONDS:
            return
        self._allocatable_at = now
        try:
            devices = self.client.allocatable()
        except PodResourcesError as exc:
            self._errors[exc.reason] = self._errors.get(exc.reason, 0) + 1
            if exc.reason == "unimplemented":
                self._allocatable_supported = False
                log.info("kubelet does not serve GetAllocatableResources; not asking again",
                         extra=kv(err=str(exc)))
            else:
                log.debug("GetAllocatableResources failed", extra=kv(reason=exc.reason, err=str(exc)))
            return
        ids = {i for d in devices if self._is_gpu(d.resource_name) for i in d.device_ids}
        mapping = self._devices(ids)
        self._allocatable_unmapped = frozenset(i for i in ids if mapping.resolve(i) is None)

    def _forget_gone_pods(self, live: set[tuple[str, str]]) -> None:
        if any(key not in live for key in self._learned):
            with self._learned_lock:
                self._learned = {k: w for k, w in self._learned.items() if k in live}


def _hold_order(h: PodHold) -> tuple[str, str, str, str]:
    return (h.namespace, h.pod, h.container, h.device_id)


def build_source(cfg: WorkloadsConfig, gpus: Callable[[], Sequence[Any]], backend_name: str
                 ) -> PodResourcesSource | None:
    """The configured source, not started; None when off (or `auto` and no kubelet directory here)."""
    mode = cfg.kubelet_pod_resources
    socket_path = cfg.kubelet_pod_resources_socket
    if mode == "off":
        return None
    if mode == "auto" and not os.path.isdir(os.path.dirname(socket_path) or "."):
        log.debug("no kubelet PodResources directory; pods are known through their processes only",
                  extra=kv(socket=socket_path))
        return None
    if backend_name == "nvml":
        import pynvml

        inventory = nvml_inventory(pynvml, gpus)
    else:
        inventory = identity_inventory(gpus)
    client = PodResourcesClient(socket_path, cfg.kubelet_pod_resources_timeout_seconds)
    log.info("pods holding GPUs are read from the kubelet", extra=kv(
        socket=socket_path, interval_seconds=cfg.kubelet_pod_resources_interval_seconds,
        resources=",".join(cfg.kubelet_gpu_resources)))
    return PodResourcesSource(client, inventory, resources=cfg.kubelet_gpu_resources,
                              interval_seconds=cfg.kubelet_pod_resources_interval_seconds,
                              max_age_seconds=cfg.kubelet_pod_resources_max_age_seconds)
