"""Build the sample detection pipeline offline with onnx.helper (nothing is downloaded).

    python build/make_sample_pipeline.py --out build/samples [--store models]

Writes into --out:
  squares_detector.onnx        finds bright squares on a dark background:
                               images FP32[N,3,128,128] (RGB, 0..1) -> boxes FP32[N,A,4]
                               (x0, y0, x1, y1 in pixels), scores FP32[N,A], classes INT64[N,A]
  color_classifier.onnx        input FP32[N,3,32,32] (RGB, 0..1) -> logits FP32[N,4]
                               over red, green, blue, white
  detect_classify.pipeline.json  picture -> detector -> nms -> crop (fan-out) -> classifier -> label
  report.md.j2                 a Markdown listing of the detections (the pipeline's `templates`)
  pictures/                    a few pictures with their ground truth (make_sample_pictures.py)
With --store, both models are added to that store (and activated) unless already there.

How the detector works (a real graph computing from pixels, no learned weights): brightness is
the largest channel of each pixel; an integral image (two CumSums) gives any window's sum of
brightness, of its square and of a thresholded mask's moments from four corners. Anchors: 11
sizes from 8 to 64 pixels, squares and (from 12 up) 4:3 and 3:4 rectangles, on a 4-pixel grid:
31,744 candidates that overlap heavily, so NMS is needed. Each anchor's box is refined from the
mask's centre and spread in a window a little larger than the anchor (a uniform w-pixel run has
variance (w^2-1)/12), or is the anchor itself when the mask is too thin there. The score says
"a uniform bright block with a dark ring around it": the contrast between the anchor and the
brightest of the four strips around it (a few pixels out), times how uniform the anchor and the
refined box are (contrast^2 / (contrast^2 + variance)). A blank or noisy picture, an anchor much
bigger or smaller than a square, at its corner, or spanning two squares all score low.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_sample_pictures

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime builds such as JetPack's

#: The detector's picture size (height, width) and anchor grid.
SIZE = 128
STRIDE = 4
ANCHOR_SIZES = (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64)
#: Anchors of these sizes also come as 4:3 and 3:4 rectangles.
RECT_FROM = 12
#: The ring around an anchor starts GUARD pixels out, so a square off the grid by up to half a
#: stride still has a dark ring; it is max(3, size / 8 + 2) pixels wide.
GUARD = STRIDE // 2
#: Score = sigmoid(FILL_SLOPE * (fill - FILL_AT))
#:       * sigmoid(CONTRAST_SLOPE * (contrast - CONTRAST_AT)), contrast on the 0..1 scale.
FILL_AT, FILL_SLOPE = 0.6, 14.0
BOX_FILL_AT = 0.8
CONTRAST_AT, CONTRAST_SLOPE = 0.12, 40.0
#: The mask for box refinement: brightness above the picture's own midpoint between its darkest
#: and brightest (smoothed) pixels, at least MASK_MIN_STEP above the darkest.
MASK_MIN_STEP = 0.15
LABELS = make_sample_pictures.LABELS
CROP = 32


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="appliance-build",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def anchors() -> dict[str, np.ndarray[Any, Any]]:
    """Every anchor's window, a larger window around it, and the four strips of the ring
    between them (left, right, top, bottom), as corner indices into the integral image.

    Windows are clipped to the picture; a window's sum comes from its four corners in the
    integral image (SIZE + 1 square, row-major). `o` is the window the box is refined in."""
    side = SIZE + 1
    wins: dict[str, list[tuple[int, int, int, int]]] = {k: [] for k in "iolrtb"}
    for w, h in anchor_shapes():
        margin = max(3, max(w, h) // 8 + 2)
        for cy in range(STRIDE // 2, SIZE, STRIDE):
            for cx in range(STRIDE // 2, SIZE, STRIDE):
                x0, y0, x1, y1 = _window(cx, cy, w, h)
                gx0, gy0, gx1, gy1 = _window(cx, cy, w + 2 * GUARD, h + 2 * GUARD)
                ow, oh = w + 2 * (GUARD + margin), h + 2 * (GUARD + margin)
                ox0, oy0, ox1, oy1 = _window(cx, cy, ow, oh)
                wins["i"].append((x0, y0, x1, y1))
                wins["o"].append(_window(cx, cy, w + 2 * GUARD + 4, h + 2 * GUARD + 4))
                wins["l"].append((ox0, y0, gx0, y1))
                wins["r"].append((gx1, y0, ox1, y1))
                wins["t"].append((x0, oy0, x1, gy0))
                wins["b"].append((x0, gy1, x1, oy1))
    out: dict[str, np.ndarray[Any, Any]] = {}
    for k, listed in wins.items():
        x0, y0, x1, y1 = np.clip(np.array(listed, np.int64), 0, SIZE).T
        # Means over the part inside the picture; a strip wholly outside counts as dark.
        out[f"area_{k}"] = np.maximum((x1 - x0) * (y1 - y0), 1).astype(np.float64)
        # sum = I[y1,x1] - I[y0,x1] - I[y1,x0] + I[y0,x0]
        out[f"corners_{k}"] = np.stack(
            [y1 * side + x1, y0 * side + x1, y1 * side + x0, y0 * side + x0]
        )
    out["inner"] = np.clip(np.array(wins["i"], np.int64), 0, SIZE)
    return out


def anchor_shapes() -> list[tuple[int, int]]:
    """(width, height) of the anchors: squares, and from RECT_FROM up, 4:3 and 3:4 ones too
    (a picture that is not square is stretched to SIZE x SIZE, and its squares with it)."""
    shapes = [(s, s) for s in ANCHOR_SIZES]
    for s in ANCHOR_SIZES:
        if s >= RECT_FROM:
            short = round(s * 0.75)
            shapes += [(s, short), (short, s)]
    return shapes


def _window(cx: int, cy: int, w: int, h: int) -> tuple[int, int, int, int]:
    return cx - w // 2, cy - h // 2, cx + w - w // 2, cy + h - h // 2


def squares_detector() -> onnx.ModelProto:
    a = anchors()
    count = a["area_i"].shape[0]
    f64 = TensorProto.DOUBLE
    coords = np.arange(SIZE, dtype=np.float64) + 0.5 - SIZE / 2  # pixel centres, centred
    consts: dict[str, np.ndarray[Any, Any]] = {
        "x_map": np.broadcast_to(coords[None, :], (SIZE, SIZE)).reshape(1, 1, SIZE, SIZE).copy(),
        "y_map": np.broadcast_to(coords[:, None], (SIZE, SIZE)).reshape(1, 1, SIZE, SIZE).copy(),
        "pad_integral": np.array([0, 0, 1, 1, 0, 0, 0, 0], np.int64),
        "axis2": np.array(2, np.int64),
        "axis3": np.array(3, np.int64),
        "flat": np.array([0, 7, (SIZE + 1) ** 2], np.int64),
        **{f"area_{k}": a[f"area_{k}"][:, None] for k in "ilrtb"},  # [A, 1]
        "anchor_boxes": a["inner"].astype(np.float64),  # [A, 4]
        "half": np.array(0.5, np.float64),
        "one": np.array(1.0, np.float64),
        "zero": np.array(0.0, np.float64),
        "twelve": np.array(12.0, np.float64),
        "tiny": np.array(1e-4, np.float64),
        "centre": np.array(SIZE / 2, np.float64),
        "size": np.array(float(SIZE), np.float64),
        "min_step": np.array(MASK_MIN_STEP, np.float64),
        "mask_gain": np.array(10.0, np.float64),
        "min_mass": np.array(0.3, np.float64),
        "fill_at": np.array(FILL_AT, np.float64),
        "box_fill_at": np.array(BOX_FILL_AT, np.float64),
        "fill_slope": np.array(FILL_SLOPE, np.float64),
        "contrast_at": np.array(CONTRAST_AT, np.float64),
        "contrast_slope": np.array(CONTRAST_SLOPE, np.float64),
    }
    for win in "iolrtb":
        for k in range(4):
            consts[f"c{win}{k}"] = a[f"corners_{win}"][k]
    n = helper.make_node
    nodes = [
        # brightness: the largest channel, in float64 so the integral image stays exact
        n("ReduceMax", ["images"], ["bright32"], axes=[1], keepdims=1),
        n("Cast", ["bright32"], ["b"], to=f64),
        n("Mul", ["b", "b"], ["b2"]),
        # the mask's threshold: the picture's own dark and bright levels (smoothed)
        n("AveragePool", ["bright32"], ["smooth"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        n("ReduceMax", ["smooth"], ["gmax32"], axes=[1, 2, 3], keepdims=1),
        n("ReduceMin", ["smooth"], ["gmin32"], axes=[1, 2, 3], keepdims=1),
        n("Cast", ["gmax32"], ["gmax"], to=f64),
        n("Cast", ["gmin32"], ["gmin"], to=f64),
        n("Sub", ["gmax", "gmin"], ["grange"]),
        n("Mul", ["grange", "half"], ["ghalf"]),
        n("Max", ["ghalf", "min_step"], ["gstep"]),
        n("Add", ["gmin", "gstep"], ["threshold"]),
        n("Sub", ["b", "threshold"], ["above"]),
        n("Mul", ["above", "mask_gain"], ["above_k"]),
        n("Add", ["above_k", "half"], ["mask_raw"]),
        n("Clip", ["mask_raw", "zero", "one"], ["m"]),
        n("Mul", ["m", "x_map"], ["mx"]),
        n("Mul", ["m", "y_map"], ["my"]),
        n("Mul", ["mx", "x_map"], ["mxx"]),
        n("Mul", ["my", "y_map"], ["myy"]),
        # channels: 0 b, 1 b^2, 2 m, 3 m*x, 4 m*y, 5 m*x^2, 6 m*y^2
        n("Concat", ["b", "b2", "m", "mx", "my", "mxx", "myy"], ["planes"], axis=1),
        n("Pad", ["planes", "pad_integral"], ["padded"]),
        n("CumSum", ["padded", "axis2"], ["rows"]),
        n("CumSum", ["rows", "axis3"], ["integral"]),
        n("Reshape", ["integral", "flat"], ["table_cp"]),
        # [N, corners, channels]: a gather copies one row of 7 sums per corner
        n("Transpose", ["table_cp"], ["table"], perm=[0, 2, 1]),
        n("Gather", ["table", "channel0"], ["table_b"], axis=2),  # brightness only
    ]
    for win in "iolrtb":
        source = "table" if win in "io" else "table_b"
        for k in range(4):
            nodes.append(n("Gather", [source, f"c{win}{k}"], [f"g{win}{k}"], axis=1))
        nodes += [
            n("Sub", [f"g{win}0", f"g{win}1"], [f"d{win}0"]),
            n("Sub", [f"d{win}0", f"g{win}2"], [f"d{win}1"]),
            n("Add", [f"d{win}1", f"g{win}3"], [f"sum_{win}"]),  # [N, A, 7 or 1]
        ]
        if win in "io":
            nodes.append(n("Split", [f"sum_{win}"], [f"{win}{c}" for c in range(7)], axis=2))
        else:
            nodes.append(n("Div", [f"sum_{win}", f"area_{win}"], [f"mean_{win}"]))
    nodes += [
        n("Max", ["mean_l", "mean_r", "mean_t", "mean_b"], ["ring"]),  # its brightest side
        # box: the mask's centre and spread in the ring window, or the anchor itself
        n("Max", ["o2", "one"], ["mass"]),
        n("Div", ["o3", "mass"], ["cx"]),
        n("Div", ["o4", "mass"], ["cy"]),
        n("Div", ["o5", "mass"], ["ex2"]),
        n("Div", ["o6", "mass"], ["ey2"]),
        n("Mul", ["cx", "cx"], ["cx2"]),
        n("Mul", ["cy", "cy"], ["cy2"]),
        n("Sub", ["ex2", "cx2"], ["vx_raw"]),
        n("Sub", ["ey2", "cy2"], ["vy_raw"]),
        n("Relu", ["vx_raw"], ["vx"]),
        n("Relu", ["vy_raw"], ["vy"]),
        n("Mul", ["vx", "twelve"], ["vx12"]),
        n("Mul", ["vy", "twelve"], ["vy12"]),
        n("Add", ["vx12", "one"], ["wx2"]),
        n("Add", ["vy12", "one"], ["wy2"]),
        n("Sqrt", ["wx2"], ["w"]),
        n("Sqrt", ["wy2"], ["h"]),
        n("Mul", ["w", "half"], ["hw"]),
        n("Mul", ["h", "half"], ["hh"]),
        n("Add", ["cx", "centre"], ["px"]),
        n("Add", ["cy", "centre"], ["py"]),
        n("Sub", ["px", "hw"], ["rx0"]),
        n("Sub", ["py", "hh"], ["ry0"]),
        n("Add", ["px", "hw"], ["rx1"]),
        n("Add", ["py", "hh"], ["ry1"]),
        n("Concat", ["rx0", "ry0", "rx1", "ry1"], ["refined"], axis=2),  # [N, A, 4]
        n("Mul", ["area_i", "min_mass"], ["need"]),
        n("Greater", ["o2", "need"], ["enough"]),  # [N, A, 1]
        n("Where", ["enough", "refined", "anchor_boxes"], ["chosen"]),
        n("Clip", ["chosen", "zero", "size"], ["boxes64"]),
        n("Cast", ["boxes64"], ["boxes"], to=TensorProto.FLOAT),
        # score: the box (rounded to pixels) against the anchor's ring: its contrast, and how
        # uniform it is (a box spanning two squares, or a square and the dark, is not)
        n("Round", ["boxes64"], ["rounded"]),
        n("Cast", ["rounded"], ["corner_xy"], to=TensorProto.INT64),
        n("Split", ["corner_xy"], ["bx0", "by0", "bx1", "by1"], axis=2),  # [N, A, 1] each
        n("Mul", ["by1", "row"], ["rows1"]),
        n("Mul", ["by0", "row"], ["rows0"]),
        n("Add", ["rows1", "bx1"], ["k0"]),
        n("Add", ["rows0", "bx1"], ["k1"]),
        n("Add", ["rows1", "bx0"], ["k2"]),
        n("Add", ["rows0", "bx0"], ["k3"]),
        n("Concat", ["k0", "k1", "k2", "k3"], ["corner_k"], axis=1),  # [N, 4A, 1]
        # each picture's corners index its own rows of the table, flattened over the batch
        n("Gather", ["table", "channels01"], ["table_b2"], axis=2),  # b, b^2: [N, P, 2]
        n("Shape", ["table_b2"], ["batch1"], end=1),
        n("Squeeze", ["batch1"], ["batch"]),
        n("Range", ["zero_i", "batch", "one_i"], ["picture"]),
        n("Mul", ["picture", "row_count"], ["first_row"]),
        n("Reshape", ["first_row", "per_picture"], ["first_row3"]),  # [N, 1, 1]
        n("Add", ["corner_k", "first_row3"], ["corner_rows"]),
        n("Reshape", ["corner_rows", "batch_flat"], ["corner_flat"]),  # [N, 4A]
        n("Reshape", ["table_b2", "two_columns"], ["rows_b2"]),  # [N * P, 2]
        n("Gather", ["rows_b2", "corner_flat"], ["corner_v"], axis=0),  # [N, 4A, 2]
        n("Reshape", ["corner_v", "by_corner"], ["corner_v4"]),  # [N, 4, A, 2]
        n("Split", ["corner_v4"], ["v0", "v1", "v2", "v3"], axis=1),
        n("Sub", ["v0", "v1"], ["w0"]),
        n("Sub", ["w0", "v2"], ["w1"]),
        n("Add", ["w1", "v3"], ["box_sums4"]),  # [N, 1, A, 2]
        n("Squeeze", ["box_sums4", "axis1"], ["box_sums"]),  # [N, A, 2]
        n("Split", ["box_sums"], ["box_b", "box_b2"], axis=2),
        n("Sub", ["bx1", "bx0"], ["box_w"]),
        n("Sub", ["by1", "by0"], ["box_h"]),
        n("Mul", ["box_w", "box_h"], ["box_area_i"]),
        n("Cast", ["box_area_i"], ["box_area_raw"], to=f64),
        n("Max", ["box_area_raw", "one"], ["box_area"]),
        n("Div", ["box_b", "box_area"], ["mean_box"]),
        n("Div", ["box_b2", "box_area"], ["sq_box"]),
        n("Div", ["i0", "area_i"], ["mean_in"]),
        n("Div", ["i1", "area_i"], ["sq_in"]),
    ]
    for part, at in (("in", "fill_at"), ("box", "box_fill_at")):
        nodes += [
            n("Mul", [f"mean_{part}", f"mean_{part}"], [f"mean2_{part}"]),
            n("Sub", [f"sq_{part}", f"mean2_{part}"], [f"var_raw_{part}"]),
            n("Relu", [f"var_raw_{part}"], [f"var_{part}"]),
            n("Sub", [f"mean_{part}", "ring"], [f"contrast_raw_{part}"]),
            n("Relu", [f"contrast_raw_{part}"], [f"contrast_{part}"]),
            n("Mul", [f"contrast_{part}", f"contrast_{part}"], [f"c2_{part}"]),
            n("Add", [f"c2_{part}", f"var_{part}"], [f"c2v_{part}"]),
            n("Add", [f"c2v_{part}", "tiny"], [f"c2v_safe_{part}"]),
            n("Div", [f"c2_{part}", f"c2v_safe_{part}"], [f"fill_{part}"]),
            n("Sub", [f"fill_{part}", at], [f"fill_d_{part}"]),
            n("Mul", [f"fill_d_{part}", "fill_slope"], [f"fill_z_{part}"]),
            n("Sigmoid", [f"fill_z_{part}"], [f"fill_p_{part}"]),
        ]
    nodes += [
        n("Sub", ["contrast_in", "contrast_at"], ["contrast_d"]),
        n("Mul", ["contrast_d", "contrast_slope"], ["contrast_z"]),
        n("Sigmoid", ["contrast_z"], ["contrast_p"]),
        n("Mul", ["fill_p_in", "fill_p_box"], ["fill_p"]),
        n("Mul", ["fill_p", "contrast_p"], ["score64"]),
        n("Squeeze", ["score64", "one_axis"], ["score_sq"]),
        n("Cast", ["score_sq"], ["scores"], to=TensorProto.FLOAT),
        # one class, "square" (0): computed from the scores' shape like any detector's
        n("Shape", ["scores"], ["score_shape"]),
        n(
            "ConstantOfShape",
            ["score_shape"],
            ["classes"],
            value=helper.make_tensor("c", TensorProto.INT64, [1], [0]),
        ),
    ]
    consts["one_axis"] = np.array([2], np.int64)
    consts["channel0"] = np.array([0], np.int64)
    consts["channels01"] = np.array([0, 1], np.int64)
    consts["row"] = np.array(SIZE + 1, np.int64)
    consts["zero_i"] = np.array(0, np.int64)
    consts["one_i"] = np.array(1, np.int64)
    consts["row_count"] = np.array((SIZE + 1) ** 2, np.int64)
    consts["per_picture"] = np.array([-1, 1, 1], np.int64)
    consts["batch_flat"] = np.array([0, -1], np.int64)
    consts["two_columns"] = np.array([-1, 2], np.int64)
    consts["by_corner"] = np.array([0, 4, -1, 2], np.int64)
    consts["axis1"] = np.array([1], np.int64)
    graph = helper.make_graph(
        nodes,
        "squares_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", count, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", count]),
            helper.make_tensor_value_info("classes", TensorProto.INT64, ["batch", count]),
        ],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    return _model(graph, "Bright squares on a dark background: boxes, scores, classes per anchor")


def color_classifier() -> onnx.ModelProto:
    """Global average of each channel and of the darkest channel, then a linear layer.

    Logits (r, g, b: channel means; m: the mean of the per-pixel smallest channel):
    red 4r-2g-2b-4m, green 4g-2r-2b-4m, blue 4b-2r-2g-4m, white 6m-1. A crop's dark margin
    scales every term down together, so the order holds for loose boxes too."""
    weights = np.array(
        [
            [4.0, -2.0, -2.0, 0.0],  # r
            [-2.0, 4.0, -2.0, 0.0],  # g
            [-2.0, -2.0, 4.0, 0.0],  # b
            [-4.0, -4.0, -4.0, 6.0],  # m
        ],
        np.float32,
    )
    bias = np.array([0.0, 0.0, 0.0, -1.0], np.float32)
    n = helper.make_node
    nodes = [
        n("GlobalAveragePool", ["input"], ["channel_means"]),  # [N, 3, 1, 1]
        n("ReduceMin", ["input"], ["darkest"], axes=[1], keepdims=1),  # [N, 1, H, W]
        n("GlobalAveragePool", ["darkest"], ["darkest_mean"]),  # [N, 1, 1, 1]
        n("Concat", ["channel_means", "darkest_mean"], ["features4"], axis=1),
        n("Flatten", ["features4"], ["features"], axis=1),  # [N, 4]
        n("Gemm", ["features", "weights", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "color_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, CROP, CROP])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    return _model(graph, f"Colour of a {CROP}x{CROP} crop: logits over {', '.join(LABELS)}")


def pipeline() -> dict[str, Any]:
    """The declaration: a picture in; boxes, scores and colour labels of the squares out."""
    return {
        "kind": "pipeline",
        "description": "Finds bright squares in a picture and names the colour of each",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
        "nodes": [
            {
                "name": "decode",
                "step": {
                    "type": "image",
                    "size": [SIZE, SIZE],
                    "layout": "NCHW",
                    "color": "RGB",
                    "resize": "stretch",
                    "scale": 1 / 255,
                    "dtype": "FP32",
                },
                "inputs": {"image": "request.image"},
            },
            {"name": "detect", "model": "squares_detector", "inputs": {"images": "decode.image"}},
            {
                "name": "nms",
                "step": {"type": "nms", "iou_threshold": NMS_IOU, "score_threshold": NMS_SCORE},
                "inputs": {
                    "boxes": "detect.boxes",
                    "scores": "detect.scores",
                    "classes": "detect.classes",
                },
            },
            {
                "name": "crop",
                "step": {"type": "crop", "size": [CROP, CROP], "layout": "NCHW"},
                "inputs": {"image": "decode.image", "boxes": "nms.boxes"},
                "fan_out": True,
            },
            {"name": "classify", "model": "color_classifier", "inputs": {"input": "crop.crops"}},
            {
                "name": "label",
                "step": {"type": "argmax_label", "labels": list(LABELS)},
                "inputs": {"logits": "classify.logits"},
            },
        ],
        "outputs": [
            {"name": "boxes", "source": "nms.boxes"},
            {"name": "scores", "source": "nms.scores"},
            {"name": "labels", "source": "label.label"},
        ],
        "templates": {"markdown": TEMPLATE_NAME},
    }


#: A Markdown listing of the detections (the formats' sandboxed Jinja2: no file access).
TEMPLATE_NAME = "report.md.j2"
TEMPLATE = "\n".join(
    [
        '# {{ model_name }}: {{ outputs["labels"] | length }} square(s)',
        '{% if outputs["labels"] %}',
        "| # | colour | score | box (x0, y0, x1, y1) |",
        "| --- | --- | --- | --- |",
        '{% for box in outputs["boxes"] -%}',
        "{% set i = loop.index0 -%}",
        '| {{ loop.index }} | {{ outputs["labels"][i] }} | {{ outputs["scores"][i] | round(3) }} '
        '| {{ box | map("round", 1) | join(", ") }} |',
        "{% endfor -%}",
        "{% else %}",
        "Nothing found.",
        "{% endif %}",
        "",
    ]
)
#: The NMS step's thresholds (the detector scores a clear square above 0.9, nothing below 0.01).
NMS_IOU, NMS_SCORE = 0.45, 0.5
#: The models the pipeline names, by the file each is built into.
MODELS = {"squares_detector": squares_detector, "color_classifier": color_classifier}
PIPELINE_FILE = "detect_classify.pipeline.json"


def _write(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    print(f"wrote {path} ({len(data)} bytes)")


def add_to_store(store: Path, out: Path) -> None:
    """Each model into the store, as a new version when the built file differs from the active
    one (so `make samples` after a change to this script serves the new model)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from appliance.manifest import sha256_file
    from appliance.registry import Registry

    registry = Registry(store)
    for name in MODELS:
        path = out / f"{name}.onnx"
        if name in registry.names() and registry.entry(name).active:
            active = registry.active(name)
            if active.manifest.sha256 == sha256_file(path)[0]:
                print(f"{store}: {name} already present")
                continue
        mv = registry.add(name, path)
        print(f"{store}: added {name} version {mv.manifest.version}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="build/samples", help="directory for the files")
    ap.add_argument("--store", help="also add the two models to this model store")
    ap.add_argument("--pictures", type=int, default=6, help="sample pictures to write")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in MODELS.items():
        _write(out / f"{name}.onnx", make().SerializeToString())
    _write(out / PIPELINE_FILE, (json.dumps(pipeline(), indent=2) + "\n").encode())
    _write(out / TEMPLATE_NAME, TEMPLATE.encode())
    for path in make_sample_pictures.write(out / "pictures", args.pictures, seed=16):
        print(f"wrote {path}")
    if args.store:
        add_to_store(Path(args.store), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
