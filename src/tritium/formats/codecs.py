"""Packed layouts of ternary weights: one table, `CODECS`, with one entry per layout.

Every entry turns an int8 ternary matrix ``q`` of shape ``(N, K)`` (values -1, 0, 1) into its packed bytes
and back. `pack` and `unpack` dispatch through the table by name; `unpack` treats its input as untrusted
and raises `TritiumFormatError` for the wrong dtype or shape, invalid codes or non-zero padding.

=============  ================================  ==========================================================
name           packed (uint8)                    layout
=============  ================================  ==========================================================
``2bit``       ``(N, ceil(K / 4))``              tritium's kernel layout: weight ``k`` at bits ``2 * (k % 4)``
                                                 of byte ``k // 4`` of its row, code ``w + 1``; the unused
                                                 fields of a row's last byte hold code 1 (a zero weight).
``base3``      ``(ceil(N * K / 5),)``            5 row-major weights per byte as ``sum((w_i + 1) * 3^i)``
                                                 (1.6 bits per weight); zero weights pad the last byte.
``tq2_0``      ``(N, K / 256 * 66)``             llama.cpp's TQ2_0 block of 256 weights: 64 bytes of 2-bit
                                                 codes ``w + 1`` (byte ``32 * g + m`` holds weights
                                                 ``128 * g + 32 * s + m`` at bits ``2 * s``), then the
                                                 block's scale as fp16.
``tq1_0``      ``(N, K / 256 * 54)``             llama.cpp's TQ1_0 block: 48 bytes of 5 and 4 bytes of 4
                                                 base-3 digits (most significant first, stored as
                                                 ``ceil(v * 256 / 243)``), then the fp16 scale.
``hf_bitnet``  ``(ceil(N / 4), K)``              transformers' BitNet packing: row ``i * R + j``
                                                 (``R = ceil(N / 4)``) at bits ``2 * i`` of packed row ``j``,
                                                 code ``w + 1``; missing rows of the last group hold code 0.
=============  ================================  ==========================================================

The TQ layouts carry a scale per block of 256 weights: `pack` takes the per-row scale of ``q`` (as
``gguf.quants.quantize(q * scale)`` computes it, bit for bit: a block without a non-zero weight gets scale
0, a negative row scale flips the codes) and `unpack_scaled` returns the block scales as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import TritiumFormatError

#: Weights per block of the llama.cpp TQ types (QK_K).
TQ_BLOCK = 256
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_POW3 = (1, 3, 9, 27, 81)
_BASE3_WEIGHTS = ((torch.arange(243).reshape(-1, 1) // torch.tensor(_POW3)) % 3 - 1).to(torch.int8)  # per byte
_BASE3_CHUNK = 1 << 20
_TQ1_POW = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)  # digit n of a TQ1_0 byte: (b * 3^n) & 255
_TQ1_PLACE = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)  # its place value


@dataclass(frozen=True)
class Codec:
    """One packed layout of ternary weights.

    Attributes:
        name: the key in `CODECS`.
        shape: the packed tensor's shape for an ``(n, k)`` weight.
        encode: ``(q, scale)`` -> packed uint8 (``scale`` is the per-row float32 scale, or None when the layout
            stores no scale); ``q`` is already validated.
        decode: ``(where, packed, n, k)`` -> (int8 ``q``, float32 block scales or None); ``packed`` has the
            right dtype and shape; raises `TritiumFormatError` (prefixed with ``where``) for invalid bytes.
        check: an optional faster validation of ``(where, packed, n, k)`` that does not unpack.
        block: ``k`` must be a multiple of it.
        scaled: whether the layout stores block scales.
    """

    name: str
    shape: Callable[[int, int], tuple[int, ...]]
    encode: Callable[[Tensor, Tensor | None], Tensor]
    decode: Callable[[str, Tensor, int, int], tuple[Tensor, Tensor | None]]
    check: Callable[[str, Tensor, int, int], None] | None = None
    block: int = 1
    scaled: bool = False


# ------------------------------------------------------------------------------------------------ 2bit


def _encode_2bit(q: Tensor, scale: Tensor | None) -> Tensor:
    n, k = q.shape
    codes = torch.nn.functional.pad((q + 1).to(torch.uint8), (0, (-k) % 4), value=1).reshape(n, -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def _check_2bit(where: str, p: Tensor, n: int, k: int) -> None:
    if p.bitwise_and(p >> 1).bitwise_and_(0x55).any():
        raise TritiumFormatError(f"{where}: packed weight holds the invalid code 3")
    if k % 4 and p.numel():
        shift = 2 * (k % 4)
        if (p[:, -1] >> shift).ne(0x55 >> shift).any():
            raise TritiumFormatError(f"{where}: packed weight has invalid padding")


def _decode_2bit(where: str, p: Tensor, n: int, k: int) -> tuple[Tensor, None]:
    codes = ((p.reshape(n, -1, 1) >> _SHIFTS) & 3).reshape(n, -1)
    if codes.eq(3).any():
        raise TritiumFormatError(f"{where}: packed weight holds the invalid code 3")
    if codes[:, k:].ne(1).any():
        raise TritiumFormatError(f"{where}: packed weight has invalid padding")
    return (codes[:, :k].to(torch.int8) - 1).reshape(n, k), None


# ----------------------------------------------------------------------------------------------- base3


def _encode_base3(q: Tensor, scale: Tensor | None) -> Tensor:
    codes = q.reshape(-1).to(torch.int16) + 1
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 5), value=1).reshape(-1, 5)
    return (codes * torch.tensor(_POW3, dtype=torch.int16)).sum(1).to(torch.uint8)


def _decode_base3(where: str, p: Tensor, n: int, k: int) -> tuple[Tensor, None]:
    if p.ge(243).any():
        raise TritiumFormatError(f"{where}: base-3 packed weight holds a byte >= 243")
    flat = p.reshape(-1)
    q = torch.empty(flat.numel() * 5, dtype=torch.int8)
    for i in range(0, flat.numel(), _BASE3_CHUNK):  # a table lookup per byte, in bounded chunks
        chunk = flat[i: i + _BASE3_CHUNK]
        torch.index_select(_BASE3_WEIGHTS, 0, chunk.to(torch.int32), out=q[5 * i: 5 * (i + chunk.numel())].view(-1, 5))
    if q[n * k:].ne(0).any():
        raise TritiumFormatError(f"{where}: packed weight has invalid padding")
    return q[: n * k].reshape(n, k), None


# ------------------------------------------------------------------------------------------- tq2_0/tq1_0


def _block_scales(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(codes ``q * sign(scale)`` as blocks ``(n, nb, 256)``, fp16 block scales as bytes ``(n, nb, 2)``)."""
    n, k = q.shape
    s = scale.to(torch.float32).reshape(-1).expand(n).reshape(n, 1, 1)
    blocks = (q.reshape(n, k // TQ_BLOCK, TQ_BLOCK) * torch.sign(s)).to(torch.int8)
    live = blocks.ne(0).any(dim=-1, keepdim=True)
    d = torch.where(live, s.abs(), torch.zeros(())).to(torch.float16)
    if not torch.isfinite(d).all():
        raise ValueError(f"scale {s.abs().max().item():.6g} overflows the fp16 block scale of the TQ types")
    return blocks, d.view(torch.uint8)


def _tq_split(p: Tensor, n: int, k: int, nbytes: int) -> tuple[Tensor, Tensor]:
    """(code bytes ``(n, nb, nbytes - 2)``, float32 block scales ``(n, nb)``) of TQ blocks."""
    blocks = p.reshape(n, k // TQ_BLOCK, nbytes)
    d = blocks[..., -2:].contiguous().view(torch.float16).reshape(n, -1).to(torch.float32)
    return blocks[..., :-2], d


def _encode_tq2(q: Tensor, scale: Tensor | None) -> Tensor:
    n = q.shape[0]
    blocks, d = _block_scales(q, scale)
    codes = (blocks + 1).to(torch.uint8).reshape(n, -1, 2, 4, 32)
    qs = codes[..., 0, :] | (codes[..., 1, :] << 2) | (codes[..., 2, :] << 4) | (codes[..., 3, :] << 6)
    return torch.cat([qs.reshape(n, -1, 64), d], dim=-1).reshape(n, -1)


def _decode_tq2(where: str, p: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    qs, d = _tq_split(p, n, k, 66)
    codes = (qs.reshape(n, -1, 2, 1, 32) >> _SHIFTS.reshape(4, 1)) & 3
    if codes.eq(3).any():
        raise TritiumFormatError(f"{where}: packed weight holds the invalid code 3")
    return (codes.to(torch.int8) - 1).reshape(n, k), d


def _tq1_bytes(codes: Tensor) -> Tensor:
    """Base-3 digit groups ``(..., digits, m)`` (most significant first) -> llama.cpp's bytes ``(..., m)``."""
    v = (codes.to(torch.int32) * _TQ1_PLACE[: codes.shape[-2]].reshape(-1, 1)).sum(-2)
    return (v * 256 + 242) // 243


def _encode_tq1(q: Tensor, scale: Tensor | None) -> Tensor:
    n = q.shape[0]
    blocks, d = _block_scales(q, scale)
    codes = (blocks + 1).reshape(n, -1, TQ_BLOCK)
    nb = codes.shape[1]
    qs = torch.cat([
        _tq1_bytes(codes[..., :160].reshape(n, nb, 5, 32)),
        _tq1_bytes(codes[..., 160:240].reshape(n, nb, 5, 16)),
        _tq1_bytes(codes[..., 240:].reshape(n, nb, 4, 4)),
    ], dim=-1).to(torch.uint8)
    return torch.cat([qs, d], dim=-1).reshape(n, -1)


def _decode_tq1(where: str, p: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    qs, d = _tq_split(p, n, k, 54)
    b = qs.to(torch.int32)
    digits = (((b.unsqueeze(-2) * _TQ1_POW.reshape(-1, 1)) & 255) * 3) >> 8  # (n, nb, 5, 52)
    if _tq1_bytes(digits).ne(b).any():
        raise TritiumFormatError(f"{where}: packed weight holds a byte that is not a base-3 code")
    if digits[..., 4, 48:].ne(0).any():
        raise TritiumFormatError(f"{where}: packed weight has invalid padding")
    nb = b.shape[1]
    codes = torch.cat([digits[..., :32].reshape(n, nb, 160), digits[..., 32:48].reshape(n, nb, 80),
                       digits[..., :4, 48:].reshape(n, nb, 16)], dim=-1)
    return (codes.to(torch.int8) - 1).reshape(n, k), d


# ------------------------------------------------------------------------------------------- hf_bitnet


def _encode_hf(q: Tensor, scale: Tensor | None) -> Tensor:
    n, k = q.shape
    rows = -(-n // 4)
    codes = torch.nn.functional.pad((q + 1).to(torch.uint8), (0, 0, 0, 4 * rows - n), value=0).reshape(4, rows, k)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def _decode_hf(where: str, p: Tensor, n: int, k: int) -> tuple[Tensor, None]:
    codes = ((p.unsqueeze(0) >> _SHIFTS.reshape(4, 1, 1)) & 3).reshape(-1, k)
    if codes.eq(3).any():
        raise TritiumFormatError(f"{where}: packed weight holds the invalid code 3")
    if codes[n:].ne(0).any():
        raise TritiumFormatError(f"{where}: packed weight has invalid padding")
    return codes[:n].to(torch.int8) - 1, None


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("2bit", lambda n, k: (n, -(-k // 4)), _encode_2bit, _decode_2bit, check=_check_2bit),
    Codec("base3", lambda n, k: (-(-n * k // 5),), _encode_base3, _decode_base3),
    Codec("tq2_0", lambda n, k: (n, k // TQ_BLOCK * 66), _encode_tq2, _decode_tq2, block=TQ_BLOCK, scaled=True),
    Codec("tq1_0", lambda n, k: (n, k // TQ_BLOCK * 54), _encode_tq1, _decode_tq1, block=TQ_BLOCK, scaled=True),
    Codec("hf_bitnet", lambda n, k: (-(-n // 4), k), _encode_hf, _decode_hf),
)}


# ------------------------------------------------------------------------------------------------ API


def codec(name: str) -> Codec:
    """The `Codec` called ``name``; ValueError naming the known ones otherwise."""
    c = CODECS.get(name) if isinstance(name, str) else None
    if c is None:
        raise ValueError(f"unknown packed layout {name!r}; choose one of {', '.join(CODECS)}")
    return c


def packed_shape(name: str, n: int, k: int) -> tuple[int, ...]:
    """The shape of the packed tensor of an ``(n, k)`` weight in layout ``name``."""
    return codec(name).shape(n, k)


def pack(name: str, q: Tensor, scale: Tensor | float | None = None) -> Tensor:
    """The ternary ``(N, K)`` weight ``q`` (values -1, 0, 1, any dtype) packed in layout ``name`` (uint8).

    The TQ layouts need ``scale``: the weight's float scale, one per tensor (a number or a 1-element tensor)
    or per row (``(N,)``). ValueError for a ``q`` that is not 2-D and ternary, a ``K`` that is not a
    multiple of the layout's block, a missing or misshapen ``scale``, or one that overflows fp16.
    """
    c = codec(name)
    if not isinstance(q, Tensor) or q.dim() != 2 or min(q.shape) < 1:
        raise ValueError(f"pack({name!r}): q must be a non-empty 2-D tensor, got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    if q.is_complex() or not (q.eq(0) | q.eq(1) | q.eq(-1)).all():
        raise ValueError(f"pack({name!r}): q must hold only -1, 0 and 1")
    n, k = q.shape
    if k % c.block:
        raise ValueError(f"pack({name!r}): K={k} is not a multiple of the block of {c.block} weights")
    s = None
    if c.scaled:
        if scale is None:
            raise ValueError(f"pack({name!r}): the layout stores block scales; pass scale")
        s = torch.as_tensor(scale, dtype=torch.float32).detach().cpu().reshape(-1)
        if s.numel() not in (1, n) or not torch.isfinite(s).all():
            raise ValueError(f"pack({name!r}): scale must be 1 or N={n} finite numbers, got {s.numel()} values")
    elif scale is not None:
        raise ValueError(f"pack({name!r}): the layout stores no scale")
    return c.encode(q.detach().cpu().to(torch.int8), s).contiguous()


def _checked(c: Codec, where: str, packed: Tensor, n: int, k: int) -> None:
    for label, v in (("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"unpack({c.name!r}): {label}={v!r} must be a positive integer")
    if k % c.block:
        raise TritiumFormatError(f"{where}: {k} columns are not a multiple of the {c.name} block of {c.block}")
    want = c.shape(n, k)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        got = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise TritiumFormatError(f"{where}: packed weight is {got}, expected torch.uint8 {list(want)} for a "
                                 f"{n}x{k} weight in {c.name}")


def unpack_scaled(name: str, packed: Tensor, n: int, k: int, where: str | None = None) -> tuple[Tensor, Tensor | None]:
    """(int8 ``(n, k)`` weight, float32 ``(n, k / 256)`` block scales or None) of a packed weight.

    Raises `TritiumFormatError`, prefixed with ``where`` (default: the layout's name), for a packed tensor of
    the wrong dtype or shape, invalid codes or non-zero padding; ValueError for an unknown layout or a
    non-positive ``n`` or ``k``.
    """
    c = codec(name)
    where = c.name if where is None else where
    _checked(c, where, packed, n, k)
    return c.decode(where, packed.cpu(), n, k)


def unpack(name: str, packed: Tensor, n: int, k: int, where: str | None = None) -> Tensor:
    """The int8 ``(n, k)`` ternary weight of a weight packed in layout ``name`` (see `unpack_scaled`)."""
    return unpack_scaled(name, packed, n, k, where)[0]


def check(name: str, packed: Tensor, n: int, k: int, where: str | None = None) -> None:
    """Raise what `unpack` raises, without returning the weight (cheaper for layouts that can check in place)."""
    c = codec(name)
    where = c.name if where is None else where
    _checked(c, where, packed, n, k)
    if c.check is not None:
        c.check(where, packed.cpu(), n, k)
    else:
        c.decode(where, packed.cpu(), n, k)


def bits_per_weight(name: str, n: int, k: int) -> float:
    """Bits per weight of an ``(n, k)`` weight packed in layout ``name``, block scales and padding included."""
    return 8 * math.prod(packed_shape(name, n, k)) / (n * k)


__all__ = ["CODECS", "TQ_BLOCK", "Codec", "TritiumFormatError", "bits_per_weight", "check", "codec", "pack",
           "packed_shape", "unpack", "unpack_scaled"]
