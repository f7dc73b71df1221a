"""Budgets per scope (fleet, cluster, namespace, account, user, instance): the config and its errors, the
exported budgets; the workloads' period totals per namespace, Slurm account and user; every family through
promtool."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from fractions import Fraction

import pytest

from tests.conftest import require_tool
from tests.fakes import Clock
from tests.test_workloads_tracker import scrape
from wattson.budgets import Budgets, ScopeBudget, from_config
from wattson.config import ConfigError, SimJobConfig, WorkloadsConfig, parse_config
from wattson.exposition import Exposition
from wattson.gpu.simulated import SimulatedBackend
from wattson.grid.signal import GridSignals, SignalChain
from wattson.grid.static import StaticSource
from wattson.sampler import Sampler
from wattson.workloads.cgroup import ProcReader, UserNames, WorkloadResolver
from wattson.workloads.tracker import WorkloadTracker, attach

MIDNIGHT = int(datetime(2026, 12, 25, tzinfo=timezone.utc).timestamp())
UTC = "+00:00"
POD = "abcdef01-2345-6789-abcd-ef0123456789"

SCOPED = """\
budgets:
  currency: EUR
  period_utc_offset: "+02:00"
  cost_per_day: 50
  co2e_grams_per_month: 1.0e6
  scopes:
    - {scope: fleet, cost_per_month: 50000, co2e_grams_per_month: 2.0e7, carbon_intensity_threshold_grams_per_kwh: 350}
    - {scope: cluster, cluster: eu-west-1, cost_per_day: 2000}
    - {scope: namespace, namespace: ml-research, cost_per_month: 8000}
    - {scope: account, account: physics, cost_per_month: 3000}
    - {scope: user, user: alice, co2e_grams_per_day: 50000}
    - {scope: user, user: 1001, cost_per_day: 5}
