"""The speed benchmarks: the entry point writes complete reports; each comparison compares equal things."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import common, speed  # noqa: E402
from rgsd_lightning.evaluation import reid_map_cmc  # noqa: E402


# ------------------------------------------------------------------------------------ the quick run
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[int, Path]:
    """One in-process ``python -m benchmarks speed --quick`` run shared by the tests below."""
    out = tmp_path_factory.mktemp("speed")
    threads = torch.get_num_threads()
    rc = bench_main.main(["speed", "--quick", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == threads  # --threads is restored after the run
    return rc, out


@pytest.mark.slow  # long: the whole speed benchmark at quick size
def test_quick_run_writes_json_and_markdown(quick_report):
    rc, out = quick_report
    assert rc == 0
    report = json.loads((out / "speed.json").read_text())
    assert report["errors"] == {}
    assert set(report["results"]) == {"sampler", "reid", "selection", "dpok"}
    env = report["environment"]
    assert env["torch_threads"] == 1 and env["torch"] == torch.__version__ and env["date_utc"]

    sampler = report["results"]["sampler"]["rows"]
    assert {(r["preset"], r["guidance_scale"]) for r in sampler} == {
        (p, w) for p in ("tiny", "small") for w in (1.0, 4.0)
    }
    for row in sampler:
        assert row["ratio_ours_over_pipeline"] == pytest.approx(row["pipeline_s"] / row["ours_s"])
        assert row["image_shape"][0] == 3
        # Same model, scheduler, labels and noise: the two samplers must produce the same images.
        assert row["max_abs_pixel_diff"] < 1e-4

    reid = report["results"]["reid"]
    assert set(reid["median_s"]) == {
        "ours_reid_evaluate",
        "ours_reid_map_cmc_on_distmat",
        "torchreid_style_per_query",
        "lean_per_query",
        "full_distance_matrix_only",
    }
    for diffs in reid["equality_vs_torchreid_style"].values():
        assert diffs["max_abs_diff_mAP"] < 1e-6 and diffs["max_abs_diff_cmc"] < 1e-6
    assert reid["memory_method"] in ("rss_hwm", "tracemalloc")

    selection = report["results"]["selection"]["report"]["results"]
    assert {"no_selection", "selection_full", "selection_head", "deepcopy_reference"} <= set(selection)

    (dpok,) = report["results"]["dpok"]["rows"]
    for key in ("sampling_s", "reward_s", "update_s"):
        assert dpok[key] > 0
    assert dpok["total_s"] == pytest.approx(dpok["sampling_s"] + dpok["reward_s"] + dpok["update_s"])
    assert dpok["logp_check_first_round"] < 1e-4  # fp32: the recompute reproduces the rollout
    census = dpok["census"]
    assert census["no_second_copy"] and census["reference_extra_bytes"] == 0
    assert census["generator_base_bytes"] > 0 and 0 < census["lora_bytes"] < census["generator_base_bytes"]

    md = (out / "speed.md").read_text()
    for heading in ("## 1. Sampler", "## 2. ReID", "## 3. Lookahead", "## 4. RewardDPOK", "torch threads"):
        assert heading in md
    assert "FAILED" not in md


def test_bad_arguments_are_refused(tmp_path):
    assert bench_main.main(["nonsense"]) == 2
    with pytest.raises(ValueError, match="unknown measurement"):
        speed.run_speed(tmp_path, quick=True, only=["sampler", "typo"])
    with pytest.raises(ValueError, match="threads"):
        with speed.torch_threads(0):
            pass


# ------------------------------------------------------------------------------------ ReID references
def _random_case(seed: int, num_q: int = 30, num_g: int = 120):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, 8, num_q)
    g_pids = rng.integers(-1, 8, num_g)  # -1 junk, 0 distractors, 1..7 identities
    q_cams = rng.integers(0, 3, num_q)
    g_cams = rng.integers(0, 3, num_g)
    distmat = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)  # coarse values: many exact ties
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_references_agree_with_reid_map_cmc(seed):
    case = _random_case(seed)
    cmc, mean_ap = reid_map_cmc(*case, max_rank=10)
    for reference in (speed.reid_per_query_reference, speed.reid_per_query_lean):
        ref_cmc, ref_map = reference(*case, max_rank=10)
        np.testing.assert_allclose(ref_cmc, cmc, rtol=0, atol=1e-12)
        assert ref_map == pytest.approx(mean_ap, abs=1e-12)


def test_per_query_references_on_a_hand_worked_case():
    # Query: identity 1, camera 0. Ranked gallery: id 2 (cam 1), id 1 (cam 1), id 1 (cam 0: junk, removed),
    # id -1 (junk), id 1 (cam 2), id 0 (distractor). Junk-free list: [2, 1, 1, 0] -> hits at ranks 2 and 3.
    distmat = np.array([[0.1, 0.2, 0.3, 0.35, 0.4, 0.5]])
    args = (
        distmat,
        np.array([1]),
        np.array([2, 1, 1, -1, 1, 0]),
        np.array([0]),
        np.array([1, 1, 0, 2, 2, 0]),
    )
    for reference in (speed.reid_per_query_reference, speed.reid_per_query_lean):
        cmc, mean_ap = reference(*args, max_rank=5)
        assert mean_ap == pytest.approx((1 / 2 + 2 / 3) / 2)
        np.testing.assert_array_equal(cmc, [0, 1, 1, 1, 1])
    no_match = (distmat, np.array([5]), *args[2:])
    with pytest.raises(ValueError, match="no query"):
        speed.reid_per_query_reference(*no_match)


def test_market_like_features_have_the_market_structure():
    data = speed.market_like_features(
        num_query=90, num_gallery=400, num_ids=20, num_distractors=60, num_cameras=6, dim=16
    )
    assert data["q_feats"].shape == (90, 16) and data["g_feats"].shape == (400, 16)
    assert data["q_feats"].dtype == np.float32
    assert (data["g_pids"] == 0).sum() == 60 and set(np.unique(data["q_pids"])) == set(range(1, 21))
    pairs = list(zip(data["q_pids"].tolist(), data["q_camids"].tolist(), strict=True))
    assert len(pairs) == len(set(pairs))  # at most one query per identity and camera
    same_cam = [(p, c) in pairs for p, c in zip(data["g_pids"], data["g_camids"], strict=True) if p > 0]
    assert any(same_cam) and not all(same_cam)  # same-camera junk exists, and cross-camera matches too
    with pytest.raises(ValueError, match="one query per camera"):
        speed.market_like_features(
            num_query=200, num_ids=10, num_cameras=6, num_gallery=400, num_distractors=10
        )


# ------------------------------------------------------------------------------------ helpers
def test_interleaved_times_alternates_and_skips_warmup():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b")}
    times, first = common.interleaved_times(fns, 3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3] and first == {"a": "a", "b": "b"}
    with pytest.raises(ValueError, match="repeats"):
        common.interleaved_times(fns, 0)


def test_rss_meter_sees_a_large_allocation():
    def allocate():
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        return float(block.sum())

    _, peak, method = common.measure_peak(allocate)
    assert peak >= 30 * 2**20, (peak, method)
    _, small_peak, _ = common.measure_peak(lambda: None)
    assert small_peak < 10 * 2**20


def test_census_detects_a_second_generator_copy():
    cfg = dict(speed.QUICK["dpok"])
    with tempfile.TemporaryDirectory() as tmp:
        export = speed.make_generator_export("tiny", cfg["num_identities"], tmp)
        # models other tests left alive in this process are not copies: only what each build adds counts
        before = speed.live_parameters()
        lora = speed.parameter_census(speed.build_dpok(export, cfg, torch.device("cpu")), before)
        before = speed.live_parameters()
        model = speed.build_dpok(export, cfg, torch.device("cpu"), trainable="all")
        full = speed.parameter_census(model, before)
    assert lora["no_second_copy"] and lora["reference_extra_bytes"] == 0 and lora["lora_bytes"] > 0
    # trainable="all" keeps a frozen deep copy as KL reference: the census must see a second generator.
    assert not full["no_second_copy"]
    assert full["reference_extra_bytes"] >= full["generator_base_bytes"] > 0


def test_census_ignores_unrelated_modules():
    module = torch.nn.Linear(3, 3)
    twin = copy.deepcopy(module)
    storages = speed._storages(list(module.parameters()) + list(module.parameters()))
    assert sum(storages.values()) == (9 + 3) * 4  # shared tensors counted once
    assert set(storages).isdisjoint(speed._storages(twin.parameters()))


# ------------------------------------------------------------------------------------ the GPU script
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_sh_skips_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "gpu")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA" in proc.stdout
    assert not (tmp_path / "gpu").exists()  # nothing measured, nothing written


@pytest.mark.slow  # long: every GPU measurement at toy size
def test_gpu_scale_code_path_runs_at_toy_size_on_cpu(tmp_path):
    with speed.torch_threads(1):
        report = speed.run_gpu_scale(tmp_path, device="cpu", quick=True)
    assert report is not None and report["errors"] == {}, report["errors"]
    assert set(report["results"]) == {"sampler", "recognizer", "reid", "selection", "dpok"}
    sampler = report["results"]["sampler"]
    assert sampler["forward_flops_counted"] > 0 and "AttnProcessor2_0" in sampler["attention_processors"]
    for row in sampler["rows"]:
        assert row["ours_mfu_counted"] > 0 and row["max_abs_pixel_diff"] < 0.05  # bf16 autocast on both
    fast = sampler["fast"]
    assert fast["fast_method"] == "dpmsolver" and fast["ratio_fast_over_pipeline"] > 0
    assert report["results"]["recognizer"]["step_flops_counted"] > 0
    assert report["results"]["dpok"]["rows"][0]["census"]["no_second_copy"]
    md = (tmp_path / "speed_gpu.md").read_text()
    assert "Recognizer training step" in md and "FAILED" not in md


@pytest.mark.slow  # multi-stage: a pipeline of four stages
def test_init_rows_quick_compares_both_rows_and_keeps_stage_folders_out_of_the_results(tmp_path):
    from benchmarks import init_rows

    out, work = tmp_path / "results", tmp_path / "work"
    report = init_rows.run(out, quick=True, work=work)
    assert set(report["rows"]) == {"zero", "null"}
    for row in report["rows"].values():
        assert np.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0
        assert 0.0 <= row["fidelity_w1"] <= 1.0 and 0.0 <= row["fidelity_w3"] <= 1.0
    assert sorted(p.name for p in out.iterdir()) == ["init_rows_quick.json", "init_rows_quick.md"]
    assert json.loads((out / "init_rows_quick.json").read_text())["rows"] == report["rows"]
    table = (out / "init_rows_quick.md").read_text()
    assert "| zero |" in table and "| null |" in table
    assert (work / "prior" / "export").is_dir() and (work / "cold_zero").is_dir()


@pytest.mark.slow
def test_rl_modes_quick_scores_every_mode(tmp_path):
    from benchmarks import rl_modes

    out, work = tmp_path / "results", tmp_path / "work"
    report = rl_modes.run(out, work, quick=True)
    assert set(report["modes"]) == {"dpok", "windowed", "draft"}
    assert set(report["sets"]) == {"cold", "dpok", "windowed", "draft"}
    dpok = report["modes"]["dpok"]
    assert dpok["round_cost_vs_dpok"] == 1.0 and dpok["rollouts"] == 2
    for mode in report["modes"].values():
        assert mode["round"]["round_s"] > 0 and np.isfinite(mode["reward_gain"]["raw"])
    for s in report["sets"].values():
        assert 0.0 <= s["judge"]["fidelity"] <= 1.0 and np.isfinite(s["reward"]["raw"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["rl_modes_quick.json", "rl_modes_quick.md", "rl_modes_quick.png"]
        + [f"rl_modes_quick_curves_{m}.png" for m in ("dpok", "windowed", "draft")]
    )
    md = (out / "rl_modes_quick.md").read_text()
    assert "| windowed DPOK |" in md and md.count("## Round cost") == 1 and "Judge `judge`: trained on" in md
    assert "![RL modes](rl_modes_quick.png)" in md and "`rl_modes_quick_curves_<mode>.png`" in md


@pytest.mark.slow
def test_fast_sampling_quick_measures_the_curve_against_the_pipeline(tmp_path):
    from benchmarks import fast_sampling

    with speed.torch_threads(1):
        report = fast_sampling.run(tmp_path / "out", quick=True, work=tmp_path / "work")
    rows = report["rows"]
    assert rows[0]["kind"] == "pipeline" and rows[0]["speed_ratio"] == 1.0
    assert {r["method"] for r in rows[1:]} == {"dpmsolver", "ddim"}
    assert report["pipeline_vs_ours_ddim_max_abs_pixel_diff"] < 1e-4  # the shimmed pipeline is our DDIM
    for row in rows:
        assert row["quality"]["num_images"] == report["settings"]["num_images"] and row["quality"]["fid"] >= 0
    chosen = report["chosen"]
    if chosen is not None:
        match = next(r for r in rows if r["name"] == chosen["name"])
        assert match["quality"]["fid"] <= report["fid_limit"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["fast_sampling_quick.json", "fast_sampling_quick.md", "fast_sampling_quick.png"]


@pytest.mark.slow
def test_selection_scope_quick_probes_both_scopes_and_decides(tmp_path):
    from benchmarks import selection_scope

    with speed.torch_threads(1):
        report = selection_scope.run(tmp_path / "out", quick=True, work=tmp_path / "work")
    agree = report["agreement"]["summary"]["all"]
    assert 0.0 <= agree["jaccard"] <= 1.0 and -1.0 <= agree["spearman"] <= 1.0
    assert report["rows"]["full"]["runs"][0]["agreement"]["batches"] > 0
    assert "test/mAP" in report["rows"]["head"] and report["decision"]["scope"] in ("full", "head")
    assert "Default: `selection.scope:" in (tmp_path / "out" / "selection_scope_quick.md").read_text()


def test_selection_scope_agreement_maths_on_a_hand_case():
    from benchmarks.selection_scope import agreement, chance_overlap, jaccard, spearman

    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert chance_overlap(16, 8) == {"topk_agreement": 0.5, "jaccard": pytest.approx(1 / 3)}
    entry = {
        "step": 0,
        "index": [10, 11, 12, 13],
        "delta_full": [-2.0, -1.0, 1.0, 2.0],
        "delta_head": [-1.0, 1.0, -2.0, 2.0],
        "keep_full": [True, True, False, False],
        "keep_head": [True, False, True, False],
    }
    out = agreement([entry], correct={10: True, 11: True, 12: False, 13: False})
    row = out["summary"]["all"]
    assert row["topk_agreement"] == 0.5 and row["jaccard"] == pytest.approx(1 / 3)
    assert row["spearman"] == pytest.approx(0.4)  # ranks (0,1,2,3) vs (1,2,0,3): 1 - 6*6/(4*15)
    assert row["precision_full"] == 1.0 and row["precision_head"] == 0.5 and row["precision_all"] == 0.5


def test_selection_variants_ground_truth_and_decision_on_a_hand_case(tmp_path):
    from benchmarks.selection_variants import decide, is_correct, mislabel_map, write_noisy_set

    assert mislabel_map([1, 2, 3, 4, 5, 6, 7, 8]) == {1: 2, 5: 6}
    assert mislabel_map([1, 2, 3, 4]) == {1: 2} and mislabel_map([1, 2, 3, 4, 5], every=2)[5] == 1  # cyclic
    folder = write_noisy_set(tmp_path / "set", [1, 2], per_id=2, wrong={1: 2})
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["identity"] for r in rows] == ["0002"] * 4  # identity 1 drawn under identity 2's label
    assert [is_correct(str(folder / r["path"])) for r in rows] == [False, False, True, True]

    def row(mean, std, kept):
        return {"test/mAP": {"mean": mean, "std": std}, "selection_precision": {"precision_kept": kept}}

    rows = {"a": row(0.50, 0.02, 0.80), "b": row(0.49, 0.02, 0.95), "c": row(0.40, 0.02, 0.99)}
    decision = decide(rows, ["a", "b", "c"])
    # c has the best precision but its mAP is far below the best; b is within the pooled std of a
    assert decision["variant"] == "b" and decision["candidates"] == ["a", "b"]
    assert decision["pooled_std"] == pytest.approx(0.02)
    rows["d"] = row(0.50, 0.02, 0.955)  # listed later, better by less than the margin: the earlier one stays
    assert decide(rows, ["a", "b", "c", "d"])["variant"] == "b"
    rows["d"] = row(0.50, 0.02, 0.97)
    assert decide(rows, ["a", "b", "c", "d"])["variant"] == "d"


@pytest.mark.slow
def test_selection_variants_quick_runs_every_variant(tmp_path):
    from benchmarks import selection_variants

    report = selection_variants.run(tmp_path / "out", quick=True, work=tmp_path / "work")
    rows = report["rows"]
    assert list(rows) == [
        "real_only",
        "no_selection",
        "batch_smallest",
        "real_smallest",
        "batch_negative",
        "real_negative",
    ]
    for name, entry in rows.items():
        assert 0.0 <= entry["test/mAP"]["mean"] <= 1.0
        prec = entry.get("selection_precision")
        assert (prec is None) == (name in ("real_only", "no_selection"))
        if prec is not None:
            assert 0.0 < prec["precision_seen"] < 1.0 and 0.0 < prec["kept_share"] <= 0.5 + 1e-9
    assert report["decision"]["variant"] in rows
    assert "**Chosen:" in (tmp_path / "out" / "selection_variants_quick.md").read_text()


def test_prior_recipe_reads_checkpoints_of_the_flat_and_the_grouped_config():
    from benchmarks.prior_recipe import cold_start_arguments

    flat = {"num_identities": 4, "sampler": "ddpm", "sample_steps": 7, "clip_x0": True, "grid_identities": 0}
    args = cold_start_arguments({**flat, "gone_option": 1})
    assert args == {
        "num_identities": 4,
        "sampler": {"method": "ddpm", "steps": 7, "clip_x0": True},
        "grid": {"identities": 0},
    }
    grouped = {"num_identities": 4, "sampler": {"method": "ddim", "steps": 5}, "grid": {"identities": 2}}
    assert cold_start_arguments(grouped) == grouped


@pytest.mark.slow  # several small trainings and judges
def test_prior_recipe_quick_runs_every_section(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from benchmarks.prior_recipe import _Flipped
    from rgsd_lightning import ColdStartDiT
    from rgsd_lightning.diffusion import DiTGenerator

    work, out = tmp_path / "work", tmp_path / "out"
    # a training run with one checkpoint, for the checkpoints section
    run = tmp_path / "prior_run"
    model = ColdStartDiT(3, preset="tiny", image_size=32, trainable="all", grid={"identities": 0})
    images, labels = torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 0, 1, 1, 2, 2])
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    trainer.fit(model, DataLoader(_Flipped(images, labels), batch_size=3))
    trainer.save_checkpoint(run / "checkpoints" / "epoch=0-step=2.ckpt")
    prior = work / "priors" / "recipe_1500" / "export"
    argv = ["prior_recipe", "--quick", "--sections", "overfit,ingredients,samplers,cold,checkpoints"]
    argv += ["--variants", "recipe_1500", "--cold", "table_1e-2_600", "--prior", str(prior)]
    argv += ["--run", str(run), "--work", str(work), "--out", str(out)]
    assert bench_main.main(argv) == 0
    report = json.loads((out / "prior_recipe_quick.json").read_text())
    results = report["results"]
    assert set(results) == {"overfit", "ingredients", "samplers", "cold", "checkpoints"}
    recipe = results["ingredients"]["recipe_1500"]
    assert recipe["train"]["steps"] == 10 and set(recipe["samplers"]) == {"ddim50_w2", "ddim50_w2_noclip"}
    for scores in recipe["samplers"].values():
        assert 0.0 <= scores["fidelity"] <= 1.0 and scores["fid"] >= 0
        assert (out / "prior_recipe_quick" / scores["grid"]).is_file()
    # the recipe's options reached the trained prior: cosine schedule in its export
    assert DiTGenerator.from_pretrained(prior).scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert results["overfit"]["recipe_1500"]["train"]["steps"] == 10
    cold = next(iter(results["cold"].values()))
    assert 0.0 <= cold["guidance"]["2"]["near_copy_fraction"] <= 1.0
    (entry,) = results["checkpoints"].values()
    assert entry["step"] == 2
    md = (out / "prior_recipe_quick.md").read_text()
    for title in ("Overfit check", "Ingredients", "Samplers on prior", "Cold start", "Steps: checkpoints"):
        assert title in md


def test_verdict_table_and_checks_from_hand_made_study_reports(tmp_path):
    from benchmarks.verdict import markdown, verdict

    def row(stage, mean, std=0.01, metric="test/id_acc"):
        return {"stage": stage, "mean": {metric: mean}, "std": {metric: std}}

    faces = {
        "sections": [
            {"rows": [row("k1_real", 0.60), row("k1_erasing", 0.70), row("k1_cold", 0.55)]},
            {"rows": [row("k1_rl", 0.58)]},
            {"rows": [row("k1_rl_selection", 0.61), row("k1_erasing_rl_selection", 0.715)]},
            {"rows": [row("k1_rl_filtered_selection", 0.62), row("k1_erasing_rl_filtered_selection", 0.705)]},
            {"rows": [row("k1_private_selection", 0.64), row("k1_erasing_private_selection", 0.72)]},
            {"rows": [row("k1_rl_windowed_selection", 0.63), row("k1_erasing_rl_windowed_selection", 0.69)]},
            {"rows": [row("k3_real", 0.80), row("k3_rl_selection", 0.79)]},  # k3 is missing rows: not met
            {"rows": [{"stage": "k1_rl_selection", "mean": {"kept_share": 0.5}}]},  # a selection section
        ]
    }
    (tmp_path / "utility_faces.json").write_text(json.dumps(faces))
    table = verdict(tmp_path)  # no utility_reid.json: every cell "-", nothing met
    k1 = table["ORL 1-shot, identification %"]
    assert k1["cells"]["real only"] == pytest.approx((60.0, 1.0))
    assert k1["floor"] is True and k1["goal"] is True  # 61, 62 >= 60 and 71.5 >= 70 + 1 (by 0.5 point)
    assert k1["goal, filtered"] is False  # 70.5 < 70 + 1
    assert k1["goal, copy-free"] is True  # 72 >= 70 + 1
    assert k1["goal, windowed"] is False  # 69 < 70 + 1
    margins = k1["margins"]  # lowest selection row - real only; each goal's row - Random Erasing
    assert margins["floor"] == pytest.approx(1.0) and margins["goal"] == pytest.approx(1.5)
    assert margins["goal, filtered"] == pytest.approx(0.5)
    assert margins["goal, windowed"] == pytest.approx(-1.0)
    k3 = table["ORL 3-shot, identification %"]
    assert k3["floor"] is False and k3["goal"] is False  # 79 < 80; no Random Erasing rows
    assert k3["margins"]["floor"] is None and k3["margins"]["goal"] is None  # rows missing: no margin
    reid = table["4-dataset ReID, mAP %"]
    assert all(c is None for c in reid["cells"].values()) and not reid["floor"] and not reid["goal"]
    assert reid["goal, copy-free"] is None and reid["goal, windowed"] is None  # not in the ReID study
    reid_rows = [row(f"all_{s}", 0.15, metric="test/mAP") for s in ("real", "erasing", "rl_selection")]
    reid_rows += [
        row(f"all_{s}", 0.16, metric="test/mAP") for s in ("erasing_rl_selection", "rl_filtered_selection")
    ]
    reid_rows += [row("all_erasing_rl_filtered_selection", 0.16, metric="test/mAP")]
    (tmp_path / "utility_reid.json").write_text(json.dumps({"sections": [{"rows": reid_rows}]}))
    reid = verdict(tmp_path)["4-dataset ReID, mAP %"]
    assert reid["floor"] is True and reid["goal"] is True  # copy-free columns do not count against it
    reid_marks = "| n/a | n/a | n/a | n/a | met (+0.00) | met (+1.00) | met (+1.00) | n/a | n/a |"
    assert reid_marks in markdown({"r": reid})
    text = markdown(table)
    assert (
        "| ORL 1-shot, identification % ‡ | 60.0 ± 1.0 | 70.0 ± 1.0 |" in text
        and "**72.0 ± 1.0**" in text
        and "| 71.5 ± 1.0 |" in text
        and "| met (+1.00) | met (+1.50) | missed (+0.50) | missed (-1.00) | met (+2.00) |" in text
    )
    assert "| missed | missed | missed | missed | missed |" in text  # k3: rows missing, no margins


def test_verdict_paired_differences_against_scipy_and_a_hand_worked_case(tmp_path):
    from scipy.stats import ttest_rel

    from benchmarks.verdict import paired, paired_markdown, seed_values, verdict

    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.3027 from a t table -> half-width 4.3027 / sqrt(3)
    a, b = {"_s0": 2.0, "_s1": 3.0, "_s2": 4.0}, {"_s0": 1.0, "_s1": 1.0, "_s2": 1.0}
    p = paired(a, b, threshold=0.0)
    assert p["mean"] == pytest.approx(2.0) and p["n"] == 3
    assert p["high"] - p["mean"] == pytest.approx(4.3027 / 3**0.5, rel=1e-4)
    ci = ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert (p["low"], p["high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert p["status"] == "unresolved"  # -0.48 < 0 < 4.48
    assert paired(a, b, threshold=-1.0)["status"] == "met"  # low -0.48 >= -1
    assert paired(a, b, threshold=5.0)["status"] == "missed"  # high 4.48 < 5
    # rows pair by seed, not by position: a row missing seed 1 pairs on seeds 0 and 2 only
    row_a = {"stage": "k1_x", "runs": [{"m": 0.5}, {"m": 0.7}], "copies": ["k1_x_s0", "k1_x_s2"]}
    row_b = {
        "stage": "k1_y",
        "runs": [{"m": 0.4}, {"m": 0.9}, {"m": 0.5}],
        "copies": ["k1_y_s0", "k1_y_s1", "k1_y_s2"],
    }
    va, vb = seed_values(row_a, "m"), seed_values(row_b, "m")
    assert va == pytest.approx({"_s0": 50.0, "_s2": 70.0})
    assert paired(va, vb, 0.0)["mean"] == pytest.approx(15.0)  # (10 + 20) / 2, seed 1 of b left out
    # reports written before rows named their copies pair by position, and only when the lengths agree
    old_a = seed_values({"stage": "x", "runs": [{"m": 0.5}, {"m": 0.7}]}, "m")
    assert paired(old_a, seed_values({"stage": "y", "runs": [{"m": 0.4}, {"m": 0.5}]}, "m"), 0.0)["n"] == 2
    assert paired(old_a, seed_values({"stage": "y", "runs": [{"m": 0.4}]}, "m"), 0.0) is None
    assert paired(old_a, {"#0": 1.0, "#1": 2.0, "#2": 3.0}, 0.0) is None
    assert (
        seed_values({"stage": "x", "runs": [{"other": 1.0}]}, "m") is None and seed_values(None, "m") is None
    )

    def row(stage, values, metric="test/id_acc"):
        runs = [{metric: v} for v in values]
        mean = sum(values) / len(values)
        return {
            "stage": stage,
            "runs": runs,
            "copies": [f"{stage}_s{i}" for i in range(len(values))],
            "mean": {metric: mean},
            "std": {metric: 0.0},
        }

    rows = [row("k1_real", [0.60, 0.70, 0.65]), row("k1_erasing", [0.70, 0.72, 0.74])]
    rows += [row("k1_rl_selection", [0.62, 0.71, 0.66]), row("k1_erasing_rl_selection", [0.72, 0.74, 0.75])]
    (tmp_path / "utility_faces.json").write_text(json.dumps({"sections": [{"rows": rows}]}))
    k1 = verdict(tmp_path)["ORL 1-shot, identification %"]
    goal = k1["paired"]["goal"]  # per-seed gains 2, 2, 1 points over Random Erasing
    assert goal["mean"] == pytest.approx(5 / 3) and goal["n"] == 3
    assert k1["paired"]["floor"] is None  # the study's other selection rows have not run: no floor test
    assert k1["paired"]["goal, windowed"] is None
    text = paired_markdown({"ORL 1-shot": k1})
    assert text.splitlines()[2].startswith("| ORL 1-shot ‡ | 3 | - | +1.67 [")


def seeded_row(stage: str, values: list[float], metric: str = "test/id_acc") -> dict:
    """A study report's table row of ``stage`` with one run per seed (its copies ``<stage>_s<i>``)."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {
        "stage": stage,
        "runs": [{metric: v} for v in values],
        "copies": [f"{stage}_s{i}" for i in range(len(values))],
        "mean": {metric: mean},
        "std": {metric: std},
    }


