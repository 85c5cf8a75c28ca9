"""`BitConv1D`: a `BitLinear` that keeps transformers' `Conv1D` weight layout ``(in_features, out_features)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import BitConfig
from .bitlinear import BitLinear


class BitConv1D(BitLinear):
    """The quantization-aware form of transformers' `Conv1D` (GPT-2's linear layer, ``y = x @ W + b``).

    Computes exactly what a `BitLinear` with weight ``W^T`` computes, but stores ``weight`` as
    ``(in_features, out_features)``, as `Conv1D` does: its ``state_dict`` loads into a `Conv1D` and a
    `Conv1D` checkpoint loads into it, and `tritium.quantize` shares the original `Conv1D` parameter
    with it (tied weights and optimizer references keep working). ``nf``/``nx`` are `Conv1D`'s names for
    ``out_features``/``in_features``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: BitConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, config=config, device="meta", dtype=dtype)
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`Conv1D`'s initialisation: weight normal with std 0.02, bias zero."""
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, config: BitConfig | None = None) -> BitConv1D:
        """A `BitConv1D` sharing ``conv``'s weight and bias parameters (not copies)."""
        in_f, out_f = conv.weight.shape
        new = cls(in_f, out_f, bias=conv.bias is not None, config=config, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: BitConfig | None = None) -> BitConv1D:
        """A `BitConv1D` with a transposed copy of ``linear``'s weight and a copy of its bias."""
        w, b = linear.weight, linear.bias
        new = cls(linear.in_features, linear.out_features, b is not None, config, device="meta", dtype=w.dtype)
        new.weight = nn.Parameter(w.detach().t().clone(), requires_grad=w.requires_grad)
        if b is not None:
            new.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        return new

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def linear_weight(self) -> Tensor:
        """The weight in `nn.Linear` layout ``(out_features, in_features)`` (a view of ``weight``)."""
        return self.weight.t()
