"""The kubelet PodResources source: wire decoding, device naming (UUIDs, MIG, replicas, GKE names, indexes),
a fake kubelet on a Unix socket (restart, garbage, unimplemented methods, a hang past the deadline), and
attribution through the real sampler and tracker, where every GPU's workload series still add up to its
energy, cost and grams exactly."""

from __future__ import annotations

import logging
import re
import socket
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fake_podresources import ALLOCATABLE, LIST, FakeKubelet, Pod, encode_list, length_delimited, tag, text
from tests.fakes import Clock, run_for
from tests.test_workloads_tracker import POD, GiB, gpu_value, make, scrape, series
from wattson.config import ConfigError, WorkloadsConfig, parse_config
from wattson.gpu.base import GpuIdentity, GpuProcess
from wattson.workloads import podresources as pr
from wattson.workloads.cgroup import Workload
from wattson.workloads.podresources import (
    DeviceMap,
    DeviceRef,
    GpuAliases,
    MalformedReply,
    MigDevice,
    PodHold,
    PodResourcesClient,
    PodResourcesSource,
    build_source,
    decode_allocatable_response,
    decode_list_response,
    identity_inventory,
    nvml_inventory,
)
from wattson.workloads.tracker import attach

PROTO = Path(__file__).resolve().parent.parent / "exporter" / "wattson" / "workloads" / "podresources_v1.proto"

GPU0 = "GPU-abcdef01-2345-6789-abcd-ef0123456789"
GPU1 = "GPU-22222222-3333-4444-5555-666666666666"
MIG_A = "MIG-aaaaaaaa-0000-5000-8000-000000000001"
MIG_B = "MIG-bbbbbbbb-0000-5000-8000-000000000002"
INVENTORY = [GpuAliases(GPU0, 0, 0), GpuAliases(GPU1, 1, 1, (MigDevice(MIG_A, 1, 0), MigDevice(MIG_B, 2, 1)))]
GPU = "nvidia.com/gpu"