def test_verdict_recipes_and_the_photometric_rows_in_the_floor(tmp_path):
    from benchmarks.verdict import OUTSIDE_NOTE, REPLAYED_NOTE, markdown, recipes_markdown, verdict

    rows = [
        seeded_row("k1_real", [0.20, 0.22, 0.24]),
        seeded_row("k1_erasing", [0.21, 0.23, 0.25]),
        seeded_row("k1_rl_selection", [0.25, 0.27, 0.29]),
        seeded_row("k1_erasing_rl_selection", [0.26, 0.28, 0.30]),
        seeded_row("k1_erasing_rl_windowed_selection", [0.24, 0.26, 0.28]),
        seeded_row("k1_photometric", [0.40, 0.42, 0.44]),  # the best real-only recipe
        # below "real only": the floor is missed
        seeded_row("k1_photometric_rl_selection", [0.19, 0.21, 0.23]),
        seeded_row("k1_erasing_photometric", [0.38, 0.40, 0.42]),
        seeded_row("k1_erasing_photometric_rl_selection", [0.39, 0.42, 0.43]),  # gains +1, +2, +1 points
        # from prior images: +5 each
        seeded_row("k1_erasing_photometric_sdedit60_selection", [0.43, 0.45, 0.47]),
    ]
    (tmp_path / "faces_recognizer_budget_k1_yale.json").write_text(json.dumps({"sections": [{"rows": rows}]}))
    yale = verdict(tmp_path)["Extended Yale B 1-shot, 36-epoch recognizers"]
    assert yale["floor"] is False and yale["margins"]["floor"] == pytest.approx(-1.0)
    assert yale["paired"]["floor"]["mean"] == pytest.approx(-1.0)  # photometric_rl_selection - real
    assert yale["goal"] is True  # the goal still compares with Random Erasing alone
    by_name = {r["recipe"]: r for r in yale["recipes"] if r["set"] == "RL"}
    assert [(r["recipe"], r["set"]) for r in yale["recipes"]] == [
        ("none", "RL"),
        ("Random Erasing", "RL"),
        ("photometric jitter", "RL"),
        ("Random Erasing + photometric jitter", "RL"),
        ("Random Erasing + photometric jitter", "RL from prior images, strength 0.6"),
    ]
    assert [r["best"] for r in yale["recipes"]] == [False, False, True, False, False]
    sdedit = yale["recipes"][-1]["paired"]
    assert sdedit["mean"] == pytest.approx(5.0) and sdedit["status"] == "met"  # +5 on every seed
    assert by_name["photometric jitter"]["paired"]["mean"] == pytest.approx(-21.0)
    gain = by_name["Random Erasing + photometric jitter"]["paired"]
    assert gain["mean"] == pytest.approx(4 / 3) and gain["status"] == "unresolved"  # sd 0.58 over 3 seeds
    # the first table flags the setting: its best real-only recipe has no column there
    first = markdown({"Yale": yale})
    assert first.splitlines()[2].startswith("| Yale ‡ † |")  # ‡: measured before the sampler fix
    assert first.endswith("\n" + OUTSIDE_NOTE + "\n" + REPLAYED_NOTE)
    text = recipes_markdown({"Yale": yale})
    assert (
        "| Yale ‡ | **photometric jitter** | 42.0 ± 2.0 | RL | 21.0 ± 2.0 | -21.00 [-21.00, -21.00] missed |"
        in text
    )
    # a study without the photometric rows: the two recipes it ran, its floor over its own columns
    (tmp_path / "faces_recognizer_budget_k1_yale.json").write_text(
        json.dumps({"sections": [{"rows": rows[:5]}]})
    )
    yale = verdict(tmp_path)["Extended Yale B 1-shot, 36-epoch recognizers"]
    assert [r["recipe"] for r in yale["recipes"]] == ["none", "Random Erasing"]
    assert yale["floor"] is True and yale["margins"]["floor"] == pytest.approx(4.0)
    assert "†" not in markdown({"Yale": yale})  # Random Erasing, a column of the first table, is best


