"""TLS and basic auth for the HTTP endpoint, read from an exporter-toolkit web config file.

The file format is Prometheus exporter-toolkit's (`--web.config.file`), so one file can serve
node_exporter and wattson alike. Parsing is strict like the toolkit's yaml.UnmarshalStrict: unknown
and duplicate keys are errors. Every failure is a WebConfigError with one line,
"<file>: <key path>: <what is wrong>", that never contains a password, a hash or key material.

Where Python's ssl module cannot do what a key asks, the key is refused with a clear message rather
than silently weakened; two keys that cannot change wattson's behaviour are validated and ignored
(curve_preferences, http_server_config.http2). docs/security.md lists each case.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import bcrypt
except ImportError:  # only basic auth needs it: a web config with users says so, nothing else breaks
    bcrypt = None  # type: ignore[assignment]
import yaml

log = logging.getLogger("wattson.webconfig")


class WebConfigError(Exception):
    """A bad web config file: one line, "<file>: <key path>: <what is wrong>", with no secrets in it."""


# --- what the file may contain -------------------------------------------------------------------

TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
            "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")
HTTP_KEYS = ("http2", "headers")

# Toolkit keys that wattson knows but cannot honour; refusing them beats silently dropping a control.
UNSUPPORTED = {
    "rate_limit": "is not supported by wattson; remove it (put a reverse proxy in front to rate-limit)",
    "tls_server_config.client_allowed_sans": "is not supported by wattson; remove it, or use a client CA that "
                                             "only signs the clients you allow",
}

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's crypto/tls names (what the toolkit accepts: tls.CipherSuites()) -> OpenSSL names.
TLS12_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# TLS 1.3 suites are accepted and ignored, as Go does: neither Go nor Python's ssl lets them be chosen.
TLS13_CIPHERS = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")

CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert", "RequireClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")

# Headers the toolkit lets a web config set, with the values allowed (None: any value).
ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

# $2a$/$2b$/$2x$/$2y$, two-digit cost, 22 salt chars + 31 hash chars from bcrypt's base64 alphabet.
BCRYPT_HASH = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 31
BCRYPT_MAX_PASSWORD_BYTES = 72  # bcrypt only ever looks at the first 72 bytes
AUTH_CACHE_ENTRIES = 100


# --- the result ----------------------------------------------------------------------------------

class _AuthCache:
    """Successful (user, hash, password) checks, kept as HMACs under a per-process random key.

    bcrypt is slow on purpose (tens of ms at cost 10); a scraper sends the same credentials every
    15 s, so paying bcrypt once is enough. Only successes are cached: a wrong password always pays
    the full bcrypt price. The entries are MACs, not passwords, and the key never leaves memory.
    """

    def __init__(self, max_entries: int = AUTH_CACHE_ENTRIES) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        # One bcrypt at a time, like the toolkit: a flood of bad passwords costs one core, not all of them.
        self.bcrypt_lock = threading.Lock()
        self.dummy_hash: bytes | None = None  # for unknown users, made on first need

    def digest(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user, hashed, password):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return True
            return False

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._entries[digest] = None
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass(frozen=True)
class WebSecurity:
    """What the HTTP server needs: an optional TLS context, basic-auth users and extra headers."""

    ssl_context: ssl.SSLContext | None = None  # None = plain HTTP
    users: dict[str, bytes] = field(default_factory=dict)  # username -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    _cache: _AuthCache = field(default_factory=_AuthCache, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # Never the hashes: a logged repr must not hand anyone material for an offline attack.
        return (f"WebSecurity(tls={self.ssl_context is not None}, users={sorted(self.users)}, "
                f"headers={sorted(self.headers)})")

    def auth_required(self) -> bool:
        return bool(self.users)

    def check_basic_auth(self, authorization_header: str | None) -> bool:
        """True if the header carries a configured user's password (or no users are configured).

        Unknown users are checked against a dummy hash so response time does not reveal which
        usernames exist; successes are cached so bcrypt is paid once per (user, password).
        """
        if not self.users:
            return True
        parsed = _parse_basic(authorization_header)
        if parsed is None:
            return False
        user_raw, password = parsed
        try:
            user: str | None = user_raw.decode("utf-8")
        except UnicodeDecodeError:
            user = None
        hashed = self.users.get(user) if user is not None else None
        known = hashed is not None
        if hashed is None:
            hashed = self._dummy()
        key = self._cache.digest(user_raw, hashed, password)
        if known and key in self._cache:
            return True
        with self._cache.bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], hashed)
            except ValueError:  # a hash bcrypt cannot use; load_web_config checks the format, not every detail
                ok = False
        if ok and known:
            self._cache.add(key)
            return True
        return False

    def _dummy(self) -> bytes:
        """A hash of a random password at the configured users' highest cost, made on first need."""
        with self._cache.bcrypt_lock:
            if self._cache.dummy_hash is None:
                cost = max(_bcrypt_cost(h) for h in self.users.values())
                self._cache.dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
            return self._cache.dummy_hash