class Mono:
    """A settable monotonic clock for the source."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source_for(path: str, inventory=INVENTORY, timeout: float = 2.0, **kw) -> PodResourcesSource:
    inv = inventory if callable(inventory) else (lambda: inventory)
    return PodResourcesSource(PodResourcesClient(path, timeout), inv, **kw)


@pytest.fixture
def kubelet(tmp_path):
    fake = FakeKubelet(str(tmp_path / "k.sock")).start()
    yield fake
    fake.stop()


def errors(src: PodResourcesSource) -> dict[str, int]:
    return dict(src.status.errors)


# -- the wire format -------------------------------------------------------------------------------------


def test_decoder_field_numbers_are_those_of_the_proto_file():
    """The hand-written decoder and podresources_v1.proto must agree on every field and method."""
    proto = PROTO.read_text()
    field = re.compile(r"^\s+(?:repeated\s+)?\w+\s+(\w+)\s*=\s*(\d+);", re.M)
    messages = {m.group(1): {f: int(n) for f, n in field.findall(m.group(2) or "")}
                for m in re.finditer(r"^message (\w+) \{(?:\}|(.*?)^\})", proto, re.M | re.S)}
    assert messages == {
        "ListPodResourcesRequest": {}, "AllocatableResourcesRequest": {},
        "ListPodResourcesResponse": {"pod_resources": 1},
        "AllocatableResourcesResponse": {"devices": 1},
        "PodResources": {"name": 1, "namespace": 2, "containers": 3},
        "ContainerResources": {"name": 1, "devices": 2},
        "ContainerDevices": {"resource_name": 1, "device_ids": 2},
    }
    package = re.search(r"^package (\w+);", proto, re.M).group(1)
    service = re.search(r"^service (\w+) \{", proto, re.M).group(1)
    rpcs = re.findall(r"rpc (\w+)\(", proto)
    assert [f"/{package}.{service}/{r}" for r in rpcs] == [pr.LIST_METHOD, pr.ALLOCATABLE_METHOD]


def test_decoding_keeps_names_and_devices_and_skips_everything_else():
    pods = [Pod("trainer-0", "research", {"main": [(GPU, [GPU0, GPU1]), ("example.com/nic", ["vf3"])],
                                          "sidecar": []}),
            Pod("idle", "default", {})]
    # an unknown field of every wire type inside a pod: varint, fixed64, length-delimited, fixed32
    unknown = tag(90, 0) + b"\x96\x01" + tag(91, 1) + bytes(8) + length_delimited(92, b"xyz") + tag(93, 5) + bytes(4)
    body = encode_list(pods)
    body += length_delimited(1, text(1, "extra") + unknown + text(2, "ns"))
    got = decode_list_response(body)
    assert [(p.namespace, p.name) for p in got] == [("research", "trainer-0"), ("default", "idle"), ("ns", "extra")]
    main, sidecar = got[0].containers
    assert main.name == "main" and sidecar.devices == ()
    assert [(d.resource_name, d.device_ids) for d in main.devices] == [(GPU, (GPU0, GPU1)),
                                                                       ("example.com/nic", ("vf3",))]
    assert decode_list_response(b"") == ()
    from tests.fake_podresources import encode_allocatable

    alloc = decode_allocatable_response(encode_allocatable([(GPU, [GPU0]), ("nvidia.com/mig-1g.10gb", [MIG_A])]))
    assert [(d.resource_name, d.device_ids) for d in alloc] == [(GPU, (GPU0,)), ("nvidia.com/mig-1g.10gb", (MIG_A,))]


@pytest.mark.parametrize("body, why", [
    (b"\x0a", "truncated varint"),
    (b"\x0a\x05ab", "runs past the end"),
    (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint longer"),
    (b"\x0b", "wire type 3"),  # a group
    (b"\x00\x01", "field number 0"),
    (b"\x08\x01", "expected a length-delimited field"),  # pod_resources as a varint
    (length_delimited(1, text(1, "p")), "without name or namespace"),
    (length_delimited(1, length_delimited(1, b"\xff\xfe") + text(2, "ns")), "not UTF-8"),
    (length_delimited(1, text(1, "p") + text(2, "ns") + length_delimited(3, b"\x12\x03\x0a")), "past the end"),
    (b"\x0d\x00\x00", "fixed-size field runs past the end"),
])
def test_malformed_replies_are_rejected_with_a_reason(body, why):
    with pytest.raises(MalformedReply, match=why):
        decode_list_response(body)


# -- device ids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_id, expected", [
    (GPU0, DeviceRef(GPU0, None, False)),
    (GPU0.upper().replace("GPU-", "GPU-"), DeviceRef(GPU0, None, False)),  # case does not matter
    (f"{GPU0}::3", DeviceRef(GPU0, None, True)),  # NVIDIA plugin: time-sliced / MPS replica
    (MIG_A, DeviceRef(GPU1, 1, False)),  # MIG device UUID -> parent GPU and its GPU instance
    (f"{MIG_B}::1", DeviceRef(GPU1, 2, True)),
    (f"MIG-{GPU1}/3/0", DeviceRef(GPU1, 3, False)),  # MIG UUIDs of drivers before R470
    ("nvidia0", DeviceRef(GPU0, None, False)),  # GKE
    ("nvidia1/gi2", DeviceRef(GPU1, 2, False)),
    ("nvidia0/vgpu3", DeviceRef(GPU0, None, True)),
    ("nvidia1/gi1/vgpu0", DeviceRef(GPU1, 1, True)),
    ("1", DeviceRef(GPU1, None, False)),  # NVIDIA plugin, --device-id-strategy=index
    ("1:1", DeviceRef(GPU1, 2, False)),
    ("1:0::2", DeviceRef(GPU1, 1, True)),
    ("GPU-ffffffff-0000-0000-0000-000000000000", None),  # a GPU wattson cannot see
    ("MIG-cccccccc-0000-5000-8000-000000000003", None),
    ("nvidia7", None), ("5", None), ("fpga0", None), ("", None),
])
def test_device_ids_of_every_plugin_name_this_hosts_gpus(device_id, expected):
    assert DeviceMap(INVENTORY).resolve(device_id) == expected


def test_gke_names_follow_the_minor_number_where_nvml_gives_it():
    devices = DeviceMap([GpuAliases(GPU0, 0, minor=3), GpuAliases(GPU1, 1, minor=0)])
    assert devices.resolve("nvidia3") == DeviceRef(GPU0, None, False)
    assert devices.resolve("nvidia0") == DeviceRef(GPU1, None, False)
    assert devices.resolve("nvidia1") is None
    without_minors = DeviceMap([GpuAliases(GPU0, 0), GpuAliases(GPU1, 1)])
    assert without_minors.resolve("nvidia1") == DeviceRef(GPU1, None, False)


def test_nvml_inventory_reads_minor_numbers_and_mig_devices():
    class NotFound(Exception):
        pass

    migs = {0: SimpleNamespace(uuid=MIG_A.encode() + b"\0", gi=1), 2: SimpleNamespace(uuid=MIG_B, gi=None)}

    def mig_handle(handle, i):
        if i not in migs:
            raise NotFound("no MIG device here")
        return migs[i]

    def gi(mig):
        if mig.gi is None:
            raise NotFound("not supported")
        return mig.gi

    def minor(handle):
        if handle == "h1":
            raise NotFound("not supported")
        return 4

    nvml = SimpleNamespace(nvmlDeviceGetMinorNumber=minor, nvmlDeviceGetMaxMigDeviceCount=lambda h: 3,
                           nvmlDeviceGetMigDeviceHandleByIndex=mig_handle, nvmlDeviceGetUUID=lambda m: m.uuid,
                           nvmlDeviceGetGpuInstanceId=gi)
    gpus = [SimpleNamespace(identity=GpuIdentity(0, GPU0, "H100", "0", "1"), device=SimpleNamespace(handle="h0")),
            SimpleNamespace(identity=GpuIdentity(1, GPU1, "A100", "1", "1", mig_enabled=True),
                            device=SimpleNamespace(handle="h1")),
            SimpleNamespace(identity=GpuIdentity(2, "GPU-sim", "L4", "2", "1"), device=object())]
    assert nvml_inventory(nvml, lambda: gpus)() == [
        GpuAliases(GPU0, 0, 4), GpuAliases(GPU1, 1, None, (MigDevice(MIG_A, 1, 0), MigDevice(MIG_B, None, 2))),
        GpuAliases("GPU-sim", 2)]


# -- the source against a fake kubelet ---------------------------------------------------------------------


def test_list_names_the_pod_and_container_holding_each_gpu(kubelet):
    kubelet.pods = [Pod("trainer-0", "research", {"main": [(GPU, [GPU0]), ("example.com/nic", ["vf3"])]}),
                    Pod("web", "default", {"app": []})]
    kubelet.allocatable = [(GPU, [GPU0, GPU1]), ("nvidia.com/mig-1g.10gb", [MIG_A, MIG_B])]
    src = source_for(kubelet.path)
    assert src.status.up is None and src.holds(GPU0) == ()
    src.poll_once()
    assert src.holds(GPU0) == (PodHold("research", "trainer-0", "main", GPU, GPU0, None, False, 0),)
    assert src.holds(GPU1) == ()
    assert src.status.up is True and src.status.errors == () and src.status.unmapped_devices == 0
    assert src.status.last_success == pytest.approx(time.time(), abs=5)
    assert kubelet.calls == {LIST: 1, ALLOCATABLE: 1}
    assert src.allocation_weights(src.holds(GPU0)) == [
        (Workload("pod", "research/trainer-0", "", "trainer-0", "research"), Fraction(1))]


def test_mig_profiles_map_to_the_parent_gpu_and_weigh_by_compute_slices(kubelet):
    kubelet.pods = [Pod("small", "ml", {"c": [("nvidia.com/mig-1g.10gb", [MIG_A])]}),
                    Pod("big", "ml", {"c": [("nvidia.com/mig-3g.40gb", [MIG_B])]})]
    src = source_for(kubelet.path)
    src.poll_once()
    holds = src.holds(GPU1)
    assert [(h.pod, h.gpu_instance, h.slices) for h in holds] == [("big", 2, 3), ("small", 1, 1)]
    assert [(w.id, n) for w, n in src.allocation_weights(holds)] == [("ml/big", 3), ("ml/small", 1)]


def test_time_sliced_replicas_share_a_gpu_equally_among_the_pods_holding_them(kubelet):
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [f"{GPU0}::0", f"{GPU0}::1"])]}),
                    Pod("b", "ns", {"c": [("nvidia.com/gpu.shared", [f"{GPU0}::2"])]})]
    src = source_for(kubelet.path)
    src.poll_once()
    assert all(h.replica for h in src.holds(GPU0)) and len(src.holds(GPU0)) == 3
    assert [(w.id, n) for w, n in src.allocation_weights(src.holds(GPU0))] == [("ns/a", 1), ("ns/b", 1)]


def test_gke_device_names_and_resource_patterns(kubelet):
    kubelet.pods = [Pod("p", "gke", {"c": [(GPU, ["nvidia1/gi2"])]}),
                    Pod("q", "gke", {"c": [(GPU, ["nvidia0/vgpu1"]), ("example.com/gpu", ["nvidia0"])]})]
    src = source_for(kubelet.path)
    src.poll_once()
    assert [(h.pod, h.gpu_instance, h.replica) for h in src.holds(GPU1)] == [("p", 2, False)]
    assert [(h.pod, h.device_id) for h in src.holds(GPU0)] == [("q", "nvidia0/vgpu1")]  # example.com/gpu: no GPU
    src2 = source_for(kubelet.path, resources=["example.com/*"])
    src2.poll_once()
    assert [(h.pod, h.resource) for h in src2.holds(GPU0)] == [("q", "example.com/gpu")]


def test_device_ids_that_match_no_gpu_are_counted_and_ask_nvml_again_later(kubelet):
    new_mig = "MIG-dddddddd-0000-5000-8000-000000000004"
    kubelet.pods = [Pod("p", "ns", {"c": [("nvidia.com/mig-2g.20gb", [new_mig])]})]
    kubelet.allocatable = [(GPU, ["GPU-ffffffff-0000-0000-0000-000000000000"])]
    mono = Mono()
    inventories = [INVENTORY, INVENTORY + [GpuAliases("GPU-x", 2, 2, (MigDevice(new_mig, 5, 0),))]]
    calls = []

    def inventory():
        calls.append(1)
        return inventories[min(len(calls), 2) - 1]

    src = source_for(kubelet.path, inventory, monotonic=mono)
    src.poll_once()
    assert src.status.unmapped_devices == 2 and len(calls) == 1
    mono.now += 10
    src.poll_once()
    assert len(calls) == 1  # not before INVENTORY_RETRY_SECONDS
    mono.now += pr.INVENTORY_RETRY_SECONDS
    src.poll_once()  # a MIG device created since: found now
    assert len(calls) == 2 and [(h.pod, h.gpu_instance, h.slices) for h in src.holds("GPU-x")] == [("p", 5, 2)]
    assert src.status.unmapped_devices == 1  # the allocatable GPU wattson cannot see


def test_kubelet_restart_removes_and_recreates_the_socket_and_the_client_reconnects(kubelet, caplog):
    caplog.set_level(logging.DEBUG, logger="wattson.workloads.kubelet")
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    src = source_for(kubelet.path)
    src.poll_once()
    assert src.status.up is True
    kubelet.stop()  # the kubelet goes away, and its socket with it
    src.poll_once()
    assert src.status.up is False and errors(src) == {"socket_missing": 1}
    assert [h.pod for h in src.holds(GPU0)] == ["a"]  # the last answer still serves, within max_age
    restarted = FakeKubelet(kubelet.path)
    restarted.pods = [Pod("b", "ns", {"c": [(GPU, [GPU0])]})]
    restarted.start()
    try:
        src.poll_once()
        assert src.status.up is True and [h.pod for h in src.holds(GPU0)] == ["b"]
        # restarted again while the client holds a connection: a new socket file, a new connection
        restarted.stop()
        again = FakeKubelet(kubelet.path)
        again.pods = [Pod("c", "ns", {"c": [(GPU, [GPU0])]})]
        again.start()
        try:
            src.poll_once()
            assert src.status.up is True and [h.pod for h in src.holds(GPU0)] == ["c"]
            assert "kubelet socket was recreated; reconnecting" in caplog.text
        finally:
            again.stop()
    finally:
        restarted.stop()
    assert errors(src) == {"socket_missing": 1}


def test_a_socket_nobody_listens_on_and_a_file_that_is_no_socket(tmp_path):
    stale = str(tmp_path / "stale.sock")  # left behind by a kubelet that died: connection refused
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(stale)
    sock.close()
    src = source_for(stale)
    src.poll_once()
    assert errors(src) == {"unavailable": 1} and src.status.up is False
    plain = tmp_path / "plain"
    plain.write_text("")
    src2 = source_for(str(plain))
    src2.poll_once()
    assert errors(src2) == {"socket_missing": 1}


def test_no_write_permission_on_the_socket_is_its_own_reason(kubelet, monkeypatch):
    monkeypatch.setattr(pr.os, "access", lambda path, mode: False)
    src = source_for(kubelet.path)
    src.poll_once()
    assert errors(src) == {"permission_denied": 1} and kubelet.calls == {}


def test_the_last_answer_is_trusted_for_max_age_seconds_only(kubelet):
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    mono = Mono()
    src = source_for(kubelet.path, monotonic=mono, max_age_seconds=30)
    src.poll_once()
    kubelet.mode = "garbage"
    mono.now += 29
    src.poll_once()
    assert errors(src) == {"malformed": 1} and len(src.holds(GPU0)) == 1
    mono.now += 2
    assert src.holds(GPU0) == ()  # too old: the tracker falls back to processes only


def test_garbage_replies_are_counted_as_malformed_and_logged_once(kubelet, caplog):
    caplog.set_level(logging.INFO, logger="wattson.workloads.kubelet")
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    kubelet.mode = "garbage"
    src = source_for(kubelet.path)
    for _ in range(3):
        src.poll_once()
    assert errors(src) == {"malformed": 3} and src.status.up is False and src.holds(GPU0) == ()
    assert caplog.text.count("kubelet PodResources API not usable") == 1
    kubelet.mode = "ok"
    src.poll_once()
    assert src.status.up is True and caplog.text.count("kubelet PodResources API answering") == 1


def test_an_unimplemented_allocatable_method_is_counted_once_and_list_still_works(kubelet):
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    kubelet.allocatable_implemented = False
    mono = Mono()
    src = source_for(kubelet.path, monotonic=mono)
    for _ in range(3):
        src.poll_once()
        mono.now += pr.ALLOCATABLE_EVERY_SECONDS
    assert errors(src) == {"unimplemented": 1} and src.status.up is True and len(src.holds(GPU0)) == 1


def test_an_unimplemented_list_is_a_failed_source(kubelet):
    kubelet.list_implemented = False
    src = source_for(kubelet.path)
    src.poll_once()
    assert errors(src) == {"unimplemented": 1} and src.status.up is False


def test_a_hanging_kubelet_costs_one_deadline_per_call(kubelet):
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    kubelet.mode = "hang"
    src = source_for(kubelet.path, timeout=0.3)
    started = time.monotonic()
    src.poll_once()
    assert time.monotonic() - started < 2.0
    assert errors(src) == {"timeout": 1} and src.status.up is False
    kubelet.mode = "ok"
    src.poll_once()
    assert src.status.up is True and len(src.holds(GPU0)) == 1


def test_the_poll_thread_runs_on_its_own_and_stops(kubelet):
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [GPU0])]})]
    src = source_for(kubelet.path, interval_seconds=1.0)
    src.start()
    try:
        deadline = time.monotonic() + 10
        while src.status.up is not True and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.status.up is True
    finally:
        src.stop()
    assert src._thread is not None and not src._thread.is_alive()


# -- configuration -----------------------------------------------------------------------------------------


def test_config_keys_defaults_and_validation(tmp_path):
    cfg = WorkloadsConfig()
    assert cfg.kubelet_pod_resources == "auto"
    assert cfg.kubelet_pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert cfg.kubelet_gpu_resources == list(pr.DEFAULT_GPU_RESOURCES)
    assert (cfg.kubelet_pod_resources_interval_seconds, cfg.kubelet_pod_resources_timeout_seconds,
            cfg.kubelet_pod_resources_max_age_seconds) == (5.0, 2.0, 60.0)
    with pytest.raises(ConfigError, match=r"workloads\.kubelet_pod_resources_max_age_seconds: .*at least"):
        parse_config("workloads: {kubelet_pod_resources_interval_seconds: 30, "
                     "kubelet_pod_resources_max_age_seconds: 10}\n")
    with pytest.raises(ConfigError, match=r"workloads\.kubelet_pod_resources"):
        parse_config("workloads: {kubelet_pod_resources: yes-please}\n")
    no_gpus: list = []
    absent = WorkloadsConfig(kubelet_pod_resources_socket=str(tmp_path / "missing" / "kubelet.sock"))
    assert build_source(absent, lambda: no_gpus, "simulated") is None  # auto, and no kubelet directory
    here = WorkloadsConfig(kubelet_pod_resources_socket=str(tmp_path / "kubelet.sock"))
    assert isinstance(build_source(here, lambda: no_gpus, "simulated"), PodResourcesSource)
    off = WorkloadsConfig(kubelet_pod_resources="off", kubelet_pod_resources_socket=str(tmp_path / "k.sock"))
    assert build_source(off, lambda: no_gpus, "simulated") is None
    on = WorkloadsConfig(kubelet_pod_resources="on", kubelet_pod_resources_socket=str(tmp_path / "x" / "k.sock"))
    assert isinstance(build_source(on, lambda: no_gpus, "simulated"), PodResourcesSource)


# -- through the sampler and the tracker ------------------------------------------------------------------


def conserved(tracker, capture, gpus) -> None:
    """Every GPU's workload series add up to exactly what the sampler accounted for it."""
    totals = tracker.exact_totals()
    for gpu in gpus:
        mine = [v for k, v in totals.items() if k[0] == gpu]
        assert sum((v["energy_joules"] for v in mine), Fraction(0)) == capture.energy[gpu].exact
        assert sum((v["co2e_grams"] for v in mine), Fraction(0)) == capture.grams[gpu].exact
        assert sum((v["cost"]["EUR"] for v in mine), Fraction(0)) == capture.cost[(gpu, "EUR")].exact


