"""Scoped tokens and the failed-attempt limit (api/auth.py): the checks themselves, their
config, the route table's scopes, and the limit shared by the aiohttp routes, the fast path
and gRPC of one real server."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from appliance.api.auth import Auth, FailureLimit, Token, client_address, from_config
from appliance.api.http import SCOPES
from appliance.api.routes import KSERVE, OPENAI, STATUS, SYNC
from appliance.api.tls import server_context
from appliance.config import load_config
from appliance.errors import ConfigError, Forbidden, TooManyAttempts, Unauthorized

INFER = "infer-secret-71c2"
ADMIN = "admin-secret-0b9d"
BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = [
    {"name": "camera", "token_sha256": _sha(INFER), "scopes": ["infer"]},
    {"name": "ops", "token_sha256": _sha(ADMIN), "scopes": ["admin"]},
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the checks ----------------------------------------------------------------------------------
def test_scopes_admin_implies_infer_and_public_needs_nothing():
    auth = Auth([Token.of("camera", INFER, ["infer"]), Token.of("ops", ADMIN, ["admin"])])
    assert auth.check(f"Bearer {INFER}", "infer", "10.0.0.1") == "camera"
    assert auth.check(f"bearer  {ADMIN} ", "admin", "10.0.0.1") == "ops"
    assert auth.check(f"Bearer {ADMIN}", "infer", "10.0.0.1") == "ops"
    assert auth.check(None, "public", "10.0.0.1") is None
    with pytest.raises(Forbidden, match="'camera' lacks the 'admin' scope"):
        auth.check(f"Bearer {INFER}", "admin", "10.0.0.1")
    for header in (None, "", "Bearer", f"Basic {INFER}", INFER, f"Bearer {INFER}x"):
        with pytest.raises(Unauthorized) as exc:
            auth.check(header, "infer", f"10.0.0.{len(header or '')}")
        assert INFER not in exc.value.message
    assert Auth([]).check(None, "admin", None) is None  # no tokens: auth is off


def test_failed_attempts_are_limited_per_address_in_a_sliding_window():
    clock = Clock()
    limit = FailureLimit(3, window_s=60, clock=clock)
    for _ in range(3):
        assert limit.retry_after("a") is None
        limit.failed("a")
        clock.now += 10
    assert limit.retry_after("a") == pytest.approx(30)  # the first failure leaves at 1060
    assert limit.retry_after("b") is None  # another address is not affected
    clock.now += 30
    assert limit.retry_after("a") is None
    limit.failed("a")  # the window slides: 1010, 1020 and now 1060 are in it
    assert limit.retry_after("a") == pytest.approx(10)


def test_failure_memory_is_bounded():
    clock = Clock()
    limit = FailureLimit(2, max_clients=100, clock=clock)
    for i in range(10_000):
        limit.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limit) == 100
    limit.failed("x")
    limit.failed("x")
    assert limit.retry_after("x") is not None


def test_a_blocked_address_is_refused_even_with_a_good_token():
    clock = Clock()
    auth = Auth([Token.of("camera", INFER, ["infer"])], failures_per_minute=2)
    auth.limit._clock = clock
    for _ in range(2):
        with pytest.raises(Unauthorized):
            auth.check("Bearer nope", "infer", "10.0.0.9")
    with pytest.raises(TooManyAttempts) as exc:
        auth.check(f"Bearer {INFER}", "infer", "10.0.0.9")
    assert exc.value.status == 429 and exc.value.retry_after == pytest.approx(60)
    assert auth.check(f"Bearer {INFER}", "infer", "10.0.0.10") == "camera"
    clock.now += 61
    assert auth.check(f"Bearer {INFER}", "infer", "10.0.0.9") == "camera"


def test_grpc_peer_addresses():
    assert client_address("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert client_address("ipv6:[::1]:5123") == "::1"
    assert client_address("unix:/tmp/s") == "unix:/tmp/s"
    assert client_address(None) is None


# -- config --------------------------------------------------------------------------------------
def test_tokens_config(tmp_path: Path):
    secret = tmp_path / "camera.token"
    secret.write_text(INFER + "\n")
    config = load_config(
        None,
        {"server": {"auth_token": ADMIN, "tokens": [
            {"name": "camera", "token_file": str(secret)},  # infer by default
            {"name": "ci", "token_sha256": _sha("ci-secret").upper(), "scopes": ["admin"]},
        ]}},
        {},
    )  # fmt: skip
    auth = from_config(config)
    assert [t.name for t in auth.tokens] == ["auth_token", "camera", "ci"]
    assert auth.check(f"Bearer {ADMIN}", "admin", "a") == "auth_token"  # the legacy token
    assert auth.check(f"Bearer {INFER}", "infer", "a") == "camera"
    assert auth.check("Bearer ci-secret", "admin", "a") == "ci"
    assert load_config(None, {}, {}).server.auth_failures_per_minute == 10


def test_tokens_file(tmp_path: Path):
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[tokens]]\nname = "ops"\ntoken_sha256 = "{_sha(ADMIN)}"\nscopes = ["admin"]\n'
    )
    inline = [{"name": "camera", "token_sha256": _sha(INFER)}]
    server = {"tokens": inline, "tokens_file": str(path)}
    auth = from_config(load_config(None, {"server": server}, {}))
    assert [t.name for t in auth.tokens] == ["camera", "ops"]
    assert auth.check(f"Bearer {ADMIN}", "admin", "a") == "ops"
    path.write_text('[[tokens]]\nname = "camera"\ntoken_file = "/x"\n')
    with pytest.raises(ConfigError, match="'camera' is used twice"):
        from_config(load_config(None, {"server": server}, {}))
    path.write_text('[[tokens]]\nname = "x"\ntoken_sha256 = "00"\n')
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.token_sha256 = '00': must be 64"):
        from_config(load_config(None, {"server": server}, {}))
    path.write_text('token = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'token'"):
        from_config(load_config(None, {"server": server}, {}))
    path.unlink()
    with pytest.raises(ConfigError, match=r"tokens_file = .*cannot read"):
        from_config(load_config(None, {"server": server}, {}))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a"}, r"tokens\[0\]\.token_file = '': give exactly one"),
        ({"name": "a", "token_file": "/x", "token_sha256": "0" * 64}, "exactly one"),
        ({"name": "a", "token_sha256": "abc"}, "64 hexadecimal digits"),
        ({"name": "", "token_file": "/x"}, r"name = '': must not be empty"),
        ({"name": "a", "token_file": "/x", "scopes": ["root"]}, r"scopes\[0\] = 'root'"),
        ({"name": "a", "token_file": "/x", "scopes": []}, "at least one scope"),
        ({"name": "a", "token_file": "/x", "secret": "x"}, "unknown key"),
    ],
)
def test_bad_token_entries_are_refused_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"server": {"tokens": [entry]}}, {})


def test_other_config_errors(tmp_path: Path):
    two = [{"name": "a", "token_file": "/x"}, {"name": "a", "token_file": "/y"}]
    with pytest.raises(ConfigError, match=r"tokens\[1\]\.name = 'a': is used twice"):
        load_config(None, {"server": {"tokens": two}}, {})
    with pytest.raises(ConfigError, match=r"server\.tls_key = '': TLS needs both"):
        load_config(None, {"server": {"tls_cert": "/c.pem"}}, {})
    with pytest.raises(ConfigError, match=r"server\.tls_client_ca = '/ca.pem': client cert"):
        load_config(None, {"server": {"tls_client_ca": "/ca.pem"}}, {})
    with pytest.raises(ConfigError, match="auth_failures_per_minute = 0"):
        load_config(None, {"server": {"auth_failures_per_minute": 0}}, {})
    missing = {"server": {"tokens": [{"name": "a", "token_file": str(tmp_path / "none")}]}}
    with pytest.raises(ConfigError, match=r"tokens\['a'\]\.token_file = .*cannot read"):
        from_config(load_config(None, missing, {}))
    (tmp_path / "empty").write_text("\n")
    empty = {"server": {"tokens": [{"name": "a", "token_file": str(tmp_path / "empty")}]}}
    with pytest.raises(ConfigError, match="the file is empty"):
        from_config(load_config(None, empty, {}))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a usable certificate"):
        server_context(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem"))
    with pytest.raises(ConfigError, match="no such file"):
        server_context(str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"))


# -- the route table -----------------------------------------------------------------------------
async def test_every_route_declares_its_scope(serve):
    client = await serve()
    paths = {r.resource.canonical for r in client.app.router.routes() if r.resource is not None}
    assert paths == set(SCOPES) - {"/v2/sync"}  # added with a hub only
    assert {r.path for r in (*KSERVE, *OPENAI, *SYNC, *STATUS) if r.scope == "admin"} == {
        "/v2/sync",
        "/api/status",
        "/api/models/{name}",
        "/api/models/{name}/activate",
        "/api/models/{name}/rollback",
        "/v2/repository/index",
        "/v2/repository/models/{name}/load",
        "/v2/repository/models/{name}/unload",
        "/v2/trace/setting",
        "/v2/models/{name}/trace/setting",
    }
    assert {r.path for r in (*KSERVE, *STATUS) if r.scope == "public"} == {
        "/v2/health/live",
        "/v2/health/ready",
        "/openapi.json",  # names no model or setting (api/openapi.py)
        "/",  # the status page and its files: what they show comes with a token
        "/ui/{path:.+}",
    }


async def test_scopes_on_the_aiohttp_routes_and_the_fast_path(serve):
    client = await serve({"server": {"tokens": TOKENS}})
    infer, admin = ({"Authorization": f"Bearer {t}"} for t in (INFER, ADMIN))
    for path in ("/v2/repository/index", "/v2/repository/models/sample/unload"):
        r = await client.post(path, headers=infer)
        assert r.status == 403, path
        assert "lacks the 'admin' scope" in (await r.json())["error"]
    for method, path in (("GET", "/v2/trace/setting"), ("POST", "/v2/models/sample/trace/setting")):
        r = await client.request(method, path, headers=infer, json={})
        assert r.status == 403, path
    r = await client.post("/v2/repository/index", headers=admin)
    assert r.status == 200
    r = await client.post("/v2/models/sample/infer", data=BODY, headers=infer)  # fast path
    assert r.status == 200 and "Server" not in r.headers
    r = await client.get("/v2/models/sample", headers=infer)  # aiohttp
    assert r.status == 200 and "Server" in r.headers
    r = await client.get("/no/such/route", headers=infer)
    assert r.status == 404  # an infer token learns it is no route, nothing more
    r = await client.get("/v1/models", headers=infer)
    assert r.status == 200
    r = await client.get("/v1/models")
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_failed_attempts_are_counted_across_fronts_then_429(serve):
    """Three wrong tokens (aiohttp route, fast path, gRPC): then every front answers 429 with
    Retry-After, the right token included; health still answers."""
    port = _free_port()
    client = await serve(
        {"server": {"tokens": TOKENS, "auth_failures_per_minute": 3}, "grpc": {"port": port}}
    )
    wrong = {"Authorization": "Bearer nope"}
    r = await client.get("/v2/models/sample", headers=wrong)
    assert r.status == 401
    r = await client.post("/v2/models/sample/infer", data=BODY, headers=wrong)
    assert r.status == 401
    x = aioclient.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        with pytest.raises(InferenceServerException) as exc:
            await c.infer("sample", [x], headers={"authorization": "Bearer nope"})
        assert str(exc.value.status()) == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {ADMIN}"}
        with pytest.raises(InferenceServerException) as exc:
            await c.infer("sample", [x], headers=good)
        assert str(exc.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "too many failed authentication attempts" in str(exc.value)
        assert await c.is_server_live()  # health needs no token, so nothing to limit
    good_http = {"Authorization": f"Bearer {ADMIN}"}
    for method, path, body in (
        ("POST", "/v2/models/sample/infer", BODY),  # fast path
        ("GET", "/v2/models/sample", None),  # aiohttp
        ("GET", "/v1/models", None),  # OpenAI shape
    ):
        r = await client.request(method, path, data=body, headers=good_http)
        assert r.status == 429, path
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert (await client.get("/v2/health/live")).status == 200
    r = await client.get("/v1/models", headers=good_http)
    assert (await r.json())["error"]["type"] == "rate_limit_error"
