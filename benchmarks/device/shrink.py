"""``python -m benchmarks.device.shrink SRC DST``: a folder of images as a study's generator sees them.

Each image is decoded as the data module decodes it (``load_image``: grey for one channel), goes through
the generator transform's PIL steps (grayscale, the bicubic resize to the square) and is saved losslessly as
PNG under its own stem. Reading the result through the same transform gives the tensors the originals give
(the resize to the size an image already has changes nothing), so a device run can carry a 23k-image prior
at a fifth of its bytes and decode it faster. An unreadable image stops it with an error naming the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torchvision.transforms as T

from rgsd_lightning.data.images import is_image_file, load_image
from rgsd_lightning.data.transforms import generator_transform


def shrink_folder(src: str | Path, dst: str | Path, *, size: int = 32, channels: int = 1) -> int:
    """Write every image of ``src`` (not recursive) to ``dst`` as ``<stem>.png`` at ``size`` x ``size``;
    returns how many. Two source files with the same stem are an error (one would overwrite the other)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"shrink: no such folder {src}")
    files = sorted(p for p in src.iterdir() if p.is_file() and is_image_file(p))
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"shrink: {src} has several images with the same stem (each becomes <stem>.png)")
    steps = []  # the PIL steps: those before ToTensor
    for step in generator_transform(size, channels, hflip=False).transforms:
        if isinstance(step, T.ToTensor):
            break
        steps.append(step)
    dst.mkdir(parents=True, exist_ok=True)
    mode = "L" if channels == 1 else "RGB"  # as the data module decodes them
    for path in files:
        image = load_image(path, mode)
        for step in steps:
            image = step(image)
        image.save(dst / f"{path.stem}.png")
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device.shrink", description=__doc__.splitlines()[0]
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    args = p.parse_args(argv)
    n = shrink_folder(args.src, args.dst, size=args.size, channels=args.channels)
    print(f"shrink: {n} images -> {args.dst} ({args.channels} channel(s), {args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
