"""minitrain: LoRA/QLoRA fine-tuning of Llama-family models on the kernels of ``triton_ops``, ``csrc``
and ``quant``."""
__version__ = "0.1.0"
