"""The quantizer maths, used by training (`BitLinear`), post-training quantization and inference.

Weights (``W`` of shape ``(N, K)``), with ``m`` the chosen measure of ``|W|`` over the chosen granularity:

* ternary (1.58 bits): ``s = max(m, eps)``, ``q = clamp(round(W / s), -1, 1)``  (BitNet b1.58 with absmean)
* binary (1 bit):      ``s = m``,             ``q = +1 where W >= 0 else -1``
* b-bit (2, 4, 8):     ``s = max(m, eps) / 2^(b-1)``, ``q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)``

The dequantized weight is ``q * s``. ``round`` is round-half-to-even. Measures are taken in float32 (a
bf16/fp16 weight is upcast first): ``absmax`` and ``absmedian`` select one element, so they are exact;
``absmean`` is a pairwise (cascade) float32 sum divided by the element count, within a few float32 ulps
of the exact mean at any size and thread count (tested against float64 on a 4096 x 11008 weight). The
measure of an empty block is 0. ``absmedian`` is the lower median
(``torch.median``). For a per-tensor median over more than ``2 * BitConfig.median_sample`` elements the
median is the exact median of a fixed strided subsample ``|W|.flatten()[::p]`` with a prime stride ``p``
that does not divide the row length (see `abs_median`). With the default sample of 2^18 elements the
sample median lies within about 0.5% of the exact median (its rank error is about 1/sqrt(sample)) while
reading only about 2^18 elements; this is tested in ``tests/test_quant.py``. ``median_sample=0`` gives the
exact median always.

Activations ``x`` (per token, over the last dimension), with ``Q = 2^(b-1) - 1`` (127 for 8 bits), in
float32 (bf16/fp16/fp64 inputs are converted to float32 first), each step one correctly rounded IEEE
float32 operation, in this order:

    ``a = max(absmax(x), 1e-5)``,  ``inv = Q / a`` (a true division),  ``q = round(x * inv)``,
    ``s_x = a / Q`` (a true division)

i.e. the symmetric range [-127, 127]: a scale of 127 so that no value ever needs clipping (``|x * inv|``
rounds to at most ``Q``). (The reference package of Nielsen et al. scales by 128 and clips to 127, which
clips the largest positive value of every token by one step.) The inverse is the quotient ``fl(Q / a)``,
not ``Q * fl(1 / a)``: the two differ in the last bit for some ``a``, which moves ``x * inv`` across a
rounding tie. The native kernels (`tritium.kernels`) compute exactly these operations, so torch and C
agree bit for bit. A NaN anywhere in a token makes its scale NaN, so the whole token's output is NaN:
NaN propagates and never raises.

A linear layer computes ``y = (q_x @ q_w^T) * (s_x * s_w) + bias`` in float32 when the weight scale is
per tensor or per channel (the integer product is exact in float32 while ``K * Q * max|q_w| <= 2^24``:
``K <= 132,104`` for ternary and binary weights with 8-bit activations), and
``y = (q_x @ (q_w * s_w)^T) * s_x + bias`` for group scales or a partial warm-up blend. `BitLinear`
computes all of this in float32 for every parameter and input dtype and rounds only its output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import BitConfig

WEIGHT_EPS = 1e-8
ACT_EPS = 1e-5


def _sample_stride(n: int, row: int, sample: int) -> int:
    """Largest prime p <= n // sample that does not divide the row length (so rows are sampled evenly)."""
    p = max(2, n // sample)
    while p > 2 and (row % p == 0 or any(p % d == 0 for d in range(2, math.isqrt(p) + 1))):
        p -= 1
    return p


def abs_median(w: Tensor, dim: int | None = None, sample: int = 0) -> Tensor:
    """Lower median of ``|w|`` over ``dim`` (None: the whole tensor).

    With ``sample > 0`` and a whole-tensor median over more than ``2 * sample`` elements, returns the
    exact median of the deterministic strided subsample ``|w|.flatten()[::p]`` instead, ``p`` being the
    largest prime ``<= numel // sample`` that does not divide the row length: such a stride visits every
    column position equally often, so no row or column pattern biases the sample.
    """
    if dim is not None:
        if w.shape[dim] == 0:
            return w.new_zeros(_reduced_shape(w, dim))
        return w.abs().median(dim=dim, keepdim=True).values
    flat = w.reshape(-1)
    n = flat.numel()
    if n == 0:
        return w.new_zeros(())
    if sample and n > 2 * sample:
        flat = flat[:: _sample_stride(n, w.shape[-1], sample)]
    return flat.abs().median()


def _reduced_shape(x: Tensor, dim: int) -> tuple[int, ...]:
    shape = list(x.shape)
    shape[dim] = 1
    return tuple(shape)


def abs_mean(w: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``|w|`` over ``dim`` (keepdim) or the whole tensor (0 for an empty one).

    A float32 ``w`` is summed pairwise (torch's cascade sum), so the result is within a few float32 ulps of
    the exact mean at any size and thread count. (``torch.linalg.vector_norm(w, 1)`` accumulates serially in
    float32 and loses up to 17% on a 4096 x 11008 weight.)
    """
    if dim is None:
        return w.abs().sum() / max(w.numel(), 1)
    return w.abs().sum(dim=dim, keepdim=True) / max(w.shape[dim], 1)


def _measure(w: Tensor, measure: str, dim: int | None, sample: int) -> Tensor:
    """The measure of ``|w|``: over the whole tensor (dim None) or over ``dim`` with keepdim."""
    if measure == "absmedian":
        return abs_median(w, dim, sample)
    if measure == "absmean":
        return abs_mean(w, dim)
    return absmax(w, dim)


def absmax(x: Tensor, dim: int | None = None) -> Tensor:
    """``max |x|`` over ``dim`` (keepdim) or the whole tensor (0 for an empty one); NaN propagates.
    (Two reductions without an ``abs`` temporary: about twice as fast as ``x.abs().amax()`` on CPU.)"""
    if dim is None:
        if x.numel() == 0:
            return x.new_zeros(())
        return torch.maximum(x.amax(), -x.amin())
    if x.shape[dim] == 0:
        return x.new_zeros(_reduced_shape(x, dim))
    return torch.maximum(x.amax(dim, keepdim=True), -x.amin(dim, keepdim=True))


def weight_scale_shape(cfg: BitConfig, out_features: int, in_features: int) -> tuple[int, ...]:
    """Shape of the scale tensor `quantize_weight` returns: (), (N, 1) or (N, K // G)."""
    if cfg.granularity == "tensor":
        return ()
    if cfg.granularity == "channel":
        return (out_features, 1)
    return (out_features, in_features // cfg.group_size)


def check_group(cfg: BitConfig, in_features: int, where: str = "layer") -> None:
    g = cfg.group_size
    if g is not None and in_features % g:
        raise ValueError(f"{where}: group size {g} does not divide in_features={in_features}")


def _grouped(w: Tensor, cfg: BitConfig) -> Tensor:
    """``w`` as float32, ``(N, K // G, G)`` for group scales, else ``(N, K)``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    check_group(cfg, k)
    wf = w.float()
    return wf.reshape(n, k // cfg.group_size, cfg.group_size) if cfg.group_size is not None else wf


def _scale(wf: Tensor, cfg: BitConfig) -> Tensor:
    """The scale of a `_grouped` weight, with kept dimensions so that it broadcasts against it."""
    m = _measure(wf, cfg.measure, None if cfg.granularity == "tensor" else -1, cfg.median_sample)
    if cfg.weight_bits == 1:
        return m
    return m.clamp(min=WEIGHT_EPS) / (1 if cfg.ternary else 2 ** (int(cfg.weight_bits) - 1))


def weight_scale(w: Tensor, cfg: BitConfig) -> Tensor:
    """The float32 scale `quantize_weight` gives ``w`` ``(N, K)``, of shape `weight_scale_shape` (pass a
    detached ``w``, or call it under ``torch.no_grad()``, unless its gradient is wanted)."""
    s, shape = _scale(_grouped(w, cfg), cfg), weight_scale_shape(cfg, *w.shape)
    return s if s.shape == shape else s.reshape(shape)  # a fresh tensor, never a view, where it can


@torch.no_grad()
def quantize_weight(w: Tensor, cfg: BitConfig) -> tuple[Tensor, Tensor]:
    """Quantize a weight ``(N, K)`` to integer values ``q`` (same dtype as ``w``) and a float32 scale.

    The scale has shape `weight_scale_shape` (``()`` per tensor, ``(N, 1)`` per channel, ``(N, K//G)``
    per group); `dequantize_weight` gives ``q * s``.
    """
    wf = _grouped(w, cfg)
    n, k = w.shape
    s = _scale(wf, cfg)
    if cfg.weight_bits == 1:
        q = torch.where(wf >= 0, 1.0, -1.0)
    else:
        half = 1 if cfg.ternary else 2 ** (int(cfg.weight_bits) - 1)
        q = (wf / s).round_().clamp_(-1 if cfg.ternary else -half, 1 if cfg.ternary else half - 1)
    return q.reshape(n, k).to(w.dtype), s.reshape(weight_scale_shape(cfg, n, k))


def expand_scale(s: Tensor, shape: tuple[int, int]) -> Tensor:
    """Broadcast a weight scale of any granularity to the full weight ``shape``."""
    n, k = shape
    if s.dim() == 2 and s.shape[1] not in (1, k):
        return s.repeat_interleave(k // s.shape[1], dim=1)
    return s.expand(n, k) if s.dim() else s


def dequantize_weight(q: Tensor, s: Tensor) -> Tensor:
    """``q * s`` in ``q``'s dtype, for any granularity."""
    return (q * expand_scale(s, tuple(q.shape)).to(q.dtype))


def row_scale(s: Tensor, out_features: int) -> Tensor | None:
    """The per-output scale ``(N,)`` or ``()`` of a tensor/channel weight scale; None for group scales."""
    if s.dim() == 0:
        return s
    if s.shape[1] == 1:
        return s.reshape(out_features)
    return None


def quantize_act(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-token absmax quantization of ``x`` to ``bits`` signed bits: integer-valued ``q`` and scale ``s``.

    Computed in float32 whatever ``x``'s dtype, as the float32 operations of the module docstring
    (``inv = Q / a`` and ``s = a / Q`` by true division). ``q`` has ``x``'s dtype and shape (its integers
    are exact in any float dtype); ``s`` is float32 of shape ``x.shape[:-1] + (1,)``; ``q * s``
    approximates ``x``.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    a = absmax(xf, -1).clamp_(min=ACT_EPS)  # the bound is the float32 number nearest 1e-5, as in C
    # Tensor numerators and divisors: a Python number would let torch multiply by a rounded reciprocal.
    big_q = torch.full_like(a, qmax)
    q = (xf * (big_q / a)).round_()  # |q| <= qmax by construction: no clamp needed
    return q.to(x.dtype), a / big_q


def input_norm(x: Tensor, norm: str | None) -> Tensor:
    """The parameter-free input norm over the last dimension (eps 1e-5 for layernorm, 1e-6 for rmsnorm).

    kernels/csrc/op.cpp calls the same ATen norms with the same eps (tests/test_decode_fast.py checks them equal).
    """
    if norm == "layernorm":
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-5)
    if norm == "rmsnorm":
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)
    return x
