"""Start the real wattson daemon in a subprocess on a free loopback port, for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0, **headers: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()



class Daemon:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
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
                wait_ready: bool = True) -> Iterator[Daemon]:
    port = free_port()
    cmd = [sys.executable, "-m", "wattson", "--web.listen-address", f"127.0.0.1:{port}", *args]
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
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"wattson exited {proc.returncode}: {daemon.log()}")
                try:
                    if get(daemon.base + "/readyz", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"wattson not ready in 20 s: {daemon.log()}")
                time.sleep(0.1)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
