"""Packed ternary weights and the ternary x int8 matmul.

Contract (every backend computes exactly this):

* ``pack(q)``: int8 ``(N, K)`` with values in {-1, 0, 1} -> uint8 ``(N, ceil(K / 4))``, 4 weights per
  byte (layout in `tritium.kernels.reference`).
* ``unpack(packed, n, k)``: the inverse.
* ``ternary_matmul(xq, packed, n, k, sx, sw, bias)``: ``xq`` int8 ``(M, K)``, ``sx`` float32 ``(M,)``,
  ``sw`` float32 ``(N,)`` (or ``(1,)`` for a per-tensor scale), ``bias`` float32 ``(N,)`` or None ->
  float32 ``(M, N)`` with ``y[m, n] = float(acc[m, n]) * (sx[m] * sw[n]) + bias[n]``, where
  ``acc = xq @ q^T`` is accumulated exactly in int32 and each float operation is rounded separately
  (no fused multiply-add), so all backends agree bit for bit.

Activations may use the full int8 range [-128, 127] (the quantizer produces [-127, 127]); ``K`` is at
most 131,072 so that ``|acc| <= 2^24`` is exact in float32.

Backends: ``amx`` (AVX-512 VNNI for fewer than 16 rows, AMX tiles from 16 rows on), ``avx512``
(AVX-512 VNNI), ``avx2``, ``generic`` (portable C), all multithreaded with ``torch.get_num_threads()``
threads, and ``reference`` (pure PyTorch). The default ``auto`` picks the fastest one this CPU supports;
``TRITIUM_KERNEL=auto|amx|avx512|avx2|generic|reference`` or `set_backend` forces one. Without the
compiled library, ``auto`` falls back to the reference with a warning.
``ternary_matmul`` is the custom op ``torch.ops.tritium.ternary_matmul``, so it works under
``torch.compile(fullgraph=True)`` and ``torch.inference_mode()``.
"""

import os
import warnings

import torch
from torch import Tensor

from . import _native, reference
from .reference import pack, unpack

__all__ = ["pack", "unpack", "ternary_matmul", "set_backend", "get_backend", "available_backends", "MAX_K"]

MAX_K = 1 << 17
BACKENDS = ("amx", "avx512", "avx2", "generic", "reference")

_lib, _load_error = _native.load()
_backend: str | None = None  # resolved lazily from TRITIUM_KERNEL


def _reload_library() -> None:
    """Load the compiled library again (honouring ``TRITIUM_KERNEL_LIB``) and forget the chosen backend."""
    global _lib, _load_error, _backend
    _lib, _load_error = _native.load()
    _backend = None


def available_backends() -> list[str]:
    """The backends this machine can run, fastest first (``reference`` is always there)."""
    return ([] if _lib is None else _native.supported(_lib)) + ["reference"]


def _resolve(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown kernel backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    available = available_backends()
    if name == "auto":
        if _lib is None:
            warnings.warn(
                f"tritium: compiled kernels unavailable ({_load_error}); using the slow PyTorch reference",
                RuntimeWarning, stacklevel=3,
            )
        return available[0]
    if name not in available:
        why = f"the compiled library is unavailable: {_load_error}" if _lib is None else "this CPU lacks it"
        raise RuntimeError(
            f"kernel backend {name!r} is not available ({why}); available: {', '.join(available)}"
        )
    return name


def set_backend(name: str) -> None:
    """Use backend ``name`` (``auto`` or one of `available_backends`) from now on."""
    global _backend
    _backend = _resolve(name)


def get_backend() -> str:
    """The backend in use (on first use: ``TRITIUM_KERNEL``, default ``auto``, resolved)."""
    global _backend
    if _backend is None:
        _backend = _resolve(os.environ.get("TRITIUM_KERNEL", "auto") or "auto")
    return _backend


@torch.library.custom_op("tritium::ternary_matmul", mutates_args=())
def _ternary_matmul_op(
    xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None
) -> Tensor:
    backend = get_backend()
    if backend == "reference" or xq.device.type != "cpu":
        return reference.ternary_matmul(xq, packed, n, k, sx, sw, bias)
    xq, packed, sx, sw = xq.contiguous(), packed.contiguous(), sx.contiguous(), sw.contiguous()
    bias = None if bias is None else bias.contiguous()
    m = xq.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    rc = _lib.tk_ternary_matmul(
        _native.NATIVE_IDS[backend], xq.data_ptr(), packed.data_ptr(), sx.data_ptr(), sw.data_ptr(),
        int(sw.numel() != 1), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"tritium kernel {backend!r} failed with code {rc}")
    return y


@_ternary_matmul_op.register_fake
def _(xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None) -> Tensor:
    return xq.new_empty((xq.shape[0], n), dtype=torch.float32)


def _check(t: Tensor, name: str, dtype: torch.dtype, numel: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"ternary_matmul: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"ternary_matmul: {name} must be {dtype}, got {t.dtype}")
    if t.numel() not in numel:
        raise ValueError(
            f"ternary_matmul: {name} has shape {tuple(t.shape)}, expected {' or '.join(map(str, numel))} elements"
        )
    if t.device != device:
        raise ValueError(f"ternary_matmul: {name} is on {t.device}, expected {device} like xq")


def ternary_matmul(
    xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``float(xq @ unpack(packed)^T) * (sx[:, None] * sw[None, :]) + bias`` as float32 ``(M, n)``.

    ``xq`` int8 ``(M, k)``; ``packed`` uint8 ``(n, ceil(k / 4))`` from `pack`; ``sx`` float32 ``(M,)``;
    ``sw`` float32 ``(n,)`` or ``(1,)``; ``bias`` float32 ``(n,)`` or None. Non-contiguous inputs are
    copied. Raises TypeError/ValueError for wrong dtypes, shapes or devices.
    """
    if not isinstance(xq, Tensor) or xq.dtype != torch.int8 or xq.dim() != 2:
        desc = f"{xq.dtype} tensor of shape {tuple(xq.shape)}" if isinstance(xq, Tensor) else type(xq).__name__
        raise TypeError(f"ternary_matmul: xq must be a 2-D int8 tensor (M, K), got {desc}")
    n, k = int(n), int(k)
    if n < 0 or k < 0 or k > MAX_K:
        raise ValueError(f"ternary_matmul: need 0 <= n and 0 <= k <= {MAX_K}, got n={n}, k={k}")
    if xq.shape[1] != k:
        raise ValueError(f"ternary_matmul: xq has {xq.shape[1]} columns, expected k={k}")
    m, dev = xq.shape[0], xq.device
    _check(packed, "packed", torch.uint8, (n * ((k + 3) // 4),), dev)
    _check(sx, "sx", torch.float32, (m,), dev)
    _check(sw, "sw", torch.float32, (1, n), dev)
    if bias is not None:
        _check(bias, "bias", torch.float32, (n,), dev)
        bias = bias.reshape(n).contiguous()
    return _ternary_matmul_op(
        xq.contiguous(), packed.reshape(n, (k + 3) // 4).contiguous(), n, k, sx.reshape(m).contiguous(),
        sw.reshape(-1).contiguous(), bias,
    )
