"""The sample detection pipeline's models, run by onnxruntime on generated pictures.

The pictures come from build/make_sample_pictures.py with their ground truth; the models from
build/make_sample_pipeline.py. The steps the pipeline declares around them (decode and resize,
NMS, crop, argmax) are done here by hand with Pillow and numpy, as a client would, so these
tests say whether the models themselves find and name the squares.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build"))

import make_sample_pictures as pictures  # noqa: E402
import make_sample_pipeline as sample  # noqa: E402

Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline")
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_sample_pipeline.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def detector(built: Path) -> ort.InferenceSession:
    return _session(built / "squares_detector.onnx")


@pytest.fixture(scope="module")
def classifier(built: Path) -> ort.InferenceSession:
    return _session(built / "color_classifier.onnx")


def decode(png: bytes) -> Array:
    """The pipeline's image step by hand: RGB, stretched to 128x128 (bilinear), /255, NCHW."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((sample.SIZE, sample.SIZE), Image.Resampling.BILINEAR)
    a = np.asarray(img).astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def nms(boxes: Array, scores: Array, iou_threshold: float, score_threshold: float) -> Array:
    """Greedy NMS by hand: best score first, drop boxes overlapping a kept one by > IoU."""
    candidates = np.flatnonzero(scores >= score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    keep: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        overlap = iou(boxes[best][None], boxes[rest])[0]
        order = rest[overlap <= iou_threshold]
    return np.array(keep, np.int64)


def iou(a: Array, b: Array) -> Array:
    """IoU of every box in a [N, 4] with every box in b [M, 4] (xyxy)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / (area_a[:, None] + area_b[None, :] - inter))


def detect(detector: ort.InferenceSession, png: bytes) -> tuple[Array, Array, int]:
    """Kept boxes and scores, and how many candidates passed the score threshold."""
    boxes, scores, classes = detector.run(None, {"images": decode(png)})
    assert boxes.shape == (1, scores.shape[1], 4) and boxes.dtype == np.float32
    assert classes.shape == scores.shape and classes.dtype == np.int64
    keep = nms(boxes[0], scores[0], sample.NMS_IOU, sample.NMS_SCORE)
    return boxes[0][keep], scores[0][keep], int((scores[0] >= sample.NMS_SCORE).sum())


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def match(found: Array, truth: list[pictures.Square], scale: tuple[float, float]) -> list[int]:
    """For each true square, the index of the found box it best overlaps (IoU >= 0.5), greedy;
    fails when a square has none."""
    if not truth:
        return []
    sx, sy = scale
    expected = np.array([[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in _boxes(truth)])
    overlaps = iou(expected, found) if len(found) else np.zeros((len(truth), 0))
    taken: list[int] = []
    for i, square in enumerate(truth):
        row = overlaps[i].copy()
        row[taken] = -1
        j = int(np.argmax(row)) if row.size else -1
        assert j >= 0 and row[j] >= 0.5, f"square {square} not found: {found.tolist()}"
        taken.append(j)
    return taken


def _boxes(truth: list[pictures.Square]) -> list[tuple[int, int, int, int]]:
    return [s.box for s in truth]


@pytest.mark.parametrize("seed", range(6))
def test_detector_finds_every_square_once(detector: ort.InferenceSession, seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    for i in range(10):
        img, truth = pictures.picture(rng, count=1 + (seed * 10 + i) % 5)
        found, scores, candidates = detect(detector, png_of(img))
        match(found, truth, (1.0, 1.0))
        assert len(found) == len(truth), (truth, found.tolist(), scores.tolist())
        # A real detector's output: many overlapping candidates per object, so NMS matters.
        assert candidates > 2 * len(truth)


@pytest.mark.parametrize(
    ("width", "height", "sizes"),
    [(256, 256, (24, 96)), (96, 96, (10, 36)), (320, 240, (36, 100))],
)
def test_detector_on_pictures_of_other_sizes(
    detector: ort.InferenceSession, width: int, height: int, sizes: tuple[int, int]
) -> None:
    """The image step stretches any picture to 128x128: squares of ~12-48 pixels after that
    (rectangles when the picture is not square) are found, in the resized coordinates."""
    rng = np.random.default_rng(width * height)
    scale = (sample.SIZE / width, sample.SIZE / height)
    gap = round(4 / min(scale))  # squares still 4 pixels apart once resized
    for i in range(8):
        img, truth = pictures.picture(rng, width, height, 1 + i % 4, sizes, gap)
        found, _, _ = detect(detector, png_of(img))
        match(found, truth, scale)
        assert len(found) == len(truth)


def _empty_pictures() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    out = [pictures.picture(rng, count=0)[0] for _ in range(8)]
    out.append(Image.new("RGB", (128, 128)))  # black
    out.append(Image.new("RGB", (200, 150), (40, 40, 40)))  # flat grey, another size
    noise = rng.normal(30, 20, (128, 128, 3))
    out.append(Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB"))
    y, x = np.mgrid[0:128, 0:128]
    ramp = np.repeat(((x + y) * 60 // 254)[:, :, None], 3, axis=2)
    out.append(Image.fromarray(ramp.astype(np.uint8), "RGB"))  # a dark gradient
    return out


def test_detector_finds_nothing_in_empty_pictures(detector: ort.InferenceSession) -> None:
    for img in _empty_pictures():
        boxes, scores, _ = detector.run(None, {"images": decode(png_of(img))})
        assert float(scores.max()) < 0.05
        assert len(nms(boxes[0], scores[0], sample.NMS_IOU, sample.NMS_SCORE)) == 0


def test_detector_takes_a_batch(detector: ort.InferenceSession) -> None:
    rng = np.random.default_rng(9)
    batch = [pictures.picture(rng, count=n)[0] for n in (0, 3)]
    x = np.concatenate([decode(png_of(img)) for img in batch])
    boxes, scores, classes = detector.run(None, {"images": x})
    assert boxes.shape[0] == scores.shape[0] == classes.shape[0] == 2
    for k, img in enumerate(batch):
        one_boxes, one_scores, _ = detector.run(None, {"images": decode(png_of(img))})
        np.testing.assert_array_equal(boxes[k], one_boxes[0])
        np.testing.assert_array_equal(scores[k], one_scores[0])


def crop(image: Array, box: Array, size: int = sample.CROP) -> Array:
    """A crop by hand ([1, 3, size, size]): the box's pixels resized (bilinear)."""
    hwc = (image[0].transpose(1, 2, 0) * 255).round().clip(0, 255).astype(np.uint8)
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    region = Image.fromarray(hwc).crop((x0, y0, x1, y1)).resize((size, size))
    a = np.asarray(region).astype(np.float32) / 255
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


def label_of(classifier: ort.InferenceSession, crops: Array) -> list[str]:
    (logits,) = classifier.run(None, {"input": crops})
    assert logits.shape == (len(crops), len(sample.LABELS)) and logits.dtype == np.float32
    return [sample.LABELS[int(i)] for i in logits.argmax(axis=1)]


def test_classifier_names_solid_colours(classifier: ort.InferenceSession) -> None:
    rng = np.random.default_rng(3)
    crops, expected = [], []
    for label, rgb in pictures.COLORS.items():
        for margin in (0, 3, 6):  # a loose box: a dark border around the colour
            a = rng.normal(20, 8, (32, 32, 3))
            a[margin : 32 - margin, margin : 32 - margin] = np.array(rgb) + rng.uniform(-25, 25, 3)
            a += rng.normal(0, 8, a.shape)
            crops.append((np.clip(a, 0, 255) / 255).astype(np.float32).transpose(2, 0, 1))
            expected.append(label)
    assert label_of(classifier, np.stack(crops)) == expected


def test_detector_then_classifier_by_hand(
    detector: ort.InferenceSession, classifier: ort.InferenceSession
) -> None:
    """The whole pipeline by hand on fresh pictures: every square found, with its colour."""
    rng = np.random.default_rng(77)
    for i in range(12):
        img, truth = pictures.picture(rng, count=i % 6)
        png = png_of(img)
        found, _, _ = detect(detector, png)
        assert len(found) == len(truth)
        order = match(found, truth, (1.0, 1.0))
        if not truth:
            continue
        image = decode(png)
        labels = label_of(classifier, np.concatenate([crop(image, b) for b in found]))
        assert [labels[j] for j in order] == [s.label for s in truth]


def test_written_pictures_and_declaration(built: Path) -> None:
    """`make samples` leaves pictures with ground truth and the pipeline beside the models."""
    pngs = sorted((built / "pictures").glob("picture-*.png"))
    assert len(pngs) >= 2
    first = json.loads(pngs[0].with_suffix(".json").read_text())
    assert first["squares"] == []  # the first picture is always the empty one
    decl = json.loads((built / sample.PIPELINE_FILE).read_text())
    models = {node["model"] for node in decl["nodes"] if "model" in node}
    assert models == set(sample.MODELS)
    assert {o["name"] for o in decl["outputs"]} == {"boxes", "scores", "labels"}
    assert (built / decl["templates"]["markdown"]).is_file()
