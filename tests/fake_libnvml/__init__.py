"""Build and drive the fake libnvidia-ml.so.1 (see README.md here for the control file format).

    lib = build_fake_libnvml(tmp_path)                # -> tmp_path/libnvidia-ml.so.1
    control = tmp_path / "nvml.control"
    write_control(control, {"gpus": 2, "gpu.1.error": "gpu_lost"})
    env = fake_nvml_env(lib, control)                 # LD_LIBRARY_PATH + FAKE_NVML_CONTROL for a subprocess
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_nvml.c"
PROBE = HERE / "probe.py"
SONAME = "libnvidia-ml.so.1"
CONTROL_ENV = "FAKE_NVML_CONTROL"


class FakeLibBuildError(RuntimeError):
    """The fake library could not be built (no C compiler, or the source does not compile)."""


def gcc_path() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def build_fake_libnvml(directory: Path | str) -> Path:
    """Compile fake_nvml.c into `directory`/libnvidia-ml.so.1 and return that path.

    The directory should hold nothing else named like NVIDIA libraries: it goes on LD_LIBRARY_PATH.
    """
    cc = gcc_path()
    if cc is None:
        raise FakeLibBuildError(f"cannot build fake {SONAME}: no C compiler (gcc, or $CC) on PATH")
    out = Path(directory) / SONAME
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [cc, "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
           "-fvisibility=hidden", f"-Wl,-soname,{SONAME}", "-o", str(out), str(SOURCE), "-lm", "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        detail = " | ".join(proc.stderr.strip().splitlines()[:5])
        raise FakeLibBuildError(f"cannot build fake {SONAME} from {SOURCE}: {cc} exited {proc.returncode}: "
                                f"{detail}")
    return out


def write_control(path: Path | str, settings: Mapping[str, object]) -> None:
    """Write the control file atomically (the library may read it at any moment)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            value = int(value)
        text = f"{key}={value}"
        if "\n" in text:
            raise ValueError(f"control setting {key!r} must be one line")
        lines.append(text)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fake_nvml_env(lib: Path, control: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose dlopen("libnvidia-ml.so.1") finds the fake, not a real driver."""
    env = dict(os.environ if base is None else base)
    previous = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = str(Path(lib).parent) + (os.pathsep + previous if previous else "")
    env[CONTROL_ENV] = str(control)
    return env
