"""Command line entry point: flags in the Prometheus style, wiring, signals, exit codes.

Exit 2 for anything the user must fix before wattson can run (bad config, no NVML without
--simulate), with one line on stderr that says what and where.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING

from . import __version__, logfmt
from .budgets import Budgets
from .budgets import from_config as budgets_from_config
from .config import Config, ConfigError, load_config, parse_listen_address
from .forecast_cli import forecast_main
from .gpu.base import BackendUnavailable, GpuBackend
from .grid.forecast import forecast_response
from .grid.hub import grid_response
from .grid.registry import build_grid
from .job_cli import job_main
from .logfmt import kv
from .periods import period_offsets
from .sampler import Sampler
from .state import PeriodicSaver, StateStore
from .web import ApiHandler, WattsonHTTPServer
from .webconfig import WebConfigError, WebSecurity, load_web_config
from .workloads.jobs import workloads_response

if TYPE_CHECKING:
    from .workloads.tracker import WorkloadTracker

log = logging.getLogger("wattson")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattson", description="Electricity meter for GPU fleets: NVML power and "
                                "energy, priced and carbon-weighted, as Prometheus metrics.")
    p.add_argument("--config.file", dest="config_file", metavar="PATH",
                   help="YAML configuration file (default: built-in defaults).")
    p.add_argument("--web.listen-address", dest="listen_address", metavar="HOST:PORT",
                   help="Address to serve /metrics on (default :9874).")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                   help="exporter-toolkit web config file for TLS and basic auth.")
    p.add_argument("--log.level", dest="log_level", choices=["debug", "info", "warn", "error"],
                   help="Log level (default info).")
    p.add_argument("--storage.path", dest="storage_path", metavar="DIR", default="data/",
                   help="Directory of the state file that carries every total across restarts "
                        "(default data/; /var/lib/wattson in the container and the packages).")
    p.add_argument("--simulate", action="store_true",
                   help="Use simulated GPUs instead of NVML (for demos and tests; always labelled simulated).")
    p.add_argument("--simulate.gpus", dest="simulate_gpus", type=int, metavar="N",
                   help="Number of simulated GPUs (implies --simulate).")
    p.add_argument("--version", action="version", version=f"wattson {__version__}")
    return p


def apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """Flags override the file; the result is validated again like the file was."""
    data = cfg.model_dump(mode="python", exclude_unset=False)
    if args.listen_address:
        data["web"]["listen_address"] = args.listen_address
    if args.web_config_file:
        data["web"]["config_file"] = args.web_config_file
    if args.log_level:
        data["log_level"] = args.log_level
    if args.simulate or args.simulate_gpus is not None:
        data["gpu"]["backend"] = "simulated"
    if args.simulate_gpus is not None:
        data["gpu"]["simulated"]["count"] = args.simulate_gpus
    from pydantic import ValidationError

    from .config import format_validation_error

    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "command line")) from None


def build_backend(cfg: Config) -> GpuBackend:
    """The configured GPU backend; it lists each GPU's processes only when workloads are accounted."""
    if cfg.gpu.backend == "simulated":
        from .gpu.simulated import SimulatedBackend

        s = cfg.gpu.simulated
        return SimulatedBackend(s.count, s.model, list(s.profiles), s.seed, s.energy_counter, jobs=s.jobs)
    if cfg.gpu.backend == "none":
        from .gpu.none import NoGpuBackend

        return NoGpuBackend()
    from .gpu.nvml import NvmlBackend

    return NvmlBackend(collect_processes=cfg.workloads.enabled, boot_id_file=cfg.gpu.nvml.boot_id_file)


def build_budgets(cfg: Config) -> Budgets:
    """The host's own budgets (the flat keys, scope instance) and the scoped ones (budgets.scopes)."""
    return budgets_from_config(cfg.budgets)


def load_security(path: str | None) -> WebSecurity | None:
    if path is None:
        return None
    try:
        return load_web_config(path)
    except WebConfigError as exc:
        raise ConfigError(str(exc)) from None


