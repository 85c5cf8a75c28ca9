"""One-call conversion of any PyTorch model to 1.58-bit QAT, post-training quantization, warm-up."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import BitConfig, parse_spec
from .nn import BitConv1D, BitLinear

#: Modules whose qualified name matches one of these stay in full precision unless ``exclude`` is given.
#: Besides these, a transformers model's output embedding (``get_output_embeddings()``, e.g. BERT's
#: ``cls.predictions.decoder``) stays in full precision by default too.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head$",)


def _linear_types() -> tuple[type, ...]:
    """Module types `quantize` converts: nn.Linear, transformers' Conv1D, PyG's Linear (when installed)."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:
        pass
    try:
        from torch_geometric.nn.dense.linear import Linear as PygLinear

        types.append(PygLinear)
    except ImportError:
        pass
    return tuple(types)


def _as_config(config: BitConfig | str | None) -> BitConfig | None:
    if config is None or isinstance(config, BitConfig):
        return config
    if isinstance(config, str):
        return parse_spec(config)
    raise TypeError(f"config must be a BitConfig or a spec string, got {type(config).__name__}")


def _patterns(p: str | Iterable[str] | None) -> list[re.Pattern]:
    if p is None:
        return []
    return [re.compile(x) for x in ([p] if isinstance(p, str) else p)]


def _to_bitlinear(module: nn.Module, config: BitConfig, name: str) -> BitLinear:
    """A `BitLinear` computing what ``module`` computed, sharing its parameters (not copies)."""
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"module {name!r} has an uninitialized (lazy) weight: run one forward pass first")
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: y = x @ W + b with W of (in, out)
        return BitConv1D.from_conv1d(module, config)
    out_f, in_f = weight.shape
    new = BitLinear(in_f, out_f, bias=module.bias is not None, config=config, device="meta")
    new.weight = weight  # shared, not copied: tied weights and optimizer references keep working
    new.bias = module.bias
    return new


def _same_config(a: BitConfig, b: BitConfig) -> bool:
    """Equal configs apart from the warm-up blend (which `LambdaWarmup` changes during training)."""
    return a.replace(lambda_=b.lambda_) == b


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def quantize(
    model: nn.Module,
    config: BitConfig | str | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    verbose: bool = False,
) -> nn.Module:
    """Turn ``model`` into a quantization-aware model, in place, and return it.

    Replaces every `nn.Linear`, transformers' `Conv1D` (GPT-2) and PyTorch Geometric's `Linear` (inside
    `GCNConv`, `SGConv`, ...) by a `BitLinear` with ``config`` (a `BitConfig` or a spec string such as
    ``"1.58-absmedian"``; a float spec such as ``"fp32"`` converts nothing). Parameters are shared with the
    replaced module, so tied weights stay tied and optimizers keep their references; a `Conv1D` becomes a
    `BitConv1D`, which keeps Conv1D's ``(in, out)`` weight layout. Each converted module's ``state_dict``
    is the replaced module's, so checkpoints load into the quantized and the plain model alike.
    Embeddings and norms are never converted.

    ``model`` must contain the layers to convert: a bare `nn.Linear` (or `Conv1D`, PyG `Linear`) raises
    TypeError (use `BitLinear.from_linear`). Calling `quantize` again with the same config is a no-op;
    a selected layer that is already a `BitLinear` with another config raises ValueError naming it.

    Args:
        include: regexes (``re.search`` on qualified module names); when given, only matching modules
            are converted.
        exclude: regexes of modules to keep in full precision. Default: `DEFAULT_EXCLUDE`, which keeps an
            output head named ``lm_head``, and a transformers model's output embedding (its
            ``get_output_embeddings()``); pass ``exclude=[]`` to convert heads too.
        verbose: print the `summary` table.
    """
    cfg = _as_config(BitConfig() if config is None else config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if cfg is not None:
        _convert(model, cfg, include, exclude)
    if verbose:
        print(summary(model))
    return model


def _convert(model: nn.Module, cfg: BitConfig, include, exclude) -> None:
    types = _linear_types()
    if isinstance(model, BitLinear):
        if not _same_config(model.config, cfg):
            raise ValueError(f"the model is a BitLinear with config {model.config.spec!r}, not {cfg.spec!r}")
    elif isinstance(model, types):
        raise TypeError(
            f"quantize converts the layers inside a model and cannot replace the model itself, a "
            f"{type(model).__name__}: use BitLinear.from_linear(layer, config) or wrap it in nn.Sequential"
        )
    inc = _patterns(include)
    exc = _patterns(DEFAULT_EXCLUDE if exclude is None else exclude)
    head = _output_head(model) if exclude is None else None
    todo = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, types):
                continue
            if inc and not any(p.search(full) for p in inc):
                continue
            if child is head or any(p.search(full) for p in exc):
                continue
            if isinstance(child, BitLinear):
                if not _same_config(child.config, cfg):
                    raise ValueError(
                        f"{full!r} is already quantized with config {child.config.spec!r} "
                        f"(norm={child.config.norm}), not {cfg.spec!r} (norm={cfg.norm}); select other "
                        "layers with include/exclude, or quantize a fresh model"
                    )
                continue
            if isinstance(module, nn.MultiheadAttention):
                warnings.warn(
                    f"{full!r} is left in full precision: nn.MultiheadAttention reads its weights "
                    "directly and never calls the submodule", stacklevel=2,
                )
                continue
            todo.append((module, child_name, child, full))
    for module, child_name, child, full in todo:
        setattr(module, child_name, _to_bitlinear(child, cfg, full))


