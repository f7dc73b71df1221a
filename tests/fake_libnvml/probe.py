"""Run wattson's NvmlBackend through real pynvml/ctypes and answer commands with one JSON line each.

Meant to run in a subprocess whose LD_LIBRARY_PATH leads to the fake libnvidia-ml.so.1 (or to a real
driver, to check a GPU host). Commands on stdin, one per line:
    start | restart      -> {"devices": [identity...]} or {"unavailable": "<one-line reason>"}
    read                 -> {"readings": [reading or {"error": kind, "reinit": bool, "message": str}]}
    close                -> {"closed": true}
    lib                  -> {"lib": "/path/of/the/loaded/libnvidia-ml.so.1"}
    quit                 -> exits
Usage: PYTHONPATH=exporter python tests/fake_libnvml/probe.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from wattson.gpu.base import BackendUnavailable, GpuReadError
from wattson.gpu.nvml import NvmlBackend


def loaded_library() -> str | None:
    """Path of the libnvidia-ml mapped into this process, to prove which library answered."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            if "libnvidia-ml" in line:
                return line.split(None, 5)[-1].strip()
    return None


def main() -> int:
    backend = NvmlBackend()
    devices: list = []
    for line in sys.stdin:
        command = line.strip()
        answer: dict[str, object]
        if command in ("start", "restart"):
            try:
                devices = backend.start() if command == "start" else backend.restart()
                answer = {"devices": [dataclasses.asdict(d.identity) for d in devices]}
            except BackendUnavailable as exc:
                answer = {"unavailable": str(exc)}
        elif command == "read":
            readings: list[object] = []
            for device in devices:
                started = time.monotonic()
                try:
                    readings.append(dataclasses.asdict(device.read()))
                except GpuReadError as exc:
                    readings.append({"error": exc.kind, "reinit": exc.reinit, "message": str(exc)})
                readings[-1]["elapsed_s"] = time.monotonic() - started  # type: ignore[index]
            answer = {"readings": readings}
        elif command == "close":
            backend.close()
            answer = {"closed": True}
        elif command == "lib":
            answer = {"lib": loaded_library()}
        elif command == "quit":
            return 0
        else:
            answer = {"bad_command": command}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
