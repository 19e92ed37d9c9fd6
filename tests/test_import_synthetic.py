"""rgsd import-synthetic: external one-folder-per-identity sets become synthetic sets the datamodule reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rgsd_lightning.cli import main as rgsd_main
from rgsd_lightning.commands.import_synthetic import (
    import_synthetic,
    main,
    read_identity_map,
    target_identities,
)
from rgsd_lightning.data.records import read_manifest


def _external_set(root: Path, folders: dict[str, int]) -> Path:
    """Folders of small RGB images (like a released synthetic face set)."""
    rng = np.random.default_rng(0)
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i:03d}.jpg")
    (root / "README.txt").write_text("not an image folder entry")
    return root


@pytest.fixture()
def external(tmp_path) -> Path:
    return _external_set(tmp_path / "dcface", {"id_a": 3, "id_b": 2, "id_c": 2})


def test_identity_map_renames_and_datamodule_reads_the_set(external, toy_faces, tmp_path):
    from rgsd_lightning import IdentityDataModule

    names = sorted(target_identities(toy_faces))
    mapping = tmp_path / "map.txt"
    mapping.write_text(f"# external -> target\nid_a {names[0]}\nid_b,{names[1]}\n\nid_c {names[2]}\n")
    out = tmp_path / "imported"
    result = import_synthetic(external, out, identity_map=mapping, known_identities=set(names))
    assert result.num_images == 7 and result.unknown == []
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_original = {}
    for row in rows:
        by_original.setdefault(row["original_identity"], set()).add(row["identity"])
        assert row["source"] == "synthetic" and Path(row["path"]).is_absolute()  # referenced in place
        assert Path(row["path"]).is_file() and Path(row["path"]).parent.parent == external.resolve()
    assert by_original == {"id_a": {names[0]}, "id_b": {names[1]}, "id_c": {names[2]}}
    card = json.loads((out / "card.json").read_text())
    assert card["num_images"] == 7 and card["per_identity"][names[0]]["count"] == 3
    assert card["generator"]["stage"] == "external"

    dm = IdentityDataModule(
        root=toy_faces,
        format="toy_faces",
        task="face",
        train_per_identity=3,
        synthetic=[str(out)],
        synthetic_fraction=0.5,
        face_size=16,
        p=4,
        k=2,
        verification=[{"kind": "auto", "num_pairs": 20}],
    )
    assert len(dm.synthetic_records) == 7
    assert {r.identity for r in dm.synthetic_records} == set(names[:3])
    assert all(r.source == "synthetic" for r in dm.synthetic_records)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # synthetic images decode through the face transform
    assert batch["image"].shape[1:] == (3, 16, 16) and bool(batch["is_synthetic"].any())


def test_unknown_identities_error_names_them_and_drop_reports_them(external, toy_faces, tmp_path):
    names = sorted(target_identities(toy_faces))
    mapping = {"id_a": names[0], "id_b": "nobody"}  # id_c unmapped, id_b maps outside the target
    with pytest.raises(ValueError, match=r"2 identity folders are unknown.*'id_b', 'id_c'"):
        import_synthetic(external, tmp_path / "x", identity_map=mapping, known_identities=set(names))
    assert not (tmp_path / "x" / "manifest.jsonl").exists()

    result = import_synthetic(
        external, tmp_path / "y", identity_map=mapping, known_identities=set(names), unknown="drop"
    )
    assert result.unknown == ["id_b", "id_c"] and result.dropped_images == 4 and result.num_images == 3
    records = read_manifest(tmp_path / "y" / "manifest.jsonl")
    assert {r.identity for r in records} == {names[0]}
    card = json.loads((tmp_path / "y" / "card.json").read_text())
    assert card["imported"]["unknown_identities"] == ["id_b", "id_c"]

    with pytest.raises(ValueError, match="unknown.*'id_a'"):  # no map: folder names must be target names
        import_synthetic(external, tmp_path / "z", known_identities=set(names))


def test_copy_makes_a_self_contained_set_and_existing_manifest_is_protected(external, tmp_path):
    out = tmp_path / "copied"
    result = import_synthetic(external, out, copy=True)
    assert result.identities == ["id_a", "id_b", "id_c"]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert all(not json.loads(line)["path"].startswith("/") for line in lines)  # relative: inside out/
    moved = tmp_path / "moved"
    out.rename(moved)
    records = read_manifest(moved / "manifest.jsonl")
    assert len(records) == 7 and all(Path(r.path).is_file() for r in records)
    with pytest.raises(FileExistsError, match="overwrite"):
        import_synthetic(external, moved)
    import_synthetic(external, moved, overwrite=True)


def test_identity_map_files_and_cli(external, tmp_path, capsys):
    json_map = tmp_path / "map.json"
    json_map.write_text(json.dumps({"id_a": "s1", "id_b": "s2", "id_c": "s3"}))
    assert read_identity_map(json_map) == {"id_a": "s1", "id_b": "s2", "id_c": "s3"}
    bad = tmp_path / "bad.txt"
    bad.write_text("id_a s1 extra\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'folder identity'"):
        read_identity_map(bad)
    with pytest.raises(FileNotFoundError, match="identity map not found"):
        read_identity_map(tmp_path / "missing.txt")

    out = tmp_path / "cli"
    args = ["--folder", str(external), "--output", str(out), "--identity-map", str(json_map)]
    assert rgsd_main(["import-synthetic", *args]) == 0  # registered as an rgsd command
    assert "imported 7 images of 3 identities" in capsys.readouterr().out
    assert {r.identity for r in read_manifest(out / "manifest.jsonl")} == {"s1", "s2", "s3"}
    code = main(["--folder", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    assert code == 1 and "identity folder not found" in capsys.readouterr().err
