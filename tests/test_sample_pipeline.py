"""The sample pipeline served end to end: detect_classify through tritonclient and MQTT.

Needs the pipelines layer (appliance/pipelines/served.py) and the built-in steps it declares
(image, nms, crop, argmax_label); until those are in the tree the tests skip, saying which is
missing. Pictures are made fresh here (seeds the build never uses, sizes other than the
detector's); the expected answer is the same models run by onnxruntime with the declared steps
done by hand (Pillow and numpy, tests/test_sample_detector.py): boxes and scores equal, labels
and counts equal, and equal to the pictures' ground truth. A picture with no square gives an
empty answer (shapes [0, 4], [0], [0]), not an error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from appliance.registry import Registry
from tests.api.test_mqtt import DEVICE, body, mqtt_settings, peers  # noqa: F401
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401
from tests.test_sample_detector import ROOT, crop, decode, detect, label_of, match, png_of

for _module in ("pipelines.served", "steps.image", "steps.nms", "steps.crop", "steps.label"):
    pytest.importorskip(f"appliance.{_module}", reason=f"appliance.{_module} is not in this tree")

import make_sample_pictures as pictures  # noqa: E402
import make_sample_pipeline as sample  # noqa: E402

NAME = "detect_classify"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample-pipeline")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_pipeline.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def store(tmp_path: Path, built: Path) -> Registry:
    """Overrides the sample store: the two models of the pipeline (what `make samples` adds)."""
    registry = Registry(tmp_path / "models")
    for name in sample.MODELS:
        registry.add(name, built / f"{name}.onnx")
    return registry


def _config(built: Path) -> dict[str, Any]:
    return {"pipelines": {NAME: {"file": str(built / sample.PIPELINE_FILE)}}}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pictures() -> list[tuple[bytes, list[pictures.Square], tuple[float, float]]]:
    """(encoded picture, its squares, scale to the detector's 128x128) never seen by the build."""
    rng = np.random.default_rng(2026)
    out = []
    for width, height, n, sizes in [
        (128, 128, 3, (12, 48)),
        (128, 128, 0, (12, 48)),
        (256, 192, 4, (28, 90)),
        (160, 160, 5, (16, 56)),
        (96, 128, 1, (10, 36)),
    ]:
        scale = (sample.SIZE / width, sample.SIZE / height)
        gap = round(4 / min(scale))
        img, truth = pictures.picture(rng, width, height, n, sizes, gap)
        out.append((png_of(img), truth, scale))
    black = Image.new("RGB", (200, 150))
    out.append((png_of(black), [], (sample.SIZE / 200, sample.SIZE / 150)))
    return out


def by_hand(
    built: Path, png: bytes
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]]:
    """The declared steps by hand around the same two models."""
    detector = _session(built / "squares_detector.onnx")
    classifier = _session(built / "color_classifier.onnx")
    found, scores, _ = detect(detector, png)
    if not len(found):
        return found.reshape(0, 4), scores, []
    image = decode(png)
    labels = label_of(classifier, np.concatenate([crop(image, b) for b in found]))
    return found, scores, labels


def _check(
    answer: dict[str, np.ndarray[Any, Any]],
    expected: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]],
    truth: list[pictures.Square],
    scale: tuple[float, float],
) -> None:
    boxes, scores, labels = expected
    assert answer["boxes"].shape == (len(truth), 4)
    assert answer["scores"].shape == answer["labels"].shape == (len(truth),)
    np.testing.assert_allclose(answer["boxes"], boxes, atol=1e-3)
    np.testing.assert_allclose(answer["scores"], scores, atol=1e-5)
    got = [v.decode() if isinstance(v, bytes) else str(v) for v in answer["labels"].tolist()]
    assert got == labels
    order = match(answer["boxes"], truth, scale)
    assert [got[j] for j in order] == [s.label for s in truth]


def _triton(url: str, pngs: list[bytes], binary: bool) -> list[dict[str, Any]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        meta = client.get_model_metadata(NAME)
        answers = []
        for png in pngs:
            i = httpclient.InferInput("image", [1], "BYTES")
            # in JSON (no binary extension) a BYTES element is text: base64 of the picture
            item = png if binary else base64.b64encode(png)
            i.set_data_from_numpy(np.array([item], dtype=object), binary_data=binary)
            result = client.infer(NAME, [i])
            answers.append({o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]})
        return [meta, *answers]
    finally:
        client.close()


async def test_tritonclient_answers_like_the_models_by_hand(serve, built: Path) -> None:
    client = await serve(_config(built))
    cases = _pictures()
    url = f"127.0.0.1:{client.server.port}"
    for binary in (True, False):
        meta, *answers = await asyncio.to_thread(_triton, url, [c[0] for c in cases], binary)
        assert [i["name"] for i in meta["inputs"]] == ["image"]
        assert {o["name"] for o in meta["outputs"]} == {"boxes", "scores", "labels"}
        for (png, truth, scale), answer in zip(cases, answers, strict=True):
            _check(answer, by_hand(built, png), truth, scale)


def _tensors(reply: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    out = {}
    for o in reply["outputs"]:
        data = np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else None)
        out[o["name"]] = data.reshape(o["shape"])
    return out


async def test_mqtt_answers_like_the_models_by_hand(mosquitto, serve, peers, built: Path) -> None:  # noqa: F811
    await serve({**_config(built), **mqtt_settings(mosquitto)})
    peer = peers(mosquitto)
    replies = await peer.ready()
    for k, (png, truth, scale) in enumerate(_pictures()):
        request = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(png).decode()],
                }
            ]
        }
        corr = f"json-{k}".encode()
        peer.publish(
            f"appliance/{DEVICE}/infer/{NAME}",
            body(request),
            response_topic=replies,
            correlation=corr,
        )
        reply = await peer.reply(replies, corr)
        assert reply.status == 200, reply.payload[:300]
        _check(_tensors(reply.json()), by_hand(built, png), truth, scale)
        # the picture itself as the raw payload of the pipeline's one input
        corr = f"raw-{k}".encode()
        peer.publish(
            f"appliance/{DEVICE}/infer/{NAME}/raw", png, response_topic=replies, correlation=corr
        )
        reply = await peer.reply(replies, corr)
        assert reply.status == 200, reply.payload[:300]
        _check(_tensors(reply.json()), by_hand(built, png), truth, scale)


async def test_a_picture_that_is_not_one_is_a_400_naming_it(serve, built: Path) -> None:
    client = await serve(_config(built))
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    r = await client.post(f"/v2/models/{NAME}/infer", json=request)
    assert r.status == 400
    assert "decode" in (await r.json())["error"]


def test_pictures_are_encoded_like_a_camera_would(built: Path) -> None:
    """A JPEG goes through the same steps: the detector still finds every square."""
    rng = np.random.default_rng(31)
    img, truth = pictures.picture(rng, 128, 128, 4)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    found, _, _ = detect(_session(built / "squares_detector.onnx"), buf.getvalue())
    match(found, truth, (1.0, 1.0))
    assert len(found) == len(truth)
