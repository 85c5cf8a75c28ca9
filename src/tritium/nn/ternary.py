"""`TernaryLinear`: the frozen inference form of a ternary `BitLinear`, on packed 2-bit weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels, quant
from ..config import NORMS

ACT_BITS = 8


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

    @classmethod
    def from_bitlinear(cls, layer: nn.Module, name: str = "layer") -> TernaryLinear:
        """The frozen form of a ternary `BitLinear` (8-bit activations, tensor/channel scale, lambda_ 1).

        Raises ValueError naming ``name`` and the config for any other config.
        """
        cfg = layer.config
        problems = []
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
        w = layer.weight
        q, s = quant.quantize_weight(w.detach(), cfg)
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, cfg.norm,
                  cfg.granularity == "channel", device=w.device)
        new.weight_packed = kernels.pack(q.to(torch.int8)).contiguous()
        new.weight_scale = quant.row_scale(s, layer.out_features).reshape(-1).float().contiguous()
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone().contiguous()
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
        # quantize_act(xf, 8) + ternary_matmul in one native call, bit-identical to the composition; in
        # eager mode the op's implementation is called directly (saves the custom-op dispatch at decode).
        if torch.compiler.is_compiling():
            y = torch.ops.tritium.ternary_linear(xf, packed, n, k, scale, bias)
        else:
            y = kernels._ternary_linear_impl(xf, packed, n, k, scale, bias)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        keep = {name: getattr(self, name) for name in ("weight_scale", "bias")}
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
