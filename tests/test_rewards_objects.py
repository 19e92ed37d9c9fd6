"""MemoryBank and the torchmetrics-style reward objects."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale, free_port
from torch import nn

from rgsd_lightning.rewards import (
    CompositeReward,
    CoverageReward,
    ExpansionReward,
    MemoryBank,
    SemanticConsistencyReward,
)
from rgsd_lightning.rewards import functional as RF

P, K, D, N = 3, 4, 8, 5


def make_bank_data(seed: int = 0, counts=(4, 6, 1, 3, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(len(counts), D, generator=g)
    ids = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    return centres[ids] + torch.randn(len(ids), D, generator=g), ids


def make_batch(seed: int, identities=(0, 1, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.tensor(identities).repeat_interleave(K)
    return torch.randn(len(ids), D, generator=g) + 0.5, ids


# -------------------------------------------------------------------------------------------- MemoryBank
def test_bank_buffers_and_cached_statistics_match_functional():
    feats, ids = make_bank_data()
    bank = MemoryBank(feats, ids, N)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(len(ids)))
    assert set(bank.state_dict()) == {"features", "identities", "_extra_state"}
    assert torch.allclose(bank.prototypes(), RF.prototypes(feats, ids, N))
    assert torch.allclose(bank.bandwidths(), RF.median_bandwidth(feats, ids, N))
    assert torch.allclose(bank.spread(), RF.reference_spread(feats, ids, N))
    assert bank.counts().tolist() == [4, 6, 1, 3, 5]
    assert bank.spread()[2] == 0.0 and bank.bandwidths()[2] > 0  # one feature: no spread, global bandwidth
    assert bank.prototypes() is bank.prototypes()  # cached


def test_bank_cache_follows_buffer_changes():
    feats, ids = make_bank_data()
    bank = MemoryBank(feats, ids, N)
    before = bank.prototypes().clone()
    with torch.no_grad():
        bank.features[ids == 0] = RF.l2_normalize(torch.randn(4, D))  # in-place edit
    assert not torch.allclose(bank.prototypes()[0], before[0])
    assert torch.allclose(bank.prototypes(), RF.prototypes(bank.features, ids, N))
    other, other_ids = make_bank_data(seed=1)
    bank.features = RF.l2_normalize(other)  # re-assignment
    assert torch.allclose(bank.prototypes(), RF.prototypes(other, other_ids, N))
    bank.double()  # dtype move creates new buffers
    assert bank.prototypes().dtype == torch.float64


def test_bank_pickles_and_deep_copies_with_a_filled_cache():
    bank = MemoryBank(*make_bank_data(), N)
    bank.bandwidths()
    for clone in (pickle.loads(pickle.dumps(bank)), copy.deepcopy(bank)):
        assert torch.equal(clone.features, bank.features)
        assert torch.allclose(clone.bandwidths(), bank.bandwidths())


def test_check_covers():
    feats, ids = make_bank_data()
    bank = MemoryBank(feats[ids != 3], ids[ids != 3], N)
    bank.check_covers(torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="identity 3 has no entries in the memory bank"):
        bank.check_covers([0, 3])
    with pytest.raises(ValueError, match=r"identities must lie in \[0, 5\)"):
        bank.check_covers([9])


def test_bank_constructor_errors():
    feats, ids = make_bank_data()
    with pytest.raises(ValueError, match=r"memory bank identities must lie in \[0, 4\)"):
        MemoryBank(feats, ids, 4)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in memory bank features \(1 rows\)"):
        MemoryBank(bad, ids, N)
    with pytest.raises(ValueError, match="has 19 rows but memory bank identities has 18"):
        MemoryBank(feats, ids[:-1], N)


class TinyExtractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)  # would randomise features if left in train mode
        self.proj = nn.Linear(3 * 4 * 4, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(x.flatten(1)))


def test_from_extractor_runs_in_eval_mode_without_grad():
    torch.manual_seed(0)
    extractor = TinyExtractor().train()
    images = torch.randn(10, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    batches = [{"image": images[i : i + 4], "label": labels[i : i + 4]} for i in range(0, 10, 4)]
    bank = MemoryBank.from_extractor(extractor, batches, num_identities=4)
    assert extractor.training  # mode restored
    with torch.no_grad():
        expected = RF.l2_normalize(extractor.proj(images.flatten(1)))
    assert torch.allclose(bank.features, expected, atol=1e-6)
    assert bank.identities.tolist() == labels.tolist()
    assert not bank.features.requires_grad
    pairs = [(images[:5], labels[:5]), (images[5:], labels[5:])]  # (image, label) batches work too
    assert torch.allclose(MemoryBank.from_extractor(extractor, pairs, 4).features, expected, atol=1e-6)


def test_from_extractor_rejects_bad_output_and_batches():
    images = torch.randn(4, 3, 4, 4)
    with pytest.raises(ValueError, match=r"must return a \(B, D\) tensor"):
        MemoryBank.from_extractor(nn.Identity(), [{"image": images, "label": torch.zeros(4)}], 1)
    with pytest.raises(ValueError, match="keys 'image' and 'label'"):
        MemoryBank.from_extractor(TinyExtractor(), [{"img": images}], 1)
    with pytest.raises(ValueError, match="no batches"):
        MemoryBank.from_extractor(TinyExtractor(), [], 1)


def test_state_dict_round_trip_with_a_different_size():
    feats, ids = make_bank_data()
    bank = MemoryBank(feats, ids, N)
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    placeholder = MemoryBank(torch.zeros(0, D), torch.zeros(0, dtype=torch.long), N)
    placeholder_small = MemoryBank(*make_bank_data(seed=3, counts=(1, 1, 1, 1, 1)), N)
    for target in (placeholder, placeholder_small):
        target.prototypes()  # fill the cache; loading must invalidate it
        target.load_state_dict(state)
        assert torch.equal(target.features, bank.features)
        assert torch.equal(target.identities, bank.identities)
        assert torch.allclose(target.prototypes(), bank.prototypes())
        assert torch.allclose(target.bandwidths(), bank.bandwidths())


def test_state_dict_with_other_dim_or_label_space_fails_clearly():
    feats, ids = make_bank_data()
    state = MemoryBank(feats, ids, N).state_dict()
    with pytest.raises(ValueError, match="feature dimension 4"):
        MemoryBank(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), N).load_state_dict(state)
    with pytest.raises(ValueError, match="num_identities=5 but this bank has 7"):
        MemoryBank(torch.zeros(0, D), torch.zeros(0, dtype=torch.long), 7).load_state_dict(state)


# ----------------------------------------------------------------------------------------- reward objects
def functional_values(name: str, feats, ids, bank: MemoryBank, **kw) -> dict[str, torch.Tensor]:
    if name == "sem":
        return {
            "value": RF.semantic_consistency(feats, ids, RF.prototypes(bank.features, bank.identities, N))
        }
    if name == "cov":
        return {"value": RF.coverage(feats, ids, bank.features, bank.identities, **kw)}
    if name == "exp":
        return {"value": RF.expansion(feats, ids, bank.features, bank.identities, **kw)}
    return RF.composite_reward(feats, ids, bank.features, bank.identities, **kw)


CASES = [
    ("sem", SemanticConsistencyReward, {}),
    ("cov", CoverageReward, {}),
    ("cov", CoverageReward, {"alpha": 0.9, "sigma": 0.6, "credit": "group"}),
    ("exp", ExpansionReward, {}),
    ("exp", ExpansionReward, {"epsilon": 0.3, "tau": 0.2, "credit": "group"}),
    ("all", CompositeReward, {}),
    ("all", CompositeReward, {"lambdas": (0.2, 1.0, 0.5), "alpha": 0.3, "sigma": 0.8, "credit": "group"}),
]


@pytest.mark.parametrize(("name", "cls", "kw"), CASES)
def test_objects_match_functional_and_accumulate_means(name, cls, kw):
    bank = MemoryBank(*make_bank_data(), N)
    metric = cls(bank, **kw)
    per_call = []
    for seed, identities in enumerate([(0, 1, 3), (4, 1, 0), (3, 4, 1)]):
        feats, ids = make_batch(seed, identities)
        out = metric(feats, ids)
        ref = functional_values(name, feats, ids, bank, **kw)
        main = ref["value"] if name != "all" else ref["total"]
        assert_close_to_scale(out, main)
        if name == "all":
            assert set(metric.last) == set(ref)
            for key in ref:
                assert_close_to_scale(metric.last[key], ref[key])
                assert_close_to_scale(metric.components(feats, ids)[key], ref[key])
        per_call.append(ref)
    result = metric.compute()
    if name == "all":
        assert set(result) == {"total", "sem", "cov", "exp", "sem_std", "cov_std", "exp_std"}
        for key, value in result.items():
            expected = torch.cat([r[key] for r in per_call]).mean()
            assert_close_to_scale(
                value, expected, scale=float(torch.cat([r[key] for r in per_call]).abs().max())
            )
    else:
        values = torch.cat([r["value"] for r in per_call])
        assert_close_to_scale(result, values.mean(), scale=float(values.abs().max()))
    metric.reset()
    feats, ids = make_batch(7)
    metric.update(feats, ids)
    again = metric.compute()
    fresh = functional_values(name, feats, ids, bank, **kw)
    expected = fresh["value"].mean() if name != "all" else fresh["total"].mean()
    assert_close_to_scale(again if name != "all" else again["total"], expected)


def test_group_values_are_each_identitys_set_value_and_loo_credits_sum_to_the_marginals():
    bank = MemoryBank(*make_bank_data(), N)
    metric = CompositeReward(bank, alpha=0.4, epsilon=0.2)
    feats, ids = make_batch(3, (0, 1, 3))
    groups = metric.group_values(feats, ids)
    sigmas = bank.bandwidths()
    for y in (0, 1, 3):
        members, ref = ids == y, bank.features[bank.identities == y]
        cov = RF.coverage_group(feats[members], ref, sigmas[y], alpha=0.4)
        exp = RF.expansion_group(feats[members], ref, epsilon=0.2)
        assert_close_to_scale(groups["cov_group"][members], cov.expand(K), rtol=1e-6)
        assert_close_to_scale(groups["exp_group"][members], exp.expand(K), rtol=1e-6)
        # the LOO credit of a member is R(G) - R(G minus it): a different number from the group value
        loo = metric.components(feats, ids)["cov"][members]
        drop0 = RF.coverage_group(feats[members][1:], ref, sigmas[y], alpha=0.4)
        assert_close_to_scale(loo[0], cov - drop0, scale=float(cov.abs()))  # R(G) - R(G without j)


def test_object_output_is_differentiable_and_bank_is_a_submodule():
    bank = MemoryBank(*make_bank_data(), N)
    metric = CompositeReward(bank)
    feats, ids = make_batch(0)
    feats.requires_grad_(True)
    metric(feats, ids).sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert dict(metric.named_children())["bank"] is bank
    assert "bank.features" in metric.state_dict()


def test_objects_reject_bad_input():
    feats, ids = make_batch(0)
    bank = MemoryBank(*make_bank_data(), N)
    with pytest.raises(ValueError, match="identity 2 has no entries"):
        SemanticConsistencyReward(
            MemoryBank(bank.features[bank.identities != 2], bank.identities[bank.identities != 2], N)
        )(feats, torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="credit must be one of"):
        CoverageReward(bank, credit="all")
    with pytest.raises(ValueError, match="tau must be positive"):
        ExpansionReward(bank, tau=0.0)
    with pytest.raises(ValueError, match="lambdas must hold 3"):
        CompositeReward(bank, lambdas=(1.0,))
    with pytest.raises(TypeError, match="bank must be a MemoryBank"):
        CompositeReward(bank.features)
    bad = feats.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in generated features \(1 rows\)"):
        CompositeReward(bank)(bad, ids)


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bank = MemoryBank(*make_bank_data(), N)
        composite, semantic = CompositeReward(bank), SemanticConsistencyReward(bank)
        for step in range(2 + rank):  # uneven number of calls per rank
            feats, ids = make_batch(10 * rank + step)
            composite(feats, ids)
            semantic.update(feats, ids)
        torch.save(
            {"composite": composite.compute(), "semantic": semantic.compute()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compute_reduces_over_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    bank = MemoryBank(*make_bank_data(), N)
    batches = [make_batch(s) for s in (0, 1, 10, 11, 12)]
    comps = [
        RF.composite_reward(f, i, bank.features, bank.identities, sigma=bank.bandwidths()) for f, i in batches
    ]
    sems = [RF.semantic_consistency(f, i, bank.prototypes()) for f, i in batches]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in result["composite"].items():
            values = torch.cat([c[key] for c in comps])
            assert_close_to_scale(value, values.mean(), scale=float(values.abs().max()))
        assert_close_to_scale(result["semantic"], torch.cat(sems).mean(), rtol=1e-6)


def test_bank_rejects_nan_features_and_float_labels_instead_of_truncating():
    """Issue 14 cases 3-4: NaN extractor output names its batch; float labels are refused, not truncated."""
    images = torch.randn(4, 3, 4, 4)

    class NaNs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), D), float("nan"))

    ok = {"image": images, "label": torch.tensor([0, 1, 1, 0])}
    with pytest.raises(ValueError, match="NaN or inf features for batch 1"):
        MemoryBank.from_extractor(_FailSecond(NaNs()), [ok, ok], 2)
    floats = {"image": images, "label": torch.tensor([0.0, 1.7, 1.0, 0.0])}
    with pytest.raises(ValueError, match="batch 0: labels must be integer identity indices, got dtype"):
        MemoryBank.from_extractor(TinyExtractor(), [floats], 2)
    bank = MemoryBank(*make_bank_data(), N)
    with pytest.raises(ValueError, match="identities must be integer identity indices"):
        bank.check_covers(torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match="prototype of identity 3 is a zero vector"):
        missing = MemoryBank(bank.features[bank.identities != 3], bank.identities[bank.identities != 3], N)
        RF.semantic_consistency(torch.randn(2, D), torch.tensor([3, 0]), missing.prototypes())
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        ExpansionReward(bank, epsilon=float("nan"))
    with pytest.raises(ValueError, match="lambdas must be finite"):
        CompositeReward(bank, lambdas=(1.0, float("nan"), 0.25))
    with pytest.raises(ValueError, match="sigma must be positive and finite"):
        CoverageReward(bank, sigma=float("inf"))


class _FailSecond(nn.Module):
    """The wrapped extractor on every batch but the first (which gets finite features)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.randn(len(x), D) if self.calls == 1 else self.inner(x)


