"""``rgsd make-toy``: write the embedded toy identities to a folder (Market layout or identity folders)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.data import toy


def command(
    root: str,
    kind: Literal["market", "faces"] = "market",
    ids: int | None = None,
    images_per_id: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """Write a toy dataset; returns 0 (or 1 with a message on bad arguments).

    Args:
        root: folder to write (must not exist, or hold the same toy dataset).
        kind: person ReID or faces.
        ids: identities (market: train ids; test ids alike).
        images_per_id: images per identity.
        seed: appearance seed.
        overwrite: replace an existing toy dataset.
    """
    kwargs: dict[str, Any] = {"seed": seed, "overwrite": overwrite}
    if images_per_id is not None:
        kwargs["images_per_id"] = images_per_id
    try:
        if kind == "market":
            if ids is not None:
                kwargs.update(num_train_ids=ids, num_test_ids=ids)
            path = toy.make_toy_market(root, **kwargs)
        else:
            if ids is not None:
                kwargs["num_ids"] = ids
            path = toy.make_toy_faces(root, **kwargs)
    except (ValueError, FileExistsError) as err:
        print(f"rgsd make-toy: {err}")
        return 1
    print(f"toy {kind} data at {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd make-toy`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd make-toy", positional=True)
