"""A fake kubelet PodResources API: a gRPC server on a Unix socket, in-process, serving what a test sets.

It encodes replies with a small protobuf writer of its own (independent of the decoder under test) and
puts in the fields wattson skips (CPU ids, memory, topology, dynamic resources), as a kubelet does. It can
answer garbage, hang past the client's deadline, leave GetAllocatableResources unimplemented, and stop
with its socket removed, as a restarting kubelet does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc

LIST = "/v1.PodResourcesLister/List"
ALLOCATABLE = "/v1.PodResourcesLister/GetAllocatableResources"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def text(number: int, value: str) -> bytes:
    return length_delimited(number, value.encode())


def packed_int64(number: int, values: Sequence[int]) -> bytes:
    return length_delimited(number, b"".join(varint(v) for v in values))


def topology(numa_node: int) -> bytes:
    return length_delimited(1, tag(1, 0) + varint(numa_node))  # TopologyInfo.nodes[0].ID


def container_devices(resource: str, ids: Sequence[str], numa_node: int | None = 0) -> bytes:
    body = text(1, resource) + b"".join(text(2, i) for i in ids)
    if numa_node is not None:
        body += length_delimited(3, topology(numa_node))
    return body


def memory(size: int) -> bytes:
    # ContainerMemory{memory_type, size (uint64), topology}
    return text(1, "memory") + tag(2, 0) + varint(size) + length_delimited(3, topology(0))


@dataclass
class Pod:
    name: str
    namespace: str
    # container name -> [(resource name, device ids)]
    containers: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


def encode_pod(pod: Pod) -> bytes:
    body = text(1, pod.name) + text(2, pod.namespace)
    for name, devices in pod.containers.items():
        container = text(1, name)
        for resource, ids in devices:
            container += length_delimited(2, container_devices(resource, ids))
        container += packed_int64(3, [2, 3])  # cpu_ids
        container += length_delimited(4, memory(1 << 30))
        container += length_delimited(5, text(2, "claim") + text(3, pod.namespace))  # a DRA claim
        body += length_delimited(3, container)
    return body


def encode_list(pods: Sequence[Pod]) -> bytes:
    return b"".join(length_delimited(1, encode_pod(p)) for p in pods)


def encode_allocatable(devices: Sequence[tuple[str, Sequence[str]]]) -> bytes:
    body = b"".join(length_delimited(1, container_devices(r, ids)) for r, ids in devices)
    return body + packed_int64(2, [0, 1, 2, 3]) + length_delimited(3, memory(64 << 30))


class FakeKubelet:
    """Serves List and GetAllocatableResources on `path`. Set `pods`, `allocatable`, `mode`
    ("ok", "garbage", "hang"), `list_implemented` and `allocatable_implemented` at any time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pods: list[Pod] = []
        self.allocatable: list[tuple[str, list[str]]] = []
        self.mode = "ok"
        self.list_implemented = True
        self.allocatable_implemented = True
        self.calls: dict[str, int] = {}
        self._release = threading.Event()
        self._server: grpc.Server | None = None

    def start(self) -> FakeKubelet:
        self._release.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        fake = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == LIST and fake.list_implemented:
                    return grpc.unary_unary_rpc_method_handler(fake._list)
                if details.method == ALLOCATABLE and fake.allocatable_implemented:
                    return grpc.unary_unary_rpc_method_handler(fake._allocatable)
                return None  # UNIMPLEMENTED

        server.add_generic_rpc_handlers((Handler(),))
        if server.add_insecure_port(f"unix:{self.path}") == 0:
            raise RuntimeError(f"cannot listen on {self.path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving; like a kubelet going away, the socket file goes too."""
        self._release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _reply(self, method: str, body: bytes) -> bytes:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.mode == "hang":
            self._release.wait(10)
        if self.mode == "garbage":
            return b"\x0a\xff\xff\xff\xff\x0fnot a protobuf message"
        return body

    def _list(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert request == b""  # ListPodResourcesRequest is empty
        return self._reply(LIST, encode_list(self.pods))

    def _allocatable(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        assert request == b""
        return self._reply(ALLOCATABLE, encode_allocatable(self.allocatable))
