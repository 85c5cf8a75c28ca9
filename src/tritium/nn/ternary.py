"""`TernaryLinear`: the frozen inference form of a ternary `BitLinear`, on packed 2-bit weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels, quant
from ..config import NORMS

ACT_BITS = 8


class FrozenWeight:
    """What a `TernaryLinear` shows as ``.weight``: the shape, dtype and device of the weight it replaces.

    Model code that inspects a linear layer's weight (``weight.shape``, ``weight.dtype``, ``weight.device``,
    ``isinstance(weight, torch.Tensor)``, which is False) keeps working on a frozen model. The values are
    packed, so any numeric use (torch functions, arithmetic, ``.data``, ``.t()``, ...) raises a TypeError or
    AttributeError that says so; `dequantize` (or `TernaryLinear.dequantized_weight`) returns the
    dequantized float32 weight ``q * s`` of shape ``(out_features, in_features)``.

    ``dtype`` is the dtype of the `BitLinear` weight the layer was frozen from (float32 for a loaded
    layer), changed by ``module.to(dtype)``; the layer accepts any floating-point input regardless.
    """

    __slots__ = ("_layer",)

    def __init__(self, layer: TernaryLinear) -> None:
        self._layer = layer

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self._layer, "_weight_dtype", torch.float32)

    @property
    def device(self) -> torch.device:
        return self._layer.weight_packed.device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    ndim = 2
    requires_grad = False

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self) -> Tensor:
        """The dequantized float32 weight ``(out_features, in_features)``."""
        return self._layer.dequantized_weight()

    def _refuse(self, what: str) -> str:
        return (f"{what}: the weight of a frozen TernaryLinear ({self._layer.out_features} x "
                f"{self._layer.in_features}) is packed ternary and has no float values; use "
                "layer.dequantized_weight() (or layer.weight.dequantize()) for the float32 weight q * s")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        weight = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, FrozenWeight))
        raise TypeError(weight._refuse(f"{getattr(func, '__name__', func)}() got a TernaryLinear weight"))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(self._refuse(f"TernaryLinear weight has no attribute {name!r}"))

    def __array__(self, *args, **kwargs):
        raise TypeError(self._refuse("cannot convert a TernaryLinear weight to an array"))

    def _arithmetic(self, *args):
        raise TypeError(self._refuse("arithmetic on a TernaryLinear weight"))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _arithmetic
    __matmul__ = __rmatmul__ = __pow__ = __rpow__ = __neg__ = __abs__ = __getitem__ = _arithmetic

    def __repr__(self) -> str:
        return f"FrozenWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, packed ternary)"


class _StraightThrough(torch.autograd.Function):
    """The frozen product with a straight-through input gradient ``dx = dy @ (q * s)`` (no weight gradient)."""

    @staticmethod
    def forward(ctx, x, packed, n, k, scale, bias):
        ctx.save_for_backward(packed, scale)
        ctx.shape = (n, k)
        return _product(x, packed, n, k, scale, bias)

    @staticmethod
    def backward(ctx, dy):
        packed, scale = ctx.saved_tensors
        w = _dequantize(packed, scale, *ctx.shape).to(dy.dtype)
        return dy @ w, None, None, None, None, None


def _product(x: Tensor, packed: Tensor, n: int, k: int, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``quantize_act(x, 8)`` + ``ternary_matmul`` in one native call, bit-identical to the composition; in
    eager mode the op's implementation is called directly (saves the custom-op dispatch at decode)."""
    if torch.compiler.is_compiling():
        return torch.ops.tritium.ternary_linear(x, packed, n, k, scale, bias)
    return kernels._ternary_linear_impl(x, packed, n, k, scale, bias)


def _dequantize(packed: Tensor, scale: Tensor, n: int, k: int) -> Tensor:
    return kernels.unpack(packed, n, k).float() * scale.reshape(-1, 1)


