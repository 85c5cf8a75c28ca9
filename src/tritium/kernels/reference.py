"""Pure-PyTorch reference implementation of the kernel contract (see `tritium.kernels`).

Packed layout: row-major ``(N, ceil(K / 4))`` uint8; weight ``k`` of a row sits in byte ``k // 4`` at
bits ``2 * (k % 4)``, coded 0 -> 0, 1 -> +1, 2 -> -1 (3 is invalid).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack(q: Tensor) -> Tensor:
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D ternary weight, got shape {tuple(q.shape)}")
    n, k = q.shape
    codes = torch.where(q < 0, 2, q).to(torch.uint8)
    pad = (-k) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(n, -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack(packed: Tensor, n: int, k: int) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.reshape(n, -1, 1) >> shifts) & 3
    q = codes.to(torch.int8)
    q = torch.where(q == 2, torch.tensor(-1, dtype=torch.int8, device=packed.device), q)
    return q.reshape(n, -1)[:, :k].contiguous()


def ternary_matmul(
    xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None = None
) -> Tensor:
    w = unpack(packed, n, k).to(torch.float32)
    acc = xq.to(torch.float32) @ w.t()  # exact: |acc| <= 127 * K < 2^24 for K < 132,104
    y = acc * (sx.reshape(-1, 1) * sw.reshape(1, -1))
    if bias is not None:
        y = y + bias
    return y
