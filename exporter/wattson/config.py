"""The configuration file: one YAML document validated by pydantic.

Unknown and duplicate keys are errors. Every failure becomes a ConfigError whose one-line message
names the file, the line, the key path and what was expected.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from . import yamlfile
from .budgets import CONFIG_SCOPES, SCOPE_LABEL, SCOPE_VALUE_LABELS
from .grid.forecast import DEFAULT_WINDOWS, parse_windows
from .grid.registry import CARBON_SOURCES, PRICE_SOURCES
from .model import StrictModel, field_error
from .periods import parse_offset

DEFAULT_PORT = 9874
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"


class ConfigError(Exception):
    """A bad configuration: the message is one line and says where and what."""


def _union(table: dict[str, tuple[type, Any]]) -> Any:
    models = tuple(model for model, _factory in table.values())
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007


CarbonSourceConfig = _union(CARBON_SOURCES)
PriceSourceConfig = _union(PRICE_SOURCES)


class WebConfig(StrictModel):
    listen_address: str = Field(default=DEFAULT_LISTEN_ADDRESS, description="host:port to serve HTTP on.")
    config_file: str | None = Field(default=None, description="exporter-toolkit web config (TLS, basic auth).")

    @field_validator("listen_address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        parse_listen_address(v)
        return v


class SamplerConfig(StrictModel):
    interval_seconds: float = Field(default=1.0, ge=0.1, le=60)
    gpu_timeout_seconds: float = Field(
        default=2.0, gt=0, le=60, description="A GPU read slower than this marks the GPU down (hung).")
    max_power_watts: float = Field(
        default=3000.0, gt=0, description="An energy step implying more average power than this is a reset.")


SimProfile = Literal["idle", "training", "inference"]
DEFAULT_PROFILES: tuple[SimProfile, ...] = ("training", "inference", "idle")


class SimJobConfig(StrictModel):
    """A simulated workload: one process per listed GPU, with a Linux-like /proc entry of its kind."""

    kind: Literal["slurm_job", "container", "pod", "process"]
    id: str = Field(default="", description="Slurm job id (digits), container id (12-64 hex) or pod UID; "
                    "unused for kind=process.")
    gpus: list[int] = Field(min_length=1, description="GPU indexes the job runs on, one process each.")
    user: str = Field(default="sim", min_length=1, description="Owner's user name.")
    uid: int = Field(default=1000, ge=0)
    load: float = Field(default=1.0, gt=0, description="Relative share of each GPU's SM activity.")
    memory_gib: float | None = Field(default=None, ge=0, description="GPU memory per process; default: "
                                     "the GPU's used memory split by load.")
    start_seconds: float = Field(default=0.0, ge=0, description="Start, seconds after wattson started.")
    end_seconds: float | None = Field(default=None, gt=0, description="End; null runs forever.")
    pid: int | None = Field(default=None, ge=1, le=4_194_304, description="PID of the first process; "
                            "default derived from the job's position. Reuse a PID to simulate PID reuse.")
    pod_name: str | None = None
    namespace: str | None = None
    mig_instance: int | None = Field(default=None, ge=0, description="MIG GPU instance id of its processes.")

    @model_validator(mode="after")
    def _check_id(self) -> SimJobConfig:
        patterns = {"slurm_job": r"\d+", "container": r"[0-9a-f]{12,64}",
                    "pod": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"}
        pattern = patterns.get(self.kind)
        if pattern is not None and not re.fullmatch(pattern, self.id):
            raise ValueError(f"id {self.id!r} is not a valid {self.kind} id (expected {pattern})")
        if self.end_seconds is not None and self.end_seconds <= self.start_seconds:
            raise ValueError("end_seconds must be after start_seconds")
        return self


class SimulatedConfig(StrictModel):
    count: int = Field(default=4, ge=1, le=1024)
    model: str = Field(default="H100-SXM", description="One of the models in wattson.gpu.simulated.MODELS.")
    profiles: list[SimProfile] = Field(
        default_factory=lambda: list(DEFAULT_PROFILES),
        min_length=1, description="Load profile per GPU, repeated cyclically over the GPUs.")
    seed: int = 42
    energy_counter: bool = Field(default=True, description="False simulates a pre-Volta GPU (integrated).")
    jobs: list[SimJobConfig] | None = Field(
        default=None, description="Simulated workloads for per-workload accounting; null reports no process "
        "list (as before), [] reports idle GPUs. A GPU with jobs configured idles while none runs on it.")

    @model_validator(mode="after")
    def _jobs_on_existing_gpus(self) -> SimulatedConfig:
        for i, job in enumerate(self.jobs or ()):
            for gpu in job.gpus:
                if not 0 <= gpu < self.count:
                    raise ValueError(f"jobs[{i}].gpus: GPU {gpu} does not exist (count is {self.count})")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .gpu.simulated import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}, expected one of {', '.join(sorted(MODELS))}")
        return v


class NvmlConfig(StrictModel):
    init_retry_initial_seconds: float = Field(default=1.0, gt=0)
    init_retry_max_seconds: float = Field(default=60.0, gt=0)
    boot_id_file: str = Field(
        default="/proc/sys/kernel/random/boot_id",
        description="The host's boot id: energy counters of another boot are never compared with this one's. "
                    "Point it at the host's /proc where the container's is not the host's.")


class GpuConfig(StrictModel):
    # none: no GPUs at all, for a grid hub that only polls the grid sources and serves them to hosts.
    backend: Literal["nvml", "simulated", "none"] = "nvml"
    simulated: SimulatedConfig = Field(default_factory=SimulatedConfig)
    nvml: NvmlConfig = Field(default_factory=NvmlConfig)


class CarbonSignalConfig(StrictModel):
    zone: str = Field(default="DE", min_length=1)
    max_age_seconds: float = Field(
        default=7200.0, gt=0, description="Data older than this (past its interval) is stale; fall back.")
    sources: list[CarbonSourceConfig] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [{"type": "bundled"}], validate_default=True, min_length=1)


class PriceSignalConfig(StrictModel):
    zone: str = Field(default="DE", min_length=1)
    max_age_seconds: float = Field(default=7200.0, gt=0)
    sources: list[PriceSourceConfig] = Field(  # type: ignore[valid-type]
        default_factory=lambda: [{"type": "static", "price_per_kwh": 0.30, "currency": "EUR"}],
        validate_default=True, min_length=1)


class ForecastConfig(StrictModel):
    windows: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WINDOWS),
        description="Job lengths to find the best (cheapest, cleanest) window for, like 90m or 3h; [] for none.")

    @model_validator(mode="after")
    def _check_windows(self) -> ForecastConfig:
        for i in range(len(self.windows)):
            try:
                parse_windows(self.windows[: i + 1])
            except ValueError as exc:
                raise field_error(("windows", i), str(exc), self.windows[i]) from None
        return self

    def window_seconds(self) -> tuple[float, ...]:
        return parse_windows(self.windows)


class GridConfig(StrictModel):
    pue: float = Field(default=1.0, ge=1.0, le=5.0, description="Facility overhead factor.")
    # None (`null` in the file) disables the signal: nothing exported for it, no energy unpriced for it.
    # Left out of the file, the signal has its default chain.
    carbon: CarbonSignalConfig | None = Field(
        default_factory=CarbonSignalConfig, description="Carbon-intensity signal; null disables it.")
    price: PriceSignalConfig | None = Field(
        default_factory=PriceSignalConfig, description="Price signal; null disables it.")
    forecast: ForecastConfig = Field(default_factory=ForecastConfig,
                                     description="Best windows searched in the serving source's forecast.")


class BudgetAmounts(StrictModel):
    """The budget keys of a scope: spending and CO2e per day and per month, and an intensity threshold."""

    cost_per_day: float | None = Field(default=None, ge=0)
    cost_per_month: float | None = Field(default=None, ge=0)
    co2e_grams_per_day: float | None = Field(default=None, ge=0)
    co2e_grams_per_month: float | None = Field(default=None, ge=0)
    carbon_intensity_threshold_grams_per_kwh: float | None = Field(default=None, ge=0)

    def sets_any(self) -> bool:
        return any(getattr(self, k) is not None for k in BudgetAmounts.model_fields)


class ScopeBudgetConfig(BudgetAmounts):
    """A budget of a fleet-wide scope: `scope` says which, and the one key of its label names its value
    (cluster: eu-west-1, namespace: ml-research, account: physics, user: alice; fleet has none)."""

    scope: str = Field(description="fleet, cluster, namespace, account or user.")
    cluster: str | None = Field(default=None, min_length=1, description="The cluster (scope: cluster).")
    namespace: str | None = Field(default=None, min_length=1, description="Kubernetes namespace (scope: namespace).")
    account: str | None = Field(default=None, min_length=1, description="Slurm account (scope: account).")
    user: str | None = Field(default=None, min_length=1, description="User name or uid (scope: user).")

    @field_validator("scope")
    @classmethod
    def _known_scope(cls, v: str) -> str:
        if v == "instance":
            raise ValueError("the host's own budget is set by the flat keys (budgets.cost_per_day and so on), "
                             "not a scopes entry")
        if v not in CONFIG_SCOPES:
            raise ValueError(f"unknown scope, expected one of {', '.join(CONFIG_SCOPES)}")
        return v

    @field_validator("cluster", "namespace", "account", "user", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: Any) -> Any:
        # `user: 1001` (a uid, as exported with workloads.resolve_user_names: false) means the text "1001".
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_label(self) -> ScopeBudgetConfig:
        needed = SCOPE_LABEL[self.scope]
        for label in SCOPE_VALUE_LABELS:
            value = getattr(self, label)
            if label == needed and value is None:
                raise field_error((label,), f"required by scope {self.scope}: the {label} this budget is for", None)
            if label != needed and value is not None:
                raise field_error((label,), f"not a key of scope {self.scope} " + (
                    f"(its key is {needed})" if needed else "(a fleet budget names no part of the fleet)"), value)
        if not self.sets_any():
            raise field_error(("scope",), "sets no budget: give cost_per_day, cost_per_month, co2e_grams_per_day, "
                                          "co2e_grams_per_month or carbon_intensity_threshold_grams_per_kwh",
                              self.scope)
        return self

    def identity(self) -> tuple[str, str]:
        label = SCOPE_LABEL[self.scope]
        return self.scope, (getattr(self, label) or "") if label else ""


class BudgetsConfig(BudgetAmounts):
    """The flat keys are this host's own budget (scope instance); `scopes` lists budgets of the fleet and its
    parts, exported by whichever wattson carries them (the grid hub's config, for instance)."""

    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    period_utc_offset: str | None = Field(
        default=None, description="A fixed UTC offset (+02:00) whose days and months are totalled too, besides "
        "UTC; needs a restart to change.")
    scopes: list[ScopeBudgetConfig] = Field(default_factory=list, description="Budgets per scope.")

    @field_validator("period_utc_offset")
    @classmethod
    def _check_offset(cls, v: str | None) -> str | None:
        if v is not None:
            parse_offset(v)
        return v

    @model_validator(mode="after")
    def _unique_scopes(self) -> BudgetsConfig:
        seen: dict[tuple[str, str], int] = {}
        for i, s in enumerate(self.scopes):
            first = seen.setdefault(s.identity(), i)
            if first != i:
                raise field_error(("scopes", i, "scope"), f"a second budget for the same scope as scopes[{first}] "
                                                          "(merge the two entries)", s.scope)
        return self


def _default_pod_metadata_files() -> list[str]:
    from .workloads.cgroup import DEFAULT_POD_METADATA_FILES

    return list(DEFAULT_POD_METADATA_FILES)


class WorkloadsConfig(StrictModel):
    enabled: bool = False
    proc_root: str = "/proc"
    retention_seconds: float = Field(default=900.0, ge=0)
    max_series: int = Field(default=500, ge=1)
    bare_processes: Literal["user", "process"] = Field(
        default="user", description="Charge processes outside any container, pod or Slurm job to their "
        "Unix user, or to each process (workload = pid).")
    resolve_user_names: bool = Field(
        default=True, description="Export user names; false exports numeric uids (e.g. when wattson's "
        "container has another /etc/passwd than the host and none is mounted).")
    passwd_file: str | None = Field(
        default=None, description="Resolve uids from this passwd file (e.g. the host's, mounted read-only) "
        "instead of wattson's own user database.")
    pod_metadata_files: list[str] = Field(
        default_factory=_default_pod_metadata_files, description="Container runtime config files holding "
        "pod name and namespace annotations; {id} is the 64-hex container id. Empty disables the lookup.")
    kubelet_pod_resources: Literal["auto", "on", "off"] = Field(
        default="auto", description="Ask the kubelet's PodResources API which pods hold each GPU: on; off; auto "
        "= on where the socket's directory exists (a Kubernetes node with it mounted).")
    kubelet_pod_resources_socket: str = Field(
        default="/var/lib/kubelet/pod-resources/kubelet.sock", min_length=1,
        description="The kubelet's PodResources socket; mount its directory, not the socket, so a kubelet "
        "restart (which recreates it) is survived.")
    kubelet_pod_resources_interval_seconds: float = Field(
        default=5.0, ge=1, le=300, description="How often the kubelet is asked (from a thread of its own).")
    kubelet_pod_resources_timeout_seconds: float = Field(
        default=2.0, gt=0, le=30, description="Deadline of each call to the kubelet.")
    kubelet_pod_resources_max_age_seconds: float = Field(
        default=60.0, gt=0, description="How long the last good answer is used while the kubelet does not "
        "answer; older, pods are known through their processes only.")
    kubelet_gpu_resources: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*"], min_length=1,
        description="Extended resource names (shell patterns) whose devices are GPUs.")

    @model_validator(mode="after")
    def _kubelet_answer_outlives_a_poll(self) -> WorkloadsConfig:
        if self.kubelet_pod_resources_max_age_seconds < self.kubelet_pod_resources_interval_seconds:
            raise field_error(("kubelet_pod_resources_max_age_seconds",), "must be at least "
                              "kubelet_pod_resources_interval_seconds", self.kubelet_pod_resources_max_age_seconds)
        return self


