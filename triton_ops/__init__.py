"""Triton kernels for LoRA/QLoRA training, one op per module.

Each module holds the op's pure-torch reference (``<op>_ref``), its Triton kernel(s), a launcher that
validates inputs, the ``torch.library`` registration and the public function. The package depends only on
torch and triton, so a single op can be imported on its own.
"""
