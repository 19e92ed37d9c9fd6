"""The cheaper RL modes (windowed DPOK, DRaFT-K) and the two RL correctness fixes (old log-prob recompute,
gradient clipping after unscaling), on a tiny pixel-space DiT with a fixed colour 'recognizer'."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import pooled_colour_extractor, quiet_trainer

from rgsd_lightning import IdentityDataModule, RewardDPOK
from rgsd_lightning.callbacks.reward_curves import RewardCurves
from rgsd_lightning.diffusion import DiTGenerator
from rgsd_lightning.diffusion.sampling import guided_eps
from rgsd_lightning.modules.config import (
    DraftConfig,
    GridConfig,
    PolicyGradientConfig,
    SamplerConfig,
    UpdateConfig,
    WindowConfig,
)
from rgsd_lightning.rewards import CompositeReward, MemoryBank
from rgsd_lightning.rl.lora import lora_parameters
from rgsd_lightning.rl.rollout import sample_windowed, step_etas, window_start

BASE = dict(
    samples_per_identity=4,
    sampler=SamplerConfig(steps=10, guidance_scale=2.0, eta=1.0),
    update=UpdateConfig(policy_steps=2, micro_batch=8, grad_accum=2),
    grid=GridConfig(every_n_steps=0),
    objective=PolicyGradientConfig(kl_weight=0.01),
)


def _model(export: str, **kw) -> RewardDPOK:
    model = RewardDPOK(6, generator=export, **{**BASE, **kw})
    model.set_reward_extractor(pooled_colour_extractor())
    return model


def _with_reward(model: RewardDPOK) -> RewardDPOK:
    """A reward without a Trainer: a memory bank of random real features (3 per identity)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(6).repeat_interleave(3)
    model.reward = CompositeReward(MemoryBank(torch.randn(len(ids), 12, generator=g), ids, 6))
    return model


def _dm(root: str, rollouts: int, p: int = 3) -> IdentityDataModule:
    return IdentityDataModule(
        root=root, format="toy_market", task="rl", image_size=8, p=p, batches_per_epoch=rollouts
    )


# ------------------------------------------------------------------------------------ windowed mode
def test_window_placement():
    g = torch.Generator().manual_seed(0)
    kw = dict(placement="random", shift_every=1, rollout_index=0, generator=g)
    starts = {window_start(19, 2, span=(0.0, 1.0), **kw) for _ in range(300)}
    assert starts == set(range(18))  # every start that keeps the window inside the 19 stochastic steps
    starts = {window_start(20, 3, span=(0.0, 0.5), **kw) for _ in range(300)}
    assert starts == set(range(8))  # the first half: steps 0..9, windows of 3 start at 0..7
    sliding = [
        window_start(10, 4, placement="sliding", span=(0.0, 1.0), shift_every=2, rollout_index=i, generator=g)
        for i in range(16)
    ]
    assert sliding == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0]  # moves every 2 rollouts, wraps
    with pytest.raises(ValueError, match="holds only"):
        window_start(10, 4, span=(0.0, 0.3), **kw)
    assert step_etas(5, [1, 2], 0.7) == [0.0, 0.7, 0.7, 0.0, 0.0]


