"""Command line entry point: flags in the Prometheus style, wiring, signals, exit codes.

Exit 2 for anything the user must fix before wattson can run (bad config, no NVML without
--simulate), with one line on stderr that says what and where.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from types import FrameType

from . import __version__, logfmt
from .config import Config, ConfigError, load_config, parse_listen_address
from .gpu.base import BackendUnavailable, GpuBackend
from .grid.registry import build_grid
from .logfmt import kv
from .sampler import Sampler
from .snapshot import Budgets
from .webconfig import WebConfigError, WebSecurity, load_web_config

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
    from .gpu.nvml import NvmlBackend

    return NvmlBackend(collect_processes=cfg.workloads.enabled)


def build_budgets(cfg: Config) -> Budgets:
    b = cfg.budgets
    return Budgets(
        currency=b.currency,
        cost=tuple((p, v) for p, v in (("day", b.cost_per_day), ("month", b.cost_per_month)) if v is not None),
        co2e_grams=tuple((p, v) for p, v in (("day", b.co2e_grams_per_day), ("month", b.co2e_grams_per_month))
                         if v is not None),
        intensity_threshold=b.carbon_intensity_threshold_grams_per_kwh,
    )


def load_security(path: str | None) -> WebSecurity | None:
    if path is None:
        return None
    try:
        return load_web_config(path)
    except WebConfigError as exc:
        raise ConfigError(str(exc)) from None


class App:
    """Everything that runs: sampler, grid chains, HTTP server; and SIGHUP reload of what can change live."""

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
                                           cfg.gpu.nvml.init_retry_max_seconds))
        from .web import WattsonHTTPServer

        host, port = parse_listen_address(cfg.web.listen_address)
        try:
            self.server = WattsonHTTPServer((host or "0.0.0.0", port), lambda: self.sampler.snapshot, security)
        except OSError as exc:
            raise ConfigError(f"web.listen_address: cannot listen on {cfg.web.listen_address}: {exc.strerror}") \
                from None
        self.stopped = threading.Event()

    def start(self) -> None:
        self.sampler.start_backend()  # BackendUnavailable -> exit 2 in main()
        if self.workloads_enabled():
            self._start_workloads()
        self.grid.start()
        self.sampler.start()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="http",
                         daemon=True).start()
        log.info("wattson started", extra=kv(version=__version__, listen=self.cfg.web.listen_address,
                                             backend=self.backend.name, gpus=len(self.sampler.gpus),
                                             tls=self.tls_enabled()))

    def tls_enabled(self) -> bool:
        return getattr(self.server.security, "ssl_context", None) is not None

    def workloads_enabled(self) -> bool:
        return self.cfg.workloads.enabled

    def _start_workloads(self) -> None:
        from .workloads.tracker import attach

        attach(self.sampler, self.backend, self.cfg.workloads)

    def reload(self) -> None:
        """SIGHUP: re-read the config. Invalid -> keep running the old one. Grid, PUE, budgets and
        log level change live; the GPU backend and listen address need a restart."""
        path = self.args.config_file
        try:
            new = apply_flags(load_config(path), self.args)
            new_grid = build_grid(new)
        except ConfigError as exc:
            log.error("config reload rejected; keeping the running config", extra=kv(err=str(exc)))
            return
        for key in ("gpu", "web"):
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning("config section changed but needs a restart to apply", extra=kv(section=key))
        self.grid = new_grid
        new_grid.start()
        old_grid = self.sampler.replace_grid(new_grid, build_budgets(new))
        logging.getLogger().setLevel(logfmt.LEVELS[new.log_level])
        old_grid.stop()
        self.cfg = new
        log.info("config reloaded", extra=kv(file=path or "(defaults)"))

    def stop(self) -> None:
        """Clean exit within about a second even with a hung GPU, hanging APIs or stalled clients:
        every part is told to stop first, then waited for against one short deadline."""
        deadline = time.monotonic() + 1.0
        self.sampler.request_stop()
        self.grid.stop()
        self.server.shutdown()  # returns within serve_forever's 0.1 s poll: the accept loop never blocks
        self.server.server_close()
        self.sampler.stop(timeout=max(0.0, deadline - time.monotonic()))
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
        threading.Thread(target=app.reload, name="reload", daemon=True).start()

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
