"""Slurm GPU nodes: jobs under every cgroup naming scheme (job_<id> on v1 and v2, Slurm 26.05's SLUID
directories), their ids, users and GPUs; GET /api/v1/workloads; `wattson job` for an epilog; and the
hardened systemd unit (systemd-analyze verify and security, W^X memory)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import bcrypt
import pytest

from bench.common import samples, stop_process, wait_for
from tests.conftest import require_c_compiler, require_tool
from tests.daemon import ROOT, free_port, get, run_wattson
from wattson.accounting import StepCharge
from wattson.energy import EnergyStep
from wattson.exposition import Exposition
from wattson.gpu.base import GpuProcess, GpuReading
from wattson.job_cli import job_main
from wattson.snapshot import Snapshot
from wattson.web import WattsonHTTPServer
from wattson.webconfig import load_web_config
from wattson.workloads.cgroup import (
    ProcFS,
    UserNames,
    Workload,
    WorkloadResolver,
    parse_cgroup,
    parse_environ,
    parse_slurmstepd_job_id,
    parse_status_ppid,
)
from wattson.workloads.jobs import job_report, render_text, workloads_response
from wattson.workloads.tracker import WorkloadTracker

PROC = Path(__file__).parent / "fixtures" / "proc"
SLURM = PROC / "slurm"
PASSWD = PROC / "_host" / "etc" / "passwd"
UNIT = ROOT / "deploy" / "systemd" / "wattson.service"
A, B, C = "sEKNKTV3WPV500", "s4T9KT6C6G9R00", "s4T9KT6JBKBQ03"  # the fixtures' SLUIDs (README.md there)


class Unprivileged(ProcFS):
    """/proc as a user other than root and the job's sees it: other users' environ is closed."""

    def read_text(self, pid: int, name: str) -> str:
        if name == "environ":
            raise PermissionError(13, "Permission denied", f"/proc/{pid}/environ")
        return super().read_text(pid, name)


def who(w: Workload | None) -> tuple[str, str, str] | None:
    """What this file checks of a workload: kind, id and user (other fields belong to other features)."""
    return None if w is None else (w.kind, w.id, w.user)


def resolver(root: Path = SLURM, proc_class: type[ProcFS] = ProcFS) -> WorkloadResolver:
    return WorkloadResolver(proc_class(str(root)), UserNames(passwd_file=str(PASSWD)))


def copy(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(SLURM, root)
    return root


# -- cgroup paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, job, sluid, step, uid", [
    # cgroup v1, every controller Slurm's task/cgroup uses; multiple slurmd prepend /slurm_<node>
    ("7:devices:/slurm/uid_1000/job_4242/step_0", "4242", "", "0", 1000),
    ("9:memory:/slurm/uid_1000/job_4242/step_batch/task_0", "4242", "", "batch", 1000),
    ("8:cpuset:/slurm_node07/uid_1001/job_77/step_extern", "77", "", "extern", 1001),
    ("6:freezer:/slurm/uid_1001/job_78", "78", "", "", 1001),
    # cgroup v2 with job ids (before 26.05, or CgroupJobIdPaths=yes), any CgroupSlice, multiple slurmd
    ("0::/system.slice/slurmstepd.scope/job_4243/step_0/user/task_1", "4243", "", "0", None),
    ("0::/system.slice/slurmstepd.scope/job_4243/step_interactive/user/task_0", "4243", "", "interactive", None),
    ("0::/slurm.slice/node07_slurmstepd.scope/job_4246/step_batch/user/task_0", "4246", "", "batch", None),
    ("0::/system.slice/slurmstepd.scope/job_9/step_0+1/user/task_0", "9", "", "0+1", None),
    # cgroup v2 with SLUIDs (26.05 default): the job id is not in the path
    (f"0::/system.slice/slurmstepd.scope/{A}/step_0/user/task_0", A, A, "0", None),
    (f"0::/system.slice/slurmstepd.scope/{A}/step_batch/user/task_0", A, A, "batch", None),
    (f"0::/system.slice/slurmstepd.scope/{C}/step_extern/user/task_special", C, C, "extern", None),
    (f"0::/system.slice/node07_slurmstepd.scope/{B}/step_4/slurm", B, B, "4", None),
    # seen from a private cgroup namespace (wattson in a container without --cgroupns=host)
    (f"0::/../../system.slice/slurmstepd.scope/{A}/step_0/user/task_3", A, A, "0", None),
    ("0::/../../system.slice/slurmstepd.scope/job_12/step_0/user/task_3", "12", "", "0", None),
])
def test_slurm_cgroup_paths_name_the_job(line, job, sluid, step, uid):
    m = parse_cgroup(line + "\n")
    assert (m.kind, m.id, m.sluid, m.step, m.uid) == ("slurm_job", job, sluid, step, uid)


@pytest.mark.parametrize("line", [
    "0::/system.slice/sEKNKTV3WPV500.service",  # a SLUID-like name without a step below it
    "0::/user.slice/user-1000.slice/session-3.scope/sEKNKTV3WPV500/stuff",
    "0::/system.slice/slurmstepd.scope/system",  # slurmstepd's waiting area: no job
    "0::/system.slice/slurmd.service",
    "0::/user.slice/job_12/worker",  # job_ with neither a slurm parent nor a step below
    f"0::/system.slice/slurmstepd.scope/{A.lower()}/step_0/user/task_0",  # Slurm writes SLUIDs upper-case
])
def test_other_paths_are_not_slurm_jobs(line):
    assert parse_cgroup(line + "\n").kind != "slurm_job"


def test_proc_file_helpers():
    assert parse_status_ppid((SLURM / "5201" / "status").read_text()) == 5202
    assert parse_status_ppid("Name:\tinit\nPPid:\t0\n") == 0
    assert parse_status_ppid("Name:\tx\n") is None
    env = parse_environ((SLURM / "5101" / "environ").read_text())
    assert env["SLURM_JOB_ID"] == "4244" and env["SLURM_JOB_SLUID"] == A and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert parse_environ("A=1\0=odd\0B\0C=x=y\0") == {"A": "1", "C": "x=y"}
    for title, job in [("slurmstepd: [4244.0]\0\0\0", "4244"), ("slurmstepd: [4245.batch]", "4245"),
                       ("slurmstepd: [4245.extern stepmgr]", "4245"), ("slurmstepd: [4245]", "4245"),
                       (f"slurmstepd: [{A}.0]", None), ("/usr/sbin/slurmstepd\0", None),
                       ("python\0slurmstepd: [1.0]\0", None), ("slurmstepd: [ns:namespace]", None)]:
        assert parse_slurmstepd_job_id(title) == job, title


# -- job id, user and the resolver ---------------------------------------------------------------------


@pytest.mark.parametrize("pid, expected", [
    (5101, Workload("slurm_job", "4244", "alice")),  # SLUID, SLURM_JOB_ID from environ
    (5102, Workload("slurm_job", "4244", "alice")),
    (5201, Workload("slurm_job", "4245", "bob")),  # SLUID, no environ: from its slurmstepd grandparent
    (5203, Workload("slurm_job", B, "bob")),  # SLUID, daemonized, nothing else of the job seen yet
    (5301, Workload("slurm_job", C, "carol")),  # SLUID, adopted ssh session: only the SLUID is known
    (5401, Workload("slurm_job", "4246", "carol")),  # v2 CgroupJobIdPaths=yes, multiple slurmd
    (5501, Workload("slurm_job", "4247", "bob")),  # v1
])
def test_fixture_jobs_resolve_to_job_id_and_user(pid, expected):
    assert who(resolver().resolve(pid)) == who(expected)


@pytest.mark.parametrize("pid, job", [(5101, "4244"), (5201, "4245"), (5401, "4246"), (5501, "4247")])
def test_unprivileged_reader_finds_the_same_job_ids(pid, job):
    """wattson's systemd unit runs without CAP_SYS_PTRACE: other users' environ cannot be read, and the
    slurmstepd's process title says the job id instead."""
    assert resolver(proc_class=Unprivileged).resolve(pid).id == job


