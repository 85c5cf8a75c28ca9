"""File formats. `tritium.formats.native` is tritium's own file (`tritium.save`, `tritium.load`),
`tritium.formats.codecs` the table of packed ternary layouts every format shares, `tritium.formats.gguf`
llama.cpp's GGUF, `tritium.formats.hf_bitnet` Hugging Face BitNet checkpoints; a malformed file of any
format raises `TritiumFormatError`.

This module exports to other inference formats: `export` and ``tritium export SRC OUT`` (GGUF for
llama.cpp, a Hugging Face BitNet folder for transformers, or tritium's own file); `import_gguf` and
`import_hf_bitnet` read such files back.

See `tritium.formats.gguf` for the models that map onto llama.cpp's graph (quantize with
`tritium.formats.gguf.PRESET`) and what differs numerically, `tritium.formats.hf_bitnet` for transformers'.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch import nn

from ..args import UsageError, check, output_dir, output_file

FORMATS = ("gguf", "hf-bitnet", "tritium")


class TritiumFormatError(ValueError):
    """A file (native tritium, GGUF, ...) or packed weight that is malformed or unsupported, or a file that does
    not fit the model it is loaded into; the message is one line saying why."""


class ExportError(ValueError):
    """A model, tokenizer or option that cannot be exported in the chosen format (one line, why);
    `tritium.formats.gguf.GGUFExportError` and `tritium.formats.hf_bitnet.HFExportError` are its kinds."""


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "gguf",
    qtype: str | None = None,
    tokenizer: object | None = None,
    float_type: str | None = None,
) -> None:
    """Write ``model`` to ``path`` in another inference format, atomically.

    ``format="gguf"`` writes a ternary Llama, Mistral, Qwen2 or BitNet decoder for llama.cpp as one file,
    its linear layers in ``qtype`` ``"tq2_0"`` (default) or ``"tq1_0"`` and the embedding and a
    full-precision head in ``float_type`` ``"f32"`` (default) or ``"f16"``, plus ``tokenizer`` (byte-level
    BPE) when given; see `tritium.formats.gguf` for the models that map (quantize with
    `tritium.formats.gguf.PRESET`) and what differs numerically. It raises
    `tritium.formats.gguf.GGUFExportError` for anything that does not map, ImportError without the ``gguf``
    package.

    ``format="hf-bitnet"`` writes a Hugging Face BitNet checkpoint folder ``path`` (with ``tokenizer``'s
    files when given) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads; see
    `tritium.formats.hf_bitnet.export_hf_bitnet`, which raises `tritium.formats.hf_bitnet.HFExportError`.

    ``format="tritium"`` is `tritium.save` (``storage="2bit"``, with ``tokenizer``); what it refuses raises
    `ExportError`.

    ``qtype`` and ``float_type`` apply to GGUF only: given with another format they raise `ExportError`, as
    does an unknown format. Every refusal is an `ExportError` (a ValueError) with one line saying why.
    """
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ExportError(f"format={format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        from .gguf import export_gguf

        export_gguf(model, path, qtype=qtype or "tq2_0", tokenizer=tokenizer, float_type=float_type or "f32")
        return
    given = [f"{k}={v!r}" for k, v in (("qtype", qtype), ("float_type", float_type)) if v is not None]
    if given:
        raise ExportError(f"{', '.join(given)} applies to format='gguf' only, not {fmt!r}")
    if fmt == "hf-bitnet":
        from .hf_bitnet import export_hf_bitnet

        export_hf_bitnet(model, path, tokenizer=tokenizer)
    else:
        from .native import save

        try:
            save(model, path, tokenizer=tokenizer)
        except ValueError as e:  # what save refuses to write
            raise ExportError(str(e)) from None


def import_gguf(path: str | os.PathLike) -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a llama.cpp GGUF file in TQ2_0 or TQ1_0.

    The inverse of ``export(model, path, "gguf")`` for Llama, Mistral, Qwen2 and BitNet decoders; see
    `tritium.formats.gguf.import_gguf`. Raises `TritiumFormatError` (one line, why) for a
    malformed or unsupported file, ImportError without the ``gguf`` package.
    """
    from .gguf import import_gguf as _import

    return _import(path)


