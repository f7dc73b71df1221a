"""Start the real wattson daemon in a subprocess on a free loopback port, for integration tests.

free_port, the polling and the process teardown come from bench.common, shared with the benchmarks
(bench/ must not import the tests, so the tests import bench's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import WaitTimeout, free_port, stop_process, wait_for

__all__ = ["ROOT", "Daemon", "free_port", "get", "run_wattson"]

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 20.0


def get(url: str, timeout: float = 5.0, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET `url`: (status, headers, body), an HTTP error status included rather than raised."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Daemon:
    """A running wattson: its process, port, base URL and log."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        status, _h, body = get(self.base + "/metrics")
        assert status == 200, status
        return body.decode()


@contextmanager
def run_wattson(tmp_path: Path, config: str | None, *args: str, env: dict[str, str] | None = None,
                wait_ready: bool = True, storage: Path | None = None) -> Iterator[Daemon]:
    """wattson from the source tree with `config` (None: built-in defaults) and extra `args`.

    The environment is PATH plus `env` only, so no API key of the machine running the tests leaks in.
    With wait_ready, returns once /readyz answers 200 (AssertionError with the log if it exits first).
    State goes to `storage`, by default a directory of this daemon's own: pass the same `storage` to
    restart a daemon where the previous one stopped.
    """
    port = free_port()
    storage = storage if storage is not None else tmp_path / f"data-{port}"
    cmd = [sys.executable, "-m", "wattson", "--web.listen-address", f"127.0.0.1:{port}",
           "--storage.path", str(storage), *args]
    if config is not None:
        cfg = tmp_path / f"wattson-{port}.yml"
        cfg.write_text(config)
        cmd += ["--config.file", str(cfg)]
    log_path = tmp_path / f"wattson-{port}.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT / "exporter"),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    daemon = Daemon(proc, port, log_path)
    try:
        if wait_ready:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"wattson exited {proc.returncode}: {daemon.log()}")
                return get(daemon.base + "/readyz", timeout=1)[0] == 200

            try:
                wait_for("wattson ready (/readyz 200)", ready, READY_TIMEOUT_SECONDS)
            except WaitTimeout as exc:
                raise AssertionError(f"{exc}\n{daemon.log()}") from None
        yield daemon
    finally:
        stop_process(proc, grace_seconds=5)
