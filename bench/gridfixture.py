"""Grid configuration for the benchmarks, and a local stand-in for a price API so a real HTTP source runs.

The stand-in answers Octopus Energy's public unit-rates endpoint
(`GET /v1/products/{product}/electricity-tariffs/{tariff}/standard-unit-rates/?period_from&period_to`)
with half-hourly rates in p/kWh, newest first, in the documented shape
`{"count", "next", "previous", "results": [{"value_exc_vat", "value_inc_vat", "valid_from", "valid_to",
"payment_method"}]}`. It is used only when the daemon has an `octopus` price source registered;
otherwise the benchmarks run with static sources and say so in the report.
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PRODUCT = "AGILE-24-10-01"
TARIFF = "E-1R-AGILE-24-10-01-C"
RATES_PATH = f"/v1/products/{PRODUCT}/electricity-tariffs/{TARIFF}/standard-unit-rates/"
HALF_HOUR = 1800


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def rates_body(period_from: float, period_to: float) -> bytes:
    """Half-hourly rates covering [period_from, period_to), newest first, with a daily price shape."""
    start = math.floor(period_from / HALF_HOUR) * HALF_HOUR
    rows = []
    t = start
    while t < period_to:
        hour = (t % 86400) / 3600
        exc = round(18.0 + 9.0 * math.sin(2 * math.pi * (hour - 11) / 24), 4)
        rows.append({"value_exc_vat": exc, "value_inc_vat": round(exc * 1.05, 4),
                     "valid_from": _iso(t), "valid_to": _iso(t + HALF_HOUR), "payment_method": None})
        t += HALF_HOUR
    rows.reverse()
    return json.dumps({"count": len(rows), "next": None, "previous": None, "results": rows}).encode()


class PriceApiFixture:
    """A loopback HTTP server answering the unit-rates endpoint; counts requests it served."""

    def __init__(self) -> None:
        fixture = self
        self.requests = 0
        self.request_times: list[float] = []  # time.monotonic() of each request

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                fixture.requests += 1
                fixture.request_times.append(time.monotonic())
                if parts.path != RATES_PATH or "period_from" not in query or "period_to" not in query:
                    body, status = b'{"detail": "Not found."}', 404
                else:
                    body = rates_body(_parse(query["period_from"][0]), _parse(query["period_to"][0]))
                    status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="price-fixture", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> PriceApiFixture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def http_price_source_available() -> bool:
    """True when the daemon under test has the octopus source registered (grid work may land later)."""
    from wattson.grid.registry import PRICE_SOURCES

    return "octopus" in PRICE_SOURCES


def daemon_config(interval_seconds: float, price_api_url: str | None) -> str:
    """Grid on: static carbon intensity, price from the HTTP source (with a static fallback) or static,
    and budgets, so the exposition has every family a production config has."""
    if price_api_url is not None:
        price = (f"  price:\n    zone: GB\n    sources:\n"
                 f"      - {{type: octopus, base_url: '{price_api_url}', product_code: {PRODUCT}, "
                 f"tariff_code: {TARIFF}}}\n"
                 f"      - {{type: static, price_per_kwh: 0.25, currency: GBP}}\n")
        currency = "GBP"
    else:
        price = "  price: {zone: DE, sources: [{type: static, price_per_kwh: 0.30, currency: EUR}]}\n"
        currency = "EUR"
    return (f"sampler: {{interval_seconds: {interval_seconds}}}\n"
            "grid:\n  pue: 1.2\n"
            "  carbon: {zone: DE, sources: [{type: static, grams_per_kwh: 380}]}\n"
            f"{price}"
            f"budgets: {{currency: {currency}, cost_per_day: 50, cost_per_month: 1500,"
            " co2e_grams_per_day: 200000, carbon_intensity_threshold_grams_per_kwh: 300}\n")