def import_hf_bitnet(path: str | os.PathLike, mode: str = "frozen") -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a Hugging Face BitNet checkpoint folder.

    The inverse of ``export(model, path, "hf-bitnet")``; ``mode`` is ``"frozen"`` (`TernaryLinear`) or
    ``"qat"`` (`BitLinear`, to continue training). See `tritium.formats.hf_bitnet.import_hf_bitnet`; raises
    `TritiumFormatError` (one line, why) for a malformed or unsupported folder.
    """
    from .hf_bitnet import import_hf_bitnet as _import

    return _import(path, mode=mode)


def _load(path: str | os.PathLike) -> tuple[nn.Module, object | None]:
    """(model in eval mode, ``tokenizers.Tokenizer`` or None) from a tritium file saved from a transformers
    model, a llama.cpp GGUF file or a Hugging Face BitNet folder (imported frozen); `TritiumFormatError`
    (one line, why) for anything else."""
    if Path(path).is_dir():
        return import_hf_bitnet(path)
    from ..generation import load_pretrained

    return load_pretrained(path)


def _source(value: object) -> str:
    """An existing regular file or folder."""
    path = Path(str(value))
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {str(value)!r}")
    if not (path.is_file() or path.is_dir()):
        raise argparse.ArgumentTypeError(f"not a regular file or folder: {str(value)!r}")
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .gguf import FLOAT_TYPES, QTYPES

    parser.add_argument("src", metavar="SRC", type=_source,
                        help="a file written by tritium.save from a transformers model, a GGUF file (TQ2_0/TQ1_0) "
                             "or a Hugging Face BitNet folder; its tokenizer is exported too")
    parser.add_argument("out", metavar="OUT",
                        help="the file (gguf, tritium) or folder (hf-bitnet) to write, replaced atomically")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="output format: gguf (llama.cpp), hf-bitnet (a transformers BitNet folder) or "
                             "tritium (tritium.save, frozen); default gguf")
    parser.add_argument("--qtype", choices=QTYPES, default=None,
                        help="gguf only: llama.cpp type of the ternary layers (default tq2_0; tq1_0 is smaller)")
    parser.add_argument("--float-type", choices=FLOAT_TYPES, default=None,
                        help="gguf only: type of the embedding and a full-precision head (default f32; norms "
                             "stay f32)")


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    return os.path.getsize(path)


def run(args: argparse.Namespace) -> int:
    """``tritium export``: a bad input, an option that does not apply to the format or a model that does not
    map is a usage error (one line, exit 2)."""
    from .native import _printable

    if args.format != "gguf":
        for option, value in (("--qtype", args.qtype), ("--float-type", args.float_type)):
            if value is not None:
                raise UsageError(f"{option} applies to --format gguf only, not {args.format}")
    check(args.out, output_dir if args.format == "hf-bitnet" else output_file, "OUT")
    try:
        model, tokenizer = _load(args.src)
    except TritiumFormatError as e:
        raise UsageError(_printable(e)) from None
    try:
        export(model, args.out, format=args.format, qtype=args.qtype, tokenizer=tokenizer,
               float_type=args.float_type)
    except ExportError as e:
        raise UsageError(f"{_printable(args.src)}: {e}") from None
    detail = f"gguf {args.qtype or 'tq2_0'}" if args.format == "gguf" else args.format
    print(f"wrote {args.out} ({_size(args.out) / 2**20:.2f} MiB, {detail}, "
          f"{'with' if tokenizer is not None else 'without'} tokenizer)")
    return 0


__all__ = ["FORMATS", "ExportError", "TritiumFormatError", "export", "import_gguf", "import_hf_bitnet"]
