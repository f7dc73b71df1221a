from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests run against the source tree without installing (the README's test command installs it too).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "exporter"))

from tests.fixture_server import FixtureServer  # noqa: E402

CI_VALUES = ("true", "1", "yes")


def in_ci() -> bool:
    """CI=true (what CI services set, and .ci/run): a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def find_tool(*names: str) -> str | None:
    """The first of `names` on PATH or next to this interpreter (tools pip installed into the venv)."""
    venv_bin = str(Path(sys.executable).parent)
    for name in names:
        path = shutil.which(name) or shutil.which(name, path=venv_bin)
        if path:
            return path
    return None


# How to get each prerequisite the tests use, for the skip or failure message.
INSTALL = {
    "prometheus": "Debian: apt-get install prometheus",
    "promtool": "Debian: apt-get install prometheus",
    "amtool": "Debian: apt-get install prometheus-alertmanager",
    "openssl": "Debian: apt-get install openssl",
    "gcc": "Debian: apt-get install gcc",
    "prometheus-node-exporter": "Debian: apt-get install prometheus-node-exporter",
    "check-jsonschema": "pip install -e '.[test]'",
}


def _missing(names: tuple[str, ...]) -> str:
    hint = next((INSTALL[n] for n in names if n in INSTALL), "")
    return f"{' / '.join(names)} not installed" + (f" ({hint})" if hint else "")


def require_tool(*names: str) -> str:
    """The path of the first of `names` found (see find_tool); the test cannot run without it.

    When none is found the test is skipped, except under CI=true, where it fails: a green CI run
    means every test that needs a tool really ran.
    """
    path = find_tool(*names)
    if path is None:
        if in_ci():
            pytest.fail(f"{_missing(names)}; CI=true requires it", pytrace=False)
        pytest.skip(_missing(names))
    return path


def optional_tool(*names: str) -> str | None:
    """Like require_tool, for a tool a test can do without locally (it checks less): None when missing,
    except under CI=true, where a missing tool fails the test."""
    path = find_tool(*names)
    if path is None and in_ci():
        pytest.fail(f"{_missing(names)}; CI=true requires it", pytrace=False)
    return path


def require_c_compiler() -> str:
    """The C compiler tests/fake_libnvml builds with: $CC, default gcc."""
    return require_tool(os.environ.get("CC", "gcc"))


@pytest.fixture(scope="module")
def _shared_fixture_server() -> Iterator[FixtureServer]:
    # One API replay server per test module; each test starts with no routes and no recorded requests.
    with FixtureServer() as server:
        yield server


@pytest.fixture
def server(_shared_fixture_server: FixtureServer) -> FixtureServer:
    _shared_fixture_server.routes.clear()
    _shared_fixture_server.requests.clear()
    return _shared_fixture_server
