"""Plumbing shared by the benchmarks and the tests: free ports, polling, processes, /proc readings,
exposition parsing, statistics, machine facts.

The tests build on this module (tests/daemon.py, tests/promstack.py, tests/faults_support.py) and never
the other way round: bench/ is a tool users run from a checkout (`python bench/run.py`), so it must not
need the test tree, while the tests may import bench like any other code of the repository. Standard
library plus wattson's own dependencies (the CI venv has no numpy), so the numbers can be rerun
anywhere wattson runs.
"""

from __future__ import annotations

import http.client
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parent.parent
EXPORTER = ROOT / "exporter"

CLK_TCK = os.sysconf("SC_CLK_TCK")
NODE_EXPORTER_NAMES = ("prometheus-node-exporter", "node_exporter")

T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WaitTimeout(AssertionError):
    """wait_for's deadline passed. An AssertionError, so a test that waits in vain reports a failure."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1,
             retry_on: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """Call `probe` until it returns something truthy, and return that.

    Exceptions in `retry_on` mean "not yet" (the last one is named on timeout). Any other exception
    ends the wait at once: that is how a probe says the state can no longer come (a process exited).
    The one polling loop of the benchmarks and the tests, so every wait fails the same, readable way.
    """
    deadline = time.monotonic() + timeout
    last = "never probed"
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last = f"last error: {type(exc).__name__}: {exc}"
        else:
            if value:
                return value
            last = f"last result: {value!r}"
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} ({last[:500]})")
        time.sleep(interval)


def samples(text: str) -> list[Sample]:
    """Every sample of a text-format exposition, parsed by prometheus_client (the one parser used)."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample `name` whose labels include `labels`; None when there is none."""
    for s in samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def http_get(port: int, path: str, timeout_seconds: float = 5.0,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_seconds)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_http_ok(port: int, path: str, proc: subprocess.Popen[bytes], what: str, log_path: Path,
                 timeout_seconds: float = 30.0) -> None:
    """Wait until `proc` serves `path` with 200; RuntimeError at once if it exits first."""
    def ok() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before serving {path}: "
                               f"{log_path.read_text(errors='replace')[-800:]}")
        return http_get(port, path, timeout_seconds=1.0)[0] == 200

    wait_for(f"{what} to serve {path}", ok, timeout_seconds, interval=0.05,
             retry_on=(OSError, http.client.HTTPException))


