"""LookaheadReID and CosFaceRecognizer end to end on the toy identities, through the rgsd CLI and YAMLs."""

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from PIL import Image

from rgsd_lightning.backbones import FeatureExtractor, load_embedding_net
from rgsd_lightning.callbacks.export import ExportArtifact
from rgsd_lightning.cli import build_cli
from rgsd_lightning.data import toy
from rgsd_lightning.data.datamodule import IdentityDataModule
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.data.transforms import to_recognizer_input
from rgsd_lightning.modules.config import EmbeddingNetConfig
from rgsd_lightning.modules.cosface import CosFaceRecognizer
from rgsd_lightning.modules.lookahead_reid import LookaheadReID
from rgsd_lightning.selection import SelectionConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
REID_BASELINE = str(EXPERIMENTS / "toy" / "reid_baseline.yaml")
REID_SELECTION = str(EXPERIMENTS / "toy" / "reid_selection.yaml")
COSFACE = str(EXPERIMENTS / "toy" / "cosface.yaml")
TEST_NET = EmbeddingNetConfig(architecture="test_resnet")  # a tiny timm ResNet, random init
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# the toy ReID files are the demo's few-shot stages; these tests train on a larger toy set (64 identities x 8
# images, every image, P=16, about one pass per epoch, 10 epochs with validation at 5 and 10)
REID_DATA = [
    "--data.init_args.toy",
    "{num_train_ids: 64, num_test_ids: 16, images_per_id: 8, height: 64, width: 32}",
    "--data.init_args.max_train_per_identity",
    "null",
    "--data.init_args.p",
    "16",
    "--data.init_args.batches_per_epoch",
    "null",
    "--data.init_args.batch_size",
    "128",
    "--trainer.max_epochs",
    "10",
    "--trainer.check_val_every_n_epoch",
    "5",
]


def run_cli(args, root, out):
    """``rgsd <args>`` from Python on the toy data at ``root``, logs under ``out``; returns the CLI object."""
    data = REID_DATA if any(a in (REID_BASELINE, REID_SELECTION) for a in args) else []
    return build_cli(
        [*args, *data, "--data.init_args.root", str(root), "--trainer.default_root_dir", str(out), *QUIET]
    )


