"""AdaLoRA's budget schedule inside a DeepSpeed step: importance from this rank's gradient and parameter
shards, one all-reduce of ``b0`` floats for the triplet scores, masks written into every copy of ``lam``.

The math (``budget_schedule``, ``ema_update``, ``keep_mask``, the delta itself) is
``peft_dist.adapters.adalora``; reading and writing ZeRO-3 shards is ``peft_dist.distributed.importance``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_dist.adapters.adalora import AdaLoraConfig, AdaLoraDelta, budget_schedule, ema_update, keep_mask
from peft_dist.adapters.base import AdaptedLinear
from peft_dist.distributed import importance
from peft_dist.distributed.zero3 import call_as_forward


class AdaLoraHook:
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
        self.keep = torch.ones(self.b0, dtype=torch.bool, device=self.device)
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

    @property
    def device(self) -> torch.device:
        """Where this rank's adapter tensors are now (the engine moves them after the hook is built): masks,
        scores and the all-reduced vector live there (NCCL reduces only accelerator tensors)."""
        return importance.local_device(self.deltas[0].lam)

    def params(self) -> list[tuple[nn.Parameter, str, int]]:
        """``(param, kind, offset of its matrix in the triplet vector)`` for every P, lam and Q."""
        return [(getattr(delta, kind), kind, offset) for delta, offset in zip(self.deltas, self._offsets())
                for kind in ("P", "lam", "Q")]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        penalty = sum(call_as_forward(delta, delta.orth_penalty) for delta in self.deltas)
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
        partial = torch.zeros(self.b0, dtype=torch.float32, device=self.device)
        if self._ibar is not None:
            for (param, kind, offset), ibar, unc in zip(self.params(), self._ibar, self._unc):
                importance.add_triplet_sums(partial, param, kind, offset, ibar * unc)
        self.bytes_reduced = importance.sum_over_shards(partial, [p for p, *_ in self.params()])
        return partial

    def _apply(self, keep: torch.Tensor) -> None:
        self.keep = keep = keep.to(self.device)
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
        device = self.device
        self.scores = (None if state["scores"] is None
                       else torch.tensor(state["scores"], dtype=torch.float32, device=device))
        params = [p for p, *_ in self.params()]
        if "ibar" in state:
            self._ibar = [importance.local_part(torch.tensor(t, device=device), p) for t, p in zip(state["ibar"], params)]
            self._unc = [importance.local_part(torch.tensor(t, device=device), p) for t, p in zip(state["unc"], params)]
        self.keep = torch.tensor(state["keep"], dtype=torch.bool, device=device)
        for delta, offset, r0 in zip(self.deltas, self._offsets(), self.ranks0):
            delta.rank_mask.copy_(self.keep[offset: offset + r0])


def make_adalora_hook(model: nn.Module, config: AdaLoraConfig, total_steps: int) -> AdaLoraHook:
    """The hook for every AdaLoRA delta named ``config.name`` in ``model`` (after injection)."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) and config.name in module.deltas:
            if isinstance(module.deltas[config.name], AdaLoraDelta):
                deltas[name] = module.deltas[config.name]
    return AdaLoraHook(deltas, config, total_steps)
