"""TLS and scoped tokens against `appliance serve` in its own process (api/tls.py, api/auth.py):
tritonclient (HTTP and gRPC), the official openai client and a WebSocket over TLS with a
self-made CA; mutual TLS refusing a client without a certificate and one from another CA;
TLS 1.1 and CBC suites refused; an infer token refused on admin routes on every front; no
token ever in the log."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from appliance.registry import Registry
from tests.conftest import ServerProcess, start_server_process, stop_server_process
from tests.support.certs import make_pki

INFER = "infer-token-5d1c0e7b"
ADMIN = "admin-token-a93f6b20"
LEGACY = "legacy-token-0c77e4d1"
WRONG = "wrong-token-3b8e2f90"
X = [[0.1, 0.2, 0.3, 0.4]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _start(tmp: Path, samples: Path, pki: dict[str, Path], mtls: bool) -> tuple[ServerProcess, int]:
    registry = Registry(tmp / "models")
    registry.add("sample", samples / "sample.onnx")
    (tmp / "infer.token").write_text(INFER + "\n")
    (tmp / "legacy.token").write_text(LEGACY)
    grpc_port = free_port()
    admin_sha = hashlib.sha256(ADMIN.encode()).hexdigest()
    (tmp / "config.toml").write_text(
        f"""
[server]
auth_token_file = "{tmp / "legacy.token"}"
# the tests here send many wrong tokens from one address; test_auth.py tests the limit
auth_failures_per_minute = 1000

[[server.tokens]]
name = "camera"
token_file = "{tmp / "infer.token"}"
scopes = ["infer"]

[[server.tokens]]
name = "ops"
token_sha256 = "{admin_sha}"
scopes = ["admin"]

