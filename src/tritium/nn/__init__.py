"""Layers: `BitLinear` for quantization-aware training, `TernaryLinear` for packed inference."""

from .bitlinear import BitLinear
from .ternary import TernaryLinear

__all__ = ["BitLinear", "TernaryLinear"]
