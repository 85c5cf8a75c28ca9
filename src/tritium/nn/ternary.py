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


def _frozen(x: Tensor, layers: tuple[TernaryLinear, ...]) -> list[Tensor]:
    """Each layer's product of ``x`` (float32 ``(M, in_features)``, not yet normed) without autograd: input norm,
    quantization and the native call once for all of them. Under ``torch.compile`` the norm runs inside the
    custom op, as eager ATen, so compiled and eager outputs are bit-identical."""
    ws = [layer._buffers for layer in layers]
    packed, scale, bias = [b["weight_packed"] for b in ws], [b["weight_scale"] for b in ws], [b["bias"] for b in ws]
    n, k, norm = [layer.out_features for layer in layers], layers[0].in_features, layers[0].norm
    if torch.compiler.is_compiling():
        return kernels.linears_op(x)(x, packed, n, k, scale, bias, norm)
    return kernels._frozen_linears_impl(x, packed, n, k, scale, bias, norm)


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

    _shared: tuple[SharedInput, int] | None = None  # set by share_inputs

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
        x2 = x.float()  # free for a float32 input
        if x2.dim() != 2:
            x2 = x2.reshape(-1, k)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], n)
        if x2.requires_grad and torch.is_grad_enabled():
            buffers = self._buffers
            xf = quant.input_norm(x2, self.norm)
            y = _StraightThrough.apply(xf, buffers["weight_packed"], n, k, buffers["weight_scale"], buffers["bias"])
        else:
            shared = self._shared
            y = _frozen(x2, (self,))[0] if shared is None else shared[0].output(shared[1], x, x2)
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


class SharedInput:
    """Frozen layers that read the same input (e.g. the query, key and value projections of an attention).

    The first of them called with an input computes the outputs of all of them in one native call (one input
    norm, one activation quantization, one parallel region; `tritium.kernels.ternary_linears`); the others,
    called with the same tensor, take theirs. Every output is bit-identical to the layer's own. A layer called
    with another tensor, or a second time, starts a new round. Set up by `share_inputs`.
    """

    def __init__(self, layers: list[TernaryLinear]) -> None:
        first = layers[0]
        if not 2 <= len(layers) <= kernels.MAX_WEIGHTS:
            raise ValueError(f"a SharedInput takes 2 to {kernels.MAX_WEIGHTS} layers, got {len(layers)}")
        for layer in layers:
            if (layer.in_features, layer.norm) != (first.in_features, first.norm):
                raise ValueError("layers sharing an input need the same in_features and norm")
        self.layers = tuple(layers)
        self._x: Tensor | None = None
        self._out: list[Tensor] | None = None
        self._pending = 0  # bit i: layer i has not taken its output of this round
        self._version = -1

    def output(self, i: int, x: Tensor, x2: Tensor) -> Tensor:
        """Layer ``i``'s product of its input ``x``, given as the float32 ``(M, in_features)`` ``x2`` (no
        autograd)."""
        # An input changed in place since the round began is a new input; inference tensors (and traced
        # ones) have no version counter, there the tensor's identity decides.
        version = -1 if torch.compiler.is_compiling() or x.is_inference() else x._version
        if not (self._x is x and self._pending >> i & 1 and version == self._version):
            self._x, self._out, self._version = x, _frozen(x2, self.layers), version
            self._pending = (1 << len(self.layers)) - 1
        y = self._out[i]
        self._pending &= ~(1 << i)
        if not self._pending:  # the round is complete: hold no tensors between rounds
            self._x = self._out = None
        return y


@torch.no_grad()
def share_inputs(model: nn.Module, *args, **kwargs) -> list[SharedInput]:
    """Group the `TernaryLinear` layers of ``model`` that read the same input tensor, as seen in one call of
    ``model(*args, **kwargs)``, into `SharedInput` groups (up to `tritium.kernels.MAX_WEIGHTS` layers each, with
    the same ``in_features`` and norm) and return them.

    Outputs do not change, bit for bit; layers of a group compute their outputs together. Groups found
    earlier are dropped first; `unshare_inputs` drops them.
    """
    unshare_inputs(model)
    seen: dict[int, tuple[Tensor, list[TernaryLinear]]] = {}

    def record(layer: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            seen.setdefault(id(inputs[0]), (inputs[0], []))[1].append(layer)

    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for _, called in seen.values():
        by_kind: dict[tuple, list[TernaryLinear]] = {}
        for layer in dict.fromkeys(called):  # each layer once, in call order
            key = (layer.in_features, layer.norm, layer.weight_packed.device)
            by_kind.setdefault(key, []).append(layer)
        for same in by_kind.values():
            for i in range(0, len(same), kernels.MAX_WEIGHTS):
                chunk = same[i:i + kernels.MAX_WEIGHTS]
                if len(chunk) > 1 and all(layer._shared is None for layer in chunk):
                    group = SharedInput(chunk)
                    for j, layer in enumerate(chunk):
                        layer._shared = (group, j)
                    groups.append(group)
    return groups


def unshare_inputs(model: nn.Module) -> None:
    """Drop the `SharedInput` groups of ``model``'s layers (see `share_inputs`)."""
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.__dict__.pop("_shared", None)
