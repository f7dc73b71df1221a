"""Per-workload reports: the body of `GET /api/v1/workloads`, and the per-job report `wattson job` makes of it.

Slurm records a job's CPU time, memory and, through its energy plugins, node or AMD GPU energy, but not the
energy of NVIDIA GPUs. wattson meters it per workload already; this serves those totals as JSON so a Slurm
epilog (or any script) can read one job's numbers without a Prometheus.

The server side reads the published immutable snapshot only, like a scrape: it never takes the sampler's
locks and never reads /proc or NVML. The body holds every workload series the tracker exports, grouped by
workload, with the exact values of the `wattson_workload_*_total` counters per GPU and their sums:

    {"version": 1, "host": "gpu-node-07", "sampled_at": 1780470000.25, "sampler_interval_seconds": 1.0,
     "retention_seconds": 900.0,
     "workloads": [{"kind": "slurm_job", "workload": "4244", "user": "alice", "pod": "", "namespace": "",
                    "account": "physics",
                    "gpus": [{"gpu": 0, "uuid": "GPU-...", "energy_joules": 5012.5, "cost": {"EUR": 0.0004},
                              "cost_credit": {"EUR": 0.0}, "co2e_grams": 0.53}],
                    "total": {"energy_joules": 5012.5, "cost": {"EUR": 0.0004}, "cost_credit": {"EUR": 0.0},
                              "co2e_grams": 0.53}}]}

Energy is the GPUs' own (no PUE), as `wattson_workload_energy_joules_total`; cost and CO2e include PUE. Net
cost is `cost - cost_credit` (credit: money earned at negative prices). `sampled_at` is the UNIX time of the
sampling round the numbers are from (null before the first).
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ..snapshot import Snapshot
from .snapshot import WorkloadSeries

VERSION = 1
PATH = "/api/v1/workloads"
PARAMETERS = ("kind", "workload")
_NO_CACHE = {"Cache-Control": "no-cache"}
KIND_SLURM_JOB = "slurm_job"
# A Slurm job id as the epilog sees it (SLURM_JOB_ID, the raw id also of array tasks), or a SLUID (26.05+).
JOB_ID = re.compile(r"^\d+$")
SLUID = re.compile(r"^[sS][0-9A-Za-z]{13}$")


class SamplerView(Protocol):
    """What the endpoint reads of the sampler: its published snapshot and whether workloads are accounted."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def workloads(self) -> object | None: ...

    @property
    def interval_seconds(self) -> float: ...


# -- server: GET /api/v1/workloads ------------------------------------------------------------------------


