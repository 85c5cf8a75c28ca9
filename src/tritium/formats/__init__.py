"""File formats. `tritium.formats.native` is tritium's own file (`tritium.save`, `tritium.load`),
`tritium.formats.codecs` the table of packed ternary layouts every format shares, `tritium.formats.gguf`
llama.cpp's GGUF; a malformed file of any format raises `TritiumFormatError`.

This module exports to other inference formats: `export` and ``tritium export FILE OUT`` (GGUF for
llama.cpp); `import_gguf` reads such a GGUF file back.

See `tritium.formats.gguf` for the models that map onto llama.cpp's graph (quantize with
`tritium.formats.gguf.PRESET`) and what differs numerically.
"""

from __future__ import annotations

import argparse
import os

from torch import nn

from ..args import UsageError, existing_file, output_file

FORMATS = ("gguf",)


class TritiumFormatError(ValueError):
    """A file (native tritium, GGUF, ...) or packed weight that is malformed or unsupported, or a file that does
    not fit the model it is loaded into; the message is one line saying why."""


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "gguf",
    qtype: str = "tq2_0",
    tokenizer: object | None = None,
    float_type: str = "f32",
) -> None:
    """Write ``model`` to ``path`` in another inference format, atomically.

    ``format="gguf"`` (the only one) writes a ternary Llama, Mistral or Qwen2 decoder for llama.cpp with its
    linear layers in ``qtype`` ``"tq2_0"`` or ``"tq1_0"`` and the embedding and a full-precision head in
    ``float_type`` ``"f32"`` or ``"f16"``, plus ``tokenizer`` (byte-level BPE) when given; see
    `tritium.formats.gguf` for the models that map (quantize with `tritium.formats.gguf.PRESET`) and what
    differs numerically. Raises `tritium.formats.gguf.GGUFExportError` (a ValueError, one line saying why)
    for anything that does not map, ImportError without the ``gguf`` package.
    """
    from .gguf import GGUFExportError, export_gguf

    if str(format).lower() not in FORMATS:
        raise GGUFExportError(f"format={format!r} is not supported; choose one of {', '.join(FORMATS)}")
    export_gguf(model, path, qtype=qtype, tokenizer=tokenizer, float_type=float_type)


def import_gguf(path: str | os.PathLike) -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a llama.cpp GGUF file in TQ2_0 or TQ1_0.

    The inverse of ``export(model, path, "gguf")`` for Llama, Mistral and Qwen2 decoders; see
    `tritium.formats.gguf.import_gguf`. Raises `TritiumFormatError` (one line, why) for a
    malformed or unsupported file, ImportError without the ``gguf`` package.
    """
    from .gguf import import_gguf as _import

    return _import(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .gguf import FLOAT_TYPES, QTYPES

    parser.add_argument("file", type=existing_file,
                        help="a file written by tritium.save from a transformers model (its tokenizer is exported too)")
    parser.add_argument("out", type=output_file, help="the file to write (replaced atomically)")
    parser.add_argument("--format", choices=FORMATS, default="gguf", help="output format (default gguf)")
    parser.add_argument("--qtype", choices=QTYPES, default="tq2_0",
                        help="llama.cpp type of the ternary layers (default tq2_0; tq1_0 is smaller)")
    parser.add_argument("--float-type", choices=FLOAT_TYPES, default="f32",
                        help="type of the embedding and a full-precision head (default f32; norms stay f32)")


def run(args: argparse.Namespace) -> int:
    """``tritium export``: a bad file or a model that does not map is a usage error (one line, exit 2)."""
    from ..generation import load_pretrained
    from .gguf import GGUFExportError
    from .native import _printable

    try:
        model, tokenizer = load_pretrained(args.file)
    except TritiumFormatError as e:
        raise UsageError(_printable(e)) from None
    try:
        export(model, args.out, format=args.format, qtype=args.qtype, tokenizer=tokenizer,
               float_type=args.float_type)
    except GGUFExportError as e:
        raise UsageError(f"{_printable(args.file)}: {e}") from None
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB, {args.format} {args.qtype}, "
          f"{'with' if tokenizer is not None else 'without'} tokenizer)")
    return 0


__all__ = ["FORMATS", "TritiumFormatError", "export", "import_gguf"]