def short_fit(config, root, out, *extra, steps=3):
    """A few training steps, no validation."""
    args = ["fit", "--config", config, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0"]
    return run_cli([*args, *extra], root, out)


def write_synthetic_set(folder, pids, per_id=3, wrong_label=None):
    """Toy "generated" persons (new random views of training identities) as a synthetic set with a manifest.

    ``wrong_label`` maps a pid to the identity its images are labelled with (a broken generator)."""
    return toy.write_toy_synthetic_set(folder, pids, per_id, wrong_label=wrong_label)


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """Tiny models: one intra-op thread is as fast and immune to oversubscription on a shared CPU (8 min
    instead of 1 min for this file on a loaded 2-core machine). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def market_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toy_market") / "data"


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    return write_synthetic_set(tmp_path_factory.mktemp("synthetic"), range(1, 65), per_id=2)


@pytest.fixture(scope="module")
def trained_reid(market_root, tmp_path_factory):
    """The toy baseline YAML on the larger toy set (10 epochs), trained once for the tests below."""
    out = tmp_path_factory.mktemp("reid_run")
    return run_cli(["fit", "--config", REID_BASELINE], market_root, out)


# ---------------------------------------------------------------------------------------------- ReID
@pytest.mark.slow
def test_reid_training_beats_random_features_and_tests(trained_reid):
    trained = {k: float(v) for k, v in trained_reid.trainer.callback_metrics.items() if k.startswith("val/")}
    torch.manual_seed(0)
    untrained = LookaheadReID(trained_reid.datamodule.num_identities, net=TEST_NET)
    random = quiet_trainer().validate(untrained, datamodule=trained_reid.datamodule, verbose=False)[0]
    assert random["val/mAP"] < 0.2 and random["val/rank1"] < 0.2  # untrained features on unseen identities
    assert trained["val/mAP"] > random["val/mAP"] + 0.2
    assert trained["val/rank1"] > random["val/rank1"] + 0.2
    assert trained["val/rank5"] >= trained["val/rank1"]
    tested = trained_reid.trainer.test(trained_reid.model, datamodule=trained_reid.datamodule, verbose=False)[
        0
    ]
    assert tested["test/mAP"] == pytest.approx(trained["val/mAP"], abs=1e-6)  # same split, same weights
    assert any(Path(trained_reid.trainer.log_dir, "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_reid_export_loads_as_feature_extractor_with_the_same_embeddings(trained_reid):
    callback = next(c for c in trained_reid.trainer.callbacks if isinstance(c, ExportArtifact))
    net, config = load_embedding_net(callback.last_path)
    assert config["input_size"] == [64, 32] and config["task"] == "reid"
    model = trained_reid.model.eval()
    x = torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.net(x), rtol=0, atol=0)
        fx = FeatureExtractor.from_export(callback.last_path)
        generated = torch.rand(5, 3, 32, 32) * 2 - 1
        expected = model.net(to_recognizer_input(generated, (64, 32), config["mean"], config["std"], 3))
        torch.testing.assert_close(fx(generated), F.normalize(expected, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_selection_on_a_trained_model_drops_mislabelled_synthetic_images(trained_reid, tmp_path):
    """A broken generator labels a quarter of its images with the wrong identity. With the virtual step on
    the real samples' loss and on the head (step_on="real", scope="head"), their Δl is the largest."""
    pids = list(range(1, 17))
    wrong = {pid: pid % 16 + 1 for pid in pids[::4]}  # every fourth identity drawn as its neighbour
    folder = write_synthetic_set(tmp_path / "syn", pids, per_id=4, wrong_label=wrong)
    dm = trained_reid.datamodule
    transform = dm.recognizer_transform(train=False)
    syn = read_manifest(folder / "manifest.jsonl")
    real = [r for r in dm.train_records if int(r.identity) <= 16]
    items = real + syn
    images = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in items])
    labels = torch.tensor([dm.label_of[r.identity] for r in items])
    is_syn = torch.tensor([r.source == "synthetic" for r in items])
    mislabelled = torch.tensor(
        [r.source == "synthetic" and int(Path(r.path).stem.split("_")[0]) in wrong for r in items]
    )
    model = copy.deepcopy(trained_reid.model).train()
    model.selection = SelectionConfig(enabled=True, keep_ratio=0.5, lr=0.01, scope="head", step_on="real")
    out = model.identity_forward({"image": images, "label": labels, "is_synthetic": is_syn})
    kept_syn = out["keep"] & is_syn
    assert out["keep"][~is_syn].all()
    assert int(kept_syn.sum()) == int(is_syn.sum()) // 2
    # 32 of 64 synthetic images are kept; a blind choice would keep 8 of the 16 mislabelled ones (0-3 seen
    # over training seeds; the paper's step_on="batch" keeps 5-12 of them)
    assert int((kept_syn & mislabelled).sum()) <= 4, int((kept_syn & mislabelled).sum())


