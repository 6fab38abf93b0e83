"""Quantized frozen base: int8 and 4-bit (NF4/FP4) linear layers and model quantization."""
from peft_dist.quant.int8 import Int8Embedding, Int8Linear, dequantize_rowwise, quantize_rowwise
from peft_dist.quant.model import QuantReport, quantize_linear, quantize_model
from peft_dist.quant.nf4 import FourBitLinear

__all__ = ["FourBitLinear", "Int8Embedding", "Int8Linear", "dequantize_rowwise", "quantize_rowwise", "QuantReport",
           "quantize_linear", "quantize_model"]
