"""Energy accounting over profiles with known integrals."""

from __future__ import annotations

from wattson.energy import EnergyMeter
from wattson.gpu.base import GpuReading


def reading(t: float, watts: float, mj: int | None) -> GpuReading:
    return GpuReading(timestamp=1_700_000_000 + t, monotonic=t, power_watts=watts, energy_millijoules=mj,
                      power_limit_watts=700.0, memory_used_bytes=0, memory_total_bytes=1,
                      utilization_ratio=0.5)


def square(t: float) -> float:
    """2 s at 620 W, 0.5 s at 180 W."""
    return 620.0 if (t % 2.5) < 2.0 else 180.0


def square_integral(t: float) -> float:
    full, rest = divmod(t, 2.5)
    return full * (2.0 * 620 + 0.5 * 180) + (620 * rest if rest < 2.0 else 620 * 2.0 + 180 * (rest - 2.0))


def test_counter_path_is_exact():
    meter = EnergyMeter(max_power_watts=3000)
    start_mj = 123_456_789_000
    for k in range(0, 601):  # 60 s at 10 Hz
        t = k / 10
        meter.update(reading(t, square(t), start_mj + round(square_integral(t) * 1000)))
    assert meter.method == "counter"
    assert meter.total_joules == square_integral(60.0)


def test_integrated_path_within_one_percent_at_10hz():
    meter = EnergyMeter(max_power_watts=3000)
    for k in range(0, 601):
        t = k / 10 + 0.05  # samples not aligned with the edges of the wave
        meter.update(reading(t, square(t), None))
    assert meter.method == "integrated"
    truth = square_integral(60.05) - square_integral(0.05)
    assert abs(meter.total_joules - truth) / truth < 0.01


def test_counter_going_down_restarted_from_zero_and_its_new_value_is_counted_when_plausible():
    meter = EnergyMeter(max_power_watts=3000)
    meter.update(reading(0, 300, 1_000_000))
    meter.update(reading(1, 300, 1_300_000))  # 300 J
    step = meter.update(reading(2, 300, 5_000))  # driver reload: the counter restarted and has 5 J since
    assert step is not None and step.reset and step.joules == 5.0 and not step.unmetered
    meter.update(reading(3, 300, 305_000))  # counting goes on from the new counter
    assert meter.total_joules == 605.0


def test_counter_going_down_to_more_than_the_gpu_could_draw_since_is_unmetered():
    meter = EnergyMeter(max_power_watts=3000)
    meter.update(reading(0, 300, 9_000_000))
    step = meter.update(reading(1, 300, 8_000_000))  # 8 kJ in 1 s at a 700 W limit: not a restart from zero
    assert step is not None and step.reset and step.unmetered and step.joules == 0
    assert meter.total_joules == 0.0


def test_absurd_jump_is_a_reset():
    meter = EnergyMeter(max_power_watts=1000)
    meter.update(reading(0, 300, 0))
    step = meter.update(reading(1, 300, 50_000_000))  # 50 kJ in 1 s = 50 kW: impossible
    assert step is not None and step.reset
    assert meter.total_joules == 0.0
    meter.update(reading(2, 300, 50_300_000))
    assert meter.total_joules == 300.0


def test_counter_is_exact_across_a_gap():
    """A GPU that was unreadable for a while: the counter difference still covers the gap exactly."""
    meter = EnergyMeter(max_power_watts=1000)
    meter.update(reading(0, 300, 0))
    meter.gap()
    meter.update(reading(30, 300, 9_000_000))
    assert meter.total_joules == 9000.0


def test_integrated_path_does_not_guess_across_a_gap():
    meter = EnergyMeter(max_power_watts=1000)
    meter.update(reading(0, 300, None))
    meter.update(reading(1, 300, None))
    meter.gap()
    meter.update(reading(30, 300, None))
    meter.update(reading(31, 300, None))
    assert meter.total_joules == 600.0


def test_total_never_decreases():
    meter = EnergyMeter(max_power_watts=1000)
    values = [0, 100_000, 50_000, 60_000, 10**12, 10**12 + 1000, 0, 500]
    last = 0.0
    for i, mj in enumerate(values):
        meter.update(reading(i, 100, mj))
        assert meter.total_joules >= last
        last = meter.total_joules


def test_integrated_gap_is_unmetered_time_not_guessed_energy():
    meter = EnergyMeter(max_power_watts=1000)
    meter.update(reading(0, 300, None))
    meter.update(reading(1, 300, None))
    meter.gap()
    step = meter.update(reading(30, 300, None))
    assert step is not None and step.unmetered and step.joules == 0 and step.end - step.start == 29


def test_resume_counts_the_counter_difference_since_the_saved_reading():
    meter = EnergyMeter(max_power_watts=1000)
    meter.resume(1234.5, "counter", 5_000_000, 1_700_000_000 + 10, counter_runs_on=True)
    step = meter.update(reading(30, 300, 11_000_000))  # 6 kJ in 20 s: 300 W, plausible
    assert step is not None and (step.start, step.end, step.joules) == (1_700_000_010, 1_700_000_030, 6000.0)
    assert meter.total_joules == 1234.5 + 6000.0
    meter.update(reading(31, 300, 11_300_000))
    assert meter.total_joules == 1234.5 + 6300.0


def test_resume_after_a_reboot_or_an_implausible_difference_is_unmetered():
    for runs_on, counter in ((False, 11_000_000), (True, 4_000_000), (True, 500_000_000)):
        meter = EnergyMeter(max_power_watts=1000)
        meter.resume(100.0, "counter", 5_000_000, 1_700_000_000 + 10, counter_runs_on=runs_on)
        step = meter.update(reading(30, 300, counter))
        assert step is not None and step.unmetered and step.joules == 0 and step.end - step.start == 20
        assert meter.total_joules == 100.0
