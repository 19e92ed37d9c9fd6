"""``rgsd import-synthetic``: turn an external synthetic image set into a synthetic set of this library.

Synthetic face sets released with other papers (SFace, IDnet, DCFace, IDiff-Face, NegFaceDiff...) usually
come as one folder per identity. This command writes ``manifest.jsonl`` (one row per image: path,
identity, ``source: synthetic``, the original folder name) and ``card.json`` (counts per identity, where
the images came from) into ``--output``, so ``IdentityDataModule(synthetic=[output])``, ``rgsd audit`` and
the utility study accept the set like one written by generation.

* Images are referenced where they are (absolute paths in the manifest), or copied into
  ``<output>/images/<identity>/<folder>/`` with ``--copy`` (the set is then self-contained and movable).
* ``--identity-map FILE`` renames folders onto the target dataset's identity names: a JSON object
  ``{"folder": "identity"}`` or a text file with one ``folder identity`` pair per line (comma or
  whitespace separated, ``#`` comments). Folders the map does not name are *unknown*.
* ``--target ROOT`` (with ``--target-format``) checks the final names against the target dataset's
  training identities; names it does not hold are *unknown* too.
* Unknown identities are reported: an error listing them (default), or ``--unknown drop`` to leave them
  out (listed in the output and in ``card.json``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.data import sources
from rgsd_lightning.data.listing import natural_key
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.data.synthetic_set import (
    IMAGES,
    MANIFEST,
    manifest_path,
    safe_name,
    summarize,
    write_card,
)

TargetFormat = Literal["identity_folders", "market1501", "cuhk03np", "manifest"]
TARGET_FORMATS = get_args(TargetFormat)


@dataclass
class ImportResult:
    """What an import wrote.

    Attributes:
        output: the synthetic set folder.
        num_images: images in the manifest.
        identities: identity names in the manifest (sorted).
        unknown: source folders whose identity is unknown (not in the map / not in the target).
        dropped_images: images left out because their identity is unknown.
    """

    output: Path
    num_images: int
    identities: list[str]
    unknown: list[str] = field(default_factory=list)
    dropped_images: int = 0


def read_identity_map(path: str | Path) -> dict[str, str]:
    """An identity map file: a JSON object ``{folder: identity}`` or ``folder identity`` lines.

    Args:
        path: the map file (``.json``, or text with one pair per line, comma or whitespace separated;
            blank lines and ``#`` comments are skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identity map not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON document ({err})") from err
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
        ):
            raise ValueError(f"{path}: expected a JSON object of folder name -> identity name strings")
        return dict(mapping)
    mapping = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].replace(",", " ").split()
        if not body:
            continue
        if len(body) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'folder identity', got {line.strip()!r}")
        if body[0] in mapping and mapping[body[0]] != body[1]:
            raise ValueError(f"{path}:{lineno}: folder {body[0]!r} is mapped twice")
        mapping[body[0]] = body[1]
    if not mapping:
        raise ValueError(f"{path}: the identity map is empty")
    return mapping


