"""KronA: a Kronecker-product weight update, ``delta W = s * kron(A, B)`` (Edalati et al., 2022,
arXiv:2212.10650).

``d_out = a1 * b1`` and ``d_in = a2 * b2``; ``A: (a1, a2)``, ``B: (b1, b2)``. The factor shapes default to
the most nearly square divisor pair of each dimension (4096 -> 64 x 64, 11008 -> 86 x 128), so the update
has full rank ``rank(A) * rank(B)`` for only ``a1*a2 + b1*b2`` parameters.

The forward never builds the ``(d_out, d_in)`` product: with ``X = x.reshape(..., a2, b2)``,
``y = s * (A X B^T).reshape(..., d_out)``, which is ``x kron(A, B)^T`` at ``O(d^1.5)`` per token instead
of ``O(d^2)`` plus the cost of materializing the product on every step (what peft's LoKr does).
``A`` starts at zero (the paper found one zero factor clearly better than two random ones) and ``B``
Kaiming-uniform, so the model is unchanged at step 0. The Kronecker math lives in ``kron_apply`` and
``KronaDelta`` and is reused by the KronA^B block adapter in ``bottleneck.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peft_dist.adapters.base import AdapterConfig, AdapterModule
from peft_dist.adapters.inject import inject_linear_delta
from peft_dist.adapters.registry import register
from peft_dist.config.schema import ConfigError, require


@dataclass
class KronaConfig(AdapterConfig):
    """a1, a2: rows and columns of the small factor ``A`` (0 = choose the balanced factorization of
    ``d_out`` and ``d_in``); they must divide every targeted layer's ``d_out`` / ``d_in``.
    scale: the fixed multiplier ``s`` of the update."""

    a1: int = 0
    a2: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.a1 >= 0 and self.a2 >= 0, "a1",
                f"got a1={self.a1}, a2={self.a2}; use positive divisors of d_out / d_in, or 0 for automatic")
        require(self.scale != 0, "scale", "must be non-zero (a zero scale trains nothing)")


def balanced_factors(n: int) -> tuple[int, int]:
    """``(a, n // a)`` with ``a`` the largest divisor of ``n`` not above ``sqrt(n)``."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def factor_dim(n: int, fixed: int, key: str, where: str) -> tuple[int, int]:
    """Split dimension ``n`` into ``(a, b)``; ``fixed`` > 0 is the user's ``a``. Raises ``ConfigError`` when
    ``fixed`` does not divide ``n`` or when an automatic split degenerates (``n`` prime: only ``1 x n``)."""
    if fixed:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        require(n % fixed == 0, key, f"{fixed} does not divide {n} ({where}); use one of {divisors[:16]}")
        return fixed, n // fixed
    a, b = balanced_factors(n)
    if a == 1 and n > 1:
        raise ConfigError(f"{key}: {n} ({where}) is prime, so it only factors as 1 x {n} and KronA would "
                          f"degenerate to a dense {n}-wide factor; set {key}: 1 explicitly to accept that, "
                          "or leave this layer out of target_modules")
    return a, b


def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x @ kron(A, B).T`` without forming the product: ``X = x.reshape(-1, a2, b2)``, ``A X B^T``."""
    a1, a2 = A.shape
    b1, b2 = B.shape
    X = x.reshape(-1, a2, b2)
    Y = A @ (X @ B.t())  # (tokens, a1, b1)
    return Y.reshape(*x.shape[:-1], a1 * b1)


class KronaDelta(AdapterModule):
    """``y = s * x kron(A, B)^T`` for a ``(d_out, d_in)`` layer, ``A`` zero-initialized."""

    mergeable = True

    def __init__(self, d_out: int, d_in: int, a1: int, a2: int, scale: float) -> None:
        super().__init__()
        require(d_out % a1 == 0 and d_in % a2 == 0, "a1",
                f"A of shape ({a1}, {a2}) does not tile a ({d_out}, {d_in}) weight")
        self.A = nn.Parameter(torch.zeros(a1, a2))
        self.B = nn.Parameter(torch.empty(d_out // a1, d_in // a2))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x.to(self.A.dtype), self.A, self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.A, self.B) * self.scale

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, scale={self.scale}"


def make_krona_delta(config: KronaConfig, d_out: int, d_in: int, where: str) -> KronaDelta:
    """A ``KronaDelta`` for one layer, with the factor shapes validated against its dimensions."""
    a1, _ = factor_dim(d_out, config.a1, "a1", f"d_out of {where}")
    a2, _ = factor_dim(d_in, config.a2, "a2", f"d_in of {where}")
    return KronaDelta(d_out, d_in, a1, a2, config.scale)


@register("krona", KronaConfig)
def inject_krona(model: nn.Module, config: KronaConfig) -> list[str]:
    def make(d_out: int, d_in: int) -> KronaDelta:
        try:
            return make_krona_delta(config, d_out, d_in, f"a ({d_out}, {d_in}) layer")
        except ConfigError as err:
            raise ConfigError(f"adapters[{config.name}].{err}") from None

    return inject_linear_delta(model, config, make)
