"""`BitConfig`: what a quantized layer does, and the compact spec strings that name a config.

Spec grammar (case-insensitive)::

    fp32 | bf16 | fp16                          no quantization, that dtype
    <bits>[-<measure>][-<granularity>][-a<act>] quantized
        bits         1.58 | 1 | 2 | 4 | 8
        measure      absmedian (default) | absmean | absmax
        granularity  tensor (default) | channel | group<G>
        act          a8 (default) | a4 | afp (no activation quantization)
    each of measure, granularity and act at most once, in any order

Examples: ``"1.58-absmedian"``, ``"1.58-absmean-channel"``, ``"1-absmean"``, ``"2-absmax"``,
``"4-absmax-group128"``, ``"1.58-absmean-a4"``.

`Precision`: how an experiment run trains, named by a spec plus an optional ``ptq-`` prefix (quantize
after float training) or ``cqat<F>-`` prefix (float training, then quantization-aware training from the
fraction F of the steps on) and ``+bf16``/``+fp16`` suffix (autocast), e.g. ``"ptq-1.58-absmedian+bf16"``,
``"cqat0.5-1.58-absmedian+bf16"``.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

WEIGHT_BITS = (1.58, 1, 2, 4, 8)
MEASURES = ("absmedian", "absmean", "absmax")
NORMS = ("layernorm", "rmsnorm", None)
ACT_BITS = (8, 4, None)
FLOAT_SPECS = ("fp32", "bf16", "fp16")

Granularity = Literal["tensor", "channel"] | tuple[str, int]


def _check_type(name: str, value: object, kind: type, what: str) -> None:
    """Raise TypeError naming ``name`` and ``value`` unless ``value`` is a ``kind`` (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}={value!r} must be {what}, got {type(value).__name__}")


@dataclass(frozen=True)
class BitConfig:
    """Configuration of a quantized linear layer.

    Attributes:
        weight_bits: 1.58 (ternary, default), 1 (binary) or 2, 4, 8 (symmetric integers).
        measure: statistic of ``|W|`` that sets the weight scale: "absmedian" (default), "absmean", "absmax".
        granularity: "tensor" (one scale, default), "channel" (one per output row) or ``("group", G)``
            (one per output row and block of G input columns).
        act_bits: signed bits of the per-token activation quantizer (8, 4) or None for none.
        norm: parameter-free input norm: "layernorm" (default), "rmsnorm" or None.
        lambda_: blend from full precision (0.0) to fully quantized (1.0, default), for warm-ups.
        median_sample: absmedian only. Tensors with more elements than this use the exact median of
            a fixed strided subsample of this many elements (see ``tritium.quant.abs_median``);
            0 means always exact.
    """

    weight_bits: float = 1.58
    measure: str = "absmedian"
    granularity: Granularity = "tensor"
    act_bits: int | None = 8
    norm: str | None = "layernorm"
    lambda_: float = 1.0
    median_sample: int = 1 << 18

    def __post_init__(self) -> None:
        bits = self.weight_bits
        _check_type("weight_bits", bits, numbers.Real, "a number")
        if bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits={bits!r} is not supported; choose one of {WEIGHT_BITS}")
        object.__setattr__(self, "weight_bits", 1.58 if bits == 1.58 else int(bits))
        _check_type("measure", self.measure, str, "a string")
        if self.measure not in MEASURES:
            raise ValueError(f"measure={self.measure!r} is not supported; choose one of {MEASURES}")
        if self.norm is not None:
            _check_type("norm", self.norm, str, "a string or None")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not supported; choose one of {NORMS}")
        if self.act_bits is not None:
            _check_type("act_bits", self.act_bits, numbers.Integral, "an int or None")
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; choose one of {ACT_BITS}")
        if self.act_bits is not None:
            object.__setattr__(self, "act_bits", int(self.act_bits))
        g = self.granularity
        if isinstance(g, list):
            g = tuple(g)
        if not isinstance(g, (str, tuple)):
            raise TypeError(
                f"granularity={g!r} must be a string or a ('group', G) tuple, got {type(g).__name__}"
            )
        if isinstance(g, tuple) and len(g) == 2 and g[0] == "group":
            if isinstance(g[1], bool) or not isinstance(g[1], numbers.Integral):
                raise TypeError(f"granularity={g!r}: the group size must be an int, got {type(g[1]).__name__}")
            g = ("group", int(g[1]))
        object.__setattr__(self, "granularity", g)
        ok = g in ("tensor", "channel") or (isinstance(g, tuple) and len(g) == 2 and g[0] == "group" and g[1] > 0)
        if not ok:
            raise ValueError(
                f"granularity={g!r} is not supported; use 'tensor', 'channel' or ('group', G) with G > 0"
            )
        _check_type("lambda_", self.lambda_, numbers.Real, "a number")
        if not 0.0 <= float(self.lambda_) <= 1.0:
            raise ValueError(f"lambda_={self.lambda_!r} must lie in [0, 1]")
        object.__setattr__(self, "lambda_", float(self.lambda_))
        _check_type("median_sample", self.median_sample, numbers.Integral, "an int")
        if self.median_sample < 0:
            raise ValueError(f"median_sample={self.median_sample!r} must be >= 0")
        object.__setattr__(self, "median_sample", int(self.median_sample))

    @property
    def ternary(self) -> bool:
        return self.weight_bits == 1.58

    @property
    def group_size(self) -> int | None:
        return self.granularity[1] if isinstance(self.granularity, tuple) else None

    @property
    def spec(self) -> str:
        """The compact spec string of this config (see module docstring)."""
        return format_spec(self)

    def replace(self, **changes) -> BitConfig:
        return replace(self, **changes)


