"""The frozen int8 linear against float64 references and bitsandbytes' vector-wise quantization."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.quant import Int8Linear, quantize_linear, quantize_model, quantize_rowwise
from peft_dist.quant.loader import build_model
from peft_dist.config import ModelConfig, ConfigError


def test_rowwise_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scales
    w8, scale = quantize_rowwise(w)
    assert w8.dtype == torch.int8 and scale.shape == (64,)
    error = (w - w8.float() * scale[:, None]).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert w8.abs().amax(dim=1).eq(127).all()  # absmax maps to +-127 in every row


def test_quantizing_in_row_blocks_changes_nothing_but_the_temporaries(monkeypatch):
    """Quantization and its error report go through a weight a few rows at a time, in one reused float32
    block (bounded temporaries for a large head): the codes, scales and error equal the one-block result,
    and the caller's weight is left as it was."""
    import peft_dist.quant.int8 as int8
    from peft_dist.quant.model import quantization_error

    torch.manual_seed(3)
    w = torch.randn(37, 48) * torch.logspace(-2, 1, 37)[:, None]
    original = w.clone()
    whole, whole_scale = quantize_rowwise(w)
    layer = Int8Linear.from_weight(w, None)
    whole_error = quantization_error("w", w, layer)
    monkeypatch.setattr(int8, "SCRATCH_ELEMENTS", 5 * 48)  # 5 rows a block: 8 blocks, the last of 2 rows
    assert [block.shape[0] for _, block in int8.float32_row_blocks(w)] == [5] * 7 + [2]
    blocks, blocks_scale = quantize_rowwise(w)
    assert torch.equal(blocks, whole) and torch.equal(blocks_scale, whole_scale)
    assert torch.equal(w, original)
    error = quantization_error("w", w, layer)
    direct = w - layer.dequantized_weight()
    assert error.rel_error == pytest.approx(whole_error.rel_error, rel=1e-6)
    assert error.rel_error == pytest.approx((direct.norm() / w.norm()).item(), rel=1e-5)
    assert error.max_abs_error == direct.abs().max().item()


def test_block_copies_reuse_one_buffer_per_dtype():
    """A product casts each weight block into the buffer its first (largest) block made, and transposes into one
    int8 buffer: a fresh copy per block had cost more in page faults than the cast (docs/BENCHMARKS.md)."""
    import peft_dist.quant.int8 as int8

    copies = int8.BlockCopies()
    w8 = torch.randint(-127, 128, (20, 16), dtype=torch.int8)
    first = copies(w8[:8], torch.bfloat16)
    assert torch.equal(first, w8[:8].to(torch.bfloat16))
    pointer = first.data_ptr()
    last = copies(w8[16:], torch.bfloat16)
    assert last.data_ptr() == pointer and torch.equal(last, w8[16:].to(torch.bfloat16))
    transposed = copies(w8[:, :8].t(), torch.int8)
    assert transposed.is_contiguous() and torch.equal(transposed, w8[:, :8].t())
    assert transposed.data_ptr() != pointer


def test_quantizing_a_skeleton_layer_runs_no_block_loop(monkeypatch):
    """The loader and the planner quantize layers of a model built on the meta device: shapes only. The block
    loop there cost a 7B load 9 s of meta operations on every rank (4 MiB blocks: 43 a 4096 x 11008 weight)."""
    import peft_dist.quant.int8 as int8

    def no_blocks(*weights):
        raise AssertionError("a meta weight went through the block loop")

    monkeypatch.setattr(int8, "float32_row_blocks", no_blocks)
    w8, scale = quantize_rowwise(torch.empty(11008, 4096, dtype=torch.bfloat16, device="meta"))
    assert (w8.is_meta, w8.dtype, w8.shape, scale.shape) == (True, torch.int8, (11008, 4096), (11008,))


