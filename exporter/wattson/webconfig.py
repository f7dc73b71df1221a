"""TLS and basic auth for the HTTP endpoint, read from an exporter-toolkit web config file.

The file format is Prometheus exporter-toolkit's (`--web.config.file`), so one file can serve
node_exporter and wattson alike. Parsing is strict like the toolkit's yaml.UnmarshalStrict: the
schema is a set of strict pydantic models (unknown keys, wrong types are errors) and the YAML loader
refuses duplicate keys. Every failure is a WebConfigError with one line,
"<file>:<line>: <key path>: <what is wrong>", that never contains a password, a hash or key material.

The certificate, key and client CA files are watched as the toolkit does: a new connection finds
the context rebuilt when they change (checked at most once a second), so certificates rotated in
place need no restart; a broken new set is logged once and the previous context stays in use.

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
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from . import yamlfile
from .logfmt import kv

log = logging.getLogger("wattson.webconfig")


class WebConfigError(Exception):
    """A bad web config file: one line, "<file>:<line>: <key path>: <what is wrong>", with no secrets in it."""


# --- what the file may contain -------------------------------------------------------------------

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

# $2a$/$2b$/$2x$/$2y$, two-digit cost, 22 salt chars + 31 hash chars from bcrypt's base64 alphabet.
BCRYPT_HASH = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 31
BCRYPT_MAX_PASSWORD_BYTES = 72  # bcrypt only ever looks at the first 72 bytes
AUTH_CACHE_ENTRIES = 100
# How often a new connection may look at the certificate files: rotation is rare, connections are not.
TLS_RELOAD_CHECK_SECONDS = 1.0
MAX_PEM_BYTES = yamlfile.MAX_BYTES  # a key_file naming a device or a huge file must not hang the start


# --- the schema ----------------------------------------------------------------------------------
# Validators raise ValueError with the message the user sees; they never quote a secret.

def _blank_is_unset(value: Any) -> Any:
    """"" and null both mean unset, as in the toolkit."""
    return None if isinstance(value, str) and value == "" else value


def _tls_version(name: str) -> str:
    if name not in TLS_VERSIONS:
        raise ValueError(f"unknown TLS version {name!r} (known: {', '.join(TLS_VERSIONS)})")
    return name


def _client_auth_type(mode: str) -> str:
    if mode not in CLIENT_AUTH_TYPES:
        raise ValueError(f"unknown value {mode!r} (known: {', '.join(CLIENT_AUTH_TYPES)})")
    if mode in ("RequireAnyClientCert", "RequireClientCert"):
        raise ValueError(f"{mode} (require a certificate but do not verify it) cannot be done with Python's ssl; "
                         "use RequireAndVerifyClientCert with client_ca_file")
    return mode


def _cipher(name: str) -> str:
    if name not in TLS12_CIPHERS and name not in TLS13_CIPHERS:
        raise ValueError(f"unknown cipher {name!r} (use Go crypto/tls names, "
                         "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
    return name


def _curve(name: str) -> str:
    if name not in CURVES:
        raise ValueError(f"unknown curve {name!r} (known: {', '.join(CURVES)})")
    return name


def _header_text(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("value must not contain line breaks or NUL")
    return value


def _one_of(*allowed: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"invalid value {value!r}, expected one of: {', '.join(allowed)}")
        return value
    return AfterValidator(check)


def _username(name: str) -> str:
    if not name:
        raise ValueError("empty")  # _describe words it like a username of the wrong type
    if ":" in name:
        raise ValueError("username must not contain ':' (HTTP basic auth cannot carry it)")
    return name


def _bcrypt_hash(hashed: str) -> str:
    m = BCRYPT_HASH.match(hashed.strip())
    if m is None:
        raise ValueError("not a valid bcrypt hash (variant 2a, 2b or 2y, a two-digit cost, 60 characters in all; "
                         "see docs/security.md)")
    cost = int(m.group(1))
    if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
        raise ValueError(f"bcrypt cost {cost} out of range {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST}")
    return hashed.strip()


_UNSET_IF_BLANK = BeforeValidator(_blank_is_unset)
Text = Annotated[str | None, _UNSET_IF_BLANK]
TlsVersionName = Annotated[Annotated[str, AfterValidator(_tls_version)] | None, _UNSET_IF_BLANK]
ClientAuthType = Annotated[Annotated[str, AfterValidator(_client_auth_type)] | None, _UNSET_IF_BLANK]
CipherName = Annotated[str, AfterValidator(_cipher)]
CurveName = Annotated[str, AfterValidator(_curve)]
AnyHeaderValue = Annotated[Annotated[str, AfterValidator(_header_text)] | None, _UNSET_IF_BLANK]
NosniffValue = Annotated[Annotated[str, AfterValidator(_header_text), _one_of("nosniff")] | None, _UNSET_IF_BLANK]
FrameOptionsValue = Annotated[Annotated[str, AfterValidator(_header_text), _one_of("deny", "sameorigin")] | None,
                              _UNSET_IF_BLANK]
Username = Annotated[str, AfterValidator(_username)]
BcryptHash = Annotated[str, AfterValidator(_bcrypt_hash)]


class _Strict(BaseModel):
    # strict: YAML's `yes`, `1.3` or `123` are not silently turned into strings or booleans
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TlsServerConfig(_Strict):
    cert_file: Text = None
    key_file: Text = None
    cert: Text = None
    key: Text = Field(default=None, repr=False)  # inline private key
    client_auth_type: ClientAuthType = None
    client_ca_file: Text = None
    client_ca: Text = None
    cipher_suites: list[CipherName] | None = None
    curve_preferences: list[CurveName] | None = None
    min_version: TlsVersionName = None
    max_version: TlsVersionName = None
    prefer_server_cipher_suites: bool | None = None


class HeadersConfig(_Strict):
    """The headers the toolkit lets a web config set, spelled exactly so, with the values it allows."""

    strict_transport_security: AnyHeaderValue = Field(default=None, alias="Strict-Transport-Security")
    x_content_type_options: NosniffValue = Field(default=None, alias="X-Content-Type-Options")
    x_frame_options: FrameOptionsValue = Field(default=None, alias="X-Frame-Options")
    x_xss_protection: AnyHeaderValue = Field(default=None, alias="X-XSS-Protection")
    content_security_policy: AnyHeaderValue = Field(default=None, alias="Content-Security-Policy")


class HttpServerConfig(_Strict):
    http2: bool | None = None  # validated, then ignored: wattson's server speaks HTTP/1.1 only
    headers: HeadersConfig | None = None


class WebConfigFile(_Strict):
    """One exporter-toolkit web config file, as written."""

    tls_server_config: TlsServerConfig | None = None
    http_server_config: HttpServerConfig | None = None
    basic_auth_users: dict[Username, BcryptHash] | None = Field(default=None, repr=False)


# Where a mapping in the file is described by a model: for "unknown key (allowed: ...)".
_MODELS_AT: dict[tuple[Any, ...], type[BaseModel]] = {
    (): WebConfigFile,
    ("tls_server_config",): TlsServerConfig,
    ("http_server_config",): HttpServerConfig,
    ("http_server_config", "headers"): HeadersConfig,
}


def _kind(value: Any) -> str:
    """A value's YAML type for messages; never the value itself, which may be a secret."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(err: ErrorDetails) -> tuple[tuple[Any, ...], str]:
    """(location, message) for one pydantic error, in the words of the toolkit's format; never the input."""
    loc, kind, got = tuple(err["loc"]), err["type"], _kind(err.get("input"))
    users = loc[:1] == ("basic_auth_users",)
    if loc[-1:] == ("[key]",):  # a username (a key of basic_auth_users) is wrong
        loc = loc[:-1]
        if kind != "value_error" or not loc[-1]:
            return loc[:-1], f"username {loc[-1]!r} must be a non-empty string (quote it)"
    if kind == "invalid_key":  # a number or boolean where a key name belongs: as unknown as any other
        loc, kind = loc[:-1] + (str(loc[-1]),), "extra_forbidden"
    if kind == "extra_forbidden":
        path = yamlfile.key_path(loc)
        if path in UNSUPPORTED:
            return loc, UNSUPPORTED[path]
        model = _MODELS_AT.get(loc[:-1])
        allowed = ", ".join(f.alias or name for name, f in model.model_fields.items()) if model else ""
        if model is HeadersConfig:
            return loc, f"this header can not be configured (allowed: {allowed})"
        return loc, f"unknown key (allowed: {allowed})" if allowed else "unknown key"
    if kind == "value_error":
        return loc, str(err.get("ctx", {}).get("error", err["msg"]))
    if kind == "string_type":
        return loc, f"must be a bcrypt hash string, got {got}" if users else f"must be a string, got {got}"
    if kind == "bool_type":
        return loc, f"must be true or false, got {got}"
    if kind == "list_type":
        return loc, f"must be a list of strings, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        if loc == ("basic_auth_users",):
            return loc, f"must be a mapping of username to bcrypt hash, got {got}"
        return loc, f"must be a mapping, got {got}"
    return loc, err["msg"]  # pydantic's words, without the input


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


