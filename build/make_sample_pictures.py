"""Pictures for the sample detection pipeline: coloured squares on a dark, noisy background.

    python build/make_sample_pictures.py --out build/samples/pictures [--count 8] [--seed 16]

Writes `picture-NN.png` and, beside each, `picture-NN.json` with the ground truth:
`{"width", "height", "squares": [{"box": [x0, y0, x1, y1], "label": "red"}, ...]}` (boxes in
pixels, x1/y1 exclusive). Squares have sides of 12 to 48 pixels (by default), do
not touch each other (a gap of at least 4 pixels), and have one of the classifier's colours
(red, green, blue, white), each a little off its pure value. 0 to 5 squares per picture: the
first picture of a set is always empty (no squares), so "nothing found" is always shown.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LABELS = ("red", "green", "blue", "white")
#: The pure colour of each label; a picture's square is this, moved by up to +-25 per channel.
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 200, 45),
    "blue": (40, 60, 225),
    "white": (225, 225, 225),
}


@dataclass(frozen=True)
class Square:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    label: str

    def as_json(self) -> dict[str, Any]:
        return {"box": list(self.box), "label": self.label}


def picture(
    rng: np.random.Generator,
    width: int = 128,
    height: int = 128,
    count: int | None = None,
    sizes: tuple[int, int] = (12, 48),
    gap: int = 4,
) -> tuple[Image.Image, list[Square]]:
    """One picture and its squares: `count` squares (random 0..5 when None), sides in `sizes`,
    at least `gap` pixels apart."""
    n = int(rng.integers(0, 6)) if count is None else count
    squares: list[Square] = []
    tries = 0
    while len(squares) < n and tries < 500:
        tries += 1
        side = int(rng.integers(sizes[0], sizes[1] + 1))
        if side > min(width, height):
            continue
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_near(box, s.box, gap) for s in squares):
            continue
        squares.append(Square(box, LABELS[int(rng.integers(0, len(LABELS)))]))
    # A dark background: a level of 0..40, a soft gradient, and per-pixel noise.
    level = rng.uniform(0, 40)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    tilt = rng.uniform(-15, 15, 2)
    base = level + tilt[0] * x / width + tilt[1] * y / height
    pixels = np.repeat(base[:, :, None], 3, axis=2)
    for s in squares:
        x0, y0, x1, y1 = s.box
        pixels[y0:y1, x0:x1] = np.array(COLORS[s.label], np.float32) + rng.uniform(-25, 25, 3)
    pixels += rng.normal(0, rng.uniform(3, 12), pixels.shape)
    img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return img, squares


def _near(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def truth(img: Image.Image, squares: list[Square]) -> dict[str, Any]:
    return {
        "width": img.width,
        "height": img.height,
        "squares": [s.as_json() for s in squares],
    }


def write(out: Path, count: int, seed: int, width: int = 128, height: int = 128) -> list[Path]:
    """`count` pictures (the first one empty) and their truth files in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(count):
        n = 0 if i == 0 else 1 + (i - 1) % 5
        img, squares = picture(rng, width, height, n)
        path = out / f"picture-{i:02d}.png"
        img.save(path, format="PNG")
        path.with_suffix(".json").write_text(json.dumps(truth(img, squares), indent=1) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="build/samples/pictures")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=128)
    args = ap.parse_args(argv)
    for path in write(Path(args.out), args.count, args.seed, args.width, args.height):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
