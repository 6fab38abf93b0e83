"""AdaLoRA: an SVD-form low-rank update whose rank budget is reallocated during training.

Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (arXiv:2303.10512);
reference code QingruZhang/AdaLoRA, and peft's ``RankAllocator``.

``delta W = P diag(lam) Q * alpha / r0``. Each triplet ``(P[:, i], lam[i], Q[i, :])`` gets an importance
score (smoothed sensitivity ``|theta * grad|`` times its uncertainty); on schedule the lowest-scoring
triplets over all matrices have ``lam`` set to zero until ``target_r * #matrices`` remain. The budget
math here is pure; reading and writing ZeRO-3 shards lives in ``peft_dist.distributed.importance``.
See docs/ADALORA.md for how this runs inside a DeepSpeed step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_dist.adapters.base import AdaptedLinear, AdapterConfig, AdapterModule, TrainHook
from peft_dist.adapters.inject import inject_linear_delta
from peft_dist.adapters.registry import register
from peft_dist.config.schema import TrainConfig, require
from peft_dist.distributed import importance


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
    """``P diag(lam) Q * alpha / r0`` for one linear layer; ``rank_mask`` marks the live triplets.

    Calling the module with no input returns its orthogonality penalty: computing it inside a module
    call lets ZeRO-3's hooks gather P and Q for it and gather them again for its backward.
    """

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

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            return self.orth_penalty()
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


# ---- the per-step hook ----------------------------------------------------------------------------

class AdaLoraHook(TrainHook):
    """Runs AdaLoRA's schedule inside the trainer; its step counter is the optimizer step.

    ``before_step`` (accumulation boundary, gradients reduced, not applied) keeps this rank's gradient
    shards; ``after_step`` scores them against the post-step parameter shards, once per optimizer
    step, and masks ``lam`` on schedule after one all-reduce of ``b0`` floats. ``engine=None`` means a
    plain PyTorch loop whose ``p.grad`` is already clipped.
    """

    def __init__(self, deltas: dict[str, AdaLoraDelta], config: AdaLoraConfig, total_steps: int) -> None:
        self.config = config
        self.names = list(deltas)
        self.deltas = list(deltas.values())
        self.total = config.total_step or total_steps
        self.ranks0 = [d.lam.shape[0] for d in self.deltas]
        self.b0 = sum(self.ranks0)
        self.b_target = config.target_r * len(self.deltas)
        self.keep = torch.ones(self.b0, dtype=torch.bool)
        self.scores: torch.Tensor | None = None  # last triplet scores, identical on every rank
        self.budget = self.b0
        self.history: list[dict[str, Any]] = []  # {step, budget, ranks} of every mask step
        self.updates = 0  # importance updates so far: one per optimizer step
        self.bytes_reduced = 0  # bytes all-reduced at the last mask step
        self._ibar: list[torch.Tensor] | None = None
        self._unc: list[torch.Tensor] | None = None
        self._grads: list[torch.Tensor] | None = None
        self._norm_before: float | None = None
        self._last_step = 0

    def params(self) -> list[tuple[nn.Parameter, str, int]]:
        """``(param, kind, offset of its matrix in the triplet vector)`` for every P, lam and Q."""
        return [(getattr(delta, kind), kind, offset) for delta, offset in zip(self.deltas, self._offsets())
                for kind in ("P", "lam", "Q")]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        penalty = sum(delta() for delta in self.deltas)  # module calls: see AdaLoraDelta
        return self.config.orth_reg_weight * penalty / (2 * len(self.deltas))

    def _updating(self, step: int) -> bool:
        return step < self.total - self.config.tfinal  # scores freeze when the final pattern is fixed

    @torch.no_grad()
    def before_step(self, engine: Any, step: int) -> None:
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            raise RuntimeError("AdaLoraHook.before_step must run only at the gradient accumulation boundary")
        if self._updating(step):
            scale = importance.loss_scale(engine)
            self._grads = [importance.read_grad(p) / scale for p, *_ in self.params()]
            self._norm_before = importance.grad_norm_before_step(engine)

    @torch.no_grad()
    def after_step(self, engine: Any, step: int) -> None:
        if step <= self._last_step:
            raise RuntimeError(f"AdaLoraHook.after_step called twice for step {step}; once per optimizer step")
        self._last_step = step
        if self._updating(step):
            if self._grads is None:
                raise RuntimeError(f"AdaLoraHook.before_step was not called before optimizer step {step}")
            self._update_importance(importance.clip_factor(engine, self._norm_before))
        budget, mask_now = budget_schedule(step, self.b0, self.b_target, self.config.tinit,
                                           self.config.tfinal, self.total, self.config.delta_t)
        if step > self.total - self.config.tfinal:
            self._apply(self.keep)  # pattern fixed: re-applied every step so pruned lam stay zero
        elif mask_now:
            self.scores = self.triplet_scores()
            self.budget = budget
            self._apply(keep_mask(self.scores, budget))
            self.history.append({"step": step, "budget": budget, "ranks": self.rank_pattern()})

    def _update_importance(self, factor: float) -> None:
        values = [importance.read_param(p) for p, *_ in self.params()]
        if self._ibar is None:
            self._ibar = [torch.zeros_like(v) for v in values]
            self._unc = [torch.zeros_like(v) for v in values]
        for i, (value, grad) in enumerate(zip(values, self._grads)):
            self._ibar[i], self._unc[i] = ema_update(self._ibar[i], self._unc[i], (value * grad * factor).abs(),
                                                     self.config.beta1, self.config.beta2)
        self._grads = None
        self.updates += 1

    def triplet_scores(self) -> torch.Tensor:
        """``S_i = s(lam_i) + mean_j s(Q_ij) + mean_k s(P_ki)`` over all matrices (a collective under ZeRO-3)."""
        partial = torch.zeros(self.b0, dtype=torch.float32)
        if self._ibar is not None:
            for (param, kind, offset), ibar, unc in zip(self.params(), self._ibar, self._unc):
                importance.add_triplet_sums(partial, param, kind, offset, ibar * unc)
        self.bytes_reduced = importance.sum_over_shards(partial, [p for p, *_ in self.params()])
        return partial

    def _apply(self, keep: torch.Tensor) -> None:
        self.keep = keep
        for delta, offset, r0 in zip(self.deltas, self._offsets(), self.ranks0):
            importance.write_lam_mask(delta.lam, keep[offset: offset + r0])
            delta.rank_mask.copy_(keep[offset: offset + r0])

    def _offsets(self) -> list[int]:
        return [sum(self.ranks0[:i]) for i in range(len(self.ranks0))]

    def rank_pattern(self) -> dict[str, int]:
        spans = zip(self.names, self._offsets(), self.ranks0)
        return {name: int(self.keep[offset: offset + r0].sum()) for name, offset, r0 in spans}

    def metrics(self) -> dict[str, float]:
        prefix = self.config.name
        out = {f"{prefix}/budget": float(self.budget), f"{prefix}/rank_total": float(self.keep.sum()),
               f"{prefix}/allreduce_bytes": float(self.bytes_reduced)}
        out.update({f"{prefix}/rank/{name}": float(r) for name, r in self.rank_pattern().items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state and the importance EMAs gathered whole (world-size independent), so a
        resumed run continues exactly. A collective: every rank must call it."""
        return {"step": self._last_step, "updates": self.updates, "budget": self.budget,
                "keep": self.keep.tolist(), "history": list(self.history),
                "scores": None if self.scores is None else self.scores.tolist(), **self.importance_state()}

    def importance_state(self) -> dict[str, list[list[float]]]:
        """The EMA tensors gathered whole (world-size independent). A collective: every rank must call it."""
        if self._ibar is None:
            return {}
        params = [p for p, *_ in self.params()]
        return {key: [importance.gather_full(t, p).tolist() for t, p in zip(tensors, params)]
                for key, tensors in (("ibar", self._ibar), ("unc", self._unc))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after the engine is built; ``ibar``/``unc`` from ``importance_state`` are optional."""
        self._last_step, self.updates, self.budget = state["step"], state["updates"], state["budget"]
        self.history = list(state["history"])
        self.scores = None if state["scores"] is None else torch.tensor(state["scores"], dtype=torch.float32)
        params = [p for p, *_ in self.params()]
        if "ibar" in state:
            self._ibar = [importance.local_part(torch.tensor(t), p) for t, p in zip(state["ibar"], params)]
            self._unc = [importance.local_part(torch.tensor(t), p) for t, p in zip(state["unc"], params)]
        self.keep = torch.tensor(state["keep"], dtype=torch.bool)
        for delta, offset, r0 in zip(self.deltas, self._offsets(), self.ranks0):
            delta.rank_mask.copy_(self.keep[offset: offset + r0])


def make_hook(model: nn.Module, config: AdaLoraConfig, total_steps: int) -> AdaLoraHook:
    """The hook for every AdaLoRA delta named ``config.name`` in ``model`` (after injection)."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) and config.name in module.deltas:
            if isinstance(module.deltas[config.name], AdaLoraDelta):
                deltas[name] = module.deltas[config.name]
    return AdaLoraHook(deltas, config, total_steps)


@register("adalora", AdaLoraConfig, make_hook=make_hook)
def inject_adalora(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    return inject_linear_delta(model, config, lambda d_out, d_in: AdaLoraDelta(
        d_out, d_in, config.init_r, config.alpha, config.dropout))