class App:
    """Everything that runs: sampler, grid chains, state saver, HTTP server; and SIGHUP reload of what can
    change live."""

    def __init__(self, cfg: Config, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.grid = build_grid(cfg)
        security = load_security(cfg.web.config_file)
        self.backend = build_backend(cfg)
        self.sampler = Sampler(self.backend, interval_seconds=cfg.sampler.interval_seconds,
                               gpu_timeout_seconds=cfg.sampler.gpu_timeout_seconds,
                               max_power_watts=cfg.sampler.max_power_watts, grid=self.grid,
                               budgets=build_budgets(cfg),
                               init_retry=(cfg.gpu.nvml.init_retry_initial_seconds,
                                           cfg.gpu.nvml.init_retry_max_seconds),
                               period_offsets=period_offsets(cfg.budgets.period_utc_offset))
        self.store = StateStore(args.storage_path)
        self.sampler.storage = self.store.status
        self.saver = PeriodicSaver(self.store, self.sampler.state_document)
        host, port = parse_listen_address(cfg.web.listen_address)
        try:
            self.server = WattsonHTTPServer((host or "0.0.0.0", port), lambda: self.sampler.snapshot, security,
                                            healthy=self.healthy, api=self.api_endpoints())
        except OSError as exc:
            raise ConfigError(f"web.listen_address: cannot listen on {cfg.web.listen_address}: {exc.strerror}") \
                from None
        self.stopped = threading.Event()
        self._reload_requested = threading.Event()
        self.tracker: WorkloadTracker | None = None

    def start(self) -> None:
        self._preflight_grid()  # ConfigError -> exit 2 in main()
        self.sampler.start_backend()  # BackendUnavailable -> exit 2 in main()
        if self.cfg.workloads.enabled and self.backend.name != "none":  # no GPUs, no processes on them
            from .workloads.tracker import attach

            self.tracker = attach(self.sampler, self.backend, self.cfg.workloads)
        saved = self.store.load({g.identity.uuid for g in self.sampler.gpus})
        if saved is not None:
            for problem in self.grid.restore_state(saved.grid):
                log.warning("saved grid data skipped", extra=kv(err=problem))
            self.sampler.restore(saved)
        self.grid.start()
        self.sampler.start()
        self.saver.start()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="http",
                         daemon=True).start()
        threading.Thread(target=self._reloads, name="reload", daemon=True).start()
        log.info("wattson started", extra=kv(version=__version__, listen=self.bound_address(),
                                             config=self.args.config_file or "(built-in defaults)",
                                             backend=self.backend.name, gpus=len(self.sampler.gpus),
                                             grid=self.grid.describe(), storage=str(self.store.path),
                                             tls=self.tls_enabled()))
        self._say_what_is_not_priced(self.cfg)

    def _preflight_grid(self) -> None:
        """Sources that can check their settings against the other end (a grid hub) ask it once, all at once,
        within their timeout: a hub that does not serve the signal or zone asked for is a config error; one
        not answering now is a warning, and the chain falls back until it answers."""
        from concurrent.futures import ThreadPoolExecutor

        from .grid.base import GridSource, SourceError
        from .grid.http import redact

        checks: list[tuple[str, GridSource, Callable[[], None]]] = [
            (f"grid.{chain.signal}.sources[{i}] ({source.name})", source, check)
            for chain in self.grid.chains for i, source in enumerate(chain.sources)
            if (check := getattr(source, "preflight", None)) is not None]

        def attempt(check: Callable[[], None]) -> SourceError | None:
            try:
                check()
            except SourceError as exc:
                return exc
            except Exception as exc:  # a bug in a check must not stop the start: the chain will say more
                return SourceError("malformed", f"unexpected {type(exc).__name__}: {exc}")
            return None

        if not checks:
            return
        with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="preflight") as pool:
            outcomes = list(pool.map(attempt, [check for _key, _source, check in checks]))
        for (key, source, _check), exc in zip(checks, outcomes, strict=True):
            if exc is None:
                continue
            message = redact(str(exc), source.secrets())
            if exc.reason == "wrong_zone":
                raise ConfigError(f"{key}: {message}")
            log.warning("grid source not answering as it should at start; its chain falls back until it does",
                        extra=kv(source=key, reason=exc.reason, err=message))

    def _say_what_is_not_priced(self, cfg: Config) -> None:
        for signal_name in ("carbon", "price"):
            if getattr(cfg.grid, signal_name) is None:
                log.info(f"grid.{signal_name} is null: the {signal_name} signal is disabled, "
                         "nothing is priced or counted as unpriced for it")
        if self.args.config_file is None:
            log.warning("no --config.file: pricing with the built-in placeholder tariff (0.30 EUR/kWh) and the "
                        "bundled annual carbon intensity of zone DE; configure your own tariff and zone")

    def api_endpoints(self) -> dict[str, ApiHandler]:
        """The JSON endpoints, behind the same TLS and basic auth as /metrics. They read the grid the sampler
        prices with now (a reload swaps it), never the network."""

        def grid(query: Mapping[str, list[str]], if_none_match: str | None) -> tuple[int, dict[str, str], bytes]:
            return grid_response(self.sampler.grid, time.time(), query, if_none_match)

        def forecast(query: Mapping[str, list[str]], _etag: str | None) -> tuple[int, dict[str, str], bytes]:
            status, body = forecast_response(self.sampler.grid, time.time(), query)
            return status, {}, json.dumps(body).encode()

        return {"/api/v1/grid": grid, "/api/v1/forecast": forecast,
                "/api/v1/workloads": lambda query, _etag: workloads_response(self.sampler, query)}

    def bound_address(self) -> str:
        """host:port actually listened on (the kernel's port when :0 was asked for)."""
        host, port = str(self.server.server_address[0]), int(self.server.server_address[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def tls_enabled(self) -> bool:
        return self.server.security.tls is not None

    def healthy(self) -> bool:
        """/healthz: a sampling round completed within 3 intervals plus the GPU timeout."""
        limit = 3 * self.cfg.sampler.interval_seconds + self.cfg.sampler.gpu_timeout_seconds
        return time.monotonic() - self.sampler.last_round_monotonic <= limit

    def request_reload(self) -> None:
        """SIGHUP: reloads run one at a time on one thread; a storm of signals coalesces into one more."""
        self._reload_requested.set()

    def _reloads(self) -> None:
        while not self.stopped.is_set():
            self._reload_requested.wait()
            self._reload_requested.clear()
            if not self.stopped.is_set():
                self.reload()

    def reload(self) -> None:
        """Re-read the config. Invalid -> keep running the old one. Grid, PUE, budgets and log level change
        live, keeping every source whose settings did not change as it is (its cache, counters and schedule);
        the GPU backend, workloads and listen address need a restart."""
        path = self.args.config_file
        try:
            new = apply_flags(load_config(path), self.args)
            new_grid = build_grid(new, previous=self.grid)
        except ConfigError as exc:
            log.error("config reload rejected; keeping the running config", extra=kv(err=str(exc)))
            return
        for key in ("gpu", "web", "workloads"):
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning("config section changed but needs a restart to apply", extra=kv(section=key))
        if new.budgets.period_utc_offset != self.cfg.budgets.period_utc_offset:
            log.warning("config key changed but needs a restart to apply", extra=kv(key="budgets.period_utc_offset"))
        old_grid = self.grid
        old_grid.stop()
        self.grid = new_grid
        new_grid.start()
        self.sampler.replace_grid(new_grid, build_budgets(new))
        logging.getLogger().setLevel(logfmt.LEVELS[new.log_level])
        self.cfg = new
        log.info("config reloaded", extra=kv(file=path or "(defaults)", grid=new_grid.describe()))

    def stop(self) -> None:
        """Clean exit within about a second even with a hung GPU, hanging APIs or stalled clients:
        every part is told to stop first, then waited for against one short deadline; the state is saved
        last, when nothing changes any more."""
        deadline = time.monotonic() + 1.0
        self.sampler.request_stop()
        self.grid.stop()
        if self.tracker is not None and self.tracker.kubelet is not None:
            self.tracker.kubelet.stop(timeout=0.0)  # told to stop; its thread is a daemon
        self._reload_requested.set()
        self.server.shutdown()  # returns within serve_forever's 0.1 s poll: the accept loop never blocks
        self.server.server_close()
        self.sampler.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.saver.stop()
        if self.sampler.reads_in_flight():
            return  # a thread is inside the driver: closing NVML under it could crash; the OS cleans up
        try:
            self.backend.close()
        except Exception:  # shutting down: nothing useful left to do with it
            pass


def fail(message: str) -> int:
    print(f"wattson: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "forecast":
        return forecast_main(argv[1:])
    if argv and argv[0] == "job":
        return job_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = apply_flags(load_config(args.config_file), args)
    except ConfigError as exc:
        return fail(str(exc))
    logfmt.setup(cfg.log_level)
    try:
        app = App(cfg, args)
        app.start()
    except ConfigError as exc:
        return fail(str(exc))
    except BackendUnavailable as exc:
        return fail(str(exc))

    def on_term(signum: int, frame: FrameType | None) -> None:
        app.stopped.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        app.request_reload()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    while not app.stopped.wait(3600):
        pass
    log.info("shutting down")
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
