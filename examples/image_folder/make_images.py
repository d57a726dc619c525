"""Draw a tiny folder of PNG images (coloured circles, squares and triangles), one folder per
site, in torchvision's ImageFolder layout:

    python examples/image_folder/make_images.py   # -> examples/image_folder/data/site-N/...

Each image is 32x32, a random colour, size and position on a dark background. Each site leans
towards one shape (a mild label skew, as real sites have). Uses Pillow, which torchvision
already needs; nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``shape``."""
    background = tuple(int(v) for v in rng.integers(0, 96, 3))
    image = Image.new("RGB", (size, size), background)
    colour = tuple(int(v) for v in rng.integers(128, 256, 3))
    r = rng.uniform(0.25, 0.45) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_images(
    out: Path, sites: int = 3, train_per_class: int = 40, test_per_class: int = 10, seed: int = 0
) -> list[Path]:
    """Write ``out/site-N/{train,test}/<shape>/<i>.png``; return the site folders. Site N has
    twice as many training images of shape N mod 3 as of the others."""
    rng = np.random.default_rng(seed)
    folders = []
    for i in range(sites):
        folder = out / f"site-{i + 1}"
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            for k, shape in enumerate(SHAPES):
                count = per_class * 2 if split == "train" and k == i % len(SHAPES) else per_class
                target = folder / split / shape
                target.mkdir(parents=True, exist_ok=True)
                for j in range(count):
                    draw(shape, rng).save(target / f"{j:04d}.png")
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data", help="default: %(default)s")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folders = make_images(
        args.out, args.sites, args.train_per_class, args.test_per_class, args.seed
    )
    for folder in folders:
        print(f"wrote {folder}/train and {folder}/test")


if __name__ == "__main__":
    main()
