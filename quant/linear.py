"""NF4Linear: a frozen 4-bit linear layer (bitsandbytes' Linear4bit, NF4 with double quantization)."""
from __future__ import annotations

import torch
from torch import nn

from .matmul import matmul_nf4
from .nf4 import NF4Weight, quantize_nf4


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T (+ bias) with W held as an :class:`NF4Weight` (frozen; not a Parameter).

    The quantized tensors are registered as buffers so ``.to()``/``.cuda()`` move them; ``state_dict``
    uses bitsandbytes' keys (``weight``, ``weight.absmax``, ...), so a module prefix such as
    ``model.layers.0.mlp.down_proj.`` gives exactly the keys of a "-bnb-4bit" checkpoint.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nf4(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # Move the packed weight with the module (it is not a Parameter, so nn.Module would skip it).
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight.state_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if mine:
            self.weight = NF4Weight.from_state_dict(mine, prefix, device=self.weight.device)
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias.data.copy_(state_dict[prefix + "bias"])
        elif self.bias is not None and strict:
            missing_keys.append(prefix + "bias")
        elif prefix + "weight" not in state_dict and strict:
            missing_keys.append(prefix + "weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"
