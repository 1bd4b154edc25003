"""WebSocket streams (GET /v2/models/{name}/stream) through a real server with aiohttp's client
websockets: JSON and binary-framed requests, raw pictures, errors that keep the connection,
limits, auth, and the two queue policies on a model whose runs wait for the test."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from appliance.codec import decode_response
from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.support.gated import GatedBackend
from tests.support.images import encode, picture

X = [1.0, 2.0, 3.0, 4.0]


def v2(rid: str, x: list[float] = X) -> dict[str, Any]:
    return {
        "id": rid,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x}],
    }


def binary_request(rid: str, x: np.ndarray[Any, Any], binary_out: bool) -> bytes:
    head = {
        "id": rid,
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "parameters": {"binary_data_output": binary_out},
    }
    raw = orjson.dumps(head)
    return len(raw).to_bytes(4, "little") + raw + x.astype("<f4").tobytes()


async def metric(client: Any, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("fast_path", [True, False])
async def test_json_messages_answered_in_order_like_http(serve, fast_path):
    client = await serve({"server": {"fast_path": fast_path}})
    http = await (await client.post("/v2/models/sample/infer", json=v2("h"))).json()
    async with client.ws_connect("/v2/models/sample/stream") as ws:
        for i in range(5):
            await ws.send_str(orjson.dumps(v2(f"f{i}")).decode())
        answers = [await ws.receive_json() for _ in range(5)]
    assert [a["id"] for a in answers] == [f"f{i}" for i in range(5)]
    assert all(a["outputs"] == http["outputs"] for a in answers)
    assert answers[0]["model_name"] == "sample" and answers[0]["model_version"] == "1"
    assert await metric(client, 'appliance_ws_messages_total{outcome="success"}') == 5
    assert await metric(client, "appliance_ws_received_total") == 5


async def test_binary_frames_both_ways(serve):
    client = await serve()
    x = np.array([[1, 2, 3, 4]], np.float32)
    want = await (await client.post("/v2/models/sample/infer", json=v2("h"))).json()
    async with client.ws_connect("/v2/models/sample/versions/1/stream") as ws:
        await ws.send_bytes(binary_request("b1", x, binary_out=True))
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY
        n = int.from_bytes(msg.data[:4], "little")
        got = decode_response(msg.data[4:], n)
        assert got.id == "b1"
        for out in want["outputs"]:
            np.testing.assert_allclose(got.outputs[out["name"]].reshape(-1), out["data"], rtol=1e-6)
        await ws.send_bytes(binary_request("b2", x, binary_out=False))
        text = await ws.receive_json()
        assert text["id"] == "b2" and text["outputs"] == want["outputs"]


async def test_a_request_without_id_gets_one(serve):
    client = await serve()
    body = v2("x")
    del body["id"]
    async with client.ws_connect("/v2/models/sample/stream") as ws:
        await ws.send_json(body)
        answer = await ws.receive_json()
    assert re.fullmatch(r"[0-9a-f]{32}", answer["id"])


@pytest.mark.parametrize(
    ("message", "status", "says"),
    [
        ("{nope", 400, "JSON"),
        ('{"id": "e1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], '
         '"data": [1, 2]}]}', 400, "shape"),
        ('{"id": "e2", "inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], '
         '"data": [1, 2, 3, 4]}]}', 400, "nope"),
        (b"\x00\x01", 400, "header length"),
        (b"\xff\xff\x00\x00{}", 400, "header length"),
        (b"\xff\xd8\xff\xe0junk", 415, "image"),
    ],
)  # fmt: skip
async def test_errors_are_answered_and_the_connection_goes_on(serve, message, status, says):
    client = await serve()
    async with client.ws_connect("/v2/models/sample/stream") as ws:
        if isinstance(message, bytes):
            await ws.send_bytes(message)
        else:
            await ws.send_str(message)
        err = await ws.receive_json()
        assert err["status"] == status and says in err["error"], err
        if says in ("shape", "nope"):
            assert err["id"] in ("e1", "e2")
        await ws.send_json(v2("ok"))
        assert (await ws.receive_json())["id"] == "ok"
    assert await metric(client, 'appliance_ws_messages_total{outcome="success"}') == 1


async def test_too_large_a_message_closes_with_1009(serve):
    client = await serve({"websocket": {"max_message_bytes": 1024}})
    async with client.ws_connect("/v2/models/sample/stream") as ws:
        await ws.send_bytes(b"\x00" * 2048)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
    # the server goes on
    async with client.ws_connect("/v2/models/sample/stream") as ws:
        await ws.send_json(v2("after"))
        assert (await ws.receive_json())["id"] == "after"


async def test_upgrade_needs_the_token_a_known_model_and_an_upgrade(serve):
    client = await serve({"server": {"auth_token": "s3cret"}})
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v2/models/sample/stream")
    assert info.value.status == 401
    auth = {"Authorization": "Bearer s3cret", "X-Request-Id": "conn-1"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v2/models/nope/stream", headers=auth)
    assert info.value.status == 404
    r = await client.get("/v2/models/sample/stream", headers=auth)
    assert r.status == 400 and "WebSocket" in (await r.json())["error"]
    async with client.ws_connect("/v2/models/sample/stream", headers=auth) as ws:
        assert ws._response.headers["X-Request-Id"] == "conn-1"
        await ws.send_json(v2("a"))
        assert (await ws.receive_json())["id"] == "a"


async def test_raw_pictures_for_an_image_model(serve, image_store: Registry):
    client = await serve(sources=sources_from_store(image_store.root))
    pictures = [encode(picture(64, 48, 1), "JPEG", quality=90), encode(picture(40, 90, 2), "PNG")]
    want = []
    for data, ctype in zip(pictures, ("image/jpeg", "image/png"), strict=True):
        r = await client.post(
            "/v2/models/classifier/infer", data=data, headers={"Content-Type": ctype}
        )
        want.append((await r.json())["outputs"])
    async with client.ws_connect("/v2/models/classifier/stream") as ws:
        for data in pictures:
            await ws.send_bytes(data)
        got = [await ws.receive_json() for _ in pictures]
    assert [g["outputs"] for g in got] == want


async def _received(client: Any, n: int) -> None:
    for _ in range(500):
        if await metric(client, "appliance_ws_received_total") >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server never read {n} messages")


def gated_request(rid: str) -> dict[str, Any]:
    return {"id": rid, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}


async def test_drop_oldest_reports_what_it_dropped(serve, gated):
    """2 run at once, 3 may wait: of 12 frames sent while the model is stuck, the first 2 run,
    the last 3 wait, and the 7 between are dropped and reported; the rest are answered in
    order."""
    client = await serve(
        {"websocket": {"max_inflight": 2, "queue": 3, "policy": "drop_oldest"}}, sources=gated
    )
    async with client.ws_connect("/v2/models/gated/stream") as ws:
        for i in range(12):
            await ws.send_json(gated_request(f"f{i}"))
        await _received(client, 12)
        GatedBackend.gate.set()
        answered: list[str] = []
        dropped: list[str] = []
        while len(answered) + len(dropped) < 12:
            msg = await ws.receive_json()
            if "dropped" in msg:
                dropped += msg["dropped"]
                assert "queue" in msg["reason"]
            else:
                assert msg["outputs"][0]["data"] == [2.0]
                answered.append(msg["id"])
    assert answered == ["f0", "f1", "f9", "f10", "f11"]
    assert dropped == [f"f{i}" for i in range(2, 9)]
    assert await metric(client, "appliance_ws_dropped_total") == 7


async def test_backpressure_stops_reading_and_drops_nothing(serve, gated):
    client = await serve(
        {"websocket": {"max_inflight": 1, "queue": 2, "policy": "backpressure"}}, sources=gated
    )
    async with client.ws_connect("/v2/models/gated/stream") as ws:
        for i in range(10):
            await ws.send_json(gated_request(f"f{i}"))
        await _received(client, 4)  # 1 running, 2 waiting, 1 held by the reader
        await asyncio.sleep(0.2)
        assert await metric(client, "appliance_ws_received_total") == 4
        GatedBackend.gate.set()
        got = [(await ws.receive_json())["id"] for _ in range(10)]
    assert got == [f"f{i}" for i in range(10)]
    assert await metric(client, "appliance_ws_dropped_total") == 0


async def test_a_flood_stays_bounded(serve, gated):
    """A client sending far faster than a slow model: every frame is answered or reported
    dropped, and the connection never holds more than max_inflight + queue of them."""
    client = await serve({"websocket": {"max_inflight": 1, "queue": 4}}, sources=gated)
    GatedBackend.gate.set()
    GatedBackend.delay = 0.002
    n = 400
    async with client.ws_connect("/v2/models/gated/stream") as ws:
        for i in range(n):
            await ws.send_json(gated_request(f"f{i}"))
        answered: list[int] = []
        dropped: list[str] = []
        while len(answered) + len(dropped) < n:
            msg = await ws.receive_json()
            if "dropped" in msg:
                dropped += msg["dropped"]
            else:
                answered.append(int(msg["id"][1:]))
    assert answered == sorted(answered) and answered[-1] == n - 1
    assert sorted(answered + [int(d[1:]) for d in dropped]) == list(range(n))
    assert dropped  # the model could not keep up
