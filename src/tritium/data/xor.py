"""XOR of two inputs with extra pure-noise inputs, generated in code."""

from __future__ import annotations

import torch
from torch import Tensor


def make_xor(n: int, noise: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` samples of ``noise + 2`` inputs in {-1, +1}; the label is XOR of the first two inputs, the
    other inputs are independent coin flips. Returns (x float32 of shape (n, 2 + noise), y int64)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, 2 + noise), generator=g)
    y = bits[:, 0] ^ bits[:, 1]
    return bits.float() * 2 - 1, y.long()
