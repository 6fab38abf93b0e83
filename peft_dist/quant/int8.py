"""Frozen 8-bit linear layers and embeddings: row-wise absmax int8 weights, dequantized just in time.

The int8 weight and its per-row scale are ordinary frozen ``nn.Parameter``s, so DeepSpeed ZeRO-3
partitions and all-gathers them like any other parameter (as int8: half the bytes of bf16). The
autograd function receives them as inputs, which is what lets ZeRO-3's hooks gather them again for
backward; it never saves a dequantized weight and never forms a weight gradient.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peft_dist.targets import float_linear


# The matmuls' cast or transposed copies work through a weight this many elements at a time (64 MiB of
# float32), so that a large output head (Llama-2's: 131M elements) adds tens of MiB of temporaries, not copies
# of the whole tensor.
BLOCK_ELEMENTS = 1 << 24
# Quantization and its error report, elementwise passes over every weight at load time, go through one reused
# float32 block of this many elements (4 MiB, cache-sized): fresh 64 MiB temporaries cost more in page faults
# than in arithmetic (a 4096 x 11008 bf16 weight on one thread: 0.92 s -> 0.15 s for both; docs/BENCHMARKS.md).
SCRATCH_ELEMENTS = 1 << 20


def index_blocks(count: int, elements_per_index: int, block_elements: int | None = None) -> list[slice]:
    """Consecutive ranges of ``count`` indices, each range about ``block_elements`` (``BLOCK_ELEMENTS``)
    elements (at least one index) and a multiple of 8 indices where it can be: the packed int8 kernel takes
    only such widths."""
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(1, elements_per_index))
    step -= step % 8 if step >= 8 else 0
    return [slice(start, start + step) for start in range(0, count, step)]


def row_blocks(weight: torch.Tensor, block_elements: int | None = None) -> list[slice]:
    """``index_blocks`` over the rows of a ``(d_out, d_in)`` weight."""
    return index_blocks(weight.shape[0], weight.shape[1], block_elements)


class BlockCopies:
    """Contiguous copies of one product's weight blocks (cast, or transposed as int8), in one buffer per dtype
    reused from block to block: on the CPU a fresh copy per block is a fresh mapping that the kernel zeroes
    first, which cost more than the cast itself (docs/BENCHMARKS.md). A copy is valid until the next one in its
    dtype."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.numel() < block.numel():
            buffer = self.buffers[dtype] = torch.empty(block.numel(), dtype=dtype, device=block.device)
        return buffer[: block.numel()].view(block.shape).copy_(block)


def float32_row_blocks(*weights: torch.Tensor) -> Iterator[tuple[slice, ...]]:
    """``(rows, weights[0][rows], weights[1][rows], ...)`` in float32, for blocks of about ``SCRATCH_ELEMENTS``
    of weights of one shape, each weight's block copied into its own ``BlockCopies`` buffer: a block is valid
    (and may be changed in place) until the next one is drawn. Inside, only in-place operations and row-sized
    reductions avoid fresh weight-block temporaries (``w.abs()`` alone costs 40x ``w.abs_()`` in page faults)."""
    copies = [BlockCopies() for _ in weights]
    for rows in row_blocks(weights[0], SCRATCH_ELEMENTS):
        yield rows, *(copy(w[rows], torch.float32) for copy, w in zip(copies, weights))


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a ``(d_out, d_in)`` weight.

    Returns ``(w8, scale)`` with ``weight ~= w8 * scale[:, None]`` and ``scale = absmax_row / 127``
    (bitsandbytes' vector-wise scheme; computed here in float32 so it is exact and device-agnostic).
    bitsandbytes' ``int8_vectorwise_quant`` is this scheme but rounds ``127 / absmax * w`` in the weight's own
    dtype (on 1M Gaussian weights, CPU: 3 codes differ by one in fp32, 320 in bf16) and divides by zero on
    an all-zero row, so we keep ours (``tests/unit/test_int8.py`` holds the two within one code). Rows are
    independent, so it runs over ``float32_row_blocks``: one small float32 block, not a copy of the weight.
    """
    w8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    if weight.is_meta:  # a skeleton's layer (the streaming loader, the planner): shapes only, no block loop
        return w8, scale
    for rows, w in float32_row_blocks(weight.detach()):
        absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())
        scale[rows] = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        w8[rows] = w.div_(scale[rows, None]).round_().clamp_(-127, 127)
    return w8, scale


def dequantize_rowwise(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w8.to(dtype).mul_(scale.to(dtype)[:, None])  # in place: one weight-sized tensor, not two


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (avx512_bf16 or AMX). Elsewhere bf16 GEMMs are emulated
    and one of the two layouts of ``x @ W`` runs about 30x slower than the other."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def packed_kernel_applies(x: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` (weight-only int8 GEMM, one scale per output row) serves this
    product: bf16 activations on a CPU that emulates bf16, output rows a multiple of 8 and the summed (input)
    dimension a multiple of 16. Other shapes crash torch 2.13's CPU kernel, or on AVX-512 CPUs return wrong
    values (inf, nan or off by orders of magnitude: measured with 40, 56, 120 and 4104 inputs). Measured
    (docs/BENCHMARKS.md): 3x the cast path's forward where bf16 is emulated; 2.5-3x slower than it on a CPU
    with native bf16, and in fp32 or fp16 many times slower than a dense GEMM, so those keep the cast path."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16_cpu()
            and w8.shape[0] % 8 == 0 and w8.shape[1] % 16 == 0)


def _by_output_blocks(x: torch.Tensor, width: int, blocks: list[slice],
                      compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """The ``(..., width)`` product ``compute`` gives block by block of its last dimension, in ``x``'s dtype
    and device; one block is returned as computed (no copy into a fresh output)."""
    if len(blocks) == 1:
        return compute(blocks[0])
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    for block in blocks:
        out[..., block] = compute(block)
    return out


def int8_matmul(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x W^T`` for ``W = diag(scale) w8``, in ``x``'s dtype. Outside the packed kernel, computed for a block
    of output rows at a time, so the weight's cast copy is one block's (``row_blocks``)."""
    if packed_kernel_applies(x, w8):
        return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w8, scale.to(x.dtype)).reshape(
            *x.shape[:-1], w8.shape[0])
    copies = BlockCopies()
    return _by_output_blocks(x, w8.shape[0], row_blocks(w8),
                             lambda rows: _product_rows(x, w8[rows], scale[rows], copies))