def test_verdict_marks_the_settings_measured_before_the_sampler_fix(tmp_path):
    """The 3-shot from-prior-images rows before the fix (‡) and after it, before common random numbers (§):
    each file is read as its own setting, each mark brings its footnote, and a table of settings measured
    with both (the ReID study) carries no mark and no footnote."""
    from benchmarks.verdict import (
        REPLAYED_NOTE,
        SHARED_NOTE,
        markdown,
        paired_markdown,
        recipes_markdown,
        verdict,
    )

    def rows(real: list[float], synthetic: list[float]) -> list[dict]:
        stages = ("rl_selection", "erasing_rl_selection", "erasing_sdedit80_selection")
        return [seeded_row("k3_real", real)] + [seeded_row(f"k3_{s}", synthetic) for s in stages]

    before, after = rows([0.80, 0.84], [0.78, 0.82]), rows([0.82, 0.86], [0.83, 0.87])
    for study, found in (("prior", before), ("sdedit90", after)):  # sdedit90: the resampled rows and more
        report = json.dumps({"sections": [{"rows": found}]})
        (tmp_path / f"faces_recognizer_budget_k3_{study}.json").write_text(report)
    table = verdict(tmp_path)
    old, new = (
        "ORL 3-shot, 36-epoch recognizers, 8 seeds",
        "ORL 3-shot, 36-epoch recognizers, 8 seeds, sampler fixed",
    )
    assert table[old]["replayed"] is True and table[new]["replayed"] is False
    assert table[old]["shared_stream"] is False and table[new]["shared_stream"] is True
    assert table[old]["margins"]["floor"] == pytest.approx(-2.0) and table[new]["margins"][
        "floor"
    ] == pytest.approx(1.0)
    text = markdown({old: table[old], new: table[new]})
    assert f"| {old} ‡ | **82.0 ± 2.8** |" in text and f"| {new} § | 84.0 ± 2.8 |" in text
    assert text.endswith("\n" + REPLAYED_NOTE + "\n" + SHARED_NOTE)
    for render in (markdown, paired_markdown, recipes_markdown):
        assert "‡" not in render({new: table[new]})
        assert f"| {old} ‡ |" in render({old: table[old]})
        assert f"| {new} § |" in render({new: table[new]})
    (tmp_path / "utility_reid.json").write_text(
        json.dumps({"sections": [{"rows": [seeded_row("all_real", [0.2, 0.3], "test/mAP")]}]})
    )
    reid = verdict(tmp_path)["4-dataset ReID, mAP %"]
    text = markdown({"ReID": reid})
    assert "| ReID |" in text and "‡" not in text and "§" not in text