def test_selection_keep_ratio_one_matches_training_without_selection(market_root, synthetic_set, tmp_path):
    syn = ["--data.init_args.synthetic", f"[{synthetic_set}]", "--data.init_args.synthetic_fraction", "0.25"]
    off = short_fit(REID_BASELINE, market_root, tmp_path / "off", *syn)
    on = short_fit(
        REID_SELECTION, market_root, tmp_path / "on", *syn, "--model.init_args.selection.keep_ratio", "1.0"
    )
    assert on.model.selection.enabled and not off.model.selection.enabled
    assert float(on.trainer.callback_metrics["train/kept_fraction"]) == 1.0
    assert on.trainer.global_step == off.trainer.global_step == 3
    off_state, on_state = off.model.state_dict(), on.model.state_dict()
    assert off_state.keys() == on_state.keys()
    for key in off_state:
        assert torch.equal(off_state[key], on_state[key]), key
    assert float(on.trainer.callback_metrics["train/loss"]) == float(
        off.trainer.callback_metrics["train/loss"]
    )

    half = short_fit(REID_SELECTION, market_root, tmp_path / "half", *syn)  # the YAML's keep_ratio 0.5
    metrics = half.trainer.callback_metrics
    assert float(metrics["train/kept_fraction"]) == 0.5  # 16 identities x 1 synthetic slot: 8 kept
    assert (
        float(metrics["train/delta_min"])
        <= float(metrics["train/delta_mean"])
        <= float(metrics["train/delta_max"])
    )
    changed = [k for k in off_state if not torch.equal(off_state[k], half.model.state_dict()[k])]
    assert changed  # dropping samples changes the update
    # the per-image selection log: every synthetic image seen in a batch, kept half of the time overall
    log = json.loads(next((tmp_path / "half").rglob("selection.json")).read_text())
    images = log["images"]
    assert images and all(0 <= i["kept"] <= i["seen"] for i in images)
    assert sum(i["kept"] for i in images) * 2 == sum(i["seen"] for i in images)
    assert all(Path(i["path"]).is_relative_to(synthetic_set) for i in images)
    assert log["rule"]["keep_ratio"] == 0.5 and log["rule"]["rule"] == "smallest"

    assert half.model.selection.scope == "head"  # the YAML's (and the default) scope
    full = short_fit(
        REID_SELECTION,
        market_root,
        tmp_path / "full",
        *syn,
        "--model.init_args.selection.scope",
        "full",
        steps=2,
    )
    assert float(full.trainer.callback_metrics["train/kept_fraction"]) == 0.5


def test_uniform_synthetic_labels_train_under_the_cli(market_root, synthetic_set, tmp_path):
    """The YAML knob reaches the model and, on the same batches and seeds, changes the update."""
    syn = ["--data.init_args.synthetic", f"[{synthetic_set}]", "--data.init_args.synthetic_fraction", "0.25"]
    runs = {}
    for mode in ("identity", "uniform"):
        labels = ["--model.init_args.synthetic_labels", mode]
        runs[mode] = short_fit(REID_SELECTION, market_root, tmp_path / mode, *syn, *labels, steps=2)
    uniform = runs["uniform"]
    assert uniform.model.hparams.synthetic_labels == "uniform" and uniform.trainer.global_step == 2
    assert float(uniform.trainer.callback_metrics["train/kept_fraction"]) == 0.5
    a, b = runs["identity"].model.state_dict(), uniform.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_keeping_no_synthetic_sample_apart_in_batchnorm_trains_the_real_only_model(
    market_root, synthetic_set, tmp_path
):
    """Common random numbers: with synthetic images on top of K real ones, selection keeping none of them
    and synthetic samples apart in BatchNorm ("real", or "kept": dropped ones out of the training forward),
    training is the real-only run of the same seed - the real
    images, their augmentations (Random Erasing included) and every update - across an epoch boundary.
    With the mixed batch's statistics the same run differs (so the comparison can fail)."""
    common = ["--data.init_args.random_erasing", "0.5", "--model.init_args.triplet_on", "real"]
    syn = ["--data.init_args.synthetic", f"[{synthetic_set}]", "--data.init_args.synthetic_fraction", "0.5"]
    syn += ["--data.init_args.synthetic_slots", "add", "--model.init_args.selection.keep_ratio", "0.0"]
    real = short_fit(REID_BASELINE, market_root, tmp_path / "real", *common, steps=10)
    runs = {}
    for norm in ("real", "kept", "batch"):
        options = [*common, *syn, "--model.init_args.synthetic_norm", norm]
        runs[norm] = short_fit(REID_SELECTION, market_root, tmp_path / norm, *options, steps=10)
    assert len(real.trainer.train_dataloader) == 8  # 10 steps cross an epoch boundary
    expected = real.model.state_dict()
    for norm in ("real", "kept"):  # apart in BatchNorm, or left out of the training forward once dropped
        assert float(runs[norm].trainer.callback_metrics["train/kept_fraction"]) == 0.0
        got = runs[norm].model.state_dict()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{norm}: {key}")
    mixed = runs["batch"].model.state_dict()
    weights = [k for k in expected if expected[k].is_floating_point()]
    assert any(not torch.allclose(mixed[k], expected[k], rtol=1e-3, atol=1e-5) for k in weights)