def ptq(model: nn.Module, config: BitConfig | str | None = None, **kwargs) -> nn.Module:
    """Post-training quantization of a trained full-precision model, in place (the PTQ baseline).

    Same quantizer and selection as `quantize`, but without the input norm (``norm=None``): the
    model was trained without it, so only its weights and activations are quantized. Returns the model
    in eval mode.
    """
    cfg = _as_config(BitConfig() if config is None else config)
    if cfg is not None:
        quantize(model, cfg.replace(norm=None), **kwargs)
    return model.eval()


def bit_layers(model: nn.Module) -> Iterator[tuple[str, BitLinear]]:
    """All `BitLinear` modules of ``model`` with their qualified names."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BitLinear))


def set_lambda(model: nn.Module, value: float) -> None:
    """Set the warm-up blend ``lambda_`` (0 = full precision, 1 = quantized) of every `BitLinear`."""
    value = float(value)
    for _, m in bit_layers(model):
        m.config = m.config.replace(lambda_=value)


class LambdaWarmup:
    """Linear warm-up of ``lambda_`` from ``start`` to 1 over ``steps`` calls of `step`.

    Call `step` once per optimizer step. ``state_dict``/``load_state_dict`` make it resumable.
    """

    def __init__(self, model: nn.Module, steps: int, start: float = 0.0) -> None:
        if steps < 0:
            raise ValueError(f"steps={steps} must be >= 0")
        self.model, self.steps, self.start, self.count = model, steps, float(start), 0
        set_lambda(model, self.value)

    @property
    def value(self) -> float:
        if self.steps == 0 or self.count >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * self.count / self.steps

    def step(self) -> float:
        self.count += 1
        set_lambda(self.model, self.value)
        return self.value

    def state_dict(self) -> dict:
        return {"steps": self.steps, "start": self.start, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.start, self.count = int(state["steps"]), float(state["start"]), int(state["count"])
        set_lambda(self.model, self.value)


@dataclass
class Summary:
    """What `quantize` converted: layer count, parameter counts and effective bits per weight."""

    layers: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)  # (name, spec, (N, K))
    quantized_params: int = 0
    kept_params: int = 0
    total_bits: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        n = self.quantized_params + self.kept_params
        return self.total_bits / n if n else 0.0

    def as_dict(self) -> dict:
        return {
            "layers_converted": len(self.layers),
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
        }

    def __str__(self) -> str:
        rows = [f"{'layer':<48} {'spec':<22} {'shape':>14}"]
        for name, spec, (n, k) in self.layers:
            rows.append(f"{name[-48:]:<48} {spec:<22} {f'{n}x{k}':>14}")
        rows.append(
            f"{len(self.layers)} layers converted; {self.quantized_params:,} parameters quantized, "
            f"{self.kept_params:,} kept; {self.bits_per_weight:.2f} effective bits per weight"
        )
        return "\n".join(rows)


def summary(model: nn.Module) -> Summary:
    """Count the quantized and full-precision parameters of ``model`` (shared parameters once)."""
    out = Summary()
    quantized: dict[int, float] = {}
    for name, m in bit_layers(model):
        out.layers.append((name, m.config.spec, (m.out_features, m.in_features)))
        quantized[id(m.weight)] = float(m.config.weight_bits)
    for p in model.parameters():  # deduplicated by torch
        if id(p) in quantized:
            out.quantized_params += p.numel()
            out.total_bits += p.numel() * quantized[id(p)]
        else:
            out.kept_params += p.numel()
            out.total_bits += p.numel() * torch.finfo(p.dtype).bits if p.is_floating_point() else 0
    return out


def freeze(model: nn.Module, strict: bool = True) -> nn.Module:
    """Replace every ternary `BitLinear` of ``model`` by its packed inference form, in place, and return it.

    Each `BitLinear` becomes a `TernaryLinear` holding packed 2-bit weights, float32 scale(s), bias and
    norm setting, and no latent float weight. For float32 activations the frozen model's outputs equal the
    eval-mode QAT model's outputs bit for bit; bf16/fp16 activations are computed in float32 inside each
    frozen layer and rounded back, so they equal the float32 layer output rounded to that dtype (and
    differ from a bf16/fp16 `BitLinear` forward by that forward's own rounding).

    The kernels support ternary weights with a per-tensor or per-channel scale, 8-bit activations,
    ``lambda_ = 1`` and ``in_features`` up to `tritium.kernels.MAX_K`. A `BitLinear` with another config or
    a larger ``in_features`` raises ValueError naming the layer and the reason; with ``strict=False`` it
    stays a `BitLinear` instead (with a warning).

    A frozen layer has no parameters; gradients flow to its input (straight-through, as in `BitLinear`),
    so earlier parameters still get gradients, identically on every kernel backend. Its ``weight`` is a
    `tritium.nn.FrozenWeight` (shape, dtype, device; no values) for model code that inspects it, and
    ``dequantized_weight()`` returns the float32 weight. A ``model`` that is itself a
    `BitLinear` is not changed: the new `TernaryLinear` is returned.
    """
    from .nn import TernaryLinear

    if isinstance(model, BitLinear):
        return TernaryLinear.from_bitlinear(model, type(model).__name__)
    frozen = []  # convert everything first, so a strict failure leaves the model untouched
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, BitLinear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            try:
                frozen.append((module, child_name, TernaryLinear.from_bitlinear(child, full)))
            except ValueError as e:
                if strict:
                    raise
                warnings.warn(f"{e}; kept as BitLinear", stacklevel=2)
    for module, child_name, layer in frozen:
        setattr(module, child_name, layer)
    return model
