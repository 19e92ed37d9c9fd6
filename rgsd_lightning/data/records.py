"""Identity records and the JSONL manifest format shared by every stage.

A record names one image: where it is, whose identity it shows, which camera took it, whether it is
real or synthetic, and which split it belongs to. Parsers turn dataset folders into records; the
synthetic-set writer turns generated images into records; manifests store records on disk.

Manifest format: one JSON object per line with the keys ``path``, ``identity``, ``camera``,
``source``, ``split`` and any extra per-image fields (seed, sampler settings, reward components...).
Paths inside a manifest are stored relative to the manifest's folder when the image lies below it,
so a synthetic set can be moved or shared as one folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rgsd_lightning.io import atomic_write_text

Source = Literal["real", "synthetic"]
_CORE_KEYS = ("path", "identity", "camera", "source", "split")


@dataclass(frozen=True)
class IdentityRecord:
    """One image of one identity.

    Attributes:
        path: image file (absolute, or relative to the working directory).
        identity: identity name as the dataset spells it (``"0002"``, ``"s17"``, ``"yaleB05"``).
        camera: 0-based camera index; ``-1`` when the dataset has no cameras.
        source: ``"real"`` or ``"synthetic"``.
        split: ``"train"``, ``"query"``, ``"gallery"``, ``"test"`` or ``"prior"``.
        extra: further per-image fields kept in the manifest (never used for equality).
    """

    path: str
    identity: str
    camera: int = -1
    source: Source = "real"
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.source not in ("real", "synthetic"):
            raise ValueError(
                f"record {self.path!r}: source must be 'real' or 'synthetic', not {self.source!r}"
            )
        if not isinstance(self.identity, str) or not self.identity:
            raise ValueError(
                f"record {self.path!r}: identity must be a non-empty string, not {self.identity!r}"
            )

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """The manifest row for this record (path made relative to ``relative_to`` when below it)."""
        path = self.path if relative_to is None else relative_if_below(self.path, relative_to)
        row = {"path": path, "identity": self.identity, "camera": self.camera, "source": self.source}
        row["split"] = self.split
        for key, value in self.extra.items():
            if key in _CORE_KEYS:
                raise ValueError(f"record {self.path!r}: extra field {key!r} shadows a core manifest key")
            row[key] = value
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any], base_dir: str | os.PathLike | None = None) -> IdentityRecord:
        """Build a record from a manifest row; relative paths are resolved against ``base_dir``."""
        missing = [k for k in ("path", "identity") if k not in row]
        if missing:
            raise ValueError(f"manifest row lacks {missing}: {row!r}")
        path = str(row["path"])
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(str(base_dir), path)
        extra = {k: v for k, v in row.items() if k not in _CORE_KEYS}
        return cls(
            path=path,
            identity=str(row["identity"]),
            camera=int(row.get("camera", -1)),
            source=row.get("source", "real"),
            split=str(row.get("split", "train")),
            extra=extra,
        )


def by_identity(records: Sequence[IdentityRecord]) -> dict[str, list[IdentityRecord]]:
    """Records grouped by identity (insertion order kept)."""
    out: dict[str, list[IdentityRecord]] = {}
    for r in records:
        out.setdefault(r.identity, []).append(r)
    return out


def relative_if_below(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` relative to ``base`` when it lies below it, else ``path`` as given."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return str(path) if rel.startswith("..") else rel


def write_manifest(path: str | os.PathLike, records: Iterable[IdentityRecord]) -> Path:
    """Write records as a JSONL manifest, atomically. Paths below the manifest's folder become relative."""
    path = Path(path)
    base = path.parent
    lines = [json.dumps(r.to_json(relative_to=base)) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def iter_manifest(path: str | os.PathLike) -> Iterator[IdentityRecord]:
    """Yield the records of a JSONL manifest; a malformed line raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield IdentityRecord.from_json(row, base_dir=path.parent)
            except (json.JSONDecodeError, ValueError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: bad manifest row ({err})") from err


def read_manifest(path: str | os.PathLike) -> list[IdentityRecord]:
    """All records of a JSONL manifest."""
    return list(iter_manifest(path))
