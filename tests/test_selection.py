"""Lookahead selection (rgsd_lightning.selection) against a brute-force deep-copy + real SGD step.

The comparisons are about the rule (the virtual step is the SGD step), not a kernel: nets and batches are
float64, so the deltas (differences of losses of magnitude up to ~15) are compared to 1e-9 of the losses'
magnitude on any CPU (in float32 the BLAS rounding of the two paths differs between CPUs)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import CosFaceLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from torch import nn

from rgsd_lightning.modules.cosface import cosface_losses
from rgsd_lightning.selection import (
    SelectionConfig,
    lookahead_select,
    num_to_keep,
    selection_stats,
)

NUM_CLASSES = 5


class TinyNet(nn.Module):
    """conv + BN2d + pool -> linear -> BNNeck (frozen bias) -> identity head (CE classifier or CosFace W)."""

    def __init__(self, head: str = "ce", dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(dropout)
        )
        self.proj = nn.Linear(6, 8)
        self.neck = nn.BatchNorm1d(8)
        self.neck.bias.requires_grad_(False)
        self.head = head
        if head == "ce":
            self.classifier = nn.Linear(8, NUM_CLASSES, bias=False)
        else:
            self.cosface = CosFaceLoss(NUM_CLASSES, 8, margin=0.35, scale=16, reducer=DoNothingReducer())

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def head_losses(self, feats, labels):
        emb = self.neck(self.proj(feats))
        if self.head == "ce":
            return F.cross_entropy(self.classifier(emb), labels, label_smoothing=0.1, reduction="none")
        return cosface_losses(self.cosface, emb, labels)


def image_losses(module, inputs):
    return module.head_losses(module.features(inputs["image"]), inputs["label"])


def feature_losses(module, inputs):
    return module.head_losses(inputs["features"], inputs["label"])


def make_batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    is_syn = torch.zeros(n, dtype=torch.bool)
    is_syn[torch.randperm(n, generator=g)[: n // 2]] = True
    return {"image": images, "label": labels}, is_syn


def make_net(head="ce", seed=0, dropout=0.0):
    torch.manual_seed(seed)
    net = TinyNet(head, dropout).double()
    net.train()
    with torch.no_grad():  # move BN running stats away from their init so a pollution would show
        net.body(torch.randn(8, 3, 6, 5, dtype=torch.float64))
        net.neck(torch.randn(8, 8, dtype=torch.float64))
    return net


def assert_deltas_close(actual: torch.Tensor, expected: torch.Tensor, losses: torch.Tensor) -> None:
    """Equal to 1e-9 of the losses' magnitude (a delta is a difference of two losses)."""
    assert actual.dtype == expected.dtype == torch.float64
    scale = float(losses.detach().abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9 * max(scale, 1.0))


def brute_force_delta(net, inputs, lr, loss_fn=image_losses, param_filter=None, seed=None, step_mask=None):
    """Deep copy, l(w) in train mode, torch.optim.SGD step on the mean loss (of step_mask samples), l(w')."""
    model = copy.deepcopy(net)
    params = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and (param_filter is None or param_filter(n))
    ]
    opt = torch.optim.SGD(params, lr=lr)
    if seed is not None:
        torch.manual_seed(seed)
    before = loss_fn(model, inputs)
    opt.zero_grad()
    (before.mean() if step_mask is None else before[step_mask].mean()).backward()
    opt.step()
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        after = loss_fn(model, inputs)
    return (after - before).detach()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("head", ["ce", "cosface"])
@pytest.mark.parametrize("reuse", [False, True])
def test_delta_matches_deepcopy_sgd_step(head, reuse):
    net = make_net(head)
    inputs, is_syn = make_batch(1)
    lr = 0.5
    expected = brute_force_delta(net, inputs, lr)
    losses = image_losses(net, inputs) if reuse else None
    result = lookahead_select(net, image_losses, inputs, is_syn, lr=lr, keep_ratio=0.5, losses=losses)
    assert torch.isnan(result.delta[~is_syn]).all()
    assert_deltas_close(result.delta[is_syn], expected[is_syn], result.loss_before)
    assert expected[is_syn].abs().max() > 1e-3  # the step is large enough for the check to mean something
    assert_deltas_close(result.loss_after - result.loss_before, expected, result.loss_before)
    if reuse:  # the graph of the caller's losses survives for the real update
        losses.mean().backward()
        assert net.proj.weight.grad is not None