def test_verdict_counts_the_sets_from_prior_images_without_augmentation_in_the_floor(tmp_path):
    from benchmarks.verdict import verdict

    rows = [
        seeded_row("k3_real", [0.80, 0.84]),
        seeded_row("k3_erasing", [0.90, 0.92]),
        seeded_row("k3_rl_selection", [0.81, 0.85]),
        seeded_row("k3_erasing_rl_selection", [0.90, 0.93]),
        # the lowest selection row: 2 points under "real only"
        seeded_row("k3_sdedit80_selection", [0.79, 0.81]),
        # +2 points over Random Erasing on both seeds
        seeded_row("k3_erasing_sdedit80_selection", [0.92, 0.94]),
        # the no-generator control: a diagnostic, not in the floor
        seeded_row("k3_lowfreq_selection", [0.50, 0.50]),
    ]
    report = json.dumps({"sections": [{"rows": rows}]})
    (tmp_path / "faces_recognizer_budget_k3_prior.json").write_text(report)
    k3 = verdict(tmp_path)["ORL 3-shot, 36-epoch recognizers, 8 seeds"]
    assert k3["floor"] is False and k3["margins"]["floor"] == pytest.approx(-2.0)
    assert k3["paired"]["floor"]["mean"] == pytest.approx(-2.0)  # sdedit80_selection - real, per seed
    assert k3["goal, from prior images"] is True
    assert k3["margins"]["goal, from prior images"] == pytest.approx(2.0)
    assert k3["goal, windowed"] is None  # a column the setting has by design not
    assert k3["cells"]["+ RL synthetic + selection"][0] == pytest.approx(83.0)
    assert [(r["recipe"], r["set"]) for r in k3["recipes"]] == [
        ("none", "RL"),
        ("Random Erasing", "RL"),
        ("none", "RL from prior images, strength 0.8"),
        ("none", "control: training image + prior images' low frequencies"),
        ("Random Erasing", "RL from prior images, strength 0.8"),
    ]


def test_verdict_compares_the_retrained_rows_with_the_same_seeds_before_the_fix(tmp_path):
    """Before: seeds 0-3 of a row; after: seeds 0-1 of it (and a row the earlier run lacks): the means are
    over seeds 0-1 only, and a row without common seeds is left out."""
    from benchmarks.verdict import refits, refits_markdown

    before = [seeded_row("k1_erasing", [0.70, 0.72, 0.90, 0.90])]
    after = [seeded_row("k1_erasing", [0.75, 0.73]), seeded_row("k1_new_selection", [0.5, 0.5])]
    for study, rows in (("seed_noise_faces_k1", before), ("seed_noise_faces_k1_resampled", after)):
        (tmp_path / f"{study}.json").write_text(json.dumps({"sections": [{"rows": rows}]}))
    (row,) = refits(tmp_path)  # the 3-shot pair has no files: skipped
    assert row["stage"] == "k1_erasing" and row["seeds"] == 2
    assert row["before"] == pytest.approx(71.0) and row["after"] == pytest.approx(74.0)
    assert "| ORL 1-shot, 36-epoch recognizers | k1_erasing | 2 | 71.0 | 74.0 | +3.0 |" in refits_markdown(
        [row]
    )


def test_verdict_pairs_a_report_without_run_names_with_a_retrained_one_by_position_only_at_equal_length(
    tmp_path,
):
    """The ReID study's report before the fix has no ``copies`` (its runs are keyed "#0", "#1", ...): it pairs
    with the retrained report's seeds in order when both have as many runs, and not at all otherwise."""
    from benchmarks.verdict import refits

    def positional(stage: str, values: list[float]) -> dict:
        row = seeded_row(stage, values, metric="test/mAP")
        del row["copies"]
        return row

    before = [positional("all_real", [0.14, 0.15, 0.13]), positional("all_erasing", [0.12, 0.13])]
    after = [
        seeded_row("all_real", [0.17, 0.18, 0.16], metric="test/mAP"),
        seeded_row("all_erasing", [0.16, 0.17, 0.15], metric="test/mAP"),
    ]
    for study, rows in (("utility_reid_replayed", before), ("utility_reid", after)):
        (tmp_path / f"{study}.json").write_text(json.dumps({"sections": [{"rows": rows}]}))
    (row,) = refits(tmp_path)  # all_erasing: 2 runs before, 3 after - which is which seed is unknown
    assert (row["setting"], row["stage"], row["seeds"]) == ("4-dataset ReID, mAP %", "all_real", 3)
    assert row["before"] == pytest.approx(14.0) and row["after"] == pytest.approx(17.0)