class TernaryLinear(nn.Module):
    """Inference-only linear layer with packed ternary weights and 8-bit per-token activations.

    Computes exactly what an eval-mode ternary `BitLinear` computes: parameter-free input norm,
    per-token 8-bit activation quantization, ``y = (q_x @ q_w^T) * (s_x * s_w) + bias``. The product is
    computed by `tritium.kernels.ternary_linear` (quantizer and matmul fused in one native call) in float32;
    for a float32 input the output is bit-identical
    to the `BitLinear` output. A bf16/fp16 input is upcast, the layer computes in float32 and the output
    is rounded to the input dtype: it equals the float32 `BitLinear` output on the upcast input, rounded.

    Buffers (no parameters, no latent float weight):
        weight_packed: uint8 ``(out_features, ceil(in_features / 4))``, 4 weights per byte
            (layout of `tritium.kernels.pack`).
        weight_scale: float32 ``(out_features,)`` per channel or ``(1,)`` per tensor.
        bias: float32 ``(out_features,)`` or None.

    ``weight_scale`` and ``bias`` stay float32 when the module is cast with ``.to(dtype)``.

    ``weight`` is a `FrozenWeight` (shape, dtype and device of the replaced weight, no values) for model
    code that inspects its linear layers; `dequantized_weight` returns the float32 weight ``q * s``.
    Gradients: with respect to the input only, straight-through as in `BitLinear`:
    ``dx = dy @ (q * s)`` through the input norm, identical on every kernel backend.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        norm: str | None = "layernorm",
        per_channel: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORMS}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must be >= 1")
        self.in_features, self.out_features, self.norm = int(in_features), int(out_features), norm
        self.per_channel = bool(per_channel)
        k4 = (self.in_features + 3) // 4
        self.register_buffer("weight_packed", torch.zeros(out_features, k4, dtype=torch.uint8, device=device))
        n_scales = out_features if per_channel else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        self.register_buffer("bias", b)
        self._weight_dtype = torch.float32

    @property
    def weight(self) -> FrozenWeight:
        """Shape, dtype and device of the packed weight (no values; see `FrozenWeight`)."""
        return FrozenWeight(self)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``q * s`` of shape ``(out_features, in_features)`` the layer multiplies by."""
        return _dequantize(self.weight_packed, self.weight_scale, self.out_features, self.in_features)

    @classmethod
    def from_bitlinear(cls, layer: nn.Module, name: str = "layer") -> TernaryLinear:
        """The frozen form of a ternary `BitLinear` (8-bit activations, tensor/channel scale, lambda_ 1).

        Raises ValueError naming ``name`` and the config for any other config, and for ``in_features``
        above `tritium.kernels.MAX_K`.
        """
        cfg = layer.config
        problems = []
        if layer.in_features > kernels.MAX_K:
            problems.append(f"in_features={layer.in_features} (the kernels take at most {kernels.MAX_K})")
        if not cfg.ternary:
            problems.append(f"weight_bits={cfg.weight_bits} (needs 1.58)")
        if cfg.act_bits != ACT_BITS:
            problems.append(f"act_bits={cfg.act_bits} (needs 8)")
        if cfg.granularity not in ("tensor", "channel"):
            problems.append(f"granularity={cfg.granularity} (needs 'tensor' or 'channel')")
        if cfg.lambda_ != 1.0:
            problems.append(f"lambda_={cfg.lambda_} (needs 1.0: finish the warm-up first)")
        if problems:
            raise ValueError(
                f"cannot freeze {name!r} (config {cfg.spec!r}, norm={cfg.norm}): " + "; ".join(problems)
            )
        w = layer.linear_weight()
        q, s = quant.quantize_weight(w.detach(), cfg)
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, cfg.norm,
                  cfg.granularity == "channel", device=w.device)
        new.weight_packed = kernels.pack(q.to(torch.int8)).contiguous()
        new.weight_scale = quant.row_scale(s, layer.out_features).reshape(-1).float().contiguous()
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone().contiguous()
        new._weight_dtype = w.dtype
        return new

    def forward(self, x: Tensor) -> Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k or not x.is_floating_point():
            raise ValueError(
                f"TernaryLinear: expected a floating-point input with last dimension {k}, "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )
        buffers = self._buffers  # one dict lookup each instead of nn.Module.__getattr__ (decode hot path)
        packed, scale, bias = buffers["weight_packed"], buffers["weight_scale"], buffers["bias"]
        xf = quant.input_norm(x.float(), self.norm)  # .float() is free for a float32 input
        if xf.dim() != 2:
            xf = xf.reshape(-1, k)
        if xf.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], n)
        if xf.requires_grad and torch.is_grad_enabled():
            y = _StraightThrough.apply(xf, packed, n, k, scale, bias)
        else:
            y = _product(xf, packed, n, k, scale, bias)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        keep = {name: getattr(self, name) for name in ("weight_scale", "bias")}
        try:  # what the cast does to a floating-point tensor is the dtype `weight` reports
            probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.weight_packed.device))
            if isinstance(probe, Tensor) and probe.is_floating_point():
                self._weight_dtype = probe.dtype
        except (RuntimeError, TypeError, NotImplementedError):
            pass
        super()._apply(fn, recurse)
        for name, t in keep.items():
            cur = getattr(self, name)
            if t is not None and cur is not None and cur.dtype != torch.float32:
                setattr(self, name, t.to(device=cur.device))
        return self

    def extra_repr(self) -> str:
        scale = "channel" if self.per_channel else "tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, norm={self.norm}, scale={scale}")