def test_step_on_real_takes_the_virtual_step_on_the_real_samples_loss():
    net = make_net("ce", seed=4)
    inputs, is_syn = make_batch(9)
    expected = brute_force_delta(net, inputs, 0.5, step_mask=~is_syn)
    result = lookahead_select(net, image_losses, inputs, is_syn, lr=0.5, k=2, step_on="real")
    assert_deltas_close(result.delta[is_syn], expected[is_syn], result.loss_before)
    batch_step = lookahead_select(net, image_losses, inputs, is_syn, lr=0.5, k=2)
    assert not torch.allclose(batch_step.delta[is_syn], result.delta[is_syn], atol=1e-4)


def test_head_scope_matches_brute_force_on_the_head_parameters():
    net = make_net("ce")
    inputs, is_syn = make_batch(2)
    feats = net.features(inputs["image"])
    head_names = [n for n, p in net.named_parameters() if p.requires_grad and not n.startswith("body.")]
    detached = {"features": feats.detach(), "label": inputs["label"]}
    expected = brute_force_delta(net, detached, 0.5, feature_losses, lambda n: not n.startswith("body."))
    losses = net.head_losses(feats, inputs["label"])
    result = lookahead_select(
        net, feature_losses, detached, is_syn, lr=0.5, k=3, losses=losses, params=head_names
    )
    assert_deltas_close(result.delta[is_syn], expected[is_syn], result.loss_before)
    # the virtual step did not go through the backbone: the backbone gradient is still to be made
    assert net.body[0].weight.grad is None
    losses.mean().backward()
    assert net.body[0].weight.grad is not None


@pytest.mark.parametrize(
    "keep_ratio,k,expected_kept", [(0.5, None, 3), (0.34, None, 2), (None, 4, 4), (None, 9, 6)]
)
def test_keeps_exactly_the_smallest_deltas_and_every_real_sample(keep_ratio, k, expected_kept):
    net = make_net("ce", seed=3)
    inputs, is_syn = make_batch(3)
    result = lookahead_select(net, image_losses, inputs, is_syn, lr=0.5, keep_ratio=keep_ratio, k=k)
    assert result.keep[~is_syn].all()
    kept_syn = torch.nonzero(result.keep & is_syn).flatten()
    assert len(kept_syn) == expected_kept
    syn_idx = torch.nonzero(is_syn).flatten()
    deltas = result.delta[syn_idx].tolist()
    smallest = {int(syn_idx[i]) for i in sorted(range(len(deltas)), key=lambda i: deltas[i])[:expected_kept]}
    assert set(kept_syn.tolist()) == smallest
    stats = selection_stats(result)
    assert stats["kept_fraction"] == pytest.approx(expected_kept / int(is_syn.sum()))
    assert stats["delta_min"] == pytest.approx(min(deltas)) and stats["delta_max"] == pytest.approx(
        max(deltas)
    )
    assert stats["delta_mean"] == pytest.approx(sum(deltas) / len(deltas))


