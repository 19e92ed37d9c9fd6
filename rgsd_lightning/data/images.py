"""Image decoding with errors that name the file.

Every loader in the library goes through :func:`load_image`, so a missing, corrupt or truncated image
always fails the same way: a :class:`BadImageError` naming the file (or the in-memory source).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image that cannot be read; ``source`` names the file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension the library reads."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_image(source: str | os.PathLike | bytes, mode: str = "RGB", name: str | None = None) -> Image.Image:
    """Decode an image file (or encoded bytes) fully and convert it to ``mode``.

    Args:
        source: a file path or the encoded bytes of an image.
        mode: PIL mode to convert to (``"RGB"`` or ``"L"``).
        name: how to name an in-memory source in error messages.

    Raises:
        BadImageError: the file is missing, not an image, corrupt or truncated.
    """
    label = name or (f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else str(source))
    try:
        if isinstance(source, bytes | bytearray):
            fh = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise BadImageError(label, "file not found")
            fh = path.open("rb")
        with fh, Image.open(fh) as img:
            img.load()  # force a full decode: truncated files fail here, not later in a worker
            return img.convert(mode)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(label, f"{type(err).__name__}: {err}") from err
