"""DPOK's value baseline V(x_t, identity, step): a small conditional MLP trained on the final reward."""

from __future__ import annotations

import torch
from torch import nn


class ValueNet(nn.Module):
    """V(x_t, y, k) -> predicted reward of the trajectory (DPOK's learned baseline).

    Args:
        state_dim: number of elements of a state x_t (C * h * w).
        num_labels: identity labels (N + 1 including null).
        num_steps: steps of the sampling schedule (step-embedding rows).
        hidden: width of the hidden layers.
    """

    def __init__(self, state_dim: int, num_labels: int, num_steps: int, hidden: int = 256) -> None:
        super().__init__()
        self.inp = nn.Linear(state_dim, hidden)
        self.label = nn.Embedding(num_labels, hidden)
        self.step = nn.Embedding(num_steps, hidden)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, state: torch.Tensor, label: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        h = self.inp(state.flatten(1).float()) + self.label(label) + self.step(step)
        return self.mlp(h).squeeze(-1)