def test_verdict_headline_keeps_the_current_protocol_settings_with_their_paired_checks(tmp_path, capsys):
    """The headline holds the settings measured after the sampler fix with common random numbers and the
    default recipe only: a ‡ study (before the fix) and a BatchNorm-variant study are left out. Its floor is
    the lowest selection row paired with "real only" (differences 0, -2, -4 points: mean -2, sd 2, t(0.975,
    2) = 4.3027), its goal "+ RE + RL syn + sel" paired with "+ RE" against +1 (differences 1, 2, 3: mean 2,
    sd 1); --out writes every table."""
    from benchmarks.verdict import current, headline_markdown, main, verdict

    def rows(real, erasing, rl_selection, erasing_rl_selection, prefix="k3", metric="test/id_acc"):
        found = zip(
            ("real", "erasing", "rl_selection", "erasing_rl_selection"),
            (real, erasing, rl_selection, erasing_rl_selection),
            strict=True,
        )
        return {"sections": [{"rows": [seeded_row(f"{prefix}_{s}", v, metric) for s, v in found]}]}

    crn = rows([0.80, 0.80, 0.80], [0.90, 0.90, 0.90], [0.80, 0.78, 0.76], [0.91, 0.92, 0.93])
    (tmp_path / "faces_common_random.json").write_text(json.dumps(crn))
    (tmp_path / "utility_faces.json").write_text(json.dumps(crn))  # before the sampler fix: ‡
    reid = rows(*[[0.2, 0.2, 0.2]] * 4, prefix="all", metric="test/mAP")
    (tmp_path / "reid_synthetic_norm.json").write_text(json.dumps(reid))  # a variant of the recipe
    table = verdict(tmp_path)
    assert list(current(table)) == ["ORL 3-shot, 8 seeds, common random numbers"]
    half = 4.302653 / 3**0.5  # t times sd 1 over sqrt(n)
    text = headline_markdown(table)
    floor = f"-2.00 [{-2 - 2 * half:+.2f}, {-2 + 2 * half:+.2f}] unresolved"  # sd 2
    goal = f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}] unresolved"  # differences 1, 2, 3 points: sd 1
    means = "80.0 ± 0.0 | 90.0 ± 0.0 | 78.0 ± 2.0 | 92.0 ± 1.0"
    line = f"| ORL 3-shot, 8 seeds, common random numbers | 3 | {means} | {floor} | {goal} |"
    assert line in text and "ORL 3-shot, identification %" not in text and "ReID" not in text
    assert main(["--results", str(tmp_path), "--headline"]) == 0
    assert line in capsys.readouterr().out
    assert main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert written["settings"]["ORL 3-shot, 8 seeds, common random numbers"]["study"] == "faces_common_random"
    md = (tmp_path / "out" / "verdict.md").read_text()
    assert line in md and "| ORL 3-shot, identification % ‡ |" in md  # the full tables keep every setting
    with pytest.raises(SystemExit):  # --out would be ignored: refused instead
        main(["--results", str(tmp_path), "--headline", "--out", str(tmp_path / "both")])
    assert not (tmp_path / "both").exists()


def test_parallel_jobs_summary_against_hand_made_runs():
    from benchmarks.parallel_jobs import markdown, parse_mode, summarise

    assert parse_mode("2x1") == (2, 1) and parse_mode("1X2") == (1, 2) and parse_mode("2xauto") == (2, None)
    for bad in ("2", "ax1", "0x2", "1xauto"):
        with pytest.raises(ValueError, match="mode"):
            parse_mode(bad)
    stage = {"a": {"seconds": 60.0, "metrics": {"test/mAP": 0.50}}, "b": {"seconds": 120.0, "metrics": {}}}
    other = {"a": {"seconds": 80.0, "metrics": {"test/mAP": 0.52}}, "b": {"seconds": 150.0, "metrics": {}}}
    rows = summarise(
        [{"mode": "1x2", "wall_s": 600.0, "stages": stage}, {"mode": "2x1", "wall_s": 400.0, "stages": other}]
    )
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == pytest.approx(1.5)
    assert rows[1]["stage_seconds"] == 230.0 and rows[1]["max_metric_gap"] == pytest.approx(0.02)
    assert rows[0]["max_metric_gap"] == 0.0
    env = {
        "date_utc": "d",
        "cpu": "c",
        "logical_cpus": 2,
        "torch_threads": 2,
        "platform": "p",
        "python": "3",
        "torch": "t",
        "numpy": "n",
        "diffusers": "f",
        "cuda": None,
    }
    md = markdown({"environment": env, "command": "x", "settings": {"study": "s"}, "results": rows})
    assert "| `2x1` | 6.7 | 1.50x | 2 | 3.8 | 2.0 |" in md


def test_list_schedule_follows_the_runners_rule_on_a_hand_case():
    from benchmarks.parallel_jobs import list_schedule

    # prior (10) -> cold (4) -> rl (6); real_s0, real_s1 (3 each) need nothing; row (2) needs rl and real_s0
    names = ["prior", "real_s0", "real_s1", "cold", "rl", "row"]
    deps = {
        "prior": set(),
        "real_s0": set(),
        "real_s1": set(),
        "cold": {"prior"},
        "rl": {"cold"},
        "row": {"rl", "real_s0"},
    }
    seconds = {"prior": 10.0, "real_s0": 3.0, "real_s1": 3.0, "cold": 4.0, "rl": 6.0, "row": 2.0}
    assert list_schedule(names, deps, seconds, 1) == 28.0  # the sum
    # 2 workers: prior 0-10 | real_s0 0-3, real_s1 3-6; cold 10-14; rl 14-20; row 20-22
    assert list_schedule(names, deps, seconds, 2) == 22.0
    # a free worker skips ahead to a ready stage instead of waiting for the next one in order: with the
    # real rows at 8 s and listed after cold, worker 2 runs them while prior runs (22; waiting in strict
    # order for cold would give 26)
    seconds.update(real_s0=8.0, real_s1=8.0)
    order = ["prior", "cold", "real_s0", "real_s1", "rl", "row"]
    assert list_schedule(order, deps, seconds, 2) == 22.0
    with pytest.raises(ValueError, match="never run"):
        list_schedule(["a"], {"a": {"b"}}, {"a": 1.0}, 2)


def test_lighting_spread_statistics_by_hand_and_on_a_made_target(tmp_path):
    from PIL import Image

    from benchmarks.lighting_spread import lighting_stats, main, spread
    from rgsd_lightning.data import IdentityRecord, write_manifest

    # a 2x4 image lit from the left: left half 0.8, right half 0.2 (mean 0.5, std 0.3, left-right +0.6)
    image = np.array([[0.8, 0.8, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])
    np.testing.assert_allclose(lighting_stats(image), [0.5, 0.3, 0.6])
    # an odd width: the middle column belongs to neither half
    np.testing.assert_allclose(lighting_stats(np.array([[1.0, 0.0, 0.0]]))[2], 1.0)
    with pytest.raises(ValueError, match="grey"):
        lighting_stats(np.zeros((2, 2, 3)))
    stats = {
        "a": np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0]]),
        "b": np.array([[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]),
    }
    np.testing.assert_allclose(spread(stats), [0.25, 0.5, 1.0])  # (0.5 + 0) / 2, (1 + 0) / 2, (2 + 0) / 2
    with pytest.raises(ValueError, match="two images"):
        spread({"a": np.zeros((1, 3))})

    # a target of 2 identities: a flat training image, test images lit from the left and from the right
    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((array * 255).round().astype(np.uint8)).save(path)
        return path

    flat = np.full((8, 8), 0.5)
    lit = np.concatenate([np.full((8, 4), 0.75), np.full((8, 4), 0.25)], axis=1)
    for name in ("p1", "p2"):
        save(tmp_path / "target" / name / "1.png", flat)
        save(tmp_path / "target" / name / "2.png", lit)
        save(tmp_path / "target" / name / "3.png", lit[:, ::-1])
        save(tmp_path / "target" / name / "9_Ambient.png", np.zeros((8, 8)))  # left out by --exclude
    # a synthetic set of copies of the training image: no spread, no distance
    syn = [
        IdentityRecord(str(save(tmp_path / "syn" / f"{n}_{i}.png", flat)), n, source="synthetic")
        for n in ("p1", "p2")
        for i in (0, 1)
    ]
    write_manifest(tmp_path / "syn" / "manifest.jsonl", syn)
    (tmp_path / "run" / "copies").mkdir(parents=True)
    (tmp_path / "run" / "copies" / "synthetic").symlink_to(tmp_path / "syn")
    # a stage the run reused from another run: its stage.json points at the set where it lies
    (tmp_path / "run" / "reused").mkdir()
    marker = {"name": "reused", "output": str(tmp_path / "syn"), "reused_from": str(tmp_path / "other")}
    (tmp_path / "run" / "reused" / "stage.json").write_text(json.dumps(marker))
    (tmp_path / "run" / "loose").symlink_to(tmp_path / "syn")  # a set written straight into the run folder
    argv = ["--target", str(tmp_path / "target"), "--run", str(tmp_path / "run")]
    argv += ["--sets", "copies", "reused", "loose"]
    argv += ["--size", "8", "--out", str(tmp_path / "out"), "--name", "spread"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "out" / "spread.json").read_text())["results"]
    test = rows["test images (real, held out)"]
    assert test["identities"] == 2
    # left-right +-0.5 over the two test images: spread 0.5; brightness and contrast equal: spread 0
    np.testing.assert_allclose(test["spread"], [0.0, 0.0, 0.5], atol=2e-3)
    jitter = rows["training image + photometric jitter 0.4"]["spread"]
    assert jitter[0] > 0.02 and abs(jitter[2]) < 1e-9  # the jitter moves brightness, never the side light
    copies = rows["synthetic: copies"]
    np.testing.assert_allclose(copies["spread"], 0.0, atol=1e-12)
    np.testing.assert_allclose(copies["distance"], 0.0, atol=1e-12)
    assert "| synthetic: copies | 2 |" in (tmp_path / "out" / "spread.md").read_text()
    assert rows["synthetic: reused"] == copies and rows["synthetic: loose"] == copies


