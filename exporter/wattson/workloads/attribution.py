"""Splitting one GPU's energy step between the processes that ran on it, exactly.

Two guarantees the chargeback depends on:

* Weights: by SM utilization where NVML gives it, else by memory used, else equal shares; under
  MIG (no per-process SM figures, and instances are separate slices) by GPU-instance memory share.
* Exactness: the shares of a float amount add up to exactly that amount, in any summation order.
  The amount is an integer number of units of its last binary digit; those integer units are
  apportioned by largest remainder, so every share and every partial sum is representable.

`ExactSum` accumulates floats without rounding, so per-workload totals never drift away from the
sum of the steps they were given, however long the exporter runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from ..gpu.base import GpuProcess

# Attribution methods, exported as the `method` label of wattson_workload_attribution_info.
METHOD_SM = "sm_utilization"
METHOD_MEMORY = "memory"
METHOD_EQUAL = "equal"
METHOD_MIG = "mig_memory"
METHOD_IDLE = "idle"  # NVML listed no compute process
METHOD_UNATTRIBUTED = "unattributed"  # no process list at all (not supported / not collected)
METHODS = (METHOD_SM, METHOD_MEMORY, METHOD_EQUAL, METHOD_MIG, METHOD_IDLE, METHOD_UNATTRIBUTED)

_EXP_MIN = -1074  # the exponent of the smallest subnormal double: every finite double is n * 2**-1074


def process_weights(processes: Sequence[GpuProcess]) -> tuple[str, list[Fraction]]:
    """The attribution method and one non-negative weight per process (their sum is > 0).

    Processes with weight 0 (no SM activity under the SM method) get nothing of the step.
    """
    if not processes:
        raise ValueError("process_weights: no processes (the caller attributes the step to idle)")
    if any(p.gpu_instance_id is not None for p in processes):
        return METHOD_MIG, _mig_weights(processes)
    sms = [p.sm_utilization for p in processes]
    if all(s is not None and s >= 0 for s in sms):
        weights = [Fraction(s) for s in sms]  # type: ignore[arg-type]
        if sum(weights) > 0:
            return METHOD_SM, weights
    by_memory = _memory_weights(processes)
    if by_memory is not None:
        return METHOD_MEMORY, by_memory
    return METHOD_EQUAL, [Fraction(1)] * len(processes)


def _memory_weights(processes: Sequence[GpuProcess]) -> list[Fraction] | None:
    """By memory used; processes without a figure (ended ones, seen only in utilization samples)
    weigh 0. None when no process has a positive figure."""
    weights = [Fraction(p.used_memory_bytes) if p.used_memory_bytes is not None and p.used_memory_bytes > 0
               else Fraction(0) for p in processes]
    return weights if sum(weights) > 0 else None


def _mig_weights(processes: Sequence[GpuProcess]) -> list[Fraction]:
    """Under MIG: each GPU instance gets the share of memory its processes use (equal shares between
    instances where memory is unknown), split inside the instance by memory, else equally."""
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(processes):
        groups.setdefault(p.gpu_instance_id, []).append(i)
    memory = [Fraction(p.used_memory_bytes) if p.used_memory_bytes is not None and p.used_memory_bytes > 0
              else Fraction(0) for p in processes]
    group_memory = {gi: sum((memory[i] for i in idx), Fraction(0)) for gi, idx in groups.items()}
    by_memory = all(m > 0 for m in group_memory.values())
    weights = [Fraction(0)] * len(processes)
    for gi, idx in groups.items():
        group_weight = group_memory[gi] if by_memory else Fraction(1)
        inside = [memory[i] for i in idx]
        total = sum(inside, Fraction(0))
        if total == 0:
            inside, total = [Fraction(1)] * len(idx), Fraction(len(idx))
        for i, m in zip(idx, inside, strict=True):
            weights[i] = group_weight * m / total
    return weights


def integer_weights(weights: Sequence[Fraction | int]) -> list[int]:
    """The same proportions as integers (scaled by the common denominator), for fast splitting."""
    if all(type(w) is int for w in weights):
        return list(weights)  # type: ignore[arg-type]
    fractions = [Fraction(w) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    return [f.numerator * (scale // f.denominator) for f in fractions]


def split_exact(total: float, weights: Sequence[Fraction | int]) -> list[float]:
    """Split `total` in proportion to `weights` so the parts add up to exactly `total`.

    Every part carries the sign of `total` (zero parts are +0.0). Weights must be >= 0 with a
    positive sum. Non-finite totals cannot be split exactly and are split proportionally.
    """
    n = len(weights)
    if n == 0:
        raise ValueError("split_exact: no weights")
    ints = integer_weights(weights)
    weight_sum = sum(ints)
    if weight_sum <= 0 or any(w < 0 for w in ints):
        raise ValueError(f"split_exact: weights must be >= 0 with a positive sum, got {list(weights)!r}")
    if total == 0.0:
        return [0.0] * n
    if not math.isfinite(total):
        return [total * (w / weight_sum) for w in ints]
    units, exponent = _units(abs(total))
    # part i is units * w_i / W: its floor, plus one more unit for the largest remainders
    quotients = [divmod(units * w, weight_sum) for w in ints]
    parts = [q for q, _ in quotients]
    left = units - sum(parts)
    # Largest remainder first; ties go to the earlier part so the result is deterministic.
    for i in sorted(range(n), key=lambda k: (-quotients[k][1], k))[:left]:
        parts[i] += 1
    sign = -1.0 if total < 0 else 1.0
    return [sign * math.ldexp(float(p), exponent) if p else 0.0 for p in parts]


def _units(x: float) -> tuple[int, int]:
    """x (finite, > 0) as units * 2**exponent with units < 2**53."""
    num, den = x.as_integer_ratio()
    if den > 1:  # num is odd and at most 53 bits
        return num, -(den.bit_length() - 1)
    shift = (num & -num).bit_length() - 1  # strip trailing zero bits of a large integer value
    return num >> shift, shift


class ExactSum:
    """An exact running sum of floats (fixed point in units of 2**-1074), read as the nearest float."""

    __slots__ = ("_units", "value")

    def __init__(self) -> None:
        self._units = 0
        self.value = 0.0  # the exact sum rounded to the nearest float, kept current by add()

    def add(self, x: float) -> None:
        if x == 0.0:
            return
        if not math.isfinite(x):
            raise ValueError(f"ExactSum.add: cannot add non-finite value {x!r}")
        num, den = x.as_integer_ratio()
        self._units += num << (-_EXP_MIN - (den.bit_length() - 1))
        self.value = self._units / (1 << -_EXP_MIN)  # int / int true division rounds correctly

    @property
    def exact(self) -> Fraction:
        return Fraction(self._units, 1 << -_EXP_MIN)
