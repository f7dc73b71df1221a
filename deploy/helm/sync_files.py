#!/usr/bin/env python3
"""Copy the shipped Prometheus rules and Grafana dashboards into the Helm chart.

Helm reads only files inside the chart, so the chart's PrometheusRule and dashboard ConfigMaps are built
from copies: prometheus/rules/*.yml -> deploy/helm/wattson/files/rules/, grafana/dashboards/*.json ->
deploy/helm/wattson/files/dashboards/. The copies are byte for byte; files no longer shipped are removed.
tests/test_helm.py fails while the copies differ from the originals: run this script after changing a rule
file or a dashboard.

    python deploy/helm/sync_files.py           # copy
    python deploy/helm/sync_files.py --check   # exit 1 and list the differences, copy nothing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "wattson"
# (source directory, pattern, directory in the chart)
SETS = (
    (ROOT / "prometheus" / "rules", "*.yml", CHART / "files" / "rules"),
    (ROOT / "grafana" / "dashboards", "*.json", CHART / "files" / "dashboards"),
)


def differences() -> list[str]:
    """What differs between the shipped files and the chart's copies, one line each; empty when in sync."""
    out = []
    for source, pattern, dest in SETS:
        shipped = {p.name: p for p in sorted(source.glob(pattern))}
        copied = {p.name: p for p in sorted(dest.glob(pattern))} if dest.is_dir() else {}
        if not shipped:
            out.append(f"{source.relative_to(ROOT)}: no {pattern} files")
        for name, path in shipped.items():
            if name not in copied:
                out.append(f"{(dest / name).relative_to(ROOT)}: missing (copy of {path.relative_to(ROOT)})")
            elif copied[name].read_bytes() != path.read_bytes():
                out.append(f"{(dest / name).relative_to(ROOT)}: differs from {path.relative_to(ROOT)}")
        for name in copied.keys() - shipped.keys():
            out.append(f"{(dest / name).relative_to(ROOT)}: no longer shipped in {source.relative_to(ROOT)}")
    return out


def sync() -> list[str]:
    """Make the chart's copies equal to the shipped files; returns what changed."""
    changed = differences()
    for source, pattern, dest in SETS:
        dest.mkdir(parents=True, exist_ok=True)
        shipped = {p.name: p for p in source.glob(pattern)}
        for stale in dest.glob(pattern):
            if stale.name not in shipped:
                stale.unlink()
        for name, path in shipped.items():
            data = path.read_bytes()
            target = dest / name
            if not target.exists() or target.read_bytes() != data:
                target.write_bytes(data)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences()
        for line in diffs:
            print(line)
        return 1 if diffs else 0
    for line in sync():
        print(f"updated: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