def stop_process(proc: subprocess.Popen[bytes], grace_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `grace_seconds`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Process:
    """A server started by a benchmark: its pid, port and log, for /proc readings and teardown."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


# Runs the daemon's own main() after turning on TCP_NODELAY for its HTTP handler: used only to measure
# what that proposed one-line change to wattson/web.py would do, and labelled so in the report.
NODELAY_LAUNCHER = ("import sys, wattson.web as web; web._Handler.disable_nagle_algorithm = True; "
                    "from wattson.cli import main; sys.exit(main())")


def shipped_handler_disables_nagle() -> bool:
    from wattson import web

    return bool(getattr(web._Handler, "disable_nagle_algorithm", False))


@contextmanager
def wattson_daemon(config_yaml: str, gpus: int, workdir: Path | None = None,
                   patch_nodelay: bool = False) -> Iterator[Process]:
    """The real daemon, as users run it from the repo, on a free loopback port; stopped with SIGTERM.

    patch_nodelay=True starts it through NODELAY_LAUNCHER instead of `python -m wattson`."""
    with tempfile.TemporaryDirectory(prefix="wattson-bench-") as tmp:
        work = workdir or Path(tmp)
        port = free_port()
        cfg = work / f"wattson-{port}.yml"
        cfg.write_text(config_yaml)
        log_path = work / f"wattson-{port}.log"
        env = {**os.environ, "PYTHONPATH": str(EXPORTER), "PYTHONUNBUFFERED": "1"}
        entry = ["-c", NODELAY_LAUNCHER] if patch_nodelay else ["-m", "wattson"]
        cmd = [sys.executable, *entry, "--simulate", "--simulate.gpus", str(gpus),
               "--config.file", str(cfg), "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn",
               "--storage.path", str(work / f"data-{port}")]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_http_ok(port, "/readyz", proc, "wattson", log_path)
            yield Process("wattson+nodelay" if patch_nodelay else "wattson", proc, port, log_path)
        finally:
            stop_process(proc)


def node_exporter_binary() -> str | None:
    for name in NODE_EXPORTER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def node_exporter_version() -> str | None:
    binary = node_exporter_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else None


@contextmanager
def node_exporter() -> Iterator[Process]:
    """Debian's prometheus-node-exporter with its default collectors, on a free loopback port."""
    binary = node_exporter_binary()
    if binary is None:
        raise FileNotFoundError("prometheus-node-exporter not installed "
                                "(apt-get install prometheus-node-exporter)")
    with tempfile.TemporaryDirectory(prefix="node-exporter-bench-") as tmp:
        port = free_port()
        log_path = Path(tmp) / "node_exporter.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http_ok(port, "/metrics", proc, "node_exporter", log_path)
            yield Process("node_exporter", proc, port, log_path)
        finally:
            stop_process(proc)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # kB
    return values["VmRSS"], values["VmHWM"]


def thread_count(pid: int) -> int:
    """Threads of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Threads in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class LineFit:
    slope: float
    intercept: float
    slope_stderr: float
    residual_std: float
    n: int

    def slope_ci95(self) -> tuple[float, float]:
        # 1.96 is the normal quantile; with n >= 30 points the t quantile is within 5% of it.
        t = 1.96 if self.n >= 30 else _t975(self.n - 2)
        return self.slope - t * self.slope_stderr, self.slope + t * self.slope_stderr


def _t975(dof: int) -> float:
    """Two-sided 95% Student t quantile for small samples (table; conservative between entries)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04}
    for k in sorted(table):
        if dof <= k:
            return table[k]
    return 1.96


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Ordinary least squares y = slope * x + intercept, with the slope's standard error."""
    n = len(xs)
    if n < 2:
        return LineFit(0.0, ys[0] if ys else 0.0, math.inf, 0.0, n)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return LineFit(0.0, my, math.inf, 0.0, n)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    sse = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    resid_var = sse / (n - 2) if n > 2 else 0.0
    stderr = math.sqrt(resid_var / sxx) if n > 2 else math.inf
    return LineFit(slope, intercept, stderr, math.sqrt(resid_var), n)


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Median of the slopes between all pairs of points: robust to the steps RSS moves in (pages,
    allocator arenas), where a least-squares line is pulled by one late step."""
    slopes = sorted((ys[j] - ys[i]) / (xs[j] - xs[i])
                    for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i])
    return percentile(slopes, 50) if slopes else 0.0


def machine_info() -> dict[str, object]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    virt = []
    if shutil.which("systemd-detect-virt"):
        out = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True)
        if out.stdout.strip() and out.stdout.strip() != "none":
            virt.append(out.stdout.strip())
    try:
        if " hypervisor" in Path("/proc/cpuinfo").read_text():
            virt.append("CPU reports a hypervisor (virtual machine)")
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": mem_total,
        "kernel": platform.release(),
        "os": _os_release(),
        "virtualization": "; ".join(virt) or "none detected",
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def versions() -> dict[str, object]:
    from importlib import metadata

    import wattson

    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    commit = None
    if shutil.which("git"):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()
            if dirty:
                commit += " (with uncommitted changes)"
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "wattson": wattson.__version__,
        "wattson_commit": commit,
        "prometheus_client": dist("prometheus_client") or dist("prometheus-client"),
        "pydantic": dist("pydantic"),
        "node_exporter": node_exporter_version(),
    }
