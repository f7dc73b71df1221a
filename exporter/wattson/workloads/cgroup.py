"""Who a GPU process belongs to: its Slurm job, Kubernetes pod, container, or Unix user.

Read from `<proc_root>/<pid>/cgroup` (cgroup v1 and v2 lines alike) and `<proc_root>/<pid>/status`
(the real Uid). The root of /proc is configurable, so wattson can run in a container with the host's
/proc mounted (it needs the host PID and cgroup namespaces to see host paths) and tests can use
fixture trees. Identities are cached per (pid, start time), the start time being field 22 of
`/proc/<pid>/stat`, so a reused PID is identified afresh and a live PID costs one small read.
A Slurm 26.05 job whose cgroup is named by its SLUID is told by its id from the process's `environ` or
its slurmstepd's `cmdline` (found through `status` PPid), once per job (docs/slurm.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ..logfmt import kv

log = logging.getLogger("wattson.workloads")

KIND_PROCESS = "process"
KIND_CONTAINER = "container"
KIND_POD = "pod"
KIND_SLURM_JOB = "slurm_job"
KIND_USER = "user"

# Slurm jobs (docs/slurm.md). A job directory sits below a component named slurm* (v1: `/slurm/uid_1000/
# job_42/step_0`, `/slurm_node7/...` with multiple slurmd) or *slurmstepd.scope (v2: `/system.slice/
# slurmstepd.scope/job_42/step_batch/user/task_0`, `node7_slurmstepd.scope` with multiple slurmd), or is
# followed by a step directory (step_0, step_batch, step_extern, step_interactive, step_0+1). Since Slurm
# 26.05, cgroup v2 job directories are named by the job's SLUID, "s" and 13 Crockford base32 digits
# (`/system.slice/slurmstepd.scope/sEKNKTV3WPV500/step_0/user/task_0`), unless CgroupJobIdPaths=yes;
# the SLUID carries no job id, the resolver finds that (WorkloadResolver._slurm_job_id).
_SLURM_ROOT = r"/(?:[^/]*_)?slurm[^/]*/(?:[^/]+/)*?"
_SLURM_STEP_DIR = r"/step_(?:\d+|batch|extern|interactive)(?:\+\d+)?(?:/|$)"
_SLURM_JOB = re.compile(_SLURM_ROOT + r"job_(\d+)(?:/|$)|/job_(\d+)(?=" + _SLURM_STEP_DIR + ")")
_SLURM_SLUID = re.compile(r"/(s[0-9A-HJKMNP-TV-Z]{13})(?=" + _SLURM_STEP_DIR + ")")
_SLURM_STEP = re.compile(r"/(?:job_\d+|s[0-9A-HJKMNP-TV-Z]{13})/step_([^/]+)")
_SLURM_UID = re.compile(r"/slurm[^/]*/uid_(\d+)(?:/|$)")
# slurmstepd's process title (setproctitle): `slurmstepd: [4242.0]`, `[4242.batch]`, `[4242.extern stepmgr]`.
_SLURMSTEPD_TITLE = re.compile(r"^slurmstepd: \[(\d+)[.\] ]")
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
    account: str = ""  # Slurm account of a job (SLURM_JOB_ACCOUNT), where its environment was readable

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)


@dataclass(frozen=True)
class CgroupMatch:
    """What a /proc/<pid>/cgroup file says about the process's workload."""

    kind: str | None  # slurm_job | pod | container, None for a bare process
    id: str = ""  # a Slurm job's SLUID where its path names no job id
    container_id: str = ""  # the full 64-hex container id where there is one (pods included)
    uid: int | None = None  # the job owner from a Slurm v1 path
    sluid: str = ""  # the Slurm job's SLUID when its cgroup directory is named by it (26.05+, cgroup v2)
    step: str = ""  # the Slurm step directory's name after `step_`: 0, batch, extern, interactive


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
        job_id = (m.group(1) or m.group(2)) if m else ""
        s = _SLURM_SLUID.search(path) if not job_id else None
        sluid = s.group(1) if s else ""
        if job_id or sluid:
            uid = _SLURM_UID.search(path)
            step = _SLURM_STEP.search(path)
            return CgroupMatch(KIND_SLURM_JOB, job_id or sluid, uid=int(uid.group(1)) if uid else None,
                               sluid=sluid, step=step.group(1) if step else "")
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


def parse_status_ppid(text: str) -> int | None:
    """The parent PID from a /proc/<pid>/status file (`PPid:\t<pid>`); 0 for a process without one."""
    for line in text.splitlines():
        if line.startswith("PPid:"):
            value = line[5:].strip()
            return int(value) if value.isdigit() else None
    return None


