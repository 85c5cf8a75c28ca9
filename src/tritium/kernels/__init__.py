"""Packed ternary weights and the ternary x int8 matmul.

Contract (every backend computes exactly this):

* ``pack(q)``: int8 ``(N, K)`` with values in {-1, 0, 1} -> uint8 ``(N, ceil(K / 4))``, 4 weights per
  byte (layout and definition in `tritium.kernels.reference`; the native backends pack in C, bit for bit).
* ``unpack(packed, n, k)``: the inverse.
* ``quantize_ternary(w, s)``: float32 ``(N, K)`` and its ternary scale -> int8 ``q``, ``pack(q)`` and the
  per-row scale for `ternary_matmul`, in one pass; ``q`` is ``tritium.quant.quantize_weight``'s.
* ``ternary_matmul(xq, packed, n, k, sx, sw, bias)``: ``xq`` int8 ``(M, K)``, ``sx`` float32 ``(M,)``,
  ``sw`` float32 ``(N,)`` (or ``(1,)`` for a per-tensor scale), ``bias`` float32 ``(N,)`` or None ->
  float32 ``(M, N)`` with ``y[m, n] = float(acc[m, n]) * (sx[m] * sw[n]) + bias[n]``, where
  ``acc = xq @ q^T`` is accumulated exactly in int32 and each float operation is rounded separately
  (no fused multiply-add), so all backends agree bit for bit.

Activations may use the full int8 range [-128, 127] (the quantizer produces [-127, 127]); ``K`` is at
most 131,072 so that ``|acc| <= 2^24`` is exact in float32.

* ``quantize_rows(x)``: float32 ``(M, K)`` -> int8 ``q`` ``(M, K)`` and float32 ``s`` ``(M,)``, the per-token
  8-bit activation quantizer. Its definition is `tritium.quant.quantize_act` (``x, 8``), four correctly
  rounded float32 operations per row: ``a = max(absmax(x_row), 1e-5)``, ``inv = 127 / a`` (true division,
  not ``127 * (1 / a)``), ``q = round_half_even(x * inv)``, ``s = a / 127`` (true division). The native
  backends compute exactly these operations in C (no fused multiply-add, no reciprocal estimate) and are
  tested bit-exact (``q`` and ``s``), rounding ties included, against ``quant.quantize_act`` and against
  an independent numpy reference for every backend (tests/test_kernels.py, tests/test_quant_properties.py);
  change the maths in quant.py and the C code together. A row with a NaN gets ``s = NaN`` (an inf:
  ``s = inf``) and ``q = 0``, so that token's output is NaN. An empty row (``K = 0``) gets
  ``s = 1e-5 / 127``.
* ``ternary_linear(x, packed, n, k, sw, bias)``: ``ternary_matmul(*quantize_rows(x), ...)`` in one native
  call (the int8 rows go straight into the kernel's activation layout), bit-identical to the
  composition. `tritium.nn.TernaryLinear` runs on it.

Backends: ``amx`` (AVX-512 VNNI for fewer than 16 rows, AMX tiles from 16 rows on), ``avx512``
(AVX-512 VNNI), ``avx2``, ``neon`` (aarch64 with the dot-product extension), ``generic`` (portable C),
all multithreaded with ``torch.get_num_threads()`` threads on the OpenMP runtime that torch itself uses
(see `openmp_runtime`; like torch's own ops, a process forked after multithreaded work must call
``torch.set_num_threads(1)`` before using them), and
``reference`` (pure PyTorch). The default ``auto`` picks the fastest one this CPU supports;
``TRITIUM_KERNEL=auto|amx|avx512|avx2|neon|generic|reference`` or `set_backend` forces one. Without the
compiled library, ``auto`` falls back to the reference with a warning.
``ternary_matmul``, ``quantize_rows`` and ``ternary_linear`` are the custom ops
``torch.ops.tritium.{ternary_matmul,quantize_rows,ternary_linear}``, so they work under
``torch.compile(fullgraph=True)`` and ``torch.inference_mode()``. Compiled frozen layers call `linears_op`:
after `load_cpp_op` (which compiled decoding calls) that is ``torch.ops.tritium.ternary_linears_native``, the
C++ form of ``ternary_linears`` (csrc/op.cpp, built on first use), which reaches the kernels without re-entering
Python. A native call that cannot allocate its
buffers (also inside a worker thread) raises MemoryError; the output is never returned half-written.
"""