def test_unknown_synthetic_identity_is_a_clear_error(market_root, tmp_path):
    folder = write_synthetic_set(tmp_path / "syn", [1], per_id=1, wrong_label={1: 9999})
    with pytest.raises(ValueError, match="unknown to the real label space"):
        short_fit(REID_SELECTION, market_root, tmp_path / "out", "--data.init_args.synthetic", f"[{folder}]")


def test_empty_synthetic_set_trains_on_real_data_with_a_warning(market_root, tmp_path, caplog):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "manifest.jsonl").write_text("")
    with caplog.at_level(logging.WARNING):
        cli = short_fit(
            REID_SELECTION,
            market_root,
            tmp_path / "out",
            "--data.init_args.synthetic",
            f"[{folder}]",
            steps=2,
        )
    assert "training on real data only" in caplog.text
    assert cli.trainer.global_step == 2
    assert float(cli.trainer.callback_metrics["train/kept_fraction"]) == 1.0


# ---------------------------------------------------------------------------------------------- faces
def write_rfw(root, faces_root, groups, ids_per_group=4):
    """A tiny RFW-layout test set (``txts/<G>/<G>_pairs.txt``, ``data/<G>/<name>/<name>_<i:04d>.jpg``) made of
    the held-out toy face images (21..30) of some training identities."""
    folders = sorted(p for p in Path(faces_root).iterdir() if p.is_dir())
    for g, group in enumerate(groups):
        names = [f.name for f in folders[g * ids_per_group : (g + 1) * ids_per_group]]
        for name in names:
            target = root / "data" / group / name
            target.mkdir(parents=True)
            for i in range(1, 6):
                Image.open(Path(faces_root) / name / f"{20 + i}.png").convert("RGB").save(
                    target / f"{name}_{i:04d}.jpg"
                )
        lines = []
        for fold in range(10):
            a, b = names[fold % len(names)], names[(fold + 1) % len(names)]
            lines += [
                f"{a} {1 + fold % 5} {1 + (fold + 1) % 5}",
                f"{a} {1 + fold % 5} {b} {1 + (fold + 2) % 5}",
            ]
        (root / "txts" / group).mkdir(parents=True)
        (root / "txts" / group / f"{group}_pairs.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_cosface_training_beats_chance_and_reports_groups(tmp_path):
    cli = run_cli(["fit", "--config", COSFACE], tmp_path / "faces", tmp_path / "run")
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["val/verif_acc"] == metrics["val/auto/accuracy"]
    torch.manual_seed(0)
    untrained = CosFaceRecognizer(
        cli.datamodule.num_identities, net={"architecture": "test_resnet", "embedding_dim": 64}
    )
    random = quiet_trainer().validate(untrained, datamodule=cli.datamodule, verbose=False)[0]
    assert random["val/verif_acc"] < 0.65  # untrained features already separate some toy faces
    assert metrics["val/verif_acc"] > 0.7 and metrics["val/verif_acc"] > random["val/verif_acc"] + 0.1
    assert metrics["val/id_acc"] > random["val/id_acc"] + 0.1  # nearest class weight, 32 classes

    # RFW-style group sets: per-group accuracy and report; verif_acc stays the mean of the non-group sets
    rfw = write_rfw(tmp_path / "rfw", tmp_path / "faces", ["GroupA", "GroupB"])
    hp = {k: v for k, v in cli.datamodule.hparams.items() if not k.startswith("_")}
    hp["verification"] = [
        {"kind": "auto", "num_pairs": 600, "name": "auto"},
        {"kind": "rfw", "root": str(rfw)},
    ]
    dm = IdentityDataModule(**hp)
    result = quiet_trainer().test(cli.model, datamodule=dm, verbose=False)[0]
    groups = [result["test/group/GroupA"], result["test/group/GroupB"]]
    assert result["test/GroupA/accuracy"] == groups[0]
    assert result["test/group_mean"] == pytest.approx(np.mean(groups))
    assert result["test/group_std"] == pytest.approx(np.std(groups))
    assert result["test/verif_acc"] == pytest.approx(metrics["val/verif_acc"])
    assert 0 <= result["test/id_acc"] <= 1

    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ExportArtifact))
    fx = FeatureExtractor.from_export(callback.last_path)
    assert fx.input_size == (32, 32) and fx.mean == (0.5, 0.5, 0.5)


