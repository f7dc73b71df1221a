"""Who a GPU process belongs to: its Slurm job, Kubernetes pod, container, or Unix user.

Read from `<proc_root>/<pid>/cgroup` (cgroup v1 and v2 lines alike) and `<proc_root>/<pid>/status`
(the real Uid). The root of /proc is configurable, so wattson can run in a container with the host's
/proc mounted (it needs the host PID and cgroup namespaces to see host paths) and tests can use
fixture trees. Identities are cached per (pid, start time), the start time being field 22 of
`/proc/<pid>/stat`, so a reused PID is identified afresh and a live PID costs one small read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..logfmt import kv

log = logging.getLogger("wattson.workloads")

KIND_PROCESS = "process"
KIND_CONTAINER = "container"
KIND_POD = "pod"
KIND_SLURM_JOB = "slurm_job"
KIND_USER = "user"

# A cgroup path component that names a Slurm job: `/slurm/uid_1000/job_42/step_0` (v1),
# `/system.slice/slurmstepd.scope/job_42/step_0` (v2), `/slurm_node7/uid_1000/job_42` (multiple slurmd).
_SLURM_JOB = re.compile(r"/slurm[^/]*/(?:[^/]+/)*?job_(\d+)(?:/|$)")
_SLURM_UID = re.compile(r"/slurm[^/]*/uid_(\d+)(?:/|$)")
# Kubernetes pod UID: `/kubepods/burstable/pod<uid>/...` (cgroupfs driver) or
# `kubepods-burstable-pod<uid with _ for ->.slice` (systemd driver). Static pods use a 32-hex hash.
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
_POD = re.compile(r"kubepods.*?(?:/|-)pod(" + _UUID + r")(?:\.slice)?(?:/|$)")
# A container: a 64-hex id as a whole path component, bare (`/docker/<id>`, `/kubepods/.../<id>`) or
# as a systemd scope with a runtime prefix (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
# `crio-<id>.scope`, `libpod-<id>.scope`). CRI-O's monitor (`crio-conmon-<id>.scope`) is no workload.
_CONTAINER = re.compile(r"(?:^|/)(?:([a-z][a-z0-9-]*?)-)?([0-9a-f]{64})(?:\.scope)?(?=/|$)")


@dataclass(frozen=True)
class Workload:
    """The unit a step is charged to. (kind, id) is the identity; the rest describes it."""

    kind: str  # process | container | pod | slurm_job | user
    id: str  # container id (12 hex), pod UID, job id, user name (or numeric uid), pid for kind=process
    user: str = ""  # owner: user name, or the numeric uid where it has no name
    pod: str = ""  # pod name, where the container runtime's metadata was readable
    namespace: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)


@dataclass(frozen=True)
class CgroupMatch:
    """What a /proc/<pid>/cgroup file says about the process's workload."""

    kind: str | None  # slurm_job | pod | container, None for a bare process
    id: str = ""
    container_id: str = ""  # the full 64-hex container id where there is one (pods included)
    uid: int | None = None  # the job owner from a Slurm v1 path


def parse_cgroup(text: str) -> CgroupMatch:
    """Classify a cgroup file. Every line is looked at (v1 lists one per hierarchy, v2 has `0::`);
    a Slurm job beats a pod, a pod beats a container, across lines."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            paths.append(parts[2].strip())
    for path in paths:
        m = _SLURM_JOB.search(path)
        if m:
            uid = _SLURM_UID.search(path)
            return CgroupMatch(KIND_SLURM_JOB, m.group(1), uid=int(uid.group(1)) if uid else None)
    container_id = ""
    for path in paths:
        for cm in _CONTAINER.finditer(path):
            if not (cm.group(1) or "").endswith("conmon"):
                container_id = cm.group(2)
                break
        if container_id:
            break
    for path in paths:
        m = _POD.search(path)
        if m:
            return CgroupMatch(KIND_POD, m.group(1).replace("_", "-"), container_id=container_id)
    if container_id:
        return CgroupMatch(KIND_CONTAINER, container_id[:12], container_id=container_id)
    return CgroupMatch(None)


def parse_status_uid(text: str) -> int | None:
    """The real uid from a /proc/<pid>/status file (`Uid:\\treal\\teffective\\tsaved\\tfs`)."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1])
            return None
    return None