def test_tau_floor_bounds_the_scale_of_identities_with_a_tiny_real_spread():
    # hand case: S_r of four identities, the third with a single bank feature (S_r undefined, 0)
    spread, counts = torch.tensor([0.01, 1.0, 0.0, 3.0]), torch.tensor([2, 3, 1, 4])
    tau = RF.floored_tau(spread, counts, 0.5)  # median of the defined (0.01, 1, 3) is 1 -> floor 0.5
    assert torch.allclose(tau, torch.tensor([0.5, 1.0, 0.5, 3.0]))
    assert torch.allclose(
        RF.floored_tau(spread, torch.ones(4, dtype=torch.long), 0.5), spread.clamp_min(1e-6)
    )
    with pytest.raises(ValueError, match="tau_floor must be positive"):
        RF.floored_tau(spread, counts, 0.0)

    # the reward objects: the same values as the functional reward given those scales per identity
    features, ids = make_bank_data(seed=3, counts=(4, 2, 1, 3, 5))
    features[4:6] = features[4] + 1e-3 * torch.randn(2, D)  # identity 1: two near-duplicate features
    bank = MemoryBank(features, ids, N)
    spread = bank.spread()
    defined = spread[bank.counts() >= 2].numpy()
    expected_tau = torch.clamp(spread, min=0.3 * float(np.median(defined)))
    assert float(spread[1]) < 1e-4 < float(expected_tau[1])
    x, y = make_batch(5, identities=(0, 1, 3))
    floored = ExpansionReward(bank, tau_floor=0.3)(x, y)
    reference = RF.expansion(x, y, bank.features, bank.identities, tau=expected_tau)
    assert_close_to_scale(floored, reference, rtol=1e-5)
    plain = ExpansionReward(bank)(x, y)  # the paper's tau = S_r: identity 1's penalty dwarfs the others
    assert plain[y == 1].abs().max() > 100 * floored[y == 1].abs().max()
    composite = CompositeReward(bank, tau_floor=0.3)
    composite(x, y)
    assert_close_to_scale(composite.last["exp"], reference, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        ExpansionReward(bank, tau=1.0, tau_floor=0.3)
    with pytest.raises(ValueError, match="tau_floor must be positive"):
        CompositeReward(bank, tau_floor=-1.0)
