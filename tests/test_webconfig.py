"""The web config (TLS, client certificates, basic auth, headers, certificate reload) over real connections.

A throwaway CA, server and client certificates are made at test time with the openssl CLI. Requests go to
wattson's own WattsonHTTPServer on 127.0.0.1:0, so the per-connection TLS handshake and the 401 with its
realm are the real ones.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tests.conftest import require_tool
from wattson import webconfig, yamlfile
from wattson.snapshot import EMPTY
from wattson.web import WattsonHTTPServer
from wattson.webconfig import TlsContextSource, WebConfigError, WebSecurity, load_web_config

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "correct horse battery staple"
BOB_PASSWORD = "hunter2-but-longer"
# Cost 4 (bcrypt's minimum) keeps the tests fast; the code paths are the same as at cost 10.
ALICE_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
BOB_HASH = "$2y$" + bcrypt.hashpw(BOB_PASSWORD.encode(), bcrypt.gensalt(4)).decode()[4:]  # htpasswd style


# --- throwaway PKI --------------------------------------------------------------------------------

LEAF_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage={usage}
subjectAltName={san}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)


def make_pki_openssl(d: Path) -> dict[str, Path]:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=wattson test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("server2", "serverAuth", "DNS:localhost,IP:127.0.0.1"),  # the rotated one
                             ("client", "clientAuth", "DNS:prometheus.test")):
        (d / f"{name}.ext").write_text(LEAF_EXT.format(usage=usage, san=san))
        _openssl(d, "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
                 "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    # A client certificate no configured CA vouches for.
    _openssl(d, "req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
             "-subj", "/CN=rogue", "-addext", "extendedKeyUsage=clientAuth")
    _openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key")
    _openssl(d, "pkey", "-in", "server.key", "-aes256", "-passout", "pass:test-passphrase", "-out", "enc.key")
    return _pki_paths(d)


def _pki_paths(d: Path) -> dict[str, Path]:
    (d / "junk.pem").write_text("this is not PEM at all\n")
    (d / "corrupt.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    names = ("ca.crt", "server.crt", "server.key", "server2.crt", "server2.key", "client.crt", "client.key",
             "rogue.crt", "rogue.key", "other.key", "enc.key", "junk.pem", "corrupt.crt")
    return {n.replace(".", "_"): d / n for n in names} | {"dir": d}



@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tool("openssl")
    return make_pki_openssl(tmp_path_factory.mktemp("pki"))


def fill(text: str, paths: dict[str, Any]) -> str:
    """Put file paths into a config template's {name} placeholders."""
    for k, v in paths.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def write_config(tmp_path: Path, text: str, **paths: Any) -> str:
    p = tmp_path / "web-config.yml"
    p.write_text(fill(text, paths))
    return str(p)


TLS = """tls_server_config:
  cert_file: {server_crt}
  key_file: {server_key}
"""
USERS = f"""basic_auth_users:
  alice: {ALICE_HASH}
  bob: '{BOB_HASH}'
"""


# --- wattson's own server -------------------------------------------------------------------------

@contextlib.contextmanager
def serve(security: WebSecurity) -> Iterator[int]:
    """WattsonHTTPServer on a free loopback port, serving an empty snapshot, stopped on exit."""
    server = WattsonHTTPServer(("127.0.0.1", 0), lambda: EMPTY, security)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclasses.dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    tls_version: str | None
    cipher: str | None
    server_cert: bytes | None  # DER
    serial: str | None