def test_cosface_with_selection_runs_under_the_cli(tmp_path):
    faces = tmp_path / "faces"
    toy.make_toy_faces(faces, num_ids=32, images_per_id=30, size=64)
    records = []
    for name in ("id0001", "id0002", "id0003", "id0004"):
        for i in (1, 2):
            records.append(IdentityRecord(str(faces / name / f"{i}.png"), name, -1, "synthetic", "train"))
    write_manifest(tmp_path / "syn" / "manifest.jsonl", records)
    args = [
        "--data.init_args.synthetic",
        f"[{tmp_path / 'syn'}]",
        "--model.init_args.selection.enabled",
        "true",
    ]
    cli = short_fit(COSFACE, faces, tmp_path / "run", *args, "--model.init_args.selection.k", "1", steps=3)
    assert cli.trainer.global_step == 3
    assert "train/kept_fraction" in cli.trainer.callback_metrics


# ------------------------------------------------------------------------------------------ helpers
def test_recognizers_reject_bad_configuration():
    with pytest.raises(ValueError, match="num_identities"):
        LookaheadReID(1, net=TEST_NET)
    with pytest.raises(ValueError, match="unknown keys"):
        LookaheadReID(4, net=TEST_NET, selection={"ratio": 0.5})
    with pytest.raises(ValueError, match="label_smoothing"):
        LookaheadReID(4, net=TEST_NET, label_smoothing=1.5)
    with pytest.raises(ValueError, match="triplet_on"):
        LookaheadReID(4, net=TEST_NET, triplet_on="synthetic")
    with pytest.raises(ValueError, match="synthetic_labels must be"):
        LookaheadReID(4, net=TEST_NET, synthetic_labels="soft")
    with pytest.raises(ValueError, match="triplet_on='real'"):
        LookaheadReID(4, net=TEST_NET, synthetic_labels="uniform", triplet_on="kept")
    with pytest.raises(ValueError, match="rule 'smallest' or 'negative'"):
        LookaheadReID(4, net=TEST_NET, synthetic_labels="uniform", selection={"rule": "identity"})
    with pytest.raises(ValueError, match="synthetic_norm"):
        CosFaceRecognizer(4, net=TEST_NET, synthetic_norm="running")
    with pytest.raises(ValueError, match="preprocessing"):
        CosFaceRecognizer(4, net=EmbeddingNetConfig("test_resnet", embedding_dim=8)).export("/nonexistent/x")
    with pytest.raises(ValueError, match="net: unknown keys"):
        LookaheadReID(4, net={"architecture": "test_resnet", "embeding_dim": 8})


