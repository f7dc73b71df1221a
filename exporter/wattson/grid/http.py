"""HTTP plumbing shared by every web API source: timeouts, status mapping, Retry-After, redaction, JSON.

Every error raised from here is a SourceError with a bounded reason and a one-line
message naming the source and the API endpoint path, never the query string (which
may hold a token) and never a secret.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from .. import __version__
from .base import MissingSecret, SourceError

USER_AGENT = f"wattson/{__version__} (+https://github.com/wattson-energy/wattson)"
MAX_BODY_BYTES = 16 * 1024 * 1024  # the largest real answer (a week of ENTSO-E quarter-hours) is ~1 MB


def read_secret(source: str, env: str | None, file: str | None, *, required: bool,
                what: str = "API key") -> str | None:
    """Read an API key from an environment variable or a file. Never from the config file itself.

    Raises MissingSecret when the file cannot be read, or when nothing is found and the key is required."""
    if env:
        value = os.environ.get(env, "").strip()
        if value:
            return value
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise MissingSecret(f"{source}: cannot read {what} file {file}: {why}") from None
        if value:
            return value
    if required:
        where = " or ".join(x for x in (f"environment variable {env} (unset or empty)" if env else "",
                                       f"file {file} (empty)" if file else "") if x)
        raise MissingSecret(f"{source}: no {what} found in {where or 'api_key_env/api_key_file (neither set)'}")
    return None


def redact(text: str, secrets: tuple[str, ...] | list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "<redacted>")
    return text


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class HttpClient:
    """A requests.Session bound to one source: base URL, timeout, user agent, error mapping."""

    def __init__(self, source: str, base_url: str, timeout: float, secrets: tuple[str, ...] = ()) -> None:
        self.source = source
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.secrets = secrets
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, data: Any = None,
                auth: tuple[str, str] | None = None, ok_statuses: tuple[int, ...] = (200,)) -> requests.Response:
        url = path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}"
        where = f"{self.source}: {method} {urlsplit(url).path}"
        deadline = time.monotonic() + self.timeout
        try:
            resp = self.session.request(method, url, params=params, headers=headers, data=data, auth=auth,
                                        timeout=self.timeout, stream=True)
            # requests' timeout bounds each socket read, not the whole answer: a server dripping one byte
            # at a time would hold this fetch (and its chain) forever. Read against one deadline instead.
            chunks, size = [], 0
            while chunk := resp.raw.read1(65536, decode_content=True):  # returns what one socket read gives
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    resp.close()
                    raise SourceError("malformed", f"{where}: response larger than {MAX_BODY_BYTES} bytes")
                if time.monotonic() > deadline:
                    resp.close()
                    raise SourceError("timeout", f"{where}: response not complete after {self.timeout:g}s")
            resp._content = b"".join(chunks)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise SourceError("timeout", f"{where}: timed out after {self.timeout:g}s") from None
        except requests.ConnectionError as exc:
            raise SourceError("connection", f"{where}: connection failed ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise SourceError("connection", f"{where}: request failed ({type(exc).__name__})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # reading the body ourselves: urllib3's errors
            raise SourceError("connection", f"{where}: connection failed while reading ({type(exc).__name__})") \
                from None
        if resp.status_code in ok_statuses:
            return resp
        # Redact first, then cut: a key straddling the cut must not leave its first characters behind.
        snippet = redact(resp.text, self.secrets)[:160].replace("\n", " ").strip()
        msg = f"{where}: HTTP {resp.status_code}" + (f": {snippet}" if snippet else "")
        if resp.status_code == 429:
            raise SourceError("rate_limited", msg,
                              retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if resp.status_code in (401, 403):
            raise SourceError("auth", msg)
        if 400 <= resp.status_code < 500:
            raise SourceError("http_4xx", msg)
        raise SourceError("http_5xx", msg)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        resp = self.request("GET", path, **kwargs)
        return decode_json(resp.content, f"{self.source}: GET {urlsplit(path).path}")

    def get_text(self, path: str, **kwargs: Any) -> str:
        resp = self.request("GET", path, **kwargs)
        return resp.text


def decode_json(body: bytes, where: str) -> Any:
    """JSON with every number as Decimal, so prices convert exactly (pence to pounds, per MWh to per kWh);
    NaN and Infinity are not JSON and are refused. `where` names the source and the call."""
    def bad_constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")
    try:
        return json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=bad_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError("malformed", f"{where}: response is not valid JSON ({str(exc)[:80]})") from None
