"""minitrain: LoRA/QLoRA fine-tuning of Llama-family models on the kernels of ``triton_ops``, ``csrc``
and ``quant``."""
__version__ = "0.1.0"

from .generate import generate
from .loader import load_model
from .model import LlamaForCausalLM, ModelArgs
from .tokenizer import Tokenizer
from .data import load_dataset
from .config import LoRAConfig, TrainConfig
from .lora import add_lora, load_adapter, save_adapter, save_merged
from .trainer import Trainer
