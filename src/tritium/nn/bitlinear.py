"""`BitLinear`: a drop-in `nn.Linear` that trains with quantized weights and activations (QAT)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels, quant
from ..config import BitConfig


class _QuantLinear(torch.autograd.Function):
    """``y = Q(x) @ Q(W)^T (rescaled) + bias`` in float32, rounded to ``out_dtype``, with straight-through
    gradients.

    ``x`` is float32; ``weight`` and ``bias`` may have any float dtype and are used upcast to float32, so
    the result is the float32 layer's, rounded once. Backward gives ``dx = dy @ W_used`` and
    ``dW = dy^T @ x_used`` (identity through both quantizers, scales detached) in ``dy``'s dtype, where
    ``*_used`` are the dequantized (and, during warm-up, blended) operands. It keeps only what backward
    needs: integer operands as int8 plus their float32 scales where the integer form is exact, the float
    operand (in ``out_dtype``) otherwise.

    Where `_uses_kernels` holds, the packed ternary x int8 kernels of `tritium.kernels` compute the
    forward: they perform the same float32 operations on the same integers (quantizers bit for bit, the
    integer product exact), so the output is bit-identical to the ``F.linear`` form below.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_bits, measure, granularity, act_bits, lambda_, median_sample,
                out_dtype):
        cfg = BitConfig(weight_bits, measure, granularity, act_bits, None, lambda_, median_sample)
        n = weight.shape[0]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if _uses_kernels(cfg, x, weight):
            return _kernel_forward(ctx, x, weight, bias, cfg, out_dtype)
        blend = lambda_ != 1.0
        # Activations: int-valued q with per-token scale sx, or a float operand (sx None).
        sx = None
        if act_bits is None:
            x_used = x
        else:
            x_used, sx = quant.quantize_act(x, act_bits)
            if blend:
                x_used, sx = x.lerp(x_used * sx, lambda_), None
        # Weights: int-valued q with a per-tensor/per-row scale sw, or a float operand (sw None).
        wf = weight.detach().float()
        wq, ws = quant.quantize_weight(wf, cfg)
        sw = None if blend else quant.row_scale(ws, n)
        w_used = wf.lerp(quant.dequantize_weight(wq, ws), lambda_) if sw is None else wq
        # Integer operands make an exact float32 product (|acc| <= 2^24); the rescale is float32 too.
        y = F.linear(x_used, w_used)
        if sx is not None or sw is not None:
            y.mul_(sw if sx is None else sx if sw is None else sx * sw)
        # A zero sum is +0 as in integer arithmetic (a float sum of products such as -5 * 0 gives -0): add
        # +0, or the bias with a -0 turned into +0 (x + 0 = x + -0 for every other x).
        y.add_(0.0 if bias is None else bias.float() + 0.0)
        ctx.save_for_backward(
            x_used.to(out_dtype) if sx is None else x_used.to(torch.int8), sx,
            w_used.to(out_dtype) if sw is None else w_used.to(torch.int8), sw,
        )
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x_used, sx, w_used, sw = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        dt = dy.dtype  # the output dtype: gradients are computed in it
        dx = dW = db = None
        rows = math.prod(dy.shape[:-1])  # explicit: a -1 is ambiguous when a dimension is 0
        dy2 = dy.reshape(rows, dy.shape[-1])
        if ctx.needs_input_grad[0]:  # dx = dy @ (w * sw): scale whichever operand is smallest
            w = w_used.to(dt)
            dx = _scaled_matmul(dy2, w, None if sw is None else sw.to(dt).reshape(-1, 1) if sw.dim() else sw.to(dt))
            dx = dx.reshape(*dy.shape[:-1], w.shape[1]).to(x_dtype)
            del w
        if ctx.needs_input_grad[1]:  # dW = dy^T @ (x * sx)
            x = x_used.to(dt).reshape(rows, x_used.shape[-1])
            dW = _scaled_matmul(dy2.t(), x, None if sx is None else sx.to(dt).reshape(-1, 1)).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(b_dtype)
        return dx, dW, db, None, None, None, None, None, None, None


def _uses_kernels(cfg: BitConfig, x: Tensor, weight: Tensor) -> bool:
    """Whether `tritium.kernels` compute this forward: ternary weights with a per-tensor or per-channel
    scale, 8-bit activations, no warm-up blend, ``K <= kernels.MAX_K``, and native kernels for the tensors'
    device (`kernels.native`)."""
    return (cfg.ternary and cfg.act_bits == 8 and cfg.granularity in ("tensor", "channel") and cfg.lambda_ == 1.0
            and x.shape[-1] <= kernels.MAX_K and kernels.native(x, weight))