@pytest.mark.parametrize("step_on", ["batch", "real"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_negative_rule_keeps_the_smallest_deltas_that_are_below_zero(step_on, keep_ratio):
    net = make_net("ce", seed=5)
    inputs, is_syn = make_batch(11, n=16)
    mask = ~is_syn if step_on == "real" else None
    expected = brute_force_delta(net, inputs, 2.0, step_mask=mask)
    result = lookahead_select(
        net, image_losses, inputs, is_syn, lr=2.0, keep_ratio=keep_ratio, step_on=step_on, rule="negative"
    )
    syn_idx = torch.nonzero(is_syn).flatten().tolist()
    ranked = sorted(syn_idx, key=lambda i: float(expected[i]))[: num_to_keep(len(syn_idx), keep_ratio)]
    wanted = {i for i in ranked if float(expected[i]) < 0}
    assert 0 < len(wanted) < len(syn_idx)  # the case separates the rules: some deltas are positive
    assert set(torch.nonzero(result.keep & is_syn).flatten().tolist()) == wanted
    assert result.keep[~is_syn].all()
    smallest = lookahead_select(
        net, image_losses, inputs, is_syn, lr=2.0, keep_ratio=keep_ratio, step_on=step_on
    )
    assert int((smallest.keep & is_syn).sum()) == len(ranked)


def brute_force_relabelled_deltas(net, inputs, is_syn, lr, candidates, loss_fn=image_losses):
    """Deep copy, one SGD step on the real samples' mean loss (true labels), then per candidate identity j
    the loss change of every sample relabelled as j: {j: (B,) deltas}."""
    model = copy.deepcopy(net)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    relabelled = {j: {**inputs, "label": torch.full_like(inputs["label"], j)} for j in candidates}
    with torch.no_grad():
        before = {j: loss_fn(model, x) for j, x in relabelled.items()}
    opt.zero_grad()
    loss_fn(model, inputs)[~is_syn].mean().backward()
    opt.step()
    with torch.no_grad():
        return {j: loss_fn(model, x) - before[j] for j, x in relabelled.items()}


@pytest.mark.parametrize("head", ["ce", "cosface"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_identity_rule_keeps_samples_the_step_moves_most_toward_their_own_identity(head, keep_ratio):
    net = make_net(head, seed=6)
    inputs, is_syn = make_batch(12, n=20)
    candidates = sorted(set(inputs["label"][~is_syn].tolist()))
    deltas = brute_force_relabelled_deltas(net, inputs, is_syn, 2.0, candidates)
    own = brute_force_delta(net, inputs, 2.0, step_mask=~is_syn)
    syn_idx = torch.nonzero(is_syn).flatten().tolist()
    ranked = sorted(syn_idx, key=lambda i: float(own[i]))[: num_to_keep(len(syn_idx), keep_ratio)]
    label = inputs["label"].tolist()
    others = {i: [float(deltas[j][i]) for j in candidates if j != label[i]] for i in ranked}
    wanted = {i for i in ranked if all(float(own[i]) < other for other in others[i])}
    assert 0 < len(wanted) < len(ranked)  # the case separates the rules
    result = lookahead_select(
        net, image_losses, inputs, is_syn, lr=2.0, keep_ratio=keep_ratio, step_on="real", rule="identity"
    )
    assert set(torch.nonzero(result.keep & is_syn).flatten().tolist()) == wanted
    assert result.keep[~is_syn].all()
    assert_deltas_close(result.delta[is_syn], own[is_syn], result.loss_before)


def test_identity_rule_keeps_copies_of_their_identity_and_drops_mislabelled_ones():
    """Hand-made case (head scope): identities with orthogonal features of equal norm, a near-uniform
    classifier and an identity projection; synthetic samples are copies of the real features. Labelled as
    the copied identity, the step on the real samples raises their own logit most (all kept); labelled as
    the next identity, never (all dropped)."""
    net = make_net("ce", seed=7)
    with torch.no_grad():
        net.proj.weight.copy_(torch.eye(8, 6, dtype=torch.float64))
        net.proj.bias.zero_()
        net.classifier.weight.mul_(0.01)
    real = 3.0 * torch.eye(6, dtype=torch.float64)[:NUM_CLASSES]
    features = torch.cat([real, real])
    labels = torch.arange(NUM_CLASSES)
    is_syn = torch.arange(2 * NUM_CLASSES) >= NUM_CLASSES
    head = [n for n, p in net.named_parameters() if p.requires_grad and not n.startswith("body.")]
    options = dict(lr=0.5, keep_ratio=1.0, step_on="real", rule="identity", params=head)

    def keep(synthetic_labels):
        inputs = {"features": features, "label": torch.cat([labels, synthetic_labels])}
        return lookahead_select(net, feature_losses, inputs, is_syn, **options).keep

    assert keep(labels).all()
    assert torch.equal(keep((labels + 1) % NUM_CLASSES), ~is_syn)
    with pytest.raises(ValueError, match="mapping"):
        bare_tensor_inputs = lambda m, x: feature_losses(m, {"features": x, "label": labels})  # noqa: E731
        lookahead_select(net, bare_tensor_inputs, real, labels >= 3, **options)


def test_keep_ratio_one_keeps_everything_and_zero_only_real():
    net = make_net("ce")
    inputs, is_syn = make_batch(4)
    assert lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, keep_ratio=1.0).keep.all()
    keep = lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, keep_ratio=0.0).keep
    assert torch.equal(keep, ~is_syn)


@pytest.mark.parametrize("reuse", [False, True])
def test_selection_changes_no_parameter_buffer_or_grad(reuse):
    net = make_net("cosface")
    inputs, is_syn = make_batch(5)
    losses = image_losses(net, inputs) if reuse else None  # the caller's real forward may move BN stats
    state = snapshot(net)
    tracked = net.body[1].num_batches_tracked.item()
    lookahead_select(net, image_losses, inputs, is_syn, lr=1.0, keep_ratio=0.5, losses=losses)
    after = snapshot(net)
    assert state.keys() == after.keys()
    for key in state:
        assert torch.equal(state[key], after[key]), key
    assert net.body[1].num_batches_tracked.item() == tracked
    assert all(p.grad is None for p in net.parameters())  # the virtual gradient never lands in .grad


def test_rng_is_not_consumed_and_dropout_masks_match_in_both_passes():
    net = make_net("ce", dropout=0.3)
    inputs, is_syn = make_batch(6)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    result = lookahead_select(net, image_losses, inputs, is_syn, lr=0.5, keep_ratio=0.5)
    assert torch.equal(torch.get_rng_state(), state)
    expected = brute_force_delta(net, inputs, 0.5, seed=123)  # same dropout masks at w and w'
    assert_deltas_close(result.delta[is_syn], expected[is_syn], result.loss_before)


def test_batch_without_synthetic_samples_keeps_all_and_computes_nothing():
    net = make_net("ce")
    inputs, _ = make_batch(7)
    calls = []

    def counting(module, x):
        calls.append(1)
        return image_losses(module, x)

    result = lookahead_select(net, counting, inputs, torch.zeros(12, dtype=torch.bool), lr=0.1, k=2)
    assert result.keep.all() and not calls
    assert selection_stats(result) == {"num_synthetic": 0.0, "kept_fraction": 1.0}


def test_num_to_keep_rounding():
    assert num_to_keep(10, keep_ratio=0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floats
    assert num_to_keep(5, keep_ratio=0.5) == 3  # half up
    assert num_to_keep(3, k=5) == 3
    assert num_to_keep(0, keep_ratio=0.5) == 0


def test_bad_input_is_rejected_with_clear_messages():
    net = make_net("ce")
    inputs, is_syn = make_batch(8)
    with pytest.raises(ValueError, match="inner module"):
        lookahead_select(nn.DataParallel(net), image_losses, inputs, is_syn, lr=0.1, k=1)
    with pytest.raises(ValueError, match="keep_ratio"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.1)
    with pytest.raises(ValueError, match="positive"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.0, k=1)
    with pytest.raises(ValueError, match="shape"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, k=1, losses=torch.zeros(3))
    with pytest.raises(ValueError, match="no parameters named"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, k=1, params=["nope.weight"])
    with pytest.raises(ValueError, match="do not require grad"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, k=1, params=["neck.bias"])
    with pytest.raises(ValueError, match="step_on"):
        lookahead_select(net, image_losses, inputs, is_syn, lr=0.1, k=1, step_on="synthetic")
    with pytest.raises(ValueError, match="1-D"):
        lookahead_select(net, image_losses, inputs, is_syn[None], lr=0.1, k=1)


def test_selection_config_validation():
    cfg = SelectionConfig.coerce({"enabled": True, "keep_ratio": 0.25, "scope": "head"})
    assert cfg.enabled and cfg.keep_ratio == 0.25 and cfg.scope == "head"
    assert not SelectionConfig.coerce(None).enabled
    with pytest.raises(ValueError, match="unknown keys"):
        SelectionConfig.coerce({"ratio": 0.5})
    with pytest.raises(ValueError, match="keep_ratio"):
        SelectionConfig(keep_ratio=1.5)
    with pytest.raises(ValueError, match="scope"):
        SelectionConfig(scope="neck")
    with pytest.raises(ValueError, match="rule"):
        SelectionConfig(rule="largest")
    with pytest.raises(ValueError, match="lr"):
        SelectionConfig(lr=-1.0)


def test_cosface_per_sample_losses_are_the_cosface_formula_and_pml_mean():
    """Per-sample losses (pml with a DoNothingReducer) equal the CosFace formula computed independently in
    float64, their mean is pml's default (mean-reduced) loss, and half-precision input is promoted."""
    torch.manual_seed(0)
    per_sample = CosFaceLoss(7, 16, margin=0.35, scale=64, reducer=DoNothingReducer())
    emb = torch.randn(10, 16)
    labels = torch.randint(0, 7, (10,))
    ours = cosface_losses(per_sample, emb, labels)
    assert ours.shape == (10,) and ours.dtype == torch.float32
    cosine = F.normalize(emb.double(), dim=1) @ F.normalize(per_sample.W.detach().double(), dim=0)
    logits = 64 * (cosine - 0.35 * F.one_hot(labels, 7).double())
    reference = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    mean_loss = CosFaceLoss(7, 16, margin=0.35, scale=64)
    mean_loss.W.data.copy_(per_sample.W.data)
    torch.testing.assert_close(ours.mean(), mean_loss(emb, labels), rtol=1e-5, atol=1e-5)
    half = cosface_losses(per_sample, emb.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32 and per_sample.W.dtype == torch.float32
    with pytest.raises(ValueError, match="DoNothingReducer"):
        cosface_losses(mean_loss, emb, labels)
