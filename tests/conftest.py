"""Shared fixtures: small toy datasets built once per session, offline environment, clean state."""

from __future__ import annotations

import os

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