@pytest.mark.parametrize("selection", [False, True])
def test_triplet_on_real_mines_the_real_samples_only(selection):
    """triplet_on="real": the triplet term is the batch-hard loss of the real samples alone (computed here
    independently), the identity term still has the kept synthetic samples; "kept" mines those too."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    is_syn = torch.zeros(16, dtype=torch.bool)
    is_syn[3::4] = True  # one synthetic slot per identity, as the P x K sampler fills them
    batch = {"image": torch.randn(16, 3, 32, 16), "label": labels, "is_synthetic": is_syn}
    options = {"enabled": selection, "keep_ratio": 0.5}
    losses = {}
    for mode in ("kept", "real"):
        torch.manual_seed(1)
        model = LookaheadReID(4, net=TEST_NET, triplet_on=mode, selection=options).train()
        model.log = model.log_dict = lambda *a, **k: None
        model._count_selection = lambda *a, **k: None
        torch.manual_seed(2)
        loss = model.training_step(batch, 0)
        torch.manual_seed(2)
        out = model.identity_forward(batch)
        keep = out["keep"]
        assert int((keep & is_syn).sum()) == (2 if selection else 4)
        id_loss = out["losses"][keep].mean()
        mined = keep & ~is_syn if mode == "real" else keep
        features = out["features"].float()
        dist = torch.cdist(features[mined], features[mined])
        same = labels[mined][:, None] == labels[mined][None, :]
        hardest_pos = dist.masked_fill(~same, float("-inf")).max(1).values
        hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
        triplet = F.relu(hardest_pos - hardest_neg + 0.3).mean()  # BoT's margin ranking loss, by hand
        torch.testing.assert_close(loss, id_loss + triplet, rtol=1e-4, atol=1e-5)
        losses[mode] = float(loss.detach())
    assert losses["kept"] != pytest.approx(losses["real"], rel=1e-4)
    assert LookaheadReID(4, net=TEST_NET).hparams.triplet_on == "real"  # the default (see its docstring)


def test_uniform_synthetic_labels_are_lsro_cross_entropy_to_the_uniform_distribution():
    """synthetic_labels="uniform": a synthetic row's loss is -mean_k log softmax_k (computed here in NumPy),
    whatever its label; real rows keep the label-smoothed cross-entropy; "identity" labels every row."""
    torch.manual_seed(0)
    k, eps = 5, 0.1
    embeddings = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    syn = torch.tensor([False, True, False, True, True, False])
    net = EmbeddingNetConfig("test_resnet", embedding_dim=8)
    model = LookaheadReID(k, net=net, synthetic_labels="uniform")
    with torch.no_grad():
        model.classifier.weight.normal_()  # logits of order 1, not BoT's near-zero init
        logits = model.classifier(embeddings).double().numpy()
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    smoothed = -((1 - eps) * logp[np.arange(6), labels.numpy()] + eps * logp.mean(1))  # torch's smoothing
    expected = np.where(syn.numpy(), -logp.mean(1), smoothed)
    got = model.identity_losses(embeddings, labels, syn)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5)
    relabelled = model.identity_losses(embeddings, torch.tensor([0, 4, 2, 0, 1, 0]), syn)
    torch.testing.assert_close(relabelled, got)  # only real labels matter
    smoothed = torch.as_tensor(smoothed).float()
    torch.testing.assert_close(model.identity_losses(embeddings, labels), smoothed)  # no mask: all real
    model.hparams.synthetic_labels = "identity"
    torch.testing.assert_close(model.identity_losses(embeddings, labels, syn), smoothed)


@pytest.mark.parametrize(("scope", "norm"), [("head", "batch"), ("full", "real"), ("head", "kept")])
def test_uniform_synthetic_labels_make_training_and_selection_blind_to_synthetic_labels(scope, norm):
    """Under "uniform", relabelling the synthetic samples changes neither the training loss nor what
    selection keeps (every path that computes identity losses passes the synthetic mask on); under
    "identity" it changes the loss."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    is_syn = torch.zeros(16, dtype=torch.bool)
    is_syn[2::4] = is_syn[3::4] = True
    images = torch.randn(16, 3, 32, 16)
    relabelled = labels.clone()
    relabelled[is_syn] = (labels[is_syn] + 1) % 4
    selection = {"enabled": True, "scope": scope, "keep_ratio": 0.5}
    for mode in ("uniform", "identity"):
        results = []
        for lab in (labels, relabelled):
            torch.manual_seed(1)
            model = LookaheadReID(
                4, net=TEST_NET, synthetic_labels=mode, synthetic_norm=norm, selection=selection
            ).train()
            model.log = model.log_dict = lambda *a, **k: None
            model._count_selection = lambda *a, **k: None
            with torch.no_grad():
                model.classifier.weight.normal_()
            batch = {"image": images, "label": lab, "is_synthetic": is_syn}
            torch.manual_seed(2)
            loss = model.training_step(batch, 0)
            torch.manual_seed(2)
            keep = model.identity_forward(batch)["keep"]
            assert int((keep & is_syn).sum()) == 4
            results.append((float(loss.detach()), keep))
        (loss_a, keep_a), (loss_b, keep_b) = results
        if mode == "uniform":
            assert loss_a == pytest.approx(loss_b, rel=1e-5)
            assert torch.equal(keep_a, keep_b)
        else:
            assert loss_a != pytest.approx(loss_b, rel=1e-3)