def _number(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _amounts(pairs: Iterable[tuple[str, float]]) -> dict[str, float | None]:
    return {currency: _number(amount) for currency, amount in pairs}


def _sum_amounts(series: Sequence[WorkloadSeries], attr: str) -> dict[str, float | None]:
    by_currency: dict[str, list[float]] = {}
    for s in series:
        for currency, amount in getattr(s, attr):
            by_currency.setdefault(currency, []).append(amount)
    return {c: _number(math.fsum(v)) for c, v in sorted(by_currency.items())}


def workload_entries(snap: Snapshot, kinds: Sequence[str] = (), workloads: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every workload of the snapshot (filtered by kind and workload id where given), ordered by (kind, id),
    with its series per GPU and their sums."""
    w = snap.workloads
    if w is None:
        return []
    grouped: dict[tuple[str, str], list[WorkloadSeries]] = {}
    for s in w.series:
        if (kinds and s.kind not in kinds) or (workloads and s.workload not in workloads):
            continue
        grouped.setdefault((s.kind, s.workload), []).append(s)
    info = {(i.kind, i.workload): i for i in w.info}
    out = []
    for (kind, wid), series in sorted(grouped.items()):
        series.sort(key=lambda s: (s.gpu, s.uuid))
        i = info.get((kind, wid))
        out.append({
            "kind": kind, "workload": wid, "user": i.user if i else "", "pod": i.pod if i else "",
            "namespace": i.namespace if i else "",
            "account": str(getattr(i, "account", "") or "") if i else "",  # a Slurm job's, where known
            "gpus": [{"gpu": s.gpu, "uuid": s.uuid, "energy_joules": _number(s.energy_joules),
                      "cost": _amounts(s.cost), "cost_credit": _amounts(s.credit),
                      "co2e_grams": _number(s.co2e_grams)} for s in series],
            "total": {"energy_joules": _number(math.fsum(s.energy_joules for s in series)),
                      "cost": _sum_amounts(series, "cost"), "cost_credit": _sum_amounts(series, "credit"),
                      "co2e_grams": _number(math.fsum(s.co2e_grams for s in series))},
        })
    return out


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {**_NO_CACHE, **(headers or {})}, json.dumps({"error": message}).encode()


def workloads_response(sampler: SamplerView, query: Mapping[str, Sequence[str]],
                       host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """`GET /api/v1/workloads` as (HTTP status, extra headers, JSON body).

    Parameters: `kind=` and `workload=`, each repeatable (any of the values matches). 200 with the body (an
    empty `workloads` list when nothing matches); 400 for an unknown parameter; 404 when per-workload
    accounting is off (workloads.enabled false, or gpu.backend none); 503 before the first sampling round.
    Errors are {"error": one line}."""
    unknown = sorted(k for k in query if k not in PARAMETERS)
    if unknown:
        return _error(400, f"unknown parameter {unknown[0][:40]!r}: expected kind= and workload=")
    if sampler.workloads is None:
        return _error(404, "per-workload accounting is disabled here: set workloads.enabled: true on a host "
                      "with GPUs (see docs/workloads.md)")
    snap = sampler.snapshot
    if snap.workloads is None:
        return _error(503, "no sampling round completed yet", {"Retry-After": "1"})
    kinds = [v for v in query.get("kind", []) if v]
    ids = [v for v in query.get("workload", []) if v]
    body = {"version": VERSION, "host": host if host is not None else socket.gethostname(),
            "sampled_at": snap.timestamp, "sampler_interval_seconds": sampler.interval_seconds,
            "retention_seconds": getattr(sampler.workloads, "retention_seconds", None),
            "workloads": workload_entries(snap, kinds, ids)}
    return 200, dict(_NO_CACHE), json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


# -- client: one job's report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Energy, cost and CO2e of one GPU, or of all of a job's GPUs on this host."""

    energy_joules: float
    cost: dict[str, float]
    cost_credit: dict[str, float]
    co2e_grams: float

    @property
    def energy_kwh(self) -> float:
        return self.energy_joules / 3.6e6

    def net_cost(self) -> dict[str, float]:
        return {c: self.cost.get(c, 0.0) - self.cost_credit.get(c, 0.0)
                for c in sorted(set(self.cost) | set(self.cost_credit))}

    def as_dict(self) -> dict[str, Any]:
        return {"energy_joules": self.energy_joules, "energy_kwh": self.energy_kwh, "cost": dict(self.cost),
                "cost_credit": dict(self.cost_credit), "net_cost": self.net_cost(), "co2e_grams": self.co2e_grams}


@dataclass(frozen=True)
class GpuUsage:
    gpu: int
    uuid: str
    usage: Usage


@dataclass(frozen=True)
class JobReport:
    """One Slurm job on one host, as wattson metered it: its series under its job id and under its SLUID
    (a job is charged to its SLUID until wattson learns the job id), added per GPU."""

    job: str
    workloads: tuple[str, ...]  # the workload ids found: the job id, the SLUID, or both
    user: str
    account: str
    host: str
    url: str
    sampled_at: float | None
    retention_seconds: float | None
    gpus: tuple[GpuUsage, ...]
    total: Usage

    def as_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "job": self.job, "workloads": list(self.workloads), "user": self.user,
                "account": self.account,
                "host": self.host, "url": self.url, "sampled_at": self.sampled_at,
                "retention_seconds": self.retention_seconds,
                "gpus": [{"gpu": g.gpu, "uuid": g.uuid, **g.usage.as_dict()} for g in self.gpus],
                "total": self.total.as_dict()}


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what}: not a finite number")
    return float(v)


def _money(v: Any, what: str) -> dict[str, float]:
    if not isinstance(v, dict):
        raise ValueError(f"{what}: not an object")
    return {str(c): _float(a, f"{what}.{c}") for c, a in v.items()}


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for c, a in more.items():
        into[c] = into.get(c, 0.0) + a


