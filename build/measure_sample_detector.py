"""Recall and precision of the sample detector (and the classifier on its crops).

    python build/measure_sample_detector.py [--pictures 1000] [--seed 2] [--size 128x128]
        [--sides 12-48] [--model build/samples/squares_detector.onnx]

Generates pictures with build/make_sample_pictures.py (0 to 5 squares each), runs the detector
with onnxruntime on each as the pipeline's image step prepares it (stretched to 128x128, /255),
then greedy NMS with the pipeline's thresholds, and counts a square found when an unmatched
detection overlaps it with IoU >= 0.5 (in the resized picture). Crops of the found boxes go to
the colour classifier. Prints one line of figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_sample_pictures as pictures
import make_sample_pipeline as sample

Array = np.ndarray[Any, Any]


def iou(a: Array, b: Array) -> Array:
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / (area_a[:, None] + area_b[None, :] - inter))


def nms(boxes: Array, scores: Array) -> Array:
    candidates = np.flatnonzero(scores >= sample.NMS_SCORE)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    keep = []
    while order.size:
        keep.append(int(order[0]))
        order = order[1:][iou(boxes[order[0]][None], boxes[order[1:]])[0] <= sample.NMS_IOU]
    return np.array(keep, np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pictures", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--size", default="128x128", help="picture WIDTHxHEIGHT before resizing")
    ap.add_argument("--sides", default="12-48", help="square sides in pixels, before resizing")
    ap.add_argument("--out", default="build/samples", help="where the models are")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    sides = tuple(int(v) for v in args.sides.split("-"))
    out = Path(args.out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    detector = ort.InferenceSession(str(out / "squares_detector.onnx"), options, providers=cpu)
    classifier = ort.InferenceSession(str(out / "color_classifier.onnx"), options, providers=cpu)
    rng = np.random.default_rng(args.seed)
    scale = np.array([sample.SIZE / width, sample.SIZE / height] * 2)
    gap = round(4 / min(scale))
    squares = found = false = exact = right_colour = 0
    ious: list[float] = []
    blank_max = 0.0
    seconds = 0.0
    for _ in range(args.pictures):
        img, truth = pictures.picture(rng, width, height, None, (sides[0], sides[1]), gap)
        resized = img.resize((sample.SIZE, sample.SIZE), Image.Resampling.BILINEAR)
        x = (np.asarray(resized, np.float32) * np.float32(1 / 255)).transpose(2, 0, 1)[None]
        t0 = time.perf_counter()
        boxes, scores, _ = detector.run(None, {"images": np.ascontiguousarray(x)})
        seconds += time.perf_counter() - t0
        kept = boxes[0][nms(boxes[0], scores[0])]
        if not truth:
            blank_max = max(blank_max, float(scores.max()))
        expected = np.array([s.box for s in truth], np.float64).reshape(-1, 4) * scale
        overlaps = iou(expected, kept.astype(np.float64)) if len(kept) else None
        taken: set[int] = set()
        for i, square in enumerate(truth):
            if overlaps is None:
                break
            row = overlaps[i].copy()
            row[list(taken)] = -1
            j = int(np.argmax(row))
            if row[j] >= 0.5:
                taken.add(j)
                ious.append(float(row[j]))
                x0, y0, x1, y1 = (round(float(v)) for v in kept[j])
                crop = resized.crop((x0, y0, x1, y1)).resize((sample.CROP, sample.CROP))
                c = (np.asarray(crop, np.float32) / 255).transpose(2, 0, 1)[None]
                (logits,) = classifier.run(None, {"input": np.ascontiguousarray(c)})
                right_colour += sample.LABELS[int(logits.argmax())] == square.label
        squares += len(truth)
        found += len(taken)
        false += len(kept) - len(taken)
        exact += len(taken) == len(truth) == len(kept)
    print(
        f"pictures {args.pictures} ({width}x{height}, sides {args.sides}) squares {squares}: "
        f"recall {found / max(squares, 1):.4f} precision {found / max(found + false, 1):.4f} "
        f"(missed {squares - found}, false {false}), count exact {exact / args.pictures:.4f}, "
        f"mean IoU {np.mean(ious) if ious else 0:.3f} (min {min(ious, default=0):.3f}), "
        f"colour right {right_colour / max(found, 1):.4f}, "
        f"highest score on an empty picture {blank_max:.4f}, "
        f"detector {1000 * seconds / args.pictures:.1f} ms/picture (1 thread)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