def _ddim_mean_std(eps, x, a_t, a_s, eta):
    """DDIM step written out independently (float64): mean and std of x_s given x_t."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    mean = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - std**2, 0.0)) * eps
    return mean, std


def test_windowed_rollout_log_probs_are_the_exact_step_densities(tiny_generator_export):
    gen = DiTGenerator.from_pretrained(tiny_generator_export).eval()
    labels = torch.tensor([0, 1, 2, 3])
    window, steps, w = [3, 4], 8, 2.0
    out = sample_windowed(
        gen,
        labels,
        seeds=[11, 12, 13, 14],
        num_steps=steps,
        guidance_scale=w,
        etas=step_etas(steps, window, 1.0),
    )
    alphas = gen.alphas_cumprod.double()
    with torch.no_grad():
        for i, (t, s) in enumerate(zip(out.timesteps.tolist(), out.prev_timesteps.tolist(), strict=True)):
            x, nxt = out.trajectory[:, i], out.trajectory[:, i + 1]
            eps = guided_eps(gen, x, t, labels, guidance_scale=w).double()
            a_t, a_s = float(alphas[t]), (float(alphas[s]) if s >= 0 else 1.0)
            if i in window:
                mean, std = _ddim_mean_std(eps, x.double(), a_t, a_s, 1.0)
                brute = torch.distributions.Normal(mean, std).log_prob(nxt.double()).flatten(1).mean(1)
                torch.testing.assert_close(out.log_probs[:, i].double(), brute, rtol=1e-5, atol=1e-5)
                assert (nxt.double() - mean).abs().max() > 1e-3  # noise was drawn
            else:  # deterministic DDIM: no noise, log-prob 0
                mean, _ = _ddim_mean_std(eps, x.double(), a_t, a_s, 0.0)
                torch.testing.assert_close(nxt.double(), mean, rtol=1e-4, atol=1e-5)
                assert bool((out.log_probs[:, i] == 0).all())


def test_windowed_mode_stores_only_the_window_and_its_ratio_is_one(
    tiny_generator_export, toy_market, tmp_path
):
    L.seed_everything(0)
    model = _model(
        tiny_generator_export,
        mode="windowed",
        lr=1e-2,
        window=WindowConfig(size=2, placement="sliding"),
        update=UpdateConfig(policy_steps=2, micro_batch=8, grad_accum=2, on_policy=True),
    )
    curves = RewardCurves(plot=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[curves]).fit(model, _dm(toy_market, 3))
    # on-policy: the buffer holds the last rollout, 3 identities x 4 samples x the 2 window steps
    assert len(model.buffer) == 3 * 4 * 2
    assert sorted(set(model.buffer.data.step.tolist())) == [2, 3]  # sliding window of the 3rd rollout
    for record in curves.history:
        assert record["train/logp_check"] == 0.0  # the ratio is exactly 1 before the first update
        assert record["train/logp_drift"] < 1e-5  # fp32 on the CPU: the sampler and the update agree
    assert curves.history[-1]["train/kl"] > 0  # and the policy moved
    assert all(v == v for r in curves.history for v in r.values())  # no NaN


# ------------------------------------------------------------------------- fix 1: old log-prob recompute
def _first_micro_batch_grads(model: RewardDPOK, drift: float) -> tuple[dict, dict]:
    """Rollout, perturb the stored log-probs by ``drift`` (bf16-like drift), run the update's first
    micro-batch; returns its stats and the LoRA gradients."""
    L.seed_everything(0)
    transitions, _ = model.rollout(torch.tensor([0, 1, 2]))
    transitions.log_prob = transitions.log_prob + drift
    model.buffer.push(transitions)
    idx = model.buffer.latest_indices()[:8]
    fresh = None
    if model.update.recompute_logprob:
        model.recompute_old_logprobs()
        fresh = torch.ones(len(idx), dtype=torch.bool)
    loss, stats = model.micro_batch_loss(model.buffer.get(idx), check_ratio=True, fresh=fresh)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lora_parameters(model.generator).items() if p.grad is not None}
    return stats, grads


def test_recomputed_old_log_probs_make_the_ratio_exactly_one(tiny_generator_export):
    objective = PolicyGradientConfig(kl_weight=0.0, ratio_clip=1e-4, ratio_check_tol=1.0)
    with_fix = _with_reward(_model(tiny_generator_export, objective=objective))
    stats, grads = _first_micro_batch_grads(with_fix, drift=1e-3)
    assert stats["ratio_max_dev"] == 0 and stats["clip_frac"] == 0
    assert max(g.abs().max() for n, g in grads.items() if "lora_B" in n) > 0  # a policy gradient
    # stored log-probs now equal the update's forward of the same transitions
    mb = with_fix.buffer.get(with_fix.buffer.latest_indices())
    with torch.no_grad():
        _, step = with_fix.policy_step(mb)
    torch.testing.assert_close(mb.log_prob, step.log_prob, rtol=0, atol=1e-6)

    without = _with_reward(
        _model(tiny_generator_export, objective=objective, update=UpdateConfig(recompute_logprob=False))
    )
    stats, grads = _first_micro_batch_grads(without, drift=1e-3)
    assert stats["clip_frac"] == 1 and grads  # every ratio outside the 1e-4 clip ...
    assert all(g.abs().max() == 0 for g in grads.values())  # ... so the policy gradient is zero

    strict = _with_reward(
        _model(
            tiny_generator_export,
            objective=PolicyGradientConfig(ratio_check_tol=1e-4),
            update=UpdateConfig(recompute_logprob=False),
        )
    )
    with pytest.raises(RuntimeError, match="ratio != 1"):
        _first_micro_batch_grads(strict, drift=1e-3)


# ------------------------------------------------------------------------------ fix 2: gradient clipping
class _RecordStepNorms(L.Callback):
    """Records the policy gradient norm that reaches ``optimizer.step`` (after Lightning's clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        original = opt.step

        def step(*args, **kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return original(*args, **kwargs)

        opt.step = step


def test_gradients_are_clipped_after_fp16_unscaling(tiny_generator_export, toy_market, tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    L.seed_everything(0)
    clip = 1e-3
    model = _model(
        tiny_generator_export,
        lr=1e-3,
        update=UpdateConfig(policy_steps=2, micro_batch=8, grad_accum=1, grad_clip=clip),
        objective=PolicyGradientConfig(kl_weight=0.01, ratio_check_tol=1.0),
    )
    recorder, curves = _RecordStepNorms(), RewardCurves(plot=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[recorder, curves],
    )
    trainer.fit(model, _dm(toy_market, 2))
    assert recorder.norms, "no optimizer step was taken"
    # the clip acts on the unscaled gradients: the norm reaching the step is the clip value (clipping the
    # scaled gradients would leave clip / 4096 after the unscale)
    for norm in recorder.norms:
        assert norm == pytest.approx(clip, rel=1e-2)
    logged = [r["train/grad_norm"] for r in curves.history]
    assert all(clip < n < 1e3 for n in logged)  # the unscaled norm before clipping is logged


# ---------------------------------------------------------------------------------------- DRaFT-K mode
def test_draft_gradient_reaches_the_lora_weights_and_nothing_else(tiny_generator_export):
    torch.manual_seed(0)
    model = _with_reward(
        _model(tiny_generator_export, mode="draft", draft=DraftConfig(k=2, kl_weight=0.1, reward_weight=1.0))
    )
    assert model.value is None  # no value baseline in the differentiable mode
    lora = set(lora_parameters(model.generator))
    assert {n.removeprefix("generator.") for n in model.policy_names} == lora
    labels = torch.arange(3).repeat_interleave(4)
    loss, comps, kl = model.draft_loss(labels)
    assert float(kl.detach().abs().max()) == 0  # LoRA B starts at zero: policy == reference
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.policy_names)  # only the adapters (the extractor is frozen)
    b_norms = [p.grad.norm() for n, p in lora_parameters(model.generator).items() if "lora_B" in n]
    assert min(b_norms) > 0  # every adapter gets gradient through the reward and the last K steps
    assert not any(p.requires_grad for p in model.reward_extractor.parameters())


def test_draft_gradient_with_k_equal_to_the_steps_is_the_exact_gradient(tiny_generator_export):
    """With K = all steps nothing is truncated: a step along the gradient changes the loss as predicted."""
    model = _with_reward(
        _model(
            tiny_generator_export,
            mode="draft",
            sampler=SamplerConfig(steps=6, guidance_scale=2.0, eta=1.0),
            draft=DraftConfig(k=6, kl_weight=0.1),
        )
    )
    labels = torch.arange(3).repeat_interleave(4)
    model.draft_loss(labels)[0].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    gnorm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    h = 1e-2 / gnorm

    def loss_at(scale: float) -> float:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(scale * h * g)
            value = float(model.draft_loss(labels)[0])
            for p, g in zip(params, grads, strict=True):
                p.sub_(scale * h * g)
        return value

    finite = (loss_at(1.0) - loss_at(-1.0)) / (2 * h)
    assert finite == pytest.approx(gnorm**2, rel=0.05)


def test_draft_training_raises_the_raw_reward(tiny_generator_export, toy_market, tmp_path):
    L.seed_everything(0)
    model = _model(
        tiny_generator_export,
        mode="draft",
        lr=1e-2,
        draft=DraftConfig(k=2, kl_weight=0.01),
        sampler=SamplerConfig(steps=10, guidance_scale=2.0, eta=0.0),
    )
    curves = RewardCurves(plot=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[curves]).fit(model, _dm(toy_market, 12, p=6))
    raw = [r["train/reward_raw"] for r in curves.history]
    assert sum(raw[-3:]) / 3 > sum(raw[:3]) / 3 + 0.02, raw
    for key in ("train/spread_ratio", "train/coverage", "train/precision", "train/time_update_s"):
        assert all(math.isfinite(r[key]) for r in curves.history), key


def test_mode_settings_are_checked(tiny_generator_export):
    with pytest.raises(ValueError, match="mode="):
        RewardDPOK(6, generator=tiny_generator_export, mode="ppo")
    with pytest.raises(ValueError, match="stochastic rollouts"):
        RewardDPOK(6, generator=tiny_generator_export, mode="windowed", sampler=SamplerConfig(eta=0.0))
    with pytest.raises(ValueError, match="holds only"):
        RewardDPOK(
            6,
            generator=tiny_generator_export,
            mode="windowed",
            sampler=SamplerConfig(steps=10, eta=1.0),
            window=WindowConfig(size=5, span=(0.0, 0.4)),
        )
    with pytest.raises(ValueError, match="draft.k"):
        RewardDPOK(
            6,
            generator=tiny_generator_export,
            mode="draft",
            sampler=SamplerConfig(steps=4),
            draft=DraftConfig(k=5),
        )
    with pytest.raises(ValueError, match="window.span"):
        WindowConfig(span=(0.5, 0.5))
    # DRaFT may sample deterministically
    assert RewardDPOK(6, generator=tiny_generator_export, mode="draft", sampler=SamplerConfig(eta=0.0))
