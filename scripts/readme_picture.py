"""Tiles the first overlay PNGs of an evaluation into one small picture (docs/shapes_overlays.png).

    python scripts/readme_picture.py --overlays=workdirs/shapes/overlays_1500 --out=docs/shapes_overlays.png
"""

import argparse
import os

import numpy as np
from PIL import Image

from mrcnn_jax import visualize


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--overlays", required=True, help="an overlays_STEP folder of a workdir")
    parser.add_argument("--out", default="docs/shapes_overlays.png")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="each tile, pixels")
    args = parser.parse_args()
    files = sorted(f for f in os.listdir(args.overlays) if f.endswith(".png"))[: args.count]
    if not files:
        raise SystemExit(f"no PNG files in {args.overlays}")
    tiles = [
        np.asarray(Image.open(os.path.join(args.overlays, f)).convert("RGB").resize(
            (args.size, args.size), Image.Resampling.NEAREST))
        for f in files
    ]
    picture = Image.fromarray(visualize.grid(tiles, 4)).quantize(colors=96)  # keeps the PNG small
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) from {len(files)} overlays")


if __name__ == "__main__":
    main()