def test_a_job_learnt_from_one_process_names_its_others_even_those_seen_before():
    r = resolver(proc_class=Unprivileged)
    assert who(r.resolve(5203)) == ("slurm_job", B, "bob")  # daemonized: its parent is init
    assert who(r.resolve(5201)) == ("slurm_job", "4245", "bob")  # via bash -> slurmstepd [4245.batch]
    assert who(r.resolve(5203)) == ("slurm_job", "4245", "bob")  # the cached identity switched too


class Recording(Unprivileged):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.read: list[tuple[int, str]] = []

    def read_text(self, pid: int, name: str) -> str:
        self.read.append((pid, name))
        return super().read_text(pid, name)


def test_the_job_id_is_looked_up_once_per_sluid(tmp_path):
    root = copy(tmp_path)
    (root / "5204").mkdir()
    for name in ("stat", "status", "cgroup", "cmdline"):  # a second task of the batch job
        (root / "5204" / name).write_text((root / "5201" / name).read_text().replace("5201", "5204"))
    proc = Recording(str(root))
    r = WorkloadResolver(proc, UserNames(passwd_file=str(PASSWD)))
    assert r.resolve(5201).id == "4245"
    assert {pid for pid, _ in proc.read} == {5201, 5202, 5200}  # up to the slurmstepd, once
    proc.read.clear()
    assert r.resolve(5204).id == "4245"
    assert {pid for pid, _ in proc.read} == {5204} and (5204, "cmdline") not in proc.read


