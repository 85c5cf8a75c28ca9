"""Layers: `BitLinear` for quantization-aware training, `TernaryLinear` for packed inference."""

from .bitlinear import BitLinear

__all__ = ["BitLinear"]