def test_split_norm_forward_matches_separate_train_and_eval_passes():
    """Real rows: a train-mode pass of the real rows alone (statistics updated by them only); synthetic rows:
    an eval-mode pass on the running statistics, which still trains the BatchNorm weights."""
    from rgsd_lightning.modules.recognizer import split_norm_forward

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )
    with torch.no_grad():  # running statistics away from their initial values
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(10, 5)
    syn = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    train_copy = copy.deepcopy(net).train()
    (out,) = split_norm_forward(lambda v: (net(v),), x, syn, net)
    torch.testing.assert_close(out[~syn], train_copy(x[~syn]))
    eval_copy = copy.deepcopy(train_copy).eval()  # the running statistics with this batch's real rows in
    torch.testing.assert_close(out[syn], eval_copy(x[syn]))
    torch.testing.assert_close(net[1].running_mean, train_copy[1].running_mean)  # real rows only
    torch.testing.assert_close(net[1].running_var, train_copy[1].running_var)
    assert net.training and net[1].training  # modes restored
    out[syn].sum().backward()
    assert net[1].weight.grad.abs().sum() > 0
    (whole,) = split_norm_forward(lambda v: (net(v),), x, None, net)  # no mask: one pass, batch statistics
    torch.testing.assert_close(whole, copy.deepcopy(net).train()(x))


