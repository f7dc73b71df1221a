"""Run wattson's benchmarks and rewrite docs/benchmarks.md with the results.

    python bench/run.py            # full: the issue's numbers (about 60 minutes, 30 of them memory)
    python bench/run.py --quick    # small counts, for CI smoke tests (about a minute)

Each section is a module of this package with a run() that returns plain data; this script adds the
machine, the versions and the date, and renders the report. --json keeps the raw results (written
after every section, so a long run that dies keeps what it measured), --reuse/--only rerun a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common, report  # noqa: E402

SECTIONS = ("exposition", "energy", "sampler", "scrape", "memory", "memory_trace", "rules")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small counts (smoke test), not the issue's numbers.")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="Markdown report to (re)write.")
    p.add_argument("--json", dest="json_path", help="Also write the raw results here (after every section).")
    p.add_argument("--reuse", help="Take the sections not run now from this earlier --json file.")
    p.add_argument("--only", help=f"Comma-separated sections to run, of: {', '.join(SECTIONS)}.")
    p.add_argument("--render-from", metavar="JSON",
                   help="Run nothing: rewrite the report from an earlier --json file.")
    p.add_argument("--memory-minutes", type=float, help="Length of the memory run (default 30, quick 0.2).")
    p.add_argument("--trace-minutes", type=float,
                   help="Length of the tracemalloc comparison (default 5, quick 0.1).")
    p.add_argument("--requests", type=int, help="Requests per scrape-latency run (default 2000, quick 100).")
    p.add_argument("--loop-seconds", type=float, help="Sampler loop duration (default 30, quick 2).")
    p.add_argument("--rounds", type=int, help="Back-to-back sampling rounds (default 5000, quick 200).")
    p.add_argument("--energy-trials", type=int,
                   help="Random phases per energy profile (default 20, quick 2).")
    p.add_argument("--energy-window", type=float, help="Energy window in seconds (default 3600, quick 300).")
    p.add_argument("--rules-hosts", help="Fleet sizes for the rule cost, comma-separated (default 25,50, quick 2).")
    p.add_argument("--rules-days", type=int, help="Days of history for the rule cost (default 32, quick 2).")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    return {
        "quick": q,
        "memory_minutes": pick(args.memory_minutes, 30.0, 0.2),
        "trace_minutes": pick(args.trace_minutes, 5.0, 0.1),
        "requests": pick(args.requests, 2000, 100),
        "warmup_per_scraper": 20 if not q else 3,
        "loop_seconds": pick(args.loop_seconds, 30.0, 2.0),
        "rounds": pick(args.rounds, 5000, 200),
        "energy_trials": pick(args.energy_trials, 20, 2),
        "energy_window": pick(args.energy_window, 3600.0, 300.0),
        "rules_hosts": [int(x) for x in args.rules_hosts.split(",")] if args.rules_hosts else ([2] if q else [25, 50]),
        "rules_days": pick(args.rules_days, 32, 2),
    }


def progress(message: str) -> None:
    print(message, flush=True)


def run_section(name: str, s: dict[str, Any]) -> dict[str, Any]:
    if name == "exposition":
        from bench import exposition_size

        return exposition_size.run(progress=progress)
    if name == "energy":
        from bench import energy_accuracy

        return energy_accuracy.run(window_seconds=s["energy_window"], trials=s["energy_trials"],
                                   progress=progress)
    if name == "sampler":
        from bench import sampler_cost

        return sampler_cost.run(rounds=s["rounds"], loop_seconds=s["loop_seconds"], progress=progress)
    if name == "scrape":
        from bench import scrape_latency

        return scrape_latency.run(requests=s["requests"], warmup=s["warmup_per_scraper"], progress=progress)
    if name == "memory":
        from bench import memory

        return memory.run(minutes=s["memory_minutes"], progress=progress)
    if name == "memory_trace":
        from bench import memory_trace

        return memory_trace.run(minutes=s["trace_minutes"], warmup_seconds=30.0 if not s["quick"] else 2.0,
                                progress=progress)
    if name == "rules":
        from bench import rule_cost

        return rule_cost.run(hosts=s["rules_hosts"], days=s["rules_days"], polls=2 if s["quick"] else 3,
                             evaluation_seconds=5 if s["quick"] else 15,
                             compaction_timeout=5.0 if s["quick"] else 300.0, progress=progress)
    raise ValueError(f"unknown section {name!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_from:
        try:
            saved = json.loads(Path(args.render_from).read_text())
        except (OSError, ValueError) as exc:
            print(f"bench/run.py: error: --render-from {args.render_from}: {exc}", file=sys.stderr)
            return 2
        Path(args.out).write_text(report.render(saved))
        progress(f"wrote {args.out} from {args.render_from}")
        return 0
    only = SECTIONS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        print(f"bench/run.py: error: --only: unknown section(s) {', '.join(unknown)}; "
              f"expected {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    s = settings(args)
    results: dict[str, Any] = {}
    if args.reuse:
        try:
            previous = json.loads(Path(args.reuse).read_text())
        except (OSError, ValueError) as exc:
            print(f"bench/run.py: error: --reuse {args.reuse}: {exc}", file=sys.stderr)
            return 2
        results = {k: v for k, v in previous.items() if k in SECTIONS and k not in only}
        prev_meta = previous.get("meta") or {}
        results["reused"] = {"sections": [k for k in SECTIONS if k in results], "date": prev_meta.get("date"),
                             "versions": prev_meta.get("versions"),
                             "load_average": {k: v for k, v in prev_meta.get("load_average", {}).items()
                                              if k in results}}
    started = time.time()
    results["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "command": "python bench/run.py" + ("" if argv is None and len(sys.argv) == 1 else
                                            " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))),
        "settings": s,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "load_average": {},
        "duration_minutes": 0.0,
    }
    for name in SECTIONS:
        if name not in only:
            continue
        progress(f"[{time.strftime('%H:%M:%S')}] {name} ...")
        results["meta"]["load_average"][name] = os.getloadavg()[0]
        results[name] = run_section(name, s)
        results["meta"]["duration_minutes"] = (time.time() - started) / 60
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=1))
    results["meta"]["duration_minutes"] = (time.time() - started) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1))
    progress(f"[{time.strftime('%H:%M:%S')}] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
