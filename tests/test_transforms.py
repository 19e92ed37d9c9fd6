import numpy as np
import pytest
import torch
from PIL import Image

from rgsd_lightning.data.datamodule import IdentityDataModule
from rgsd_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadToSquare,
    PhotometricJitter,
    face_transform,
    generator_transform,
    photometric,
    random_erasing_step,
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


def _photometric_numpy(x, gamma, brightness, contrast):
    """Independent per-pixel computation of gamma -> brightness -> contrast around the mean luma."""
    y = np.clip(x, 0, 1) ** gamma
    y = np.clip(y * brightness, 0, 1)
    grey = y[0] if y.shape[0] == 1 else 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
    m = grey.mean()
    return np.clip(m + contrast * (y - m), 0, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_photometric_against_numpy(channels):
    rng = np.random.default_rng(1)
    x = rng.random((channels, 6, 5)).astype(np.float64)
    for factors in [(1.0, 1.0, 1.0), (0.5, 1.3, 0.7), (1.8, 0.6, 1.4)]:
        got = photometric(torch.from_numpy(x), *factors).numpy()
        np.testing.assert_allclose(got, _photometric_numpy(x, *factors), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(photometric(torch.from_numpy(x), 1.0, 1.0, 1.0).numpy(), x)
    # a batch is changed image by image (each around its own mean)
    batch = torch.from_numpy(np.stack([x, x * 0.5]))
    got = photometric(batch, 0.5, 1.3, 0.7).numpy()
    np.testing.assert_allclose(got[1], _photometric_numpy(x * 0.5, 0.5, 1.3, 0.7), rtol=1e-10, atol=1e-12)


def test_photometric_hand_worked_case():
    # one grey channel [0.25, 1.0]: gamma 0.5 -> [0.5, 1.0]; brightness 0.8 -> [0.4, 0.8];
    # contrast 2 around the mean 0.6 -> [0.2, 1.0]
    x = torch.tensor([[[0.25, 1.0]]])
    torch.testing.assert_close(photometric(x, 0.5, 0.8, 2.0), torch.tensor([[[0.2, 1.0]]]))
    with pytest.raises(ValueError, match="gamma > 0"):
        photometric(x, 0.0, 1.0, 1.0)


def test_photometric_jitter_draws_factors_in_their_ranges():
    torch.manual_seed(0)
    jitter = PhotometricJitter(0.5)
    draws = np.array([jitter.factors() for _ in range(2000)])
    gamma, brightness, contrast = draws.T
    assert gamma.min() >= 1 / 1.5 - 1e-9 and gamma.max() <= 1.5 + 1e-9
    assert abs(np.log(gamma).mean()) < 0.03  # log-uniform, symmetric around gamma 1
    for f in (brightness, contrast):
        assert f.min() >= 0.5 and f.max() <= 1.5 and abs(f.mean() - 1.0) < 0.03
        assert f.min() < 0.55 and f.max() > 1.45  # the whole range is used
    assert PhotometricJitter(2.0).factors()[1] >= 0.0  # the lower bound stops at 0
    x = torch.rand(1, 4, 4)
    assert PhotometricJitter(0.0)(x) is x
    with pytest.raises(ValueError, match="strength must be >= 0"):
        PhotometricJitter(-0.1)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        face_transform(8, photometric=float("nan"))


def test_recognizer_transforms_jitter_only_in_training():
    def jitters(t):
        return any(isinstance(step, PhotometricJitter) for step in t.transforms)

    assert jitters(face_transform(8, photometric=0.4)) and jitters(reid_transform(16, 8, photometric=0.4))
    assert not jitters(face_transform(8, train=False, photometric=0.4))
    assert not jitters(reid_transform(16, 8, train=False, photometric=0.4))
    assert not jitters(face_transform(8))
    # the jitter changes pixel values, and differently from draw to draw
    img = _person(8, 8)
    torch.manual_seed(0)
    a, b = (face_transform(8, flip=False, photometric=0.5)(img) for _ in range(2))
    plain = face_transform(8, flip=False)(img)
    assert not torch.allclose(a, plain) and not torch.allclose(a, b)


@pytest.mark.parametrize("fill", ["random", "mean"])
def test_random_erasing_writes_one_box_holding_the_fill(fill):
    torch.manual_seed(0)
    x = torch.full((3, 64, 32), 5.0)  # a value neither fill can produce by chance
    y = random_erasing_step(1.0, fill)(x)
    box = (y != 5.0).any(dim=0)
    rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
    # one axis-aligned rectangle of 2-33 % of the image, every channel overwritten inside it
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert 0.02 * 64 * 32 * 0.8 <= box.sum() <= 0.33 * 64 * 32 * 1.2
    inside = y[:, box]
    if fill == "mean":  # the normalisation's mean pixel: 0 after normalising
        assert torch.equal(inside, torch.zeros_like(inside))
    else:  # per-pixel N(0, 1) noise
        assert 0.5 < inside.std() < 1.5 and abs(inside.mean()) < 0.5


def test_random_erasing_refuses_a_bad_fill_or_probability():
    with pytest.raises(ValueError, match="erasing_fill"):
        random_erasing_step(0.5, "zeros")
    with pytest.raises(ValueError, match="probability"):
        random_erasing_step(1.5)
    with pytest.raises(ValueError, match="erasing_fill"):
        IdentityDataModule(root="unused", erasing_fill="black")
    with pytest.raises(ValueError, match="random_erasing must be a probability"):
        IdentityDataModule(root="unused", random_erasing=1.5)
