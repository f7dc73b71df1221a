"""Benchmark 5: exposition size (plain and gzip) and series count, in total and per GPU.

Rendered in-process by wattson's own Exposition (the bytes a scrape receives) from a sampler over the
simulated backend with the grid and budgets configured, for several GPU counts; per-GPU figures are
the slope between the smallest and the largest count, so the fixed part (grid, build info) drops out.
"""

from __future__ import annotations

import gzip
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from wattson.exposition import Exposition
from wattson.gpu.simulated import SimulatedBackend
from wattson.sampler import Sampler

from .common import samples
from .sampler_cost import BUDGETS, grid


def render(gpus: int) -> tuple[bytes, bytes, float]:
    """(plain text, gzip as served, render seconds) for `gpus` simulated GPUs after two rounds."""
    sampler = Sampler(SimulatedBackend(gpus, "H100-SXM", ["training", "inference", "idle"], 42),
                      interval_seconds=1.0, grid=grid(), budgets=BUDGETS)
    sampler.start_backend()
    try:
        sampler.sample_round()
        time.sleep(0.05)
        snap = sampler.sample_round()
    finally:
        sampler.stop()
    t0 = time.perf_counter()
    rendered = Exposition().render(snap)
    return rendered.text, rendered.gzipped, time.perf_counter() - t0


def series(text: bytes) -> list[str]:
    """The name of each series (sample) in the exposition, in order."""
    return [s.name for s in samples(text.decode())]


def run(gpu_counts: tuple[int, ...] = (1, 8, 64), progress: Callable[[str], None] = print) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    per_family: dict[str, float] = {}
    for n in gpu_counts:
        text, gz, seconds = render(n)
        s = series(text)
        rows.append({"gpus": n, "series": len(s), "plain_bytes": len(text), "gzip_bytes": len(gz),
                     "gzip_level6_bytes": len(gzip.compress(text, compresslevel=6)),
                     "render_ms": seconds * 1000})
        progress(f"  {n} GPUs: {len(s)} series, {len(text)} B plain, {len(gz)} B gzip")
    lo, hi = rows[0], rows[-1]
    span = hi["gpus"] - lo["gpus"]
    keys = ("series", "plain_bytes", "gzip_bytes", "gzip_level6_bytes")
    per_gpu = {k: (hi[k] - lo[k]) / span for k in keys}
    # Which families the per-GPU series are, from the largest count.
    text, _gz, _s = render(int(hi["gpus"]))
    counts = Counter(series(text))
    text_lo, _gz, _s = render(int(lo["gpus"]))
    counts_lo = Counter(series(text_lo))
    for fam in sorted(counts):
        delta = (counts[fam] - counts_lo.get(fam, 0)) / span
        if delta:
            per_family[fam] = delta
    fixed = {fam: n for fam, n in counts_lo.items() if fam not in per_family}
    return {"rows": rows, "per_gpu": per_gpu, "per_gpu_series_by_family": per_family,
            "fixed_series_by_family": fixed, "fixed_series": hi["series"] - per_gpu["series"] * hi["gpus"]}
