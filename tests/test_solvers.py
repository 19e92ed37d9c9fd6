"""The fast deterministic solver (DPM-Solver++) against diffusers, a closed-form case and DDIM; its use in
``sample`` (shapes, seeds, batch independence, label checks) and in the sampler config."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tiny_generator
from diffusers import DPMSolverMultistepScheduler

from rgsd_lightning.diffusion import alphas_cumprod, guided_eps, make_timesteps, sample
from rgsd_lightning.diffusion.sampling import steps_from_init
from rgsd_lightning.diffusion.solvers import dpmsolver_step, dpmsolver_timesteps, solve
from rgsd_lightning.modules.config import SamplerConfig

AC = alphas_cumprod()  # DiT schedule: 1000 steps, linear betas 1e-4..0.02


@pytest.fixture(scope="module")
def gen():
    return random_tiny_generator()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of the reference's magnitude (BLAS kernels differ between CPUs)."""
    scale = float(b.abs().max())
    return torch.allclose(a, b, rtol=rel, atol=rel * scale)


def _diffusers_dpm(clip_x0: bool = False) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++(2M) on the DiT schedule, all defaults (``thresholding`` at 1 = x0 clipping)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        thresholding=clip_x0,
        sample_max_value=1.0,
    )


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 15, 25, 50, 999])
def test_grid_equals_diffusers(steps):
    sched = _diffusers_dpm()
    sched.set_timesteps(steps)
    timesteps, prev = dpmsolver_timesteps(1000, steps)
    assert torch.equal(timesteps, sched.timesteps.long())
    assert torch.equal(prev[:-1], timesteps[1:]) and int(prev[-1]) == -1
    assert len(set(timesteps.tolist())) == steps


def test_grid_rejects_bad_step_counts():
    for steps in (0, 1000):
        with pytest.raises(ValueError, match="DPM-Solver needs"):
            dpmsolver_timesteps(1000, steps)