def parse_environ(text: str) -> dict[str, str]:
    """A /proc/<pid>/environ file: NUL-separated NAME=value entries (the process's initial environment)."""
    env: dict[str, str] = {}
    for entry in text.split("\0"):
        name, sep, value = entry.partition("=")
        if sep and name:
            env.setdefault(name, value)
    return env


def parse_slurmstepd_job_id(cmdline: str) -> str | None:
    """The job id in slurmstepd's process title, from /proc/<pid>/cmdline (`slurmstepd: [4242.0]`)."""
    m = _SLURMSTEPD_TITLE.match(cmdline.replace("\0", " "))
    return m.group(1) if m else None


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
    SLURM_ANCESTORS = 16  # parents walked up from a process to its slurmstepd
    MAX_SLUIDS = 10_000  # SLUID -> job id mappings kept (oldest forgotten first)

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
        self._sluid_jobs: dict[str, str] = {}  # Slurm SLUID -> job id, learnt from the job's processes
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
        if workload.kind == KIND_SLURM_JOB and not workload.account:
            workload = replace(workload, account=self._slurm_account(pid))
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
            job_id = self._slurm_job_id(pid, match.sluid) if match.sluid else match.id
            return Workload(KIND_SLURM_JOB, job_id or match.sluid, user)
        if match.kind == KIND_POD:
            meta = self.pods.lookup(match.container_id) if self.pods is not None else None
            return Workload(KIND_POD, match.id, user, *(meta or ("", "")))
        if match.kind == KIND_CONTAINER:
            return Workload(KIND_CONTAINER, match.id, user)
        if self.bare_processes == KIND_PROCESS:
            return Workload(KIND_PROCESS, str(pid), user)
        return Workload(KIND_USER, user or "unknown", user)

    def _slurm_job_id(self, pid: int, sluid: str) -> str | None:
        """The job id of a job whose cgroup directory is named by its SLUID (Slurm 26.05+, cgroup v2), from
        what another process of the job told, else this process's environment (SLURM_JOB_ID where its
        SLURM_JOB_SLUID is this SLUID; readable by root or the job's user), else the title of the slurmstepd
        it descends from, checked to live in the same job directory (readable by anyone). None when nothing
        tells: the job is then charged under its SLUID. Once known, the job's PIDs seen before switch to it."""
        with self._lock:
            known = self._sluid_jobs.get(sluid)
        if known is not None:
            return known
        job_id = self._job_id_from_environ(pid, sluid) or self._job_id_from_slurmstepd(pid, sluid)
        if job_id is None:
            log.debug("Slurm job id of a SLUID not found yet; charging it to the SLUID",
                      extra=kv(pid=pid, sluid=sluid))
            return None
        with self._lock:
            self._sluid_jobs[sluid] = job_id
            while len(self._sluid_jobs) > self.MAX_SLUIDS:
                del self._sluid_jobs[next(iter(self._sluid_jobs))]
            for entry in self._cache.values():
                if entry.workload.kind == KIND_SLURM_JOB and entry.workload.id == sluid:
                    entry.workload = replace(entry.workload, id=job_id)
        return job_id

    def _job_id_from_environ(self, pid: int, sluid: str) -> str | None:
        try:
            env = parse_environ(self._read(pid, "environ"))
        except OSError:  # another user's process and no CAP_SYS_PTRACE (wattson's systemd unit), or gone
            return None
        job_id = env.get("SLURM_JOB_ID", "")
        return job_id if job_id.isdigit() and env.get("SLURM_JOB_SLUID", "").upper() == sluid.upper() else None

    def _job_id_from_slurmstepd(self, pid: int, sluid: str) -> str | None:
        current = pid
        for _ in range(self.SLURM_ANCESTORS):
            try:
                parent = parse_status_ppid(self._read(current, "status"))
                if not parent or parent == 1:
                    return None
                job_id = parse_slurmstepd_job_id(self._read(parent, "cmdline"))
                if job_id is not None:
                    return job_id if parse_cgroup(self._read(parent, "cgroup")).sluid == sluid else None
            except OSError:
                return None
            current = parent
        return None

    def _slurm_account(self, pid: int) -> str:
        """The job's Slurm account (budget scope `account`) from the process's environment; "" where it is not
        readable (another user's process and no CAP_SYS_PTRACE) or not set."""
        try:
            return parse_environ(self._read(pid, "environ")).get("SLURM_JOB_ACCOUNT", "")
        except OSError:
            return ""

    def prune(self) -> None:
        """Forget PIDs not seen for a while (called from the sampler thread, not per step)."""
        cutoff = self.clock() - self.CACHE_TTL_SECONDS
        with self._lock:
            for pid in [p for p, e in self._cache.items() if e.last_used < cutoff]:
                del self._cache[pid]

    def __len__(self) -> int:
        return len(self._cache)
