"""The synthetic-set format (rgsd_lightning.data.synthetic_set) on hand-made sets; the writer, the audit and
the importer that use it are tested end to end in test_cold_start, test_privacy and test_import_synthetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rgsd_lightning.data.synthetic_set import (
    completed_rows,
    image_intact,
    image_path,
    integrity_fields,
    read_card,
    read_rows,
    safe_name,
    summarize,
)
from rgsd_lightning.io import encode_png, save_png


def test_identity_names_cannot_escape_the_set():
    assert safe_name("../../etc") == "______etc" and safe_name("") == "_" and safe_name("id-7_a") == "id-7_a"
    assert str(image_path("a/b", 3)) == "images/a_b/0000000003.png"


def test_rows_skip_only_a_torn_last_line(tmp_path):
    path = tmp_path / "manifest.rank0.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "pa')
    assert read_rows(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"rank0\.jsonl:2"):
        read_rows(path)
    assert read_rows(tmp_path / "absent.jsonl") == []


def test_an_image_is_intact_when_size_and_hash_match(tmp_path):
    data = encode_png(np.zeros((4, 4, 3), dtype=np.uint8))
    row = {"path": "images/a/0000000001.png", "identity": "a", "seed": 1, **integrity_fields(data)}
    save_png(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / row["path"])
    assert image_intact(tmp_path, row)
    save_png(np.ones((4, 4, 3), dtype=np.uint8), tmp_path / row["path"])  # same size, other pixels
    assert not image_intact(tmp_path, row)
    legacy = {k: v for k, v in row.items() if k not in ("bytes", "sha256")}
    assert image_intact(tmp_path, legacy)  # without the fields: it must decode
    (tmp_path / row["path"]).write_bytes(data[:20])
    assert not image_intact(tmp_path, legacy)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(legacy) + "\n")
    assert completed_rows(tmp_path) == {}


def test_card_io_and_summary(tmp_path):
    assert read_card(tmp_path) == {}
    (tmp_path / "card.json").write_text("[1]")
    with pytest.raises(ValueError, match="card.json must hold a JSON object"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("{")
    with pytest.raises(ValueError, match="card.json: not valid JSON"):
        read_card(tmp_path)
    rows = [{"identity": "b", "sem": 0.5}, {"identity": "a", "sem": 0.1}, {"identity": "b", "sem": 0.3}]
    summary = summarize(rows)
    assert summary["num_images"] == 3 and summary["num_identities"] == 2
    assert list(summary["per_identity"]) == ["a", "b"] and summary["per_identity"]["b"]["count"] == 2
    assert summary["per_identity"]["b"]["sem_mean"] == pytest.approx(0.4)
    assert summary["reward_stats"]["sem"]["max"] == 0.5 and set(summary["reward_stats"]) == {"sem"}
