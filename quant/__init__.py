"""The NF4 4-bit format (bitsandbytes-compatible bytes), its dequantization dispatch and NF4Linear."""
from .dispatch import dequantize_nf4
from .linear import NF4Linear
from .matmul import matmul_nf4
from .nf4 import NF4_CODE, NF4Weight, dequantize_nf4_ref, dynamic_map_8bit, quantize_nf4

__all__ = ["NF4_CODE", "NF4Weight", "NF4Linear", "quantize_nf4", "dequantize_nf4", "dequantize_nf4_ref",
           "dynamic_map_8bit", "matmul_nf4"]
