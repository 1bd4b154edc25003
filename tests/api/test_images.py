"""Pictures sent as they are, over real HTTP and a real mosquitto broker, to the TFLite image
classifier: every way of sending gives the top-k of the declared pre-processing done by hand
and LiteRT run directly."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import FormData
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.api.test_mqtt import DEVICE, mqtt_settings
from tests.api.test_mqtt import peers as peers
from tests.conftest import ClientFactory
from tests.support.images import (
    CLASSIFIER_PRE,
    LABELS,
    by_hand,
    encode,
    litert,
    picture,
    top_k_by_hand,
)
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

INFER = "/v2/models/classifier/infer"


def expected(models: Path, images: list[bytes], k: int) -> tuple[list[list[str]], Any]:
    """Top-k labels and scores: the declared steps by hand, then LiteRT directly."""
    batch = np.stack([by_hand(data, CLASSIFIER_PRE) for data in images])
    (logits,) = litert(models / "tfl_classifier.tflite", [batch])
    return top_k_by_hand(logits, k)


def answer(body: dict[str, Any]) -> tuple[list[list[str]], Any, dict[str, Any]]:
    """(labels, scores, every output by name) from a KServe v2 JSON response."""
    outs = {o["name"]: o for o in body["outputs"]}
    labels = outs["top_k_labels"]
    n, k = labels["shape"]
    names = [labels["data"][i * k : (i + 1) * k] for i in range(n)]
    scores = np.array(outs["top_k_scores"]["data"], np.float64).reshape(n, k)
    return names, scores, outs


def pictures() -> list[tuple[str, bytes]]:
    """Several real pictures of differing sizes; one class each is not guaranteed, so they are
    chosen by seed to give at least two different best classes."""
    return [
        ("image/jpeg", encode(picture(64, 48, 1), "JPEG", quality=90)),
        ("image/png", encode(picture(40, 90, 2), "PNG")),
        ("image/jpeg", encode(picture(33, 33, 3), "JPEG")),
    ]


@pytest.fixture
async def client(serve: ClientFactory, image_store: Registry) -> Any:
    return await serve(sources=sources_from_store(image_store.root))


async def test_pictures_differ_in_their_answers(tflite_models: Path) -> None:
    """Guards the other tests: the sample pictures do not all land on one class."""
    labels, _ = expected(tflite_models, [data for _, data in pictures()], 1)
    assert len({row[0] for row in labels}) >= 2


async def test_metadata_shows_the_declarations(client: Any) -> None:
    meta = await (await client.get("/v2/models/classifier")).json()
    params = meta["parameters"]
    assert params["preprocess"]["resize"] == "shorter_side"
    assert params["preprocess"]["size"] == [32, 32]
    assert params["preprocess"]["content_types"] == ["image/jpeg", "image/jpg", "image/png"]
    assert params["postprocess"]["labels"] == list(LABELS)


@pytest.mark.parametrize("k", [1, 3])
async def test_image_body(client: Any, tflite_models: Path, k: int) -> None:
    for ctype, data in pictures():
        r = await client.post(f"{INFER}?top_k={k}", data=data, headers={"Content-Type": ctype})
        assert r.status == 200, await r.text()
        names, scores, outs = answer(await r.json())
        want_names, want_scores = expected(tflite_models, [data], k)
        assert names == want_names
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
        assert outs["logits"]["shape"] == [1, 10]  # the model's own output comes back too
        assert outs["top_k_indices"]["data"] == [LABELS.index(x) for x in names[0]]


async def test_without_top_k_the_answer_is_the_plain_v2_response(client: Any) -> None:
    ctype, data = pictures()[0]
    r = await client.post(INFER, data=data, headers={"Content-Type": ctype})
    assert r.status == 200
    assert [o["name"] for o in (await r.json())["outputs"]] == ["logits"]


async def test_multipart_batch(client: Any, tflite_models: Path) -> None:
    form = FormData()
    for i, (ctype, data) in enumerate(pictures()):
        form.add_field("image", data, filename=f"p{i}", content_type=ctype)
    form.add_field("top_k", "2")
    r = await client.post(INFER, data=form)
    assert r.status == 200, await r.text()
    names, scores, _ = answer(await r.json())
    want_names, want_scores = expected(tflite_models, [d for _, d in pictures()], 2)
    assert names == want_names
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


async def test_v2_bytes_input_json_base64_and_binary(client: Any, tflite_models: Path) -> None:
    images = [data for _, data in pictures()]
    want_names, _ = expected(tflite_models, images, 3)
    as_json = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(images)],
                "data": [base64.b64encode(d).decode() for d in images],
            }
        ],
        "parameters": {"top_k": 3},
    }
    r = await client.post(INFER, data=orjson.dumps(as_json))
    assert r.status == 200, await r.text()
    assert answer(await r.json())[0] == want_names
    # The binary tensor extension: raw image bytes, each with its 4-byte length.
    blob = b"".join(struct.pack("<I", len(d)) + d for d in images)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(images)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": "top_k_labels"}],
            "parameters": {"top_k": 3},
        }
    )
    r = await client.post(
        INFER, data=head + blob, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert r.status == 200, await r.text()
    body = await r.json()
    # Only what was asked for: the labels, not the logits the classification needed.
    assert [o["name"] for o in body["outputs"]] == ["top_k_labels"]
    labels = body["outputs"][0]
    assert [labels["data"][i * 3 : i * 3 + 3] for i in range(len(images))] == want_names


async def test_a_tensor_still_works_and_images_need_a_declaration(client: Any) -> None:
    batch = np.zeros((1, 32, 32, 3), np.float32)
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 32, 32, 3],
                "data": batch.ravel().tolist(),
            }
        ]
    }
    r = await client.post(INFER + "?top_k=2", data=orjson.dumps(body))
    assert r.status == 200
    _, data = pictures()[0]
    r = await client.post(
        "/v2/models/tfl_float/infer", data=data, headers={"Content-Type": "image/jpeg"}
    )
    assert r.status == 415
    assert "declares no image pre-processing" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("ctype", "body", "status", "message"),
    [
        ("image/png", "jpeg", 415, "Content-Type says image/png but the data is a JPEG image"),
        ("image/gif", "jpeg", 415, "Content-Type image/gif is not an image type"),
        ("image/jpeg", "half", 400, "corrupt or truncated JPEG image"),
        ("image/jpeg", "junk", 400, "not a JPEG or PNG image"),
    ],
)
async def test_bad_images_are_4xx_and_the_server_keeps_serving(
    client: Any, ctype: str, body: str, status: int, message: str
) -> None:
    _, jpeg = pictures()[0]
    data = {"jpeg": jpeg, "half": jpeg[: len(jpeg) // 2], "junk": b"hello world"}[body]
    r = await client.post(INFER, data=data, headers={"Content-Type": ctype})
    assert r.status == status
    assert message in (await r.json())["error"]
    r = await client.post(INFER, data=jpeg, headers={"Content-Type": "image/jpeg"})
    assert r.status == 200


async def test_bad_requests_around_images(client: Any) -> None:
    _, jpeg = pictures()[0]
    form = FormData(default_to_multipart=True)
    form.add_field("top_k", "2")
    r = await client.post(INFER, data=form)
    assert r.status == 400
    assert "holds no image" in (await r.json())["error"]
    form = FormData()
    form.add_field("image", jpeg, filename="a.jpg", content_type="image/jpeg")
    form.add_field("colour", "red")
    r = await client.post(INFER, data=form)
    assert r.status == 400
    assert "multipart field 'colour' is neither an image" in (await r.json())["error"]
    for query, message in [
        ("top_k=many", "parameter top_k must be an integer"),
        ("top_k=11", "top_k 11 is more than the model's 10 classes"),
        ("k=1", "unknown parameter 'k'"),
    ]:
        r = await client.post(f"{INFER}?{query}", data=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status == 400, query
        assert message in (await r.json())["error"], query


async def test_image_limits_come_from_the_config(
    serve: ClientFactory, image_store: Registry
) -> None:
    client = await serve(
        {"models": {"classifier": {"image": {"max_pixels": 1000, "max_images": 2}}}},
        sources=sources_from_store(image_store.root),
    )
    big = encode(picture(40, 30, 1), "PNG")
    r = await client.post(INFER, data=big, headers={"Content-Type": "image/png"})
    assert r.status == 400
    assert "40x30 = 1200 pixels, more than the limit of 1000" in (await r.json())["error"]
    small = encode(picture(20, 20, 1), "PNG")
    form = FormData()
    for i in range(3):
        form.add_field("image", small, filename=f"{i}.png", content_type="image/png")
    r = await client.post(INFER, data=form)
    assert r.status == 400
    assert "3 images in one request, more than the limit of 2" in (await r.json())["error"]


# -- MQTT ----------------------------------------------------------------------------------------


async def test_mqtt_raw_image_gives_the_same_top_k_as_http(
    mosquitto: Any, serve: ClientFactory, image_store: Registry, peers: Any, tflite_models: Path
) -> None:
    client = await serve(mqtt_settings(mosquitto), sources=sources_from_store(image_store.root))
    peer = peers(mosquitto)
    replies = await peer.ready()
    for i, (ctype, data) in enumerate(pictures()):
        r = await client.post(f"{INFER}?top_k=3", data=data, headers={"Content-Type": ctype})
        http_answer = await r.json()
        # MQTT 5: the content type and top_k as a user property, on the plain infer topic.
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = replies
        props.CorrelationData = f"img-{i}".encode()
        props.ContentType = ctype
        props.UserProperty = [("top_k", "3"), ("trace", "ignored")]
        peer.client.publish(f"appliance/{DEVICE}/infer/classifier", data, qos=1, properties=props)
        reply = await peer.reply(replies, f"img-{i}".encode())
        assert reply.status == 200, reply.payload
        assert reply.json() == http_answer
        names, _, _ = answer(reply.json())
        assert names == expected(tflite_models, [data], 3)[0]
    # The /raw topic with no content type at all: the model's declaration says it is an image.
    _, data = pictures()[1]
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = replies
    props.CorrelationData = b"raw"
    props.UserProperty = [("top_k", "1")]
    peer.client.publish(f"appliance/{DEVICE}/infer/classifier/raw", data, qos=1, properties=props)
    reply = await peer.reply(replies, b"raw")
    assert answer(reply.json())[0] == expected(tflite_models, [data], 1)[0]
    # A corrupt picture: a 400 reply, and the next one is served.
    peer.publish(
        f"appliance/{DEVICE}/infer/classifier/raw",
        data[:100],
        response_topic=replies,
        correlation=b"bad",
    )
    reply = await peer.reply(replies, b"bad")
    assert reply.status == 400
    assert "corrupt or truncated PNG image" in reply.json()["error"]
    peer.publish(
        f"appliance/{DEVICE}/infer/classifier",
        data,
        response_topic=replies,
        correlation=b"wrong type",
        content_type="image/jpeg",
    )
    reply = await peer.reply(replies, b"wrong type")
    assert reply.status == 415


# -- the same pipeline in front of an ONNX model -------------------------------------------------


def nchw_onnx(path: Path) -> Path:
    """An NCHW classifier: 4x4 average pool over a 3x24x20 picture, then a linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(21)
    w = rng.normal(0, 1, (3 * 6 * 5, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["pixels"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "w"], ["scores"]),
        ],
        "nchw",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, 24, 20])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 6])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