def test_lowfreq_control_by_hand_and_on_a_made_set(tmp_path):
    """The control keeps the training image's detail and takes the start image's low frequencies: a flat
    start image scales a flat training image to its own level, an image given itself is unchanged, and the
    set has one image per image of its source with the same identity, seed and start image."""
    from PIL import Image

    from benchmarks.lowfreq_control import EPS, build, transfer_low_frequencies
    from rgsd_lightning.data import IdentityRecord, read_manifest, write_manifest

    flat, bright = np.full((8, 8), 0.4), np.full((8, 8), 0.6)
    np.testing.assert_allclose(transfer_low_frequencies(flat, bright, 2.0), 0.4 * (0.6 + EPS) / (0.4 + EPS))
    rng = np.random.default_rng(0)
    face = rng.uniform(0.2, 0.8, (8, 8))
    np.testing.assert_allclose(transfer_low_frequencies(face, face, 2.0), face)
    lit = np.concatenate([np.full((8, 4), 0.9), np.full((8, 4), 0.1)], axis=1)  # lit from the left
    out = transfer_low_frequencies(face, lit, 1.0)
    assert out[:, :3].mean() > face[:, :3].mean() and out[:, 5:].mean() < face[:, 5:].mean()
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="one shape"):
        transfer_low_frequencies(face, lit[:4], 1.0)

    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((array * 255).round().astype(np.uint8)).save(path)
        return path

    for name in ("p1", "p2"):
        save(tmp_path / "target" / name / "1.png", flat)
        save(tmp_path / "target" / name / "2.png", lit)
        save(tmp_path / "target" / name / "3.png", face)  # a test image at 2 training images per identity
    start = save(tmp_path / "pool" / "other.png", bright)
    rows = [
        IdentityRecord(
            str(save(tmp_path / "set" / f"{n}_{seed}.png", flat)),
            n,
            source="synthetic",
            extra={"seed": seed, "init_image": str(start)},
        )
        for n in ("p1", "p2")
        for seed in (5, 6)
    ]
    write_manifest(tmp_path / "set" / "manifest.jsonl", rows)
    assert build(tmp_path / "set", tmp_path / "target", tmp_path / "control", sigma=1.0) == 4
    control = read_manifest(tmp_path / "control" / "manifest.jsonl")
    assert sorted((r.identity, r.extra["seed"]) for r in control) == [
        ("p1", 5),
        ("p1", 6),
        ("p2", 5),
        ("p2", 6),
    ]
    level = np.asarray(Image.open(control[0].path), dtype=np.float64) / 255
    np.testing.assert_allclose(level, 0.4 * (0.6 + EPS) / (0.4 + EPS), atol=1 / 255)
    assert all(r.extra["init_image"] == str(start) for r in control)
    assert {r.extra["train_image"] for r in control} == {
        str(tmp_path / "target" / n / "1.png") for n in ("p1", "p2")
    }
    # two training images per identity: its images take them in turn, in seed order (the manifest reversed)
    write_manifest(tmp_path / "set" / "manifest.jsonl", rows[::-1])
    assert build(tmp_path / "set", tmp_path / "target", tmp_path / "k2", train_per_identity=2, sigma=1.0) == 4
    by_key = {(r.identity, r.extra["seed"]): r for r in read_manifest(tmp_path / "k2" / "manifest.jsonl")}
    for n in ("p1", "p2"):
        assert by_key[(n, 5)].extra["train_image"] == str(tmp_path / "target" / n / "1.png")
        assert by_key[(n, 6)].extra["train_image"] == str(tmp_path / "target" / n / "2.png")
    from_lit = np.asarray(Image.open(by_key[("p1", 6)].path), dtype=np.float64) / 255
    expected = transfer_low_frequencies(
        np.asarray(Image.open(tmp_path / "target" / "p1" / "2.png")) / 255, bright, 1.0
    )
    np.testing.assert_allclose(from_lit, expected, atol=1 / 255)
    # a set not generated from images, or of identities without a training image, is refused
    write_manifest(
        tmp_path / "plain" / "manifest.jsonl", [IdentityRecord(rows[0].path, "p1", source="synthetic")]
    )
    with pytest.raises(ValueError, match="no init_image"):
        build(tmp_path / "plain", tmp_path / "target", tmp_path / "c2")
    stranger = IdentityRecord(
        rows[0].path, "p9", source="synthetic", extra={"seed": 1, "init_image": str(start)}
    )
    write_manifest(tmp_path / "stranger" / "manifest.jsonl", [stranger])
    with pytest.raises(ValueError, match="no training image"):
        build(tmp_path / "stranger", tmp_path / "target", tmp_path / "c3")
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_verdict_reads_a_setting_s_selection_columns_from_its_variant_rows(tmp_path):
    """reid_synthetic_norm: the selection columns hold the synthetic_norm real rows; the file's mixed-batch
    rows stay in the third table only."""
    from benchmarks.verdict import verdict

    rows = [
        seeded_row("all_real", [0.17, 0.18], "test/mAP"),
        seeded_row("all_erasing", [0.16, 0.16], "test/mAP"),
        seeded_row("all_rl_selection", [0.10, 0.10], "test/mAP"),  # would miss the floor by 7.5 points
        seeded_row("all_erasing_rl_selection", [0.10, 0.10], "test/mAP"),
        seeded_row("all_rl_realnorm_selection", [0.18, 0.19], "test/mAP"),
        seeded_row("all_erasing_rl_realnorm_selection", [0.18, 0.18], "test/mAP"),
    ]
    (tmp_path / "reid_synthetic_norm.json").write_text(json.dumps({"sections": [{"rows": rows}]}))
    entry = verdict(tmp_path)["4-dataset ReID, synthetic apart in BatchNorm"]
    assert entry["cells"]["+ RL synthetic + selection"][0] == pytest.approx(18.5)
    assert entry["floor"] is True and entry["margins"]["floor"] == pytest.approx(0.5)  # 18.0 - 17.5
    assert entry["goal"] is True and entry["margins"]["goal"] == pytest.approx(2.0)
    assert entry["paired"]["goal"]["mean"] == pytest.approx(2.0)
    sets = {(r["recipe"], r["set"]): r["synthetic"][0] for r in entry["recipes"]}
    assert sets[("none", "RL")] == pytest.approx(10.0)
    assert sets[("none", "RL, synthetic samples apart in BatchNorm")] == pytest.approx(18.5)


def test_verdict_study_pairs_each_row_with_the_real_only_rows_by_seed(tmp_path, capsys):
    """``--study``: every results row against each reference, paired on the seeds both have (a hand-worked
    case), its own reference cell empty; an unknown reference stage is a clear error."""
    from benchmarks.verdict import main, study_pairs

    rows = [
        seeded_row("all_real", [0.20, 0.22, 0.18], "test/mAP"),
        seeded_row("all_erasing", [0.19, 0.20, 0.18], "test/mAP"),
        seeded_row("all_rl_selection", [0.21, 0.24, 0.19], "test/mAP"),  # +1, +2, +1 over real only
    ]
    report = {"sections": [{"rows": rows}]}
    found = {r["stage"]: r for r in study_pairs(report, "test/mAP")}
    assert list(found["all_rl_selection"]["vs"]) == ["all_real", "all_erasing"]
    gain = found["all_rl_selection"]["vs"]["all_real"]
    assert gain["mean"] == pytest.approx(4 / 3) and gain["n"] == 3
    # per-seed gains 1, 2, 1: sd sqrt(1/3), half-width t(0.975, 2) = 4.3027 x sd / sqrt(3) = 1.4342
    assert gain["low"] == pytest.approx(4 / 3 - 1.4342, abs=1e-3)
    assert gain["high"] == pytest.approx(4 / 3 + 1.4342, abs=1e-3)
    assert found["all_rl_selection"]["vs"]["all_erasing"]["mean"] == pytest.approx(7 / 3)
    assert found["all_real"]["vs"]["all_real"] is None
    assert found["all_real"]["mean"] == pytest.approx((20.0, 2.0))
    with pytest.raises(ValueError, match="all_cold"):
        study_pairs(report, "test/mAP", ["all_cold"])
    (tmp_path / "study.json").write_text(json.dumps(report))
    assert main(["--results", str(tmp_path), "--study", "study", "--against", "all_rl_selection"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "| row | seeds | mean ± std | - all_rl_selection |"
    assert "| all_real | 3 | 20.00 ± 2.00 | -1.33 [" in text


def test_verdict_study_merges_the_rows_of_another_report_only_where_the_runs_agree(tmp_path, capsys):
    """``--with``: rows the study lacks come from the other report, a row in both keeps the one with more
    runs, and a seed whose value differs between the two is refused (not the same run)."""
    from benchmarks.verdict import main, merged_stats

    base = {"sections": [{"rows": [
        seeded_row("all_real", [0.20, 0.22, 0.18], "test/mAP"),
        seeded_row("all_rl_selection", [0.21, 0.24, 0.19], "test/mAP"),
    ]}]}  # fmt: skip
    study = {"sections": [{"rows": [
        seeded_row("all_real", [0.20, 0.22], "test/mAP"),  # seeds 0-1 rerun, bit-exact
        seeded_row("all_rl_lsro_selection", [0.23, 0.25, 0.20], "test/mAP"),
    ]}]}  # fmt: skip
    stats = merged_stats(study, [base], "test/mAP")
    assert sorted(stats) == ["all_real", "all_rl_lsro_selection", "all_rl_selection"]
    assert len(stats["all_real"]["runs"]) == 3  # the row with more runs
    for name, report in (("study", study), ("base", base)):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    assert main(["--results", str(tmp_path), "--study", "study", "--with", "base"]) == 0
    text = capsys.readouterr().out
    assert "| all_rl_lsro_selection | 3 | 22.67 ± 2.52 | +2.67 [" in text  # +3, +3, +2 over real only
    clash = {"sections": [{"rows": [seeded_row("all_real", [0.20, 0.21], "test/mAP")]}]}
    with pytest.raises(ValueError, match="all_real_s1: test/mAP is 21.0"):
        merged_stats(clash, [base], "test/mAP")


def _grey_target(root: Path, names: tuple[str, ...], per_identity: int, rng) -> dict[str, list[Path]]:
    """Identity folders under ``root`` of random 16x16 grey PNGs named 1.png, 2.png, ...; their paths."""
    from PIL import Image

    paths: dict[str, list[Path]] = {}
    for name in names:
        for i in range(1, per_identity + 1):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(path)
            paths.setdefault(name, []).append(path)
    return paths


def _grey_recognizer(folder: Path) -> None:
    """An untrained grey 16x16 recognizer export (test_resnet, seed 0) in ``folder``."""
    from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net

    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", in_chans=1).eval()
    save_embedding_net(net, folder, input_size=[16, 16], mean=[0.5], std=[0.5])


def test_novelty_distances_by_hand_and_on_a_made_target(tmp_path):
    """Nearest same-identity distances by hand; end to end, a set of copies of the training images sits at
    distance 0 in both spaces (ratio 0, every image nearer than any new real image), a set of the new real
    images themselves at ratio 1; a set of an unknown identity is a clear error."""

    from benchmarks.novelty import main, nearest_distance, summary
    from rgsd_lightning.data import IdentityRecord, write_manifest

    points = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    anchors = np.array([[0.0, 1.0], [3.0, 0.0], [9.0, 9.0]])
    got = nearest_distance(points, ["a", "a", "b"], anchors, ["a", "a", "b"])
    np.testing.assert_allclose(got, [1.0, 4.0, np.hypot(8.0, 8.0)])  # (0,1); (3,0); (9,9)
    with pytest.raises(ValueError, match="'c' has no training image"):
        nearest_distance(points, ["a", "a", "c"], anchors, ["a", "a", "b"])
    stats = summary(np.array([1.0, 4.0, 2.0]), {"a": 3.0, "b": 1.0}, ["a", "a", "b"])
    assert stats == {"mean": pytest.approx(7 / 3), "median": 2.0, "closer": pytest.approx(1 / 3)}

    rng = np.random.default_rng(0)
    # images 1-2 train, 3 is the judge's too, 4 is new to everyone
    paths = _grey_target(tmp_path / "target", ("p1", "p2"), 4, rng)
    _grey_recognizer(tmp_path / "run" / "judge" / "export" / "backbone")

    def make_set(stage, which):
        records = [
            IdentityRecord(str(p), n, source="synthetic") for n, group in paths.items() for p in which(group)
        ]
        write_manifest(tmp_path / "sets" / stage / "manifest.jsonl", records)
        (tmp_path / "run" / stage).mkdir(parents=True)
        (tmp_path / "run" / stage / "synthetic").symlink_to(tmp_path / "sets" / stage)

    make_set("copies", lambda group: group[:2])
    make_set("new", lambda group: group[3:])
    argv = ["--target", str(tmp_path / "target"), "--run", str(tmp_path / "run")]
    argv += ["--train-per-identity", "2", "--judge-shots", "3", "--size", "16"]
    assert main([*argv, "--sets", "copies", "new", "--out", str(tmp_path / "out"), "--name", "nov"]) == 0
    rows = json.loads((tmp_path / "out" / "nov.json").read_text())["results"]
    reference = rows["new real images (nobody trained on them)"]
    assert reference["images"] == 2 and reference["judge"]["ratio"] == pytest.approx(1.0)
    for space in ("judge", "pixels"):
        copies, new = rows["synthetic: copies"][space], rows["synthetic: new"][space]
        assert copies["mean"] == pytest.approx(0.0, abs=1e-6) and copies["closer"] == 1.0
        assert new == reference[space]
        assert reference[space]["mean"] > 0.01
    assert "| synthetic: copies | 4 |" in (tmp_path / "out" / "nov.md").read_text()

    stranger = [IdentityRecord(str(paths["p1"][0]), "p9", source="synthetic")]
    write_manifest(tmp_path / "sets" / "stranger" / "manifest.jsonl", stranger)
    (tmp_path / "run" / "stranger").symlink_to(tmp_path / "sets" / "stranger")
    with pytest.raises(ValueError, match="not target identities"):
        main([*argv, "--sets", "stranger", "--out", str(tmp_path / "out2")])


def test_oracle_split_holds_back_the_last_images_of_each_identity(tmp_path):
    """The target keeps all but the last ``hold`` images of each identity (natural order), the oracle set
    holds exactly those, as synthetic records the datamodule's reader takes; nothing is written over an
    existing folder, and an identity with too few images is a clear error."""
    from PIL import Image

    from benchmarks.oracle_split import main, split
    from rgsd_lightning.data.records import read_manifest
    from rgsd_lightning.data.sources import read_identity_folders

    for name, count in (("s1", 4), ("s2", 3)):
        for i in range(1, count + 1):
            path = tmp_path / "src" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4), i, dtype=np.uint8)).save(path)
    (tmp_path / "src" / "s1" / "10.png").write_bytes((tmp_path / "src" / "s1" / "1.png").read_bytes())
    counts = split(tmp_path / "src", tmp_path / "out", 2)
    assert counts == {"identities": 2, "target_images": 4, "held": 4}
    target = read_identity_folders(tmp_path / "out" / "target")
    kept = {(r.identity, Path(r.path).name) for r in target}
    assert kept == {("s1", "1.png"), ("s1", "2.png"), ("s1", "3.png"), ("s2", "1.png")}  # 10.png comes last
    oracle = read_manifest(tmp_path / "out" / "oracle" / "manifest.jsonl")
    assert {(r.identity, Path(r.path).name) for r in oracle} == {
        ("s1", "4.png"),
        ("s1", "10.png"),
        ("s2", "2.png"),
        ("s2", "3.png"),
    }
    assert all(r.source == "synthetic" and Path(r.path).is_file() for r in oracle)
    with pytest.raises(FileExistsError, match="nothing was written"):
        main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"no more than hold=3 images: \['s2'\]"):
        split(tmp_path / "src", tmp_path / "out3", 3)
    assert not (tmp_path / "out3").exists() and not (tmp_path / "out3.partial").exists()


