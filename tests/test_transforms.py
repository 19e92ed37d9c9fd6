import numpy as np
import pytest
import torch
from PIL import Image

from rgsd_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadToSquare,
    face_transform,
    generator_transform,
    reid_transform,
    to_recognizer_input,
)


def _person(h=64, w=32):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_generator_transform_is_square_in_minus_one_one():
    x = generator_transform(16, 3, hflip=False)(_person())
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    g = generator_transform(16, 1, square="pad", hflip=False)(_person())
    assert g.shape == (1, 16, 16)
    # letterboxing keeps the black bars on the left and right of a tall image
    assert torch.allclose(g[:, :, 0], torch.full_like(g[:, :, 0], -1.0))


def test_pad_to_square_centres():
    img = PadToSquare()(Image.new("RGB", (2, 6), (255, 255, 255)))
    arr = np.asarray(img)
    assert arr.shape == (6, 6, 3) and arr[:, 2:4].min() == 255 and arr[:, :2].max() == 0


def test_reid_test_transform_is_resize_and_imagenet_normalise():
    img = _person()
    x = reid_transform(32, 16, train=False)(img)
    ref = np.asarray(img.resize((16, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=2e-2)
    y = reid_transform(32, 16, train=True, random_erasing=1.0)(img)
    assert y.shape == (3, 32, 16)


def test_face_transform_range_and_channels():
    x = face_transform(24, train=False, channels=1)(_person(40, 40))
    assert x.shape == (1, 24, 24) and x.min() >= -1 and x.max() <= 1


def test_tensor_path_matches_the_pil_test_transform():
    img = _person(32, 32)
    gen = generator_transform(32, 3, hflip=False)(img).unsqueeze(0)  # what the generator would output
    via_tensor = to_recognizer_input(gen, (64, 32), IMAGENET_MEAN, IMAGENET_STD)[0]
    via_pil = reid_transform(64, 32, train=False)(img)
    assert via_tensor.shape == via_pil.shape
    assert (via_tensor - via_pil).abs().mean() < 0.05  # same geometry and normalisation


def test_tensor_path_channel_conversion_and_errors():
    gray = torch.zeros(2, 1, 8, 8)
    assert to_recognizer_input(gray, (8, 8), [0.5], [0.5], channels=3).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="B, C, H, W"):
        to_recognizer_input(torch.zeros(3, 8, 8), (8, 8), [0.5], [0.5])