def parse_stat_start_time(text: str) -> int | None:
    """Field 22 of /proc/<pid>/stat, the start time in clock ticks after boot. The command name
    (field 2) may hold spaces and parentheses, so fields are counted after its last ')'."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])  # fields[0] is field 3 (state)


class ProcReader(Protocol):
    def read_text(self, pid: int, name: str) -> str:
        """The file `name` of process `pid`. Raises OSError (FileNotFoundError, ProcessLookupError)
        when the process is gone or the file cannot be read."""
        ...


class ProcFS:
    """A /proc tree on disk (the host's, a mounted one, or a test fixture)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def read_text(self, pid: int, name: str) -> str:
        with open(self.root / str(pid) / name, encoding="utf-8", errors="replace") as f:
            return f.read()


class UserNames:
    """uid -> user name: from a passwd file when configured (the host's, mounted into a container whose
    own /etc/passwd differs), else the system's user database, else the number itself."""

    RETRY_SECONDS = 300.0

    def __init__(self, resolve: bool = True, passwd_file: str | None = None,
                 known: Mapping[int, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.resolve = resolve
        self.passwd_file = passwd_file
        self.known = dict(known or {})
        self.clock = clock
        self._cache: dict[int, tuple[str, float]] = {}
        self._file_mtime: float | None = None
        self._file_names: dict[int, str] = {}
        self._lock = threading.Lock()

    def name(self, uid: int) -> str:
        if uid in self.known:
            return self.known[uid]
        if not self.resolve:
            return str(uid)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(uid)
            if hit is not None and (hit[0] != str(uid) or now - hit[1] < self.RETRY_SECONDS):
                return hit[0]
            name = self._lookup(uid) or str(uid)
            self._cache[uid] = (name, now)
            return name

    def _lookup(self, uid: int) -> str | None:
        if self.passwd_file is not None:
            self._load_passwd_file()
            return self._file_names.get(uid)
        try:
            import pwd

            return pwd.getpwuid(uid).pw_name
        except (KeyError, ImportError):
            return None

    def _load_passwd_file(self) -> None:
        assert self.passwd_file is not None
        try:
            mtime = os.stat(self.passwd_file).st_mtime
            if mtime == self._file_mtime:
                return
            names: dict[int, str] = {}
            with open(self.passwd_file, encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) >= 3 and fields[2].isdigit() and fields[0] and not fields[0].startswith("#"):
                        names.setdefault(int(fields[2]), fields[0])
        except OSError as exc:
            log.warning("cannot read passwd file; exporting numeric uids",
                        extra=kv(file=self.passwd_file, err=exc.strerror))
            self._file_mtime = None
            self._file_names = {}
            return
        self._file_mtime, self._file_names = mtime, names


# OCI bundle configs that carry the Kubernetes pod name and namespace as annotations: containerd's
# CRI plugin and CRI-O write them under /run. `{id}` is the full 64-hex container id.
DEFAULT_POD_METADATA_FILES = (
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json",
    "/run/containers/storage/overlay-containers/{id}/userdata/config.json",
)
_POD_NAME_KEYS = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
_POD_NAMESPACE_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")


class PodMetadata:
    """Pod name and namespace of a container, from its runtime's config file where it is readable
    (annotations of an OCI config.json, or `Config.Labels` of a Docker config.v2.json)."""

    RETRY_SECONDS = 60.0

    def __init__(self, templates: Sequence[str] = DEFAULT_POD_METADATA_FILES,
                 known: Mapping[str, tuple[str, str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.templates = tuple(templates)
        self.known = dict(known or {})
        self.clock = clock
        self._cache: dict[str, tuple[tuple[str, str] | None, float]] = {}
        self._lock = threading.Lock()

    def lookup(self, container_id: str) -> tuple[str, str] | None:
        """(pod name, namespace) or None when no readable file names them."""
        if container_id in self.known:
            return self.known[container_id]
        if not self.templates or not container_id:
            return None
        now = self.clock()
        with self._lock:
            hit = self._cache.get(container_id)
            if hit is not None and (hit[0] is not None or now - hit[1] < self.RETRY_SECONDS):
                return hit[0]
        found = self._read(container_id)
        with self._lock:
            self._cache[container_id] = (found, now)
            if len(self._cache) > 10_000:  # containers come and go; forget the oldest lookups
                for key in sorted(self._cache, key=lambda k: self._cache[k][1])[:5_000]:
                    del self._cache[key]
        return found

    def _read(self, container_id: str) -> tuple[str, str] | None:
        for template in self.templates:
            path = template.replace("{id}", container_id)
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            labels: dict[str, object] = {}
            if isinstance(doc, dict):
                for section in (doc.get("annotations"), (doc.get("Config") or {}).get("Labels")
                                if isinstance(doc.get("Config"), dict) else None):
                    if isinstance(section, dict):
                        labels.update(section)
            name = next((labels[k] for k in _POD_NAME_KEYS if isinstance(labels.get(k), str)), None)
            namespace = next((labels[k] for k in _POD_NAMESPACE_KEYS if isinstance(labels.get(k), str)), None)
            if name and namespace:
                return str(name), str(namespace)
        return None


@dataclass
class _Entry:
    start_time: int
    workload: Workload
    last_used: float


class WorkloadResolver:
    """pid -> Workload, cached per (pid, start time). Safe to call from several GPU threads."""

    CACHE_TTL_SECONDS = 600.0

    def __init__(self, proc: ProcReader, users: UserNames | None = None, pods: PodMetadata | None = None,
                 bare_processes: str = KIND_USER, clock: Callable[[], float] = time.monotonic) -> None:
        if bare_processes not in (KIND_USER, KIND_PROCESS):
            raise ValueError(f"bare_processes must be 'user' or 'process', got {bare_processes!r}")
        self.proc = proc
        self.users = users or UserNames()
        self.pods = pods
        self.bare_processes = bare_processes
        self.clock = clock
        self._cache: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self.reads = 0  # files read, for tests of the cache

    def resolve(self, pid: int) -> Workload | None:
        """The workload of a running process; None when it cannot be told (the process ended before
        its /proc entry was read and was never seen before, or /proc is not readable)."""
        if pid <= 0:
            return None
        now = self.clock()
        try:
            start = parse_stat_start_time(self._read(pid, "stat"))
        except OSError:
            start = None
        with self._lock:
            entry = self._cache.get(pid)
            if entry is not None and (start is None or start == entry.start_time):
                # Same process as before; or it has just ended (NVML still listed it this step), in
                # which case the last identity seen for this PID is the best there is.
                entry.last_used = now
                return entry.workload
        if start is None:
            return None
        try:
            cgroup_text = self._read(pid, "cgroup")
            status_text = self._read(pid, "status")
        except OSError:
            return None
        workload = self._identify(pid, parse_cgroup(cgroup_text), parse_status_uid(status_text))
        # The process may have ended and its PID been reused between the reads: only cache the
        # identity if the start time still matches.
        try:
            if parse_stat_start_time(self._read(pid, "stat")) != start:
                return None
        except OSError:
            pass  # ended after its files were read: the identity is still its own
        with self._lock:
            self._cache[pid] = _Entry(start, workload, now)
        return workload

    def _read(self, pid: int, name: str) -> str:
        self.reads += 1
        return self.proc.read_text(pid, name)

    def _identify(self, pid: int, match: CgroupMatch, status_uid: int | None) -> Workload:
        uid = match.uid if match.uid is not None else status_uid
        user = self.users.name(uid) if uid is not None else ""
        if match.kind == KIND_SLURM_JOB:
            return Workload(KIND_SLURM_JOB, match.id, user)
        if match.kind == KIND_POD:
            meta = self.pods.lookup(match.container_id) if self.pods is not None else None
            return Workload(KIND_POD, match.id, user, *(meta or ("", "")))
        if match.kind == KIND_CONTAINER:
            return Workload(KIND_CONTAINER, match.id, user)
        if self.bare_processes == KIND_PROCESS:
            return Workload(KIND_PROCESS, str(pid), user)
        return Workload(KIND_USER, user or "unknown", user)

    def prune(self) -> None:
        """Forget PIDs not seen for a while (called from the sampler thread, not per step)."""
        cutoff = self.clock() - self.CACHE_TTL_SECONDS
        with self._lock:
            for pid in [p for p, e in self._cache.items() if e.last_used < cutoff]:
                del self._cache[pid]

    def __len__(self) -> int:
        return len(self._cache)