def test_roundtrip_denoises_each_image_under_its_own_identity(tmp_path):
    """Each strength's set holds every image of the source, denoised from its own seed under its own
    identity's label: image for image what ``sample(init=..., strength=...)`` gives for that image alone (so
    the batching and the other images do not matter); the recorded change is the images' RMS difference,
    and it grows from a light to a full round trip. Bad input writes nothing."""
    from PIL import Image

    from benchmarks.roundtrip import build, strength_folder, training_rows
    from rgsd_lightning.data import IdentityRecord, read_manifest, write_manifest
    from rgsd_lightning.data.transforms import generator_transform
    from rgsd_lightning.diffusion.sampling import sample
    from rgsd_lightning.evaluation.quality import Judge
    from tests.conftest import pooled_colour_extractor, random_tiny_generator

    gen = random_tiny_generator(seed=1)
    gen.identities = ["ann", "bob", "cy"]
    gen.save_pretrained(tmp_path / "export")
    rng = np.random.default_rng(0)
    rows = []
    for i, name in enumerate(["bob", "ann", "bob", "cy", "ann"]):
        path = tmp_path / "set" / f"{name}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)  # not square: resized
        rows.append(IdentityRecord(str(path), name, source="synthetic"))
    write_manifest(tmp_path / "set" / "manifest.jsonl", rows)

    judge_real = []
    for name in ("ann", "bob", "cy"):
        for i in range(3):
            path = tmp_path / "judge" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            judge_real.append(IdentityRecord(str(path), name))
    judge = Judge(pooled_colour_extractor(), judge_real, 8, 3)
    summary = build(
        tmp_path / "set",
        tmp_path / "export",
        tmp_path / "out",
        [0.2, 1.0],
        steps=5,
        batch_size=2,
        judge=judge,
    )
    # the judge's scores of the images as given and of each set, as it scores them read back from disk
    assert summary["given"]["fidelity"] == pytest.approx(judge.score(rows)["fidelity"])
    assert summary["given"]["fid"] == pytest.approx(judge.score(rows)["fid"], rel=1e-3)
    assert strength_folder(0.2) == "s020" and strength_folder(1.0) == "s100"
    assert summary["strengths"]["s020"]["steps_run"] == 1 and summary["strengths"]["s100"]["steps_run"] == 5
    transform = generator_transform(8, 3, hflip=False)
    for strength in (0.2, 1.0):
        written = read_manifest(tmp_path / "out" / strength_folder(strength) / "manifest.jsonl")
        assert [(r.identity, r.extra["seed"], r.extra["init_image"]) for r in written] == [
            (r.identity, i, r.path) for i, r in enumerate(rows)
        ]
        changes = []
        for i, (r, w) in enumerate(zip(rows, written, strict=True)):
            start = transform(Image.open(r.path).convert("RGB"))[None]
            alone = sample(
                gen,
                [gen.identities.index(r.identity)],
                seeds=[i],
                num_steps=5,
                method="dpmsolver",
                guidance_scale=2.0,
                clip_x0=True,
                init=start,
                strength=strength,
            ).images[0]
            got = torch.from_numpy(np.asarray(Image.open(w.path).convert("RGB"), dtype=np.float32))
            want = ((alone.permute(1, 2, 0) + 1) * 127.5).round()
            assert (got - want).abs().max() <= 1.0
            changes.append(float(((alone - start[0]) / 2).pow(2).mean().sqrt()))
        scored = judge.score(written)
        assert summary["strengths"][strength_folder(strength)]["judge"]["fidelity"] == scored["fidelity"]
        recorded = summary["strengths"][strength_folder(strength)]["rms_change"]
        assert recorded == pytest.approx(np.mean(changes), rel=1e-4)
    assert summary["strengths"]["s020"]["rms_change"] < summary["strengths"]["s100"]["rms_change"]
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "roundtrip.json").is_file()

    # a target's training images, each round-tripped twice from seeds of its own
    for name in ("ann", "cy"):
        for i in (1, 2):
            path = tmp_path / "target" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    train = training_rows(tmp_path / "target", 1)
    assert [(r.identity, Path(r.path).name) for r in train] == [("ann", "1.png"), ("cy", "1.png")]
    build(train, tmp_path / "export", tmp_path / "twice", [1.0], steps=5, copies=2)
    twice = read_manifest(tmp_path / "twice" / "s100" / "manifest.jsonl")
    assert [(r.identity, r.extra["seed"], r.extra["init_image"]) for r in twice] == [
        (r.identity, c * 2 + i, r.path) for c in range(2) for i, r in enumerate(train)
    ]
    first, second = (np.asarray(Image.open(twice[j].path)) for j in (0, 2))
    assert np.abs(first.astype(int) - second.astype(int)).max() > 10  # the same start, another seed

    with pytest.raises(ValueError, match="copies"):
        build(train, tmp_path / "export", tmp_path / "bad", [0.5], steps=5, copies=0)
    with pytest.raises(FileExistsError, match="exists"):
        build(tmp_path / "set", tmp_path / "export", tmp_path / "out", [0.5], steps=5)
    with pytest.raises(ValueError, match="strength"):
        build(tmp_path / "set", tmp_path / "export", tmp_path / "bad", [0.0], steps=5)
    with pytest.raises(ValueError, match="repeat"):
        build(tmp_path / "set", tmp_path / "export", tmp_path / "bad", [0.5, 0.501], steps=5)
    write_manifest(tmp_path / "stranger" / "manifest.jsonl", [IdentityRecord(rows[0].path, "dee")])
    with pytest.raises(ValueError, match="dee"):
        build(tmp_path / "stranger", tmp_path / "export", tmp_path / "bad", [0.5], steps=5)
    assert not (tmp_path / "bad").exists()


