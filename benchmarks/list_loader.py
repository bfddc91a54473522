"""Throughput of the streaming list-file loader: JPEG decode, random-resized crop and flip in DataLoader workers.

    python benchmarks/list_loader.py [--images 400] [--source-size 320 240] [--size 224] [--workers 0 2]

Writes ``--images`` random JPEGs (an ImageNet-like source size) to a temporary folder, then times
one pass over them (after a warm-up batch) for each worker count. Images/s is what the training
loop can be fed on this machine; the model's own time is not included.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from imbsam_fast.apps.data.streaming import ListImages


def write_images(root: Path, n: int, size: tuple[int, int], classes: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        rel = f"c{i % classes}/img{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(root / rel, quality=90)
        lines.append(f"{rel} {i % classes}")
    listing = root / "train.txt"
    listing.write_text("\n".join(lines))
    return listing


def images_per_second(root: Path, listing: Path, size: int, workers: int, batch: int) -> float:
    data = ListImages(root, listing, size, train=True)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False)
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for _, y in it:
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--source-size", type=int, nargs=2, default=[320, 240])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)
    print(f"# list-file loader: {args.images} JPEGs {args.source_size[0]}x{args.source_size[1]} -> random-resized "
          f"crop {args.size}x{args.size} + flip; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print("| workers | images/s |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        listing = write_images(root, args.images, tuple(args.source_size))
        for w in args.workers:
            print(f"| {w} | {images_per_second(root, listing, args.size, w, args.batch):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