@pytest.mark.parametrize(
    ("steps", "w", "clip_x0"), [(3, 1.0, False), (10, 2.5, False), (20, 4.0, False), (10, 2.5, True)]
)
def test_sample_equals_diffusers_scheduler_step_by_step(gen, steps, w, clip_x0):
    labels, seeds = [0, 2, 3, 1], [5, 6, 7, 8]
    out = sample(
        gen,
        labels,
        seeds=seeds,
        num_steps=steps,
        guidance_scale=w,
        method="dpmsolver",
        clip_x0=clip_x0,
        decode=False,
    )
    # the reference: diffusers' scheduler driven step by step with the same model, CFG rule and noise
    x = torch.stack(
        [torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    sched = _diffusers_dpm(clip_x0)
    sched.set_timesteps(steps)
    y = torch.tensor(labels)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = guided_eps(gen, x, int(t), y, guidance_scale=w)
            x = sched.step(eps, t, x).prev_sample
    assert torch.equal(out.timesteps, sched.timesteps.long())
    assert out.latents.abs().max() > 0.1  # not a trivially small result
    assert _close(out.latents, x)
    assert torch.equal(out.log_probs, torch.zeros(4, steps))  # deterministic: no log-probs


def test_closed_form_point_mass_is_solved_exactly():
    """Data = one point x*: the exact ε is (x - α_t x*)/σ_t, the ODE keeps ε fixed, and every grid lands on
    x* (first and second order), passing α_s x* + σ_s ε_T at intermediate timesteps."""
    target = torch.randn(2, 3, 4, 4)

    def exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a = AC[t].double()
        return ((x.double() - a.sqrt() * target.double()) / (1 - a).sqrt()).float()

    x_start = torch.randn(2, 3, 4, 4)
    for order in (1, 2):
        timesteps, prev = dpmsolver_timesteps(1000, 6)
        end = solve(exact_eps, x_start, timesteps, prev, AC, order=order)
        assert _close(end, target, 1e-4)
        mid = solve(exact_eps, x_start, timesteps[:3], prev[:3], AC, order=order)
        eps_start, s = exact_eps(x_start, int(timesteps[0])), int(prev[2])
        expected = AC[s].sqrt() * target + (1 - AC[s]).sqrt() * eps_start
        assert _close(mid, expected, 1e-4)


def test_first_order_equals_ddim_eta_zero(gen):
    """DPM-Solver++ of order 1 is DDIM with η = 0 on any grid (here our 'leading' DDIM grid)."""
    labels, seeds = [1, 0, 2], [3, 4, 5]
    ddim = sample(gen, labels, seeds=seeds, num_steps=8, guidance_scale=2.0, eta=0.0, decode=False)
    timesteps, prev = make_timesteps(1000, 8, "leading")
    x = torch.stack(
        [torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    y = torch.tensor(labels)
    with torch.no_grad():
        out = solve(
            lambda x_t, t: guided_eps(gen, x_t, t, y, guidance_scale=2.0), x, timesteps, prev, AC, order=1
        )
    assert _close(out, ddim.latents)


def test_solve_over_windows_composes_at_first_order_and_checks_the_grid(gen):
    """The solver runs over any descending part of a grid (e.g. outside an RL window)."""
    y = torch.tensor([0, 1])
    x = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(0))
    timesteps, prev = dpmsolver_timesteps(1000, 9)

    def eps_fn(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return guided_eps(gen, x_t, t, y, guidance_scale=1.5)

    with torch.no_grad():
        whole = solve(eps_fn, x, timesteps, prev, AC, order=1)
        first = solve(eps_fn, x, timesteps[:4], prev[:4], AC, order=1)
        rest = solve(eps_fn, first, timesteps[4:], prev[4:], AC, order=1)
        second_order = solve(eps_fn, x, timesteps, prev, AC, order=2)
    assert _close(rest, whole)
    assert not _close(second_order, whole, 1e-3)  # the multistep correction does something
    with pytest.raises(ValueError, match="chain"):
        solve(eps_fn, x, timesteps[[0, 2]], prev[[0, 2]], AC)
    with pytest.raises(ValueError, match="descend"):
        solve(eps_fn, x, torch.tensor([10]), torch.tensor([20]), AC)
    with pytest.raises(ValueError, match="order"):
        solve(eps_fn, x, timesteps, prev, AC, order=3)


def test_step_onto_the_clean_end_returns_the_data_prediction():
    x, x0 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(dpmsolver_step(x, x0, 100, -1, AC, history=(torch.randn_like(x0), 300)), x0)


def test_seeds_batch_independence_labels_and_shapes(gen):
    kw = dict(num_steps=5, guidance_scale=2.0, method="dpmsolver")
    a = sample(gen, [0, 1, 2], seeds=[11, 12, 13], **kw)
    b = sample(gen, [0, 1, 2], seeds=[11, 12, 13], **kw)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (3, 3, 8, 8) and a.images.abs().max() <= 1.0
    alone = sample(gen, [1], seeds=[12], **kw)
    assert _close(alone.latents[0], a.latents[1], 1e-5)
    other = sample(gen, [0, 1, 2], seeds=[11, 99, 13], **kw)
    assert not torch.allclose(other.latents[1], a.latents[1])
    traj = sample(gen, [0, 1], seeds=[1, 2], record_trajectory=True, **kw)
    assert traj.trajectory.shape == (2, 6, 3, 8, 8) and torch.equal(traj.trajectory[:, -1], traj.latents)
    with pytest.raises(ValueError, match="label 4 out of range"):
        sample(gen, [0, 4], seeds=[1, 2], **kw)
    with pytest.raises(ValueError, match="eta must be 0"):
        sample(gen, [0], seeds=[1], eta=1.0, **kw)
    with pytest.raises(ValueError, match="method="):
        sample(gen, [0], seeds=[1], method="euler")


def test_latent_mode_shapes():
    gen = random_tiny_generator(vae="tiny")
    out = sample(gen, [0, 1], seeds=[0, 1], num_steps=3, guidance_scale=2.0, method="dpmsolver")
    assert out.latents.shape == (2, 4, 8, 8) and out.images.shape == (2, 3, 8, 8)


def test_sampler_config_accepts_the_solver_and_rejects_eta():
    cfg = SamplerConfig(method="dpmsolver", steps=10)
    assert cfg.record()["sampler"] == "dpmsolver"
    with pytest.raises(ValueError, match="sampler.eta must be 0"):
        SamplerConfig(method="dpmsolver", eta=0.5)
    with pytest.raises(ValueError, match="sampler.method"):
        SamplerConfig(method="euler")


def test_rl_rollouts_refuse_the_deterministic_solver():
    from rgsd_lightning.modules.reward_dpok import RewardDPOK

    with pytest.raises(ValueError, match="generation-only solver"):
        RewardDPOK(num_identities=2, generator="unused", sampler={"method": "dpmsolver", "steps": 5})


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.4), (25, 0.6), (7, 1.0)])
def test_sample_from_init_equals_diffusers_img2img(gen, steps, strength):
    """SDEdit: diffusers' img2img rule (the last ⌊N·strength⌋ steps of the grid, the start image noised to
    the first of them by the scheduler's add_noise) driven step by step with the same model and noise."""
    labels, seeds = [0, 2, 1], [3, 4, 5]
    init = torch.rand(3, *gen.latent_shape, generator=torch.Generator().manual_seed(9)) * 2 - 1
    out = sample(
        gen,
        labels,
        seeds=seeds,
        num_steps=steps,
        guidance_scale=2.0,
        method="dpmsolver",
        decode=False,
        init=init,
        strength=strength,
    )
    noise = torch.stack(
        [torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    sched = _diffusers_dpm()
    sched.set_timesteps(steps)
    start = steps - int(steps * strength)
    timesteps = sched.timesteps[start:]
    sched.set_begin_index(start)
    x = sched.add_noise(init, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(
                guided_eps(gen, x, int(t), torch.tensor(labels), guidance_scale=2.0), t, x
            ).prev_sample
    assert torch.equal(out.timesteps, timesteps.long())
    assert _close(out.latents, x)


def test_closed_form_point_mass_from_an_init_image():
    """With the exact ε of one data point x*, a run started from any noised image lands on x*, and a run
    of a part of the grid passes α_s x* + σ_s ε̂ with ε̂ the start's exact ε (the ODE keeps it fixed)."""
    target, init, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a = AC[t].double()
        return ((x.double() - a.sqrt() * target.double()) / (1 - a).sqrt()).float()

    timesteps, prev = dpmsolver_timesteps(1000, 10)
    t0 = int(timesteps[6])  # strength 0.4: the last 4 of 10 steps
    x_start = AC[t0].sqrt() * init + (1 - AC[t0]).sqrt() * noise
    assert _close(solve(exact_eps, x_start, timesteps[6:], prev[6:], AC), target, 1e-4)


def test_low_strength_keeps_the_init_image(gen):
    """The start image is used and paired with its sample: at strength 0.2 each sample is nearer its own
    start image than the other one (same label and noise), and the pair's difference follows the starts'."""
    a = torch.full((1, *gen.latent_shape), -0.8)
    b = torch.full((1, *gen.latent_shape), 0.8)
    kw = dict(seeds=[1, 1], num_steps=10, guidance_scale=2.0, method="dpmsolver", decode=False)
    out = sample(gen, [0, 0], init=torch.cat([a, b]), strength=0.2, **kw).latents
    assert (out[0] - a[0]).abs().mean() < (out[0] - b[0]).abs().mean()
    assert (out[1] - b[0]).abs().mean() < (out[1] - a[0]).abs().mean()
    assert float((out[1] - out[0]).mean()) > 0.8  # the starts differ by 1.6
    pure = sample(gen, [0, 0], **kw).latents  # no init: both samples equal
    assert torch.allclose(pure[0], pure[1], atol=1e-5 * float(pure.abs().max()))


def test_steps_from_init_rule_and_bad_input(gen):
    assert (
        steps_from_init(25, 0.4) == 10 and steps_from_init(25, 1.0) == 25 and steps_from_init(10, 0.15) == 1
    )
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            steps_from_init(10, bad)
    with pytest.raises(ValueError, match="runs no step"):
        steps_from_init(10, 0.05)
    with pytest.raises(ValueError, match="needs init images"):
        sample(gen, [0], seeds=[1], num_steps=4, strength=0.5)
    with pytest.raises(ValueError, match="init has shape"):
        sample(gen, [0, 1], seeds=[1, 2], num_steps=4, init=torch.zeros(1, *gen.latent_shape), strength=0.5)