FileSignature = tuple[tuple[int, int, int, int, int] | None, ...]


class TlsContextSource:
    """The server's SSLContext, rebuilt when the certificate, key or client CA files change.

    Certificate rotators (cert-manager, certbot hooks, Kubernetes secret volumes) replace the files
    in place or swap a symlink; the exporter-toolkit picks the new pair up on the next connection,
    and so does wattson. Each new connection asks get(); at most once per `check_seconds` that
    stats the files (following symlinks) and, if any changed, builds a new context. A new set that
    does not load (half written, key not matching) is logged once and the running context stays.
    """

    def __init__(self, build: Callable[[], ssl.SSLContext], files: Sequence[Path] = (),
                 check_seconds: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self.files = tuple(files)
        self._check_seconds = TLS_RELOAD_CHECK_SECONDS if check_seconds is None else check_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = self._stat()  # before building: a change during the build is seen next time
        self._context = build()
        self._failed: FileSignature | None = None  # the broken set already warned about
        self._next_check = clock() + self._check_seconds

    @property
    def context(self) -> ssl.SSLContext:
        """The context in use now, without looking at the files."""
        return self._context

    def get(self) -> ssl.SSLContext:
        """The context for a new connection: rebuilt first if the files changed since the last look."""
        if not self.files or self._clock() < self._next_check:
            return self._context
        if not self._lock.acquire(blocking=False):
            return self._context  # another connection is looking right now; do not queue behind it
        try:
            self._next_check = self._clock() + self._check_seconds
            signature = self._stat()
            if signature == self._signature or signature == self._failed:
                return self._context
            try:
                context = self._build()
            except Exception as exc:  # whatever broke, keep serving with the old pair
                self._failed = signature
                log.warning("TLS files changed but do not load; still serving the previous certificate",
                            extra=kv(err=str(exc) if isinstance(exc, WebConfigError) else type(exc).__name__))
                return self._context
            self._context, self._signature, self._failed = context, signature, None
            log.info("TLS certificate reloaded", extra=kv(files=",".join(map(str, self.files))))
            return context
        finally:
            self._lock.release()

    def _stat(self) -> FileSignature:
        signature: list[tuple[int, int, int, int, int] | None] = []
        for path in self.files:
            try:
                st = os.stat(path)  # follows symlinks: a swapped ..data link shows as a new inode
            except OSError:
                signature.append(None)
                continue
            signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(signature)


@dataclass(frozen=True)
class WebSecurity:
    """What the HTTP server needs: an optional TLS context source, basic-auth users and extra headers."""

    tls: TlsContextSource | None = None  # None = plain HTTP
    users: dict[str, bytes] = field(default_factory=dict)  # username -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    _cache: _AuthCache = field(default_factory=_AuthCache, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # Never the hashes: a logged repr must not hand anyone material for an offline attack.
        return (f"WebSecurity(tls={self.tls is not None}, users={sorted(self.users)}, "
                f"headers={sorted(self.headers)})")

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context in use now (None: plain HTTP); connections get theirs from tls.get()."""
        return self.tls.context if self.tls is not None else None

    def auth_required(self) -> bool:
        return bool(self.users)

    def check_basic_auth(self, authorization_header: str | None) -> bool:
        """True if the header carries a configured user's password (or no users are configured).

        Unknown users are checked against a dummy hash so response time does not reveal which
        usernames exist; successes are cached so bcrypt is paid once per (user, password).
        """
        if not self.users:
            return True
        import bcrypt  # load_web_config made sure it is there; configs without users never need it

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
        import bcrypt

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

class _EncryptedKey(Exception):
    """Raised from the password callback: wattson has no way to ask for a key passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey()


class _TlsBuilder:
    """Makes SSLContexts from validated tls_server_config settings: once at load, again when files change.

    It keeps the settings and the lines of their keys, not the parsed file (which holds the hashes).
    """

    SECTION = "tls_server_config"

    def __init__(self, settings: TlsServerConfig, doc: yamlfile.YamlDocument) -> None:
        self.s = settings
        self.source = doc.source
        self.base_dir = Path(doc.source).parent
        self.lines = {name: doc.line_of((self.SECTION, name)) for name in TlsServerConfig.model_fields}

    def fail(self, key: str, what: str) -> WebConfigError:
        return WebConfigError(str(yamlfile.YamlFileError(self.source, f"{self.SECTION}.{key}", what,
                                                         self.lines.get(key) or self.lines.get(key.split("[")[0]))))

    def resolve(self, file_name: str) -> Path:
        """Relative paths are relative to the web config file, as in the toolkit."""
        p = Path(file_name).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def watched(self) -> tuple[Path, ...]:
        return tuple(self.resolve(f) for f in (self.s.cert_file, self.s.key_file, self.s.client_ca_file) if f)

    def check(self) -> None:
        """The checks that depend on the settings alone, so they are made once."""
        s = self.s
        for inline, file_key in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
            if getattr(s, inline) and getattr(s, file_key):
                raise self.fail(file_key, f"{inline} and {file_key} are mutually exclusive; set one")
        if s.cert_file is None and s.cert is None:
            raise self.fail("cert_file", "missing: TLS needs cert_file (or an inline cert)")
        if s.key_file is None and s.key is None:
            raise self.fail("key_file", "missing: TLS needs key_file (or an inline key)")
        if self.min_version > self.max_version:
            raise self.fail("min_version", "is higher than max_version")
        mode = s.client_auth_type or "NoClientCert"
        has_ca = s.client_ca_file is not None or s.client_ca is not None
        if mode in ("NoClientCert", "RequestClientCert") and has_ca:
            raise self.fail(self.ca_key, f"client CA is unused with client_auth_type {mode}; set "
                                         "client_auth_type: RequireAndVerifyClientCert to verify clients")
        if mode in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
            raise self.fail("client_ca_file", f"required when client_auth_type is {mode}")
        if self.min_version < ssl.TLSVersion.TLSv1_2:
            log.warning("web config allows TLS older than 1.2; OpenSSL may refuse it anyway",
                        extra=kv(file=self.source))

    @property
    def min_version(self) -> ssl.TLSVersion:
        return TLS_VERSIONS[self.s.min_version or "TLS12"]

    @property
    def max_version(self) -> ssl.TLSVersion:
        return TLS_VERSIONS[self.s.max_version or "TLS13"]

    @property
    def ca_key(self) -> str:
        return "client_ca_file" if self.s.client_ca_file is not None or self.s.client_ca is None else "client_ca"

    def build(self) -> ssl.SSLContext:
        """A new context from the files as they are now; WebConfigError if they do not make one."""
        s = self.s
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS10/TLS11 are the user's explicit choice
            ctx.minimum_version = self.min_version
            ctx.maximum_version = self.max_version
        ctx.set_alpn_protocols(["http/1.1"])
        cert_pem = self.read(s.cert_file, "cert_file") if s.cert_file else (s.cert or "").encode()
        key_pem = self.read(s.key_file, "key_file") if s.key_file else (s.key or "").encode()
        self.load_keypair(ctx, cert_pem, key_pem, "cert_file" if s.cert_file else "cert",
                          "key_file" if s.key_file else "key")
        self.ciphers(ctx)
        if s.prefer_server_cipher_suites is False:
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        else:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        # curve_preferences: validated and ignored. Python's ssl can pin one curve but not set a
        # preference list, and narrowing to one would be a change the user did not ask for.
        self.client_auth(ctx)
        return ctx

    def read(self, file_name: str, key: str) -> bytes:
        p = self.resolve(file_name)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_PEM_BYTES + 1)
        except OSError as exc:
            raise self.fail(key, f"cannot read {p}: {exc.strerror or type(exc).__name__}") from None
        if len(data) > MAX_PEM_BYTES:
            raise self.fail(key, f"{p} is larger than {MAX_PEM_BYTES >> 20} MiB; not a PEM file")
        return data

    def load_keypair(self, ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, cert_key: str,
                     key_key: str) -> None:
        cert_text = cert_pem.decode("ascii", "replace")
        if "-----BEGIN CERTIFICATE-----" not in cert_text:
            raise self.fail(cert_key, "no PEM certificate found")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_text)
        except (ssl.SSLError, ValueError):
            raise self.fail(cert_key, "not a valid PEM certificate") from None
        if b"PRIVATE KEY-----" not in key_pem:
            raise self.fail(key_key, "no PEM private key found")
        if b"ENCRYPTED PRIVATE KEY" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
            raise self.fail(key_key, "private key is encrypted; wattson needs an unencrypted key")
        # load_cert_chain only reads files, and must get exactly the bytes checked above (the files may
        # be replaced meanwhile): stage both in a private directory that is gone right after.
        with tempfile.TemporaryDirectory(prefix="wattson-tls-") as tmp:
            cert_tmp, key_tmp = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for name, data in ((cert_tmp, cert_pem), (key_tmp, key_pem)):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            try:
                ctx.load_cert_chain(cert_tmp, key_tmp, password=_no_password)
            except _EncryptedKey:
                raise self.fail(key_key, "private key is encrypted; wattson needs an unencrypted key") from None
            except ssl.SSLError as exc:
                if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                    raise self.fail(key_key, "private key does not match the certificate") from None
                raise self.fail(key_key, "not a valid PEM private key for this certificate") from None

    def ciphers(self, ctx: ssl.SSLContext) -> None:
        names = self.s.cipher_suites or []
        openssl_names = [TLS12_CIPHERS[n] for n in names if n in TLS12_CIPHERS]
        if not openssl_names:
            return  # none, or TLS 1.3 suites only: OpenSSL's defaults, as nothing else can be set
        try:
            ctx.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise self.fail("cipher_suites", "none of these cipher suites is available in this Python's "
                                             "OpenSSL") from None
        enabled = {c["name"] for c in ctx.get_ciphers()}
        for i, name in enumerate(names):
            if name in TLS12_CIPHERS and TLS12_CIPHERS[name] not in enabled:
                raise self.fail(f"cipher_suites[{i}]", f"cipher {name!r} is not available in this Python's OpenSSL")

    def client_auth(self, ctx: ssl.SSLContext) -> None:
        s = self.s
        mode = s.client_auth_type or "NoClientCert"
        if mode in ("NoClientCert", "RequestClientCert"):
            # RequestClientCert: wattson never reads an unverified client certificate, so asking for
            # one changes nothing; Python cannot ask without verifying. Same as NoClientCert.
            ctx.verify_mode = ssl.CERT_NONE
            return
        before = ctx.cert_store_stats()["x509"]
        where = self.ca_key
        pem = self.read(s.client_ca_file, where).decode("ascii", "replace") if s.client_ca_file else s.client_ca
        try:
            ctx.load_verify_locations(cadata=pem)
        except (ssl.SSLError, ValueError):
            raise self.fail(where, "no PEM certificate found") from None
        if ctx.cert_store_stats()["x509"] <= before:
            raise self.fail(where, "no PEM certificate found")
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "RequireAndVerifyClientCert" else ssl.CERT_OPTIONAL


