"""Parameter inventories and what a ZeRO-3 rank holds of them.

An inventory is the list of parameter tensors of the adapted, quantized (int8 or 4-bit) model: its
numel, bytes per element and whether it trains. The analytic model writes it down from a ``ModelShape``
(``analytic_inventory``); the dry run reads it off the real transformers model built on the meta
device (``peft_dist.plan.dryrun``). ``per_rank`` applies DeepSpeed ZeRO-3's layout to either, so the
two can be compared byte for byte.

ZeRO-3 layout (DeepSpeed 0.19, ``partition_parameters.py``): each parameter is flattened, padded to a
multiple of the world size W and split, so a rank holds ``ceil(numel / W)`` elements of it.
Parameters with ``numel <= stage3_param_persistence_threshold`` are also kept whole on every rank
once the first training step has run (never released, so never gathered again). Checked against real
DeepSpeed at 2 ranks by tests/unit/test_plan_zero3.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peft_dist.config.schema import QuantizationConfig
from peft_dist.plan.models import ModelShape, PlanError
from peft_dist.quant.nf4 import NESTED_BLOCKSIZE, NESTED_CODE_SIZE
from peft_dist.targets import HEAD_NAMES, name_matches

INT8 = 1
FP32 = 4  # 4-bit block statistics stay float32 in every precision, as bitsandbytes keeps them
# Per trainable element on its owner rank, besides the gradient partition (kept in the parameters'
# dtype): the fp32 master (4) and Adam's exp_avg and exp_avg_sq (4 + 4).
MASTER_AND_ADAM_BYTES = 12


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    itemsize: int
    trainable: bool
    quantized: int = 0  # the dense weights this tensor holds as quantized codes (what the loader quantizes)


@dataclass(frozen=True)
class RankBytes:
    """What one rank holds, in bytes (``*_numel``: elements)."""

    frozen: int  # the base: quantized weight shards, their statistics, embeddings, norms (+ persistent copies)
    trainable: int  # adapter parameter shards in the training dtype (+ persistent copies)
    optimizer: int  # gradient partition, fp32 master, Adam moments of the owned elements
    frozen_persistent: int  # of ``frozen``: whole copies of persistent tensors (stay on the GPU under offload_param)
    trainable_persistent: int  # of ``trainable``: the same
    trainable_owned: int  # trainable elements this rank owns (its optimizer partition)
    trainable_numel: int  # elements of trainable tensors in the whole model
    total_numel: int  # elements of all tensors in the whole model
    gathered: int  # bytes one forward pass all-gathers: the non-persistent tensors, whole
    gathered_numel: int  # their elements
    frozen_stored: int  # the base as stored, whole (what zero.Init broadcasts from rank 0 when it loads)
    quantized_numel: int  # dense weights of the whole model that loading quantizes

    @property
    def params(self) -> int:
        return self.frozen + self.trainable


def per_rank(inventory: list[TensorInfo], world: int, persistence_threshold: int) -> RankBytes:
    """Bytes one of ``world`` ZeRO-3 ranks holds for ``inventory`` (DeepSpeed's layout, see above)."""
    frozen = trainable = optimizer = trainable_numel = total = gathered = gathered_numel = 0
    frozen_persistent = trainable_persistent = owned = frozen_stored = quantized = 0
    for t in inventory:
        quantized += t.quantized
        shard = math.ceil(t.numel / world)
        persistent = t.numel * t.itemsize if t.numel <= persistence_threshold else 0
        if t.numel > persistence_threshold:
            gathered += t.numel * t.itemsize
            gathered_numel += t.numel
        total += t.numel
        if t.trainable:
            trainable += shard * t.itemsize + persistent
            trainable_persistent += persistent
            optimizer += shard * (t.itemsize + MASTER_AND_ADAM_BYTES)
            trainable_numel += t.numel
            owned += shard
        else:
            frozen += shard * t.itemsize + persistent
            frozen_persistent += persistent
            frozen_stored += t.numel * t.itemsize
    return RankBytes(frozen, trainable, optimizer, frozen_persistent, trainable_persistent, owned, trainable_numel,
                     total, gathered, gathered_numel, frozen_stored, quantized)


EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "wpe.weight")  # token and position tables (models.py)


def _candidate_linears(shape: ModelShape) -> list[tuple[str, int, int, bool]]:
    """Every linear module of the model, output head last."""
    return [lin for layer in range(shape.layers) for lin in shape.linears(layer)] + [shape.head()]


def _targeted(name: str, targets: Any) -> bool:
    """``peft_dist.targets.find_modules``' rule: ``all-linear`` is every linear outside the output head."""
    if targets == "all-linear":
        return name.split(".")[-1] not in HEAD_NAMES
    return name_matches(name, targets)


