"""``tritium info PATH``: what a tritium or GGUF file, or a Hugging Face BitNet folder, holds, and (tritium
files) the energy its arithmetic costs per token.

`describe` reads a native tritium file's header (never its tensors) and reports every layer's shape,
storage format, bytes and bits per weight, the totals, the arithmetic per token of its linear layers and
that arithmetic's energy at 45 nm (`ENERGY_PJ`); `describe_gguf` summarizes a GGUF file by tensor type,
`describe_hf_bitnet` a Hugging Face BitNet folder (from its config and safetensors headers).
`format_info`, `format_gguf_info` and `format_hf_bitnet_info` render them as text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from . import atomic
from .args import UsageError, output_file
from .formats.native import _DTYPES, PathLike, TritiumFormatError, _printable, read_header

#: Energy per operation at 45 nm, in pJ (Horowitz, "Computing's energy problem", ISSCC 2014).
ENERGY_PJ = {
    "int8_add": 0.03, "int8_mult": 0.2, "int32_add": 0.1, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp16_mult": 1.1, "fp32_add": 0.9, "fp32_mult": 3.7,
}
ENERGY_SOURCE = "M. Horowitz, \"Computing's energy problem (and what we can do about it)\", ISSCC 2014, 45 nm"


def describe(path: PathLike) -> dict:
    """Per-layer sizes, totals, arithmetic per token and its energy estimate for a tritium file."""
    h = read_header(path)
    rows, owned = [], set()
    for name, rec in sorted(h.layers.items()):
        if rec["kind"] != "ternary":
            continue
        n, k = rec["out_features"], rec["in_features"]
        prefix = f"{name}." if name else ""
        keys = [prefix + t for t in ("weight_packed", "weight_scale", "bias") if prefix + t in h.tensors]
        owned.update(keys)
        weight_bytes = math.prod(h.tensors[prefix + "weight_packed"][1])
        total = sum(math.prod(h.tensors[key][1]) * _DTYPES[h.tensors[key][0]].itemsize for key in keys)
        rows.append({"name": name, "shape": [n, k], "format": f"ternary-{rec['storage']}", "bytes": total,
                     "bits_per_weight": 8 * weight_bytes / (n * k)})
    for key, (dtype, shape) in sorted(h.tensors.items()):
        if key in owned:
            continue
        size = _DTYPES[dtype].itemsize
        rows.append({"name": key, "shape": list(shape), "format": dtype.lower(),
                     "bytes": math.prod(shape) * size, "bits_per_weight": 8.0 * size})
    ternary_weights = sum(r["shape"][0] * r["shape"][1] for r in rows if r["format"].startswith("ternary"))
    ternary_bytes = sum(r["bytes"] for r in rows if r["format"].startswith("ternary"))
    fp_params = sum(math.prod(r["shape"]) for r in rows if not r["format"].startswith("ternary"))
    fp_bytes = sum(r["bytes"] for r in rows if not r["format"].startswith("ternary"))

    # Arithmetic per input token of the linear layers (attention scores, norms, activations not counted).
    ops = {"ternary_adds": 0, "rescale_mults": 0, "act_quant_mults": 0, "bias_adds": 0,
           "fp_linear_mults": 0, "fp_linear_adds": 0}
    dense_macs = 0  # multiply-adds of the same layers at full precision
    for rec in h.layers.values():
        n, k, bias = rec["out_features"], rec["in_features"], rec["bias"]
        dense_macs += n * k
        if rec["kind"] == "ternary":
            ops["ternary_adds"] += n * k
            ops["rescale_mults"] += 2 * n  # acc * (s_x * s_w)
            ops["act_quant_mults"] += k  # x * (127 / absmax)
            ops["bias_adds"] += n if bias else 0
        else:
            ops["fp_linear_mults"] += n * k
            ops["fp_linear_adds"] += n * k + (n if bias else 0)
    bias_total = sum(r["out_features"] for r in h.layers.values() if r["bias"])
    e = ENERGY_PJ
    fp_rest = ops["fp_linear_mults"] * e["fp32_mult"] + ops["fp_linear_adds"] * e["fp32_add"]
    scalar = ((ops["rescale_mults"] + ops["act_quant_mults"]) * e["fp32_mult"]
              + ops["bias_adds"] * e["fp32_add"])
    energy = {
        "ternary_int8_adds": ops["ternary_adds"] * e["int8_add"] + scalar + fp_rest,
        "ternary_int32_adds": ops["ternary_adds"] * e["int32_add"] + scalar + fp_rest,
        "fp32": dense_macs * (e["fp32_mult"] + e["fp32_add"]) + bias_total * e["fp32_add"],
        "fp16": dense_macs * (e["fp16_mult"] + e["fp16_add"]) + bias_total * e["fp16_add"],
        "ternary_layers_only": ops["ternary_adds"] * e["int8_add"] + scalar,
        "ternary_layers_at_fp32": ops["ternary_adds"] * (e["fp32_mult"] + e["fp32_add"])
        + ops["bias_adds"] * e["fp32_add"],
    }
    return {
        "file": os.fspath(path), "file_bytes": h.file_size, "format_version": h.version,
        "model_class": h.metadata.get("model_class"),
        "tokenizer_bytes": len(h.metadata["tokenizer"].encode()) if "tokenizer" in h.metadata else None,
        "layers": rows,
        "totals": {"ternary_weights": ternary_weights, "ternary_bytes": ternary_bytes,
                   "ternary_bits_per_weight": 8 * ternary_bytes / ternary_weights if ternary_weights else 0.0,
                   "fp_params": fp_params, "fp_bytes": fp_bytes},
        "ops_per_token": ops, "energy_pj_per_token": energy,
        "energy_figures_pj": dict(e), "energy_source": ENERGY_SOURCE,
    }


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:g}"



def format_info(d: dict) -> str:
    """The human-readable table of `describe` (non-printable characters of names escaped)."""
    out = [f"{_printable(d['file'])}: tritium format v{d['format_version']}, {d['file_bytes']:,} bytes"
           + (f", {_printable(d['model_class'])}" if d["model_class"] else "")
           + (f", tokenizer stored ({d['tokenizer_bytes']:,} bytes of JSON)" if d.get("tokenizer_bytes") else "")]
    out.append(f"{'name':<48} {'shape':>16} {'format':<14} {'bytes':>13} {'bits/w':>7}")
    for r in d["layers"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        out.append(f"{_printable(r['name'])[-48:]:<48} {shape:>16} {r['format']:<14} {r['bytes']:>13,} "
                   f"{r['bits_per_weight']:>7.2f}")
    t = d["totals"]
    out.append(f"ternary: {t['ternary_weights']:,} weights in {t['ternary_bytes']:,} bytes "
               f"({t['ternary_bits_per_weight']:.3f} bits/weight incl. scales and bias); "
               f"full precision: {t['fp_params']:,} values in {t['fp_bytes']:,} bytes")
    o, en = d["ops_per_token"], d["energy_pj_per_token"]
    out.append("arithmetic per token (linear layers only; attention, norms and activations not counted):")
    out.append(f"  ternary layers: {_fmt_count(o['ternary_adds'])} integer adds, 0 weight multiplies; "
               f"{_fmt_count(o['rescale_mults'])} fp32 rescale multiplies, "
               f"{_fmt_count(o['act_quant_mults'])} fp32 activation-quantization multiplies, "
               f"{_fmt_count(o['bias_adds'])} fp32 bias adds")
    out.append(f"  full-precision linear layers: {_fmt_count(o['fp_linear_mults'])} fp32 multiplies, "
               f"{_fmt_count(o['fp_linear_adds'])} fp32 adds")
    fig = ", ".join(f"{k} {v} pJ" for k, v in d["energy_figures_pj"].items())
    out.append(f"energy of that arithmetic per token ({fig}; {d['energy_source']}):")
    fp32 = en["fp32"]
    labels = (("frozen, int8 adds", "ternary_int8_adds"), ("frozen, int32 adds", "ternary_int32_adds"),
              ("fp32 model", "fp32"), ("fp16 model", "fp16"))
    for label, key in labels:
        ratio = f"  ({fp32 / en[key]:.1f}x less than fp32)" if key.startswith("ternary") and en[key] else ""
        out.append(f"  {label:<20} {en[key] / 1e6:>10.3f} uJ{ratio}")
    if en["ternary_layers_only"]:
        out.append(f"  ternary layers alone: {en['ternary_layers_only'] / 1e6:.3f} uJ (int8 adds) vs "
                   f"{en['ternary_layers_at_fp32'] / 1e6:.3f} uJ for the same layers at fp32 "
                   f"({en['ternary_layers_at_fp32'] / en['ternary_layers_only']:.1f}x)")
    return "\n".join(out)




def describe_gguf(path: str | os.PathLike) -> dict:
    """Architecture, tensor counts and bytes by type, and bits per weight of the TQ layers of a GGUF file.

    Raises `TritiumFormatError` (one line) for a malformed file.
    """
    from .formats.gguf import _TQ_CODECS, _field, _read_gguf

    reader = _read_gguf(path)
    arch = _field(path, reader, "general.architecture", str, "")
    by_type: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        row = by_type.setdefault(t.tensor_type.name, {"tensors": 0, "values": 0, "bytes": 0})
        row["tensors"] += 1
        row["values"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
    tq = [r for name, r in by_type.items() if name in _TQ_CODECS]
    tq_values, tq_bytes = sum(r["values"] for r in tq), sum(r["bytes"] for r in tq)
    return {
        "file": os.fspath(path), "file_bytes": os.path.getsize(path), "format": "gguf",
        "architecture": arch, "name": _field(path, reader, "general.name", str, ""),
        "tokenizer": _field(path, reader, "tokenizer.ggml.model", str, "none"),
        "tensors": len(reader.tensors), "by_type": by_type, "tensor_bytes": sum(r["bytes"] for r in by_type.values()),
        "tq_bits_per_weight": 8 * tq_bytes / tq_values if tq_values else 0.0,
    }


def format_gguf_info(d: dict) -> str:
    """The human-readable summary of `describe_gguf` (non-printable characters escaped)."""
    out = [f"{_printable(d['file'])}: GGUF, {d['file_bytes']:,} bytes, architecture {_printable(d['architecture'])!s}"
           + (f", {_printable(d['name'])}" if d["name"] else "") + f", tokenizer {_printable(d['tokenizer'])}"]
    out.append(f"{'type':<8} {'tensors':>8} {'values':>14} {'bytes':>14} {'bits/w':>7}")
    for name, r in sorted(d["by_type"].items()):
        bits = 8 * r["bytes"] / r["values"] if r["values"] else 0.0
        out.append(f"{name:<8} {r['tensors']:>8,} {r['values']:>14,} {r['bytes']:>14,} {bits:>7.3f}")
    out.append(f"{d['tensors']:,} tensors, {d['tensor_bytes']:,} bytes of tensor data"
               + (f"; ternary (TQ) layers at {d['tq_bits_per_weight']:.3f} bits/weight incl. block scales"
                  if d["tq_bits_per_weight"] else ""))
    return "\n".join(out)


def describe_hf_bitnet(path: str | os.PathLike) -> dict:
    """Model class, quantization, ternary layers with their bits per weight, and the other tensors by dtype of
    a Hugging Face BitNet checkpoint folder (its ``config.json`` and safetensors headers; no tensor data).

    Raises `TritiumFormatError` (one line) for a malformed folder.
    """
    from .formats.hf_bitnet import _config, _tensors

    folder = Path(path)
    model_class, config, quantization = _config(folder)
    entries, _ = _tensors(folder)
    scaled = (name.removesuffix(".weight_scale") for name in entries if name.endswith(".weight_scale"))
    ternary = sorted(n for n in scaled if getattr(entries.get(f"{n}.weight"), "dtype", None) == "U8")
    owned = {f"{n}.{t}" for n in ternary for t in ("weight", "weight_scale", "bias", "rms_norm.weight")}
    ternary_weights = sum(4 * math.prod(entries[f"{n}.weight"].shape) for n in ternary)
    ternary_bytes = sum(_entry_bytes(entries[k]) for k in owned if k in entries)
    by_dtype: dict[str, dict[str, int]] = {}
    for name, entry in entries.items():
        if name in owned:
            continue
        row = by_dtype.setdefault(entry.dtype, {"tensors": 0, "values": 0, "bytes": 0})
        row["tensors"] += 1
        row["values"] += math.prod(entry.shape)
        row["bytes"] += _entry_bytes(entry)
    files = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    return {
        "file": os.fspath(path), "file_bytes": sum(e.stat().st_size for e in files), "format": "hf-bitnet",
        "model_class": model_class, "norm": quantization.norm, "tensors": len(entries),
        "tokenizer": (folder / "tokenizer.json").is_file(), "ternary_layers": len(ternary),
        "ternary_weights": ternary_weights, "ternary_bytes": ternary_bytes,
        "ternary_bits_per_weight": 8 * ternary_bytes / ternary_weights if ternary_weights else 0.0,
        "by_dtype": by_dtype, "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
    }


def _entry_bytes(entry) -> int:
    return math.prod(entry.shape) * _DTYPES[entry.dtype].itemsize


def format_hf_bitnet_info(d: dict) -> str:
    """The human-readable summary of `describe_hf_bitnet` (non-printable characters escaped)."""
    out = [f"{_printable(d['file'])}: Hugging Face BitNet folder, {d['file_bytes']:,} bytes, {d['model_class']}"
           f" ({d['layers']} layers, hidden {d['hidden_size']}), input norm {d['norm'] or 'none'}, "
           + ("with tokenizer" if d["tokenizer"] else "no tokenizer")]
    out.append(f"ternary: {d['ternary_layers']} layers, {d['ternary_weights']:,} weights in {d['ternary_bytes']:,} "
               f"bytes ({d['ternary_bits_per_weight']:.3f} bits/weight incl. scales and bias)")
    out.append(f"{'dtype':<8} {'tensors':>8} {'values':>14} {'bytes':>14}")
    for name, r in sorted(d["by_dtype"].items()):
        out.append(f"{name:<8} {r['tensors']:>8,} {r['values']:>14,} {r['bytes']:>14,}")
    out.append(f"{d['tensors']:,} tensors")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .formats import _source

    parser.add_argument("file", metavar="PATH", type=_source,
                        help="a file written by tritium.save, a GGUF file or a Hugging Face BitNet folder")
    parser.add_argument("--json", metavar="PATH", type=output_file,
                        help="also write the description as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """``tritium info``: a tritium or GGUF file or a Hugging Face BitNet folder described; anything else is a
    usage error (one line, exit 2)."""
    from .formats import gguf

    kind = "hf-bitnet" if Path(args.file).is_dir() else "gguf" if gguf.is_gguf(args.file) else "tritium"
    describe_, format_ = {"hf-bitnet": (describe_hf_bitnet, format_hf_bitnet_info),
                          "gguf": (describe_gguf, format_gguf_info), "tritium": (describe, format_info)}[kind]
    try:
        d = describe_(args.file)
    except (TritiumFormatError, ImportError) as e:
        raise UsageError(_printable(e)) from None
    print(format_(d))
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(args.json, json.dumps(d, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"--json: cannot write {_printable(args.json)} ({e})") from None
    return 0


__all__ = ["ENERGY_PJ", "ENERGY_SOURCE", "describe", "describe_gguf", "describe_hf_bitnet", "format_gguf_info",
           "format_hf_bitnet_info", "format_info"]
