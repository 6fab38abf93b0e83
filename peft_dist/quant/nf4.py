"""Frozen 4-bit linear layers (NF4 or FP4 with one absmax per block of weights: QLoRA's base) through
bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit``, dequantized just in time.

The packed weight (two 4-bit codes a byte, ``uint8`` of shape ``(ceil(numel / 2), 1)`` as bitsandbytes
stores it), the float32 absmax of each block and, with double quantization, the 8-bit absmax with their
own float32 absmax, code and offset are ordinary frozen ``nn.Parameter``s: DeepSpeed ZeRO-3 partitions
and all-gathers them as bytes like any other parameter (about half a byte a weight plus the statistics).
The autograd function receives them as inputs, which is what lets ZeRO-3's hooks gather them again for
backward; it rebuilds bitsandbytes' ``QuantState`` from them, never saves a dequantized weight and never
forms a weight gradient.

bitsandbytes is imported where a 4-bit weight is (de)quantized, not with this module: its import adds about
45 MiB to every process's resident set, which an 8-bit base never uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peft_dist.quant.int8 import SCRATCH_ELEMENTS
from peft_dist.targets import float_linear

# quantize_4bit(compress_statistics=True) quantizes the block absmax (minus their mean, the offset) with
# its 8-bit dynamic code of 256 values, in blocks of 256.
NESTED_BLOCKSIZE = 256
NESTED_CODE_SIZE = 256


@dataclass(frozen=True)
class FourBitFormat:
    """What the packed parameters do not say themselves: the dense shape and how it was quantized."""

    shape: tuple[int, int]  # (d_out, d_in)
    quant_type: str  # nf4 or fp4
    blocksize: int


def dequantize(form: FourBitFormat, dtype: torch.dtype, weight: torch.Tensor, absmax: torch.Tensor,
               *nested: torch.Tensor) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight in ``dtype`` from the packed parameters (``nested``: the double-quant
    ``nested_absmax, nested_code, absmax_offset``), through bitsandbytes' ``dequantize_4bit``.

    Float statistics are passed as float32, as bitsandbytes keeps them: outside ZeRO-3 a DeepSpeed engine
    casts every floating-point parameter, these included, to the training precision."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state2 = offset = None
    if nested:
        nested_absmax, nested_code, offset = (t.float() for t in nested)
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    else:
        absmax = absmax.float()
    state = QuantState(absmax=absmax, shape=_block_rows(form), dtype=dtype, blocksize=form.blocksize,
                       quant_type=form.quant_type, offset=offset, state2=state2)
    return dequantize_4bit(weight, state).reshape(form.shape)


def _block_rows(form: FourBitFormat) -> torch.Size:
    """The shape ``dequantize_4bit`` is asked for: one block a row (one row when blocks do not tile the weight).

    Blocks run over the flattened weight. bitsandbytes 0.50's CPU kernel on AVX-512 machines starts a block
    at every row instead, so a ``(d_out, d_in)`` request dequantizes wrongly whenever a block crosses a row
    (e.g. ``d_in`` = 176 with blocks of 64: relative error 0.25 instead of 0.09). Rows of exactly one block
    agree on every backend and keep the kernel's parallelism over rows."""
    numel = form.shape[0] * form.shape[1]
    if numel % form.blocksize:
        return torch.Size([numel])
    return torch.Size([numel // form.blocksize, form.blocksize])


def quantize_4bit_in_chunks(weight: torch.Tensor, blocksize: int, quant_type: str,
                            double_quant: bool) -> list[torch.Tensor]:
    """bitsandbytes' ``quantize_4bit`` of ``weight``, as ``packed()`` orders the results, run over about
    ``SCRATCH_ELEMENTS`` weights (whole blocks) at a time: the same bytes, since blocks are independent and
    double quantization (the absmax minus their mean, in blocks of 256) runs once over all of them.

    Whole, its CPU implementation made about six float32 copies of the weight: quantizing a 4096 x 11008 bf16
    weight raised a loading rank's peak resident set by 604 MiB, in chunks by 48 MiB, at the same speed
    (docs/BENCHMARKS.md)."""
    from bitsandbytes.functional import quantize_4bit, quantize_blockwise

    flat = weight.reshape(-1)
    chunk = max(1, SCRATCH_ELEMENTS // blocksize) * blocksize
    packed, absmax = [], []
    for start in range(0, flat.numel(), chunk):
        codes, state = quantize_4bit(flat[start:start + chunk], blocksize=blocksize, compress_statistics=False,
                                     quant_type=quant_type)
        packed.append(codes)
        absmax.append(state.absmax)
    packed, absmax = torch.cat(packed), torch.cat(absmax)
    if not double_quant:
        return [packed, absmax]
    offset = absmax.mean()  # quantize_4bit(compress_statistics=True)'s own steps
    nested, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return [packed, nested, state2.absmax, state2.code, offset]


class FourBitMatmulFunction(torch.autograd.Function):
    """``y = x W^T`` with ``W`` dequantized from the packed parameters in ``x``'s dtype; backward
    dequantizes again and returns only ``grad_x = grad_y W``: nothing of the weight's size is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, form: FourBitFormat, weight: torch.Tensor, absmax: torch.Tensor,
                *nested: torch.Tensor) -> torch.Tensor:
        ctx.form = form
        ctx.save_for_backward(weight, absmax, *nested)
        return nn.functional.linear(x, dequantize(form, x.dtype, weight, absmax, *nested))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = dequantize(ctx.form, grad_y.dtype, *ctx.saved_tensors)
        if grad_y.dtype != torch.float32:
            # The GEMM then reads W in the forward's layout: CPUs without native bf16/fp16 run the other
            # layout about 30x slower (docs/BENCHMARKS.md); one copy of the weight costs far less.
            w = w.t().contiguous().t()
        return grad_y @ w, None, *(None for _ in ctx.saved_tensors)


def _frozen(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


class FourBitLinear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (NF4 or FP4) with one absmax per block.

    ``dtype`` is the model's floating-point dtype: that of the bias, of the dequantized weight and of the
    adapters put on this layer; the block statistics stay float32 whatever it is, as in bitsandbytes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.form = FourBitFormat((out_features, in_features), quant_type, blocksize)
        numel = in_features * out_features
        blocks = math.ceil(numel / blocksize)
        self.weight = _frozen((math.ceil(numel / 2), 1), torch.uint8, device)
        self.absmax = _frozen((blocks,), torch.uint8 if double_quant else torch.float32, device)
        self.nested_absmax = self.nested_code = self.absmax_offset = None
        if double_quant:
            self.nested_absmax = _frozen((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32, device)
            self.nested_code = _frozen((NESTED_CODE_SIZE,), torch.float32, device)
            self.absmax_offset = _frozen((1,), torch.float32, device)
        self.bias = _frozen((out_features,), dtype, device) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = False,
                    dtype: torch.dtype = torch.float32) -> "FourBitLinear":
        """Quantize a dense ``(d_out, d_in)`` weight; ``bias`` is kept in ``dtype``. A meta ``weight`` (dry
        runs) gives the layer's shapes only."""
        d_out, d_in = weight.shape
        layer = cls(d_in, d_out, bias is not None, quant_type, blocksize, double_quant, dtype, weight.device)
        if not weight.is_meta:
            layer.load_weight(weight)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense ``(d_out, d_in)`` weight into this layer's parameters, in place (the streaming
        loader fills layers built on the meta device), in the weight's own dtype as bitsandbytes' Linear4bit
        does, with the same bytes as its ``quantize_4bit`` (``quantize_4bit_in_chunks``)."""
        values = quantize_4bit_in_chunks(weight.detach().contiguous(), self.form.blocksize, self.form.quant_type,
                                         double_quant=self.nested_absmax is not None)
        for param, value in zip(self.packed(), values, strict=True):
            param.copy_(value.reshape(param.shape))  # reshape, not broadcast: a size mismatch raises

    def packed(self) -> list[nn.Parameter]:
        """The quantized weight's parameters, in ``dequantize``'s argument order."""
        nested = [self.nested_absmax, self.nested_code, self.absmax_offset] if self.nested_absmax is not None else []
        return [self.weight, self.absmax, *nested]

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.form, self.dtype, *self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = FourBitMatmulFunction.apply(x, self.form, *self.packed())
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def to_linear(self) -> nn.Linear:
        """A frozen float ``nn.Linear`` holding the dequantized weight (used for merging and export)."""
        return float_linear(self)

    def extra_repr(self) -> str:
        double = ", double quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.form.quant_type} "
                f"4-bit, blocksize {self.form.blocksize}{double}")