def head_targeted(targets: Any) -> bool:
    """Whether ``targets`` (a ``target_modules`` value) names the output head."""
    return _targeted("lm_head", targets)


def embedding_targeted(name: str, targets: Any) -> bool:
    """Whether quantization ``targets`` name the embedding stored as ``name`` (``all-linear`` never does)."""
    return targets != "all-linear" and name.endswith(EMBEDDINGS) and _targeted(name.removesuffix(".weight"), targets)


def weight_tensors(name: str, d_out: int, d_in: int, quant: QuantizationConfig | None,
                   itemsize: int) -> list[TensorInfo]:
    """A frozen linear's weight as the trainer stores it (``quant/int8.py``, ``quant/nf4.py``): float
    (``quant`` None), int8 with one scale per output row, or 4-bit codes two a byte with one float32 absmax
    per block (double quant: a uint8 absmax per block, a float32 one per 256 blocks, the code, the offset)."""
    numel = d_out * d_in
    if quant is None:
        return [TensorInfo(f"{name}.weight", numel, itemsize, False)]
    if quant.bits == 8:
        return [TensorInfo(f"{name}.weight", numel, INT8, False, numel),
                TensorInfo(f"{name}.weight_scale", d_out, itemsize, False)]
    blocks = math.ceil(numel / quant.blocksize)
    out = [TensorInfo(f"{name}.weight", math.ceil(numel / 2), INT8, False, numel),
           TensorInfo(f"{name}.absmax", blocks, INT8 if quant.double_quant else FP32, False)]
    if quant.double_quant:
        out += [TensorInfo(f"{name}.nested_absmax", math.ceil(blocks / NESTED_BLOCKSIZE), FP32, False),
                TensorInfo(f"{name}.nested_code", NESTED_CODE_SIZE, FP32, False),
                TensorInfo(f"{name}.absmax_offset", 1, FP32, False)]
    return out


def analytic_inventory(shape: ModelShape, adapters: list, quant_targets: Any | None,
                       itemsize: int, quant: QuantizationConfig | None = None) -> list[TensorInfo]:
    """The parameter tensors of ``shape`` after quantization of ``quant_targets`` (None: off) as ``quant``
    says (None: int8) and LoRA injection, written down from the shape alone.

    Embeddings a list or regex names are int8 (``Int8Embedding``, whatever ``quant.bits``). Raises
    ``PlanError`` for what this model does not write down: adapter methods other than LoRA (the planner
    then counts them on the meta-device model) and a quantized table tied to another (which the loader
    refuses: ``quantize_model``).
    """
    head_quantized = quant_targets is not None and head_targeted(quant_targets)
    if head_quantized and shape.tied_embeddings:
        raise PlanError("quantization.target_modules: the output head is tied to the input embeddings, and a "
                        "quantized copy would untie them; leave it out (all-linear does)")
    out = []
    for name, numel in shape.other_tensors():
        if quant_targets is not None and embedding_targeted(name, quant_targets):
            if shape.tied_embeddings and not name.endswith("wpe.weight"):
                raise PlanError(f"quantization.target_modules: {name.removesuffix('.weight')} is tied to the output "
                                "head, and a quantized copy would untie them; leave it out (all-linear does)")
            out += weight_tensors(name.removesuffix(".weight"), numel // shape.hidden, shape.hidden,
                                  QuantizationConfig(), itemsize)  # int8 whatever the bits (Int8Embedding)
        elif not (head_quantized and name == "lm_head.weight"):
            out.append(TensorInfo(name, numel, itemsize, False))
    for name, d_out, d_in, bias in _candidate_linears(shape):
        is_head = name == "lm_head"
        quantized = quant_targets is not None and _targeted(name, quant_targets)
        if quantized or not is_head:  # a float head's weight is listed with the embeddings (shared when tied)
            out += weight_tensors(name, d_out, d_in, (quant or QuantizationConfig()) if quantized else None, itemsize)
        if bias:
            out.append(TensorInfo(f"{name}.bias", d_out, itemsize, False))
        for adapter in adapters:
            if adapter.method != "lora":
                raise PlanError(f"adapters: the analytic model writes down LoRA only, not {adapter.method!r}; "
                                "the planner counts other methods on the meta-device model (--dry-run)")
            if _targeted(name, adapter.target_modules):
                out += [TensorInfo(f"{name}.{adapter.name}.A", adapter.r * d_in, itemsize, True),
                        TensorInfo(f"{name}.{adapter.name}.B", d_out * adapter.r, itemsize, True)]
    return out
