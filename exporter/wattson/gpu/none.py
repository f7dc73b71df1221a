"""A backend without GPUs: wattson as a grid hub.

A hub polls the configured price and carbon sources and serves what it knows to the hosts of a fleet
(`GET /api/v1/grid`), so only it calls the rate-limited, metered upstream APIs and holds their keys. It
reads no GPU, so it needs no driver; it exports the grid metrics as any wattson does, and no GPU series.
"""

from __future__ import annotations

from .base import GpuDevice


class NoGpuBackend:
    """`gpu.backend: none`: finds no GPU, ever; never fails to start."""

    name = "none"
    simulated = False
    counter_epoch = ""  # no energy counters to compare across restarts

    def start(self) -> list[GpuDevice]:
        return []

    def restart(self) -> list[GpuDevice]:
        return []

    def close(self) -> None:
        pass