def target_identities(
    root: str | Path, fmt: str = "identity_folders", cuhk03_variant: str | None = None
) -> set:
    """The training identity names of a target dataset (what imported identities must match).

    Args:
        root: dataset folder (or manifest file for ``manifest``).
        fmt: one of ``identity_folders``, ``market1501``, ``cuhk03np``, ``manifest``.
        cuhk03_variant: ``labeled`` or ``detected`` for ``cuhk03np``.
    """
    if fmt == "identity_folders":
        return {r.identity for r in sources.read_identity_folders(root)}
    if fmt == "market1501":
        return {r.identity for r in sources.read_market1501(root)["train"]}
    if fmt == "cuhk03np":
        if cuhk03_variant is None:
            raise ValueError("target format cuhk03np needs cuhk03_variant 'labeled' or 'detected'")
        return {r.identity for r in sources.read_cuhk03np(root, cuhk03_variant)["train"]}
    if fmt == "manifest":
        return {r.identity for r in read_manifest(manifest_path(root)) if r.split == "train"}
    raise ValueError(f"unknown target format {fmt!r}; expected one of {TARGET_FORMATS}")


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def import_synthetic(
    folder: str | Path,
    output: str | Path,
    *,
    identity_map: dict[str, str] | str | Path | None = None,
    copy: bool = False,
    known_identities: set[str] | None = None,
    unknown: Literal["error", "drop"] = "error",
    name: str | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Write ``manifest.jsonl`` + ``card.json`` for a one-folder-per-identity image set.

    Args:
        folder: the external set (one sub-folder per identity, images directly inside).
        output: the synthetic set folder to write.
        identity_map: folder -> identity renames (a dict or a map file); folders it lacks are unknown.
        copy: copy the images into ``output/images`` instead of referencing them where they are.
        known_identities: the target's identity names; final names outside it are unknown.
        unknown: "error" (raise, listing the unknown folders) or "drop" (leave their images out).
        name: a display name for the set (card.json; default the folder's name).
        overwrite: replace an existing manifest in ``output``.
    """
    source = Path(folder).expanduser().resolve()
    out = Path(output).expanduser().resolve()
    if unknown not in ("error", "drop"):
        raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    if out == source or source in out.parents:
        raise ValueError(f"output {out} must not lie inside the imported folder {source}")
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} exists: pass overwrite=True (--overwrite) to replace it")
    mapping = read_identity_map(identity_map) if isinstance(identity_map, str | Path) else identity_map
    records = sources.read_identity_folders(source)
    folders = sorted({r.identity for r in records}, key=natural_key)
    rename = {f: (mapping.get(f) if mapping is not None else f) for f in folders}
    bad = [f for f in folders if rename[f] is None]
    if known_identities is not None:
        bad += [f for f in folders if rename[f] is not None and rename[f] not in known_identities]
    bad = sorted(set(bad), key=natural_key)
    if bad and unknown == "error":
        why = []
        if mapping is not None:
            why.append("the identity map does not name them")
        if known_identities is not None:
            why.append("their names are not identities of the target dataset")
        raise ValueError(
            f"{source}: {len(bad)} identity folders are unknown ({' or '.join(why)}): "
            f"{_listing(bad)}; fix the identity map or pass unknown='drop' (--unknown drop)"
        )
    kept = [r for r in records if r.identity not in bad]
    if not kept:
        raise ValueError(f"{source}: no images left to import (every identity folder is unknown)")
    rows: list[IdentityRecord] = []
    for r in kept:
        identity = rename[r.identity]
        path = Path(r.path)
        if copy:
            dest = out / IMAGES / safe_name(identity) / safe_name(r.identity) / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            path = dest
        extra = {"original_identity": r.identity, "imported": True}
        rows.append(IdentityRecord(str(path), identity, -1, "synthetic", "train", extra))
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / MANIFEST, rows)
    dropped = len(records) - len(kept)
    summary = summarize([r.to_json() for r in rows])
    card = {
        "name": name or source.name,
        "generator": {"stage": "external", "source": str(source), "fingerprint": None},
        "imported": {
            "folder": str(source),
            "copied": copy,
            "identity_map": None if mapping is None else len(mapping),
            "checked_against_target": known_identities is not None,
            "unknown_identities": bad,
            "dropped_images": dropped,
        },
        **summary,
    }
    write_card(out, card)
    return ImportResult(out, len(rows), sorted(summary["per_identity"]), bad, dropped)


def command(
    folder: str,
    output: str,
    identity_map: str | None = None,
    copy: bool = False,
    target: str | None = None,
    target_format: TargetFormat = "identity_folders",
    cuhk03_variant: Literal["labeled", "detected"] | None = None,
    unknown: Literal["error", "drop"] = "error",
    name: str | None = None,
    overwrite: bool = False,
) -> int:
    """Import an external synthetic set laid out as one folder per identity (e.g. samples released by SFace,
    IDnet, DCFace, IDiff-Face or NegFaceDiff) as a synthetic set: manifest.jsonl + card.json in --output,
    accepted by the datamodule's `synthetic:` list and the utility study.

    Args:
        folder: the external set: one sub-folder of images per identity.
        output: synthetic set folder to write.
        identity_map: file renaming folders onto the target's identity names (JSON object or 'folder
            identity' lines); folders it does not name are unknown.
        copy: copy the images into OUTPUT/images (default: reference).
        target: target dataset whose training identities the names must match.
        target_format: layout of the target dataset.
        cuhk03_variant: target format cuhk03np: which boxes.
        unknown: unknown identities: fail listing them (default) or leave their images out.
        name: display name of the set (default: the folder's name).
        overwrite: replace an existing manifest in --output.
    """
    try:
        known = target_identities(target, target_format, cuhk03_variant) if target else None
        result = import_synthetic(
            folder,
            output,
            identity_map=identity_map,
            copy=copy,
            known_identities=known,
            unknown=unknown,
            name=name,
            overwrite=overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"rgsd import-synthetic: error: {err}", file=sys.stderr)
        return 1
    print(
        f"imported {result.num_images} images of {len(result.identities)} identities into "
        f"{result.output / MANIFEST} ({'copied' if copy else 'referenced'})"
    )
    if result.unknown:
        print(
            f"left out {result.dropped_images} images of {len(result.unknown)} unknown identities: "
            f"{_listing(result.unknown)}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd import-synthetic`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd import-synthetic")


if __name__ == "__main__":
    raise SystemExit(main())
