"""`BitConfig`: what a quantized layer does, and the compact spec strings that name a config.

Spec grammar (case-insensitive)::

    fp32 | bf16 | fp16                          no quantization, that dtype
    <bits>[-<measure>][-<granularity>][-a<act>] quantized
        bits         1.58 | 1 | 2 | 4 | 8
        measure      absmedian (default) | absmean | absmax
        granularity  tensor (default) | channel | group<G>
        act          a8 (default) | a4 | afp (no activation quantization)

Examples: ``"1.58-absmedian"``, ``"1.58-absmean-channel"``, ``"1-absmean"``, ``"2-absmax"``,
``"4-absmax-group128"``, ``"1.58-absmean-a4"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

WEIGHT_BITS = (1.58, 1, 2, 4, 8)
MEASURES = ("absmedian", "absmean", "absmax")
NORMS = ("layernorm", "rmsnorm", None)
ACT_BITS = (8, 4, None)
FLOAT_SPECS = ("fp32", "bf16", "fp16")

Granularity = Literal["tensor", "channel"] | tuple[str, int]


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
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits={bits!r} is not supported; choose one of {WEIGHT_BITS}")
        if bits != 1.58:
            object.__setattr__(self, "weight_bits", int(bits))
        if self.measure not in MEASURES:
            raise ValueError(f"measure={self.measure!r} is not supported; choose one of {MEASURES}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not supported; choose one of {NORMS}")
        if self.act_bits not in ACT_BITS or isinstance(self.act_bits, bool):
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; choose one of {ACT_BITS}")
        g = self.granularity
        if isinstance(g, list):
            g = tuple(g)
            object.__setattr__(self, "granularity", g)
        ok = g in ("tensor", "channel") or (
            isinstance(g, tuple) and len(g) == 2 and g[0] == "group"
            and isinstance(g[1], int) and not isinstance(g[1], bool) and g[1] > 0
        )
        if not ok:
            raise ValueError(
                f"granularity={g!r} is not supported; use 'tensor', 'channel' or ('group', G) with G > 0"
            )
        if not 0.0 <= float(self.lambda_) <= 1.0:
            raise ValueError(f"lambda_={self.lambda_!r} must lie in [0, 1]")
        if self.median_sample < 0:
            raise ValueError(f"median_sample={self.median_sample!r} must be >= 0")

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
    for part in parts[1:]:
        if part in MEASURES:
            kw["measure"] = part
        elif part in ("tensor", "channel"):
            kw["granularity"] = part
        elif m := re.fullmatch(r"group(\d+)", part):
            kw["granularity"] = ("group", int(m.group(1)))
        elif m := re.fullmatch(r"a(\d+|fp)", part):
            kw["act_bits"] = None if m.group(1) == "fp" else int(m.group(1))
        else:
            raise ValueError(
                f"bad precision spec {spec!r}: unknown part {part!r} "
                "(expected a measure, 'tensor', 'channel', 'group<G>' or 'a8'/'a4'/'afp')"
            )
    try:
        return BitConfig(**kw)
    except ValueError as e:
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