async def test_onnx_model_with_nchw_bgr_pictures(serve: ClientFactory, tmp_path: Path) -> None:
    import onnxruntime as ort

    pre = {"type": "image", "color": "BGR", "layout": "NCHW", "method": "bicubic",
           "scale": 1 / 127.5, "mean": 1.0}  # fmt: skip
    registry = Registry(tmp_path / "onnx-images")
    model = nchw_onnx(tmp_path / "nchw.onnx")
    registry.add("nchw", model, preprocess=pre, postprocess={"type": "classification"})
    client = await serve(sources=sources_from_store(registry.root))
    images = [data for _, data in pictures()]
    form = FormData()
    for i, data in enumerate(images):
        form.add_field("picture", data, filename=f"{i}")
    form.add_field("parameters", '{"top_k": 2}')
    r = await client.post("/v2/models/nchw/infer", data=form)
    assert r.status == 200, await r.text()
    outs = {o["name"]: o for o in (await r.json())["outputs"]}
    assert "top_k_labels" not in outs  # no labels declared
    batch = np.stack([by_hand(d, pre, (24, 20)) for d in images])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"pixels": batch})
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    assert outs["top_k_indices"]["data"] == order.ravel().tolist()
    np.testing.assert_allclose(
        outs["top_k_scores"]["data"], np.take_along_axis(scores, order, 1).ravel(), rtol=1e-5
    )


