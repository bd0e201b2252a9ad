"""minitrain: LoRA/QLoRA fine-tuning of Llama-family models on the kernels of ``triton_ops``, ``csrc``
and ``quant``."""
__version__ = "0.1.0"

from .generate import generate
from .loader import load_model
from .model import LlamaForCausalLM, ModelArgs
from .tokenizer import Tokenizer
from .data import load_dataset
