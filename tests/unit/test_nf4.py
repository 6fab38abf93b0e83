"""The frozen 4-bit linear against bitsandbytes' ``Linear4bit`` and QLoRA's NF4 levels; its bytes; the 4-bit
base through the loader, the trainer's model path, peft's QLoRA and export."""
import math
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from torch import nn

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.lora import LoraConfig, LoraDelta
from peft_dist.config import ConfigError, ModelConfig
from peft_dist.config.schema import QuantizationConfig
from peft_dist.distributed.memory import MMAP_THRESHOLD_BYTES
from peft_dist.export import export
from peft_dist.inference import load_for_inference
from peft_dist.model import load_model_config
from peft_dist.quant import FourBitLinear, quantize_model
from peft_dist.quant.loader import build_model, load_quantized_base
from peft_dist.targets import find_modules, replace_module
from peft_dist.tracking.run_info import matmul_parameters, parameter_summary
from peft_dist.train.config import load_config
from peft_dist.train.preflight import meta_model
from tests.unit.test_export import IDS, reference_logits, trained_adapter

# QLoRA (Dettmers et al. 2023, appendix E): the 16 NF4 levels, quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bnb_linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str, double_quant: bool,
                   blocksize: int = 64) -> bnb.nn.Linear4bit:
    """bitsandbytes' own 4-bit layer on ``weight``, quantized from the weight in its dtype."""
    d_out, d_in = weight.shape
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=weight.dtype,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=blocksize)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # quantizes on placement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_input_gradient_equal_bitsandbytes_linear4bit(quant_type, double_quant, dtype):
    """Same weights (50 x 100: the last block of 64 is partial), same input: bit-identical output and input
    gradient; the weight gets no gradient."""
    torch.manual_seed(0)
    weight = torch.randn(50, 100, dtype=dtype)
    ours = FourBitLinear.from_weight(weight, None, quant_type, 64, double_quant, dtype)
    theirs = bnb_linear4bit(weight, None, quant_type, double_quant)
    x = torch.randn(3, 7, 100, dtype=dtype)
    grad_y = torch.randn(3, 7, 50, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(x_ours)
    y.backward(grad_y)
    theirs(x_theirs).backward(grad_y)
    assert y.dtype == dtype and torch.equal(y, theirs(x))
    assert torch.equal(x_ours.grad, x_theirs.grad)
    assert all(p.grad is None and not p.requires_grad for p in ours.parameters())


def test_bias_is_added_in_floating_point():
    torch.manual_seed(1)
    layer = FourBitLinear.from_weight(torch.randn(16, 64), torch.randn(16), dtype=torch.float32)
    x = torch.randn(5, 64, dtype=torch.float64)
    want = x @ layer.dequantized_weight().double().t() + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, blocksize", [((32, 128), 64), ((64, 176), 64), ((64, 64), 128)])
def test_nf4_rounds_each_weight_to_the_nearest_qlora_level_of_its_block(shape, blocksize, dtype):
    """An oracle independent of bitsandbytes: each dequantized weight is absmax(block) x the NF4 level
    nearest to w / absmax(block), blocks running over the flattened weight. The last two shapes have blocks
    that cross rows, which bitsandbytes' AVX-512 CPU kernel dequantizes wrongly from a 2-D shape."""
    torch.manual_seed(2)
    weight = torch.randn(*shape).to(dtype)
    deq = FourBitLinear.from_weight(weight, None, "nf4", blocksize, dtype=dtype).dequantized_weight()
    blocks = weight.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = NF4_LEVELS[(blocks / absmax).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(dim=-1)]
    want = (nearest * absmax).to(dtype).float()
    torch.testing.assert_close(deq.float().reshape(-1, blocksize), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_blocks", [None, 2])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(48, 64), (7, 9), (300, 130)])
def test_parameters_are_what_bitsandbytes_returns(shape, double_quant, chunk_blocks, monkeypatch):
    """The parameter shapes are computed without bitsandbytes (layers are built on the meta device); they
    must hold its quantize_4bit output exactly, and dequantize as its own QuantState does, also when the
    weight is quantized in chunks of 2 blocks (609 chunks and a partial block for 300 x 130)."""
    import peft_dist.quant.nf4 as nf4

    if chunk_blocks:
        monkeypatch.setattr(nf4, "SCRATCH_ELEMENTS", chunk_blocks * 64)
    torch.manual_seed(3)
    weight = torch.randn(*shape)
    layer = FourBitLinear.from_weight(weight, None, "nf4", 64, double_quant)
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    want = [packed, state.absmax] + ([state.state2.absmax, state.state2.code, state.offset.reshape(1)]
                                     if double_quant else [])
    assert [(p.shape, p.dtype) for p in layer.packed()] == [(t.shape, t.dtype) for t in want]
    assert all(torch.equal(p, t) for p, t in zip(layer.packed(), want))
    assert torch.equal(layer.dequantized_weight(), dequantize_4bit(packed, state))


def test_quantizing_holds_chunks_not_float32_copies_of_the_weight():
    """bitsandbytes' CPU quantize_4bit of a whole weight made about six float32 copies of it (a 4096 x 11008
    bf16 weight: +604 MiB of peak resident memory on a loading rank); ``load_weight`` quantizes about
    ``SCRATCH_ELEMENTS`` weights at a time (+48 MiB there). Here 4096 x 4096 (64 MiB per float32 copy), in a
    fresh process with the trainer's malloc setting (freed buffers leave the resident set), as a rank loads."""
    script = """if True:
        import torch
        from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss, resident_bytes
        from peft_dist.quant.nf4 import FourBitLinear
        weight = torch.randn(4096, 4096, dtype=torch.bfloat16)
        layer = FourBitLinear(4096, 4096, bias=False, double_quant=True, dtype=torch.bfloat16)
        FourBitLinear.from_weight(weight[:64], None, double_quant=True)  # bitsandbytes' first use, not measured
        reset_peak_rss()
        before = resident_bytes()[0]
        layer.load_weight(weight)
        print((peak_rss_bytes() - before) / 2**20, flush=True)
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)})
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) < 64, done.stdout


@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_are_half_a_byte_a_weight_plus_the_statistics(double_quant):
    """A 4096 x 4096 layer (on meta: shapes only): packed codes + one float32 absmax per 64 weights, or with
    double quantization one uint8 absmax per 64, a float32 absmax per 256 of those, the 256-value code and
    the offset. ZeRO-3 partitions each of these tensors like any other (tests/distributed)."""
    n = 4096 * 4096
    layer = FourBitLinear(4096, 4096, bias=False, double_quant=double_quant, device="meta")
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    blocks = n // 64
    want = n // 2 + (blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks)
    assert held == want
    assert held / n == pytest.approx(0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64), abs=1e-4)


def test_backward_saves_no_dense_weight():
    layer = FourBitLinear.from_weight(torch.randn(32, 64), None, double_quant=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 64, requires_grad=True))
    assert saved and all(t.dtype == torch.uint8 or t.numel() <= 256 for t in saved), [(t.dtype, t.shape) for t in saved]
    y.sum().backward()


@pytest.mark.parametrize("override, message", [
    ("quantization.bits=3", r"quantization.bits: got 3; use 8 \(int8\) or 4 \(NF4/FP4\)"),
    ("quantization.quant_type=int4", r"quantization.quant_type: got 'int4'; use nf4 or fp4"),
    ("quantization.blocksize=48", r"quantization.blocksize: got 48; bitsandbytes' 4-bit quantization takes 32, "
                                  r"64, .*4096"),
    ("quantization.double_quant=true", r"quantization.double_quant: applies to bits: 4 only; set bits: 4"),
    ("quantization.quant_type=fp4", r"quantization.quant_type: applies to bits: 4 only"),
    ("quantization.bits=four", r"quantization.bits: expected int"),
])
def test_bad_settings_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_blocksize_bitsandbytes_refuses_is_refused_by_the_config_first():
    with pytest.raises(ConfigError, match="quantization.blocksize: got 16"):
        load_config(None, ["quantization.bits=4", "quantization.blocksize=16"])
    with pytest.raises(ValueError, match="invalid blocksize"):
        quantize_4bit(torch.randn(64), blocksize=16)


def test_builtin_model_in_4_bits_through_the_trainers_model_path():
    """The loader (as the trainer calls it) gives every decoder linear as a FourBitLinear with exactly the
    parameters the preflight's meta model predicts; the base keeps its step-0 loss near ln(vocab); LoRA
    adapters take the model's dtype, not the float32 of the block statistics, and train."""
    quant = QuantizationConfig(bits=4, double_quant=True)
    model, report = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama", dtype="bfloat16"), quant)
    assert sum(isinstance(m, FourBitLinear) for m in model.modules()) == len(report.quantization) == 7 * 4
    assert all(0.05 < r.rel_error < 0.15 for r in report.quantization), report.quantization  # NF4 on N(0, 0.02)
    meta = meta_model(load_model_config("builtin:tiny-llama"), [], "all-linear", "bfloat16", quant)
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    assert model.model.layers[0].mlp.up_proj.absmax.dtype == torch.uint8
    assert model.model.layers[0].mlp.up_proj.nested_absmax.dtype == torch.float32
    injected = inject_adapters(model, [LoraConfig(name="lora", target_modules=["q_proj", "down_proj"], r=4)])
    assert len(injected["lora"]) == 8
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - math.log(512)) < 0.15, loss.item()
    loss.backward()
    delta = model.model.layers[0].mlp.down_proj.deltas["lora"]
    assert delta.B.grad is not None and delta.B.grad.abs().sum() > 0


def test_summary_and_flops_count_weights_not_packed_bytes():
    """The run summary and MFU count a quantized base by its weights: the same as the float model's."""
    counts = []
    for quant in (None, QuantizationConfig(), QuantizationConfig(bits=4, double_quant=True)):
        model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
        if quant is not None:
            quantize_model(model, "all-linear", torch.float32, quant)
        summary = parameter_summary(model)
        counts.append((summary["total"], summary["base_bytes_bf16"], matmul_parameters(model)))
    assert counts[0] == counts[1] == counts[2], counts


# down_proj's rows (176 inputs) do not hold whole blocks of 64; bitsandbytes' AVX-512 CPU kernel dequantizes
# such weights wrongly (peft_dist/quant/nf4.py, _block_rows; the NF4 oracle test above covers ours there),
# which would make peft's QLoRA the wrong reference on those machines.
BLOCK_ALIGNED_PROJECTIONS = [name for name in PROJECTIONS if name != "down_proj"]


def to_bitsandbytes_4bit(model: nn.Module, quant_type: str, double_quant: bool) -> nn.Module:
    linears = find_modules(model, BLOCK_ALIGNED_PROJECTIONS, lambda m: isinstance(m, nn.Linear), "linear", "test")
    for name, module in linears:
        replace_module(model, name, bnb_linear4bit(module.weight, module.bias, quant_type, double_quant))
    model.is_loaded_in_4bit = True  # what peft reads to dispatch its bitsandbytes 4-bit LoRA layer
    return model


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_lora_on_4bit_trains_like_peft_qlora(quant_type, double_quant):
    """Same builtin base, same 4-bit settings, same LoRA init (ours copied into peft's), same batches:
    ours on FourBitLinear and peft's QLoRA layer on bitsandbytes' Linear4bit give the same Adam losses."""
    peft = pytest.importorskip("peft")
    quant = QuantizationConfig(bits=4, quant_type=quant_type, double_quant=double_quant)
    tiny = ModelConfig(name_or_path="builtin:tiny-llama")
    ours, _ = build_model(tiny)
    quantize_model(ours, BLOCK_ALIGNED_PROJECTIONS, torch.float32, quant)
    torch.manual_seed(0)
    inject_adapters(ours, [LoraConfig(name="lora", target_modules=BLOCK_ALIGNED_PROJECTIONS, r=4, alpha=8.0)])
    theirs = to_bitsandbytes_4bit(build_model(tiny)[0], quant_type, double_quant)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=BLOCK_ALIGNED_PROJECTIONS,
                                                         lora_dropout=0.0))
    copied = 0
    for name, module in ours.named_modules():
        if isinstance(module, LoraDelta):
            layer = theirs.base_model.model.get_submodule(name.rsplit(".deltas.", 1)[0])
            assert isinstance(layer, peft.tuners.lora.bnb.Linear4bit)
            layer.lora_A["default"].weight.data.copy_(module.A)
            layer.lora_B["default"].weight.data.copy_(module.B)
            copied += 1
    assert copied == 6 * 4
    losses = []
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        losses.append([])
        for _ in range(4):
            ids = torch.randint(0, 512, (2, 32), generator=generator)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[-1].append(loss.item())
    # observed bit-identical; a base quantized without (or with) double quantization is off by 3e-6 at step 0
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0), losses
    assert losses[0][-1] < losses[0][0] - 0.05  # it trained


@pytest.mark.parametrize("settings", [("quantization.bits=4",),
                                      ("quantization.bits=4", "quantization.quant_type=fp4",
                                       "quantization.double_quant=true", "quantization.blocksize=128")],
                         ids=["nf4", "fp4-double-quant-128"])
def test_merged_export_of_lora_on_a_4bit_base_equals_load_for_inference(tmp_path, settings):
    """The adapter checkpoint records the 4-bit settings, load_for_inference rebuilds that base, and the
    merged export (dequantized through bitsandbytes, LoRA folded in) gives its logits with plain transformers."""
    from transformers import AutoModelForCausalLM

    adapter = trained_adapter(tmp_path, settings)
    model, _ = load_for_inference(adapter)
    layer = model.model.layers[0].self_attn.q_proj.base
    want = load_config(None, list(settings)).quantization
    assert isinstance(layer, FourBitLinear)
    assert (layer.form.quant_type, layer.form.blocksize, layer.nested_absmax is not None) == \
        (want.quant_type, want.blocksize, want.double_quant)
    out = export(adapter, tmp_path / "merged")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference_logits(adapter, IDS), rtol=1e-4, atol=1e-4)
