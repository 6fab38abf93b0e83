"""bench/quality.py --bases: each base stores its decoder linears as named and nothing else, its claims are judged
by the equivalence rule, and its section in docs/RESULTS.md survives both kinds of --write."""
import sys

import pytest
import torch

from tests.multiproc import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402

from peft_dist.quant.int8 import Int8Linear  # noqa: E402
from peft_dist.quant.nf4 import FourBitLinear  # noqa: E402

DECODER_LINEARS = 7 * quality.SHAPE.layers


@pytest.fixture(scope="module")
def state() -> dict:
    torch.manual_seed(0)
    return quality.new_model().state_dict()


def linears(model: torch.nn.Module, kind: type) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("base, kind", [("int8", Int8Linear), ("nf4", FourBitLinear),
                                        ("nf4 + double quant", FourBitLinear)])
def test_quantized_bases_quantize_the_decoder_linears_only(state, base, kind):
    model = quality.base_model(state, base)
    quantized = linears(model, kind)
    assert len(quantized) == DECODER_LINEARS and not any("lm_head" in name for name in quantized)
    if kind is FourBitLinear:
        layer = next(iter(quantized.values()))
        assert (layer.form.quant_type, layer.form.blocksize) == ("nf4", 64)
        assert (layer.nested_absmax is not None) == (base == "nf4 + double quant")
    for name, layer in quantized.items():  # near the weight it stores: the layer was filled from the base
        dense = state[f"{name}.weight"]
        error = (layer.dequantized_weight() - dense).norm() / dense.norm()
        assert error < (0.01 if kind is Int8Linear else 0.15), name
    kept = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(kept[key], state[key]), key  # fp32, untouched


def test_bf16_base_rounds_the_decoder_linears_only(state):
    kept = quality.base_model(state, "bf16").state_dict()
    assert set(kept) == set(state)
    for key, value in state.items():
        rounded = "_proj." in key
        assert torch.equal(kept[key], value.bfloat16().float() if rounded else value), key
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(kept[q], state[q])  # the rounding changed something


def test_fp32_base_is_the_pretrained_base(state):
    kept = quality.base_model(state, "fp32").state_dict()
    assert all(torch.equal(kept[key], value) for key, value in state.items())
    with pytest.raises(ValueError, match="unknown base"):
        quality.base_model(state, "fp8")


TOKENS = [50, 100, 150, 200]  # 4 test documents


def results(shifts: dict[str, float], spread: dict[str, float]) -> dict:
    """``base_claims`` input at 0.1%: bf16 with a seed-to-seed spread shared by every base, each base shifted."""
    bf16 = [4.00, 4.03, 3.98, 4.01, 4.02]
    noise = [0.001, -0.001, 0.002, 0.0, -0.002]
    out = {}
    for base in quality.BASES:
        seeds = [v + shifts.get(base, 0.0) + spread.get(base, 0.0) * e for v, e in zip(bf16, noise)]
        documents = [[n * (s + e) for n, e in zip(TOKENS, (-0.01, 0.01, -0.02, 0.02))] for s in seeds]
        out[base, 0.001] = {"seeds": seeds, "documents": documents}
    return out


def test_base_claims_judge_equivalence_against_bf16():
    lines = quality.base_claims(results({"int8": +0.05, "fp32": -0.05, "nf4": +0.001},
                                        {"nf4": 1.0, "nf4 + double quant": 20.0}), (0.001,), TOKENS)
    verdicts = {line.split(" vs ")[0]: line.rsplit(": ", 1)[1] for line in lines}
    assert verdicts == {"fp32": "better", "int8": "worse", "nf4": "matches", "nf4 + double quant": "not shown"}
    assert all("Holm" in line and "TOST p" in line and "test-document bootstrap" in line for line in lines)


def test_bases_section_is_kept_by_the_tables_write_and_replaced_by_its_own():
    table = quality.results_markdown(["| table |"], "--write docs/RESULTS.md", "") + "\n## Reading the table\n"
    first = quality.with_section(table, ["| bases, first run |"], quality.BASES_MARKS)
    assert first.startswith(table.rstrip("\n")) and first.endswith(quality.BASES_MARKS[1] + "\n")
    assert first.index(quality.HAND_WRITTEN) < first.index("| bases, first run |")
    reread = first + "\nThe reading of the bases, by hand.\n"
    second = quality.with_section(reread, ["| bases, second run |"], quality.BASES_MARKS)
    assert "first run" not in second
    assert second.endswith(quality.BASES_MARKS[1] + "\n\nThe reading of the bases, by hand.\n")
    rewritten = quality.results_markdown(["| new table |"], "--write docs/RESULTS.md", second)
    assert "| bases, second run |" in rewritten and "| table |" not in rewritten
    fresh = quality.with_section("", ["| bases |"], quality.BASES_MARKS)
    assert "| bases |" in quality.results_markdown(["| table |"], "--write docs/RESULTS.md", fresh)