def _product_rows(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, copies: BlockCopies) -> torch.Tensor:
    """``x W^T`` through a cast of ``w8``. fp16: the scale goes on the weight before the GEMM: ``x w8^T`` alone is
    ``127 / absmax`` times the true output and overflows fp16's range where a plain fp16 linear does not.
    Other dtypes scale the ``(tokens, d_out)`` product (one pass, no weight-sized temporary besides the cast).
    """
    cast = copies(w8, x.dtype)
    if x.dtype == torch.float16:
        return x @ cast.mul_(scale.to(x.dtype)[:, None]).t()
    return (x @ cast.t()).mul_(scale.to(x.dtype))  # in place: one (tokens, d_out) pass


def int8_matmul_input_grad(grad_y: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad_y W`` for ``W = diag(scale) w8``: the input gradient, range-safe in every dtype (its partial
    sums are those of the true product). Computed for a block of input columns at a time, so the weight's
    transposed or cast copy is one block's (each output element is still one whole dot product)."""
    scaled = grad_y * scale.to(grad_y.dtype)
    copies = BlockCopies()
    return _by_output_blocks(grad_y, w8.shape[1], index_blocks(w8.shape[1], w8.shape[0]),
                             lambda cols: _input_grad_columns(scaled, w8[:, cols], copies))


def _input_grad_columns(scaled: torch.Tensor, w8: torch.Tensor, copies: BlockCopies) -> torch.Tensor:
    """``scaled @ w8`` in ``scaled``'s dtype. In 16-bit the weight is transposed as int8 first, so that the
    GEMM reads it in the forward's layout: CPUs without native bf16/fp16 run the untransposed 16-bit GEMM
    about 30x slower (measured, docs/BENCHMARKS.md); fp32, and bf16 on a CPU with native bf16, keep the
    plain product."""
    plain_is_fast = scaled.dtype == torch.float32 or (
        scaled.dtype == torch.bfloat16 and scaled.device.type == "cpu" and native_bf16_cpu())
    if plain_is_fast:
        return scaled @ copies(w8, scaled.dtype)
    w8_t = copies(w8.t(), torch.int8)  # (d_in, d_out), one byte an element
    if packed_kernel_applies(scaled, w8_t):
        ones = torch.ones(w8_t.shape[0], dtype=scaled.dtype, device=scaled.device)
        return torch._weight_int8pack_mm(scaled.reshape(-1, scaled.shape[-1]), w8_t, ones).reshape(
            *scaled.shape[:-1], w8_t.shape[0])
    return scaled @ copies(w8_t, scaled.dtype).t()


class Int8MatmulFunction(torch.autograd.Function):
    """``y = x W^T`` with ``W = diag(scale) w8``; backward returns only ``grad_x = grad_y W``; nothing of
    the weight's size is kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w8, scale)
        return int8_matmul(x, w8, scale)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w8, scale = ctx.saved_tensors
        return int8_matmul_input_grad(grad_y, w8, scale), None, None


class RowwiseInt8(nn.Module):
    """What the int8 linear and embedding share: a frozen ``weight`` of int8 rows, each with its float
    ``weight_scale`` (in ``dtype``)."""

    def __init__(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, columns, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(rows, dtype=dtype, device=device), requires_grad=False)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense 2-D weight into this module's parameters, in place (the streaming loader fills
        modules built on the meta device)."""
        w8, scale = quantize_rowwise(weight)
        self.weight.copy_(w8)
        self.weight_scale.copy_(scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rowwise(self.weight, self.weight_scale, self.weight_scale.dtype)


class Int8Linear(RowwiseInt8):
    """A frozen linear layer whose weight is stored in int8 with one floating-point scale per row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(out_features, in_features, dtype, device)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> "Int8Linear":
        """Quantize a dense ``(d_out, d_in)`` weight; ``bias`` and the scales are kept in ``dtype``."""
        d_out, d_in = weight.shape
        layer = cls(d_in, d_out, bias=bias is not None, dtype=dtype, device=weight.device)
        layer.load_weight(weight)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Int8MatmulFunction.apply(x, self.weight, self.weight_scale)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def to_linear(self) -> nn.Linear:
        """A frozen float ``nn.Linear`` holding the dequantized weight (used for merging and export)."""
        return float_linear(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 row-wise"


class Int8Embedding(RowwiseInt8):
    """A frozen token (or position) embedding stored in int8 with one floating-point scale per row. A lookup
    reads the rows it needs and their scales, so nothing of the table's size is dequantized; under ZeRO-3
    each rank gathers half the bytes of a 16-bit table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx

    @classmethod
    def from_weight(cls, weight: torch.Tensor, padding_idx: int | None = None,
                    dtype: torch.dtype = torch.float32) -> "Int8Embedding":
        """Quantize a dense ``(num_embeddings, embedding_dim)`` table; the scales are kept in ``dtype``."""
        table = cls(*weight.shape, padding_idx=padding_idx, dtype=dtype, device=weight.device)
        table.load_weight(weight)
        return table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype) * F.embedding(ids, self.weight_scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 row-wise"
