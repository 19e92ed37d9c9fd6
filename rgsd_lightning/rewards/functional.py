"""The three-part reward of the paper (Eqs. 2-11) as pure, per-sample tensor functions.

Notation: generated features ``features`` (B, D) with identity indices ``identities`` (B,); memory-bank
features ``bank_features`` (M, D) with identities ``bank_identities`` (M,). Every function L2-normalises the
features it is given. The generated group of identity y is ``G_y = {j : identities[j] == y}`` and its bank
set is ``B_y = {i : bank_identities[i] == y}``.

* semantic consistency (Eqs. 2-3): ``sem_j = (cos(f_j, p_y) + 1) / 2``, ``p_y`` the normalised mean of B_y;
* coverage (Eqs. 4-5): ``R_cov(G) = mean_{g in G, r in B_y} k(g, r) - alpha * mean_{g != g' in G} k(g, g')``;
* expansion (Eqs. 6-9): ``R_exp(G) = -((S_g - (1 + eps) S_r) / tau)^2`` with S the covariance trace (n - 1
  denominator; a set of one has trace 0).

Coverage and expansion are set functions of a group; ``credit`` turns them into one value per sample:
``"group"`` gives every member ``R(G_y)``, ``"loo"`` (default) the leave-one-out marginal
``R(G_y) - R(G_y without j)`` with ``R(empty set) = 0``. Each component is standardised over the batch
(Eq. 10, population std) and the total is ``tanh(sum_i lambda_i * R~_i)`` (Eq. 11).

Decisions where the paper is silent (DESIGN.md section 4):

* ``sigma=None``: median heuristic per identity (:func:`median_bandwidth`); ``tau=None``: ``S_r`` of the
  identity, floored at 1e-6 so an identity whose bank features are all identical gives a finite (large)
  penalty rather than a division by zero.
* ``tau_floor`` (opt-in, not the paper's): ``tau_y = max(S_r(y), tau_floor * median S_r)``
  (:func:`floored_tau`), for banks whose identities have a few near-duplicate images (video frames).
* an identity with fewer than two bank features has no defined ``S_r``: its expansion reward is 0 for every
  member (no information about the real spread), whatever ``tau``.
* the rewards are differentiable with respect to the generated features; the bank, the bandwidths and
  ``S_r`` are treated as constants.
* computations run in float32 at least (float64 inputs stay float64) with autocast disabled, whatever
  the input precision.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

Credit = Literal["loo", "group"]
CREDITS: tuple[str, ...] = ("loo", "group")
COMPONENTS: tuple[str, ...] = ("sem", "cov", "exp")

_NORM_EPS = 1e-12
TAU_FLOOR = 1e-6
# the global median-distance fallback looks at no more than this many (evenly spaced) bank rows
GLOBAL_MEDIAN_MAX_ROWS = 2048


# ----------------------------------------------------------------------------------------------- helpers
def l2_normalize(x: Tensor, eps: float = _NORM_EPS) -> Tensor:
    """Rows of ``x`` divided by their L2 norm (floored at ``eps``, so a zero row stays zero)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _full_precision(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument (rewards stay fp32)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        ctx: Any = contextlib.nullcontext()
        if first is not None:
            try:
                ctx = torch.autocast(device_type=first.device.type, enabled=False)
            except RuntimeError:  # a device type without autocast support
                pass
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor; the mean of the two middle values for an even count (as NumPy)."""
    s = values.sort().values
    n = s.numel()
    if n % 2:
        return s[n // 2]
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of all pairs i < i' of the rows of ``x`` (exact, no matmul shortcut)."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return d[iu[0], iu[1]]


def _check_identity_range(identities: Tensor, num_identities: int, name: str) -> None:
    if identities.numel() and (int(identities.min()) < 0 or int(identities.max()) >= num_identities):
        raise ValueError(
            f"{name} must lie in [0, {num_identities}), got values in "
            f"[{int(identities.min())}, {int(identities.max())}]"
        )


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D (rows, dim) tensor, got {shape}")
    bad = int((~torch.isfinite(x)).any(dim=1).sum()) if x.numel() else 0
    if bad:
        raise ValueError(f"NaN or inf in {name} ({bad} rows)")


def _check_same_dim(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} have dimension {a.shape[1]} but {name_b} have dimension {b.shape[1]}")


def _check_finite(value: float | Tensor, name: str) -> float:
    """``value`` as a float; ValueError naming ``name`` when it is NaN or infinite."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def _check_scale(value: float | Tensor, name: str) -> None:
    """A bandwidth / penalty scale given as a float or a scalar tensor must be positive and finite."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a float or a scalar tensor here, got shape {tuple(value.shape)}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {v}")


def _check_lambdas(lambdas: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in lambdas)
    if len(values) != 3:
        raise ValueError(f"lambdas must hold 3 weights (sem, cov, exp), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"lambdas must be finite numbers, got {list(values)}")
    return values  # type: ignore[return-value]


def _check_labels(ids: Tensor, rows: int, name: str, of: str) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-D tensor of identity indices, got {shape}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() != rows:
        raise ValueError(f"{of} has {rows} rows but {name} has {ids.numel()} entries")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got {int(ids.min())}")


# ------------------------------------------------------------------------------------------ Eqs. 2-4
def prototypes(bank_features: Tensor, bank_identities: Tensor, num_identities: int) -> Tensor:
    """Eq. 2: the (N, D) normalised mean of each identity's normalised bank features.

    Args:
        bank_features: (M, D) reference features.
        bank_identities: (M,) identity index of each row, in ``[0, num_identities)``.
        num_identities: N, the number of rows returned; an identity without bank rows gets a zero row.
    """
    _check_matrix(bank_features, "bank features")
    _check_labels(bank_identities, bank_features.shape[0], "bank identities", "bank features")
    _check_identity_range(bank_identities, num_identities, "bank identities")
    f = l2_normalize(bank_features.to(_work_dtype(bank_features)))
    sums = f.new_zeros(num_identities, f.shape[1]).index_add(0, bank_identities.to(f.device).long(), f)
    return l2_normalize(sums)  # the normalised mean equals the normalised sum


@_full_precision
def semantic_consistency(features: Tensor, identities: Tensor, prototypes: Tensor) -> Tensor:
    """Eq. 3: ``(cos(f_j, p_{y_j}) + 1) / 2`` in [0, 1] for each generated sample, shape (B,).

    Args:
        features: (B, D) generated features.
        identities: (B,) identity index of each generated sample.
        prototypes: (N, D) identity prototypes (e.g. from :func:`prototypes`); normalised again here.
    """
    _check_matrix(features, "generated features")
    _check_labels(identities, features.shape[0], "identities", "features")
    _check_matrix(prototypes, "prototypes")
    _check_same_dim(features, prototypes, "generated features", "prototypes")
    _check_identity_range(identities, prototypes.shape[0], "identities")
    dtype = _work_dtype(features, prototypes)
    f = l2_normalize(features.to(dtype))
    ids = identities.to(f.device).long()
    p = prototypes.to(device=f.device, dtype=dtype)[ids]
    empty = p.abs().amax(dim=-1) == 0
    if bool(empty.any()):
        y = int(ids[empty][0])
        raise ValueError(
            f"the prototype of identity {y} is a zero vector: the identity has no memory-bank features "
            "(prototypes() gives such identities a zero row); score only identities with bank features"
        )
    return 0.5 * ((f * l2_normalize(p)).sum(dim=-1) + 1.0)


def rbf_kernel(u: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """Eq. 4 for all pairs: ``exp(-||u_a - v_b||^2 / (2 sigma^2))``, (..., n, D) x (..., m, D) -> (..., n, m).

    Args:
        u: (..., n, D) first set of vectors.
        v: (..., m, D) second set of vectors.
        sigma: bandwidth (> 0), a float or a scalar tensor.
    """
    sq = u.pow(2).sum(-1).unsqueeze(-1) + v.pow(2).sum(-1).unsqueeze(-2) - 2.0 * (u @ v.transpose(-1, -2))
    return torch.exp(-sq.clamp_min(0.0) / (2.0 * sigma * sigma))


def median_bandwidth(
    bank_features: Tensor, bank_identities: Tensor, num_identities: int, floor: float = 1e-3
) -> Tensor:
    """Median heuristic for sigma: per identity, the median pairwise distance of its normalised bank features.

    The median is NumPy's (mean of the two middle values for an even number of pairs). An identity with
    fewer than two bank features falls back to the median over all bank pairs (estimated on at most
    ``GLOBAL_MEDIAN_MAX_ROWS`` evenly spaced rows of a larger bank); a bank of a single feature gives 1.0.
    Every value is floored at ``floor``. Computed without gradient.

    Args:
        bank_features: (M, D) reference features.
        bank_identities: (M,) identity index of each row.
        num_identities: N, the number of identities (length of the result).
        floor: smallest bandwidth returned.
    """
    _check_matrix(bank_features, "bank features")
    _check_labels(bank_identities, bank_features.shape[0], "bank identities", "bank features")
    _check_identity_range(bank_identities, num_identities, "bank identities")
    with torch.no_grad():
        f = l2_normalize(bank_features.detach().to(_work_dtype(bank_features)))
        groups = _bank_groups(f, bank_identities.to(f.device).long(), num_identities)
        fallback = _GlobalMedian(f, floor)
        out = [_identity_bandwidth(rows, fallback, floor) for rows in groups]
        return torch.stack(out) if out else f.new_zeros(0)


class _GlobalMedian:
    """The bank-wide median distance, computed on first use only (the fallback of the median heuristic)."""

    def __init__(self, bank: Tensor, floor: float) -> None:
        self.bank, self.floor, self.value = bank, floor, None

    def __call__(self) -> Tensor:
        if self.value is None:
            f = self.bank
            if f.shape[0] < 2:
                self.value = f.new_tensor(1.0)
            else:
                if f.shape[0] > GLOBAL_MEDIAN_MAX_ROWS:
                    idx = torch.linspace(0, f.shape[0] - 1, GLOBAL_MEDIAN_MAX_ROWS, device=f.device)
                    f = f[idx.round().long()]
                self.value = _median(_pair_distances(f)).clamp_min(self.floor)
        return self.value


def _identity_bandwidth(rows: Tensor, fallback: Callable[[], Tensor], floor: float) -> Tensor:
    if rows.shape[0] < 2:
        return fallback()
    return _median(_pair_distances(rows)).clamp_min(floor)


def _bank_groups(f: Tensor, ids: Tensor, num_identities: int) -> list[Tensor]:
    """The bank rows of every identity 0..N-1 (one sort, then slices)."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_identities).tolist()
    sorted_f = f[order]
    out, start = [], 0
    for c in counts[:num_identities]:
        out.append(sorted_f[start : start + c])
        start += c
    return out


def covariance_trace(x: Tensor) -> Tensor:
    """Eqs. 6-8: trace of the sample covariance of the rows of ``x`` (n - 1 denominator); 0 for n < 2.

    Args:
        x: (n, D) features (used as given, not normalised here).
    """
    n = x.shape[0]
    if n < 2:
        return x.new_zeros(())
    return (x - x.mean(dim=0, keepdim=True)).pow(2).sum() / (n - 1)


def reference_spread(bank_features: Tensor, bank_identities: Tensor, num_identities: int) -> Tensor:
    """S_r per identity (N,): covariance trace of its normalised bank features; 0 with fewer than two rows.

    Args:
        bank_features: (M, D) reference features.
        bank_identities: (M,) identity index of each row.
        num_identities: N, the number of identities.
    """
    _check_matrix(bank_features, "bank features")
    _check_labels(bank_identities, bank_features.shape[0], "bank identities", "bank features")
    _check_identity_range(bank_identities, num_identities, "bank identities")
    with torch.no_grad():
        f = l2_normalize(bank_features.detach().to(_work_dtype(bank_features)))
        groups = _bank_groups(f, bank_identities.to(f.device).long(), num_identities)
        out = [covariance_trace(rows) for rows in groups]
        return torch.stack(out) if out else f.new_zeros(0)


# ------------------------------------------------------------------ set functions over subsets of a group
def _subset_weights(n: int, credit: str, like: Tensor) -> Tensor:
    """Rows = subsets of a group of n as 0/1 weights: the full group, then (loo) the group without each j."""
    full = like.new_ones(1, n)
    if credit == "group":
        return full
    return torch.cat([full, 1.0 - torch.eye(n, dtype=like.dtype, device=like.device)])


def _coverage_subsets(g: Tensor, bank: Tensor, sigma: float | Tensor, alpha: float, w: Tensor) -> Tensor:
    """Eq. 5 on every subset (row of ``w``) of the normalised group ``g``; the empty subset scores 0."""
    n = g.shape[0]
    sizes = w.sum(dim=1)
    cross = w @ rbf_kernel(g, bank, sigma).mean(dim=1)
    off_diag = 1.0 - torch.eye(n, dtype=g.dtype, device=g.device)
    k_gg = rbf_kernel(g, g, sigma) * off_diag
    redundancy = torch.einsum("si,ij,sj->s", w, k_gg, w)
    return cross / sizes.clamp_min(1.0) - alpha * redundancy / (sizes * (sizes - 1.0)).clamp_min(1.0)


def floored_tau(spread: Tensor, counts: Tensor, floor: float) -> Tensor:
    """Per-identity expansion scale ``tau_y = max(S_r(y), floor * median S_r)`` (the median over the
    identities with at least two bank features), itself floored at ``TAU_FLOOR``.

    ``tau = S_r`` makes the expansion penalty relative, ``((S_g / S_r) - (1 + eps))^2``; an identity whose
    few real images are near duplicates (consecutive video frames) has a tiny S_r, and its penalty then
    dwarfs every other identity's (on the PETA ReID set raw values reached +-1,100 with std 64) - after the
    batch standardisation of Eq. 10 the expansion term of every other sample is close to zero. The floor
    bounds that scale by the typical identity's spread.

    Args:
        spread: (N,) S_r of each identity (``reference_spread``; 0 where undefined).
        counts: (N,) bank features of each identity.
        floor: fraction of the median S_r (> 0).
    """
    _check_scale(floor, "tau_floor")
    defined = spread[counts >= 2]
    if defined.numel() == 0:
        return spread.clamp_min(TAU_FLOOR)
    return spread.clamp_min(float(floor) * float(_median(defined))).clamp_min(TAU_FLOOR)


def _expansion_subsets(g: Tensor, s_r: Tensor, epsilon: float, tau: float | Tensor, w: Tensor) -> Tensor:
    """Eq. 9 on every subset (row of ``w``) of the normalised group ``g``; the empty subset scores 0."""
    sizes = w.sum(dim=1)
    means = (w @ g) / sizes.clamp_min(1.0).unsqueeze(1)
    sq = (g.unsqueeze(0) - means.unsqueeze(1)).pow(2).sum(dim=-1)  # (subsets, n)
    s_g = (w * sq).sum(dim=1) / (sizes - 1.0).clamp_min(1.0)
    r = -((s_g - (1.0 + epsilon) * s_r) / tau).pow(2)
    return torch.where(sizes > 0, r, torch.zeros_like(r))


def _credit(values: Tensor, n: int, credit: str) -> Tensor:
    if credit == "group":
        return values[0].expand(n)
    return values[0] - values[1:]


@_full_precision
def coverage_group(group: Tensor, bank: Tensor, sigma: float | Tensor, alpha: float = 0.5) -> Tensor:
    """Eq. 5 for one identity: mean k(g, r) over group x bank minus ``alpha`` x the mean over ordered pairs.

    A group of one has no pairs (redundancy term 0); an empty group scores 0.

    Args:
        group: (n, D) generated features of one identity.
        bank: (m, D) bank features of that identity, m >= 1.
        sigma: RBF bandwidth (> 0).
        alpha: weight of the redundancy term.
    """
    _check_group_and_bank(group, bank)
    if bank.shape[0] == 0:
        raise ValueError("coverage needs at least one bank feature for the identity")
    _check_scale(sigma, "sigma")
    alpha = _check_finite(alpha, "alpha")
    dtype = _work_dtype(group, bank)
    g = l2_normalize(group.to(dtype))
    if g.shape[0] == 0:
        return g.new_zeros(())
    b = l2_normalize(bank.to(device=g.device, dtype=dtype))
    return _coverage_subsets(g, b, sigma, alpha, g.new_ones(1, g.shape[0]))[0]


@_full_precision
def expansion_group(
    group: Tensor, bank: Tensor, epsilon: float = 0.1, tau: float | Tensor | None = None
) -> Tensor:
    """Eqs. 6-9 for one identity: ``-((S_g - (1 + epsilon) S_r) / tau)^2``.

    ``tau=None`` uses ``max(S_r, 1e-6)``. A bank of fewer than two features (S_r undefined) and an empty
    group score 0; a group of one has ``S_g = 0``.

    Args:
        group: (n, D) generated features of one identity.
        bank: (m, D) bank features of that identity.
        epsilon: target expansion over the real spread.
        tau: scale of the penalty (> 0); None = S_r of the identity.
    """
    _check_group_and_bank(group, bank)
    epsilon = _check_finite(epsilon, "epsilon")
    if tau is not None:
        _check_scale(tau, "tau")
    dtype = _work_dtype(group, bank)
    g = l2_normalize(group.to(dtype))
    if g.shape[0] == 0 or bank.shape[0] < 2:
        return g.new_zeros(())
    s_r = covariance_trace(l2_normalize(bank.detach().to(device=g.device, dtype=dtype)))
    t = s_r.clamp_min(TAU_FLOOR) if tau is None else tau
    return _expansion_subsets(g, s_r, epsilon, t, g.new_ones(1, g.shape[0]))[0]


def _check_group_and_bank(group: Tensor, bank: Tensor) -> None:
    _check_matrix(group, "group")
    _check_matrix(bank, "bank")
    _check_same_dim(group, bank, "group features", "bank features")


# --------------------------------------------------------------------------------------- batch functions
class _Prepared:
    """Validated, normalised inputs split into identity groups (shared by every component)."""

    def __init__(
        self, features: Tensor, identities: Tensor, bank_features: Tensor, bank_identities: Tensor
    ) -> None:
        _check_matrix(features, "generated features")
        _check_labels(identities, features.shape[0], "identities", "features")
        _check_matrix(bank_features, "bank features")
        _check_labels(bank_identities, bank_features.shape[0], "bank identities", "bank features")
        _check_same_dim(features, bank_features, "generated features", "bank features")
        dtype = _work_dtype(features, bank_features)
        self.features = l2_normalize(features.to(dtype))
        device = self.features.device
        self.bank = l2_normalize(bank_features.detach().to(device=device, dtype=dtype))
        self.identities = identities.to(device).long()
        bank_ids = bank_identities.to(device).long()
        self.groups: list[tuple[int, Tensor, Tensor]] = []  # (identity, member indices, bank rows)
        for y in torch.unique(self.identities).tolist():
            rows = self.bank[bank_ids == y]
            if rows.shape[0] == 0:
                raise ValueError(f"identity {y} has no entries in the memory bank")
            members = (self.identities == y).nonzero(as_tuple=True)[0]
            self.groups.append((y, members, rows))
        self.global_median = _GlobalMedian(self.bank, 1e-3)

    def scatter(self, parts: list[Tensor]) -> Tensor:
        out = self.features.new_zeros(self.features.shape[0])
        for (_, members, _), vals in zip(self.groups, parts, strict=True):
            out = out.index_put((members,), vals)
        return out


def _per_identity(value: float | Tensor, y: int, name: str) -> float | Tensor:
    """A float, a scalar tensor or a per-identity (N,) tensor resolved for identity y; must be > 0."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            v = value
        elif value.dim() == 1 and value.numel() > y:
            v = value[y]
        else:
            raise ValueError(f"{name} must be a float or a per-identity (N,) tensor covering identity {y}")
        v = v.detach()
        ok = bool(torch.isfinite(v)) and float(v) > 0
    else:
        v = float(value)
        ok = v > 0 and v != float("inf")
    if not ok:
        raise ValueError(f"{name} must be positive and finite, got {float(v)} for identity {y}")
    return v


def _check_credit(credit: str) -> None:
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")


def _semantic(p: _Prepared) -> Tensor:
    parts = []
    for _, members, rows in p.groups:
        proto = l2_normalize(rows.sum(dim=0))
        parts.append(0.5 * (p.features[members] @ proto + 1.0))
    return p.scatter(parts)


def _coverage(p: _Prepared, alpha: float, sigma: float | Tensor | None, credit: str) -> Tensor:
    parts = []
    for y, members, rows in p.groups:
        if sigma is None:
            s = _identity_bandwidth(rows, p.global_median, 1e-3)
        else:
            s = _per_identity(sigma, y, "sigma")
        g = p.features[members]
        values = _coverage_subsets(g, rows, s, alpha, _subset_weights(g.shape[0], credit, g))
        parts.append(_credit(values, g.shape[0], credit))
    return p.scatter(parts)


def _expansion(p: _Prepared, epsilon: float, tau: float | Tensor | None, credit: str) -> Tensor:
    parts = []
    for y, members, rows in p.groups:
        g = p.features[members]
        if rows.shape[0] < 2:  # S_r undefined: no information about the real spread
            parts.append(g.new_zeros(g.shape[0]))
            continue
        s_r = covariance_trace(rows)
        t = s_r.clamp_min(TAU_FLOOR) if tau is None else _per_identity(tau, y, "tau")
        values = _expansion_subsets(g, s_r, epsilon, t, _subset_weights(g.shape[0], credit, g))
        parts.append(_credit(values, g.shape[0], credit))
    return p.scatter(parts)


@_full_precision
def coverage(
    features: Tensor,
    identities: Tensor,
    bank_features: Tensor,
    bank_identities: Tensor,
    *,
    alpha: float = 0.5,
    sigma: float | Tensor | None = None,
    credit: Credit = "loo",
) -> Tensor:
    """Per-sample coverage credit (Eq. 5), shape (B,).

    Args:
        features: (B, D) generated features.
        identities: (B,) identity index of each generated sample.
        bank_features: (M, D) memory-bank features.
        bank_identities: (M,) identity index of each bank row.
        alpha: weight of the redundancy term.
        sigma: RBF bandwidth: None = median heuristic per identity, a float for every identity, or a
            per-identity (N,) tensor (e.g. ``MemoryBank.bandwidths()``).
        credit: ``"loo"`` (leave-one-out marginal) or ``"group"`` (every member gets the group value).
    """
    _check_credit(credit)
    alpha = _check_finite(alpha, "alpha")
    return _coverage(_Prepared(features, identities, bank_features, bank_identities), alpha, sigma, credit)


@_full_precision
def expansion(
    features: Tensor,
    identities: Tensor,
    bank_features: Tensor,
    bank_identities: Tensor,
    *,
    epsilon: float = 0.1,
    tau: float | Tensor | None = None,
    credit: Credit = "loo",
) -> Tensor:
    """Per-sample expansion credit (Eqs. 6-9), shape (B,).

    Args:
        features: (B, D) generated features.
        identities: (B,) identity index of each generated sample.
        bank_features: (M, D) memory-bank features.
        bank_identities: (M,) identity index of each bank row.
        epsilon: target expansion over the real spread S_r.
        tau: penalty scale: None = ``max(S_r, 1e-6)`` of the identity, a float, or a per-identity (N,) tensor.
        credit: ``"loo"`` (leave-one-out marginal) or ``"group"`` (every member gets the group value).
    """
    _check_credit(credit)
    epsilon = _check_finite(epsilon, "epsilon")
    return _expansion(_Prepared(features, identities, bank_features, bank_identities), epsilon, tau, credit)


def standardize(values: Tensor, eps: float = 1e-8) -> Tensor:
    """Eq. 10: ``(R - mean) / (std + eps)`` over the batch with the population std.

    A batch of at most one value, or of identical values, gives zeros (never NaN).

    Args:
        values: (B,) raw reward values.
        eps: added to the std.
    """
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"NaN or inf in the values to standardise ({int((~torch.isfinite(values)).sum())})")
    if values.numel() <= 1 or bool(values.max() == values.min()):
        return values * 0.0
    centred = values - values.mean()
    std = centred.pow(2).mean().clamp_min(1e-30).sqrt()  # floored so the backward pass stays finite
    return centred / (std + eps)


@_full_precision
def composite_reward(
    features: Tensor,
    identities: Tensor,
    bank_features: Tensor,
    bank_identities: Tensor,
    *,
    lambdas: Sequence[float] = (1.0, 0.75, 0.25),
    alpha: float = 0.5,
    sigma: float | Tensor | None = None,
    epsilon: float = 0.1,
    tau: float | Tensor | None = None,
    credit: Credit = "loo",
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """The paper's reward (Eqs. 2-11) for each generated sample: the entry point of the library.

    Returns per-sample (B,) tensors: ``total`` = ``tanh(sum_i lambda_i R~_i)``; the raw components ``sem``,
    ``cov``, ``exp``; and the batch-standardised ones ``sem_std``, ``cov_std``, ``exp_std``.

    Args:
        features: (B, D) generated features (batches are P identities x K samples so groups exist).
        identities: (B,) identity index of each generated sample; each must have bank entries.
        bank_features: (M, D) memory-bank (real) features.
        bank_identities: (M,) identity index of each bank row.
        lambdas: weights of the standardised (sem, cov, exp) components.
        alpha: coverage redundancy weight.
        sigma: RBF bandwidth: None = median heuristic per identity, a float, or a per-identity (N,) tensor.
        epsilon: target expansion over the real spread.
        tau: expansion penalty scale: None = S_r of the identity, a float, or a per-identity (N,) tensor.
        credit: ``"loo"`` (leave-one-out marginal, default) or ``"group"``.
        eps: added to the std in the standardisation.
    """
    _check_credit(credit)
    lambdas = _check_lambdas(lambdas)
    alpha, epsilon = _check_finite(alpha, "alpha"), _check_finite(epsilon, "epsilon")
    if not (math.isfinite(float(eps)) and float(eps) >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    p = _Prepared(features, identities, bank_features, bank_identities)
    out = {
        "sem": _semantic(p),
        "cov": _coverage(p, alpha, sigma, credit),
        "exp": _expansion(p, epsilon, tau, credit),
    }
    for name in COMPONENTS:
        out[f"{name}_std"] = standardize(out[name], eps)
    mix = sum(lam * out[f"{name}_std"] for lam, name in zip(lambdas, COMPONENTS, strict=True))
    return {"total": torch.tanh(mix), **out}