import ctypes
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import quant
from . import _native, reference
from .reference import unpack

__all__ = [
    "pack", "unpack", "ternary_matmul", "quantize_rows", "ternary_linear", "set_backend", "get_backend",
    "available_backends", "openmp_runtime", "quantize_ternary", "native", "MAX_K", "ternary_linears", "load_cpp_op",
    "linears_op",
]

MAX_K = 1 << 17
BACKENDS = ("amx", "avx512", "avx2", "neon", "generic", "reference")

_lib, _load_error = _native.load()
_backend: str | None = None  # resolved lazily from TRITIUM_KERNEL


def _reload_library() -> None:
    """Load the compiled library again (honouring ``TRITIUM_KERNEL_LIB``) and forget the chosen backend."""
    global _lib, _load_error, _backend
    _lib, _load_error = _native.load()
    _backend = None
    _bind_cpp_op()


def openmp_runtime() -> str | None:
    """The file of the OpenMP runtime the compiled kernels run on (torch's own when torch ships libgomp), with
    ``torch.get_num_threads()`` threads; None when the kernels are single-threaded or not compiled."""
    path = "" if _lib is None else _lib.tk_openmp_runtime().decode(errors="replace")
    return path or None


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
    _bind_cpp_op()


def get_backend() -> str:
    """The backend in use (on first use: ``TRITIUM_KERNEL``, default ``auto``, resolved)."""
    global _backend
    if _backend is None:
        _backend = _resolve(os.environ.get("TRITIUM_KERNEL", "auto") or "auto")
        _bind_cpp_op()
    return _backend


def native(*tensors: Tensor) -> bool:
    """Whether the compiled kernels (not the PyTorch reference) run on ``tensors``: a native backend is in
    use and every tensor is on the CPU."""
    return (_backend or get_backend()) != "reference" and all(t.device.type == "cpu" for t in tensors)


# ------------------------------------------------------------------------------------------------------
# Packing (definition: tritium.kernels.reference.pack) and the fused ternary weight quantizer.