def test_environ_of_another_job_or_without_the_sluid_is_not_trusted(tmp_path):
    root = copy(tmp_path)
    env = (root / "5101" / "environ").read_text()
    (root / "5101" / "environ").write_text(env.replace("SLURM_JOB_ID=4244", "SLURM_JOB_ID=9999")
                                           .replace(f"SLURM_JOB_SLUID={A}", f"SLURM_JOB_SLUID={B}"))
    assert resolver(root).resolve(5101).id == "4244"  # from slurmstepd [4244.0] instead
    (root / "5102" / "environ").write_text(env.replace(f"SLURM_JOB_SLUID={A}\0", "").replace("4244", "9999"))
    (root / "5100" / "cmdline").write_text("/usr/sbin/slurmstepd\0")
    assert resolver(root).resolve(5102).id == A  # a stale SLURM_JOB_ID alone says nothing


def test_a_slurmstepd_of_another_job_is_not_trusted(tmp_path):
    root = copy(tmp_path)
    (root / "5200" / "cgroup").write_text(f"0::/system.slice/slurmstepd.scope/{A}/step_batch/slurm\n")
    assert resolver(root, Unprivileged).resolve(5201).id == B


def test_cgroup_v1_owner_comes_from_the_path(tmp_path):
    root = copy(tmp_path)
    status = (root / "5501" / "status").read_text().replace("Uid:\t1001\t1001\t1001\t1001", "Uid:\t0\t0\t0\t0")
    (root / "5501" / "status").write_text(status)
    assert who(resolver(root).resolve(5501)) == ("slurm_job", "4247", "bob")


# -- GET /api/v1/workloads --------------------------------------------------------------------------


T0 = 1_780_470_000.0
UUIDS = ("GPU-5b3c9a1e-0000-4000-8000-000000000000", "GPU-5b3c9a1e-0000-4000-8000-000000000001",
         "GPU-5b3c9a1e-0000-4000-8000-000000000002")


def reading(t: float, *procs: tuple[int, float]) -> GpuReading:
    return GpuReading(t, t, 400.0, None, None, None, None, None,
                      tuple(GpuProcess(pid, 2**30, sm) for pid, sm in procs))


def charged_tracker(proc_class: type[ProcFS] = ProcFS, t0: float = T0) -> WorkloadTracker:
    """Job 4244 (SLUID, two tasks) on GPUs 0 and 1, job 4245 (SLUID, batch) sharing GPU 1, v1 job 4247 on
    GPU 2 with a negative price for a while; ten 1 s steps from t0."""
    now = [t0]
    tracker = WorkloadTracker(resolver(proc_class=proc_class), 900.0, 100, clock=lambda: now[0])
    for i, uuid in enumerate(UUIDS):
        tracker.add_gpu(i, uuid)
    for k in range(10):
        t = t0 + k
        now[0] = t + 1
        step = EnergyStep(t, t + 1, 400.0 + k)
        price = 0.25 if k < 7 else -0.05
        charge = StepCharge(step.joules * 1.2, (("EUR", step.joules * 1.2 / 3.6e6 * price),),
                            step.joules * 1.2 / 3.6e6 * 380, ())
        tracker.on_step(0, UUIDS[0], step, charge, reading(t, (5101, 0.9)))
        tracker.on_step(1, UUIDS[1], step, charge, reading(t, (5102, 0.6), (5201, 0.3)))
        tracker.on_step(2, UUIDS[2], step, charge, reading(t, (5501, 0.5)))
    return tracker


