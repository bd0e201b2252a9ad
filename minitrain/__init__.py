"""minitrain: LoRA/QLoRA fine-tuning of Llama-family models on the kernels of ``triton_ops``, ``csrc``
and ``quant``."""
__version__ = "0.1.0"

import os as _os

# cuBLAS without a workspace for the whole process, set before its first GEMM (torch reads the variable once):
# with a workspace, cuBLAS's Hopper GEMMs come with a memset node each, whose idle holes in a CUDA-graphed step
# cost more than the workspace-free kernels it then picks (README, "cuBLAS workspace"). A value the process
# already has is kept (an empty one counts as unset); MINITRAIN_CUBLAS_WORKSPACE=default leaves cuBLAS's own default.
_CUBLAS_CHOICE = _os.environ.get("MINITRAIN_CUBLAS_WORKSPACE", "").strip() or "none"
if _CUBLAS_CHOICE not in ("none", "default"):
    raise ValueError(f"MINITRAIN_CUBLAS_WORKSPACE={_CUBLAS_CHOICE!r}: expected 'none' (minitrain's default: "
                     "CUBLAS_WORKSPACE_CONFIG=:0:0 unless already set) or 'default' (cuBLAS's own workspace)")
if _CUBLAS_CHOICE == "none" and not _os.environ.get("CUBLAS_WORKSPACE_CONFIG", "").strip():
    _os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"

from .generate import generate
from .loader import load_model
from .model import LlamaForCausalLM, ModelArgs
from .tokenizer import Tokenizer
from .data import load_dataset
from .config import LoRAConfig, TrainConfig
from .lora import add_lora, load_adapter, save_adapter, save_merged
from .trainer import Trainer