"""


# -- config -----------------------------------------------------------------------------------------------

def test_scoped_budgets_config_becomes_the_budget_model():
    b = from_config(parse_config(SCOPED, "wattson.yml").budgets)
    assert (b.currency, b.cost, b.co2e_grams, b.intensity_threshold) == ("EUR", (("day", 50.0),),
                                                                         (("month", 1.0e6),), None)
    assert b.scopes == (
        ScopeBudget("fleet", "", (("month", 50000.0),), (("month", 2.0e7),), 350.0),
        ScopeBudget("cluster", "eu-west-1", (("day", 2000.0),)),
        ScopeBudget("namespace", "ml-research", (("month", 8000.0),)),
        ScopeBudget("account", "physics", (("month", 3000.0),)),
        ScopeBudget("user", "alice", (), (("day", 50000.0),)),
        ScopeBudget("user", "1001", (("day", 5.0),)),  # a uid, written as a number
    )
    assert parse_config(SCOPED, "wattson.yml").budgets.period_utc_offset == "+02:00"


@pytest.mark.parametrize("text, expected", [
    ("budgets:\n  scopes:\n    - {scope: cluster, cost_per_day: 1}\n",
     "wattson.yml:3: budgets.scopes[0].cluster: required by scope cluster"),
    ("budgets:\n  scopes:\n    - scope: namespace\n      namespace: a\n      user: bob\n      cost_per_day: 1\n",
     "wattson.yml:5: budgets.scopes[0].user: not a key of scope namespace (its key is namespace)"),
    ("budgets:\n  scopes:\n    - scope: fleet\n      cluster: x\n      cost_per_day: 1\n",
     "wattson.yml:4: budgets.scopes[0].cluster: not a key of scope fleet"),
    ("budgets:\n  scopes:\n    - {scope: instance, cost_per_day: 1}\n",
     "wattson.yml:3: budgets.scopes[0].scope: Value error, the host's own budget is set by the flat keys"),
    ("budgets:\n  scopes:\n    - {scope: team, cost_per_day: 1}\n",
     "wattson.yml:3: budgets.scopes[0].scope: Value error, unknown scope, expected one of fleet, cluster"),
    ("budgets:\n  scopes:\n    - {scope: account, account: physics}\n",
     "wattson.yml:3: budgets.scopes[0].scope: sets no budget"),
    ("budgets:\n  scopes:\n    - {scope: user, user: alice, cost_per_day: 1}\n"
     "    - {scope: user, user: alice, co2e_grams_per_day: 2}\n",
     "wattson.yml:4: budgets.scopes[1].scope: a second budget for the same scope as scopes[0]"),
    ("budgets:\n  scopes:\n    - {scope: fleet, cost_per_month: -5}\n",
     "wattson.yml:3: budgets.scopes[0].cost_per_month: Input should be greater than or equal to 0"),
    ("budgets:\n  scopes:\n    - {scope: fleet, cost_per_month: .nan}\n",
     "wattson.yml:3: budgets.scopes[0].cost_per_month: Input should be a finite number"),
    ("budgets:\n  scopes:\n    - {scope: user, user: '', cost_per_day: 1}\n",
     "wattson.yml:3: budgets.scopes[0].user: String should have at least 1 character"),
    ("budgets:\n  scopes:\n    - {scope: fleet, cost_per_day: 1, costs_per_week: 3}\n",
     "wattson.yml:3: budgets.scopes[0].costs_per_week: unknown key"),
    ("budgets:\n  scopes: {scope: fleet}\n", "wattson.yml:2: budgets.scopes: Input should be a valid list"),
    ("budgets:\n  period_utc_offset: 2\n", "wattson.yml:2: budgets.period_utc_offset: Input should be a valid string"),
    ("budgets:\n  period_utc_offset: '+2:00'\n",
     "wattson.yml:2: budgets.period_utc_offset: Value error, expected a fixed UTC offset written ±HH:MM"),
    ("budgets:\n  period_utc_offset: '-13:00'\n",
     "wattson.yml:2: budgets.period_utc_offset: Value error, outside -12:00 to +14:00"),
])
def test_budget_config_mistakes_are_one_line_naming_file_line_and_key(text, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "wattson.yml")
    message = str(exc.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_the_commented_example_of_scoped_budgets_is_valid():
    """docs/wattson.example.yml shows scoped budgets commented out (every host of the compose stack reads it);
    uncommented, they must be a valid config."""
    from tests.daemon import ROOT

    lines = (ROOT / "docs" / "wattson.example.yml").read_text().splitlines()
    uncommented = [line.replace("# ", "", 1) if line.lstrip().startswith(("# scopes:", "#   - {scope:")) else line
                   for line in lines]
    b = from_config(parse_config("\n".join(uncommented), "example").budgets)
    assert [s.scope for s in b.scopes] == ["fleet", "cluster", "namespace", "account", "user"]


# -- exported budgets -------------------------------------------------------------------------------------

def samples(m, name) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(lb.items())): v for lb, v in m.get(name, [])}


def test_every_scope_is_exported_with_its_own_label_only():
    clock = Clock(MIDNIGHT + 3600)
    budgets = from_config(parse_config(SCOPED, "wattson.yml").budgets)
    sampler = Sampler(SimulatedBackend(1, "H100-SXM", ["idle"], 1, True, clock=clock.time, monotonic=clock.monotonic),
                      budgets=budgets, clock=clock.time)
    sampler.start_backend()
    sampler.sample_round()
    m = scrape(sampler)
    assert samples(m, "wattson_budget_cost") == {
        (("currency", "EUR"), ("period", "day"), ("scope", "instance")): 50.0,
        (("currency", "EUR"), ("period", "month"), ("scope", "fleet")): 50000.0,
        (("cluster", "eu-west-1"), ("currency", "EUR"), ("period", "day"), ("scope", "cluster")): 2000.0,
        (("currency", "EUR"), ("namespace", "ml-research"), ("period", "month"), ("scope", "namespace")): 8000.0,
        (("account", "physics"), ("currency", "EUR"), ("period", "month"), ("scope", "account")): 3000.0,
        (("currency", "EUR"), ("period", "day"), ("scope", "user"), ("user", "1001")): 5.0,
    }
    assert samples(m, "wattson_budget_co2e_grams") == {
        (("period", "month"), ("scope", "instance")): 1.0e6,
        (("period", "month"), ("scope", "fleet")): 2.0e7,
        (("period", "day"), ("scope", "user"), ("user", "alice")): 50000.0,
    }
    assert samples(m, "wattson_carbon_intensity_threshold_grams_per_kwh") == {(("scope", "fleet"),): 350.0}


def test_flat_keys_alone_are_the_instance_scope_and_nothing_configured_exports_no_sample():
    b = from_config(parse_config("budgets: {cost_per_month: 100, carbon_intensity_threshold_grams_per_kwh: 300}",
                                 "w.yml").budgets)
    assert b.all_scopes() == (ScopeBudget("instance", "", (("month", 100.0),), (), 300.0),)
    assert from_config(parse_config("", "w.yml").budgets).all_scopes() == ()
    # the positional form the benchmarks build still works: the host's own budgets
    assert Budgets("EUR", (("day", 1.0),), (), None).all_scopes()[0].scope == "instance"


# -- workloads' totals per scope --------------------------------------------------------------------------

class WithEnviron:
    """The simulated /proc, plus the environment of Slurm jobs' processes (SLURM_JOB_ACCOUNT): readable for
    `readable` PIDs, permission denied for the others (another user's process, as for an unprivileged wattson)."""

    def __init__(self, inner: ProcReader, accounts: dict[int, str]) -> None:
        self.inner = inner
        self.accounts = accounts
        self.users = getattr(inner, "users", {})
        self.pods = getattr(inner, "pods", {})

    def read_text(self, pid: int, name: str) -> str:
        if name == "environ":
            self.inner.read_text(pid, "stat")  # FileNotFoundError when the process is not running
            if pid not in self.accounts:
                raise PermissionError(13, "Permission denied", f"/proc/{pid}/environ")
            return f"HOME=/home/x\0SLURM_JOB_ID=1\0SLURM_JOB_ACCOUNT={self.accounts[pid]}\0PATH=/bin\0"
        return self.inner.read_text(pid, name)


JOBS = [
    {"kind": "slurm_job", "id": "4242", "gpus": [0], "user": "alice", "uid": 1001, "pid": 1000},
    {"kind": "slurm_job", "id": "4243", "gpus": [1], "user": "bob", "uid": 1002, "pid": 2000},
    {"kind": "slurm_job", "id": "4244", "gpus": [2], "user": "carol", "uid": 1003, "pid": 3000},  # no environ
    {"kind": "pod", "id": POD, "gpus": [3], "pod_name": "trainer-0", "namespace": "ml-research", "user": "dave",
     "uid": 1004, "pid": 4000},
]


class Pieces:
    """Between the sampler and the tracker: keeps each GPU's pieces (one job per GPU: all of it is the job's)."""

    def __init__(self, tracker: WorkloadTracker) -> None:
        self.tracker = tracker
        self.pieces: list[tuple[int, float, float, tuple[tuple[str, float], ...], float]] = []

    def on_step(self, gpu, uuid, step, charge, reading) -> None:
        self.tracker.on_step(gpu, uuid, step, charge, reading)
        self.pieces.append((gpu, step.start, step.joules, charge.cost, charge.co2e_grams))

    def snapshot(self, now):
        return self.tracker.snapshot(now)

    def export_state(self):
        return self.tracker.export_state()

    def restore_state(self, data):
        return self.tracker.restore_state(data)

    def exact(self, gpus: set[int], since: float) -> dict[str, Fraction]:
        out = {"energy_joules": Fraction(0), "co2e_grams": Fraction(0), "EUR": Fraction(0)}
        for gpu, start, joules, cost, grams in self.pieces:
            if gpu in gpus and start >= since:
                out["energy_joules"] += Fraction(joules)
                out["co2e_grams"] += Fraction(grams)
                out["EUR"] += sum((Fraction(a) for c, a in cost if c == "EUR"), Fraction(0))
        return out


def make_fleet(clock: Clock, offsets=(0,)):
    backend = SimulatedBackend(4, "H100-SXM", ["training"], 42, True, clock=clock.time, monotonic=clock.monotonic,
                               jobs=[SimJobConfig(**j) for j in JOBS])
    price = SignalChain("price", "DE", 7200, [StaticSource("price", "DE", 0.30, "EUR")], clock=clock.time)
    carbon = SignalChain("carbon", "DE", 7200, [StaticSource("carbon", "DE", 380.0, None)], clock=clock.time)
    price.poll_due()
    carbon.poll_due()
    sampler = Sampler(backend, grid=GridSignals(pue=1.2, carbon=carbon, price=price), clock=clock.time,
                      period_offsets=offsets)
    sampler.start_backend()
    tracker = attach(sampler, backend, WorkloadsConfig(enabled=True))
    resolver = tracker.resolver
    resolver.proc = WithEnviron(resolver.proc, {1000: "physics", 2000: "physics"})
    pieces = Pieces(tracker)
    sampler.workloads = pieces
    sampler.sample_round()
    return sampler, tracker, pieces


def scope_values(m, name, period="day", offset=UTC) -> dict[tuple[str, str], float]:
    out = {}
    for lb, v in m.get(name, []):
        if lb["period"] == period and lb["offset"] == offset:
            out[(lb["scope"], lb[lb["scope"]])] = v
            assert set(lb) == {"scope", lb["scope"], "period", "offset"} | ({"currency"} if "currency" in lb else set())
    return out


def test_scope_totals_follow_namespace_account_and_user_exactly_and_start_afresh_at_midnight():
    clock = Clock(MIDNIGHT - 5.5)
    sampler, tracker, pieces = make_fleet(clock)
    for _ in range(10):  # ... MIDNIGHT - 0.5, + 0.5 (across), ..., + 4.5
        clock.advance(1.0)
        sampler.sample_round()
    m = scrape(sampler)
    day = scope_values(m, "wattson_scope_period_energy_joules")
    assert set(day) == {("account", "physics"), ("user", "alice"), ("user", "bob"), ("user", "carol"),
                        ("user", "dave"), ("namespace", "ml-research")}  # carol's job: no readable account
    gpus_of = {("account", "physics"): {0, 1}, ("user", "alice"): {0}, ("user", "bob"): {1}, ("user", "carol"): {2},
               ("user", "dave"): {3}, ("namespace", "ml-research"): {3}}
    month_start = int(datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp())
    for key, gpus in gpus_of.items():
        for period, since in (("day", MIDNIGHT), ("month", month_start)):
            mine = tracker.exact_scope_totals(*key)[(period, UTC)]
            theirs = pieces.exact(gpus, since)
            assert mine["energy_joules"] == theirs["energy_joules"] > 0, (key, period)
            assert mine["co2e_grams"] == theirs["co2e_grams"], (key, period)
            assert mine["cost"]["EUR"] == theirs["EUR"], (key, period)
    month = scope_values(m, "wattson_scope_period_energy_joules", "month")
    assert all(month[k] > day[k] for k in day)  # the month also has the 5 s before midnight
    cost = scope_values(m, "wattson_scope_period_cost")
    assert cost[("account", "physics")] == pytest.approx(
        day[("account", "physics")] * 1.2 / 3.6e6 * 0.30, rel=1e-9)  # energy x PUE x price
    # the GPU's own totals and the scopes agree: alice ran alone on GPU 0
    host_day = next(t for t in sampler.snapshot.periods if t.period == "day")
    assert host_day.energy_joules == pytest.approx(sum(day[("user", u)] for u in ("alice", "bob", "carol", "dave")),
                                                   rel=1e-12)


def test_scope_totals_continue_after_a_restart_in_the_same_period_only():
    clock = Clock(MIDNIGHT + 100)
    sampler, tracker, _ = make_fleet(clock, offsets=(0, 7200))
    for _ in range(5):
        clock.advance(1.0)
        sampler.sample_round()
    saved = tracker.export_state()
    before = scope_values(scrape(sampler), "wattson_scope_period_energy_joules", "day", "+02:00")

    same = WorkloadTracker(WorkloadResolver(WithEnviron(_NoProc(), {}), UserNames(resolve=False)), 900, 500,
                           clock=clock.time, period_offsets=(0, 7200))
    assert same.restore_state(saved) == 0
    view = {(s.scope, s.value, s.totals.period, s.totals.offset): s.totals.energy_joules
            for s in same.snapshot(clock.now).scope_periods}
    assert {k[:2]: v for k, v in view.items() if k[2:] == ("day", "+02:00")} == before

    clock.advance(86_400)  # a day later: the days are over, December goes on
    later = WorkloadTracker(WorkloadResolver(WithEnviron(_NoProc(), {}), UserNames(resolve=False)), 900, 500,
                            clock=clock.time, period_offsets=(0, 7200))
    assert later.restore_state(saved) == 0
    periods = {(s.totals.period, s.totals.offset) for s in later.snapshot(clock.now).scope_periods}
    assert periods == {("month", UTC), ("month", "+02:00")}
    # malformed saved entries are counted, not fatal
    assert later.restore_state({"scope_periods": [{"scope": "user"}, "x"]}) == 2


class _NoProc:
    def read_text(self, pid: int, name: str) -> str:
        raise FileNotFoundError(2, "No such file or directory")


def test_account_is_read_from_the_job_environment_where_readable():
    clock = Clock(MIDNIGHT + 100)
    sampler, tracker, _ = make_fleet(clock)
    resolver = tracker.resolver
    assert resolver.resolve(1000).account == "physics"
    assert resolver.resolve(3000).account == ""  # environ not readable: no account, the job is still charged
    assert resolver.resolve(4000).account == ""  # a pod has none


# -- promtool ---------------------------------------------------------------------------------------------

def test_every_family_passes_promtool_check_metrics():
    clock = Clock(MIDNIGHT - 1.5)
    sampler, _, _ = make_fleet(clock, offsets=(0, 7200))
    sampler.replace_grid(sampler.grid, from_config(parse_config(SCOPED, "wattson.yml").budgets))
    for _ in range(3):
        clock.advance(1.0)
        sampler.sample_round()
    text = Exposition().render(sampler.snapshot).text.decode()
    for family in ("wattson_period_energy_joules", "wattson_period_cost", "wattson_period_co2e_grams",
                   "wattson_period_start_timestamp_seconds", "wattson_scope_period_energy_joules",
                   "wattson_scope_period_cost", "wattson_scope_period_co2e_grams", "wattson_budget_cost",
                   "wattson_budget_co2e_grams", "wattson_carbon_intensity_threshold_grams_per_kwh"):
        assert f"# TYPE {family} gauge\n" in text and f"\n{family}{{" in text, family
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", \
        check.stdout + check.stderr


def test_without_workloads_there_are_no_scope_families():
    """Without per-workload accounting there are no scope families at all."""
    clock = Clock(MIDNIGHT + 5)
    sampler = Sampler(SimulatedBackend(1, "H100-SXM", ["idle"], 1, True, clock=clock.time, monotonic=clock.monotonic),
                      clock=clock.time)
    sampler.start_backend()
    sampler.sample_round()
    text = Exposition().render(sampler.snapshot).text.decode()
    assert "wattson_scope_period" not in text and "wattson_period_energy_joules{" in text
