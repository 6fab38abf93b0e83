"""8-bit frozen base: int8 linear layers and model quantization."""
from peft_dist.quant.int8 import Int8Linear, dequantize_rowwise, quantize_rowwise
from peft_dist.quant.model import QuantReport, quantize_linear, quantize_model

__all__ = ["Int8Linear", "dequantize_rowwise", "quantize_rowwise", "QuantReport", "quantize_linear",
           "quantize_model"]
