"""The functional reward (Eqs. 2-11) against an independent NumPy implementation and hand-worked cases."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale

from rgsd_lightning.rewards import functional as RF


# ------------------------------------------------------------------- independent NumPy reference (loops)
def np_unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_k(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    return math.exp(-float(np.sum((a - b) ** 2)) / (2.0 * sigma**2))


def np_trace(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    return float(np.trace(np.atleast_2d(np.cov(x, rowvar=False))))  # np.cov: n - 1 denominator


def np_median_bw(bank: np.ndarray, ids: np.ndarray, y: int) -> float:
    def med(rows: np.ndarray) -> float:
        return float(
            np.median([np.linalg.norm(rows[i] - rows[j]) for i, j in combinations(range(len(rows)), 2)])
        )

    rows = bank[ids == y]
    if len(rows) >= 2:
        return max(med(rows), 1e-3)
    if len(bank) < 2:
        return 1.0
    return max(med(bank), 1e-3)


def np_cov_set(g: np.ndarray, b: np.ndarray, sigma: float, alpha: float) -> float:
    if len(g) == 0:
        return 0.0
    cross = np.mean([np_k(x, r, sigma) for x in g for r in b])
    pairs = [np_k(g[a], g[c], sigma) for a in range(len(g)) for c in range(len(g)) if a != c]
    return float(cross - alpha * (np.mean(pairs) if pairs else 0.0))


def np_exp_set(g: np.ndarray, b: np.ndarray, eps: float, tau: float | None) -> float:
    if len(g) == 0 or len(b) < 2:
        return 0.0
    s_r = np_trace(b)
    t = max(s_r, 1e-6) if tau is None else tau
    return -(((np_trace(g) - (1 + eps) * s_r) / t) ** 2)


def np_credit(set_fn, g: np.ndarray, credit: str) -> list[float]:
    full = set_fn(g)
    if credit == "group":
        return [full] * len(g)
    return [full - set_fn(np.delete(g, j, axis=0)) for j in range(len(g))]


def np_standardize(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    if len(x) <= 1 or np.ptp(x) == 0:
        return np.zeros_like(x)
    return (x - x.mean()) / (x.std() + eps)  # np.std: population std


def np_composite(
    f, y, bank, z, lambdas=(1.0, 0.75, 0.25), alpha=0.5, sigma=None, eps_exp=0.1, tau=None, credit="loo"
):
    f, bank = np_unit(f), np_unit(bank)
    n = len(f)
    sem, cov, exp = np.zeros(n), np.zeros(n), np.zeros(n)
    for j in range(n):
        proto = bank[z == y[j]].mean(axis=0)
        proto = proto / np.linalg.norm(proto)
        sem[j] = 0.5 * (f[j] @ proto + 1.0)
    for ident in sorted(set(y.tolist())):
        members = np.flatnonzero(y == ident)
        g, b = f[members], bank[z == ident]
        s = np_median_bw(bank, z, ident) if sigma is None else sigma
        cov[members] = np_credit(lambda s_, b=b, s=s: np_cov_set(s_, b, s, alpha), g, credit)
        exp[members] = np_credit(lambda s_, b=b: np_exp_set(s_, b, eps_exp, tau), g, credit)
    std = [np_standardize(v) for v in (sem, cov, exp)]
    total = np.tanh(sum(lam * s for lam, s in zip(lambdas, std, strict=True)))
    return {
        "total": total,
        "sem": sem,
        "cov": cov,
        "exp": exp,
        "sem_std": std[0],
        "cov_std": std[1],
        "exp_std": std[2],
    }


def random_case(seed: int, p: int = 3, k: int = 4, d: int = 6, bank_counts=(5, 3, 7, 4)):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(bank_counts), d)) * 2
    z = np.concatenate([np.full(c, i) for i, c in enumerate(bank_counts)])
    bank = centres[z] + rng.normal(size=(len(z), d))
    y = np.repeat(np.arange(p), k)
    f = centres[y] + 1.2 * rng.normal(size=(len(y), d))
    return f, y, bank, z


def run_torch(f, y, bank, z, dtype=torch.float64, **kw):
    out = RF.composite_reward(
        torch.tensor(f, dtype=dtype), torch.tensor(y), torch.tensor(bank, dtype=dtype), torch.tensor(z), **kw
    )
    return {key: v.detach().double().numpy() for key, v in out.items()}


# ------------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("credit", ["loo", "group"])
@pytest.mark.parametrize("sigma", [None, 0.7])
@pytest.mark.parametrize("tau", [None, 0.3])
def test_composite_matches_numpy_reference(credit, sigma, tau):
    f, y, bank, z = random_case(seed=1)
    got = run_torch(f, y, bank, z, credit=credit, sigma=sigma, tau=tau)
    ref = np_composite(f, y, bank, z, credit=credit, sigma=sigma, tau=tau)
    assert set(got) == set(ref)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert np.ptp(got["cov"]) > 0 and np.ptp(got["exp"]) > 0  # the comparison is not trivially of zeros


def test_composite_matches_reference_uneven_groups_float32():
    """Uneven groups (one of size 1), shuffled order, an identity with one bank feature, float32 inputs."""
    f, _, bank, z = random_case(seed=2, bank_counts=(4, 1, 6, 3))
    y = np.array([2, 0, 1, 2, 0, 2, 3, 0, 2, 3])  # identity 1: a group of one with one bank feature
    f = np.concatenate([f, f[:2] + 0.3])[: len(y)]
    got = run_torch(f, y, bank, z, dtype=torch.float32, alpha=0.8, epsilon=0.2, lambdas=(0.5, 1.0, 0.3))
    ref = np_composite(f, y, bank, z, alpha=0.8, eps_exp=0.2, lambdas=(0.5, 1.0, 0.3))
    for key in ref:  # float32 against a float64 reference: relative to each component's magnitude
        assert_close_to_scale(got[key], ref[key], rtol=2e-5)
    assert got["exp"][2] == 0.0  # one bank feature: no information about the real spread


def test_median_bandwidth_and_spread_match_reference():
    _, _, bank, z = random_case(seed=3, bank_counts=(4, 1, 6, 2))
    bw = RF.median_bandwidth(torch.tensor(bank), torch.tensor(z), 5).numpy()
    ref_bank = np_unit(bank)
    expected = [np_median_bw(ref_bank, z, i) for i in range(4)]
    np.testing.assert_allclose(bw[:4], expected, rtol=1e-9)
    assert bw[4] == pytest.approx(np_median_bw(ref_bank, z, 4))  # identity without features: the fallback
    spread = RF.reference_spread(torch.tensor(bank), torch.tensor(z), 5).numpy()
    np.testing.assert_allclose(spread, [np_trace(ref_bank[z == i]) for i in range(5)], rtol=1e-9, atol=1e-12)
    protos = RF.prototypes(torch.tensor(bank), torch.tensor(z), 5).numpy()
    for i in range(4):
        m = ref_bank[z == i].mean(axis=0)
        np.testing.assert_allclose(protos[i], m / np.linalg.norm(m), rtol=1e-9)
    assert np.all(protos[4] == 0)


# -------------------------------------------------------------------------------- hand-worked cases
def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def test_hand_worked_semantic():
    # bank of identity 0: (1,0), (0,1) -> prototype (1,1)/sqrt(2); f = (1,0): cos = 1/sqrt(2)
    proto = RF.prototypes(t([[1, 0], [0, 1]]), torch.tensor([0, 0]), 1)
    sem = RF.semantic_consistency(t([[2, 0], [-1, -1]]), torch.tensor([0, 0]), proto)
    assert sem.tolist() == pytest.approx([0.5 * (1 / math.sqrt(2) + 1), 0.0])


def test_hand_worked_coverage():
    # G = {(1,0), (0,1)}, B = {(1,0)}, sigma = 1, alpha = 0.5.
    # k((1,0),(1,0)) = 1, k((0,1),(1,0)) = exp(-2/2) = e^-1 -> cross term (1 + e^-1) / 2;
    # ordered pairs in G: both e^-1 -> R(G) = (1 + e^-1)/2 - 0.5 e^-1 = 0.5.
    # LOO: R({(0,1)}) = e^-1, R({(1,0)}) = 1 -> credits 0.5 - e^-1 and 0.5 - 1.
    g, b, ids = t([[1, 0], [0, 1]]), t([[1, 0]]), torch.tensor([0, 0])
    e = math.exp(-1)
    assert RF.coverage_group(g, b, 1.0, 0.5).item() == pytest.approx(0.5)
    assert RF.coverage_group(g[:1], b, 1.0, 0.5).item() == pytest.approx(1.0)  # group of one: no pairs
    assert RF.coverage_group(g[:0], b, 1.0, 0.5).item() == 0.0
    loo = RF.coverage(g, ids, b, torch.tensor([0]), sigma=1.0, credit="loo")
    assert loo.tolist() == pytest.approx([0.5 - e, -0.5])
    grp = RF.coverage(g, ids, b, torch.tensor([0]), sigma=1.0, credit="group")
    assert grp.tolist() == pytest.approx([0.5, 0.5])


def test_hand_worked_expansion():
    # G = {(1,0), (0,1)}: mean (.5,.5), squared deviations .5 + .5 -> S_g = 1 / (2 - 1) = 1.
    # B = {(1,0), (-1,0)}: mean 0, deviations 1 + 1 -> S_r = 2. tau = S_r = 2, eps = 0.1:
    # R(G) = -((1 - 2.2) / 2)^2 = -0.36; R({one}) = -((0 - 2.2) / 2)^2 = -1.21 -> LOO credit 0.85 each.
    g, b = t([[1, 0], [0, 1]]), t([[1, 0], [-1, 0]])
    assert RF.covariance_trace(g).item() == pytest.approx(1.0)
    assert RF.expansion_group(g, b).item() == pytest.approx(-0.36)
    assert RF.expansion_group(g, b, tau=1.0).item() == pytest.approx(-1.44)
    assert RF.expansion_group(g, b[:1]).item() == 0.0  # S_r undefined
    ids, bids = torch.tensor([0, 0]), torch.tensor([0, 0])
    assert RF.expansion(g, ids, b, bids).tolist() == pytest.approx([0.85, 0.85])
    assert RF.expansion(g, ids, b, bids, credit="group").tolist() == pytest.approx([-0.36, -0.36])
    assert RF.expansion(g[:1], ids[:1], b, bids).tolist() == pytest.approx([-1.21])  # R({j}) - R(empty)


def test_hand_worked_bandwidth_and_kernel():
    # identity 0: (1,0), (0,1), (-1,0): distances sqrt2, 2, sqrt2 -> median sqrt2.
    # identity 1 has one feature -> median over all 6 bank pairs: sqrt2, 2, sqrt2 | (1,0)-(0,-1) sqrt2,
    # (0,1)-(0,-1) 2, (-1,0)-(0,-1) sqrt2 -> median sqrt2. Identity 2 (no features) -> same fallback.
    bank = t([[1, 0], [0, 1], [-1, 0], [0, -1]])
    bw = RF.median_bandwidth(bank, torch.tensor([0, 0, 0, 1]), 3)
    assert bw.tolist() == pytest.approx([math.sqrt(2)] * 3)
    # even number of pairs: NumPy median (mean of the middle two); (1,0),(0,1),(-1,0),(0,-1) for one
    # identity: pairs sqrt2 x4, 2 x2 -> median sqrt2; identical features -> the 1e-3 floor
    assert RF.median_bandwidth(bank, torch.zeros(4, dtype=torch.long), 1).item() == pytest.approx(
        math.sqrt(2)
    )
    assert RF.median_bandwidth(t([[1, 0], [2, 0]]), torch.tensor([0, 0]), 1).item() == pytest.approx(1e-3)
    assert RF.median_bandwidth(t([[1, 0]]), torch.tensor([0]), 1).item() == 1.0  # a bank of one
    k = RF.rbf_kernel(t([[0, 0], [1, 0]]), t([[0, 2]]), 2.0)
    assert k.flatten().tolist() == pytest.approx([math.exp(-4 / 8), math.exp(-5 / 8)])


def test_standardize():
    x = torch.tensor([1.0, 2.0, 4.0])
    expected = (x - x.mean()) / (x.std(unbiased=False) + 1e-8)
    assert torch.allclose(RF.standardize(x), expected)
    assert RF.standardize(torch.tensor([3.0])).tolist() == [0.0]
    assert RF.standardize(torch.full((4,), 0.1)).tolist() == [0.0] * 4
    assert RF.standardize(torch.zeros(0)).numel() == 0


# ---------------------------------------------------------------------------- degenerate, finite, grad
def test_degenerate_inputs_give_finite_values():
    # identity 0: identical bank features (S_r = 0) and identical generated samples (zero variance);
    # identity 1: a single bank feature and a group of one
    bank = t([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    bids = torch.tensor([0, 0, 1])
    f = t([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1]]).requires_grad_(True)
    ids = torch.tensor([0, 0, 0, 1])
    for credit in ("loo", "group"):
        out = RF.composite_reward(f, ids, bank, bids, credit=credit)
        for key, v in out.items():
            assert torch.isfinite(v).all(), key
        assert out["exp"][3] == 0.0
        out["total"].sum().backward()
        assert torch.isfinite(f.grad).all()
        f.grad = None
    one = RF.composite_reward(f[:1], ids[:1], bank, bids)  # a batch of one
    assert one["total"].tolist() == [0.0] and torch.isfinite(one["cov"]).all()


def test_gradient_of_total_is_finite_and_nonzero():
    f, y, bank, z = random_case(seed=4)
    feats = torch.tensor(f, dtype=torch.float32, requires_grad=True)
    out = RF.composite_reward(
        feats, torch.tensor(y), torch.tensor(bank, dtype=torch.float32), torch.tensor(z)
    )
    out["total"].sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    for key in ("sem", "cov", "exp"):
        (g,) = torch.autograd.grad(
            RF.composite_reward(feats, torch.tensor(y), torch.tensor(bank), torch.tensor(z))[key].sum(), feats
        )
        assert torch.isfinite(g).all() and g.abs().sum() > 0, key


def test_autocast_does_not_lower_the_precision():
    f, y, bank, z = (torch.tensor(a, dtype=torch.float32) for a in random_case(seed=6))
    y, z = y.long(), z.long()
    plain = RF.composite_reward(f, y, bank, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = RF.composite_reward(f.bfloat16(), y, bank.bfloat16(), z)
        lowered = RF.composite_reward(f.bfloat16().float(), y, bank.bfloat16().float(), z)
    for key in plain:
        assert mixed[key].dtype == torch.float32
        assert_close_to_scale(mixed[key], lowered[key])  # only the inputs were rounded


# ------------------------------------------------------------------------------------ behaviour checks
def test_closer_to_prototype_scores_higher_sem():
    bank = t([[1, 0.1], [1, -0.1]])
    f = t([[1, 0.05], [1, 1], [0, 1]])
    sem = RF.composite_reward(f, torch.zeros(3, dtype=torch.long), bank, torch.zeros(2, dtype=torch.long))[
        "sem"
    ]
    assert sem[0] > sem[1] > sem[2]


def test_duplicate_sample_gets_lower_coverage_credit():
    ang = [0.5, -0.5, 0.0]
    bank = t([[math.cos(a), math.sin(a)] for a in ang])
    # samples 0 and 1: duplicates at +0.4 rad; sample 2 mirrors them at -0.4 rad (same distance to the bank)
    f = t([[math.cos(0.4), math.sin(0.4)], [math.cos(0.4), math.sin(0.4)], [math.cos(0.4), -math.sin(0.4)]])
    cov = RF.coverage(f, torch.zeros(3, dtype=torch.long), bank, torch.zeros(3, dtype=torch.long), sigma=0.5)
    assert cov[0] == pytest.approx(cov[1].item())
    assert cov[2] > cov[0] + 1e-3


def test_spread_above_target_lowers_expansion():
    rng = np.random.default_rng(0)
    centre = np.array([1.0, 0, 0, 0])
    bank = t(centre + 0.1 * rng.normal(size=(8, 4)))
    s_r = RF.covariance_trace(RF.l2_normalize(bank)).item()
    near = t(centre + 0.105 * rng.normal(size=(6, 4)))
    wide = t(centre + 0.6 * rng.normal(size=(6, 4)))
    assert RF.covariance_trace(RF.l2_normalize(wide)).item() > 1.1 * s_r
    f = torch.cat([near, wide])
    ids = torch.tensor([0] * 6 + [1] * 6)
    out = RF.expansion(f, ids, torch.cat([bank, bank]), torch.tensor([0] * 8 + [1] * 8), credit="group")
    assert out[:6].min() > out[6:].max()


# -------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    f, y, bank, z = (torch.tensor(a) for a in random_case(seed=5))
    bad = f.clone()
    bad[[0, 3, 5], 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in generated features \(3 rows\)"):
        RF.composite_reward(bad, y, bank, z)
    bad_bank = bank.clone()
    bad_bank[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf in bank features \(1 rows\)"):
        RF.composite_reward(f, y, bad_bank, z)
    y7 = y.clone()
    y7[0] = 7
    with pytest.raises(ValueError, match="identity 7 has no entries in the memory bank"):
        RF.composite_reward(f, y7, bank, z)
    with pytest.raises(ValueError, match="features has 12 rows but identities has 11 entries"):
        RF.composite_reward(f, y[:-1], bank, z)
    with pytest.raises(ValueError, match="dimension 6 but bank features have dimension 5"):
        RF.composite_reward(f, y, bank[:, :5], z)
    with pytest.raises(ValueError, match="credit must be one of"):
        RF.composite_reward(f, y, bank, z, credit="mean")
    with pytest.raises(ValueError, match="lambdas must hold 3"):
        RF.composite_reward(f, y, bank, z, lambdas=(1.0, 1.0))
    with pytest.raises(ValueError, match="sigma must be positive"):
        RF.composite_reward(f, y, bank, z, sigma=0.0)
    with pytest.raises(ValueError, match="integer tensor"):
        RF.composite_reward(f, y.float(), bank, z)


def test_meaningless_inputs_raise_instead_of_returning_nan_or_constants():
    """Issue 14 case 3: NaN prototypes / features / epsilon / lambdas and zero prototypes fail loudly."""
    f, y, bank, z = (torch.tensor(a) for a in random_case(seed=5))
    protos = RF.prototypes(bank, z, 4)
    nan_protos = protos.clone()
    nan_protos[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in prototypes \(1 rows\)"):
        RF.semantic_consistency(f, y, nan_protos)
    # an identity without bank entries gets a zero prototype row: scoring it would give 0.5 for any sample
    protos_missing = RF.prototypes(bank[z != 2], z[z != 2], 4)
    assert protos_missing[2].abs().max() == 0
    with pytest.raises(ValueError, match="prototype of identity 2 is a zero vector"):
        RF.semantic_consistency(f, y, protos_missing)
    ok = RF.semantic_consistency(f[y != 2], y[y != 2], protos_missing)  # other identities still score
    assert torch.isfinite(ok).all()
    group, rows = f[y == 0], bank[z == 0]
    nan_group = group.clone()
    nan_group[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in group \(1 rows\)"):
        RF.coverage_group(nan_group, rows, 1.0)
    with pytest.raises(ValueError, match=r"NaN or inf in group \(1 rows\)"):
        RF.expansion_group(nan_group, rows)
    with pytest.raises(ValueError, match=r"NaN or inf in bank \(1 rows\)"):
        RF.coverage_group(group, torch.cat([rows, nan_group[:1]]), 1.0)
    with pytest.raises(ValueError, match="sigma must be positive and finite, got nan"):
        RF.coverage_group(group, rows, float("nan"))
    with pytest.raises(ValueError, match="tau must be positive and finite"):
        RF.expansion_group(group, rows, tau=-1.0)
    for kwargs, name in (
        ({"epsilon": float("nan")}, "epsilon"),
        ({"alpha": float("inf")}, "alpha"),
        ({"lambdas": (1.0, float("nan"), 0.25)}, "lambdas"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be (a )?finite"):
            RF.composite_reward(f, y, bank, z, **kwargs)
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        RF.expansion_group(group, rows, epsilon=float("nan"))
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        RF.expansion(f, y, bank, z, epsilon=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        RF.coverage(f, y, bank, z, alpha=float("nan"))
    with pytest.raises(ValueError, match="NaN or inf in the values to standardise"):
        RF.standardize(torch.tensor([0.1, float("nan"), 0.3]))
