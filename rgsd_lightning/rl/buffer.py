"""Transitions of denoising trajectories and DPOK's FIFO replay buffer.

A transition is one reverse step x_t -> x_prev of a generated trajectory together with everything the
policy update needs: the timesteps, the identity label, the trajectory's reward and the log-probability
of the step under the policy that sampled it. The buffer keeps the most recent ``capacity`` transitions
(DPOK: 1000), samples uniformly, and round-trips through a checkpoint so a resumed run continues with
the same replay content.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_FIELDS = ("state", "next_state", "t", "t_prev", "step", "label", "reward", "log_prob")


@dataclass
class Transitions:
    """A batch of transitions (all tensors share the first dimension).

    Attributes:
        state: x_t (n, C, h, w), fp32.
        next_state: x_prev (n, C, h, w), fp32.
        t: timestep of x_t (n,).
        t_prev: timestep of x_prev (n,), -1 means ᾱ_prev = 1.
        step: index of the step in the sampling schedule (n,) (value-net input).
        label: identity label (n,).
        reward: reward of the trajectory's final image (n,).
        log_prob: log p(x_prev | x_t) under the sampling policy (n,).
    """

    state: torch.Tensor
    next_state: torch.Tensor
    t: torch.Tensor
    t_prev: torch.Tensor
    step: torch.Tensor
    label: torch.Tensor
    reward: torch.Tensor
    log_prob: torch.Tensor

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def to(self, device: torch.device | str) -> Transitions:
        return Transitions(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: torch.Tensor) -> Transitions:
        return Transitions(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Transitions]) -> Transitions:
        return Transitions(**{f: torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS})

    @staticmethod
    def from_trajectories(
        trajectory: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        log_probs: torch.Tensor,
        labels: torch.Tensor,
        rewards: torch.Tensor,
        stochastic: torch.Tensor,
    ) -> Transitions:
        """Flatten (B, T+1, C, h, w) trajectories into the transitions of their stochastic steps.

        Args:
            trajectory: x_T..x_0 of every sample.
            timesteps: t of every step (T,).
            prev_timesteps: t_prev of every step (T,).
            log_probs: (B, T) step log-probabilities at sampling time.
            labels: (B,) identity labels.
            rewards: (B,) rewards of the final images.
            stochastic: (B, T) bool: which steps to keep (σ > 0 and, optionally, a timestep subsample).
        """
        b, steps = log_probs.shape
        sample_idx, step_idx = torch.nonzero(stochastic, as_tuple=True)
        return Transitions(
            state=trajectory[sample_idx, step_idx].float(),
            next_state=trajectory[sample_idx, step_idx + 1].float(),
            t=timesteps.to(trajectory.device)[step_idx],
            t_prev=prev_timesteps.to(trajectory.device)[step_idx],
            step=step_idx,
            label=labels[sample_idx],
            reward=rewards[sample_idx].float(),
            log_prob=log_probs[sample_idx, step_idx].float(),
        )


class ReplayBuffer:
    """FIFO buffer of transitions (DPOK semantics), kept on ``device``.

    Args:
        capacity: the most recent transitions kept (0 keeps only the latest rollout: on-policy).
        device: where the stored tensors live ("cpu" saves accelerator memory).
    """

    def __init__(self, capacity: int = 1000, device: torch.device | str = "cpu") -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.data: Transitions | None = None
        self.latest = 0  # transitions added by the most recent push (they sit at the end)

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def push(self, transitions: Transitions) -> None:
        """Append a rollout's transitions; drop the oldest beyond capacity (all older ones on-policy)."""
        new = transitions.to(self.device)
        if self.capacity == 0 or self.data is None:
            self.data = new
        else:
            self.data = Transitions.cat([self.data, new])
            if len(self.data) > self.capacity:
                self.data = self.data.index(torch.arange(len(self.data) - self.capacity, len(self.data)))
        self.latest = min(len(new), len(self.data))

    def sample_indices(self, n: int, generator: torch.Generator, latest_only: bool = False) -> torch.Tensor:
        """Indices of n transitions drawn uniformly (without replacement if possible), from all or the latest
        push."""
        if self.data is None or len(self.data) == 0:
            raise RuntimeError("the replay buffer is empty: push a rollout first")
        size = len(self.data)
        lo = size - self.latest if latest_only else 0
        pool = size - lo
        if n <= pool:
            return torch.randperm(pool, generator=generator)[:n] + lo
        return torch.randint(0, pool, (n,), generator=generator) + lo

    def sample(self, n: int, generator: torch.Generator, latest_only: bool = False) -> Transitions:
        """n transitions drawn uniformly (without replacement if possible), from all or the latest push."""
        idx = self.sample_indices(n, generator, latest_only)
        return self.data.index(idx.to(self.data.state.device))

    def get(self, idx: torch.Tensor) -> Transitions:
        """The transitions at ``idx``."""
        if self.data is None:
            raise RuntimeError("the replay buffer is empty: push a rollout first")
        return self.data.index(idx.to(self.data.state.device))

    def latest_indices(self) -> torch.Tensor:
        """Indices of the transitions of the most recent push (the on-policy ones)."""
        return torch.arange(len(self) - self.latest, len(self))

    def set_log_prob(self, idx: torch.Tensor, log_prob: torch.Tensor) -> None:
        """Overwrite the stored (old) log-probs at ``idx`` (recomputed with the update's own forward)."""
        if self.data is None:
            raise RuntimeError("the replay buffer is empty: push a rollout first")
        self.data.log_prob[idx.to(self.data.log_prob.device)] = log_prob.detach().to(self.data.log_prob)

    def state_dict(self) -> dict:
        data = None if self.data is None else {f: getattr(self.data, f).cpu() for f in _FIELDS}
        return {"capacity": self.capacity, "latest": self.latest, "data": data}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.latest = int(state["latest"])
        data = state["data"]
        self.data = None if data is None else Transitions(**{f: data[f] for f in _FIELDS}).to(self.device)
