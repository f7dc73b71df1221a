"""PID -> workload from fixture /proc trees: Docker, containerd/CRI-O Kubernetes (cgroup v1 and v2),
Slurm, bare processes; user names; pod metadata; the (pid, start time) cache, PID reuse, vanished PIDs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from wattson.config import SimJobConfig
from wattson.gpu.simulated import SimulatedBackend
from wattson.workloads.cgroup import (
    PodMetadata,
    ProcFS,
    UserNames,
    Workload,
    WorkloadResolver,
    parse_cgroup,
    parse_stat_start_time,
    parse_status_uid,
)
from wattson.workloads.simulated_proc import SimulatedProcFS, simulated_procfs

FIXTURES = Path(__file__).parent / "fixtures" / "proc"
HOST = FIXTURES / "_host"
POD_FILES = (
    str(HOST / "run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"),
    str(HOST / "run/containers/storage/overlay-containers/{id}/userdata/config.json"),
)


def resolver(root: Path = FIXTURES, bare: str = "user", clock=None) -> WorkloadResolver:
    users = UserNames(passwd_file=str(HOST / "etc/passwd"))
    kwargs = {"clock": clock} if clock else {}
    return WorkloadResolver(ProcFS(str(root)), users, PodMetadata(POD_FILES), bare, **kwargs)


@pytest.mark.parametrize("pid, expected", [
    (1001, Workload("container", "3f1b6c0e9a2d", "alice")),
    (1002, Workload("container", "9e8d7c6b5a4f", "root")),
    (1003, Workload("container", "4b5c6d7e8f90", "bob")),
    (2001, Workload("pod", "8c3e2a5d-1f4b-4c6a-9e7d-2b5f8a1c3e6d", "root")),  # metadata file is broken
    (2002, Workload("pod", "5e7a9c1b-3d2f-4e6a-8b0c-7d9e1f3a5b7c", "alice", "llm-finetune-7f9c4-x2x8q", "research")),
    (2003, Workload("pod", "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", "alice", "triton-0", "inference")),
    (2004, Workload("pod", "8c3e2a5d-1f4b-4c6a-9e7d-2b5f8a1c3e6d", "root")),
    (3001, Workload("slurm_job", "4242", "alice")),
    (3002, Workload("slurm_job", "4243", "carol")),
    (4001, Workload("user", "alice", "alice")),
    (4002, Workload("user", "4321", "4321")),
    (4003, Workload("user", "root", "root")),
])
def test_fixture_processes_map_to_their_workloads(pid, expected):
    assert resolver().resolve(pid) == expected


def test_bare_processes_can_be_charged_per_process():
    r = resolver(bare="process")
    assert r.resolve(4001) == Workload("process", "4001", "alice")
    assert r.resolve(1001).kind == "container"  # only bare processes change


def test_v1_slurm_owner_comes_from_the_path_even_if_the_process_runs_as_someone_else(tmp_path):
    root = copy_tree(tmp_path)
    status = (root / "3001" / "status").read_text().replace("Uid:\t1000\t1000\t1000\t1000", "Uid:\t0\t0\t0\t0")
    (root / "3001" / "status").write_text(status)
    assert resolver(root).resolve(3001) == Workload("slurm_job", "4242", "alice")


@pytest.mark.parametrize("line, kind, wid", [
    ("0::/system.slice/docker-" + "ab" * 32 + ".scope", "container", "ab" * 6),
    ("0::/system.slice/containerd.service/default/" + "cd" * 32, "container", "cd" * 6),
    ("4:memory:/kubepods/pod11111111-2222-3333-4444-555555555555/" + "ef" * 32, "pod",
     "11111111-2222-3333-4444-555555555555"),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0123456789abcdef0123456789abcdef.slice/"
     "cri-containerd-" + "12" * 32 + ".scope", "pod", "0123456789abcdef0123456789abcdef"),  # static pod hash
    ("0::/slurm_node07/uid_1000/job_77/step_batch/task_0", "slurm_job", "77"),
    # read from inside a private cgroup namespace: paths outside it are shown relative to its root
    ("0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice/"
     "cri-containerd-" + "34" * 32 + ".scope", "pod", "11111111-2222-3333-4444-555555555555"),
    ("0::/../../system.slice/docker-" + "56" * 32 + ".scope", "container", "56" * 6),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-" + "9" * 20 + ".scope", None, ""),
    ("0::/", None, ""),
    ("", None, ""),
])
def test_cgroup_path_forms(line, kind, wid):
    m = parse_cgroup(line + "\n")
    assert (m.kind, m.id) == (kind, wid)


def test_a_slurm_job_beats_a_container_inside_it():
    text = ("0::/system.slice/slurmstepd.scope/job_900/step_0/user/task_0/docker-" + "ab" * 32 + ".scope\n")
    assert parse_cgroup(text).kind == "slurm_job"


def test_stat_start_time_is_field_22_even_with_parentheses_in_the_name():
    text = (FIXTURES / "4002" / "stat").read_text()
    assert "(my (odd) app)" in text
    assert parse_stat_start_time(text) == 5_100_000
    assert parse_stat_start_time("123 (short) S 1 2") is None
    assert parse_stat_start_time("garbage") is None


def test_status_uid_is_the_real_uid():
    assert parse_status_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n") == 1000
    assert parse_status_uid("Name:\tx\n") is None


def test_user_names_numeric_without_resolution_and_from_the_system_database():
    assert UserNames(resolve=False).name(0) == "0"
    assert UserNames(resolve=True).name(0) == "root"  # the system's own passwd database
    names = UserNames(passwd_file=str(HOST / "etc/passwd"))
    assert names.name(1001) == "bob" and names.name(4321) == "4321"


def test_unreadable_passwd_file_falls_back_to_numbers(tmp_path, caplog):
    names = UserNames(passwd_file=str(tmp_path / "missing"))
    assert names.name(1000) == "1000"
    assert "cannot read passwd file" in caplog.text


def test_passwd_file_changes_are_picked_up_after_the_retry_delay(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/:/bin/sh\n")
    now = [0.0]
    names = UserNames(passwd_file=str(passwd), clock=lambda: now[0])
    assert names.name(2000) == "2000"
    passwd.write_text("root:x:0:0::/:/bin/sh\nnewuser:x:2000:2000::/:/bin/sh\n")
    os.utime(passwd, (1, 1))  # a different mtime than before, whatever the filesystem's resolution
    assert names.name(2000) == "2000"  # a miss is cached for a while
    now[0] = UserNames.RETRY_SECONDS + 1
    assert names.name(2000) == "newuser"


def test_pod_metadata_from_runtime_labels_and_docker_config(tmp_path):
    cid = "ab" * 32
    (tmp_path / cid).mkdir()
    (tmp_path / cid / "config.v2.json").write_text(json.dumps(
        {"ID": cid, "Config": {"Labels": {"io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "shop"}}}))
    pods = PodMetadata((str(tmp_path / "{id}" / "config.v2.json"),))
    assert pods.lookup(cid) == ("web-1", "shop")
    assert pods.lookup("cd" * 32) is None
    assert PodMetadata(()).lookup(cid) is None


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("_host", "*.md"))
    return root


def test_identity_is_cached_per_pid_and_start_time(tmp_path):
    root = copy_tree(tmp_path)
    r = resolver(root)
    first = r.resolve(1001)
    reads = r.reads
    assert r.resolve(1001) == first
    assert r.reads == reads + 1  # a known process costs one read of its stat file


def test_pid_reuse_gives_a_new_identity(tmp_path):
    root = copy_tree(tmp_path)
    r = resolver(root)
    assert r.resolve(1001).kind == "container"
    # the container's process ends; a Slurm job's process gets the same PID
    shutil.rmtree(root / "1001")
    shutil.copytree(root / "3001", root / "1001")
    stat = (root / "1001" / "stat").read_text().replace("3001 (python)", "1001 (python)")
    (root / "1001" / "stat").write_text(stat.replace(" 4000000 ", " 9000000 "))
    assert r.resolve(1001) == Workload("slurm_job", "4242", "alice")


def test_a_vanished_pid_keeps_its_last_identity_or_is_unknown(tmp_path):
    root = copy_tree(tmp_path)
    r = resolver(root)
    assert r.resolve(2002).kind == "pod"
    shutil.rmtree(root / "2002")  # ended between NVML's process list and our /proc read
    assert r.resolve(2002).kind == "pod"  # NVML listed it this step: its last identity is used
    shutil.rmtree(root / "4001")
    assert r.resolve(4001) is None  # never seen: cannot be told
    assert r.resolve(999_999) is None
    assert r.resolve(0) is None


def test_process_ending_between_its_file_reads_is_not_cached_with_a_foreign_identity(tmp_path):
    root = copy_tree(tmp_path)

    class Racy(ProcFS):
        """The process ends right after its stat was read; its PID is reused before the re-check."""

        def __init__(self, root):
            super().__init__(root)
            self.stat_reads = 0

        def read_text(self, pid, name):
            if name == "stat":
                self.stat_reads += 1
                if self.stat_reads == 2:
                    return super().read_text(pid, name).replace(" 5000000 ", " 5000999 ")
            return super().read_text(pid, name)

    r = WorkloadResolver(Racy(str(root)), UserNames(resolve=False))
    assert r.resolve(4001) is None
    assert len(r) == 0


def test_unreadable_proc_files_make_the_pid_unknown(tmp_path):
    root = copy_tree(tmp_path)
    (root / "4001" / "cgroup").unlink()
    assert resolver(root).resolve(4001) is None


def test_cache_prunes_pids_not_seen_for_a_while(tmp_path):
    now = [0.0]
    r = resolver(copy_tree(tmp_path), clock=lambda: now[0])
    r.resolve(1001)
    r.resolve(1002)
    now[0] = WorkloadResolver.CACHE_TTL_SECONDS - 1
    r.resolve(1002)
    now[0] = WorkloadResolver.CACHE_TTL_SECONDS + 1
    r.prune()
    assert len(r) == 1


def test_bad_bare_process_mode_is_rejected():
    with pytest.raises(ValueError, match="bare_processes"):
        WorkloadResolver(ProcFS(str(FIXTURES)), bare_processes="job")


# --- the simulated backend's in-memory /proc --------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def time(self) -> float:
        return 1_790_000_000.0 + self.t

    def monotonic(self) -> float:
        return self.t


POD_UID = "6f1c2b3a-4d5e-4f60-8a9b-0c1d2e3f4a5b"


def simulated(jobs, clock: _Clock) -> SimulatedBackend:
    return SimulatedBackend(2, "L4", ["training"], 1, clock=clock.time, monotonic=clock.monotonic,
                            jobs=None if jobs is None else [SimJobConfig(**j) for j in jobs])


def test_simulated_procfs_only_for_a_simulated_backend_with_jobs():
    assert simulated_procfs(object()) is None
    assert simulated_procfs(simulated(None, _Clock())) is None
    empty = simulated_procfs(simulated([], _Clock()))
    assert isinstance(empty, SimulatedProcFS) and empty.jobs == () and empty.users == {} and empty.pods == {}


def test_simulated_jobs_resolve_through_the_real_parsers_with_their_users_and_pods():
    clock = _Clock()
    backend = simulated([
        {"kind": "slurm_job", "id": "4242", "gpus": [0, 1], "user": "alice", "uid": 1001, "pid": 300},
        {"kind": "pod", "id": POD_UID, "gpus": [1], "user": "svc", "uid": 1500, "pod_name": "triton-0",
         "namespace": "serving", "pid": 400, "end_seconds": 10},
    ], clock)
    procfs = simulated_procfs(backend)  # built before start(): no process runs yet
    assert procfs is not None
    assert procfs.users == {1001: "alice", 1500: "svc"}
    assert list(procfs.pods.values()) == [("triton-0", "serving")]
    with pytest.raises(FileNotFoundError):
        procfs.read_text(300, "cgroup")
    backend.start()
    assert backend.origin == clock.monotonic()
    r = WorkloadResolver(procfs, UserNames(resolve=False, known=procfs.users), PodMetadata((), known=procfs.pods),
                         "user")
    assert r.resolve(300) == r.resolve(301) == Workload("slurm_job", "4242", "alice")
    assert r.resolve(400) == Workload("pod", POD_UID, "svc", "triton-0", "serving")
    assert parse_stat_start_time(procfs.read_text(400, "stat")) == backend.jobs[1].start_ticks
    with pytest.raises(FileNotFoundError):
        procfs.read_text(300, "environ")
    clock.t += 10.0  # the pod's job ended
    with pytest.raises(FileNotFoundError):
        procfs.read_text(400, "status")
    assert procfs.read_text(301, "status").count("Uid:\t1001\t1001\t1001\t1001\n") == 1


def test_simulated_gpus_report_their_jobs_processes_and_only_with_jobs():
    clock = _Clock()
    assert simulated(None, clock).start()[0].read().processes is None
    assert simulated([], clock).start()[0].read().processes == ()
    gpus = simulated([{"kind": "process", "gpus": [1], "pid": 77}], clock).start()
    assert gpus[0].read().processes == () and [p.pid for p in gpus[1].read().processes] == [77]
