"""Layers: `BitLinear` (and `BitConv1D`) for quantization-aware training, `TernaryLinear` for packed inference."""

from .bitlinear import BitLinear
from .conv1d import BitConv1D
from .ternary import FrozenWeight, TernaryLinear

__all__ = ["BitConv1D", "BitLinear", "FrozenWeight", "TernaryLinear"]