def published(tracker: WorkloadTracker | None, at: float = T0 + 10) -> SimpleNamespace:
    """What the API reads of the sampler: its snapshot and whether workloads are accounted."""
    w = tracker.snapshot(at) if tracker is not None else None
    snap = Snapshot(seq=1, timestamp=at, duration_seconds=0.01, backend="simulated", ready=True, gpus=(),
                    workloads=w)
    return SimpleNamespace(snapshot=snap, workloads=tracker, interval_seconds=1.0)


def api(view, query: str = "") -> tuple[int, dict]:
    from urllib.parse import parse_qs

    status, headers, body = workloads_response(view, parse_qs(query, keep_blank_values=True), host="gpu-node-07")
    assert headers["Cache-Control"] == "no-cache"
    return status, json.loads(body)


def test_api_lists_every_series_with_the_metrics_exact_values():
    view = published(charged_tracker())
    status, doc = api(view)
    assert status == 200 and doc["version"] == 1 and doc["host"] == "gpu-node-07"
    assert doc["sampled_at"] == T0 + 10 and doc["retention_seconds"] == 900.0
    by_id = {(w["kind"], w["workload"]): w for w in doc["workloads"]}
    assert set(by_id) == {("slurm_job", "4244"), ("slurm_job", "4245"), ("slurm_job", "4247")}
    assert [(g["gpu"], g["uuid"]) for g in by_id["slurm_job", "4244"]["gpus"]] == [(0, UUIDS[0]), (1, UUIDS[1])]
    assert [(g["gpu"], g["uuid"]) for g in by_id["slurm_job", "4245"]["gpus"]] == [(1, UUIDS[1])]
    assert [(g["gpu"], g["uuid"]) for g in by_id["slurm_job", "4247"]["gpus"]] == [(2, UUIDS[2])]
    assert [by_id[k]["user"] for k in sorted(by_id)] == ["alice", "bob", "bob"]
    # per GPU: the same floats /metrics exports
    text = Exposition().render(view.snapshot).text.decode()
    metric: dict[tuple, float] = {}
    for s in samples(text):
        if s.name.startswith("wattson_workload_") and s.name.endswith("_total") and "workload" in s.labels:
            metric[(s.name, s.labels["workload"], s.labels["gpu"], s.labels.get("currency"))] = s.value
    for w in doc["workloads"]:
        for g in w["gpus"]:
            key = (w["workload"], str(g["gpu"]))
            assert g["energy_joules"] == metric[("wattson_workload_energy_joules_total", *key, None)]
            assert g["co2e_grams"] == metric[("wattson_workload_co2e_grams_total", *key, None)]
            assert g["cost"]["EUR"] == metric[("wattson_workload_cost_total", *key, "EUR")]
            assert g["cost_credit"]["EUR"] == metric[("wattson_workload_cost_credit_total", *key, "EUR")]
        total = w["total"]
        assert total["energy_joules"] == math.fsum(g["energy_joules"] for g in w["gpus"])
        assert total["cost_credit"]["EUR"] > 0  # the negative prices of the last steps
    # each GPU's workload series add up to its whole energy: nothing lost, nothing counted twice
    energy = sum(400.0 + k for k in range(10))  # 400..409 J per GPU
    for gpu in ("0", "1", "2"):
        assert sum(v for (n, _w, g, _c), v in metric.items()
                   if n == "wattson_workload_energy_joules_total" and g == gpu) == pytest.approx(energy)


def test_api_filters_by_kind_and_workload():
    view = published(charged_tracker())
    assert [w["workload"] for w in api(view, "kind=slurm_job&workload=4245")[1]["workloads"]] == ["4245"]
    assert [w["workload"] for w in api(view, "workload=4245&workload=4247")[1]["workloads"]] == ["4245", "4247"]
    assert api(view, "kind=pod")[1]["workloads"] == []
    assert api(view, "kind=slurm_job&workload=1")[1]["workloads"] == []
    status, doc = api(view, "job=4245")
    assert status == 400 and "unknown parameter 'job'" in doc["error"]


