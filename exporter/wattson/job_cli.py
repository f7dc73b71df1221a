"""`wattson job JOBID`: one Slurm job's NVIDIA GPU energy, cost and CO2e on this host, from the local wattson.

Made for a Slurm epilog (docs/slurm.md): Slurm does not record NVIDIA GPU energy per job, wattson meters it.
It asks `GET /api/v1/workloads?kind=slurm_job&workload=JOBID` (and the job's SLUID, under which a job is
charged until wattson learns its id) and prints, or writes to a file, the job's energy in kWh and J, cost and
CO2e per GPU and in total, as text or JSON.

An epilog runs right after the job's processes end, possibly before wattson's next sampling round has
charged their last moments: by default this waits (--wait, up to 5 s) for a round that completed after it
started. wattson keeps a finished job's series for workloads.retention_seconds (default 900 s), so a later
call still finds them.

Exit codes, each but 0 with one line on stderr: 0 the job was found; 3 the job is not known (yet); 2 a usage
or configuration error (bad arguments, credentials, CA, workloads disabled on the server, unwritable
output); 1 wattson is unreachable or answers with something else than expected.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit

from .workloads.jobs import JOB_ID, PATH, SLUID, JobReport, job_report, render_text

PROG = "wattson job"
DEFAULT_URL = "http://127.0.0.1:9874"
OK, UNREACHABLE, USAGE, NOT_FOUND = 0, 1, 2, 3


class Failure(Exception):
    """Ends the command with an exit code and one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage plus message
        raise Failure(USAGE, f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Print one Slurm job's NVIDIA GPU energy, cost and CO2e on this host, as "
                "metered by the local wattson (for a Slurm epilog). Exit 0 found, 3 job not known (yet), 2 usage "
                "or configuration error, 1 wattson unreachable.")
    p.add_argument("job", metavar="JOBID", help="The job id (SLURM_JOB_ID: an array task's own id) or its SLUID.")
    p.add_argument("--url", default=DEFAULT_URL, help=f"wattson's base URL (default {DEFAULT_URL}).")
    p.add_argument("--sluid", metavar="SLUID", help="The job's SLUID, also looked for (default: $SLURM_JOB_SLUID "
                   "when $SLURM_JOB_ID is JOBID, as in an epilog).")
    p.add_argument("--output", metavar="FILE", help="Write the report to FILE (replaced atomically, its directory "
                   "created) instead of stdout.")
    p.add_argument("--format", choices=["text", "json"], default="text", help="Report format (default text).")
    p.add_argument("--username", help="Basic auth user, when wattson's web config asks for one.")
    p.add_argument("--password-file", metavar="FILE", help="File holding the basic auth password.")
    p.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to trust for an https URL.")
    p.add_argument("--cert-file", metavar="FILE", help="Client certificate, when wattson requires one.")
    p.add_argument("--key-file", metavar="FILE", help="Key of the client certificate.")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="Per request (default 5).")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="Wait up to this long for a sampling round completed after this command started, so the "
                        "job's last moments are counted (default 5; 0: take what is there).")
    return p