def parse_spec(spec: str) -> BitConfig | None:
    """Parse a spec string into a `BitConfig`; float specs ("fp32", "bf16", "fp16") give None.

    Raises ValueError naming the bad spec and the bad part.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in FLOAT_SPECS:
        return None
    parts = s.split("-")
    try:
        bits = float(parts[0])
    except ValueError:
        raise ValueError(
            f"bad precision spec {spec!r}: {parts[0]!r} is not a bit width "
            f"(expected one of {WEIGHT_BITS} or {FLOAT_SPECS})"
        ) from None
    kw: dict = {"weight_bits": 1.58 if bits == 1.58 else bits}
    given: dict[str, str] = {}  # field -> the part that set it
    for part in parts[1:]:
        if part in MEASURES:
            field, value = "measure", part
        elif part in ("tensor", "channel"):
            field, value = "granularity", part
        elif m := re.fullmatch(r"group(\d+)", part):
            field, value = "granularity", ("group", int(m.group(1)))
        elif m := re.fullmatch(r"a(\d+|fp)", part):
            field, value = "act_bits", None if m.group(1) == "fp" else int(m.group(1))
        else:
            raise ValueError(
                f"bad precision spec {spec!r}: unknown part {part!r} "
                "(expected a measure, 'tensor', 'channel', 'group<G>' or 'a8'/'a4'/'afp')"
            )
        if field in given:
            raise ValueError(
                f"bad precision spec {spec!r}: {part!r} and {given[field]!r} both set the {field}; give it once"
            )
        given[field] = part
        kw[field] = value
    try:
        return BitConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad precision spec {spec!r}: {e}") from None


def format_spec(cfg: BitConfig | None) -> str:
    """Inverse of `parse_spec` for the fields a spec names (None gives "fp32")."""
    if cfg is None:
        return "fp32"
    bits = "1.58" if cfg.ternary else str(int(cfg.weight_bits))
    out = [bits, cfg.measure]
    if cfg.granularity == "channel":
        out.append("channel")
    elif cfg.group_size is not None:
        out.append(f"group{cfg.group_size}")
    if cfg.act_bits != 8:
        out.append("afp" if cfg.act_bits is None else f"a{cfg.act_bits}")
    return "-".join(out)


if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

AUTOCAST = ("bf16", "fp16")
FAMILIES = ("fp", "qat", "ptq")


@dataclass(frozen=True)
class Precision:
    """How an experiment run trains and evaluates a model, named by a precision string.

    Grammar (case-insensitive, no spaces)::

        fp32                     float32 weights and compute
        bf16 | fp16              float32 master weights; forward and backward under autocast to that dtype
        <spec>[+bf16|+fp16]      quantization-aware training with the `BitConfig` of ``<spec>`` (see
                                 `parse_spec`), optionally under autocast
        ptq-<spec>[+bf16|+fp16]  train in float32 (or under the autocast), then ``tritium.ptq`` with ``<spec>``
        cqat<F>-<spec>[+bf16|+fp16]
                                 continual QAT (arXiv 2502.11895): train in float32 (or under the autocast) for
                                 the first fraction F of the steps (0 < F < 1, at most 6 decimals, e.g. 0.5),
                                 then quantization-aware with ``<spec>``, keeping the optimizer state

    Examples: ``"fp32"``, ``"bf16"``, ``"1.58-absmedian"``, ``"1.58-absmedian+bf16"``, ``"4-absmax-group128"``,
    ``"ptq-1.58-absmean"``, ``"ptq-2-absmax+bf16"``, ``"cqat0.5-1.58-absmedian+bf16"``. ``str(p)`` is the
    canonical string (every spec field spelled out, e.g. ``"1.58"`` gives ``"1.58-absmedian"``; ``cqat.50-``
    gives ``cqat0.5-``); parsing it gives ``p`` back.

    Attributes:
        train: the config the model trains with (quantization-aware), or None for float training.
        autocast: "bf16" or "fp16" to train and evaluate under ``torch.autocast`` to that dtype, or None.
        ptq: the config applied by ``tritium.ptq`` after training, or None.
        switch_at: with ``train``, the fraction of the steps trained in float before the model is converted
            to ``train`` (continual QAT; rounded to 6 decimals), or None to train quantization-aware from the
            start.
    """

    train: BitConfig | None = None
    autocast: str | None = None
    ptq: BitConfig | None = None
    switch_at: float | None = None

    def __post_init__(self) -> None:
        if self.autocast not in (None, *AUTOCAST):
            raise ValueError(f"autocast={self.autocast!r} is not supported; choose one of {(None, *AUTOCAST)}")
        if self.train is not None and self.ptq is not None:
            raise ValueError("a precision has a training config or a PTQ config, not both")
        if self.switch_at is not None:
            _check_type("switch_at", self.switch_at, numbers.Real, "a number or None")
            if self.train is None:
                raise ValueError("switch_at needs a training config (the precision trained after the switch)")
            value = round(float(self.switch_at), 6)  # as the canonical string spells it
            if not 0.0 < value < 1.0:
                raise ValueError(f"switch_at={self.switch_at!r} must lie strictly between 0 and 1 "
                                 "(at 6 decimals)")
            object.__setattr__(self, "switch_at", value)

    @classmethod
    def parse(cls, text: str) -> Precision:
        """The precision a string names (see the class docstring).

        Raises ValueError naming the string and its bad part.
        """
        return parse_precision(text)

    @property
    def family(self) -> str:
        """The kind of run: "fp" (float training), "qat" (quantization-aware training, continual QAT
        included) or "ptq"."""
        return "qat" if self.train is not None else "ptq" if self.ptq is not None else "fp"

    @property
    def config(self) -> BitConfig | None:
        """The quantizer of the evaluated model: the training or the PTQ config (None for float runs)."""
        return self.train if self.train is not None else self.ptq

    @property
    def nominal_bits(self) -> float:
        """Weight bits of the evaluated model: 32 (fp32), 16 (bf16, fp16) or the quantizer's bits."""
        cfg = self.config
        if cfg is not None:
            return float(cfg.weight_bits)
        return 16.0 if self.autocast else 32.0

    @property
    def scheme(self) -> str:
        """The string without its bit width: the quantizer a line of a metric-against-bits plot follows,
        e.g. "absmedian", "ptq-absmax-group128", "absmean+bf16"; float precisions give their own string."""
        cfg = self.config
        if cfg is None:
            return str(self)
        rest = format_spec(cfg).split("-", 1)[1]
        return self._prefix + rest + (f"+{self.autocast}" if self.autocast else "")

    @property
    def _prefix(self) -> str:
        if self.ptq is not None:
            return "ptq-"
        return "" if self.switch_at is None else f"cqat{format(self.switch_at, '.6f').rstrip('0')}-"

    @property
    def before_ptq(self) -> Precision:
        """The precision the model trains at: this one without its PTQ step."""
        return Precision(self.train, self.autocast, None, self.switch_at)

    @property
    def before_switch(self) -> Precision:
        """The precision of the first training phase: the float precision (with this autocast) for continual
        QAT, else this precision."""
        return self if self.switch_at is None else Precision(autocast=self.autocast)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The ``torch.dtype`` of the autocast (torch.bfloat16, torch.float16), or None."""
        if self.autocast is None:
            return None
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]

    def autocast_context(self, device_type: str = "cpu") -> AbstractContextManager:
        """A context manager that runs its block under ``torch.autocast(device_type, dtype=...)``, or does
        nothing when the precision has no autocast."""
        import torch

        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def grad_scaler(self, device_type: str = "cpu"):
        """A ``torch.amp.GradScaler`` for training under this precision: enabled for the fp16 autocast (whose
        small gradients would underflow in float16), a pass-through otherwise."""
        import torch

        return torch.amp.GradScaler(device_type, enabled=self.autocast == "fp16")

    def __str__(self) -> str:
        if self.family == "fp":
            return self.autocast or "fp32"
        out = self._prefix + format_spec(self.config)
        return out + (f"+{self.autocast}" if self.autocast else "")


def parse_precision(text: str) -> Precision:
    """The `Precision` a string names (grammar in `Precision`).

    Raises ValueError naming the string and its bad part.
    """
    if not isinstance(text, str):
        raise TypeError(f"precision must be a string, got {type(text).__name__}")
    s = text.strip().lower()
    if not s:
        raise ValueError(f"bad precision spec {text!r}: empty")
    if s in FLOAT_SPECS:
        return Precision(autocast=None if s == "fp32" else s)
    body, plus, autocast = s.partition("+")
    if plus:
        if autocast not in AUTOCAST:
            raise ValueError(f"bad precision spec {text!r}: unknown autocast {'+' + autocast!r} "
                             f"(expected one of {', '.join('+' + a for a in AUTOCAST)})")
        if body in FLOAT_SPECS:
            raise ValueError(f"bad precision spec {text!r}: {plus + autocast!r} follows a float precision "
                             f"(write {autocast!r} alone for float32 weights under {autocast} autocast)")
    switch_at = None
    if body.startswith("cqat"):
        m = re.fullmatch(r"cqat(\d*\.\d{1,6}|\d+)-(.*)", body)
        if m is None:
            raise ValueError(f"bad precision spec {text!r}: expected 'cqat<F>-<spec>' with a decimal fraction F "
                             "(at most 6 decimals), e.g. 'cqat0.5-1.58-absmedian'")
        switch_at = float(m.group(1))
        if not 0.0 < switch_at < 1.0:
            raise ValueError(f"bad precision spec {text!r}: the switch fraction {m.group(1)!r} must lie strictly "
                             "between 0 and 1")
        body = m.group(2)
        if body.startswith("ptq-"):
            raise ValueError(f"bad precision spec {text!r}: 'cqat<F>-' and 'ptq-' exclude each other")
        if body in FLOAT_SPECS or not body:
            raise ValueError(f"bad precision spec {text!r}: 'cqat<F>-' needs a quantizer spec, not {body!r}")
    ptq = body.startswith("ptq-")
    spec = body.removeprefix("ptq-")
    if not spec:
        raise ValueError(f"bad precision spec {text!r}: no quantizer spec"
                         + (" after 'ptq-'" if ptq else ""))
    if ptq and spec in FLOAT_SPECS:
        raise ValueError(f"bad precision spec {text!r}: 'ptq-' needs a quantizer spec, not {spec!r}")
    try:
        cfg = parse_spec(spec)
    except ValueError as e:
        msg = str(e)
        if spec == s:
            raise
        inner = f"bad precision spec {spec!r}: "
        raise ValueError(f"bad precision spec {text!r}: {msg.removeprefix(inner)}") from None
    return Precision(None if ptq else cfg, autocast or None, cfg if ptq else None, switch_at)