def test_api_without_workload_accounting_is_a_clear_404_and_before_the_first_round_a_503():
    status, doc = api(published(None))
    assert status == 404 and "workloads.enabled" in doc["error"]
    view = published(charged_tracker())
    view.snapshot = Snapshot(seq=0, timestamp=None, duration_seconds=0.0, backend="", ready=False, gpus=())
    status, headers, _ = workloads_response(view, {})
    assert status == 503 and headers["Retry-After"] == "1"


def test_api_reads_the_published_snapshot_without_the_trackers_lock():
    tracker = charged_tracker()
    view = published(tracker)
    with tracker._lock:  # a GPU thread charging a step right now
        done = threading.Event()
        threading.Thread(target=lambda: (workloads_response(view, {}), done.set()), daemon=True).start()
        assert done.wait(2), "the API waited for the tracker's lock"


# -- the report of one job -----------------------------------------------------------------------------


def test_job_report_adds_a_jobs_series_under_its_id_and_its_sluid():
    tracker = charged_tracker(Unprivileged)  # 5203 is never on a GPU: every series has its job id...
    now = T0 + 20
    step = EnergyStep(now - 1, now, 100.0)
    # ...except a later process that nothing names: a fresh resolver, the daemonized 5203 first
    tracker.resolver = resolver(proc_class=Unprivileged)
    tracker.on_step(1, UUIDS[1], step, StepCharge(120.0, (("EUR", 1e-5),), 0.01, ()), reading(now, (5203, 1.0)))
    doc = json.loads(workloads_response(published(tracker, now), {}, host="n7")[2])
    assert {w["workload"] for w in doc["workloads"]} >= {"4245", B}
    report = job_report(doc, "4245", ["4245", B], "http://127.0.0.1:9874")
    assert report is not None and report.workloads == ("4245", B) and report.user == "bob"
    assert [(g.gpu, g.uuid) for g in report.gpus] == [(1, UUIDS[1])]
    parts = [w for w in doc["workloads"] if w["workload"] in ("4245", B)]
    assert report.total.energy_joules == pytest.approx(sum(w["total"]["energy_joules"] for w in parts))
    assert job_report(doc, "4245", ["4245"], "u").total.energy_joules < report.total.energy_joules
    assert job_report(doc, "1", ["1"], "u") is None
    text = render_text(report)
    assert "Slurm job 4245 on n7" in text and "user: bob" in text and f"SLUID {B}" in text
    with pytest.raises(ValueError):
        job_report({"workloads": [{"kind": "slurm_job", "workload": "1", "gpus": [{"gpu": 0}]}]}, "1", ["1"], "u")


# -- wattson job, against a real HTTP server ------------------------------------------------------------


class Server:
    """The real HTTP server with the workloads endpoint over `view`; with `rounds`, a sampler stand-in
    publishes a new snapshot of the tracker every 0.1 s."""

    def __init__(self, view, rounds: bool = False, security=None) -> None:
        self.view = view
        self.http = WattsonHTTPServer(("127.0.0.1", 0), lambda: view.snapshot, security,
                                      api={"/api/v1/workloads": lambda q, _e: workloads_response(view, q)})
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.stop = threading.Event()
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        if rounds:
            threading.Thread(target=self._rounds, daemon=True).start()

    def _rounds(self) -> None:
        while not self.stop.wait(0.1):
            self.view.snapshot = published(self.view.workloads, at=time.time()).snapshot

    def close(self) -> None:
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def served() -> Iterator[Server]:
    server = Server(published(charged_tracker(t0=time.time() - 20), at=time.time()), rounds=True)
    yield server
    server.close()


