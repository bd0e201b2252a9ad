"""NF4Linear: a frozen 4-bit linear layer (bitsandbytes' Linear4bit, NF4 with double quantization)."""
from __future__ import annotations

import torch
from torch import nn

from .matmul import matmul_nf4
from .nf4 import NF4Weight, quantize_nf4


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T (+ bias) with W held as an :class:`NF4Weight` (frozen; not a Parameter).

    The quantized tensors are not buffers: ``_apply`` moves them with the module (``.to(device)``/``.cuda()``; a
    dtype cast leaves the 4-bit bytes as they are and changes only the bias), and ``state_dict``
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
        w = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == w or k.startswith(w + ".")}
        if mine:
            q = NF4Weight.from_state_dict(mine, prefix, device=self.weight.device)
            known_weight = set(q.state_dict(prefix))
            if q.shape != self.weight.shape:  # nn.Linear's rule: a checkpoint never changes the module's shape
                error_msgs.append(f"size mismatch for {w}: the checkpoint's quant_state has shape {tuple(q.shape)}, "
                                  f"the module expects {tuple(self.weight.shape)} (out_features, in_features)")
            else:
                self.weight = q
        elif strict:
            missing_keys.append(w)
        b = prefix + "bias"
        if self.bias is not None and b in state_dict:
            if state_dict[b].shape != self.bias.shape:
                error_msgs.append(f"size mismatch for {b}: copying a tensor of shape {tuple(state_dict[b].shape)}, "
                                  f"the module expects {tuple(self.bias.shape)}")
            else:
                self.bias.data.copy_(state_dict[b])
        elif self.bias is not None and strict:
            missing_keys.append(b)
        if strict:  # nn.Module's rule: keys under this prefix that name nothing this module holds
            known = (known_weight if mine else set()) | ({b} if self.bias is not None else set())
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"
