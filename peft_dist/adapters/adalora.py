"""AdaLoRA: an SVD-form low-rank update whose rank budget is reallocated during training.

Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (arXiv:2303.10512);
reference code QingruZhang/AdaLoRA, and peft's ``RankAllocator``.

``delta W = P diag(lam) Q * alpha / r0``. Each triplet ``(P[:, i], lam[i], Q[i, :])`` gets an importance
score (smoothed sensitivity ``|theta * grad|`` times its uncertainty); on schedule the lowest-scoring
triplets over all matrices have ``lam`` set to zero until ``target_r * #matrices`` remain. The module and
the budget math here are plain PyTorch; the per-step schedule that reads gradients and parameters where
DeepSpeed keeps them (ZeRO-3 shards) is ``peft_dist.distributed.adalora``. See docs/ADALORA.md for how
this runs inside a DeepSpeed step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_dist.adapters.base import AdapterConfig, AdapterModule
from peft_dist.adapters.inject import inject_linear_delta
from peft_dist.adapters.registry import register
from peft_dist.config.schema import TrainConfig, require


@dataclass
class AdaLoraConfig(AdapterConfig):
    """init_r: initial rank r0 of every matrix; target_r: average rank left after pruning.

    alpha: the delta is scaled by ``alpha / init_r`` (kept after pruning, as the authors found best).
    dropout: on the adapter input. orth_reg_weight: gamma of the orthogonality regularizer.
    beta1, beta2: EMA factors of sensitivity and uncertainty.
    tinit: optimizer steps before any pruning; tfinal: last steps with the final pattern fixed.
    delta_t: mask every delta_t steps while the budget decays.
    total_step: steps of the schedule; defaults to the trainer's ``train.max_steps``.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    orth_reg_weight: float = 0.5
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.init_r >= 2, "init_r", f"got {self.init_r}; the initial rank must be >= 2")
        require(1 <= self.target_r < self.init_r, "target_r",
                f"got {self.target_r}; must be >= 1 and below init_r ({self.init_r}), or nothing is pruned")
        require(0.0 <= self.dropout < 1.0, "dropout", f"got {self.dropout}; must be in [0, 1)")
        require(self.orth_reg_weight >= 0, "orth_reg_weight", f"got {self.orth_reg_weight}; must be >= 0")
        for key in ("beta1", "beta2"):
            require(0.0 <= getattr(self, key) < 1.0, key, f"got {getattr(self, key)}; must be in [0, 1)")
        require(self.tinit >= 0 and self.tfinal >= 0, "tinit/tfinal", "must be >= 0")
        require(self.delta_t >= 1, "delta_t", f"got {self.delta_t}; must be >= 1")
        require(self.total_step is None or self.total_step >= 1, "total_step",
                f"got {self.total_step}; must be >= 1, or leave it unset to use train.max_steps")

    def check_training(self, train: TrainConfig) -> None:
        total = self.total_step or train.max_steps
        require(self.tinit < total - self.tfinal, "tinit",
                f"tinit ({self.tinit}) must be below the total steps ({total}) minus tfinal ({self.tfinal}) "
                "or the budget never decays; lower tinit/tfinal or raise train.max_steps")


class AdaLoraDelta(AdapterModule):
    """``P diag(lam) Q * alpha / r0`` for one linear layer; ``rank_mask`` marks the live triplets."""

    mergeable = True

    def __init__(self, d_out: int, d_in: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.empty(d_out, r).normal_(0.0, 0.02))
        self.lam = nn.Parameter(torch.zeros(r))
        self.Q = nn.Parameter(torch.empty(r, d_in).normal_(0.0, 0.02))
        self.scale = alpha / r  # r0, also after pruning or a compact load
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not in state_dict: the hook owns the pattern (saved with its state) and restores it here.
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.Q.dtype)
        return ((x @ self.Q.t()) * self.lam) @ self.P.t() * self.scale

    def orth_penalty(self) -> torch.Tensor:
        """``||P^T P - I||_F + ||Q Q^T - I||_F``: the plain (not squared) norm, as in the reference code."""
        eye = torch.eye(self.lam.shape[0], dtype=self.P.dtype, device=self.P.device)
        return torch.linalg.norm(self.P.t() @ self.P - eye) + torch.linalg.norm(self.Q @ self.Q.t() - eye)

    def delta_weight(self) -> torch.Tensor:
        return (self.P * self.lam) @ self.Q * self.scale

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The compact export: pruned triplets are removed, so the tensors have the live rank."""
        keep = self.rank_mask
        return {"P": self.P.detach()[:, keep], "lam": self.lam.detach()[keep], "Q": self.Q.detach()[keep]}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a (compact) export; the module shrinks to its rank. Before DeepSpeed wraps the model only."""
        if set(state) != {"P", "lam", "Q"}:
            raise ValueError(f"an AdaLoRA delta needs exactly P, lam and Q; got {sorted(state)}")
        r, (d_out, r0), d_in = state["lam"].numel(), self.P.shape, self.Q.shape[1]
        if state["P"].shape != (d_out, r) or state["Q"].shape != (r, d_in) or r > r0:
            raise ValueError(f"AdaLoRA shapes P {tuple(state['P'].shape)}, lam ({r},), "
                             f"Q {tuple(state['Q'].shape)} do not fit this layer "
                             f"(d_out={d_out}, d_in={d_in}, init_r={r0})")
        for key in ("P", "lam", "Q"):
            old = getattr(self, key)
            setattr(self, key, nn.Parameter(state[key].to(old.dtype, copy=True).reshape(state[key].shape),
                                            requires_grad=old.requires_grad))
        self.rank_mask = torch.ones(r, dtype=torch.bool, device=self.P.device)


# ---- pure budget math ------------------------------------------------------------------------------

def budget_schedule(step: int, b0: int, b_target: int, tinit: int, tfinal: int, total: int,
                    delta_t: int) -> tuple[int, bool]:
    """``(budget, mask_now)`` after optimizer step ``step`` (from 1), as in peft's ``RankAllocator``.

    Full budget while ``step <= tinit``; cubic decay to ``b_target`` (floored to an integer) until
    ``total - tfinal``, masking every ``delta_t`` steps and always at ``total - tfinal``; then the
    target budget with the pattern fixed.
    """
    if step <= tinit:
        return b0, False
    if step > total - tfinal:
        return b_target, True
    progress = 1.0 - (step - tinit) / (total - tfinal - tinit)
    budget = int((b0 - b_target) * progress ** 3 + b_target)
    return budget, step % delta_t == 0 or step == total - tfinal


def ema_update(ibar: torch.Tensor, unc: torch.Tensor, ipt: torch.Tensor, beta1: float,
               beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed sensitivity and uncertainty: ``Ibar = b1 Ibar + (1-b1) I``, ``U = b2 U + (1-b2)|I - Ibar|``."""
    ibar = beta1 * ibar + (1 - beta1) * ipt
    unc = beta2 * unc + (1 - beta2) * (ipt - ibar).abs()
    return ibar, unc


def keep_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Triplets that survive: scores above the k-th smallest, ``k = len(scores) - budget`` (ties pruned)."""
    k = scores.numel() - budget
    if k < 1:
        raise ValueError(f"budget {budget} prunes nothing out of {scores.numel()} triplets")
    threshold = torch.kthvalue(scores, k).values
    return scores > threshold


@register("adalora", AdaLoraConfig)
def inject_adalora(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    return inject_linear_delta(model, config, lambda d_out, d_in: AdaLoraDelta(
        d_out, d_in, config.init_r, config.alpha, config.dropout))
