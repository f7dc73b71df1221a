#!/usr/bin/env python3
"""Keep only the openAPIV3Schema of the v1 version of prometheus-operator CRDs, as JSON.

    python deploy/helm/crds-schemas/extract.py CRD.yaml... [--out deploy/helm/crds-schemas]

writes <kind, lower case>.json (servicemonitor.json, podmonitor.json, prometheusrule.json) next to this
script. README.md says which release they came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("crds", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        out = args.out / f"{kind.lower()}.json"
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{out}: {kind} {crd['spec']['group']}/v1 from {path.name}")


if __name__ == "__main__":
    main()
