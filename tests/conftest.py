import sys
from pathlib import Path

# Tests run against the source tree without installing (the README's test command installs it too).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "exporter"))
