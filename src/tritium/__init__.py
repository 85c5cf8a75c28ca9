"""tritium: 1.58-bit neural networks in PyTorch.

Train with ternary weights (`quantize` any model, then train as usual), freeze into packed 2-bit
weights, and serve with fast CPU kernels (`freeze`, `save`, `load`); generate text with a saved
transformers model (`load_pretrained`, `generate`); export a ternary Llama-family decoder to GGUF for
llama.cpp (`export`).
"""

from .config import BitConfig, Precision, format_spec, parse_precision, parse_spec
from .convert import LambdaWarmup, freeze, ptq, quantize, set_lambda, summary
from .formats import export
from .formats.native import load, save
from .generation import generate, load_pretrained
from .nn import BitLinear, TernaryLinear

__version__ = "0.1.0"

__all__ = [
    "BitConfig",
    "BitLinear",
    "LambdaWarmup",
    "Precision",
    "TernaryLinear",
    "export",
    "format_spec",
    "freeze",
    "generate",
    "load",
    "load_pretrained",
    "parse_precision",
    "parse_spec",
    "ptq",
    "quantize",
    "save",
    "set_lambda",
    "summary",
]
