"""A pool of starting images for generation from an image (SDEdit, ``SyntheticGenerator(init_images=...)``).

A class-conditional generator cold-started on one image per identity learns the identity *as* that image:
its samples keep the image's lighting and pose whatever the prior held (``lighting_spread_yale_split.md``).
Starting each sample from a noised image of the prior corpus (another person, another lighting) instead of
pure noise lets the low frequencies of that image - global lighting, shadows, head placement - survive into
the sample while the identity label draws the face (Meng et al. 2022, SDEdit; diffusers' img2img).

A pool is either one shared folder (any request may start from any image) or, with :meth:`InitPool.own`,
each identity's own images (a request starts from an image of its own identity: real-guided generation as
in DA-Fusion, Trabucco et al. 2024, which varies the real image rather than replacing it).

Which pool image a request gets is a pure function of (pool seed, request seed, identity), so an image does
not depend on the batch it is generated in, a resumed generation draws the same starts, and two identities
asked for the same seed start from different images.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.listing import name_excluded
from rgsd_lightning.data.sources import read_unlabelled_images
from rgsd_lightning.data.transforms import generator_transform

SHARED = None  # the group key of a folder pool: every identity draws from all of it


class InitPool:
    """Every image below ``root`` (recursive) except the excluded file names, as generator inputs.

    Args:
        root: folder of the starting images (any layout: identity folders or flat).
        exclude: fnmatch patterns over file names to leave out (e.g. the target identities' own images).
        image_size: the generator's square side.
        channels: 1 (grey) or 3 (RGB).
        square: how non-square images become square ("stretch" or "pad"), as the generator's data.
        seed: seed of the draw of a pool image per request.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        exclude: Sequence[str] = (),
        image_size: int,
        channels: int,
        square: str = "stretch",
        seed: int = 0,
    ) -> None:
        records = read_unlabelled_images(root)
        paths = [r.path for r in records if not name_excluded(r.path, exclude)]
        if not paths:
            raise ValueError(f"init_images.root {root}: exclude {list(exclude)} leaves no image")
        self._init({SHARED: paths}, image_size=image_size, channels=channels, square=square, seed=seed)

    @classmethod
    def own(
        cls,
        paths_by_identity: Mapping[str, Sequence[str]],
        *,
        exclude: Sequence[str] = (),
        image_size: int,
        channels: int,
        square: str = "stretch",
        seed: int = 0,
    ) -> InitPool:
        """A pool in which every identity starts from its own images only (e.g. its real training images).

        An identity left without images (none given, or all excluded) fails when it is requested.
        """
        groups = {
            str(name): [str(p) for p in paths if not name_excluded(str(p), exclude)]
            for name, paths in paths_by_identity.items()
        }
        if not any(groups.values()):
            raise ValueError(f"init_images (own images): exclude {list(exclude)} leaves no image")
        pool = cls.__new__(cls)
        pool._init(groups, image_size=image_size, channels=channels, square=square, seed=seed)
        return pool

    def _init(
        self,
        groups: Mapping[str | None, list[str]],
        *,
        image_size: int,
        channels: int,
        square: str,
        seed: int,
    ) -> None:
        self.paths: list[str] = []
        self.members: dict[str | None, list[int]] = {}  # group -> indices into self.paths
        for name, paths in groups.items():
            self.members[name] = list(range(len(self.paths), len(self.paths) + len(paths)))
            self.paths += paths
        self.seed = int(seed)
        self.transform = generator_transform(image_size, channels, square=square, hflip=False)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def choose(self, identity: str, seed: int) -> int:
        """Index (into ``paths``) of the pool image request (identity, seed) starts from."""
        members = self.members.get(SHARED, self.members.get(str(identity)))
        if not members:
            raise ValueError(f"identity {identity!r} has no image in the init_images pool (own images)")
        key = [self.seed, int(seed), zlib.crc32(str(identity).encode("utf-8"))]
        return members[int(np.random.default_rng(key).integers(len(members)))]

    def images(self, identities: Sequence[str], seeds: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """The starting images (B, C, size, size) in [-1, 1] of the requests, and their paths."""
        if len(identities) != len(seeds):
            raise ValueError(f"{len(identities)} identities but {len(seeds)} seeds")
        paths = [self.paths[self.choose(i, s)] for i, s in zip(identities, seeds, strict=True)]
        return torch.stack([self.transform(load_image(p, self.mode)) for p in paths]), paths
