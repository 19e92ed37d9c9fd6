"""Measurement 4 of ``benchmarks.speed``: the cost of one RewardDPOK round.

One ``training_step`` (rollout / reward / update) and its peak memory for the "tiny" and "small" presets,
and a census of the parameter storage reachable during the update (no second copy of the generator).
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from benchmarks.common import CudaMeter, RSSMeter, cuda_sync, make_meter, md_table, median, mib
from benchmarks.speed_models import _autocast, _perturb_

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_generator_export(
    preset: str,
    num_identities: int,
    root: str | Path,
    *,
    vae: AutoencoderKL | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Path:
    """Build a random generator of ``preset`` (noise added to zero-initialised layers) and export it."""
    from rgsd_lightning.diffusion import build_dit

    torch.manual_seed(seed)
    gen = build_dit(preset=preset, num_identities=num_identities, vae=vae, image_size=image_size)
    _perturb_(gen.transformer, 0.02, seed)
    return gen.save_pretrained(Path(root) / f"{preset}_export")


def _storages(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> dict[tuple[str, int], int]:
    """Distinct storages of the tensors: {(device, data pointer): bytes}."""
    out = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            out[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return out


def _is_parameter(obj: Any) -> bool:
    # type(), not isinstance: the isinstance hook reads attributes of any object (deprecation warnings).
    return issubclass(type(obj), nn.Parameter)


def live_parameters() -> list[nn.Parameter]:
    """Every ``nn.Parameter`` alive in the process (after a garbage collection)."""
    gc.collect()
    return [o for o in gc.get_objects() if _is_parameter(o)]


def parameter_census(model: nn.Module, preexisting: Iterable[torch.Tensor] = ()) -> dict[str, Any]:
    """Distinct parameter storage a RewardDPOK holds, and whether its KL reference is a second copy.

    Counts storages (tensors sharing memory counted once) of: the generator's base weights, its LoRA
    adapters, everything else in the module (value net, reward extractor, bank), the tensors of the KL
    reference (entered with ``model.reference()``) that are not the generator's own, and parameters alive
    anywhere in the process, outside the module, shaped like a generator weight (a hidden copy) -
    except ``preexisting`` ones (e.g. :func:`live_parameters` taken before the model was built: other
    models of the same process are not copies made by this one).
    """
    gen = model.generator
    named = list(gen.named_parameters()) + list(gen.named_buffers())
    lora = _storages(t for n, t in named if ".lora_" in n)
    base = _storages(t for n, t in named if ".lora_" not in n)
    held = list(model.parameters()) + list(model.buffers())
    for extra in getattr(model, "_reference_model", []):
        held += list(extra.parameters()) + list(extra.buffers())
    module_all = _storages(held)
    with model.reference() as ref:
        reference = _storages(list(ref.parameters()) + list(ref.buffers()))
    ref_extra = {k: v for k, v in reference.items() if k not in base and k not in lora}
    shapes = {tuple(t.shape) for n, t in named if ".lora_" not in n and t.numel() > 1}
    alive = [o for o in live_parameters() if tuple(o.shape) in shapes]
    known = {**module_all, **_storages(list(preexisting))}
    stray = {k: v for k, v in _storages(alive).items() if k not in known}
    other = {k: v for k, v in module_all.items() if k not in base and k not in lora}
    return {
        "generator_base_bytes": sum(base.values()),
        "lora_bytes": sum(lora.values()),
        "other_module_bytes": sum(other.values()),
        "distinct_module_bytes": sum(module_all.values()),
        "reference_extra_bytes": sum(ref_extra.values()),
        "generator_shaped_params_outside_module_bytes": sum(stray.values()),
        "no_second_copy": not ref_extra and not stray,
    }


class _PlainOptimizer:
    """What ``RewardDPOK.training_step`` uses of Lightning's optimizer wrapper, for a trainer-less run: the
    step calls the module's ``on_before_optimizer_step`` (gradient norm, clipping) as Lightning does."""

    def __init__(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        self.optimizer, self.module = optimizer, module

    @contextlib.contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        yield

    def step(self) -> None:
        self.module.on_before_optimizer_step(self.optimizer)
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _clip_by_norm(
    optimizer: torch.optim.Optimizer, gradient_clip_val: float, gradient_clip_algorithm: str = "norm"
) -> None:
    """``LightningModule.clip_gradients`` without a Trainer (fp32: nothing to unscale)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


def build_dpok(
    export: str | Path,
    cfg: dict[str, Any],
    device: torch.device | str,
    *,
    guidance_scale: float = 4.0,
    ratio_check_tol: float = 1e-4,
    trainable: str = "lora",
) -> Any:
    """A RewardDPOK on ``export`` with a random recognizer as reward extractor and a random memory bank.

    The module runs without a Trainer: ``optimizers``, ``manual_backward`` and ``log_dict`` are replaced on
    the instance by plain-PyTorch equivalents (``log_dict`` keeps the last round's values in
    ``model.last_logged``), so ``training_step`` itself (rollout, reward, store, update) is what runs and is
    timed.
    """
    from rgsd_lightning import RewardDPOK
    from rgsd_lightning.backbones import EmbeddingNet, FeatureExtractor
    from rgsd_lightning.modules.config import GridConfig, PolicyGradientConfig, SamplerConfig, UpdateConfig
    from rgsd_lightning.rewards import CompositeReward, MemoryBank

    n = int(cfg["num_identities"])
    model = RewardDPOK(
        n,
        generator=str(export),
        trainable=trainable,
        samples_per_identity=cfg["k"],
        sampler=SamplerConfig(steps=cfg["sample_steps"], guidance_scale=guidance_scale, eta=1.0),
        update=UpdateConfig(
            policy_steps=cfg["policy_steps"], grad_accum=cfg["grad_accum"], micro_batch=cfg["micro_batch"]
        ),
        objective=PolicyGradientConfig(ratio_check_tol=ratio_check_tol),
        grid=GridConfig(every_n_steps=0),
    )
    torch.manual_seed(0)
    net = EmbeddingNet(cfg["extractor"], neck="none")
    model.set_reward_extractor(FeatureExtractor(net, cfg["extractor_size"], IMAGENET_MEAN, IMAGENET_STD))
    bank_ids = torch.arange(n).repeat_interleave(4)
    bank = MemoryBank(torch.randn(len(bank_ids), net.feature_dim), bank_ids, n)
    model.reward = CompositeReward(bank)
    model.to(device)
    optimizers = [_PlainOptimizer(o, model) for o in model.configure_optimizers()]
    model.optimizers = lambda use_pl_optimizer=True: optimizers
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward()
    model.clip_gradients = _clip_by_norm
    model.last_logged = {}
    model.log_dict = lambda values, *args, **kwargs: model.last_logged.update(
        {k: float(v) for k, v in values.items()}
    )
    return model


def time_dpok_round(
    model: Any,
    labels: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    meter: RSSMeter | CudaMeter | None = None,
    census: bool = False,
) -> dict[str, Any]:
    """Run one ``training_step`` and split its wall time into rollout sampling, reward and update.

    With ``meter`` the peak memory of the rollout (sampling + reward) and of the update is recorded instead
    of being timed cleanly (meters collect garbage); with ``census`` the parameter census runs inside the
    first micro-batch of the update.
    """
    record: dict[str, Any] = {"reward_s": 0.0}
    rollout, rewards, micro = model.rollout, model.rewards, model.micro_batch_loss

    def timed_rewards(images, lbl):
        cuda_sync()
        start = time.perf_counter()
        out = rewards(images, lbl)
        cuda_sync()
        record["reward_s"] += time.perf_counter() - start
        return out

    def timed_rollout(lbl):
        start = time.perf_counter()
        out = rollout(lbl)
        cuda_sync()
        record["rollout_s"] = time.perf_counter() - start
        if meter is not None:
            record["rollout_peak_bytes"] = meter.peak()
            meter.reset(new_baseline=False)
        return out

    def checked_micro(mb, check_ratio, **kwargs):
        if census and "census" not in record:
            record["census"] = parameter_census(model)
        loss, stats = micro(mb, check_ratio, **kwargs)
        if check_ratio:
            record["logp_check"] = float(stats["logp_check"])
        return loss, stats

    model.rollout, model.rewards, model.micro_batch_loss = timed_rollout, timed_rewards, checked_micro
    try:
        if meter is not None:
            meter.reset()
        cuda_sync()
        start = time.perf_counter()
        with _autocast(model.device, amp_dtype):
            model.training_step({"label": labels}, 0)
        cuda_sync()
        total = time.perf_counter() - start
        if meter is not None:
            record["update_peak_bytes"] = meter.peak()
    finally:
        del model.rollout, model.rewards, model.micro_batch_loss  # back to the class methods
    if model.last_logged:  # the drift the old log-prob recompute absorbed (rollout vs update forward)
        record["logp_drift"] = model.last_logged.get("train/logp_drift", float("nan"))
    record["total_s"] = total
    record["sampling_s"] = record["rollout_s"] - record["reward_s"]
    record["update_s"] = total - record["rollout_s"]
    return record


def bench_dpok_preset(
    model: Any, cfg: dict[str, Any], *, amp_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Warm-up round (with the census), ``repeats`` timed rounds, then one memory round; medians."""
    n, p = int(cfg["num_identities"]), int(cfg["p"])

    def labels(i: int) -> torch.Tensor:
        return (torch.arange(p) + i * p) % n

    first = time_dpok_round(model, labels(0), amp_dtype=amp_dtype, census=True)
    rounds = [time_dpok_round(model, labels(i + 1), amp_dtype=amp_dtype) for i in range(cfg["repeats"])]
    meter = make_meter(model.device)
    mem = time_dpok_round(model, labels(cfg["repeats"] + 1), amp_dtype=amp_dtype, meter=meter)
    meter.stop()
    keys = ("total_s", "sampling_s", "reward_s", "update_s")
    images = p * int(cfg["k"])
    micro_batches = int(cfg["policy_steps"]) * int(cfg["grad_accum"])
    return {
        **{k: median([r[k] for r in rounds]) for k in keys},
        "rounds": [{k: r[k] for k in keys} for r in rounds],
        "images_per_round": images,
        "micro_batches_per_round": micro_batches,
        "transitions_per_micro_batch": int(cfg["micro_batch"]),
        "rollout_peak_bytes": mem["rollout_peak_bytes"],
        "update_peak_bytes": mem["update_peak_bytes"],
        "memory_method": meter.method,
        "logp_check_first_round": first["logp_check"],
        "logp_drift_first_round": first.get("logp_drift", float("nan")),
        "census": first["census"],
    }


def bench_dpok(cfg: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measurement 4 at CPU scale: one RewardDPOK round per preset, split, peak memory, copy census."""
    device = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in cfg["presets"]:
            export = make_generator_export(preset, int(cfg["num_identities"]), tmp)
            model = build_dpok(export, cfg, device)
            rows.append(
                {
                    "preset": preset,
                    "latent_shape": list(model.generator.latent_shape),
                    **bench_dpok_preset(model, cfg),
                }
            )
            del model
    settings = {k: v for k, v in cfg.items() if k not in ("presets", "repeats")}
    return {"settings": settings, "rows": rows}


def md_dpok(result: dict[str, Any]) -> str:
    """Markdown of measurement 4."""
    s = result["settings"]
    time_rows, census_rows = [], []
    for r in result["rows"]:
        time_rows.append(
            [
                r["preset"],
                "x".join(str(v) for v in r["latent_shape"]),
                f"{r['total_s']:.2f}",
                f"{r['sampling_s']:.2f}",
                f"{r['reward_s']:.2f}",
                f"{r['update_s']:.2f}",
                mib(r["rollout_peak_bytes"]),
                mib(r["update_peak_bytes"]),
            ]
        )
        c = r["census"]
        census_rows.append(
            [
                r["preset"],
                mib(c["generator_base_bytes"]),
                f"{c['lora_bytes'] / 2**10:.1f}",
                mib(c["other_module_bytes"]),
                c["reference_extra_bytes"],
                c["generator_shaped_params_outside_module_bytes"],
                "yes" if c["no_second_copy"] else "**NO**",
            ]
        )
    memory_method = result["rows"][0]["memory_method"] if result["rows"] else ""
    return (
        "## 4. RewardDPOK round cost\n\n"
        f"One `training_step` (no Trainer): P={s['p']} identities x K={s['k']} samples, {s['sample_steps']} "
        f"DDIM steps (eta=1, CFG w=4), reward extractor {s['extractor']} at {s['extractor_size'][0]}x"
        f"{s['extractor_size'][1]} (random), update = {s['policy_steps']} optimizer steps x "
        f"{s['grad_accum']} "
        f"micro-batches of {s['micro_batch']} transitions (LoRA rank 4, value baseline, DPOK KL). Median "
        f"seconds of the timed rounds (a warm-up round untimed); peak memory = {memory_method} above the "
        "RSS before the round, in a separate round.\n\n"
        + md_table(
            [
                "preset",
                "latent",
                "round s",
                "rollout sampling s",
                "reward s",
                "update s",
                "rollout peak MiB",
                "update peak MiB",
            ],
            time_rows,
        )
        + "\nParameter storage reachable during the update (distinct storages; the KL reference is the "
        "generator with its adapters off):\n\n"
        + md_table(
            [
                "preset",
                "generator base MiB",
                "LoRA KiB",
                "other module MiB",
                "reference extra bytes",
                "generator-shaped params elsewhere (bytes)",
                "no second copy",
            ],
            census_rows,
        )
    )
