import sys
from pathlib import Path

import pytest

# Tests run against the source tree without installing (the README's test command installs it too).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "exporter"))

from tests.fixture_server import FixtureServer  # noqa: E402


@pytest.fixture(scope="module")
def _shared_fixture_server():
    # One API replay server per test module; each test starts with no routes and no recorded requests.
    with FixtureServer() as server:
        yield server


@pytest.fixture
def server(_shared_fixture_server: FixtureServer) -> FixtureServer:
    _shared_fixture_server.routes.clear()
    _shared_fixture_server.requests.clear()
    return _shared_fixture_server
