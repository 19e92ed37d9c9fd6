"""The small-generator recipe options: min-SNR-γ weights, the noise schedule of from-scratch models, x0
clipping in every sampler, the normalisation round trip, and ``builtin:<name>`` generator exports."""

from __future__ import annotations

import ast
import glob
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from rgsd_lightning import ColdStartDiT
from rgsd_lightning import assets as assets_module
from rgsd_lightning.assets import builtin_names, resolve_builtin
from rgsd_lightning.data.transforms import generator_transform
from rgsd_lightning.diffusion import DiTGenerator, build_dit, sample
from rgsd_lightning.diffusion.schedule import denoising_loss, min_snr_weights, snr
from rgsd_lightning.io import to_uint8
from rgsd_lightning.modules.config import GridConfig, SamplerConfig
from rgsd_lightning.modules.generate import SyntheticGenerator
from rgsd_lightning.provenance import folder_fingerprint, provenance

COSINE = {"beta_schedule": "squaredcos_cap_v2"}


# ------------------------------------------------------------------------------------------ min-SNR-γ
def test_min_snr_weights_match_hand_computation():
    # ᾱ = 0.99, 0.5, 0.1, 0 -> SNR = 99, 1, 1/9, 0; γ = 5 -> weights 5/99, 1, 1, 1
    alphas = torch.tensor([0.99, 0.5, 0.1, 0.0])
    t = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(snr(alphas, t[:3]), torch.tensor([99.0, 1.0, 1.0 / 9.0]), rtol=1e-5)
    w = min_snr_weights(alphas, t, 5.0)
    assert torch.allclose(w, torch.tensor([5 / 99, 1.0, 1.0, 1.0, 5 / 99]), rtol=1e-5)
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(alphas, t, 0.0)


def test_min_snr_loss_is_the_weighted_per_sample_mse():
    gen = build_dit(num_identities=2, preset="tiny", channels=3, trainable="all")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 400, 990])
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        plain = denoising_loss(gen, x0, labels, noise=noise, timesteps=t)
        weighted = denoising_loss(gen, x0, labels, noise=noise, timesteps=t, min_snr_gamma=5.0)
        a = gen.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
        eps = gen(x_t, t, labels).double()
    per = ((eps - noise.double()) ** 2).mean((1, 2, 3))
    s = (a / (1 - a)).flatten()
    hand = (torch.minimum(s, torch.tensor(5.0, dtype=torch.float64)) / s * per).mean()
    assert s[0] > 5 and s[1] > 5 and s[2] < 5  # two samples are down-weighted, two are not
    assert torch.allclose(plain.double(), per.mean(), rtol=1e-4)
    assert torch.allclose(weighted.double(), hand, rtol=1e-4)
    assert weighted < plain


