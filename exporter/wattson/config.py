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
from .grid.forecast import DEFAULT_WINDOWS, parse_windows
from .grid.registry import CARBON_SOURCES, PRICE_SOURCES
from .model import StrictModel, field_error

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


class BudgetsConfig(StrictModel):
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    cost_per_day: float | None = Field(default=None, ge=0)
    cost_per_month: float | None = Field(default=None, ge=0)
    co2e_grams_per_day: float | None = Field(default=None, ge=0)
    co2e_grams_per_month: float | None = Field(default=None, ge=0)
    carbon_intensity_threshold_grams_per_kwh: float | None = Field(default=None, ge=0)


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