def _kernel_forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, cfg: BitConfig,
                    out_dtype: torch.dtype) -> Tensor:
    """`_QuantLinear.forward` on the packed kernels: the same output, and the same operands saved for
    backward (flattened to 2-D)."""
    lead, k, n = x.shape[:-1], x.shape[-1], weight.shape[0]
    xq, sx = kernels.quantize_rows(x.reshape(math.prod(lead), k))
    wf = weight.detach().float()
    s = quant.weight_scale(wf, cfg)
    wq, packed, sw_rows = kernels.quantize_ternary(wf, s.reshape(-1))
    y = kernels.ternary_matmul(xq, packed, n, k, sx, sw_rows, None if bias is None else bias.float())
    # saved as the ops return them (views would alias inside torch.compile's graph); backward reshapes
    ctx.save_for_backward(xq, sx, wq, s)
    return y.reshape(*lead, n).to(out_dtype)


def _scaled_matmul(a: Tensor, b: Tensor, scale: Tensor | None) -> Tensor:
    """``a @ (b * scale)`` where ``scale`` broadcasts over the rows of ``b`` (shape ``(rows, 1)`` or scalar),
    computed as ``(a * scale^T) @ b`` when that touches fewer elements."""
    if scale is None:
        return a @ b
    if scale.dim() == 0:  # scalar: scale the smallest of a, b and the product
        if a.shape[0] * b.shape[1] <= min(a.numel(), b.numel()):
            return (a @ b).mul_(scale)
        return a @ (b * scale) if b.numel() <= a.numel() else (a * scale) @ b
    if a.numel() < b.numel():
        return (a * scale.reshape(1, -1)) @ b
    return a @ (b * scale)


class BitLinear(nn.Linear):
    """Drop-in replacement for `nn.Linear` with 1.58-bit (or other) quantization-aware training.

    Keeps full-precision latent weights; ``state_dict`` holds exactly ``weight`` and ``bias``, so a
    checkpoint loads into either class. Forward: parameter-free input norm, per-token activation
    quantization, weight quantization, integer matmul, rescale, then ``+ bias`` (the bias is added after
    rescaling, so it is not divided by the per-token scale, unlike the reference ``bitlinear`` package).
    All of it runs in float32 whatever the input and parameter dtypes (bf16, fp16, under ``torch.autocast``
    too), and only the output is rounded to the input's dtype (the autocast dtype under autocast): a bf16
    layer gives exactly the float32 layer's output on the upcast input and parameters, rounded to bf16, and
    its integer product cannot overflow. Gradients are straight-through, computed in the output's dtype.
    Train and eval mode compute the same function. On the CPU, ternary layers with 8-bit activations and a
    per-tensor or per-channel scale run their forward matmul on the packed ternary x int8 kernels of
    `tritium.kernels` (unless the ``reference`` backend is chosen), with a bit-identical result.

    Args:
        in_features, out_features, bias, device, dtype: as for `nn.Linear`.
        config: the `BitConfig` (default: ternary absmedian weights, 8-bit activations, layernorm).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: BitConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"BitLinear: {name}={value!r} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"BitLinear: {name}={value!r} must be >= 0")
        config = BitConfig() if config is None else config
        if not isinstance(config, BitConfig):
            raise TypeError(f"config must be a BitConfig, got {type(config).__name__}")
        quant.check_group(config, in_features, f"BitLinear({in_features}, {out_features})")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: BitConfig | None = None) -> BitLinear:
        """A `BitLinear` with a copy of ``linear``'s weight and bias, on the same device and dtype."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                  device="meta", dtype=w.dtype)
        new.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input last dimension is {x.shape[-1]}, expected in_features="
                f"{self.in_features} (input shape {tuple(x.shape)})"
            )
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # the autocast dtype is only the output's: the layer's maths stays float32
            with torch.autocast(device_type, enabled=False):
                return self._forward(x, torch.get_autocast_dtype(device_type))
        return self._forward(x, x.dtype)

    def _forward(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        c = self.config
        x = quant.input_norm(x.float(), c.norm)
        return _QuantLinear.apply(
            x, self.linear_weight(), self.bias, c.weight_bits, c.measure, c.granularity, c.act_bits,
            float(c.lambda_), c.median_sample, out_dtype,
        )

    def linear_weight(self) -> Tensor:
        """The latent weight in `nn.Linear` layout ``(out_features, in_features)``."""
        return self.weight

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The dequantized weight the forward uses (``q * s``, blended by ``lambda_``), in `nn.Linear` layout."""
        w = self.linear_weight()
        q, s = quant.quantize_weight(w, self.config)
        return w.lerp(quant.dequantize_weight(q, s), float(self.config.lambda_))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, spec={c.spec!r}, norm={c.norm}"
            + (f", lambda_={c.lambda_}" if c.lambda_ != 1.0 else "")
        )
