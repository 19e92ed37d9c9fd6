"""Shared fixtures: small toy datasets built once per session, offline environment, clean state."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_MARKET = {
    "num_train_ids": 6,
    "num_test_ids": 4,
    "images_per_id": 6,
    "num_cameras": 3,
    "num_distractors": 4,
}
SMALL_FACES = {"num_ids": 6, "images_per_id": 6, "size": 32}


def quiet_trainer(root: str | os.PathLike | None = None, **overrides: Any):
    """A CPU ``lightning.Trainer`` for tests: no logger, progress bar, model summary or checkpoints, and the
    datamodule's own samplers (``use_distributed_sampler=False``); files under ``root`` when given.
    ``overrides`` replace or add Trainer arguments."""
    import lightning as L

    args: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    if root is not None:
        args["default_root_dir"] = str(root)
    args.update(overrides)
    return L.Trainer(**args)


def assert_close_to_scale(actual: Any, expected: Any, rtol: float = 1e-5, scale: float | None = None) -> None:
    """``actual`` equals ``expected`` within ``rtol`` times the magnitude of the values (default: the largest
    ``|expected|``), element by element.

    Rounding errors of a float32 computation scale with the magnitude of the values it combines, not with
    each output element (an element near zero made of large terms carries their error), and BLAS kernels
    round differently on different CPUs: a fixed ``atol`` on outputs of magnitude 10-500 fails elsewhere.
    """
    import numpy as np

    def as_double(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().double()
        return torch.from_numpy(np.asarray(x, dtype=np.float64))

    a, e = as_double(actual), as_double(expected)
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * max(scale, 1e-30))


def random_tiny_generator(vae: Any = None, seed: int = 0):
    """A tiny-preset DiT generator (3 identities) with every transformer parameter drawn from N(0, 0.3²): the
    DiT init would make ε ≡ 0 and label-independent, useless for testing samplers."""
    from rgsd_lightning.diffusion import build_dit

    torch.manual_seed(seed)
    gen = build_dit(num_identities=3, preset="tiny", vae=vae)
    with torch.no_grad():
        for p in gen.transformer.parameters():
            p.normal_(0.0, 0.3)
    return gen


class PooledColour(torch.nn.Module):
    """The mean colour of the four image quadrants (12-d); at module level so ddp_spawn can pickle it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)


def pooled_colour_extractor():
    """A fixed 'recognizer' for RL tests: the mean colour of the four image quadrants (12-d features)."""
    from rgsd_lightning.backbones import FeatureExtractor

    return FeatureExtractor(PooledColour(), (8, 8), [0.5] * 3, [0.5] * 3)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for gloo process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def toy_market(tmp_path_factory) -> str:
    """A small toy Market-format dataset (6 train ids x 6 images); returns its root."""
    from rgsd_lightning.data.toy import make_toy_market

    root = tmp_path_factory.mktemp("data") / "toy_market"
    make_toy_market(root, **SMALL_MARKET)
    return str(root)


@pytest.fixture(scope="session")
def toy_faces(tmp_path_factory) -> str:
    """A small toy identity-folder dataset (6 ids x 6 images); returns its root."""
    from rgsd_lightning.data.toy import make_toy_faces

    root = tmp_path_factory.mktemp("data") / "toy_faces"
    make_toy_faces(root, **SMALL_FACES)
    return str(root)


@pytest.fixture(autouse=True)
def _clean_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_generator_export(toy_market, tmp_path_factory) -> str:
    """A tiny pixel-space DiT (8x8) cold-started on the small toy market set for 60 steps, exported."""
    import lightning as L

    from rgsd_lightning import ColdStartDiT, IdentityDataModule
    from rgsd_lightning.callbacks.export import ExportArtifact
    from rgsd_lightning.modules.config import GridConfig

    L.seed_everything(0)
    run = tmp_path_factory.mktemp("generator")
    out = run / "export"
    dm = IdentityDataModule(
        root=toy_market, format="toy_market", task="generator", image_size=8, batch_size=8
    )
    model = ColdStartDiT(
        dm.num_identities,
        preset="tiny",
        image_size=8,
        trainable="all",
        lr=3e-3,
        grid=GridConfig(identities=0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=60,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ExportArtifact(str(out))],
        use_distributed_sampler=False,
        check_val_every_n_epoch=1000,
        default_root_dir=str(run),
    )
    trainer.fit(model, dm)
    return str(out)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The notebooks (collected from notebooks/ by nbmake) run whole stage chains in a kernel process: they
    are slow tests (``pytest -m "not slow"`` skips them; the full suite and CI run them)."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