def _job_ids(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The job as asked for, and the workload ids to look for (the job id and its SLUID)."""
    job = args.job.strip()
    if SLUID.match(job):
        job = "s" + job[1:].upper()
    elif not JOB_ID.match(job):
        hint = "; use the job's own id (SLURM_JOB_ID), not array syntax" if "_" in job else ""
        raise Failure(USAGE, f"JOBID {job[:40]!r} is neither a job id nor a SLUID{hint}")
    sluid = args.sluid
    if sluid is None and os.environ.get("SLURM_JOB_ID") == job:
        sluid = os.environ.get("SLURM_JOB_SLUID") or None
    ids = [job]
    if sluid:
        if not SLUID.match(sluid.strip()):
            raise Failure(USAGE, f"--sluid {sluid[:40]!r} is not a SLUID ('s' and 13 characters)")
        sluid = "s" + sluid.strip()[1:].upper()
        if sluid != job:
            ids.append(sluid)
    return job, ids


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(USAGE, f"{what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if urlsplit(args.url).scheme != "https":
        if args.ca_file or args.cert_file:
            raise Failure(USAGE, "--ca-file and --cert-file need an https --url")
        return None
    for flag, path in (("--ca-file", args.ca_file), ("--cert-file", args.cert_file), ("--key-file", args.key_file)):
        if path and not os.path.isfile(path):
            raise Failure(USAGE, f"{flag} {path}: no such file")
    try:
        ctx = ssl.create_default_context(cafile=args.ca_file)
        if args.cert_file:
            ctx.load_cert_chain(args.cert_file, args.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise Failure(USAGE, f"cannot load the TLS files: {exc}") from None
    return ctx


class Client:
    """GET of /api/v1/workloads with basic auth and TLS as configured; each failure as a Failure."""

    def __init__(self, args: argparse.Namespace, ids: list[str]) -> None:
        parts = urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Failure(USAGE, f"--url {args.url[:80]!r}: expected http://host:port or https://host:port")
        if args.password_file and not args.username:
            raise Failure(USAGE, "--password-file needs --username")
        if args.key_file and not args.cert_file:
            raise Failure(USAGE, "--key-file needs --cert-file")
        if args.timeout <= 0 or args.wait < 0:
            raise Failure(USAGE, "--timeout must be positive and --wait not negative")
        self.base = args.url.rstrip("/")
        self.url = self.base + PATH + "?" + urlencode([("kind", "slurm_job")] + [("workload", i) for i in ids])
        self.timeout = args.timeout
        self.context = _ssl_context(args)
        self.headers = {"Accept": "application/json", "User-Agent": "wattson-job"}
        if args.username:
            if ":" in args.username:
                raise Failure(USAGE, "--username cannot contain ':'")
            password = _read_secret(args.password_file, "--password-file") if args.password_file else ""
            token = base64.b64encode(f"{args.username}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def get(self) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                body = b""
            return exc.code, body
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise Failure(USAGE, f"TLS certificate of {self.base} not trusted ({reason.verify_message}); "
                              "give its CA with --ca-file") from None
            if isinstance(reason, ssl.SSLError):
                raise Failure(USAGE, f"TLS with {self.base} failed: {reason.reason or reason}") from None
            raise Failure(UNREACHABLE, f"cannot reach wattson at {self.base}: "
                          f"{getattr(reason, 'strerror', None) or reason}") from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            raise Failure(UNREACHABLE, f"cannot reach wattson at {self.base}: {exc or type(exc).__name__}") \
                from None


def _server_error(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return str(doc["error"])[:300] if isinstance(doc, dict) and "error" in doc else None


def fetch(client: Client, wait: float, started: float) -> dict[str, Any]:
    """The workloads answer, from a sampling round completed at or after `started` when one comes within
    `wait` seconds (else the latest, with a warning)."""
    deadline = time.monotonic() + wait
    while True:
        status, body = client.get()
        more_time = time.monotonic() < deadline
        if status == 503 and more_time:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        if status != 200:
            message = _server_error(body)
            if status == 401:
                raise Failure(USAGE, f"wattson at {client.base} wants basic auth: "
                              + ("the username or password was refused" if "Authorization" in client.headers
                                 else "give --username and --password-file"))
            if status in (400, 404):
                raise Failure(USAGE, f"wattson at {client.base}: " + (
                    message or f"HTTP {status}: {PATH} not served (an older wattson, or not wattson?)"))
            raise Failure(UNREACHABLE, f"wattson at {client.base} answered HTTP {status}"
                          + (f": {message}" if message else ""))
        try:
            doc = json.loads(body)
        except ValueError:
            raise Failure(UNREACHABLE, f"wattson at {client.base}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise Failure(UNREACHABLE, f"wattson at {client.base}: unexpected answer")
        sampled = doc.get("sampled_at")
        fresh = isinstance(sampled, int | float) and sampled >= started
        if wait <= 0 or fresh:
            return doc
        if not more_time:
            print(f"{PROG}: warning: no sampling round completed within --wait {wait:g} s of the start; "
                  "the job's last moments may not be counted yet", file=sys.stderr)
            return doc
        interval = doc.get("sampler_interval_seconds")
        step = interval / 4 if isinstance(interval, int | float) and interval > 0 else 0.2
        time.sleep(min(step, 0.5, max(0.0, deadline - time.monotonic())))


def write_output(text: str, output: str | None) -> None:
    if output in (None, "-"):
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    assert output is not None
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise Failure(USAGE, f"cannot write {output}: {exc.strerror or exc}") from None


def render(report: JobReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2, allow_nan=False) + "\n"
    return render_text(report)


def job_main(argv: list[str]) -> int:
    started = time.time()
    try:
        args = build_parser().parse_args(argv)
        job, ids = _job_ids(args)
        client = Client(args, ids)
        doc = fetch(client, args.wait, started)
        try:
            report = job_report(doc, job, ids, client.base)
        except ValueError as exc:
            raise Failure(UNREACHABLE, f"wattson at {client.base}: malformed answer: {exc}") from None
        if report is None:
            retention = doc.get("retention_seconds")
            kept = f"{retention:g} s" if isinstance(retention, int | float) else "workloads.retention_seconds"
            raise Failure(NOT_FOUND, f"job {job} not known to wattson at {client.base} (host "
                          f"{doc.get('host') or '?'}): it used no GPU here, has not been sampled yet, or ended more "
                          f"than {kept} ago")
        write_output(render(report, args.format), args.output)
    except Failure as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return OK


__all__ = ["job_main", "build_parser"]