def client_context(pki: dict[str, Path], cert: str | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
    if cert:
        ctx.load_cert_chain(str(pki[f"{cert}_crt"]), str(pki[f"{cert}_key"]))
    for attr, v in versions.items():
        setattr(ctx, attr, v)
    return ctx


def get(port: int, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None, path: str = "/healthz") -> Reply:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        sock = conn.sock  # read now, before getresponse() may close it
        version = cipher = None
        cert = serial = None
        if isinstance(sock, ssl.SSLSocket):
            version, negotiated = sock.version(), sock.cipher()
            cipher = negotiated[0] if negotiated else None
            cert = sock.getpeercert(binary_form=True)
            serial = str((sock.getpeercert() or {}).get("serialNumber"))
        r = conn.getresponse()
        body = r.read()
        return Reply(r.status, r.headers, body, version, cipher, cert, serial)
    finally:
        conn.close()


CONNECTION_FAILED = (OSError, http.client.HTTPException)  # ssl.SSLError and resets are OSErrors


# --- end to end over TLS --------------------------------------------------------------------------

def test_no_config_file_means_plain_http_without_auth() -> None:
    sec = load_web_config(None)
    assert sec.ssl_context is None and sec.users == {} and sec.headers == {}
    assert not sec.auth_required()
    assert sec.check_basic_auth(None)


def test_tls_with_basic_auth_and_headers(pki: dict[str, Path], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_config(tmp_path, TLS + USERS + """http_server_config:
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    Strict-Transport-Security: max-age=31536000
""", **pki)
    sec = load_web_config(path)
    assert sec.ssl_context is not None and sec.auth_required()
    ctx = client_context(pki)
    with serve(sec) as port:
        ok = get(port, ctx, ("alice", PASSWORD), path="/metrics")
        assert ok.status == 200 and b"# TYPE wattson_" in ok.body
        assert ok.tls_version in ("TLSv1.2", "TLSv1.3")
        assert ok.headers["X-Frame-Options"] == "deny"
        assert ok.headers["X-Content-Type-Options"] == "nosniff"
        assert ok.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert get(port, ctx, ("bob", BOB_PASSWORD)).status == 200  # $2y$ (htpasswd) hashes work

        wrong = get(port, ctx, ("alice", "not the password"), path="/metrics")
        assert wrong.status == 401
        assert wrong.headers["WWW-Authenticate"] == 'Basic realm="wattson"'
        assert wrong.headers["X-Frame-Options"] == "deny"  # headers on every response, like the toolkit
        assert wrong.body == b"Unauthorized\n"
        none = get(port, ctx)
        assert none.status == 401 and none.headers["WWW-Authenticate"] == 'Basic realm="wattson"'
        assert get(port, ctx, ("mallory", PASSWORD)).status == 401
        assert get(port, ctx, ("bob", PASSWORD)).status == 401  # alice's password is not bob's
        for path in ("/", "/readyz", "/nope"):  # every path is behind the password
            assert get(port, ctx, path=path).status == 401
    for secret in (PASSWORD, BOB_PASSWORD, ALICE_HASH, BOB_HASH):
        assert secret not in caplog.text
        assert secret not in repr(sec)


def test_plain_http_to_a_tls_port_is_refused(pki: dict[str, Path], tmp_path: Path) -> None:
    sec = load_web_config(write_config(tmp_path, TLS, **pki))
    with serve(sec) as port:
        with pytest.raises(CONNECTION_FAILED):
            get(port, None)
        assert get(port, client_context(pki)).status == 200  # the same port speaks TLS


def test_min_version_tls13_refuses_a_tls12_client(pki: dict[str, Path], tmp_path: Path) -> None:
    sec = load_web_config(write_config(tmp_path, TLS + "  min_version: TLS13\n", **pki))
    with serve(sec) as port:
        with pytest.raises(ssl.SSLError):
            get(port, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))
        assert get(port, client_context(pki)).tls_version == "TLSv1.3"


def test_max_version_tls12_caps_the_protocol(pki: dict[str, Path], tmp_path: Path) -> None:
    sec = load_web_config(write_config(tmp_path, TLS + "  max_version: TLS12\n", **pki))
    with serve(sec) as port:
        assert get(port, client_context(pki)).tls_version == "TLSv1.2"


def test_cipher_suites_are_applied(pki: dict[str, Path], tmp_path: Path) -> None:
    # The test keys are ECDSA; the client offers its whole default list and the server picks from ours.
    cfg = TLS + """  max_version: TLS12
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]
"""
    sec = load_web_config(write_config(tmp_path, cfg, **pki))
    assert sec.ssl_context is not None
    tls12 = [c["name"] for c in sec.ssl_context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == ["ECDHE-ECDSA-AES256-GCM-SHA384"]
    with serve(sec) as port:
        reply = get(port, client_context(pki))
        assert (reply.tls_version, reply.cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")


def test_require_and_verify_client_cert(pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca_crt}\n"
    sec = load_web_config(write_config(tmp_path, cfg, **pki))
    with serve(sec) as port:
        with pytest.raises(CONNECTION_FAILED):
            get(port, client_context(pki))  # no client certificate
        with pytest.raises(CONNECTION_FAILED):
            get(port, client_context(pki, "rogue"))  # a certificate our CA did not sign
        assert get(port, client_context(pki, "client")).status == 200
        # over TLS 1.2 the refusal happens inside the handshake itself
        with pytest.raises(ssl.SSLError):
            get(port, client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2))


def test_verify_client_cert_if_given(pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {ca_crt}\n"
    sec = load_web_config(write_config(tmp_path, cfg, **pki))
    with serve(sec) as port:
        assert get(port, client_context(pki)).status == 200
        assert get(port, client_context(pki, "client")).status == 200
        with pytest.raises(CONNECTION_FAILED):
            get(port, client_context(pki, "rogue"))


def test_client_cert_and_basic_auth_together(pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca_crt}\n" + USERS
    sec = load_web_config(write_config(tmp_path, cfg, **pki))
    with serve(sec) as port:
        ctx = client_context(pki, "client")
        assert get(port, ctx).status == 401
        assert get(port, ctx, ("alice", PASSWORD)).status == 200


def test_inline_cert_key_and_client_ca(pki: dict[str, Path], tmp_path: Path) -> None:
    def block(name: str) -> str:
        return "|\n" + "".join("    " + line + "\n" for line in pki[name].read_text().splitlines())

    cfg = ("tls_server_config:\n  cert: " + block("server_crt") + "  key: " + block("server_key")
           + "  client_ca: " + block("ca_crt") + "  client_auth_type: RequireAndVerifyClientCert\n")
    sec = load_web_config(write_config(tmp_path, cfg))
    with serve(sec) as port:
        assert get(port, client_context(pki, "client")).status == 200
        with pytest.raises(CONNECTION_FAILED):
            get(port, client_context(pki))


def test_relative_paths_are_relative_to_the_config_file(pki: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = pki["dir"] / "conf"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "web.yml").write_text("tls_server_config:\n  cert_file: ../server.crt\n  key_file: ../server.key\n")
    monkeypatch.chdir(tmp_path)
    sec = load_web_config(str(cfg_dir / "web.yml"))
    with serve(sec) as port:
        assert get(port, client_context(pki)).status == 200


def test_accepted_and_ignored_keys(pki: dict[str, Path], tmp_path: Path) -> None:
    cfg = TLS + """  prefer_server_cipher_suites: false
  curve_preferences: [X25519, CurveP256]
  cipher_suites: [TLS_AES_256_GCM_SHA384]
  client_auth_type: NoClientCert
http_server_config:
  http2: false
  headers:
    X-XSS-Protection: ""
"""
    sec = load_web_config(write_config(tmp_path, cfg, **pki))
    assert sec.ssl_context is not None
    assert not sec.ssl_context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert sec.headers == {}  # blank means unset
    assert not sec.auth_required()
    with serve(sec) as port:
        assert get(port, client_context(pki)).status == 200


def test_old_tls_is_allowed_with_a_warning(pki: dict[str, Path], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    sec = load_web_config(write_config(tmp_path, TLS + "  min_version: TLS10\n", **pki))
    assert sec.ssl_context is not None and sec.ssl_context.minimum_version == ssl.TLSVersion.TLSv1
    assert "older than 1.2" in caplog.text


def test_empty_file_and_empty_sections_mean_plain_http(tmp_path: Path) -> None:
    for text in ("", "tls_server_config:\nbasic_auth_users: {}\n", "tls_server_config: {}\n"):
        sec = load_web_config(write_config(tmp_path, text))
        assert sec.ssl_context is None and not sec.auth_required()


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


@pytest.fixture
def reload_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Look at the TLS files on every connection, so these tests need not wait a second between steps."""
    monkeypatch.setattr(webconfig, "TLS_RELOAD_CHECK_SECONDS", 0.0)


def secret_volume(root: Path, version: str, files: dict[str, Path]) -> None:
    """Lay out or update a directory as the kubelet does for a Kubernetes secret (cert-manager's output).

    tls.crt -> ..data/tls.crt and ..data -> ..<version>/; an update writes a new version directory
    and swaps the ..data link in one rename, so the files change without ever being rewritten.
    """
    version_dir = root / f"..{version}"
    version_dir.mkdir()
    for name, src in files.items():
        shutil.copy(src, version_dir / name)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(version_dir.name)
    os.replace(tmp_link, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_rotated_certificate_serves_new_connections(pki: dict[str, Path], tmp_path: Path, reload_now: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    vol = tmp_path / "tls"
    vol.mkdir()
    secret_volume(vol, "v1", {"tls.crt": pki["server_crt"], "tls.key": pki["server_key"]})
    sec = load_web_config(write_config(tmp_path, "tls_server_config:\n  cert_file: tls/tls.crt\n"
                                                 "  key_file: tls/tls.key\n"))
    ctx = client_context(pki)
    with serve(sec) as port:
        before = get(port, ctx)
        assert before.status == 200 and before.server_cert == der(pki["server_crt"])
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"

        secret_volume(vol, "v2", {"tls.crt": pki["server2_crt"], "tls.key": pki["server2_key"]})
        after = get(port, ctx)
        assert after.status == 200 and after.server_cert == der(pki["server2_crt"])
        assert after.serial != before.serial
        assert get(port, ctx).server_cert == der(pki["server2_crt"])  # and it stays

        kept.request("GET", "/healthz")  # a connection made before the rotation carries on undisturbed
        assert kept.getresponse().read() == b"ok\n"
        kept.close()
    assert "TLS certificate reloaded" in caplog.text


def test_broken_new_files_keep_the_old_certificate(pki: dict[str, Path], tmp_path: Path, reload_now: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki["server_crt"], crt)
    shutil.copy(pki["server_key"], key)
    sec = load_web_config(write_config(tmp_path, "tls_server_config:\n  cert_file: server.crt\n"
                                                 "  key_file: server.key\n"))
    ctx = client_context(pki)

    def warnings() -> list[str]:
        return [r.kv["err"] for r in caplog.records if r.levelno == logging.WARNING]  # type: ignore[attr-defined]

    with serve(sec) as port:
        assert get(port, ctx).server_cert == der(pki["server_crt"])
        # A rotator half way through, writing in place: the new certificate, the old key.
        crt.write_bytes(pki["server2_crt"].read_bytes())
        for _ in range(3):
            reply = get(port, ctx)
            assert reply.status == 200 and reply.server_cert == der(pki["server_crt"])
        assert len(warnings()) == 1, warnings()  # once for this set of files, not once per connection
        assert re.match(rf"{re.escape(str(tmp_path))}/web-config.yml:3: tls_server_config.key_file: "
                        "private key does not match the certificate$", warnings()[0])

        key.unlink()  # gone for a moment: still the old pair, and one more warning
        assert get(port, ctx).server_cert == der(pki["server_crt"])
        assert len(warnings()) == 2 and "cannot read" in warnings()[1]

        key.write_bytes(pki["server2_key"].read_bytes())  # the matching key arrives
        assert get(port, ctx).server_cert == der(pki["server2_crt"])
    for text in ("PRIVATE KEY", "BEGIN"):
        assert text not in caplog.text


def test_client_ca_file_is_reloaded_too(pki: dict[str, Path], tmp_path: Path, reload_now: None) -> None:
    ca = tmp_path / "clients-ca.crt"
    shutil.copy(pki["ca_crt"], ca)
    sec = load_web_config(write_config(tmp_path, TLS + "  client_auth_type: RequireAndVerifyClientCert\n"
                                                       "  client_ca_file: clients-ca.crt\n", **pki))
    with serve(sec) as port:
        assert get(port, client_context(pki, "client")).status == 200
        ca.write_bytes(pki["rogue_crt"].read_bytes())  # a CA that never signed our client
        with pytest.raises(CONNECTION_FAILED):
            get(port, client_context(pki, "client"))
        ca.write_bytes(pki["ca_crt"].read_bytes())
        assert get(port, client_context(pki, "client")).status == 200


def test_files_are_looked_at_no_more_than_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    built: list[ssl.SSLContext] = []

    def build() -> ssl.SSLContext:
        built.append(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        return built[-1]

    cert = tmp_path / "tls.crt"
    cert.write_text("one")
    source = TlsContextSource(build, [cert], check_seconds=1.0, clock=lambda: now[0])
    first = source.get()
    assert built == [first]
    cert.write_text("two, and longer")
    now[0] += 0.9
    assert source.get() is first and len(built) == 1  # changed, but not looked at yet
    now[0] += 0.2
    second = source.get()
    assert second is not first and len(built) == 2 and source.context is second
    now[0] += 5
    assert source.get() is second and len(built) == 2  # looked at, unchanged: nothing rebuilt


def test_inline_certificates_have_nothing_to_watch(pki: dict[str, Path], tmp_path: Path) -> None:
    def block(name: str) -> str:
        return "|\n" + "".join("    " + line + "\n" for line in pki[name].read_text().splitlines())

    sec = load_web_config(write_config(tmp_path, "tls_server_config:\n  cert: " + block("server_crt")
                                       + "  key: " + block("server_key")))
    assert sec.tls is not None and sec.tls.files == ()
    files = load_web_config(write_config(tmp_path, TLS + "  client_auth_type: VerifyClientCertIfGiven\n" + CA,
                                         **pki))
    assert files.tls is not None
    assert files.tls.files == (pki["server_crt"], pki["server_key"], pki["ca_crt"])


# --- basic auth and its cache ---------------------------------------------------------------------

def basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


@pytest.fixture
def checkpw_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


def test_successful_checks_are_cached_over_tls(pki: dict[str, Path], tmp_path: Path,
                                               checkpw_calls: list[bytes]) -> None:
    sec = load_web_config(write_config(tmp_path, TLS + USERS, **pki))
    with serve(sec) as port:
        ctx = client_context(pki)
        assert get(port, ctx, ("alice", PASSWORD)).status == 200
        assert len(checkpw_calls) == 1
        assert get(port, ctx, ("alice", PASSWORD)).status == 200
        assert get(port, ctx, ("alice", PASSWORD)).status == 200
        assert len(checkpw_calls) == 1  # served from the cache
        # a wrong password is never cached and always pays bcrypt
        assert get(port, ctx, ("alice", "guess")).status == 401
        assert get(port, ctx, ("alice", "guess")).status == 401
        assert len(checkpw_calls) == 3


def test_cache_is_keyed_on_user_and_password(checkpw_calls: list[bytes]) -> None:
    sec = WebSecurity(users={"alice": ALICE_HASH.encode(), "bob": BOB_HASH.encode()})
    assert sec.check_basic_auth(basic("alice", PASSWORD))
    assert not sec.check_basic_auth(basic("alice", PASSWORD + "x"))
    assert not sec.check_basic_auth(basic("bob", PASSWORD))
    assert sec.check_basic_auth(basic("bob", BOB_PASSWORD))
    assert len(checkpw_calls) == 4
    assert sec.check_basic_auth(basic("bob", BOB_PASSWORD)) and sec.check_basic_auth(basic("alice", PASSWORD))
    assert len(checkpw_calls) == 4


def test_unknown_users_still_pay_bcrypt(checkpw_calls: list[bytes]) -> None:
    sec = WebSecurity(users={"alice": ALICE_HASH.encode()})
    assert not sec.check_basic_auth(basic("mallory", PASSWORD))
    assert not sec.check_basic_auth(basic("mallory", PASSWORD))
    # a dummy hash at the users' cost, so timing does not tell which names exist; never cached
    assert len(checkpw_calls) == 2 and checkpw_calls[0] != ALICE_HASH.encode()
    assert checkpw_calls[0].startswith(b"$2b$04$")


def test_cache_is_bounded(checkpw_calls: list[bytes]) -> None:
    users = {f"u{i}": bcrypt.hashpw(f"p{i}".encode(), bcrypt.gensalt(4)) for i in range(3)}
    sec = WebSecurity(users=users)
    sec._cache.max_entries = 2
    for i in range(3):
        assert sec.check_basic_auth(basic(f"u{i}", f"p{i}"))
    assert len(sec._cache) == 2
    assert sec.check_basic_auth(basic("u2", "p2")) and len(checkpw_calls) == 3  # recent: cached
    assert sec.check_basic_auth(basic("u0", "p0")) and len(checkpw_calls) == 4  # evicted: checked again


@pytest.mark.parametrize("header", [
    None, "", "Basic", "Basic ", "Bearer abc", "Basic !!!notbase64!!!",
    "Basic " + base64.b64encode(b"alice-no-colon").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:" + PASSWORD.encode()).decode(),  # not UTF-8 user name
    "Basic " + base64.b64encode(b"alice:" + PASSWORD.encode() + b"\x00").decode(),
])
def test_malformed_or_wrong_headers_are_rejected(header: str | None) -> None:
    sec = WebSecurity(users={"alice": ALICE_HASH.encode()})
    assert sec.check_basic_auth(header) is False


def test_header_parsing_variants() -> None:
    colon_pw = "pass:with:colons"
    long_pw = "x" * 100  # bcrypt looks at the first 72 bytes, as htpasswd and Go do
    sec = WebSecurity(users={"alice": ALICE_HASH.encode(),
                             "carol": bcrypt.hashpw(colon_pw.encode(), bcrypt.gensalt(4)),
                             "dave": bcrypt.hashpw(long_pw[:72].encode(), bcrypt.gensalt(4))})
    assert sec.check_basic_auth("basic " + basic("alice", PASSWORD).split(" ", 1)[1])  # scheme is case-blind
    assert sec.check_basic_auth("  " + basic("alice", PASSWORD) + "  ")
    assert sec.check_basic_auth(basic("carol", colon_pw))  # only the first colon splits
    assert sec.check_basic_auth(basic("dave", long_pw))
    assert not sec.check_basic_auth(basic("dave", long_pw[:71]))


def test_repr_never_shows_hashes() -> None:
    sec = WebSecurity(users={"alice": ALICE_HASH.encode()}, headers={"X-Frame-Options": "deny"})
    assert ALICE_HASH not in repr(sec) and "alice" in repr(sec)


def test_concurrent_checks_are_consistent() -> None:
    sec = WebSecurity(users={"alice": ALICE_HASH.encode()})
    results: list[bool] = []
    lock = threading.Lock()

    def worker(pw: str) -> None:
        ok = sec.check_basic_auth(basic("alice", pw))
        with lock:
            results.append(ok == (pw == PASSWORD))

    threads = [threading.Thread(target=worker, args=(PASSWORD if i % 2 else "nope",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 16


# --- configuration errors -------------------------------------------------------------------------

BAD_HASH_COST = "$2b$03$" + "a" * 53
CA = "  client_ca_file: {ca_crt}\n"

ERRORS = [
    # (config, key path in the message, what the message says)
    ("bogus: 1\n", "bogus", "unknown key"),
    (TLS + "  bogus: 1\n", "tls_server_config.bogus", "unknown key"),
    ("http_server_config:\n  nope: true\n", "http_server_config.nope", "unknown key"),
    ("rate_limit:\n  interval: 1s\n  burst: 20\n", "rate_limit", "not supported"),
    (TLS + "  client_allowed_sans: [prometheus.test]\n", "tls_server_config.client_allowed_sans", "not supported"),
    ("- a list\n", "(top level)", "must be a mapping"),
    ("tls_server_config: yes please\n", "tls_server_config", "must be a mapping"),
    ("tls_server_config:\n  key_file: {server_key}\n", "tls_server_config.cert_file", "missing"),
    ("tls_server_config:\n  cert_file: {server_crt}\n", "tls_server_config.key_file", "missing"),
    ("tls_server_config:\n  min_version: TLS13\n", "tls_server_config.cert_file", "missing"),
    ("tls_server_config:\n  cert_file: {dir}/nope.crt\n  key_file: {server_key}\n",
     "tls_server_config.cert_file", "cannot read"),
    ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {dir}\n", "tls_server_config.key_file",
     "cannot read"),
    ("tls_server_config:\n  cert_file: {junk_pem}\n  key_file: {server_key}\n", "tls_server_config.cert_file",
     "no PEM certificate"),
    ("tls_server_config:\n  cert_file: {server_key}\n  key_file: {server_key}\n", "tls_server_config.cert_file",
     "no PEM certificate"),
    ("tls_server_config:\n  cert_file: {corrupt_crt}\n  key_file: {server_key}\n",
     "tls_server_config.cert_file", "not a valid PEM certificate"),
    ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {junk_pem}\n", "tls_server_config.key_file",
     "no PEM private key"),
    ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {other_key}\n", "tls_server_config.key_file",
     "does not match the certificate"),
    ("tls_server_config:\n  cert_file: {server_crt}\n  key_file: {enc_key}\n", "tls_server_config.key_file",
     "encrypted"),
    (TLS + "  cert: inline\n", "tls_server_config.cert_file", "mutually exclusive"),
    (TLS + "  client_auth_type: Sometimes\n", "tls_server_config.client_auth_type", "unknown value"),
    (TLS + "  client_auth_type: RequireAnyClientCert\n" + CA, "tls_server_config.client_auth_type",
     "RequireAndVerifyClientCert"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "tls_server_config.client_ca_file", "required"),
    (TLS + "  client_auth_type: VerifyClientCertIfGiven\n", "tls_server_config.client_ca_file", "required"),
    (TLS + CA, "tls_server_config.client_ca_file", "unused"),
    (TLS + "  client_auth_type: RequestClientCert\n" + CA, "tls_server_config.client_ca_file", "unused"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {junk_pem}\n",
     "tls_server_config.client_ca_file", "no PEM certificate"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {dir}/missing-ca.crt\n",
     "tls_server_config.client_ca_file", "cannot read"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca: not a cert\n",
     "tls_server_config.client_ca", "no PEM certificate"),
    (TLS + "  min_version: TLS14\n", "tls_server_config.min_version", "unknown TLS version"),
    (TLS + "  max_version: 1.3\n", "tls_server_config.max_version", "must be a string"),
    (TLS + "  min_version: TLS13\n  max_version: TLS12\n", "tls_server_config.min_version", "higher than"),
    (TLS + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_RC4_FOREVER]\n",
     "tls_server_config.cipher_suites[1]", "unknown cipher"),
    (TLS + "  cipher_suites: TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n", "tls_server_config.cipher_suites",
     "must be a list"),
    (TLS + "  curve_preferences: [X25519, CurveP999]\n", "tls_server_config.curve_preferences[1]",
     "unknown curve"),
    (TLS + "  prefer_server_cipher_suites: sometimes\n", "tls_server_config.prefer_server_cipher_suites",
     "true or false"),
    ("http_server_config:\n  http2: maybe\n", "http_server_config.http2", "true or false"),
    ("http_server_config:\n  headers:\n    X-Powered-By: wattson\n", "http_server_config.headers.X-Powered-By",
     "can not be configured"),
    ("http_server_config:\n  headers:\n    x-frame-options: deny\n", "http_server_config.headers.x-frame-options",
     "can not be configured"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow-from\n",
     "http_server_config.headers.X-Frame-Options", "invalid value"),
    ("http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
     "http_server_config.headers.X-Content-Type-Options", "invalid value"),
    ('http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x=1"\n',
     "http_server_config.headers.Content-Security-Policy", "line breaks"),
    ("basic_auth_users: [alice]\n", "basic_auth_users", "must be a mapping"),
    (f"basic_auth_users:\n  alice: {PASSWORD}\n", "basic_auth_users.alice", "not a valid bcrypt hash"),
    (f"basic_auth_users:\n  alice: '{ALICE_HASH[:-1]}'\n", "basic_auth_users.alice", "not a valid bcrypt hash"),
    (f"basic_auth_users:\n  alice: '{BAD_HASH_COST}'\n", "basic_auth_users.alice", "out of range"),
    ("basic_auth_users:\n  alice: 12345\n", "basic_auth_users.alice", "must be a bcrypt hash string"),
    (f"basic_auth_users:\n  'a:b': {ALICE_HASH}\n", "basic_auth_users.a:b", "must not contain ':'"),
    (f"basic_auth_users:\n  123: {ALICE_HASH}\n", "basic_auth_users", "non-empty string"),
    (f"basic_auth_users:\n  alice: {ALICE_HASH}\n  alice: {BOB_HASH}\n", "basic_auth_users.alice",
     "duplicate key (first at line 2)"),
    (f"basic_auth_users:\n  alice: {ALICE_HASH}\n   bob: [{BOB_HASH}\n", "(yaml)", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "key_path", "what"), ERRORS, ids=[f"{e[1]}:{e[2]}" for e in ERRORS])
def test_config_errors_name_the_file_and_key(pki: dict[str, Path], tmp_path: Path, text: str, key_path: str,
                                             what: str) -> None:
    path = tmp_path / "web-config.yml"
    path.write_text(fill(text, pki))
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(path))
    msg = str(info.value)
    assert re.match(rf"{re.escape(str(path))}(:[1-9][0-9]*)?: {re.escape(key_path)}: ", msg), msg
    assert what in msg, msg
    assert "\n" not in msg
    for secret in (PASSWORD, ALICE_HASH, BOB_HASH, BAD_HASH_COST, "$2b$", "$2y$", "PRIVATE KEY", "BEGIN"):
        assert secret not in msg, msg


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(WebConfigError, match=rf"^{path}: \(file\): cannot read: No such file"):
        load_web_config(str(path))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_file(pki: dict[str, Path], tmp_path: Path) -> None:
    key = tmp_path / "locked.key"
    key.write_bytes(pki["server_key"].read_bytes())
    key.chmod(0)
    try:
        with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: cannot read .*Permission denied"):
            load_web_config(write_config(tmp_path, "tls_server_config:\n  cert_file: {c}\n  key_file: {k}\n",
                                         c=pki["server_crt"], k=key))
    finally:
        key.chmod(0o600)


def test_bcrypt_is_imported_only_when_users_are_configured(pki: dict[str, Path], tmp_path: Path) -> None:
    tls_only = write_config(tmp_path, TLS, **pki)
    with_users = tmp_path / "users.yml"
    with_users.write_text(USERS)
    code = (f"import sys; from wattson.webconfig import load_web_config as load; load(None); load({tls_only!r}); "
            "assert 'bcrypt' not in sys.modules, 'imported without users'; "
            f"assert load({str(with_users)!r}).auth_required(); assert 'bcrypt' in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={"PYTHONPATH": str(ROOT / "exporter"), "PATH": os.environ.get("PATH", "/usr/bin")})
    assert run.returncode == 0, run.stderr


def test_users_without_bcrypt_installed_are_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import bcrypt now raises ImportError
    path = write_config(tmp_path, "http_server_config:\n  http2: false\n" + USERS)
    with pytest.raises(WebConfigError, match=rf"^{re.escape(path)}:3: basic_auth_users: needs the Python package "
                                             "bcrypt"):
        load_web_config(path)
    assert not load_web_config(write_config(tmp_path, "http_server_config:\n  http2: false\n")).auth_required()


@pytest.mark.parametrize(("content", "expected"), [
    (b"tls_server_config:\n  cert_file: a\ntls_server_config:\n  cert_file: b\n",
     ":3: tls_server_config: duplicate key (first at line 1)"),
    (b"http_server_config:\n  headers:\n    X-Frame-Options: deny\n    X-Frame-Options: sameorigin\n",
     ":4: http_server_config.headers.X-Frame-Options: duplicate key (first at line 3)"),
    (b"basic_auth_users:\n  alice: x\n  al\xe9ce: y\n", ":3: (file): not UTF-8 text: byte 0xe9 at column 5"),
    (b"#" * (yamlfile.MAX_BYTES + 1), ": (file): larger than 1 MiB"),
    (b"# a comment\n\nhttp_server_config:\n  http2: true\n  nope: 1\n", ":5: http_server_config.nope: unknown key"),
    (b"tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites:\n    - TLS_AES_128_GCM_SHA256\n"
     b"    - TLS_NOPE\n", ":6: tls_server_config.cipher_suites[1]: unknown cipher"),
    (b"tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
     ":2: tls_server_config.cert_file: cannot read"),
])
def test_file_problems_name_the_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "web-config.yml"
    path.write_bytes(content)
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(path))
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)
    assert "\n" not in str(info.value)


# --- the documented example ------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"
DOC_PASSWORD = "example-only-change-me"


def docs_example(pki: dict[str, Path], tmp_path: Path) -> Path:
    """The quick-start web-config.yml from docs/security.md, next to copies of the test cert and key."""
    blocks = DOCS.read_text().split("```yaml\n")[1:]
    example = next(b.split("```")[0] for b in blocks if "basic_auth_users:" in b)
    example = "\n".join(line[3:] if line.startswith("   ") else line for line in example.splitlines())
    for name in ("server.crt", "server.key"):
        shutil.copy(pki[name.replace(".", "_")], tmp_path / name)
    path = tmp_path / "web-config.yml"
    path.write_text(example + "\n")
    return path


def test_documented_example_works(pki: dict[str, Path], tmp_path: Path) -> None:
    sec = load_web_config(str(docs_example(pki, tmp_path)))
    assert sec.ssl_context is not None and sec.headers["X-Frame-Options"] == "deny"
    with serve(sec) as port:
        assert get(port, client_context(pki), ("prometheus", DOC_PASSWORD)).status == 200


@pytest.mark.integration
def test_promtool_accepts_the_documented_example(pki: dict[str, Path], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    path = docs_example(pki, tmp_path)
    run = subprocess.run([promtool, "check", "web-config", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