def test_cold_start_trains_with_min_snr(monkeypatch):
    seen = {}
    import rgsd_lightning.modules.cold_start as cold_start

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(cold_start, "denoising_loss", spy)
    model = ColdStartDiT(2, preset="tiny", image_size=8, trainable="all", min_snr_gamma=5.0)
    model.training_step({"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([0, 1])}, 0)
    assert seen["min_snr_gamma"] == 5.0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        ColdStartDiT(3, preset="tiny", image_size=8, min_snr_gamma=-1.0)


# ------------------------------------------------------------------------------------ noise schedule
def test_cosine_schedule_equals_diffusers_and_survives_export(tmp_path):
    model = ColdStartDiT(2, preset="tiny", image_size=8, trainable="all", beta_schedule="squaredcos_cap_v2")
    gen = model.generator
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert torch.allclose(gen.alphas_cumprod.double(), reference.alphas_cumprod.double(), rtol=1e-6)
    linear = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod
    assert not torch.allclose(gen.alphas_cumprod.double(), linear.double(), rtol=1e-2)
    model.export(tmp_path / "e")
    again = DiTGenerator.from_pretrained(tmp_path / "e")
    assert torch.equal(again.alphas_cumprod, gen.alphas_cumprod)
    with pytest.raises(ValueError, match="beta_schedule"):
        ColdStartDiT(2, preset="tiny", image_size=8, beta_schedule="quadratic")


def test_pretrained_path_keeps_its_schedule(tmp_path):
    build_dit(num_identities=2, preset="tiny", channels=3, scheduler_config=COSINE).save_pretrained(
        tmp_path / "e"
    )
    cold = ColdStartDiT(3, pretrained=str(tmp_path / "e"), image_size=8)
    expected = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.float()
    assert torch.allclose(cold.generator.alphas_cumprod, expected)
    with pytest.raises(ValueError, match="keeps the schedule"):
        ColdStartDiT(3, pretrained=str(tmp_path / "e"), beta_schedule="linear", image_size=8)
    with pytest.raises(ValueError, match="keeps the noise schedule"):
        build_dit(
            num_identities=3, pretrained=str(tmp_path / "e"), scheduler_config={"beta_schedule": "linear"}
        )


# ------------------------------------------------------------------------------------------- x0 clipping
class _EpsModel(torch.nn.Module):
    """A stand-in generator whose ε̂ is a rule of (x_t, t): ``far`` makes x̂0 leave [-1, 1] by far (constant
    ε = -3), otherwise ε̂ = x_t / √(1-ᾱ_t), i.e. x̂0 = 0 at every step (inside [-1, 1])."""

    num_train_timesteps = 1000
    null_label = 1
    latent_shape = (1, 4, 4)

    def __init__(self, far: bool) -> None:
        super().__init__()
        self.far = far
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.alphas_cumprod = DDPMScheduler().alphas_cumprod.float()

    @property
    def device(self) -> torch.device:
        return self.w.device

    def check_labels(self, labels: torch.Tensor) -> None:
        pass

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.far:
            return torch.full_like(x, -3.0)
        t = torch.as_tensor(t).long().expand(x.shape[0])
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return x / (1.0 - a).sqrt()


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpmsolver"])
def test_clipping_changes_a_sample_only_when_x0_leaves_the_range(method):
    kw = dict(seeds=[0, 1], num_steps=10, method=method, guidance_scale=1.0)
    far = _EpsModel(far=True)
    free = sample(far, [0, 0], **kw).latents
    clipped = sample(far, [0, 0], clip_x0=True, **kw).latents
    # the last step lands on x̂0 itself (ᾱ_prev = 1): the clipped one stays in [-1, 1], the free one does not
    assert free.abs().max() > 5.0
    assert clipped.abs().max() <= 1.0 + 1e-6
    inside = _EpsModel(far=False)
    assert torch.equal(
        sample(inside, [0, 0], **kw).latents, sample(inside, [0, 0], clip_x0=True, **kw).latents
    )


def test_sampler_clip_default_is_on_in_pixel_mode_only():
    pixel = ColdStartDiT(2, preset="tiny", image_size=8, trainable="all", grid=GridConfig(identities=0))
    assert pixel.clip_x0 is True and pixel.sampler_settings()["clip_x0"] is True
    off = ColdStartDiT(2, preset="tiny", image_size=8, sampler={"clip_x0": False})
    assert off.sampler_settings()["clip_x0"] is False
    latent = ColdStartDiT(2, preset="tiny", image_size=16, vae="tiny", trainable="all")
    assert latent.clip_x0 is False and latent.sampler_settings()["clip_x0"] is False
    on = ColdStartDiT(2, preset="tiny", image_size=16, vae="tiny", sampler=SamplerConfig(clip_x0=True))
    assert on.clip_x0 is True
    with pytest.raises(ValueError, match="sampler.clip_x0"):
        SamplerConfig(clip_x0="yes")


@pytest.mark.parametrize(("sampler", "clip"), [({}, True), ({"clip_x0": False}, False)])
def test_generate_samples_with_the_configured_clipping(monkeypatch, sampler, clip):
    import rgsd_lightning.modules.generator_base as base

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return sample(*args, **kwargs)

    monkeypatch.setattr(base, "sample", spy)
    model = ColdStartDiT(2, preset="tiny", image_size=8, sampler={"steps": 2, **sampler})
    model.generate(torch.tensor([0, 1]), [3, 4])
    assert seen["clip_x0"] is clip


# ------------------------------------------------------------------------------ normalisation round trip
@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_round_trip_is_lossless(tmp_path, channels):
    """uint8 image -> generator input in [-1, 1] -> the writer's uint8: the same pixels."""
    rng = np.random.default_rng(0)
    shape = (16, 16, 3) if channels == 3 else (16, 16)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    mode = "RGB" if channels == 3 else "L"
    x = generator_transform(16, channels, hflip=False)(Image.open(path).convert(mode))
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = to_uint8(x[None])[0]
    assert np.array_equal(back[..., 0] if channels == 1 else back, pixels)


# ------------------------------------------------------------------------------------ builtin exports
@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """An assets folder holding one tiny cosine-schedule export ``builtin:tiny_prior`` (4 identities)."""
    root = tmp_path / "assets"
    gen = build_dit(num_identities=4, preset="tiny", channels=3, scheduler_config=COSINE)
    gen.save_pretrained(root / "tiny_prior", provenance=provenance("test", parent=None, config={}))
    (root / "not_an_export").mkdir()
    monkeypatch.setattr(assets_module, "ASSETS_DIR", root)
    return root / "tiny_prior"


def test_builtin_names_resolve_or_fail_clearly(shipped):
    assert builtin_names() == ["tiny_prior"]
    assert resolve_builtin("builtin:tiny_prior") == str(shipped)
    assert resolve_builtin("some/folder") == "some/folder"
    for bad in ("builtin:no_such_prior", "builtin:not_an_export", "builtin:../assets/tiny_prior", "builtin:"):
        with pytest.raises(FileNotFoundError, match=r"no such built-in generator export.*tiny_prior"):
            resolve_builtin(bad)
    with pytest.raises(FileNotFoundError, match="builtin:no_such_prior"):
        build_dit(num_identities=2, pretrained="builtin:no_such_prior")


def test_builtin_export_loads_everywhere_an_export_is_accepted(shipped):
    prior = DiTGenerator.from_pretrained("builtin:tiny_prior")
    direct = DiTGenerator.from_pretrained(shipped)
    assert prior.num_identities == 4
    assert torch.equal(prior.label_table.weight, direct.label_table.weight)
    cold = ColdStartDiT(3, pretrained="builtin:tiny_prior", image_size=8)
    expected = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.float()
    assert torch.allclose(cold.generator.alphas_cumprod, expected)  # the shipped schedule is kept
    gen = SyntheticGenerator(4, export="builtin:tiny_prior")
    assert gen.generator.identities == prior.identities


def test_provenance_names_a_builtin_parent_and_fingerprints_its_folder(shipped, tmp_path):
    cold = ColdStartDiT(3, pretrained="builtin:tiny_prior", image_size=8)
    out = cold.export(tmp_path / "cold")
    record = json.loads((out / "provenance.json").read_text())
    assert record["parent"] == "builtin:tiny_prior"
    assert record["parent_fingerprint"] == folder_fingerprint(shipped)


def test_shipped_export_files_are_package_data(shipped):
    """Every file of an export laid out under rgsd_lightning/assets/ matches a package-data pattern of
    pyproject.toml, with setuptools' glob semantics (so `pip install .` carries a shipped export)."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1]
    patterns = ast.literal_eval(re.search(r"^rgsd_lightning\s*=\s*(\[.*\])", section, re.M).group(1))
    package = shipped.parent.parent / "pkg" / "rgsd_lightning"
    files = [p for p in shipped.rglob("*") if p.is_file()]
    for path in files:
        target = package / "assets" / "tiny_prior" / path.relative_to(shipped)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    (package / "assets" / "tiny_prior" / "PROVENANCE.md").write_text("how it was made\n")
    matched = {m for pat in patterns for m in glob.glob(pat, root_dir=package, recursive=True)}
    wanted = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert any(re.search(r"\.safetensors$", w) for w in wanted)
    assert wanted <= matched, sorted(wanted - matched)


def test_the_shipped_toy_prior_loads_samples_and_is_documented():
    """The demo starts from builtin:toy_prior: it must be in the package, small, and sample toy persons'
    shapes (finite, in range, not constant) with the cosine schedule it was trained with."""
    assert "toy_prior" in builtin_names()
    folder = Path(resolve_builtin("builtin:toy_prior"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    assert "## Training" in (folder / "PROVENANCE.md").read_text()
    gen = DiTGenerator.from_pretrained("builtin:toy_prior").eval()
    assert gen.num_identities == 128 and gen.image_size == 32 and gen.channels == 3 and gen.vae is None
    betas = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(gen.alphas_cumprod.double(), betas.double(), rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        settings = dict(num_steps=4, guidance_scale=2.0, method="dpmsolver", clip_x0=True)
        out = sample(gen, [0, 64], seeds=[0, 1], **settings)
    images = out.images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6 and images.std() > 0.1
