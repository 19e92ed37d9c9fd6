"""Generator exports shipped inside the package, referenced as ``builtin:<name>`` wherever a generator
export path is accepted (``ColdStartDiT(pretrained=...)``, ``RewardDPOK(generator=...)``,
``SyntheticGenerator(export=...)``, ``build_dit``, ``DiTGenerator.from_pretrained``).

A shipped export is a generator export folder ``rgsd_lightning/assets/<name>/`` (``transformer/``,
``scheduler/``, ``labels.json``, ``generator.json``, ``provenance.json``), installed as package data
(``pyproject.toml``). The toy prior ``builtin:toy_prior`` is re-created by
``python -m rgsd_lightning fit --config experiments/toy/prior.yaml`` (its ``provenance.json`` says how it
was made).
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).resolve().parent
"""Where the shipped exports live (read at call time, so tests may point it at a folder of their own)."""


def builtin_names() -> list[str]:
    """Names of the shipped exports (the folders here holding a ``labels.json``)."""
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "labels.json").is_file())


def is_builtin(source: object) -> bool:
    """Whether ``source`` is a ``builtin:<name>`` reference."""
    return isinstance(source, str) and source.startswith(BUILTIN_PREFIX)


def resolve_builtin(source: str | os.PathLike) -> str | os.PathLike:
    """``builtin:<name>`` -> the shipped export's folder (a str); anything else is returned unchanged.

    Raises FileNotFoundError naming the available exports when ``<name>`` is not one of them.
    """
    if not is_builtin(source):
        return source
    name = str(source)[len(BUILTIN_PREFIX) :]
    folder = ASSETS_DIR / name
    plain_name = bool(name) and not any(c in name for c in "/\\") and not name.startswith(".")
    if not plain_name or not (folder / "labels.json").is_file():
        raise FileNotFoundError(
            f"{source!r}: no such built-in generator export (in {ASSETS_DIR}); "
            f"available: {builtin_names() or 'none'}"
        )
    return str(folder)