@pytest.mark.parametrize("native_bf16", [False, True], ids=["bf16-emulated", "bf16-native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_input_gradient_in_column_blocks_equals_the_whole_product(monkeypatch, dtype, native_bf16):
    """A large weight's input gradient goes through a block of input columns at a time (the transposed int8
    copy of one block, not of the whole head), and its forward outside the packed kernel through a block of
    output rows (the cast of one block); every output element is the same dot product. Widths stay
    multiples of 8 (and the summed dimension of 16), so bf16 on a CPU that emulates it keeps the packed kernel
    in every block; with native bf16, the plain product."""
    import peft_dist.quant.int8 as int8

    monkeypatch.setattr(int8, "native_bf16_cpu", lambda: native_bf16)
    torch.manual_seed(4)
    w8, scale = quantize_rowwise(torch.randn(48, 64))
    grad_y = torch.randn(3, 5, 48).to(dtype)
    whole = int8.int8_matmul_input_grad(grad_y, w8, scale)
    monkeypatch.setattr(int8, "BLOCK_ELEMENTS", 20 * 48)  # 20 columns a block, rounded down to 16
    assert int8.index_blocks(64, 48) == [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)]
    blocks = int8.int8_matmul_input_grad(grad_y, w8, scale)
    assert blocks.dtype == dtype and blocks.shape == whole.shape
    torch.testing.assert_close(blocks, whole, rtol=0, atol=0)
    x = torch.randn(3, 5, 64).to(dtype)  # the forward outside the packed kernel: blocks of 8 output rows
    monkeypatch.setattr(int8, "packed_kernel_applies", lambda x, w8: False)
    assert len(int8.row_blocks(w8)) == 6
    blocks = int8.int8_matmul(x, w8, scale)
    monkeypatch.setattr(int8, "BLOCK_ELEMENTS", 1 << 24)
    torch.testing.assert_close(blocks, int8.int8_matmul(x, w8, scale))  # fp32 GEMMs may sum in another order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_embedding_looks_up_its_dequantized_rows(dtype):
    """A lookup scales the int8 rows it reads: exactly the dequantized table's rows (in fp32 within half a step
    of the float64 table), and the parameter summary counts the table's weights once."""
    from peft_dist.quant import Int8Embedding
    from peft_dist.tracking.run_info import parameter_summary

    torch.manual_seed(5)
    table = torch.randn(50, 16, dtype=torch.float64) * torch.logspace(-2, 1, 50, dtype=torch.float64)[:, None]
    embedding = Int8Embedding.from_weight(table, padding_idx=0, dtype=dtype)
    ids = torch.randint(0, 50, (3, 7))
    looked_up = embedding(ids)
    assert looked_up.dtype == dtype and looked_up.shape == (3, 7, 16)
    torch.testing.assert_close(looked_up, embedding.dequantized_weight()[ids], rtol=0, atol=0)
    if dtype == torch.float32:  # bf16 also rounds the scale and the product
        step = embedding.weight_scale.double()[ids][..., None]
        assert ((looked_up.double() - table[ids]).abs() <= step / 2 + 1e-6).all()
    assert parameter_summary(embedding)["total"] == 50 * 16


def test_matches_bitsandbytes_vectorwise_quantization():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    w = torch.randn(32, 40)
    w8, scale = quantize_rowwise(w)
    bnb_w8, bnb_absmax, _ = bnb.functional.int8_vectorwise_quant(w.clone())
    torch.testing.assert_close(scale * 127, bnb_absmax)
    assert (w8.int() - bnb_w8.int()).abs().max() <= 1  # rounding of exact halves may differ
    assert (w8 != bnb_w8).float().mean() < 0.01


def test_forward_and_input_gradient_match_float64_reference():
    torch.manual_seed(2)
    dense = nn.Linear(24, 16)
    layer = quantize_linear(dense, torch.float32)
    w = layer.dequantized_weight().double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x.float())
    y_ref = x @ w.t() + dense.bias.double()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn_like(y_ref)
    (grad_x,) = torch.autograd.grad(y_ref, x, grad_y)
    x32 = x.detach().float().requires_grad_()
    layer(x32).backward(grad_y.float())
    torch.testing.assert_close(x32.grad.double(), grad_x, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("native_bf16", [False, True], ids=["bf16-emulated", "bf16-native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
# 40 and 60: not multiples of 16, the packed kernel does not apply (with 40 it returned inf on AVX-512 CPUs)
@pytest.mark.parametrize("d_in", [64, 40, 60])
def test_every_dtype_path_matches_a_float64_reference(monkeypatch, dtype, d_in, native_bf16):
    """Forward and input gradient in each dtype (bf16 through the packed int8 kernel where it applies, fp16
    with the scale applied before the GEMM) against float64 arithmetic on the same int8 weights. Both bf16
    paths run on every CPU: the one for CPUs that emulate bf16 and the one for CPUs with native bf16."""
    import peft_dist.quant.int8 as int8

    monkeypatch.setattr(int8, "native_bf16_cpu", lambda: native_bf16)
    torch.manual_seed(4)
    layer = Int8Linear.from_weight(torch.randn(48, d_in), torch.randn(48), dtype=dtype)
    w = layer.dequantized_weight().double()
    x = torch.randn(2, 7, d_in, dtype=torch.float64)
    grad_y = torch.randn(2, 7, 48, dtype=torch.float64)
    xd = x.to(dtype).requires_grad_()
    y = layer(xd)
    y.backward(grad_y.to(dtype))
    x_ref = xd.detach().double()  # the rounded input, so only the layer's arithmetic is compared
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    scale_out = (x_ref @ w.t()).abs().max()
    assert (y.double() - (x_ref @ w.t() + layer.bias.double())).abs().max() <= tol * scale_out
    assert (xd.grad.double() - grad_y.to(dtype).double() @ w).abs().max() <= tol * (grad_y @ w).abs().max()


def test_fp16_is_as_range_safe_as_a_plain_fp16_linear():
    """Outputs near fp16's limit (6.5e4) from int8 partial sums far beyond it: x w8^T alone would be 127x
    the output; the layer must give what an fp16 nn.Linear gives, and a finite input gradient."""
    weight = torch.full((4, 2048), 0.25)
    weight[:, 0] = 2.0  # absmax 2: w8 holds 127 for 2.0 and 16 for 0.25
    layer = Int8Linear.from_weight(weight, None, dtype=torch.float16)
    x = torch.full((3, 2048), 100.0, dtype=torch.float16, requires_grad=True)
    plain = nn.Linear(2048, 4, bias=False, dtype=torch.float16)
    plain.weight.data.copy_(layer.dequantized_weight())
    y = layer(x)
    assert 4e4 < y.float().abs().max() < 65504 and torch.isfinite(y).all()
    torch.testing.assert_close(y, plain(x.detach()), rtol=2e-3, atol=0)
    y.backward(torch.full_like(y, 1000.0))
    assert torch.isfinite(x.grad).all()


def test_the_packed_kernel_applies_only_where_measured_faster(monkeypatch):
    import peft_dist.quant.int8 as int8
    from peft_dist.quant.int8 import packed_kernel_applies

    w8 = torch.zeros(64, 128, dtype=torch.int8)
    for native_bf16 in (False, True):  # faster than the cast path only where bf16 is emulated
        monkeypatch.setattr(int8, "native_bf16_cpu", lambda: native_bf16)
        assert packed_kernel_applies(torch.zeros(2, 128, dtype=torch.bfloat16), w8) is not native_bf16
    monkeypatch.setattr(int8, "native_bf16_cpu", lambda: False)
    for dtype in (torch.float32, torch.float16):
        assert not packed_kernel_applies(torch.zeros(2, 128, dtype=dtype), w8)
    for d_in in (60, 40):
        x = torch.zeros(2, d_in, dtype=torch.bfloat16)
        assert not packed_kernel_applies(x, torch.zeros(64, d_in, dtype=torch.int8))


def test_backward_saves_no_dense_weight():
    layer = Int8Linear.from_weight(torch.randn(32, 16), None)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 16, requires_grad=True))
    assert all(t.dtype == torch.int8 or t.dim() <= 1 for t in saved), [(t.dtype, t.shape) for t in saved]
    y.sum().backward()


def test_conv1d_is_quantized_as_its_transpose():
    torch.manual_seed(3)
    conv = Conv1D(12, 8)  # GPT-2 layout: weight (d_in=8, d_out=12)
    nn.init.normal_(conv.weight)
    layer = quantize_linear(conv, torch.float32)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=0.02, atol=0.05)
    assert (layer.out_features, layer.in_features) == (12, 8)


def test_quantize_model_reports_per_layer_error_and_keeps_head_in_float():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    reports = quantize_model(model)
    assert len(reports) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    assert all(0 < r.rel_error < 0.01 for r in reports)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_quantization_targets_matching_nothing_fail_clearly():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    with pytest.raises(ConfigError, match="quantization.target_modules.*matches no linear.*q_proj"):
        quantize_model(model, ["qproj"])