def with_kubelet(tracker, sampler, path, inventory=None) -> PodResourcesSource:
    src = source_for(path, inventory or identity_inventory(lambda: sampler.gpus))
    tracker.kubelet = src
    src.poll_once()
    assert src.status.up is True
    return src


def test_pods_without_visible_processes_are_charged_and_every_gpu_still_adds_up(kubelet):
    """GPU 0: a visible Slurm job, not the kubelet's; GPU 1: a process wattson cannot see in /proc (no hostPID)
    on a GPU the kubelet gave a pod; GPU 2: allocated but idle; GPU 3: no process list, allocated;
    GPU 4: idle and allocated to nobody."""
    clock = Clock()
    sampler, tracker, capture = make(clock, [{"kind": "slurm_job", "id": "4242", "gpus": [0]}], 5,
                                     wrap={1: (GpuProcess(999_999, 2 * GiB, 0.4),), 3: None})
    uuids = [g.identity.uuid for g in sampler.gpus]
    kubelet.pods = [Pod("infer-0", "serving", {"server": [(GPU, [uuids[1]])]}),
                    Pod("trainer-0", "research", {"main": [(GPU, [uuids[2]])]}),
                    Pod("batch-7", "jobs", {"main": [(GPU, [uuids[3]])]})]
    with_kubelet(tracker, sampler, kubelet.path)
    run_for(sampler, clock, 20, 1.3)
    conserved(tracker, capture, range(5))
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    assert set(energy) == {("0", "slurm_job", "4242"), ("1", "pod", "serving/infer-0"),
                           ("2", "pod", "research/trainer-0"), ("3", "pod", "jobs/batch-7"), ("4", "idle", "idle")}
    for gpu in range(5):
        parts = [v for (g, _, _), v in energy.items() if g == str(gpu)]
        assert sum(parts) == pytest.approx(gpu_value(m, "wattson_gpu_energy_joules_total", gpu), rel=1e-12)
    methods = {lb["gpu"]: lb["method"] for lb, _ in m["wattson_workload_attribution_info"]}
    assert methods == {"0": "sm_utilization", "1": "sm_utilization", "2": "pod_allocation", "3": "pod_allocation",
                       "4": "idle"}
    info = {(lb["kind"], lb["workload"]): lb for lb, _ in m["wattson_workload_info"]}
    assert (info[("pod", "serving/infer-0")]["pod"], info[("pod", "serving/infer-0")]["namespace"]) == (
        "infer-0", "serving")
    assert [v for _, v in m["wattson_kubelet_podresources_up"]] == [1]
    assert {lb["reason"]: v for lb, v in m["wattson_kubelet_podresources_errors_total"]} == dict.fromkeys(
        pr.ERROR_REASONS, 0)
    assert [v for _, v in m["wattson_kubelet_podresources_unmapped_devices"]] == [0]
    assert "wattson_kubelet_podresources_last_success_timestamp_seconds" in m