def job_report(doc: Any, job: str, ids: Sequence[str], url: str) -> JobReport | None:
    """The report of `job` from a /api/v1/workloads body: its slurm_job entries whose id is one of `ids`
    (the job id, its SLUID), added per GPU. None when there is none. ValueError for a malformed body."""
    if not isinstance(doc, dict) or not isinstance(doc.get("workloads"), list):
        raise ValueError("not a wattson /api/v1/workloads answer (no workloads list)")
    energy: dict[tuple[int, str], float] = {}
    grams: dict[tuple[int, str], float] = {}
    cost: dict[tuple[int, str], dict[str, float]] = {}
    credit: dict[tuple[int, str], dict[str, float]] = {}
    found: list[str] = []
    user = account = ""
    for entry in doc["workloads"]:
        if not isinstance(entry, dict) or entry.get("kind") != KIND_SLURM_JOB or entry.get("workload") not in ids:
            continue
        found.append(str(entry["workload"]))
        user = user or str(entry.get("user") or "")
        account = account or str(entry.get("account") or "")
        gpus = entry.get("gpus")
        if not isinstance(gpus, list):
            raise ValueError(f"workload {entry['workload']}: gpus is not a list")
        for g in gpus:
            if not isinstance(g, dict) or not isinstance(g.get("gpu"), int) or not isinstance(g.get("uuid"), str):
                raise ValueError(f"workload {entry['workload']}: a GPU entry without gpu and uuid")
            key = (int(g["gpu"]), str(g["uuid"]))
            what = f"workload {entry['workload']} gpu {key[0]}"
            energy[key] = energy.get(key, 0.0) + _float(g.get("energy_joules"), what + " energy_joules")
            grams[key] = grams.get(key, 0.0) + _float(g.get("co2e_grams"), what + " co2e_grams")
            _add(cost.setdefault(key, {}), _money(g.get("cost", {}), what + " cost"))
            _add(credit.setdefault(key, {}), _money(g.get("cost_credit", {}), what + " cost_credit"))
    if not found:
        return None
    gpus_out = tuple(GpuUsage(k[0], k[1], Usage(energy[k], dict(sorted(cost[k].items())),
                                                dict(sorted(credit[k].items())), grams[k]))
                     for k in sorted(energy))
    total_cost: dict[str, float] = {}
    total_credit: dict[str, float] = {}
    for g in gpus_out:
        _add(total_cost, g.usage.cost)
        _add(total_credit, g.usage.cost_credit)
    total = Usage(math.fsum(energy.values()), dict(sorted(total_cost.items())), dict(sorted(total_credit.items())),
                  math.fsum(grams.values()))
    sampled = doc.get("sampled_at")
    retention = doc.get("retention_seconds")
    return JobReport(job, tuple(found), user, account, str(doc.get("host") or ""), url,
                     float(sampled) if isinstance(sampled, int | float) else None,
                     float(retention) if isinstance(retention, int | float) else None, gpus_out, total)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            .rstrip() for r in rows]


def render_text(report: JobReport) -> str:
    """The report for humans: per GPU and in total, energy in kWh and J, net cost per currency, CO2e."""
    currencies = sorted(set(report.total.cost) | set(report.total.cost_credit))
    with_credit = any(v != 0 for v in report.total.cost_credit.values())
    head = ["gpu", "uuid", "energy kWh", "energy J"] + [f"cost {c}" for c in currencies]
    head += [f"credit {c}" for c in currencies] if with_credit else []
    head += ["CO2e g"]

    def row(gpu: str, uuid: str, u: Usage) -> list[str]:
        net = u.net_cost()
        cells = [gpu, uuid, f"{u.energy_kwh:.6f}", f"{u.energy_joules:.1f}"]
        cells += [f"{net.get(c, 0.0):.6f}" for c in currencies]
        cells += [f"{u.cost_credit.get(c, 0.0):.6f}" for c in currencies] if with_credit else []
        return cells + [f"{u.co2e_grams:.3f}"]

    rows = [head] + [row(str(g.gpu), g.uuid, g.usage) for g in report.gpus] + [row("all", "", report.total)]
    when = (datetime.fromtimestamp(report.sampled_at).astimezone().isoformat(timespec="seconds")
            if report.sampled_at is not None else "unknown")
    also = [w for w in report.workloads if w != report.job]
    lines = [f"Slurm job {report.job} on {report.host or 'unknown host'}: NVIDIA GPU energy, cost and CO2e "
             "metered by wattson",
             f"user: {report.user or 'unknown'}" + (f"; account: {report.account}" if report.account else "")
             + f"; numbers as of {when}; from {report.url}"]
    if also:
        lines.append(f"includes the job's series under its SLUID {', '.join(also)}")
    lines += [""] + _table(rows) + [
        "",
        "Energy is the GPUs' own, without PUE. Cost (net of credit earned at negative prices) and CO2e include",
        "PUE, at the price and grid carbon intensity in force at each moment. A GPU shared with other jobs is",
        "split between them by their use (see wattson's docs/workloads.md).",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["PATH", "JobReport", "Usage", "GpuUsage", "job_report", "render_text", "workload_entries",
           "workloads_response"]