def load_web_config(path: str | None) -> WebSecurity:
    """Read and validate a web config file. None: plain HTTP without auth.

    Raises WebConfigError for anything wrong. Users and headers are read once (restart to change
    them); the TLS files are watched and reloaded when they change.
    """
    if path is None:
        return WebSecurity()
    try:
        doc = yamlfile.read(path)
    except yamlfile.YamlFileError as exc:
        raise WebConfigError(str(exc)) from None
    try:
        cfg = WebConfigFile.model_validate({} if doc.data is None else doc.data)
    except ValidationError as exc:
        raise WebConfigError(yamlfile.format_validation_error(exc, path, doc, _describe)) from None

    users = {name: hashed.encode("ascii") for name, hashed in (cfg.basic_auth_users or {}).items()}
    if users:
        try:
            import bcrypt  # noqa: F401 - only basic auth needs it; say so now rather than at the first scrape
        except ImportError:
            raise WebConfigError(str(doc.error(("basic_auth_users",), "needs the Python package bcrypt "
                                                                      "(pip install bcrypt)"))) from None
    http = cfg.http_server_config
    headers: dict[str, str] = {}
    if http is not None and http.headers is not None:
        headers = http.headers.model_dump(by_alias=True, exclude_none=True)

    tls = None
    settings = cfg.tls_server_config
    if settings is not None and settings.model_fields_set:  # absent or empty: plain HTTP, as in the toolkit
        builder = _TlsBuilder(settings, doc)
        builder.check()
        tls = TlsContextSource(builder.build, builder.watched())
    return WebSecurity(tls=tls, users=users, headers=headers)
