"""`wattson forecast`: when is the cheapest, cleanest time to run a job, asked from a terminal.

Builds the configured grid, fetches every source once, and prints per signal the best window of each
length (from the source serving now, as the exporter does) and the next 24 hours hour by hour. Exit 2
with one line for a config error, 1 with one line when no source answered.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from typing import TextIO

from .config import ConfigError, load_config
from .grid.forecast import BestWindow, SignalForecast, forecast_signal, parse_windows, window_label
from .grid.registry import build_grid
from .grid.signal import ChainState, GridSignals, SignalChain

HOURS_AHEAD = 24
UNITS = {"carbon": "gCO2e/kWh"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattson forecast", description="Fetch every configured grid source once "
                                "and print the cheapest and cleanest windows to run a job, and the next 24 hours.")
    p.add_argument("--config.file", dest="config_file", metavar="PATH",
                   help="YAML configuration file (default: built-in defaults).")
    p.add_argument("--window", action="append", metavar="DURATION",
                   help="Job length like 90m or 3h; repeat for several (default: grid.forecast.windows).")
    return p


def fail(message: str, code: int) -> int:
    print(f"wattson forecast: error: {message}", file=sys.stderr)
    return code


def local(t: float) -> datetime:
    return datetime.fromtimestamp(t).astimezone()


def when(t: float, same_day_as: float | None = None) -> str:
    """Local time with its UTC offset ('Wed 15 Jan 16:00 +01:00'); only the time on the same day."""
    d = local(t)
    offset = d.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if offset else ""
    if same_day_as is not None and local(same_day_as).date() == d.date():
        return f"{d:%H:%M}"
    return f"{d:%a %d %b %H:%M} {offset}".rstrip()


def number(signal: str, v: float) -> str:
    return f"{v:.4f}" if signal == "price" else f"{v:.1f}"


def versus(best: float, now: float) -> str:
    """How a window compares with the value in force now: a percentage, or a difference when now is <= 0."""
    if now > 0:
        pct = (best - now) / now * 100
        return "same as now" if abs(pct) < 0.5 else f"{pct:+.0f}% vs now"
    diff = best - now
    return "same as now" if abs(diff) < 1e-9 else f"{diff:+.4f} vs now"


def table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def hour_row(state: ChainState, h: float, now: float, first: bool) -> list[str]:
    """One hour: the time-weighted value over it as the chain would price it, its sources and marks."""
    label = when(h, same_day_as=None if first else h - 3600)
    pieces = state.split(h, h + 3600, now)
    covered = sum(f for f, v in pieces if v is not None)
    if covered <= 0:
        return [label, "-", "no data", ""]
    mean = sum(f * v.value for f, v in pieces if v is not None) / covered
    sources = list(dict.fromkeys(v.source for _, v in pieces if v is not None))
    marks = [m for m, on in (("forecast", any(v.interval.forecast for _, v in pieces if v is not None)),
                             ("estimated", any(v.interval.estimated for _, v in pieces if v is not None)),
                             ("partial", covered < 0.999)) if on]
    if h <= now < h + 3600:
        marks.insert(0, "now")
    return [label, number(state.signal, mean), ",".join(sources), " ".join(marks)]


def print_signal(chain: SignalChain, found: SignalForecast | None, windows: tuple[float, ...], now: float,
                 out: TextIO) -> None:
    state = chain.state
    unit = UNITS.get(state.signal) or (f"{found.currency}/kWh" if found and found.currency else "per kWh")
    title = "carbon intensity" if state.signal == "carbon" else "electricity price"
    if found is None:
        errors = "; ".join(s.last_error for s in state.statuses if s.last_error) or "no data now"
        print(f"{title}, zone {state.zone}: unknown ({errors})", file=out)
        return
    print(f"{title}, zone {state.zone}, {unit}: now {number(state.signal, found.now_value)} "
          f"from {found.source}", file=out)
    rows = [["window", "start", "end", "average", "compared"]]
    best: dict[float, BestWindow] = {w.seconds: w for w in found.windows}
    horizon = f"data end {when(found.horizon_end)}" if found.horizon_end is not None else "no data beyond now"
    for seconds in windows:
        w = best.get(seconds)
        if w is None:
            rows.append([window_label(seconds), "none long enough", f"({horizon})", "", ""])
            continue
        rows.append([w.label, "now" if w.start <= now + 1 else when(w.start), when(w.end, same_day_as=w.start),
                     number(state.signal, w.value), versus(w.value, found.now_value)])
    print("  best windows:", file=out)
    table(rows, out, indent="    ")
    first = local(now).replace(minute=0, second=0, microsecond=0).timestamp()
    hours = [["hour", "value", "source", ""]] + [hour_row(state, first + 3600 * k, now, k == 0)
                                              for k in range(HOURS_AHEAD)]
    print(f"  next {HOURS_AHEAD} h (average per hour):", file=out)
    table(hours, out, indent="    ")


def forecast_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config_file)
        windows = parse_windows(args.window) if args.window else cfg.grid.forecast.window_seconds()
        grid: GridSignals = build_grid(cfg)
    except ConfigError as exc:
        return fail(str(exc), 2)
    except ValueError as exc:
        return fail(f"--window: {exc}", 2)
    if not grid.chains:
        return fail("grid.carbon and grid.price are both null: nothing to forecast", 2)
    # Sources log each failure; here the table says what failed, so only errors of wattson itself show.
    logging.basicConfig(level=logging.ERROR, format="wattson forecast: %(message)s")
    for chain in grid.chains:
        chain.poll_due()
    now = time.time()
    statuses = [s for chain in grid.chains for s in chain.state.statuses]
    if not any(s.up for s in statuses):
        reasons = "; ".join(s.last_error for s in statuses if s.last_error)
        return fail(f"no source answered ({reasons or 'no data'})", 1)
    out = sys.stdout
    try:
        for i, chain in enumerate(grid.chains):
            if i:
                print(file=out)
            print_signal(chain, forecast_signal(chain.state, now, windows), windows, now, out)
        out.flush()
    except BrokenPipeError:  # piped into head: the reader has what it wanted; don't fail flushing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
