"""Pure-PyTorch reference implementation of the kernel contract (see `tritium.kernels`).

Packed layout: row-major ``(N, ceil(K / 4))`` uint8; weight ``k`` of a row sits in byte ``k // 4`` at
bits ``2 * (k % 4)``, coded ``w + 1``: 0 -> -1, 1 -> 0, 2 -> +1 (3 is invalid). The unused fields of a
row's last byte (when ``K % 4 != 0``) hold code 1 (a zero weight).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack(q: Tensor) -> Tensor:
    """Pack an int ``(N, K)`` tensor with values in {-1, 0, 1} into uint8 ``(N, ceil(K / 4))``."""
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D ternary weight, got shape {tuple(q.shape)}")
    n, k = q.shape
    codes = (q.to(torch.int8) + 1).to(torch.uint8)
    pad = (-k) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=1)
    codes = codes.reshape(n, (k + pad) // 4, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """The int8 ``(n, k)`` ternary weight held by a packed buffer (inverse of `pack`)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.reshape(n, (k + 3) // 4, 1) >> shifts) & 3
    return (codes.to(torch.int8) - 1).reshape(n, 4 * ((k + 3) // 4))[:, :k].contiguous()


def ternary_matmul(
    xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``float(xq @ q^T) * (sx[:, None] * sw[None, :]) + bias`` with ``q = unpack(packed, n, k)``."""
    w = unpack(packed, n, k).to(torch.float32)
    acc = xq.to(torch.float32) @ w.t()  # exact: |acc| <= 128 * K <= 2^24 for K <= 131,072
    acc.add_(0.0)  # an integer sum is +0, never -0 (a float sum of products such as -5 * 0 can give -0)
    y = acc * (sx.reshape(-1, 1) * sw.reshape(1, -1))
    if bias is not None:
        y = y + bias
    return y
