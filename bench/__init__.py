"""wattson's benchmarks: `python bench/run.py [--quick]` rewrites docs/benchmarks.md."""

import sys
from pathlib import Path

# The benchmarks measure the source tree they live in, installed or not.
_EXPORTER = str(Path(__file__).resolve().parent.parent / "exporter")
if _EXPORTER not in sys.path:
    sys.path.insert(0, _EXPORTER)
