"""Schedule helpers, the step log-prob, CFG and the sampler against independent computations and diffusers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale, random_tiny_generator
from diffusers import DDIMScheduler, DDPMScheduler

from rgsd_lightning.diffusion import (
    add_noise,
    alphas_cumprod,
    denoising_loss,
    guided_eps,
    make_timesteps,
    sample,
    step_with_logprob,
)
from rgsd_lightning.diffusion.schedule import SIGMA_MIN, alpha_bar, step_sigmas

AC = alphas_cumprod()  # DiT schedule: 1000 steps, linear betas 1e-4..0.02


@pytest.fixture(scope="module")
def gen():
    return random_tiny_generator()


def _dit_ddim():
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
    )


def test_alphas_and_add_noise_match_hand_formula_and_diffusers():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(AC.double(), torch.cumprod(1 - betas, 0), atol=1e-6)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 400, 999])
    ref = DDPMScheduler().add_noise(x0, noise, t)
    assert torch.allclose(add_noise(x0, noise, t, AC), ref, atol=1e-6)


@pytest.mark.parametrize(
    ("spacing", "steps"), [("leading", 50), ("leading", 30), ("trailing", 50), ("trailing", 30)]
)
def test_timesteps_equal_diffusers_ddim(spacing, steps):
    sched = _dit_ddim()
    sched.register_to_config(timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ts, prev = make_timesteps(1000, steps, spacing)
    assert torch.equal(ts, sched.timesteps)
    assert torch.equal(prev[:-1], ts[1:]) and prev[-1] < 0
    if spacing == "leading" or 1000 % steps == 0:  # diffusers' own rule for the previous timestep
        assert torch.equal(prev, (ts - 1000 // steps).clamp(min=-1))  # any t < 0 means ᾱ = 1
    with pytest.raises(ValueError, match="spacing"):
        make_timesteps(1000, steps, "linspace")


def _hand_mean_std(eps, x, t, s, eta):
    """DDIM mean/std in float64 from rl_diffusion.md §c, independent of the implementation."""
    ac = AC.double()
    a_t = ac[t].view(-1, 1, 1, 1)
    a_s = torch.where(s >= 0, ac[s.clamp(min=0)], torch.ones(())).view(-1, 1, 1, 1)
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    std = eta * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
    mean = a_s.sqrt() * x0 + (1 - a_s - std**2).sqrt() * eps.double()
    return mean, std


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_logprob_equals_torch_normal(eta):
    torch.manual_seed(0)
    t = torch.tensor([999, 620, 300, 20])
    s = t - 20
    eps, x, target = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    mean, std = _hand_mean_std(eps, x, t, s, eta)
    normal = torch.distributions.Normal(mean, std.expand_as(mean))
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
        out = step_with_logprob(eps, x, t, s, AC, eta=eta, prev_sample=target, reduction=reduction)
        ref = reduce(normal.log_prob(target.double()), dim=(1, 2, 3))
        assert torch.allclose(out.log_prob.double(), ref, rtol=1e-4, atol=1e-4)
        assert out.log_prob.dtype == torch.float32
    # x̂0 at t = 999 is ~ 150 x eps: errors scale with it, not with the mean (~5)
    x0_scale = float(((x - (1 - AC[999]).sqrt() * eps) / AC[999].sqrt()).abs().max())
    assert_close_to_scale(out.mean, mean, rtol=1e-6, scale=x0_scale)
    # sampling with given noise: x_prev = mean + std * noise and its own log-prob
    noise = torch.randn(4, 3, 5, 5)
    drawn = step_with_logprob(eps, x, t, s, AC, eta=eta, noise=noise)
    assert_close_to_scale(drawn.prev_sample, mean + std * noise.double(), rtol=1e-6, scale=x0_scale)
    ref = normal.log_prob(drawn.prev_sample.double()).mean((1, 2, 3))
    assert_close_to_scale(drawn.log_prob, ref, rtol=1e-4)


def test_gradient_flows_for_std_positive_and_is_zero_at_last_step():
    torch.manual_seed(1)
    t, s = torch.tensor([500, 0]), torch.tensor([480, -1])  # sample 1 is the DiT schedule's last step
    x, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = step_with_logprob(eps, x, t, s, AC, eta=1.0, prev_sample=target)
    assert out.std[1].item() == 0 and out.log_prob[1].item() == 0
    out.log_prob.sum().backward()
    assert eps.grad[0].abs().sum() > 0
    assert torch.equal(eps.grad[1], torch.zeros_like(eps.grad[1]))
    assert torch.isfinite(eps.grad).all()


def test_last_step_of_dit_leading_schedule_is_finite():
    ts, prev = make_timesteps(1000, 50, "leading")
    assert ts[-1].item() == 0 and prev[-1].item() == -1
    x, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    for method in ("ddim", "ddpm"):
        out = step_with_logprob(eps, x, ts[-1], prev[-1], AC, eta=1.0, method=method)
        assert torch.isfinite(out.prev_sample).all() and torch.equal(out.log_prob, torch.zeros(3))
        again = step_with_logprob(eps, x, ts[-1], prev[-1], AC, eta=1.0, method=method, prev_sample=x)
        assert torch.equal(again.log_prob, torch.zeros(3))
        x0 = (x - (1 - AC[0]).sqrt() * eps) / AC[0].sqrt()  # last step returns the x0 prediction
        assert_close_to_scale(out.prev_sample, x0)


def test_alpha_bar_per_sample_and_past_the_end():
    x = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([999, 0, -1])
    got = alpha_bar(AC, t, x)
    assert got.shape == (3, 1, 1, 1)
    assert torch.equal(got.flatten(), torch.stack([AC[999], AC[0], torch.tensor(1.0)]))
    assert torch.equal(alpha_bar(AC, 400, x), AC[400].expand(3, 1, 1, 1))  # int: one t for the batch
    assert torch.equal(alpha_bar(AC, torch.tensor(400), x), alpha_bar(AC, 400, x))
    assert torch.equal(alpha_bar(AC, -1, x), torch.ones(3, 1, 1, 1))


@pytest.mark.parametrize(("method", "eta", "spacing"), [("ddim", 0.7, "leading"), ("ddpm", 0.0, "trailing")])
def test_step_sigmas_equal_diffusers_variance_and_the_step_std(method, eta, spacing):
    ts, prev = make_timesteps(1000, 10, spacing)
    sigmas = step_sigmas(ts, prev, AC, eta, method)
    sched = _dit_ddim()
    sched.set_timesteps(10, device="cpu")
    scale = 1.0 if method == "ddpm" else eta
    for i in range(10):  # diffusers' DDIM variance of the same step (its own ᾱ_prev = 1 past the end)
        ref = scale * float(sched._get_variance(int(ts[i]), int(prev[i]))) ** 0.5
        assert sigmas[i].item() == pytest.approx(ref, rel=1e-5, abs=1e-9), i
        x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        std = step_with_logprob(eps, x, int(ts[i]), int(prev[i]), AC, eta=eta, method=method).std
        assert std.flatten()[0].item() == pytest.approx(sigmas[i].item(), rel=1e-5, abs=1e-9), i
    stochastic = sigmas > SIGMA_MIN
    assert stochastic[:-1].all() and not stochastic[-1]  # the last step (t_prev = -1) is deterministic
    assert not (step_sigmas(ts, prev, AC, 0.0, "ddim") > SIGMA_MIN).any()  # DDIM eta 0: nothing stochastic


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_equals_diffusers(eta):
    sched = _dit_ddim()
    sched.set_timesteps(50)
    ts, prev = make_timesteps(1000, 50)
    torch.manual_seed(2)
    for i in (0, 17, 48, 49):
        x, eps, noise = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
        ref = sched.step(eps, int(ts[i]), x, eta=eta, variance_noise=noise).prev_sample
        ours = step_with_logprob(eps, x, ts[i], prev[i], AC, eta=eta, noise=noise).prev_sample
        x0 = (x - (1 - AC[ts[i]]).sqrt() * eps) / AC[ts[i]].sqrt()  # the largest term of the step
        assert_close_to_scale(ours, ref, rtol=1e-6, scale=float(x0.abs().max()))


def test_ddpm_equals_ddim_eta_one():
    torch.manual_seed(3)
    t = torch.tensor([999, 700, 250, 40, 0])
    s = torch.tensor([979, 650, 200, 20, -1])
    x, eps, target = torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4)
    ddpm = step_with_logprob(eps, x, t, s, AC, method="ddpm", prev_sample=target)
    ddim = step_with_logprob(eps, x, t, s, AC, eta=1.0, method="ddim", prev_sample=target)
    x0 = (x - (1 - AC[t]).sqrt().view(-1, 1, 1, 1) * eps) / AC[t].sqrt().view(-1, 1, 1, 1)
    assert_close_to_scale(ddpm.mean, ddim.mean, rtol=1e-6, scale=float(x0.abs().max()))
    assert_close_to_scale(ddpm.std, ddim.std)
    # per-sample log-probs span 0 (last step) to ~200: each is compared to its own magnitude
    torch.testing.assert_close(ddpm.log_prob, ddim.log_prob, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        step_with_logprob(eps, x, t, s, AC, method="euler")


def test_guidance_rule(gen):
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([900, 400, 30]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, uncond = gen(x, t, y), gen(x, t, torch.full_like(y, gen.null_label))
        assert torch.equal(guided_eps(gen, x, t, y, guidance_scale=1.0), cond)
        guided = guided_eps(gen, x, t, y, guidance_scale=3.0)
    assert not torch.allclose(cond, uncond)  # the check below would be vacuous otherwise
    expected = uncond + 3.0 * (cond - uncond)
    # relative to the outputs' magnitude: batched [cond; uncond] and separate forwards use different BLAS
    # kernels on different CPUs (differences ~1e-6 relative seen on AMD EPYC)
    assert torch.allclose(guided, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_same_seeds_same_images_and_batch_independence(gen):
    kw = dict(num_steps=6, guidance_scale=2.0, eta=1.0)
    a = sample(gen, [0, 1, 2], seeds=[11, 12, 13], **kw)
    b = sample(gen, [0, 1, 2], seeds=[11, 12, 13], **kw)
    assert torch.equal(a.images, b.images)
    alone = sample(gen, [1], seeds=[12], **kw)
    scale = float(a.latents[1].abs().max())  # batch size changes the BLAS kernels: compare relatively
    assert torch.allclose(alone.latents[0], a.latents[1], rtol=1e-5, atol=1e-5 * scale)
    other = sample(gen, [0, 1, 2], seeds=[11, 99, 13], **kw)
    assert not torch.allclose(other.latents[1], a.latents[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(gen, [0, 1], seeds=[1])
    with pytest.raises(ValueError, match="label 4 out of range"):
        sample(gen, [0, 4], seeds=[1, 2])


def test_rescoring_recorded_trajectory_gives_ratio_one(gen):
    out = sample(
        gen,
        [0, 2, 1, 3],
        seeds=[1, 2, 3, 4],
        num_steps=5,
        guidance_scale=2.5,
        eta=1.0,
        record_trajectory=True,
    )
    traj, steps = out.trajectory, out.timesteps.numel()
    assert traj.shape == (4, steps + 1, 3, 8, 8) and out.log_probs.shape == (4, steps)
    assert torch.equal(traj[:, -1], out.latents)
    assert (out.log_probs[:, :-1] != 0).all() and (out.log_probs[:, -1] == 0).all()
    labels = torch.tensor([0, 2, 1, 3])
    with torch.no_grad():  # RL-style: one batch mixing transitions of different steps
        k = torch.tensor([0, 3, 1, 4])
        rows = torch.arange(4)
        x_t, x_prev = traj[rows, k], traj[rows, k + 1]
        eps = guided_eps(gen, x_t, out.timesteps[k], labels, guidance_scale=2.5)
        new = step_with_logprob(
            eps, x_t, out.timesteps[k], out.prev_timesteps[k], gen.alphas_cumprod, prev_sample=x_prev
        )
    old = out.log_probs[rows, k]
    assert_close_to_scale(new.log_prob, old, rtol=1e-5)
    assert_close_to_scale(torch.exp(new.log_prob - old), torch.ones(4), rtol=1e-5)


@pytest.mark.parametrize("vae", [None, "tiny"])
def test_pixel_and_latent_sampling_shapes(vae):
    gen = random_tiny_generator(vae=vae)
    out = sample(gen, [0, 1], generator=torch.Generator().manual_seed(0), num_steps=3, guidance_scale=2.0)
    assert out.images.shape == (2, 3, 8, 8) and out.images.abs().max() <= 1.0
    assert out.latents.shape == (2, *gen.latent_shape)
    assert gen.latent_shape == ((4, 8, 8) if vae else (3, 8, 8))
    assert out.trajectory is None and torch.equal(out.log_probs, torch.zeros(2, 3))  # η = 0: deterministic
    assert sample(gen, [0], seeds=[0], num_steps=2, decode=False).images is None
    with pytest.raises(ValueError, match="not both"):
        sample(gen, [0], seeds=[0], generator=torch.Generator())


def test_denoising_loss_matches_hand_computation(gen):
    x0, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    noise, t = torch.randn(4, 3, 8, 8), torch.tensor([5, 100, 600, 999])
    with torch.no_grad():
        a = AC[t].view(-1, 1, 1, 1)
        ref = ((gen(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y) - noise) ** 2).mean()
        loss = denoising_loss(gen, x0, y, noise=noise, timesteps=t)
        assert_close_to_scale(loss, ref, rtol=1e-5)
        r1 = denoising_loss(gen, x0, y, generator_rng=torch.Generator().manual_seed(5))
        r2 = denoising_loss(gen, x0, y, generator_rng=torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2)


def test_eta_must_be_a_non_negative_number(gen):
    """Issue 14 case 3: a negative (or NaN) eta is refused where it is given, naming the argument."""
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for eta in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            step_with_logprob(eps, x, 500, 480, AC, eta=eta)
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            sample(gen, [0, 1], seeds=[1, 2], num_steps=2, eta=eta)
    assert torch.isfinite(step_with_logprob(eps, x, 500, 480, AC, eta=0.0).prev_sample).all()


def test_ddim_from_init_equals_diffusers_img2img(gen):
    """The DDIM branch started from images: diffusers' DDIMScheduler on the last ⌊N·strength⌋ steps of its
    grid from its add_noise of the start images (η = 0, the same model and noise)."""
    labels, seeds, steps, strength = [1, 0], [7, 8], 20, 0.5
    init = torch.rand(2, *gen.latent_shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = sample(gen, labels, seeds=seeds, num_steps=steps, guidance_scale=1.5, init=init, strength=strength)
    noise = torch.stack(
        [torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    sched = _dit_ddim()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[steps - int(steps * strength) :]
    x = sched.add_noise(init, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            eps = guided_eps(gen, x, int(t), torch.tensor(labels), guidance_scale=1.5)
            x = sched.step(eps, int(t), x, eta=0.0).prev_sample
    assert torch.equal(out.timesteps, timesteps.long()) and len(timesteps) == 10
    assert_close_to_scale(out.latents, x, rtol=1e-4)