def test_a_shared_gpu_goes_to_the_pods_whose_processes_cannot_be_seen(kubelet):
    """GPU 0, time-sliced between pods a and b, runs two processes nobody can identify: equal shares. GPU 1 is
    shared by pod `trainer-0`, whose process is visible (and keeps its share, under its UID), and pod `other`,
    which gets the share of the process wattson cannot identify."""
    clock = Clock()
    jobs = [{"kind": "pod", "id": POD, "gpus": [1], "pod_name": "trainer-0", "namespace": "research", "load": 1.0}]
    sampler, tracker, capture = make(clock, jobs, 2, wrap={0: (GpuProcess(900_001, GiB, 0.3),
                                                               GpuProcess(900_002, GiB, 0.1)),
                                                           1: (GpuProcess(900_003, GiB, 0.25),)})
    g0, g1 = (g.identity.uuid for g in sampler.gpus)
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, [f"{g0}::0", f"{g0}::1"])]}),
                    Pod("b", "ns", {"c": [("nvidia.com/gpu.shared", [f"{g0}::2"])]}),
                    Pod("trainer-0", "research", {"main": [(GPU, [f"{g1}::0"])]}),
                    Pod("other", "research", {"main": [(GPU, [f"{g1}::1"])]})]
    with_kubelet(tracker, sampler, kubelet.path)
    run_for(sampler, clock, 10, 1.0)
    conserved(tracker, capture, range(2))
    energy = series(scrape(sampler), "wattson_workload_energy_joules_total")
    assert set(energy) == {("0", "pod", "ns/a"), ("0", "pod", "ns/b"), ("1", "pod", POD),
                           ("1", "pod", "research/other")}
    assert energy[("0", "pod", "ns/a")] == pytest.approx(energy[("0", "pod", "ns/b")], rel=1e-9)
    assert energy[("1", "pod", POD)] > 0 and energy[("1", "pod", "research/other")] > 0


