"""Shares of a step: the method (SM, memory, equal, MIG) and exact splitting of float amounts."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from wattson.gpu.base import GpuProcess
from wattson.workloads.attribution import ExactSum, process_weights, split_exact

AWKWARD_TOTALS = [0.1, 1 / 3, 2 / 3, 1234.5678, 1e-300, 5e-324, 2.2250738585072014e-308, 1e300,
                  1.7976931348623157e308, 9007199254740993.0, 0.30000000000000004, 700.0 * 0.37, 123456789.123]


def exact_sum(parts):
    return sum((Fraction(p) for p in parts), Fraction(0))


@pytest.mark.parametrize("total", AWKWARD_TOTALS + [-t for t in AWKWARD_TOTALS])
def test_parts_add_up_exactly_in_any_order(total):
    rng = random.Random(hash(total))
    for n in (1, 2, 3, 7, 40):
        weights = [Fraction(rng.random()) for _ in range(n)]
        parts = split_exact(total, weights)
        assert exact_sum(parts) == Fraction(total)  # the exact real sum, not just a rounded one
        assert math.fsum(parts) == total
        assert sum(parts) == total and sum(reversed(parts)) == total
        shuffled = parts[:]
        rng.shuffle(shuffled)
        acc = 0.0
        for p in shuffled:
            acc += p
        assert acc == total
        assert all((p >= 0) if total > 0 else (p <= 0) for p in parts)


def test_parts_are_proportional_to_within_one_unit_of_the_last_place():
    total = 1000.0 / 3
    weights = [Fraction(1), Fraction(2), Fraction(3), Fraction(0)]
    parts = split_exact(total, weights)
    ulp = math.ulp(total)
    for p, w in zip(parts, weights, strict=True):
        assert abs(Fraction(p) - Fraction(total) * w / 6) <= ulp
    assert parts[3] == 0.0 and math.copysign(1, split_exact(-1.0, [1, 0])[1]) == 1  # zero parts are +0.0


def test_every_two_way_split_of_small_unit_counts_is_exact():
    """All ways to split a handful of last-place units between weights, exhaustively."""
    base = 1.0
    for units in range(0, 9):
        total = base + units * math.ulp(base)
        for a, b, c in itertools.product(range(4), repeat=3):
            if a + b + c == 0:
                continue
            parts = split_exact(total, [a, b, c])
            assert exact_sum(parts) == Fraction(total)


def test_zero_and_non_finite_totals():
    assert split_exact(0.0, [1, 2]) == [0.0, 0.0]
    assert split_exact(math.inf, [1, 1]) == [math.inf, math.inf]


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1]])
def test_bad_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="split_exact"):
        split_exact(1.0, weights)


def test_ties_are_broken_deterministically():
    assert split_exact(3 * 2.0**-1074, [1, 1]) == split_exact(3 * 2.0**-1074, [1, 1])
    a, b = split_exact(3 * 2.0**-1074, [1, 1])
    assert (a, b) == (2 * 2.0**-1074, 2.0**-1074)


def procs(*specs):
    return [GpuProcess(i + 1, *s) for i, s in enumerate(specs)]


def test_method_sm_utilization_where_every_process_has_it():
    method, w = process_weights(procs((10, 0.6), (90, 0.2), (5, 0.0)))
    assert method == "sm_utilization"
    assert w == [Fraction(0.6), Fraction(0.2), Fraction(0)]


def test_method_memory_when_sm_is_missing_or_all_zero():
    assert process_weights(procs((30, None), (10, 0.5)))[0] == "memory"
    method, w = process_weights(procs((30, 0.0), (10, 0.0)))
    assert method == "memory" and w == [30, 10]
    method, w = process_weights(procs((30, None), (None, None)))  # an ended process has no memory figure
    assert method == "memory" and w == [30, 0]


def test_method_equal_when_nothing_is_known():
    method, w = process_weights(procs((None, None), (0, None), (None, None)))
    assert method == "equal" and w == [1, 1, 1]


def test_mig_attributes_by_gpu_instance_memory_share():
    # instance 1: one process of 10 GiB; instance 2: two processes of 20 and 10 GiB
    method, w = process_weights(procs((10, None, 1), (20, None, 2), (10, None, 2)))
    assert method == "mig_memory"
    assert [x / sum(w) for x in w] == [Fraction(1, 4), Fraction(1, 2), Fraction(1, 4)]


def test_mig_without_memory_figures_gives_instances_equal_shares_then_processes_equal_shares():
    method, w = process_weights(procs((None, None, 1), (None, None, 2), (None, None, 2)))
    assert method == "mig_memory"
    assert [x / sum(w) for x in w] == [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)]


def test_no_processes_is_a_caller_error():
    with pytest.raises(ValueError):
        process_weights([])


def test_exact_sum_does_not_drift():
    s = ExactSum()
    naive = 0.0
    for _ in range(10_000):
        s.add(0.1)
        naive += 0.1
    assert s.exact == 10_000 * Fraction(0.1)
    assert s.value == float(10_000 * Fraction(0.1))
    assert naive != s.value  # plain float accumulation has drifted
    s.add(-0.1)
    s.add(5e-324)
    assert s.exact == 9_999 * Fraction(0.1) + Fraction(5e-324)
    with pytest.raises(ValueError):
        s.add(math.nan)