def run_job(capsys, *argv: str) -> tuple[int, str, str]:
    code = job_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_job_prints_energy_cost_and_co2e_per_gpu_and_in_total(served, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code, out, err = run_job(capsys, "4244", "--url", served.url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("Slurm job 4244 on ") and "user: alice" in lines[1]
    header = next(line for line in lines if line.startswith("gpu"))
    assert header.split() == ["gpu", "uuid", "energy", "kWh", "energy", "J", "cost", "EUR", "credit", "EUR",
                              "CO2e", "g"]
    rows = [line.split() for line in lines if line.startswith(("0 ", "1 ", "all "))]
    assert [r[0] for r in rows] == ["0", "1", "all"] and rows[0][1] == UUIDS[0]
    kwh, joules = float(rows[2][1]), float(rows[2][2])
    assert kwh == pytest.approx(joules / 3.6e6, abs=1e-6) and joules == pytest.approx(
        float(rows[0][3]) + float(rows[1][3]), abs=0.2)


def test_job_json_output_to_a_file(served, capsys, tmp_path):
    out_file = tmp_path / "jobs" / "4247.json"
    code, out, err = run_job(capsys, "4247", "--url", served.url, "--format", "json", "--output", str(out_file))
    assert (code, out, err) == (0, "", "")
    doc = json.loads(out_file.read_text())
    assert doc["job"] == "4247" and doc["user"] == "bob" and [g["gpu"] for g in doc["gpus"]] == [2]
    g = doc["gpus"][0]
    assert g["energy_kwh"] == pytest.approx(g["energy_joules"] / 3.6e6)
    assert g["net_cost"]["EUR"] == pytest.approx(g["cost"]["EUR"] - g["cost_credit"]["EUR"])
    assert doc["total"]["energy_joules"] == g["energy_joules"]
    assert oct(out_file.stat().st_mode & 0o777) == "0o644" and list(out_file.parent.iterdir()) == [out_file]


def test_job_in_an_epilog_also_asks_for_the_sluid(served, capsys, monkeypatch):
    """The epilog has SLURM_JOB_ID and SLURM_JOB_SLUID: a job charged under its SLUID is still found."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_SLUID", C)
    t = time.time()
    served.view.workloads.on_step(0, UUIDS[0], EnergyStep(t - 1, t, 50.0),
                                  StepCharge(60.0, (("EUR", 1e-6),), 0.006, ()),
                                  reading(t, (5301, 1.0)))  # the adopted ssh session: only its SLUID is known
    code, out, err = run_job(capsys, "777", "--url", served.url, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["workloads"] == [C] and doc["user"] == "carol" and doc["gpus"][0]["energy_joules"] == 50.0
    monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job's epilog: its SLUID is not this job's
    assert run_job(capsys, "777", "--url", served.url)[0] == 3


def test_job_exit_codes(served, capsys, tmp_path):
    code, out, err = run_job(capsys, "31337", "--url", served.url)
    assert code == 3 and out == "" and err.count("\n") == 1 and "job 31337 not known" in err and "900 s" in err
    code, _, err = run_job(capsys, "12_3", "--url", served.url)
    assert code == 2 and "not array syntax" in err and err.count("\n") == 1
    code, _, err = run_job(capsys, "--url", served.url)
    assert code == 2 and err.count("\n") == 1
    assert run_job(capsys, "1", "--url", "ftp://x")[0] == 2
    assert run_job(capsys, "1", "--url", served.url, "--password-file", "/nonexistent")[0] == 2
    code, _, err = run_job(capsys, "1", "--url", f"http://127.0.0.1:{free_port()}", "--wait", "0")
    assert code == 1 and "cannot reach wattson" in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_job(capsys, "4244", "--url", served.url, "--output", str(blocker / "x.txt"))
    assert code == 2 and "cannot write" in err


def test_job_over_tls_trusts_only_the_given_ca(tmp_path, capsys):
    openssl = require_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-keyout", "server.key", "-out", "server.crt", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=30)
    (tmp_path / "web.yml").write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    server = Server(published(charged_tracker(t0=time.time() - 20), at=time.time()), rounds=True,
                    security=load_web_config(str(tmp_path / "web.yml")))
    url = server.url.replace("http://", "https://")
    try:
        code, out, err = run_job(capsys, "4244", "--url", url, "--ca-file", str(tmp_path / "server.crt"))
        assert code == 0 and "Slurm job 4244" in out, err
        code, _, err = run_job(capsys, "4244", "--url", url)
        assert code == 2 and "not trusted" in err and "--ca-file" in err and err.count("\n") == 1
        code, _, err = run_job(capsys, "4244", "--url", url, "--ca-file", str(tmp_path / "nope.pem"))
        assert code == 2 and "--ca-file" in err and "no such file" in err
    finally:
        server.close()


def test_job_with_workloads_disabled_or_not_wattson(capsys):
    server = Server(published(None))
    try:
        code, _, err = run_job(capsys, "4244", "--url", server.url)
        assert code == 2 and "workloads.enabled" in err and err.count("\n") == 1
        code, _, err = run_job(capsys, "4244", "--url", server.url + "/nope")
        assert code == 2 and "not served" in err
    finally:
        server.close()


def test_job_waits_for_a_round_after_it_started(capsys):
    """An epilog starts right after the job's processes ended: the report waits for the next round."""
    tracker = charged_tracker(t0=time.time() - 20)
    view = published(tracker, at=time.time() - 5)  # the last round is older than the command
    server = Server(view)
    try:
        def next_round() -> None:
            time.sleep(0.5)
            view.snapshot = published(tracker, at=time.time()).snapshot

        threading.Thread(target=next_round, daemon=True).start()
        started = time.monotonic()
        code, out, err = run_job(capsys, "4244", "--url", server.url, "--wait", "5")
        assert code == 0 and err == "" and 0.4 < time.monotonic() - started < 4
        view.snapshot = published(tracker, at=time.time() - 5).snapshot
        code, out, err = run_job(capsys, "4244", "--url", server.url, "--wait", "0.3")
        assert code == 0 and "warning: no sampling round" in err and out
    finally:
        server.close()


def test_job_through_basic_auth_and_the_daemons_own_route(tmp_path):
    """The real daemon with simulated Slurm jobs behind basic auth: the endpoint needs the password like
    /metrics does, and `wattson job` run as a command reports the job on its GPUs."""
    hashed = bcrypt.hashpw(b"epilog-secret", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  epilog: '{hashed}'\n")
    (tmp_path / "password").write_text("epilog-secret\n")
    (tmp_path / "wrong").write_text("guess\n")
    config = """
gpu:
  backend: simulated
  simulated:
    count: 3
    profiles: [training, training, idle]
    jobs:
      - {kind: slurm_job, id: "4242", gpus: [0, 1], user: alice, uid: 1001}
      - {kind: slurm_job, id: "4243", gpus: [2], user: bob, uid: 1002}
sampler: {interval_seconds: 0.2}
grid:
  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}
  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.25, currency: EUR}]}
workloads: {enabled: true}
"""
    with run_wattson(tmp_path, config, "--web.config.file", str(web), wait_ready=False) as d:
        auth = "Basic " + base64.b64encode(b"epilog:epilog-secret").decode()
        wait_for("wattson ready", lambda: d.proc.poll() is None and get(d.base + "/readyz", 1,
                                                                          Authorization=auth)[0] == 200, 20)
        assert get(d.base + "/api/v1/workloads")[0] == 401

        def both_jobs() -> bool:
            status, _, body = get(d.base + "/api/v1/workloads?kind=slurm_job", Authorization=auth)
            assert status == 200
            return {w["workload"] for w in json.loads(body)["workloads"]} == {"4242", "4243"}

        wait_for("both jobs charged", both_jobs, 10)
        cmd = [sys.executable, "-m", "wattson", "job", "4242", "--url", d.base, "--username", "epilog"]
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT / "exporter")}
        done = subprocess.run(cmd + ["--password-file", str(tmp_path / "password"), "--format", "json"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["user"] == "alice" and [g["gpu"] for g in doc["gpus"]] == [0, 1]
        assert doc["total"]["energy_joules"] > 0 and doc["total"]["co2e_grams"] > 0
        done = subprocess.run(cmd + ["--password-file", str(tmp_path / "wrong")], capture_output=True, text=True,
                              env=env, timeout=30)
        assert done.returncode == 2 and "refused" in done.stderr and done.stdout == ""
        done = subprocess.run(cmd[:4] + ["9", "--url", d.base], capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 2 and "--username" in done.stderr


# -- the systemd unit --------------------------------------------------------------------------------


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this venv's wattson (verify checks it is executable)."""
    exe = Path(sys.executable).parent / "wattson"
    if not exe.exists():
        exe = Path(shutil.which("wattson") or "/bin/true")
    unit = tmp_path / "wattson.service"
    unit.write_text(UNIT.read_text().replace("/opt/wattson/bin/wattson", str(exe)))
    return unit


def test_unit_is_hardened_as_documented():
    text = UNIT.read_text()
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {"DynamicUser": ["yes"], "StateDirectory": ["wattson"], "ProtectSystem": ["strict"],
                "ProtectHome": ["yes"], "PrivateTmp": ["yes"], "NoNewPrivileges": ["yes"],
                "CapabilityBoundingSet": [""], "DevicePolicy": ["closed"], "ProtectProc": ["default"],
                "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"], "MemoryDenyWriteExecute": ["yes"],
                "EnvironmentFile": ["-/etc/wattson/wattson.env"], "ExecReload": ["/bin/kill -HUP $MAINPID"],
                "Restart": ["on-failure"], "PrivateUsers": ["no"]}
    for key, value in expected.items():
        assert settings.get(key) == value, key
    assert "@system-service" in settings["SystemCallFilter"]
    assert settings["ExecStart"] == ["/opt/wattson/bin/wattson --config.file /etc/wattson/wattson.yml "
                                     "--storage.path ${STATE_DIRECTORY}"]
    assert {"/dev/nvidiactl rw", "char-nvidia-frontend rw"} <= set(settings["DeviceAllow"])
    assert not re.search(r"(?i)(api_key|password|token)\s*=", text)  # secrets live in the EnvironmentFile


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = require_tool("systemd-analyze")
    done = subprocess.run([analyze, "verify", str(unit_for_this_machine(tmp_path))], capture_output=True,
                          text=True, timeout=60)
    # verify exits 0 for unknown keys and bad values too: any message is a finding
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_unit_security_exposure(tmp_path):
    """`systemd-analyze security` scores 0 (locked down) to 10 (unprotected); the unit must stay at or below 2.0."""
    analyze = require_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    done = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    print(f"systemd-analyze security: exposure {m.group(1)}")
    assert done.returncode == 0 and float(m.group(1)) <= 2.0, done.stdout


def test_wattson_runs_with_write_xor_execute_memory_enforced(tmp_path):
    """MemoryDenyWriteExecute=yes: the kernel's own equivalent (PR_SET_MDWE, Linux 6.3+) set before exec,
    then wattson reads GPUs through pynvml's ctypes path and the fake libnvidia-ml and serves them."""
    require_c_compiler()
    from tests.fake_libnvml import build_fake_libnvml, fake_nvml_env, write_control

    lib = build_fake_libnvml(tmp_path / "lib")
    control = tmp_path / "nvml.control"
    write_control(control, {"gpus": 2, "gpu.0.power_w": 250, "gpu.1.power_w": 300})
    config = tmp_path / "wattson.yml"
    config.write_text("gpu: {backend: nvml}\nsampler: {interval_seconds: 0.2}\n"
                      "grid:\n  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}\n"
                      "  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.25, currency: EUR}]}\n")
    port = free_port()
    launcher = (
        "import ctypes, mmap, os, sys\n"
        "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"
        "try:\n    mmap.mmap(-1, 4096, prot=7)\n    sys.exit(78)\nexcept PermissionError:\n    pass\n"
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
    env = fake_nvml_env(lib, control, base={"PATH": os.environ.get("PATH", ""),
                                            "PYTHONPATH": str(ROOT / "exporter")})
    log = tmp_path / "wattson.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", launcher, "-m", "wattson", "--config.file", str(config),
                                 "--web.listen-address", f"127.0.0.1:{port}", "--storage.path", str(tmp_path / "d")],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                if proc.returncode == 77:
                    pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
                raise AssertionError(f"exited {proc.returncode}: {log.read_text()}")
            return get(f"http://127.0.0.1:{port}/readyz", 1)[0] == 200

        wait_for("wattson ready under W^X", ready, 20)
        time.sleep(0.5)
        text = get(f"http://127.0.0.1:{port}/metrics")[2].decode()
        power = {s.labels["gpu"]: s.value for s in samples(text) if s.name == "wattson_gpu_power_watts"}
        assert power == {"0": 250.0, "1": 300.0}, log.read_text()
    finally:
        stop_process(proc, grace_seconds=5)
    assert proc.returncode == 0, log.read_text()
