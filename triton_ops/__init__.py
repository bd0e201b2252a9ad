"""Triton kernels for LoRA/QLoRA training, one op per module.

Each module holds the op's pure-torch reference (``<op>_ref``), its Triton kernel(s), a launcher that
validates inputs, the ``torch.library`` registration and the public function. The package depends only on
torch and triton, so a single op can be imported on its own::

    from triton_ops import fused_linear_cross_entropy

The functions are bound here after their modules load, so the package attribute ``triton_ops.rope`` is the
function even though a module of the same name exists; reach a module's other names with
``from triton_ops.rope import rope_ref``.
"""
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv, lora_scale
from .nf4_dequant import nf4_dequantize
from .nf4_matmul import nf4_matmul
from .rank_update import rank_update_
from .rms_norm import rms_norm
from .rope import packed_position_ids, rope, rope_cos_sin
from .swiglu import swiglu

__all__ = ["cross_entropy", "fused_linear_cross_entropy", "LoRAWeights", "lora_linear", "lora_mlp", "lora_qkv",
           "lora_scale", "nf4_dequantize", "nf4_matmul", "rank_update_", "rms_norm", "packed_position_ids", "rope", "rope_cos_sin",
           "swiglu"]