async def test_quantized_classifier_takes_pictures_as_real_values(
    serve: ClientFactory, tmp_path: Path, tflite_models: Path
) -> None:
    """A uint8-input model (scale 1/255) behind a [0, 1] image declaration: the backend turns
    the real values back into exactly the picture's bytes."""
    registry = Registry(tmp_path / "u8")
    pre = {"type": "image", "resize": "shorter_side", "resize_to": 40, "scale": 1 / 255}
    model = tflite_models / "tfl_classifier_u8.tflite"
    post = {"type": "classification", "softmax": True, "labels": list(LABELS)}
    registry.add("u8", model, preprocess=pre, postprocess=post)
    client = await serve(sources=sources_from_store(registry.root))
    meta = await (await client.get("/v2/models/u8")).json()
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert meta["parameters"]["quantization"]["pixels"]["datatype"] == "UINT8"
    for ctype, data in pictures():
        headers = {"Content-Type": ctype}
        r = await client.post("/v2/models/u8/infer?top_k=3", data=data, headers=headers)
        assert r.status == 200, await r.text()
        names, _, outs = answer(await r.json())
        pixels = by_hand(data, {**pre, "scale": 1.0}).astype(np.uint8)  # the bytes themselves
        (logits,) = litert(model, [pixels[None]])
        np.testing.assert_array_equal(np.array(outs["logits"]["data"], np.float32), logits.ravel())
        assert names == top_k_by_hand(logits, 3)[0]


def test_tritonclient_sends_pictures_as_bytes(image_store: Registry, tflite_models: Path) -> None:
    """tritonclient.http, unchanged: a BYTES input of encoded pictures, binary and JSON."""
    import tritonclient.http as httpclient

    from tests.conftest import start_server_process, stop_server_process

    server = start_server_process(["--models", str(image_store.root)])
    try:
        client = httpclient.InferenceServerClient(server.url)
        images = [data for _, data in pictures()]
        want, _ = expected(tflite_models, images, 2)
        for binary in (True, False):
            items = np.array(
                images if binary else [base64.b64encode(d) for d in images], dtype=np.object_
            )
            picture_input = httpclient.InferInput("image", [len(images)], "BYTES")
            picture_input.set_data_from_numpy(items, binary_data=binary)
            result = client.infer(
                "classifier",
                [picture_input],
                outputs=[httpclient.InferRequestedOutput("top_k_labels")],
                parameters={"top_k": 2},
            )
            labels = result.as_numpy("top_k_labels")
            assert [[x.decode() for x in row] for row in labels] == want, binary
        client.close()
    finally:
        assert stop_server_process(server) == 0