def test_coverage_gain_by_hand_and_on_a_made_target(tmp_path):
    """1-NN accuracy against brute force; a hand case where a right-identity sample wins a test image and a
    wrong-identity one takes it away; the measured gain pairs seeds and skips other rows' folders; end to end,
    copies of the test images cover everything the training images miss, copies of the training images
    nothing, wrongly labelled copies cost what they cover, and the ranking agrees with the measured gains."""
    from scipy.spatial.distance import cdist

    from benchmarks.coverage import main, measured_gain, parse_sets
    from rgsd_lightning.data import IdentityRecord, write_manifest
    from rgsd_lightning.evaluation.quality import coverage_gain, nn_accuracy

    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(7, 3)), rng.normal(size=(11, 3))
    g_labels, q_labels = list("abcabca"), list("abcabcabcab")
    nearest = np.argmin(cdist(queries, gallery), axis=1)
    brute = np.mean([g_labels[i] == q for i, q in zip(nearest, q_labels, strict=True)])
    assert nn_accuracy(gallery, g_labels, queries, q_labels) == pytest.approx(brute)

    train, test = np.array([[0.0], [10.0]]), np.array([[4.0], [6.0], [9.0]])
    got = coverage_gain(train, ["a", "b"], np.array([[6.5]]), ["a"], test, ["a", "a", "b"])
    assert got == pytest.approx({"before": 2 / 3, "after": 1.0, "gain": 1 / 3, "gained": 1 / 3, "taken": 0.0})
    got = coverage_gain(train, ["a", "b"], np.array([[6.5], [4.2]]), ["a", "b"], test, ["a", "a", "b"])
    assert got == pytest.approx(
        {"before": 2 / 3, "after": 2 / 3, "gain": 0.0, "gained": 1 / 3, "taken": 1 / 3}
    )

    def stage(name, value):
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "stage.json").write_text(json.dumps({"metrics": {"test/id_acc": value}}))

    for name, value in [("base_s0", 0.75), ("base_s1", 0.72), ("row_s0", 0.80), ("row_s1", 0.70)]:
        stage(name, value)
    stage("row_s2", 0.9)  # no base with seed 2: left out
    stage("row_other_s0", 0.1)  # another row whose name starts with this one's
    assert measured_gain(tmp_path / "run", "row", "base", "test/id_acc") == pytest.approx(
        {"mean": 1.5, "seeds": 2}
    )
    assert measured_gain(tmp_path / "run", "missing", "base", "test/id_acc") is None
    assert parse_sets(["a=x/y:row", "b=z"]) == {"a": ("x/y", "row"), "b": ("z", None)}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_sets(["no-equals"])

    paths = _grey_target(tmp_path / "target", ("p1", "p2", "p3"), 4, rng)  # image 1 trains, 2-4 test
    _grey_recognizer(tmp_path / "rec")
    shift = {"p1": "p2", "p2": "p3", "p3": "p1"}

    def make_set(set_name, which, relabel=False):
        records = [
            IdentityRecord(str(p), shift[n] if relabel else n, source="synthetic")
            for n, group in paths.items()
            for p in which(group)
        ]
        write_manifest(tmp_path / "sets" / set_name / "manifest.jsonl", records)
        return str(tmp_path / "sets" / set_name)

    specs = [
        f"tests={make_set('tests', lambda g: g[1:])}:row_s",
        f"trains={make_set('trains', lambda g: g[:1])}:row",
        f"wrong={make_set('wrong', lambda g: g[1:], relabel=True)}:row_other",
    ]
    for name, value in [("row_s_s0", 0.9), ("row_s_s1", 0.95)]:
        stage(name, value)  # measured gains: tests +19, trains +1.5, wrong -65
    stage("row_other_s1", 0.07)
    argv = [
        "--target",
        str(tmp_path / "target"),
        "--train-per-identity",
        "1",
        "--extractor",
        str(tmp_path / "rec"),
    ]
    argv += ["--size", "16", "--run", str(tmp_path / "run"), "--base", "base", "--sets", *specs]
    assert main([*argv, "--out", str(tmp_path / "out"), "--name", "cov"]) == 0
    report = json.loads((tmp_path / "out" / "cov.json").read_text())
    rows = report["results"]
    for space in ("recognizer", "pixels"):
        before = rows["tests"][space]["before"]
        assert rows["tests"][space]["after"] == pytest.approx(1.0)  # every test image has a copy at 0
        assert rows["trains"][space]["gain"] == pytest.approx(0.0)
        assert rows["wrong"][space]["after"] == pytest.approx(0.0)  # and every one a wrong copy at 0
        assert rows["wrong"][space]["gain"] == pytest.approx(-before)
        assert report["spearman"][space] == {"rho": pytest.approx(1.0), "sets": 3}
    assert rows["tests"]["measured"] == pytest.approx({"mean": 19.0, "seeds": 2})
    assert "| tests | 9 |" in (tmp_path / "out" / "cov.md").read_text()
    assert rows["wrong"]["recognizer"]["taken"] == pytest.approx(rows["wrong"]["recognizer"]["before"])
    assert rows["tests"]["recognizer"]["taken"] == pytest.approx(0.0)
    # --exclude leaves target images out by file name: image 4 of each identity is no longer a query
    assert main([*argv, "--exclude", "4.png", "--out", str(tmp_path / "out"), "--name", "cov_ex"]) == 0
    excluded = json.loads((tmp_path / "out" / "cov_ex.json").read_text())["results"]["tests"]
    assert rows["tests"]["queries"] == 9 and excluded["queries"] == 6
    assert excluded["recognizer"]["after"] == pytest.approx(1.0)
    assert "(without 4.png)" in (tmp_path / "out" / "cov_ex.md").read_text()
    # a set sampled in memory from a generator export of the target's identities, at the measure's geometry
    from benchmarks.coverage import Generated, parse_generated
    from rgsd_lightning.diffusion import build_dit

    gen = build_dit(num_identities=3, identities=["p1", "p2", "p3"], preset="tiny", image_size=16, channels=1)
    gen.save_pretrained(tmp_path / "gen")
    assert parse_generated([f"g={tmp_path / 'gen'}@ddim:2:0.5:1.5"], 2) == {
        "g": Generated(str(tmp_path / "gen"), "ddim", 2, 0.5, 1.5, 2)
    }
    assert parse_generated(["g=x"], 3, "cuda") == {"g": Generated("x", per_identity=3, device="cuda")}
    with pytest.raises(ValueError, match="NAME=EXPORT"):
        parse_generated(["g=x@ddim:2"], 2)
    argv_gen = [
        *argv[:6],
        "--size",
        "16",
        "--generate",
        f"g={tmp_path / 'gen'}@ddim:2:0:1",
        "--per-identity",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*argv_gen, "--out", str(tmp_path / "out"), "--name", "gen"]) == 0
    sampled = json.loads((tmp_path / "out" / "gen.json").read_text())["results"]["g"]
    assert sampled["images"] == 6
    for space in ("recognizer", "pixels"):
        assert sampled[space]["before"] == pytest.approx(
            rows["tests"][space]["before"]
        )  # same gallery, queries
        assert sampled[space]["gain"] == pytest.approx(sampled[space]["after"] - sampled[space]["before"])
    with pytest.raises(ValueError, match="--size"):
        main(
            [
                *argv[:6],
                "--size",
                "8",
                "--generate",
                f"g={tmp_path / 'gen'}",
                "--out",
                str(tmp_path / "o3"),
                "--name",
                "y",
            ]
        )
    stranger = make_set("stranger", lambda g: g[:1], relabel=False)
    write_manifest(Path(stranger) / "manifest.jsonl", [IdentityRecord(str(paths["p1"][0]), "p9")])
    with pytest.raises(ValueError, match="not target identities"):
        main(
            [
                *argv[:6],
                "--size",
                "16",
                "--sets",
                f"s={stranger}",
                "--out",
                str(tmp_path / "o2"),
                "--name",
                "x",
            ]
        )


def test_train_fit_leave_one_out_rank1_by_hand():
    """Cosine nearest other row: rows 0 and 1 (a) find each other, row 3 (a) finds row 2 (b); rows of a label
    no other row has (b, c) are not queries: 2 of 3. Scale does not matter; NaN and no pairs are errors."""
    from benchmarks.train_fit import leave_one_out_rank1

    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = ["a", "a", "b", "a", "c"]
    assert leave_one_out_rank1(x, labels) == pytest.approx(2 / 3)
    scaled = x * np.array([[5.0], [1.0], [0.2], [3.0], [1.0]])
    assert leave_one_out_rank1(scaled, labels) == pytest.approx(2 / 3)
    assert leave_one_out_rank1(x, ["a", "a", "b", "b", "c"]) == 1.0  # rows 2 and 3 (b) find each other
    with pytest.raises(ValueError, match="NaN"):
        leave_one_out_rank1(np.where(np.eye(5, 2) > 0, np.nan, x), labels)
    with pytest.raises(ValueError, match="two rows"):
        leave_one_out_rank1(x, ["a", "b", "c", "d", "e"])


def test_train_fit_end_to_end_on_made_stages(tmp_path):
    """Stage folders as the pipeline writes them: each identity's training images are copies of one image,
    so any network fits them (100 %); seeds group into one row with their metric and epochs; a folder that is
    not a finished stage, and a metric the stage lacks, are clear errors."""
    from PIL import Image

    from benchmarks.train_fit import main, stage_fit

    rng = np.random.default_rng(0)
    root = tmp_path / "target"
    for name in ("ann", "bob", "cid"):
        (root / name).mkdir(parents=True)
        image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        for i in range(3):  # 2 train + 1 test, the training pair identical
            Image.fromarray(image if i < 2 else 255 - image).save(root / name / f"{i}.png")
    data = {"root": str(root), "format": "identity_folders", "channels": 1, "task": "face", "face_size": 16}
    data["train_per_identity"] = 2
    run = tmp_path / "run"
    for seed, acc in ((0, 0.5), (1, 0.7)):
        stage = run / f"k2_real_s{seed}"
        _grey_recognizer(stage / "export")
        spec = {"trainer": {"max_epochs": 12}, "data": {"init_args": {**data, "synthetic": ["/nowhere"]}}}
        marker = {"spec": spec, "export": str(stage / "export"), "metrics": {"test/id_acc": acc}}
        (stage / "stage.json").write_text(json.dumps(marker))
    out = tmp_path / "out"
    args = ["--runs", str(run), "--stages", "k2_real_s?", "--metric", "test/id_acc"]
    main([*args, "--out", str(out), "--name", "f"])
    row = json.loads((out / "f.json").read_text())["results"][str(run)]["k2_real"]
    assert row["seeds"] == [0, 1] and row["fit"] == [1.0, 1.0] and row["metric"] == [0.5, 0.7]
    assert row["epochs"] == 12
    assert "| k2_real | 12 | 2 | 100.0 ± 0.0 | 60.0 ± 14.1 |" in (out / "f.md").read_text()
    with pytest.raises(FileNotFoundError, match="no stage.json"):
        stage_fit(run / "missing", "test/id_acc")
    with pytest.raises(ValueError, match="test/mAP"):
        stage_fit(run / "k2_real_s0", "test/mAP")
