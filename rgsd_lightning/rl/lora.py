"""LoRA on a diffusers DiT with peft, without a wrapper model.

``DiTTransformer2DModel`` has no PeftAdapterMixin, so adapters are injected with
``peft.inject_adapter_in_model``. The KL reference of RL is the same model with its adapters switched
off (:func:`adapters_disabled`) - no second copy of a 675M model - and the export merges the adapters
into a copy of the base weights (:func:`merged_copy`), giving a plain diffusers transformer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def inject_lora(
    module: nn.Module, rank: int = 4, alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS
) -> list[str]:
    """Add LoRA adapters (B initialised to zero, so the model is unchanged) to ``module`` in place.

    Only the adapter weights require grad afterwards. Returns their parameter names.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian"
    )
    inject_adapter_in_model(config, module)
    module.requires_grad_(False)
    names = []
    for name, param in module.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
            names.append(name)
    if not names:
        raise ValueError(f"no LoRA target among {list(targets)} was found in {type(module).__name__}")
    return names


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """Every peft adapter layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def lora_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters by name."""
    return {n: p for n, p in module.named_parameters() if ".lora_" in n}


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Within the block the module computes its base (pre-LoRA) function."""
    layers = lora_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every adapter merged into its base layer and removed."""
    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return out