class Config(StrictModel):
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    web: WebConfig = Field(default_factory=WebConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    workloads: WorkloadsConfig = Field(default_factory=WorkloadsConfig)



def parse_listen_address(value: str) -> tuple[str, int]:
    """':9874' / '0.0.0.0:9874' / '[::1]:9874' -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]")
    return host, int(port_text)


def _describe(err: ErrorDetails) -> tuple[tuple[Any, ...], str]:
    """Where (as the user wrote it) and what, for one pydantic error in this config."""
    # pydantic inserts the union tag into the location; it is not a key the user wrote
    loc = tuple(item for item in err["loc"]
                if isinstance(item, int) or (item not in CARBON_SOURCES and item not in PRICE_SOURCES))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see docs/configuration.md)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and isinstance(err["input"], (str, int, float, bool)):
        msg = f"{msg} (got {err['input']!r})"  # scalars only: a whole mapping would not fit one line
    return loc, msg


def format_validation_error(exc: ValidationError, source: str, doc: yamlfile.YamlDocument | None = None) -> str:
    """One line, "<source>:<line>: <key path>: <what>"; the line when `doc` is the file validated."""
    return yamlfile.format_validation_error(exc, source, doc, _describe)


def load_config(path: str | None) -> Config:
    """Load and validate; without a path, the embedded defaults."""
    if path is None:
        return Config()
    try:
        doc = yamlfile.read(path)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    return _validate(doc)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        doc = yamlfile.parse(text, source)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    return _validate(doc)


def _validate(doc: yamlfile.YamlDocument) -> Config:
    data = {} if doc.data is None else doc.data
    if not isinstance(data, dict):
        raise ConfigError(str(doc.error((), f"expected a mapping of keys, got {type(data).__name__}")))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, doc.source, doc)) from None