def test_mig_processes_nobody_can_identify_go_to_the_pod_holding_their_instance(kubelet):
    clock = Clock()
    sampler, tracker, capture = make(clock, [], 1, wrap={0: (
        GpuProcess(900_001, 30 * GiB, None, 1), GpuProcess(900_002, 10 * GiB, None, 2),
        GpuProcess(900_003, 5 * GiB, None, 5))})  # instance 5: no pod holds it
    g0 = sampler.gpus[0].identity.uuid
    inventory = [GpuAliases(g0, 0, 0, (MigDevice(MIG_A, 1, 0), MigDevice(MIG_B, 2, 1)))]
    kubelet.pods = [Pod("small", "ml", {"c": [("nvidia.com/mig-1g.10gb", [MIG_A])]}),
                    Pod("big", "ml", {"c": [("nvidia.com/mig-3g.40gb", [MIG_B])]})]
    with_kubelet(tracker, sampler, kubelet.path, lambda: inventory)
    run_for(sampler, clock, 6, 1.0)
    conserved(tracker, capture, [0])
    m = scrape(sampler)
    energy = series(m, "wattson_workload_energy_joules_total")
    total = gpu_value(m, "wattson_gpu_energy_joules_total", 0)
    assert energy[("0", "pod", "ml/small")] == pytest.approx(total * 30 / 45, rel=1e-9)
    assert energy[("0", "pod", "ml/big")] == pytest.approx(total * 10 / 45, rel=1e-9)
    assert energy[("0", "unattributed", "unknown_process")] == pytest.approx(total * 5 / 45, rel=1e-9)
    assert [lb["method"] for lb, _ in m["wattson_workload_attribution_info"]] == ["mig_memory"]