@torch.library.custom_op("tritium::pack", mutates_args=())
def _pack_op(q: Tensor) -> Tensor:
    if not native(q):
        return reference.pack(q)
    backend = get_backend()
    q = q.contiguous()
    n, k = q.shape
    out = torch.empty((n, (k + 3) // 4), dtype=torch.uint8)
    rc = _lib.tk_pack(_native.NATIVE_IDS[backend], q.data_ptr(), out.data_ptr(), n, k, torch.get_num_threads())
    if rc != 0:
        _raise(backend, rc)
    return out


@_pack_op.register_fake
def _(q: Tensor) -> Tensor:
    return q.new_empty((q.shape[0], (q.shape[1] + 3) // 4), dtype=torch.uint8)


def pack(q: Tensor) -> Tensor:
    """Pack an int ``(N, K)`` tensor with values in {-1, 0, 1} into uint8 ``(N, ceil(K / 4))``.

    Bit-identical to `tritium.kernels.reference.pack` (which defines it) for every int8 input, on every
    backend; other dtypes are converted to int8 first. Raises ValueError for a tensor that is not 2-D.
    """
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D ternary weight, got shape {tuple(q.shape)}")
    return _pack_op(q.to(torch.int8))


def _quantize_ternary_reference(w: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    v = w / s.reshape(-1, 1)
    bad = v.isnan().any(1)
    q = v.round_().clamp_(-1, 1).nan_to_num_(0.0).to(torch.int8)
    return q, reference.pack(q), torch.where(bad, torch.nan, s.reshape(-1).expand(w.shape[0]))


@torch.library.custom_op("tritium::quantize_ternary", mutates_args=())
def _quantize_ternary_op(w: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not native(w, s):
        return _quantize_ternary_reference(w, s)
    backend = get_backend()
    w, s = w.contiguous(), s.contiguous()
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8)
    packed = torch.empty((n, (k + 3) // 4), dtype=torch.uint8)
    so = torch.empty((n,), dtype=torch.float32)
    rc = _lib.tk_quantize_ternary(
        _native.NATIVE_IDS[backend], w.data_ptr(), s.data_ptr(), int(s.numel() != 1), q.data_ptr(),
        packed.data_ptr(), so.data_ptr(), n, k, torch.get_num_threads(),
    )
    if rc != 0:
        _raise(backend, rc)
    return q, packed, so


@_quantize_ternary_op.register_fake
def _(w: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, k = w.shape
    return (w.new_empty((n, k), dtype=torch.int8), w.new_empty((n, (k + 3) // 4), dtype=torch.uint8),
            w.new_empty((n,), dtype=torch.float32))


def quantize_ternary(w: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a float32 weight ``(N, K)`` with its ternary scale ``s`` (one element, or ``N`` for a
    per-row scale): int8 ``q = clamp(round(w / s), -1, 1)`` ``(N, K)``, ``pack(q)``, and float32 ``sw``
    ``(N,)`` for `ternary_matmul`.

    ``q`` is ``tritium.quant.quantize_weight``'s for 1.58 bits (``w / s`` a true float32 division, round
    half to even), bit for bit. ``sw`` is the row's scale, or NaN for a row in which some ``w / s`` is NaN
    (``q`` is 0 there), so that the row's outputs are NaN as in the float product. Raises TypeError or
    ValueError for other dtypes or shapes.
    """
    if not isinstance(w, Tensor) or w.dtype != torch.float32 or w.dim() != 2:
        desc = f"{w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise TypeError(f"quantize_ternary: w must be a 2-D float32 tensor (N, K), got {desc}")
    _check(s, "s", torch.float32, (1, w.shape[0]), w.device, "quantize_ternary", "w")
    return _quantize_ternary_op(w, s.reshape(-1))


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
        _raise(backend, rc)
    return y


def _raise(backend: str, rc: int) -> None:
    if rc == -2:
        raise MemoryError(f"tritium kernel {backend!r}: out of memory")
    raise RuntimeError(f"tritium kernel {backend!r} failed with code {rc}")


@_ternary_matmul_op.register_fake
def _(xq: Tensor, packed: Tensor, n: int, k: int, sx: Tensor, sw: Tensor, bias: Tensor | None) -> Tensor:
    return xq.new_empty((xq.shape[0], n), dtype=torch.float32)


def _check(t: Tensor, name: str, dtype: torch.dtype, numel: tuple[int, ...], device: torch.device,
           fn: str = "ternary_matmul", like: str = "xq") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if t.numel() not in numel:
        raise ValueError(
            f"{fn}: {name} has shape {tuple(t.shape)}, expected {' or '.join(map(str, numel))} elements"
        )
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} like {like}")


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


# ------------------------------------------------------------------------------------------------------
# Activation quantization (definition: tritium.quant.quantize_act) and the fused linear.


def _quantize_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """``quant.quantize_act(x, 8)`` as int8 ``(M, K)`` and float32 ``(M,)`` (q = 0 where s is NaN or inf)."""
    q, s = quant.quantize_act(x, 8)
    return q.nan_to_num_(0.0).to(torch.int8), s.reshape(x.shape[0])


@torch.library.custom_op("tritium::quantize_rows", mutates_args=())
def _quantize_rows_op(x: Tensor) -> tuple[Tensor, Tensor]:
    backend = get_backend()
    if backend == "reference" or x.device.type != "cpu":
        return _quantize_reference(x)
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty((m,), dtype=torch.float32)
    rc = _lib.tk_quantize_rows(
        _native.NATIVE_IDS[backend], x.data_ptr(), q.data_ptr(), s.data_ptr(), m, k, torch.get_num_threads()
    )
    if rc != 0:
        _raise(backend, rc)
    return q, s


@_quantize_rows_op.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def _ternary_linear_impl(x: Tensor, packed: Tensor, n: int, k: int, sw: Tensor, bias: Tensor | None) -> Tensor:
    """The fused op on validated inputs (``x`` float32 ``(M, k)``); `TernaryLinear` calls it directly in eager
    mode, which saves the custom-op dispatch (this runs once per layer and token when decoding)."""
    backend = _backend or get_backend()
    if backend == "reference" or not (x.is_cpu and packed.is_cpu):
        q, s = _quantize_reference(x)
        return reference.ternary_matmul(q, packed, n, k, s, sw, bias)
    x, packed, sw = x.contiguous(), packed.contiguous(), sw.contiguous()
    bias = None if bias is None else bias.contiguous()  # kept alive until the native call returns
    m = x.shape[0]
    y = x.new_empty((m, n))
    rc = _lib.tk_ternary_linear(
        _native.NATIVE_IDS[backend], x.data_ptr(), packed.data_ptr(), sw.data_ptr(), sw.numel() != 1,
        None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads(),
    )
    if rc != 0:
        _raise(backend, rc)
    return y


@torch.library.custom_op("tritium::ternary_linear", mutates_args=())
def _ternary_linear_op(x: Tensor, packed: Tensor, n: int, k: int, sw: Tensor, bias: Tensor | None) -> Tensor:
    return _ternary_linear_impl(x, packed, n, k, sw, bias)


@_ternary_linear_op.register_fake
def _(x: Tensor, packed: Tensor, n: int, k: int, sw: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _check_x(x: Tensor, fn: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.dim() != 2:
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{fn}: x must be a 2-D float32 tensor (M, K), got {desc}")
    if x.shape[1] > MAX_K:
        raise ValueError(f"{fn}: K={x.shape[1]} exceeds {MAX_K}")


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token 8-bit quantization of float32 ``x`` ``(M, K)``: int8 ``q`` ``(M, K)``, float32 ``s`` ``(M,)``.

    Bit-identical to ``tritium.quant.quantize_act(x, 8)`` (which defines it) on every backend, except that
    ``q`` is 0 in a row whose scale is NaN or inf. Raises TypeError for a non-float32 or non-2-D ``x``.
    """
    _check_x(x, "quantize_rows")
    return _quantize_rows_op(x)


def ternary_linear(
    x: Tensor, packed: Tensor, n: int, k: int, sw: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``ternary_matmul(q, packed, n, k, s, sw, bias)`` with ``q, s = quantize_rows(x)``, fused in one call.

    ``x`` float32 ``(M, k)``; the other arguments as in `ternary_matmul`. Bit-identical to the composition.
    """
    _check_x(x, "ternary_linear")
    n, k = int(n), int(k)
    if n < 0 or k < 0 or x.shape[1] != k:
        raise ValueError(f"ternary_linear: x has {x.shape[1]} columns, expected k={k} (and n={n} >= 0)")
    dev = x.device
    _check(packed, "packed", torch.uint8, (n * ((k + 3) // 4),), dev)
    _check(sw, "sw", torch.float32, (1, n), dev)
    if bias is not None:
        _check(bias, "bias", torch.float32, (n,), dev)
        bias = bias.reshape(n)
    return _ternary_linear_op(x, packed.reshape(n, (k + 3) // 4), n, k, sw.reshape(-1), bias)


# ------------------------------------------------------------------------------------------------------
# Several weights on one input: the input norm and quantization once, one native call.

MAX_WEIGHTS = 8  # weights per native call of ternary_linears (tk_ternary_linear_multi)
_P = ctypes.c_void_p
_DESCRIPTORS: dict[tuple, ctypes.Array] = {}  # the weights' part of a tk_ternary_linear_multi call, by value


def _multi_fn():
    """The library's several-weights entry point with its argument types, or None (an older library)."""
    fn = getattr(_lib, "tk_ternary_linear_multi", None) if _lib is not None else None
    if fn is not None and fn.argtypes is None:
        fn.argtypes = [ctypes.c_int, _P, ctypes.c_int, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def _ternary_linears_impl(x: Tensor, packed: Sequence[Tensor], n: Sequence[int], k: int, sw: Sequence[Tensor],
                          bias: Sequence[Tensor | None]) -> list[Tensor]:
    """``[ternary_linear(x, packed[i], n[i], k, sw[i], bias[i]) ...]`` on validated inputs (``x`` float32
    ``(M, k)``), quantizing ``x`` once: one native call for up to `MAX_WEIGHTS` weights."""
    backend = _backend or get_backend()
    count = len(packed)
    fn = _multi_fn() if backend != "reference" and 1 < count <= MAX_WEIGHTS else None
    if fn is None or not (x.is_cpu and all(p.is_cpu for p in packed)):
        return [_ternary_linear_impl(x, p, ni, k, s, b) for p, ni, s, b in zip(packed, n, sw, bias, strict=True)]
    x = x.contiguous()
    # kept alive until the native call returns, as x and the outputs
    packed, sw = [p.contiguous() for p in packed], [s.contiguous() for s in sw]
    bias = [None if b is None else b.contiguous() for b in bias]
    key = tuple(v for p, ni, s, b in zip(packed, n, sw, bias, strict=True)
                for v in (p.data_ptr(), ni, s.data_ptr(), s.numel() != 1, 0 if b is None else b.data_ptr()))
    desc = _DESCRIPTORS.get(key)
    if desc is None:  # a pure function of the key (addresses and sizes), so entries never go stale
        if len(_DESCRIPTORS) >= 1024:
            _DESCRIPTORS.clear()
        desc = _DESCRIPTORS[key] = (ctypes.c_int64 * len(key))(*key)
    m = x.shape[0]
    ys = [x.new_empty((m, ni)) for ni in n]
    rc = fn(_native.NATIVE_IDS[backend], x.data_ptr(), count, desc, (_P * count)(*(y.data_ptr() for y in ys)), m, k,
            torch.get_num_threads())
    if rc != 0:
        _raise(backend, rc)
    return ys


def _frozen_linears_impl(x: Tensor, packed: Sequence[Tensor], n: Sequence[int], k: int, sw: Sequence[Tensor],
                         bias: Sequence[Tensor | None], norm: str | None) -> list[Tensor]:
    xf = quant.input_norm(x, norm)
    if len(packed) == 1:
        return [_ternary_linear_impl(xf, packed[0], n[0], k, sw[0], bias[0])]
    return _ternary_linears_impl(xf, packed, n, k, sw, bias)


# Defined with torch.library.Library rather than custom_op: the dispatch costs a few microseconds less per call,
# and compiled decoding calls it a few times per layer and token (it has no autograd formula; TernaryLinear calls
# it without autograd only).
_LIBRARY = torch.library.Library("tritium", "FRAGMENT")
_LIBRARY.define("ternary_linears(Tensor x, Tensor[] packed, int[] n, int k, Tensor[] sw, Tensor?[] bias, str? norm)"
                " -> Tensor[]")
_LIBRARY.impl("ternary_linears", _frozen_linears_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("tritium::ternary_linears")
def _ternary_linears_fake(x: Tensor, packed: list[Tensor], n: list[int], k: int, sw: list[Tensor],
                          bias: list[Tensor | None], norm: str | None) -> list[Tensor]:
    return [x.new_empty((x.shape[0], ni), dtype=torch.float32) for ni in n]


_cpp_op_error: str | None = None  # None: not built yet; "": loaded; otherwise why it is unavailable


def load_cpp_op() -> bool:
    """Build (the first time; about 10 s) and load ``torch.ops.tritium.ternary_linears_native``, the C++ form of
    ``torch.ops.tritium.ternary_linears`` that compiled code calls without re-entering Python (`linears_op`).
    True when it is loaded; False (with a warning, once) when it cannot be built, and `linears_op` stays the
    Python op. Its outputs are bit-identical to the Python op's: the same ATen norm and the same native kernels.
    """
    global _cpp_op_error
    if _cpp_op_error is None:
        _cpp_op_error = _native.build_op() if _lib is not None else f"no compiled kernels ({_load_error})"
        if _cpp_op_error:
            warnings.warn(f"tritium: the C++ ternary_linears op is unavailable ({_cpp_op_error}); compiled code "
                          "calls the Python op", RuntimeWarning, stacklevel=2)
        else:
            torch.library.register_fake("tritium::ternary_linears_native")(_ternary_linears_fake)
            get_backend()
            _bind_cpp_op()
    return not _cpp_op_error


def _bind_cpp_op() -> None:
    """Point the C++ op at the loaded library's entry points and the backend in use (-1 for the reference, or
    while none is chosen: `get_backend` binds it when it chooses)."""
    if _cpp_op_error != "":
        return
    if _lib is None:
        torch.ops.tritium._bind_native(0, 0, -1)
        return
    multi = _multi_fn()
    torch.ops.tritium._bind_native(ctypes.cast(_lib.tk_ternary_linear, ctypes.c_void_p).value,
                                   0 if multi is None else ctypes.cast(multi, ctypes.c_void_p).value,
                                   _native.NATIVE_IDS.get(_backend or "reference", -1))


def linears_op(x: Tensor | None = None):
    """The custom op that compiled frozen layers call on input ``x``: ``torch.ops.tritium.ternary_linears_native``
    once `load_cpp_op` has loaded it, a native backend is in use and ``x`` (if given) is on the CPU, else
    ``torch.ops.tritium.ternary_linears`` (same schema, same outputs)."""
    if _cpp_op_error == "" and (_backend or get_backend()) != "reference" and (x is None or x.device.type == "cpu"):
        return torch.ops.tritium.ternary_linears_native
    return torch.ops.tritium.ternary_linears


def _ternary_linears_op(x: Tensor, packed: list[Tensor], n: list[int], k: int, sw: list[Tensor],
                        bias: list[Tensor | None], norm: str | None) -> list[Tensor]:
    return torch.ops.tritium.ternary_linears.default(x, packed, n, k, sw, bias, norm)


def ternary_linears(
    x: Tensor, packed: Sequence[Tensor], n: Sequence[int], k: int, sw: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None = None, norm: str | None = None,
) -> list[Tensor]:
    """``ternary_linear(input_norm(x, norm), packed[i], n[i], k, sw[i], bias[i])`` for every weight ``i``.

    ``x`` float32 ``(M, k)``; each weight as in `ternary_linear`; ``bias`` None or one entry (None or a
    tensor) per weight; ``norm`` the parameter-free input norm of `tritium.quant.input_norm` (``None``,
    ``"layernorm"`` or ``"rmsnorm"``). Every output is bit-identical to its own `ternary_linear` call on the
    normed input; the norm and the activation quantization run once for all the weights. This is the
    custom op ``torch.ops.tritium.ternary_linears``: inside ``torch.compile`` the norm stays the eager
    ATen kernel, so compiled and eager outputs agree bit for bit.
    """
    _check_x(x, "ternary_linears")
    k = int(k)
    if not 0 <= k == x.shape[1]:
        raise ValueError(f"ternary_linears: x has {x.shape[1]} columns, expected k={k}")
    if norm not in (None, "layernorm", "rmsnorm"):
        raise ValueError(f"ternary_linears: norm={norm!r} must be None, 'layernorm' or 'rmsnorm'")
    n = [int(v) for v in n]
    bias = [None] * len(n) if bias is None else list(bias)
    if not len(packed) == len(n) == len(sw) == len(bias) >= 1:
        raise ValueError("ternary_linears: packed, n, sw (and bias) need one entry per weight, at least one")
    dev = x.device
    for i, (p, ni, s, b) in enumerate(zip(packed, n, sw, bias, strict=True)):
        if ni < 0:
            raise ValueError(f"ternary_linears: n[{i}]={ni} must be >= 0")
        _check(p, f"packed[{i}]", torch.uint8, (ni * ((k + 3) // 4),), dev, "ternary_linears", "x")
        _check(s, f"sw[{i}]", torch.float32, (1, ni), dev, "ternary_linears", "x")
        if b is not None:
            _check(b, f"bias[{i}]", torch.float32, (ni,), dev, "ternary_linears", "x")
    return _ternary_linears_op(
        x, [p.reshape(ni, (k + 3) // 4) for p, ni in zip(packed, n, strict=True)], n, k, [s.reshape(-1) for s in sw],
        [None if b is None else b.reshape(-1) for b in bias], norm)


# ------------------------------------------------------------------------------------------------------
# Lazy AdamW rows (the native part of tritium.optim.LazyAdamW; definition in csrc/adamw.c).


def has_lazy_adamw() -> bool:
    """Whether the compiled row update of `tritium.optim.LazyAdamW` is available."""
    return _lib is not None


def lazy_adamw_rows(
    p: Tensor, m: Tensor, v: Tensor, last: Tensor, rows: Tensor, grad: Tensor | None, step: int,
    consts: Tensor, betas: tuple[float, float], eps: float,
) -> None:
    """Bring ``rows`` of ``p`` (with AdamW state ``m``, ``v``) to ``step``, in place; see csrc/adamw.c.

    ``p``, ``m``, ``v``: contiguous float32 ``(R, W)``; ``last``: int64 ``(R,)``, the step each row is at;
    ``rows``: sorted distinct int64 row indices; ``grad``: float32 ``(len(rows), W)``, the gradient of
    those rows at ``step`` (None: a zero gradient, and rows already at ``step`` stay); ``consts``: float32
    ``(3, > step)``, per step ``1 - lr * wd``, ``lr / (1 - b1^t)``, ``1 / sqrt(1 - b2^t)``; ``betas`` and
    ``eps`` as given to AdamW (``1 - b`` is rounded to float32 from the exact value).
    Raises ValueError (changing nothing) for a row out of range, repeated, or already at ``step``.
    """
    if _lib is None:
        raise RuntimeError(f"tritium: compiled kernels unavailable ({_load_error})")
    r, w = p.shape
    for name, t, dtype in (("p", p, torch.float32), ("m", m, torch.float32), ("v", v, torch.float32),
                           ("last", last, torch.int64), ("rows", rows, torch.int64),
                           ("consts", consts, torch.float32), ("grad", grad, torch.float32)):
        if t is not None and (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()):
            raise TypeError(f"lazy_adamw_rows: {name} must be a contiguous {dtype} CPU tensor")
    if m.shape != p.shape or v.shape != p.shape or last.shape != (r,) or consts.shape[0] != 3 \
            or consts.shape[1] <= step or (grad is not None and grad.shape != (rows.numel(), w)):
        raise ValueError("lazy_adamw_rows: inconsistent shapes")
    rc = _lib.tk_lazy_adamw(
        p.data_ptr(), m.data_ptr(), v.data_ptr(), last.data_ptr(), r, w, rows.data_ptr(), rows.numel(),
        None if grad is None else grad.data_ptr(), int(step), consts[0].data_ptr(), consts[1].data_ptr(),
        consts[2].data_ptr(), betas[0], betas[1], 1.0 - betas[0], 1.0 - betas[1], eps, torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"lazy_adamw_rows: rows must be sorted, distinct, in [0, {r}) and behind step {step}")
