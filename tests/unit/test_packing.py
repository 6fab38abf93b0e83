"""Packed blocks: the layout against a hand-built reference, and, on every common architecture (and with a
prefix), each document in a packed block computes exactly what it computes alone."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.data.packing import IGNORE_INDEX, pack_documents, tokenize_documents
from peft_dist.model import load_tokenizer, packed_inputs
from tests.architectures import ARCHITECTURES, _configs


def test_blocks_restart_positions_at_every_document_and_block_and_drop_the_tail():
    rows = {"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], "labels": [[1, 2, 3], [-100, 5, 6, 7, 8], [9, 10]]}
    blocks = pack_documents(rows, block_size=4)
    np.testing.assert_array_equal(blocks["input_ids"], [[1, 2, 3, 4], [5, 6, 7, 8]])  # [9, 10] is the tail
    np.testing.assert_array_equal(blocks["position_ids"], [[0, 1, 2, 0], [0, 1, 2, 3]])
    # the first token of each piece has nothing of its document before it: no loss
    np.testing.assert_array_equal(blocks["labels"], [[-100, 2, 3, -100], [-100, 6, 7, 8]])


def test_tokenizing_appends_eos_and_masks_prompts():
    tokenizer = load_tokenizer("builtin:tiny-llama")
    eos = tokenizer.eos_token_id
    text = tokenize_documents({"text": ["def f(): pass"]}, tokenizer)
    assert text["input_ids"][0][-1] == eos and text["labels"] == text["input_ids"]
    pair = tokenize_documents({"prompt": ["question?"], "response": [" answer."]}, tokenizer)
    prompt = tokenizer("question?", add_special_tokens=False)["input_ids"]
    assert pair["labels"][0][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert pair["labels"][0][len(prompt):] == pair["input_ids"][0][len(prompt):] and pair["input_ids"][0][-1] == eos


DOCUMENTS = [[5, 17, 99, 23, 41, 7, 0], [8, 300, 12, 0], [77, 51, 3, 260, 19]]  # the last is cut by the block


def packed_and_alone(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of one packed block of DOCUMENTS, and of each document's piece run alone."""
    block = pack_documents({"input_ids": DOCUMENTS, "labels": DOCUMENTS}, block_size=14)
    batch = {name: torch.from_numpy(block[name]).long() for name in ("input_ids", "position_ids")}
    with torch.no_grad():
        packed = model(**packed_inputs(model.config, batch, torch.float32)).logits[0]
        alone = [model(input_ids=torch.tensor([doc[:length]])).logits[0]
                 for doc, length in zip(DOCUMENTS, (7, 4, 3))]
    return packed, alone


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_packed_document_computes_what_it_computes_alone(arch, attention):
    config = _configs()[arch]
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    packed, alone = packed_and_alone(model)
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=1e-4)
    # the oracle can fail: without restarting positions (or the explicit mask), document 2 sees document 1
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([sum(DOCUMENTS, [])[:14]]), use_cache=False).logits[0]
    assert (leaky[7:11] - alone[1]).abs().max() > 1e-3


def test_with_a_prefix_each_packed_document_sees_the_prefix_and_only_its_own_tokens():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()["llama"]).eval()
    inject_adapters(model, [build_adapter_config({"method": "prefix", "length": 3}, "adapters.0")])
    for parameter in model.parameters():
        if parameter.requires_grad:  # a trained-looking prefix, so that seeing it changes the logits
            torch.nn.init.normal_(parameter, std=1.0)
    packed, alone = packed_and_alone(model)
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=1e-4)


def test_the_loss_takes_its_mask_dtype_from_an_int8_embeddings_scales():
    """With the token embedding in int8 the eager mask is built in the scales' dtype (not the table's int8),
    and gives the loss SDPA gives."""
    from peft_dist.config.schema import ModelConfig, QuantizationConfig
    from peft_dist.quant.loader import load_quantized_base
    from peft_dist.train.step import forward_loss

    model, _ = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"),
                                   QuantizationConfig(target_modules=["embed_tokens", "q_proj"]))
    assert model.get_input_embeddings().weight.dtype == torch.int8
    block = pack_documents({"input_ids": DOCUMENTS, "labels": DOCUMENTS}, block_size=14)
    batch = {name: torch.from_numpy(block[name]).long() for name in block}
    losses = {}
    for attention in ("eager", "sdpa"):
        model.config._attn_implementation = attention
        with torch.no_grad():
            losses[attention] = forward_loss(model, batch).item()
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5) and math.isfinite(losses["eager"])
