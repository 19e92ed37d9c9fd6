"""Image transforms for the three consumers of identity images.

* the generator sees square images in [-1, 1] (``generator_transform``);
* the ReID recognizer sees 256x128 crops with flip, pad-crop and optional random erasing
  (``reid_transform``, the paper's "flip and padding" baseline plus Random Erasing as its Table 1 row);
* the face recognizer sees square faces in [-1, 1] (``face_transform``, the insightface normalisation).

Both recognizer transforms take an optional photometric jitter (``PhotometricJitter``: gamma, brightness,
contrast), the real-only augmentation to beat where the test images differ from the training ones in
lighting (Extended Yale B).

``to_recognizer_input`` does on generator output tensors what the PIL path does on image files, so a
reward feature extractor sees generated images exactly as downstream training will see them on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
ErasingFill = Literal["random", "mean"]
ERASING_FILLS = get_args(ErasingFill)


class PadToSquare:
    """Pad a PIL image to a square canvas (centred) with a constant fill."""

    def __init__(self, fill: int = 0) -> None:
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = max(w, h)
        if w == h:
            return img
        canvas = Image.new(img.mode, (side, side), color=self.fill if img.mode == "L" else (self.fill,) * 3)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


def photometric(x: torch.Tensor, gamma: float, brightness: float, contrast: float) -> torch.Tensor:
    """Gamma, then brightness, then contrast on images in [0, 1] (``(C, H, W)`` or ``(B, C, H, W)``).

    ``x ** gamma``; times ``brightness``; then blended with its own mean grey level,
    ``mean + contrast * (y - mean)`` (the grey level of RGB is the ITU-R 601 luma, as in torchvision's
    ``adjust_contrast``). Each step clips to [0, 1]; factor 1 leaves the image as it is.
    """
    if gamma <= 0 or brightness < 0 or contrast < 0:
        raise ValueError(
            f"photometric factors must be gamma > 0, brightness >= 0, contrast >= 0; "
            f"got gamma={gamma}, brightness={brightness}, contrast={contrast}"
        )
    y = x.clamp(0, 1) ** gamma
    y = (y * brightness).clamp(0, 1)
    grey = (
        y
        if y.shape[-3] == 1
        else 0.299 * y[..., 0:1, :, :] + 0.587 * y[..., 1:2, :, :] + 0.114 * y[..., 2:3, :, :]
    )
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    return (mean + contrast * (y - mean)).clamp(0, 1)


class PhotometricJitter:
    """Random ``photometric`` change of a ``(C, H, W)`` image in [0, 1] (after ``ToTensor``).

    With strength ``s``: brightness and contrast factors uniform in [max(0, 1 - s), 1 + s], gamma
    log-uniform in [1 / (1 + s), 1 + s]; drawn from torch's global generator (seeded per worker, like
    ``RandomErasing``). Hue and saturation are left alone: clothing colour identifies a person in ReID.

    Args:
        strength: s >= 0 (0 leaves images unchanged).
    """

    def __init__(self, strength: float) -> None:
        if not strength >= 0:
            raise ValueError(f"photometric strength must be >= 0, got {strength}")
        self.strength = float(strength)

    def factors(self) -> tuple[float, float, float]:
        """One draw of (gamma, brightness, contrast)."""
        s = self.strength
        u = torch.rand(3).tolist()
        log_top = math.log1p(s)
        gamma = math.exp((2 * u[0] - 1) * log_top)
        low = max(0.0, 1.0 - s)
        return gamma, low + u[1] * (1 + s - low), low + u[2] * (1 + s - low)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return x
        return photometric(x, *self.factors())

    def __repr__(self) -> str:
        return f"PhotometricJitter(strength={self.strength})"


def _channel_stats(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(values)
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    return values


def generator_transform(
    image_size: int,
    channels: int = 3,
    *,
    square: Literal["stretch", "pad"] = "stretch",
    hflip: bool = True,
) -> T.Compose:
    """Square generator input in [-1, 1].

    Args:
        image_size: side of the square the generator sees.
        channels: 3 (RGB) or 1 (grayscale).
        square: "stretch" resizes any aspect ratio to the square (the paper's 256x128 -> 256x256);
            "pad" letterboxes first.
        hflip: random horizontal flip (identity-preserving augmentation).
    """
    steps: list = []
    if channels == 1:
        steps.append(T.Grayscale(num_output_channels=1))
    if square == "pad":
        steps.append(PadToSquare())
    bicubic = T.InterpolationMode.BICUBIC
    steps.append(T.Resize((image_size, image_size), interpolation=bicubic, antialias=True))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(HALF[:channels], HALF[:channels])]
    return T.Compose(steps)


def random_erasing_step(p: float, fill: ErasingFill = "random") -> T.RandomErasing:
    """Random Erasing (Zhong et al. 2020) on a normalised ``(C, H, W)`` tensor: with probability ``p`` one box
    of 2-33 % of the image (aspect 0.3-3.3) is overwritten.

    Args:
        p: the probability in (0, 1].
        fill: "random": every erased value drawn from N(0, 1), per pixel and channel (torchvision's
            ``value="random"``, Zhong et al.'s RE-R); "mean": the box holds the normalisation's mean pixel,
            0 after normalising (RE-M; a constant fill, as in the ReID strong baseline BoT).
    """
    if not 0 < p <= 1:
        raise ValueError(f"random_erasing must be a probability in (0, 1], got {p}")
    if fill not in ERASING_FILLS:
        raise ValueError(f"erasing_fill must be one of {ERASING_FILLS}, got {fill!r}")
    return T.RandomErasing(p=p, value="random" if fill == "random" else 0)


def reid_transform(
    height: int = 256,
    width: int = 128,
    *,
    train: bool = True,
    flip: bool = True,
    pad: int = 10,
    random_erasing: float = 0.0,
    erasing_fill: ErasingFill = "random",
    photometric: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> T.Compose:
    """Person ReID input (BoT recipe): resize, flip, pad + random crop, normalise, random erasing.

    Args:
        height: input height (paper: 256).
        width: input width (paper: 128).
        train: training augmentation on; off gives resize + normalise only.
        flip: random horizontal flip (training).
        pad: zero padding before the random crop back to size (training; 0 disables).
        random_erasing: Random Erasing probability (Zhong et al. 2020), the paper's real-augmentation row.
        erasing_fill: what an erased box holds (``random_erasing_step``).
        photometric: ``PhotometricJitter`` strength (training; 0 disables).
        mean: normalisation mean (ImageNet by default, for timm backbones).
        std: normalisation std.
        channels: 3 or 1.
    """
    mean, std = _channel_stats(mean, channels), _channel_stats(std, channels)
    steps: list = [T.Grayscale(1)] if channels == 1 else []
    steps.append(T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    if train:
        if flip:
            steps.append(T.RandomHorizontalFlip())
        if pad > 0:
            steps += [T.Pad(pad), T.RandomCrop((height, width))]
    steps.append(T.ToTensor())
    if train and photometric != 0:
        steps.append(PhotometricJitter(photometric))
    steps.append(T.Normalize(mean, std))
    if train and random_erasing > 0:
        steps.append(random_erasing_step(random_erasing, erasing_fill))
    return T.Compose(steps)


def face_transform(
    size: int = 112,
    *,
    train: bool = True,
    flip: bool = True,
    channels: int = 3,
    random_erasing: float = 0.0,
    erasing_fill: ErasingFill = "random",
    photometric: float = 0.0,
) -> T.Compose:
    """Face recognizer input in [-1, 1] (insightface normalisation), square ``size``.

    Args:
        size: side of the square face (insightface: 112).
        train: training augmentation on.
        flip: random horizontal flip (training).
        channels: 3 or 1.
        random_erasing: Random Erasing probability (training).
        erasing_fill: what an erased box holds (``random_erasing_step``).
        photometric: ``PhotometricJitter`` strength (training; 0 disables).
    """
    steps: list = [T.Grayscale(1)] if channels == 1 else []
    steps.append(T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    if train and flip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if train and photometric != 0:
        steps.append(PhotometricJitter(photometric))
    steps.append(T.Normalize(HALF[:channels], HALF[:channels]))
    if train and random_erasing > 0:
        steps.append(random_erasing_step(random_erasing, erasing_fill))
    return T.Compose(steps)


def to_recognizer_input(
    images: torch.Tensor,
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    channels: int | None = None,
) -> torch.Tensor:
    """Generator output (B, C, S, S) in [-1, 1] -> recognizer input (B, C', H, W), normalised.

    The same geometry and normalisation as the test-time PIL path (resize to ``size``, scale to [0, 1],
    normalise), done on tensors so gradients and devices are kept.

    Args:
        images: generated images in [-1, 1].
        size: (height, width) the recognizer expects.
        mean: per-channel mean of the recognizer's normalisation (on [0, 1] pixels).
        std: per-channel std.
        channels: channels the recognizer expects (grayscale is repeated to 3, RGB averaged to 1).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    x = (images.float().clamp(-1, 1) + 1) / 2
    channels = channels or x.shape[1]
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 3 and channels == 1:
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)
    h, w = int(size[0]), int(size[1])
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    m = torch.tensor(_channel_stats(mean, channels), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(_channel_stats(std, channels), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