@pytest.mark.parametrize("scope", ["head", "full"])
def test_synthetic_norm_real_keeps_the_real_samples_apart_in_training_and_in_selection(scope):
    """With "real" the real samples' losses do not depend on the synthetic images in the batch (with "batch"
    they do, through BatchNorm), and selection's own l(w) is the training forward's, in either scope."""
    from rgsd_lightning.modules.recognizer import _full_scope_losses, _head_scope_losses, split_norm_forward

    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    is_syn = torch.zeros(16, dtype=torch.bool)
    is_syn[3::4] = True
    images = torch.randn(16, 3, 32, 16)
    changed = images.clone()
    changed[is_syn] = 3.0 * torch.randn(4, 3, 32, 16) + 2.0
    for norm in ("batch", "real"):
        torch.manual_seed(1)
        model = LookaheadReID(
            4, net=TEST_NET, synthetic_norm=norm, selection={"enabled": True, "scope": scope}
        )
        model.train()
        model._count_selection = lambda *a, **k: None
        real_losses = []
        for imgs in (images, changed):
            state = copy.deepcopy(model.state_dict())
            batch = {"image": imgs, "label": labels, "is_synthetic": is_syn}
            out = model.identity_forward(batch)
            real_losses.append(out["losses"][~is_syn].detach())
            model.load_state_dict(state)  # the forward updated running statistics; start the next alike
            inputs = {"label": labels, "is_synthetic": is_syn}
            if scope == "head":  # the training forward's backbone features (split as it splits them)
                mask = is_syn if norm == "real" else None
                (features,) = split_norm_forward(
                    lambda v, net=model.net: (net.backbone(v),), imgs, mask, model.net
                )
                loss_fn, inputs["features"] = _head_scope_losses, features.detach()
                model.load_state_dict(state)
            else:
                loss_fn, inputs["image"] = _full_scope_losses, imgs
            torch.testing.assert_close(loss_fn(model, inputs), out["losses"].detach(), rtol=1e-4, atol=1e-5)
            model.load_state_dict(state)
        same = torch.allclose(real_losses[0], real_losses[1], rtol=1e-5, atol=1e-6)
        assert same == (norm == "real"), norm


def _batchnorm_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("scope", ["head", "full"])
def test_synthetic_norm_kept_selects_as_real_then_trains_real_and_kept_samples_in_one_batch(scope):
    """With "kept": the same selection as under "real" (same Δl and keep mask, from the same weights), then
    a training forward of the real and kept samples alone - their losses and the BatchNorm running
    statistics afterwards are those of a plain forward of those rows (the selection pass leaves no trace,
    the dropped images take no part), and the kept ones share the real samples' batch statistics."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    is_syn = torch.zeros(16, dtype=torch.bool)
    is_syn[2::4] = True
    is_syn[3::4] = True
    images = torch.randn(16, 3, 32, 16)
    images[is_syn] = 2.0 * torch.randn(8, 3, 32, 16) + 1.0
    torch.manual_seed(1)
    selection = {"enabled": True, "scope": scope, "keep_ratio": 0.5}
    kept_model = LookaheadReID(4, net=TEST_NET, synthetic_norm="kept", selection=selection).train()
    real_model = LookaheadReID(4, net=TEST_NET, synthetic_norm="real", selection=selection).train()
    real_model.load_state_dict(kept_model.state_dict())
    plain = copy.deepcopy(kept_model)
    for model in (kept_model, real_model):
        model._count_selection = lambda *a, **k: None
    batch = {"image": images, "label": labels, "is_synthetic": is_syn}
    out = kept_model.identity_forward(batch)
    reference = real_model.identity_forward(batch)["selection"]
    keep = out["keep"]
    assert int((keep & is_syn).sum()) == 4 and bool(keep[~is_syn].all())
    torch.testing.assert_close(keep, reference.keep)
    torch.testing.assert_close(out["selection"].delta, reference.delta, rtol=1e-4, atol=1e-6, equal_nan=True)

    expected = plain.identity_losses(plain.net(images[keep]), labels[keep])  # BatchNorm on these rows only
    torch.testing.assert_close(out["losses"][keep], expected, rtol=1e-4, atol=1e-5)
    assert bool((out["losses"][~keep] == 0).all())
    after, wanted = _batchnorm_buffers(kept_model), _batchnorm_buffers(plain)
    assert after.keys() == wanted.keys() and len(after) > 0
    for name in after:
        torch.testing.assert_close(after[name], wanted[name], rtol=1e-5, atol=1e-6, msg=name)
    out["losses"][keep].mean().backward()  # the kept rows carry the graph, backbone included
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in kept_model.net.backbone.parameters())
    real_alone = plain.identity_losses(copy.deepcopy(plain).net(images[~is_syn]), labels[~is_syn])
    assert not torch.allclose(
        out["losses"][~is_syn].detach(), real_alone, rtol=1e-3, atol=1e-5
    )  # kept share it
