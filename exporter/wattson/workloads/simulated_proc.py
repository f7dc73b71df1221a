"""/proc for the simulated backend's jobs, served from memory in Linux's file formats.

The simulated GPUs report their jobs' PIDs like NVML does; this answers /proc/<pid>/{cgroup,status,stat}
for those PIDs so per-workload accounting runs its real parsers (cgroup.py) on them. It lives with the
workloads, not the GPU backend, because only workload attribution reads /proc.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..gpu.simulated import SimJob, SimulatedBackend


class SimulatedProcFS:
    """/proc/<pid>/{cgroup,status,stat} of the simulated jobs' live processes, in Linux's formats.

    `elapsed()` gives the simulation's seconds since its start (None before it started: no process runs
    yet). `users` (uid -> name) and `pods` (container id -> (pod name, namespace)) stand in for the
    host's passwd database and container runtime metadata.
    """

    def __init__(self, jobs: tuple[SimJob, ...], elapsed: Callable[[], float | None]) -> None:
        self.jobs = jobs
        self._elapsed = elapsed
        self.users: dict[int, str] = {j.uid: j.user for j in jobs}
        self.pods: dict[str, tuple[str, str]] = {j.container_id: (j.pod_name, j.namespace) for j in jobs
                     if j.kind == "pod" and j.pod_name and j.namespace}

    def read_text(self, pid: int, name: str) -> str:
        t = self._elapsed()
        if t is not None:
            for job in self.jobs:
                if not job.active(t):
                    continue
                for rank, _gpu in enumerate(job.gpus):
                    if job.first_pid + rank == pid:
                        return self._file(job, rank, pid, name)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"/proc/{pid}/{name}")

    @staticmethod
    def _file(job: SimJob, rank: int, pid: int, name: str) -> str:
        if name == "cgroup":
            return job.cgroup(rank)
        if name == "status":
            ids = "\t".join([str(job.uid)] * 4)
            return (f"Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\n"
                    f"PPid:\t1\nUid:\t{ids}\nGid:\t{ids}\n")
        if name == "stat":
            # fields 3..21, then 22 (starttime), then a few more
            fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 8 + ["20", "0", "1", "0"]
            return f"{pid} (python3) " + " ".join(fields + [str(job.start_ticks), "1000000", "2000"]) + "\n"
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"/proc/{pid}/{name}")


def simulated_procfs(backend: object) -> SimulatedProcFS | None:
    """The in-memory /proc of a simulated backend's jobs; None for any other backend, or a simulated one
    without jobs configured (it reports no processes, so there is nothing to look up).

    The clock is read at each lookup, so this may be built before or after the backend's start().
    """
    if not isinstance(backend, SimulatedBackend) or backend.jobs is None:
        return None
    sim, jobs = backend, backend.jobs

    def elapsed() -> float | None:
        origin = sim.origin
        return None if origin is None else sim.monotonic() - origin

    return SimulatedProcFS(jobs, elapsed)


__all__ = ["SimulatedProcFS", "simulated_procfs"]