[grpc]
port = {grpc_port}
"""
    )
    args = ["--config", str(tmp / "config.toml"), "--models", str(registry.root),
            "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
            "--log-level", "debug"]  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    if mtls:
        args += ["--tls-client-ca", str(pki["ca.crt"])]
        ctx.load_cert_chain(pki["client.crt"], pki["client.key"])
    return start_server_process(args, ssl_context=ctx), grpc_port


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, samples: Path, pki: dict[str, Path]
) -> Iterator[tuple[ServerProcess, int]]:
    """HTTPS and gRPC over TLS, three tokens: camera (infer), ops (admin), the legacy one."""
    server, grpc_port = _start(tmp_path_factory.mktemp("tls"), samples, pki, mtls=False)
    yield server, grpc_port
    stop_server_process(server)


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, samples: Path, pki: dict[str, Path]
) -> Iterator[tuple[ServerProcess, int]]:
    server, grpc_port = _start(tmp_path_factory.mktemp("mtls"), samples, pki, mtls=True)
    yield server, grpc_port
    stop_server_process(server)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _input(kind: Any) -> Any:
    x = kind.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.array(X, np.float32))
    return x


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(exc.value.status())


# -- HTTP ----------------------------------------------------------------------------------------
def test_tritonclient_http_over_https_with_scoped_tokens(tls_server, pki):
    server, _ = tls_server
    c = httpclient.InferenceServerClient(
        f"localhost:{server.port}", ssl=True, ssl_options={"ca_certs": str(pki["ca.crt"])}
    )
    try:
        assert c.is_server_live()  # public
        for token in (INFER, ADMIN, LEGACY):
            r = c.infer("sample", [_input(httpclient)], headers=_bearer(token))
            assert r.as_numpy("label").shape == (1,)
        for headers in (None, _bearer(WRONG), {"Authorization": INFER}):
            with pytest.raises(InferenceServerException) as exc:
                c.infer("sample", [_input(httpclient)], headers=headers)
            assert _status(exc) == "401"
        # an infer token is refused on the repository routes; the admin tokens are not
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_repository_index(headers=_bearer(INFER))
        assert _status(exc) == "403" and "'camera' lacks the 'admin' scope" in str(exc.value)
        with pytest.raises(InferenceServerException) as exc:
            c.load_model("sample", headers=_bearer(INFER))
        assert _status(exc) == "403"
        for token in (ADMIN, LEGACY):
            index = c.get_model_repository_index(headers=_bearer(token))
            assert [m["name"] for m in index] == ["sample"]
        c.load_model("sample", headers=_bearer(ADMIN))
        assert c.is_model_ready("sample", headers=_bearer(INFER))
    finally:
        c.close()


def _https(server: ServerProcess, pki: dict[str, Path]) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    return http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=10)


def test_fast_path_and_aiohttp_share_the_tls_connection(tls_server, pki):
    """Both servers answer over one kept-alive TLS connection: infer from the fast path (no
    aiohttp Server header), metadata from aiohttp; a body spread over many TLS records."""
    server, _ = tls_server
    conn = _https(server, pki)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "data": X}]})  # fmt: skip
    padded = body[:-1] + " " * 300_000 + "}"  # about 18 TLS records of 16 KiB
    answered_by = []
    for method, path, payload in (
        ("POST", "/v2/models/sample/infer", body),
        ("GET", "/v2/models/sample", None),
        ("POST", "/v2/models/sample/infer", padded),
        ("POST", "/v2/repository/index", ""),
    ):
        conn.request(method, path, body=payload, headers=_bearer(INFER))
        r = conn.getresponse()
        data = r.read()
        answered_by.append((r.status, r.getheader("Server", "fast path").split("/")[0]))
        if r.status == 200 and path.endswith("/infer"):
            assert "label" in [o["name"] for o in json.loads(data)["outputs"]]
    conn.close()
    assert answered_by == [
        (200, "fast path"), (200, "Python"), (200, "fast path"), (403, "Python")
    ]  # fmt: skip


def test_openai_client_over_https(tls_server, pki):
    server, _ = tls_server
    base = f"https://localhost:{server.port}/v1"
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    with openai.DefaultHttpxClient(verify=ctx) as http:
        client = openai.OpenAI(base_url=base, api_key=INFER, http_client=http, max_retries=0)
        assert [m.id for m in client.models.list()] == []  # sample is no text model
        with pytest.raises(openai.NotFoundError) as exc:  # an OpenAI error, read over TLS
            client.models.retrieve("sample")
        assert exc.value.status_code == 404 and "sample" in exc.value.message
        wrong = openai.OpenAI(base_url=base, api_key=WRONG, http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_websocket_over_tls(tls_server, pki):
    server, _ = tls_server
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    url = f"wss://localhost:{server.port}/v2/models/sample/stream"
    message = {"id": "w1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                       "data": X}]}  # fmt: skip

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url, ssl=ctx)
            assert info.value.status == 401
            async with session.ws_connect(url, ssl=ctx, headers=_bearer(INFER)) as ws:
                await ws.send_json(message)
                assert (await ws.receive_json())["id"] == "w1"

    asyncio.run(run())


def _handshake(port: int, pki: dict[str, Path], version: ssl.TLSVersion,
               ciphers: str | None = None) -> str:  # fmt: skip
    """Connect with exactly one TLS version (and these TLS 1.2 suites): the version agreed."""
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    ctx.minimum_version = ctx.maximum_version = version
    # lower the client's own floor, so a refusal comes from the server, not from this client
    ctx.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return str(tls.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("front", ["http", "grpc"])
def test_tls_1_2_or_later_with_aead_suites_only(tls_server, pki, front):
    server, grpc_port = tls_server
    port = server.port if front == "http" else grpc_port
    assert _handshake(port, pki, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert _handshake(port, pki, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    gcm = "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert _handshake(port, pki, ssl.TLSVersion.TLSv1_2, gcm) == "TLSv1.2"
    for version, ciphers in (
        (ssl.TLSVersion.TLSv1_1, None),
        (ssl.TLSVersion.TLSv1, None),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA"),  # CBC
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384"),  # CBC
    ):
        with pytest.raises(ssl.SSLError):  # an alert, or the connection closed mid-handshake
            _handshake(port, pki, version, ciphers)
    # plain text to the TLS port gets no answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b'"live"' not in raw.recv(4096)


# -- gRPC ----------------------------------------------------------------------------------------
def test_tritonclient_grpc_over_tls_with_scoped_tokens(tls_server, pki):
    _, port = tls_server
    c = grpcclient.InferenceServerClient(
        f"localhost:{port}", ssl=True, root_certificates=str(pki["ca.crt"])
    )
    try:
        assert c.is_server_live()
        r = c.infer("sample", [_input(grpcclient)], headers={"authorization": f"Bearer {INFER}"})
        assert r.as_numpy("label").shape == (1,)
        with pytest.raises(InferenceServerException) as exc:
            c.infer("sample", [_input(grpcclient)], headers={"authorization": f"Bearer {WRONG}"})
        assert _status(exc) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_repository_index(headers={"authorization": f"Bearer {INFER}"})
        assert _status(exc) == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as exc:
            c.unload_model("sample", headers={"authorization": f"Bearer {INFER}"})
        assert _status(exc) == "StatusCode.PERMISSION_DENIED"
        index = c.get_model_repository_index(headers={"authorization": f"Bearer {ADMIN}"})
        assert [m.name for m in index.models] == ["sample"]
    finally:
        c.close()
    # plaintext gRPC to the TLS port fails
    plain = grpcclient.InferenceServerClient(f"localhost:{port}")
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live()
    finally:
        plain.close()


def test_no_token_is_ever_logged(tls_server, pki):
    """Requests with valid, wrong and scheme-less tokens on the fast path and aiohttp (besides
    whatever the tests above sent), at debug level: the access log names each token that
    called, and holds no token."""
    server, _ = tls_server
    conn = _https(server, pki)
    sent = [_bearer(t) for t in (INFER, ADMIN, LEGACY, WRONG)] + [{"Authorization": INFER}]
    for headers in sent:
        for method, path in (("POST", "/v2/models/sample/infer"), ("GET", "/v2/models/sample")):
            body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                           "shape": [1, 4], "data": X}]})  # fmt: skip
            conn.request(method, path, body=body if method == "POST" else None, headers=headers)
            conn.getresponse().read()
    conn.close()
    names = ("camera", "ops", "auth_token")
    deadline = time.monotonic() + 10  # the access log is written after the answer
    while time.monotonic() < deadline:
        log = "".join(server.lines)
        if all(f'"token_name":"{name}"' in log for name in names):
            break
        time.sleep(0.05)
    assert all(f'"token_name":"{name}"' in log for name in names)  # who called, by name
    for secret in (INFER, ADMIN, LEGACY, WRONG):
        assert secret not in log


# -- mutual TLS ----------------------------------------------------------------------------------
def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server, pki):
    server, grpc_port = mtls_server
    ca = str(pki["ca.crt"])
    url = f"localhost:{server.port}"
    good = {"ca_certs": ca, "certfile": str(pki["client.crt"]), "keyfile": str(pki["client.key"])}
    c = httpclient.InferenceServerClient(url, ssl=True, ssl_options=good)
    try:
        r = c.infer("sample", [_input(httpclient)], headers=_bearer(INFER))
        assert r.as_numpy("label").shape == (1,)
    finally:
        c.close()
    stranger = {**good, "certfile": str(pki["stranger.crt"]), "keyfile": str(pki["stranger.key"])}
    for options in ({"ca_certs": ca}, stranger):
        c = httpclient.InferenceServerClient(url, ssl=True, ssl_options=options)
        try:
            with pytest.raises(Exception, match=r"closed|SSL|reset"):  # refused in the TLS layer
                c.is_server_live()
        finally:
            c.close()
    # at the TLS layer: a trusted client is answered; without a certificate, or with one of
    # another CA, the server ends the connection (TLS 1.3 lets the client finish its side of
    # the handshake first; asyncio closes without sending the alert)
    for pair, answered in (("client", True), (None, False), ("stranger", False)):
        ctx = ssl.create_default_context(cafile=ca)
        if pair is not None:
            ctx.load_cert_chain(pki[f"{pair}.crt"], pki[f"{pair}.key"])
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                got = tls.recv(4096)
            except (ssl.SSLError, ConnectionResetError):
                got = b""
            assert got.startswith(b"HTTP/1.1 200") == answered, (pair, got)
            assert answered or got == b""
    # gRPC takes the same certificates: a client certificate from the CA, or no connection
    secure: dict[str, Any] = {"ssl": True, "root_certificates": ca}
    c = grpcclient.InferenceServerClient(
        f"localhost:{grpc_port}", **secure, private_key=str(pki["client.key"]),
        certificate_chain=str(pki["client.crt"]),
    )  # fmt: skip
    try:
        assert c.is_server_live()
    finally:
        c.close()
    for extra in ({}, {"private_key": str(pki["stranger.key"]),
                       "certificate_chain": str(pki["stranger.crt"])}):  # fmt: skip
        c = grpcclient.InferenceServerClient(f"localhost:{grpc_port}", **secure, **extra)
        try:
            with pytest.raises(InferenceServerException) as info:
                c.is_server_live(client_timeout=10)
            assert "UNAVAILABLE" in _status(info)
        finally:
            c.close()