def _parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from "Basic base64(user:password)", or None if it is not well formed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


def _bcrypt_cost(hashed: bytes) -> int:
    m = BCRYPT_HASH.match(hashed.decode("ascii", "replace"))
    return int(m.group(1)) if m else 10


# --- loading -------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            duplicate = key in result
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "mapping key is not a scalar",
                                                    key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=deep)  # type: ignore[no-untyped-call]
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _EncryptedKey(Exception):
    """Raised from the password callback: wattson has no way to ask for a key passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey()


class _Loader:
    """Walks one parsed file; holds the file name so every error names it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base_dir = Path(path).parent

    def fail(self, key_path: str, what: str) -> WebConfigError:
        return WebConfigError(f"{self.path}: {key_path}: {what}")

    # generic checks

    def mapping(self, value: Any, key_path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key_path, f"must be a mapping, got {_kind(value)}")
        for k in value:
            full = f"{key_path}.{k}" if key_path != "(top level)" else str(k)
            if full in UNSUPPORTED:
                raise self.fail(full, UNSUPPORTED[full])
            if k not in allowed:
                raise self.fail(full, f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def string(self, value: Any, key_path: str) -> str | None:
        """A string, with "" and null meaning unset, as in the toolkit."""
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.fail(key_path, f"must be a string, got {_kind(value)}")
        return value

    def boolean(self, value: Any, key_path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key_path, f"must be true or false, got {_kind(value)}")
        return value

    def string_list(self, value: Any, key_path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key_path, f"must be a list of strings, got {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{key_path}[{i}]", f"must be a string, got {_kind(item)}")
        return value

    def resolve(self, file_name: str) -> Path:
        """Relative paths are relative to the web config file, as in the toolkit."""
        p = Path(file_name).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def read(self, file_name: str, key_path: str) -> bytes:
        p = self.resolve(file_name)
        try:
            return p.read_bytes()
        except OSError as exc:
            raise self.fail(key_path, f"cannot read {p}: {exc.strerror or type(exc).__name__}") from None

    # sections

    def load(self, doc: Any) -> WebSecurity:
        top = self.mapping(doc, "(top level)", TOP_KEYS)
        users = self.users(top.get("basic_auth_users"))
        headers = self.http(top.get("http_server_config"))
        ctx = self.tls(top.get("tls_server_config"))
        return WebSecurity(ssl_context=ctx, users=users, headers=headers)

    def users(self, value: Any) -> dict[str, bytes]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail("basic_auth_users", f"must be a mapping of username to bcrypt hash, got {_kind(value)}")
        if value and bcrypt is None:
            raise self.fail("basic_auth_users", "needs the Python package bcrypt (pip install bcrypt)")
        users: dict[str, bytes] = {}
        for name, hashed in value.items():
            if not isinstance(name, str) or not name:
                raise self.fail("basic_auth_users", f"username {name!r} must be a non-empty string (quote it)")
            where = f"basic_auth_users.{name}"
            if ":" in name:
                raise self.fail(where, "username must not contain ':' (HTTP basic auth cannot carry it)")
            if not isinstance(hashed, str):
                raise self.fail(where, f"must be a bcrypt hash string, got {_kind(hashed)}")
            m = BCRYPT_HASH.match(hashed.strip())
            if m is None:
                raise self.fail(where, "not a valid bcrypt hash (variant 2a, 2b or 2y, a two-digit cost, 60 "
                                       "characters in all; see docs/security.md)")
            cost = int(m.group(1))
            if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
                raise self.fail(where, f"bcrypt cost {cost} out of range {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST}")
            users[name] = hashed.strip().encode("ascii")
        return users

    def http(self, value: Any) -> dict[str, str]:
        section = self.mapping(value, "http_server_config", HTTP_KEYS)
        # http2: validated, then ignored; wattson's server speaks HTTP/1.1 only.
        self.boolean(section.get("http2"), "http_server_config.http2", True)
        raw = section.get("headers")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail("http_server_config.headers", f"must be a mapping, got {_kind(raw)}")
        headers: dict[str, str] = {}
        for name, val in raw.items():
            where = f"http_server_config.headers.{name}"
            if name not in ALLOWED_HEADERS:
                raise self.fail(where, f"this header can not be configured (allowed: {', '.join(ALLOWED_HEADERS)})")
            text = self.string(val, where)
            if text is None:
                continue  # blank means unset
            if any(c in text for c in "\r\n\0"):
                raise self.fail(where, "value must not contain line breaks or NUL")
            allowed = ALLOWED_HEADERS[name]
            if allowed is not None and text not in allowed:
                raise self.fail(where, f"invalid value {text!r}, expected one of: {', '.join(allowed)}")
            headers[name] = text
        return headers

    def tls(self, value: Any) -> ssl.SSLContext | None:
        s = self.mapping(value, "tls_server_config", TLS_KEYS)
        if not s:
            return None  # absent or empty: plain HTTP, as in the toolkit
        p = "tls_server_config"
        cert_file, cert = self.string(s.get("cert_file"), f"{p}.cert_file"), self.string(s.get("cert"), f"{p}.cert")
        key_file, key = self.string(s.get("key_file"), f"{p}.key_file"), self.string(s.get("key"), f"{p}.key")
        ca_file = self.string(s.get("client_ca_file"), f"{p}.client_ca_file")
        ca_text = self.string(s.get("client_ca"), f"{p}.client_ca")
        for a, b in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
            if s.get(a) and s.get(b):
                raise self.fail(f"{p}.{b}", f"{a} and {b} are mutually exclusive; set one")
        if cert_file is None and cert is None:
            raise self.fail(f"{p}.cert_file", "missing: TLS needs cert_file (or an inline cert)")
        if key_file is None and key is None:
            raise self.fail(f"{p}.key_file", "missing: TLS needs key_file (or an inline key)")

        min_v = self.version(s.get("min_version"), f"{p}.min_version", "TLS12")
        max_v = self.version(s.get("max_version"), f"{p}.max_version", "TLS13")
        if min_v > max_v:
            raise self.fail(f"{p}.min_version", "is higher than max_version")

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS10/TLS11 are the user's explicit choice
            ctx.minimum_version = min_v
            ctx.maximum_version = max_v
        if min_v < ssl.TLSVersion.TLSv1_2:
            log.warning("web config allows TLS older than 1.2; OpenSSL may refuse it anyway",
                        extra={"kv": {"file": self.path}})
        ctx.set_alpn_protocols(["http/1.1"])

        cert_pem = self.read(cert_file, f"{p}.cert_file") if cert_file else (cert or "").encode()
        key_pem = self.read(key_file, f"{p}.key_file") if key_file else (key or "").encode()
        self.load_keypair(ctx, cert_pem, key_pem, f"{p}.cert_file" if cert_file else f"{p}.cert",
                          f"{p}.key_file" if key_file else f"{p}.key")

        self.ciphers(ctx, s.get("cipher_suites"), f"{p}.cipher_suites")
        if self.boolean(s.get("prefer_server_cipher_suites"), f"{p}.prefer_server_cipher_suites", True):
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        curves = self.string_list(s.get("curve_preferences"), f"{p}.curve_preferences")
        for i, curve in enumerate(curves):
            if curve not in CURVES:
                raise self.fail(f"{p}.curve_preferences[{i}]", f"unknown curve {curve!r} (known: {', '.join(CURVES)})")
        # Validated and ignored: Python's ssl can pin one curve but not set a preference list, and
        # narrowing to one would be a change the user did not ask for. OpenSSL's defaults apply.

        self.client_auth(ctx, s, ca_file, ca_text)
        return ctx

    def version(self, value: Any, key_path: str, default: str) -> ssl.TLSVersion:
        name = self.string(value, key_path) or default
        if name not in TLS_VERSIONS:
            raise self.fail(key_path, f"unknown TLS version {name!r} (known: {', '.join(TLS_VERSIONS)})")
        return TLS_VERSIONS[name]

    def load_keypair(self, ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, cert_where: str,
                     key_where: str) -> None:
        cert_text = cert_pem.decode("ascii", "replace")
        if "-----BEGIN CERTIFICATE-----" not in cert_text:
            raise self.fail(cert_where, "no PEM certificate found")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_text)
        except (ssl.SSLError, ValueError):
            raise self.fail(cert_where, "not a valid PEM certificate") from None
        if b"PRIVATE KEY-----" not in key_pem:
            raise self.fail(key_where, "no PEM private key found")
        if b"ENCRYPTED PRIVATE KEY" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
            raise self.fail(key_where, "private key is encrypted; wattson needs an unencrypted key")
        # load_cert_chain only reads files: stage both in a private directory that is gone right after.
        with tempfile.TemporaryDirectory(prefix="wattson-tls-") as tmp:
            cert_tmp, key_tmp = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for name, data in ((cert_tmp, cert_pem), (key_tmp, key_pem)):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            try:
                ctx.load_cert_chain(cert_tmp, key_tmp, password=_no_password)
            except _EncryptedKey:
                raise self.fail(key_where, "private key is encrypted; wattson needs an unencrypted key") from None
            except ssl.SSLError as exc:
                if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                    raise self.fail(key_where, "private key does not match the certificate") from None
                raise self.fail(key_where, "not a valid PEM private key for this certificate") from None

    def ciphers(self, ctx: ssl.SSLContext, value: Any, key_path: str) -> None:
        names = self.string_list(value, key_path)
        if not names:
            return  # OpenSSL/Python defaults
        openssl_names = []
        for i, name in enumerate(names):
            if name in TLS13_CIPHERS:
                continue
            if name not in TLS12_CIPHERS:
                raise self.fail(f"{key_path}[{i}]", f"unknown cipher {name!r} (use Go crypto/tls names, "
                                                    "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
            openssl_names.append(TLS12_CIPHERS[name])
        if not openssl_names:
            return  # TLS 1.3 suites only: nothing Python lets us set
        try:
            ctx.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise self.fail(key_path, "none of these cipher suites is available in this Python's OpenSSL") from None
        enabled = {c["name"] for c in ctx.get_ciphers()}
        for i, name in enumerate(names):
            if name in TLS12_CIPHERS and TLS12_CIPHERS[name] not in enabled:
                raise self.fail(f"{key_path}[{i}]", f"cipher {name!r} is not available in this Python's OpenSSL")

    def client_auth(self, ctx: ssl.SSLContext, s: dict[str, Any], ca_file: str | None, ca_text: str | None) -> None:
        p = "tls_server_config"
        mode = self.string(s.get("client_auth_type"), f"{p}.client_auth_type") or "NoClientCert"
        if mode not in CLIENT_AUTH_TYPES:
            raise self.fail(f"{p}.client_auth_type", f"unknown value {mode!r} (known: {', '.join(CLIENT_AUTH_TYPES)})")
        if mode in ("RequireAnyClientCert", "RequireClientCert"):
            raise self.fail(f"{p}.client_auth_type", f"{mode} (require a certificate but do not verify it) cannot "
                                                     "be done with Python's ssl; use RequireAndVerifyClientCert "
                                                     "with client_ca_file")
        has_ca = ca_file is not None or ca_text is not None
        ca_where = f"{p}.client_ca_file" if ca_file is not None or ca_text is None else f"{p}.client_ca"
        if mode in ("NoClientCert", "RequestClientCert"):
            if has_ca:
                raise self.fail(ca_where, f"client CA is unused with client_auth_type {mode}; set "
                                          "client_auth_type: RequireAndVerifyClientCert to verify clients")
            # RequestClientCert: wattson never reads an unverified client certificate, so asking for
            # one changes nothing; Python cannot ask without verifying. Same as NoClientCert.
            ctx.verify_mode = ssl.CERT_NONE
            return
        if not has_ca:
            raise self.fail(f"{p}.client_ca_file", f"required when client_auth_type is {mode}")
        before = ctx.cert_store_stats()["x509"]
        try:
            if ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.resolve(ca_file)))
            else:
                ctx.load_verify_locations(cadata=ca_text)
        except FileNotFoundError as exc:
            raise self.fail(ca_where, f"cannot read {self.resolve(ca_file or '')}: {exc.strerror}") from None
        except OSError as exc:  # SSLError is an OSError too
            if isinstance(exc, ssl.SSLError):
                raise self.fail(ca_where, "no PEM certificate found") from None
            raise self.fail(ca_where, f"cannot read {self.resolve(ca_file or '')}: "
                                      f"{exc.strerror or type(exc).__name__}") from None
        if ctx.cert_store_stats()["x509"] <= before:
            raise self.fail(ca_where, "no PEM certificate found")
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "RequireAndVerifyClientCert" else ssl.CERT_OPTIONAL


def _kind(value: Any) -> str:
    """A value's YAML type for messages; never the value itself, which may be a secret."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def load_web_config(path: str | None) -> WebSecurity:
    """Read and validate a web config file. None: plain HTTP without auth.

    Raises WebConfigError for anything wrong. The file is read once: restart wattson to pick up
    new certificates or users.
    """
    if path is None:
        return WebSecurity()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: (file): not UTF-8 text") from None
    except OSError as exc:
        raise WebConfigError(f"{path}: (file): cannot read: {exc.strerror or type(exc).__name__}") from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        # Not str(exc): PyYAML quotes the offending source line, which may hold a hash or a key.
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "unknown position"
        raise WebConfigError(f"{path}: (yaml): {where}: {exc.problem or 'invalid YAML'}") from None
    except yaml.YAMLError:
        raise WebConfigError(f"{path}: (yaml): invalid YAML") from None
    return _Loader(path).load(doc)
