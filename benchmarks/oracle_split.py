"""``python -m benchmarks oracle_split``: held-back real images as a "synthetic" set - the oracle row.

What would a generator that drew genuinely new images of each identity be worth downstream? Per identity,
the last ``hold`` images of an identity-folder target (natural order, as ``sources.read_identity_folders``
lists them) are held back: ``<out>/target`` gets every other image (links to the originals), so the study's
train / test split of that folder never sees the held images, and ``<out>/oracle`` is a synthetic-set
folder (``manifest.jsonl`` with ``source: synthetic``) of the held images under their identity. A study row
trained on ``<out>/target`` with ``<out>/oracle`` as its synthetic set is the ceiling of a synthetic set
added the same way; its real-only rows must run on ``<out>/target`` too (the test images are the same).
An identity needs more than ``hold`` images plus the study's ``train_per_identity`` (checked when the study
reads the folder). Writes nothing over an existing ``<out>``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from rgsd_lightning.data.records import IdentityRecord, by_identity, write_manifest
from rgsd_lightning.data.sources import read_identity_folders


def split(source: str | os.PathLike, out: str | os.PathLike, hold: int) -> dict[str, int]:
    """Write ``<out>/target`` (links to all but the last ``hold`` images of each identity) and
    ``<out>/oracle`` (a synthetic set of those); returns the counts."""
    if isinstance(hold, bool) or hold < 1:
        raise ValueError(f"hold must be a positive int, got {hold!r}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or pick another --out (nothing was written)")
    records = read_identity_folders(source)
    groups = by_identity(records)
    short = [name for name, group in groups.items() if len(group) <= hold]
    if short:
        raise ValueError(f"identities with no more than hold={hold} images: {short[:5]}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        raise FileExistsError(f"{tmp} is left from an interrupted run: remove it")
    held: list[IdentityRecord] = []
    for identity, group in groups.items():
        folder = tmp / "target" / identity
        folder.mkdir(parents=True)
        for r in group[:-hold]:
            (folder / Path(r.path).name).symlink_to(Path(r.path).resolve())
        held += [
            IdentityRecord(str(Path(r.path).resolve()), identity, source="synthetic") for r in group[-hold:]
        ]
    (tmp / "oracle").mkdir()
    write_manifest(tmp / "oracle" / "manifest.jsonl", held)
    tmp.rename(out)
    return {"identities": len(groups), "target_images": len(records) - len(held), "held": len(held)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks oracle_split", description=__doc__.split("\n")[0])
    p.add_argument("--source", default="../shared/data/orl_faces", help="identity folders of the target")
    p.add_argument("--out", default="runs/utility/faces_oracle/data", help="folder to create")
    p.add_argument("--hold", type=int, default=2, help="images held back per identity (the last ones)")
    args = p.parse_args(argv)
    counts = split(args.source, args.out, args.hold)
    print(f"{args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