def test_an_allocated_gpu_idle_after_its_process_ended_stays_on_the_pods_series(kubelet):
    """The pod's process was visible (so its UID is known); once it ended, the idle but still allocated GPU is
    charged to the same series, not to one named namespace/name."""
    clock = Clock()
    jobs = [{"kind": "pod", "id": POD, "gpus": [0], "pod_name": "trainer-0", "namespace": "research",
             "user": "alice", "uid": 1001, "end_seconds": 4.5}]
    sampler, tracker, capture = make(clock, jobs, 1)
    kubelet.pods = [Pod("trainer-0", "research", {"main": [(GPU, [sampler.gpus[0].identity.uuid])]})]
    with_kubelet(tracker, sampler, kubelet.path)
    run_for(sampler, clock, 10, 1.0)
    conserved(tracker, capture, [0])
    m = scrape(sampler)
    assert set(series(m, "wattson_workload_energy_joules_total")) == {("0", "pod", POD)}
    assert [lb["method"] for lb, _ in m["wattson_workload_attribution_info"]] == ["pod_allocation"]
    info = {(lb["kind"], lb["workload"]): lb for lb, _ in m["wattson_workload_info"]}
    assert info[("pod", POD)]["user"] == "alice"


def test_a_broken_kubelet_never_touches_the_gpu_metrics(tmp_path):
    """Garbage from the kubelet, then no kubelet at all: the source counts it, attribution falls back to the
    processes, and the GPUs' own metrics are exactly as without the kubelet."""
    fake = FakeKubelet(str(tmp_path / "k.sock")).start()
    fake.mode = "garbage"
    try:
        clock = Clock()
        sampler, tracker, capture = make(
            clock, [], 2, wrap={1: None}, kubelet_pod_resources="on",
            kubelet_pod_resources_socket=fake.path, kubelet_pod_resources_interval_seconds=1)
        src = tracker.kubelet
        assert src is not None
        deadline = time.monotonic() + 10
        while not dict(src.status.errors).get("malformed") and time.monotonic() < deadline:
            time.sleep(0.02)
        fake.stop()
        while not dict(src.status.errors).get("socket_missing") and time.monotonic() < deadline:
            time.sleep(0.02)
        run_for(sampler, clock, 5, 1.0)
        src.stop()
        conserved(tracker, capture, range(2))
        m = scrape(sampler)
        assert set(series(m, "wattson_workload_energy_joules_total")) == {("0", "idle", "idle"),
                                                                          ("1", "unattributed", "no_process_list")}
        assert [v for _, v in m["wattson_gpu_up"]] == [1, 1]
        for gpu in range(2):
            assert gpu_value(m, "wattson_gpu_energy_joules_total", gpu) == pytest.approx(5 * 70, rel=0.1)
        assert [v for _, v in m["wattson_kubelet_podresources_up"]] == [0]
        reasons = {lb["reason"]: v for lb, v in m["wattson_kubelet_podresources_errors_total"]}
        assert reasons["malformed"] >= 1 and reasons["socket_missing"] >= 1
        assert "wattson_kubelet_podresources_last_success_timestamp_seconds" not in m
    finally:
        fake.stop()


def test_attach_reads_the_kubelet_from_a_thread_and_the_first_scrape_shows_pods(kubelet):
    clock = Clock()
    from wattson.gpu.simulated import SimulatedBackend
    from wattson.sampler import Sampler

    backend = SimulatedBackend(1, "L4", ["idle"], 1, clock=clock.time, monotonic=clock.monotonic, jobs=[])
    sampler = Sampler(backend, clock=clock.time)
    sampler.start_backend()
    kubelet.pods = [Pod("a", "ns", {"c": [(GPU, ["nvidia0"])]})]
    tracker = attach(sampler, backend, WorkloadsConfig(enabled=True, kubelet_pod_resources="on",
                                                       kubelet_pod_resources_socket=kubelet.path))
    src = tracker.kubelet
    assert src is not None
    try:
        deadline = time.monotonic() + 10
        while src.status.up is None and time.monotonic() < deadline:
            time.sleep(0.02)
        sampler.sample_round()
        run_for(sampler, clock, 3, 1.0)
    finally:
        src.stop()
    assert set(series(scrape(sampler), "wattson_workload_energy_joules_total")) == {("0", "pod", "ns/a")}
