"""Fuzzing every reader of tritium files with mutations of valid files.

Each example mutates a file written by `tritium.save` (byte flips, truncation, edits of the JSON header
and of the JSON inside its metadata, duplicate keys, deep nesting, huge numbers, invalid UTF-8) and checks
that `load` (with and without a model), `read_header`, `describe` and ``tritium info`` either succeed or
raise `TritiumFormatError`: never another exception, never a hang. ``TRITIUM_FUZZ_EXAMPLES`` sets the
number of examples per test (default 500); examples are derandomized so that runs are reproducible,
unless ``TRITIUM_FUZZ_RANDOM=1`` (for longer hunts).
"""

import contextlib
import io as stdio
import json
import os
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import deadline
from tritium import freeze, load, quantize, save
from tritium.cli import main as cli_main
from tritium.formats.native import Checkpoint, TritiumFormatError, read_header
from tritium.info import describe

EXAMPLES = int(os.environ.get("TRITIUM_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TRITIUM_FUZZ_RANDOM"),
                database=None, suppress_health_check=list(HealthCheck))
JSON_IN_METADATA = ("layers", "aliases", "model_config")


class _Config:
    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps({"hidden_size": 8, "layers": [1, 2], "nested": {"a": None}})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 7, bias=False)
        self.c = nn.Linear(7, 8)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: stored once, plus an alias
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _skeleton():
    with torch.device("meta"):
        return _Net()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid files: ternary layers in both storages, an unfrozen `BitLinear`, a tied linear, buffers."""
    torch.manual_seed(0)
    model = _Net()
    quantize(model, "1.58-absmean-a4", include=[r"^c$"])
    quantize(model, "1.58-absmedian-channel", exclude=[r"^c$", r"^head$"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freeze(model.eval(), strict=False)
    folder = tmp_path_factory.mktemp("fuzz")
    out = []
    for storage in ("2bit", "base3"):
        save(model, folder / storage, storage=storage)
        assert isinstance(load(folder / storage), Checkpoint)
        load(folder / storage, _skeleton())
        out.append((folder / storage).read_bytes())
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-target") / "file.safetensors"


def _check(path, raw):
    """Every reader succeeds or raises TritiumFormatError on ``raw`` (written to ``path``)."""
    path.write_bytes(raw)
    with deadline(20), contextlib.redirect_stdout(stdio.StringIO()):
        for fn in (read_header, describe, load, lambda p: load(p, _skeleton())):
            try:
                fn(path)
            except TritiumFormatError:
                pass
        assert cli_main(["info", str(path)]) in (0, 2)


def _split(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


# -------------------------------------------------------------------------------------------- bytes


@FUZZ
@given(st.data())
def test_byte_mutations(files, target, data):
    raw = bytearray(data.draw(st.sampled_from(files)))
    (n,) = struct.unpack("<Q", raw[:8])
    region = data.draw(st.sampled_from(["anywhere", "header", "length", "data"]))
    lo, hi = {"anywhere": (0, len(raw)), "header": (8, 8 + n), "length": (0, 8), "data": (8 + n, len(raw))}[region]
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(lo, hi - 1))
        raw[i] = data.draw(st.one_of(st.integers(0, 255), st.sampled_from(b'{}[]",:0123456789\\\x00\xff\xc3')))
    _check(target, bytes(raw))


@FUZZ
@given(st.data())
def test_truncation_extension_and_length_field(files, target, data):
    raw = data.draw(st.sampled_from(files))
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=16))
    raw = raw[:cut] + tail
    if len(raw) >= 8 and data.draw(st.booleans()):
        n = data.draw(st.one_of(st.integers(0, len(raw) + 8), st.sampled_from([2**63, 2**64 - 1, 2**32])))
        raw = struct.pack("<Q", n) + raw[8:]
    _check(target, raw)


# --------------------------------------------------------------------------------------- JSON edits

_WORDS = ["F32", "U8", "I64", "BOOL", "F16", "ternary", "bitlinear", "linear", "2bit", "base3", "channel", "tensor",
          "layernorm", "rmsnorm", "tritium", "1", "2", "", "a", "a.weight", "emb.weight", "steps", "__metadata__",
          "dtype", "shape", "data_offsets", "kind", "in_features", "out_features", "bias", "norm", "scale",
          "storage", "config", "weight_bits", "act_bits", "granularity", "lambda_", "median_sample", "\ud800",
          "\x1b[31m", "\u00e9"]
_NUMBERS = [0, 1, -1, 2, 3, 4, 7, 8, 12, 2**31 - 1, 2**31, 2**32, 2**62, 2**63, 2**64, -(2**63), 10**30, 10**40,
            131_072, 131_073]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(_NUMBERS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(_WORDS), st.text(max_size=12),
)
_CONFIG_VALUES = st.sampled_from([["group", 3], ["group", 4], ["group", 7], ["group", 0], "channel", "tensor",
                                  1.58, 1, 2, 4, 8, 3, None, 0.5, 1.0, -1, 10**20, "absmean", "absmedian", "absmax"])
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_WORDS) | st.text(max_size=6),
                                                                 inner, max_size=4),
    max_leaves=12,
)
_RAW = st.one_of(
    _VALUES.map(json.dumps),
    st.integers(1, 5000).map(lambda d: "[" * d + "]" * d),
    st.integers(1, 5000).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.sampled_from(["1" * 31, "1" * 5000, "-0", "1e999", "-1e999", "NaN", "Infinity", "1.0", "2e3", "[0,0]",
                     '"\\ud800"', '"\\u0000"', "[2147483647, 2147483647, 2147483647, 2147483647, 0]"]),
)


class _Raw:
    """A value serialized as the given JSON text."""

    def __init__(self, text):
        self.text = text


class _Pairs:
    """An object serialized from a list of (key, value) pairs, so keys may repeat."""

    def __init__(self, pairs):
        self.pairs = pairs


def _dump(v):
    """JSON text of ``v``, with `_Raw` values verbatim and `_Pairs` objects."""
    if isinstance(v, _Raw):
        return v.text
    if isinstance(v, (dict, _Pairs)):
        pairs = v.pairs if isinstance(v, _Pairs) else v.items()
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(x)}" for k, x in pairs) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    return json.dumps(v)


def _tree(header):
    """The header with the JSON metadata strings parsed (marked to be serialized back as strings)."""
    meta = header.get("__metadata__", {})
    for key in JSON_IN_METADATA:
        if key in meta:
            meta[key] = {"__json__": json.loads(meta[key])}
    return header


def _serialize(tree):
    def enc(v):
        if isinstance(v, dict) and set(v) == {"__json__"}:
            return _Raw(json.dumps(_dump(enc(v["__json__"]))))
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, _Pairs):
            return _Pairs([(k, enc(x)) for k, x in v.pairs])
        if isinstance(v, list):
            return [enc(x) for x in v]
        return v

    return _dump(enc(tree)).encode("utf-8", "surrogatepass")


def _paths(v, prefix=()):
    out = [prefix]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*prefix, i))
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@FUZZ
@given(st.data())
def test_header_edits(files, target, data):
    header, body = _split(data.draw(st.sampled_from(files)))
    tree = _tree(header)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(tree) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent, key = _get(tree, path[:-1]), path[-1]
        op = data.draw(st.sampled_from(["replace", "raw", "delete", "add", "duplicate", "rename"]))
        if isinstance(parent, dict) and set(parent) == {"__json__"}:
            op = "raw"  # replace a whole JSON metadata string by garbage text
        if op == "replace":
            parent[key] = data.draw(_VALUES)
        elif op == "raw":
            parent[key] = _Raw(data.draw(_RAW))
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(_WORDS) | st.text(max_size=6))] = data.draw(_VALUES)
        elif op == "add":
            parent.insert(key, data.draw(_VALUES))
        elif op == "duplicate" and isinstance(parent, dict):
            dup = (key, data.draw(st.one_of(st.just(parent[key]), _VALUES)))
            if len(path) == 1:
                tree = _Pairs([*parent.items(), dup])
            else:
                _get(tree, path[:-2])[path[-2]] = _Pairs([*parent.items(), dup])
            break  # a repeated key is the last edit
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(_WORDS) | st.text(max_size=6))] = parent.pop(key)
    raw = _serialize(tree)
    _check(target, struct.pack("<Q", len(raw)) + raw + body)


@FUZZ
@given(st.data())
def test_layer_records(files, target, data):
    """Edits of single fields of the layer records, tensor entries and aliases (the likeliest to pass the
    first checks and reach the deeper ones)."""
    header, body = _split(data.draw(st.sampled_from(files)))
    meta = header["__metadata__"]
    layers, aliases = json.loads(meta["layers"]), json.loads(meta["aliases"])
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["layer", "config", "tensor", "alias", "model_config", "move"]))
        configs = [rec["config"] for rec in layers.values() if isinstance(rec, dict) and "config" in rec
                   and isinstance(rec["config"], dict)]
        if what == "config" and configs:
            config = data.draw(st.sampled_from(configs))
            config[data.draw(st.sampled_from(sorted(config) + ["x"]))] = data.draw(st.one_of(_CONFIG_VALUES, _VALUES))
        elif what == "layer":
            rec = layers[data.draw(st.sampled_from(sorted(layers)))]
            field = data.draw(st.sampled_from(sorted(rec) + ["config", "storage", "extra"]))
            if field == "config" and isinstance(rec.get("config"), dict) and data.draw(st.booleans()):
                rec["config"][data.draw(st.sampled_from(sorted(rec["config"]) + ["x"]))] = data.draw(_VALUES)
            else:
                rec[field] = data.draw(st.one_of(_SCALARS, _VALUES))
        elif what == "tensor":
            entry = header[data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            if field != "dtype" and data.draw(st.booleans()):
                value = list(entry[field])
                if value:
                    value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.sampled_from(_NUMBERS))
                entry[field] = value
            else:
                entry[field] = data.draw(_VALUES)
        elif what == "alias":
            aliases[data.draw(st.sampled_from(_WORDS))] = data.draw(st.sampled_from(_WORDS + sorted(header)))
        elif what == "model_config":
            meta["model_config"] = data.draw(st.one_of(_RAW, st.text(max_size=10)))
        else:  # rename a layer, or point it at another layer's tensors
            old = data.draw(st.sampled_from(sorted(layers)))
            layers[data.draw(st.sampled_from(_WORDS + sorted(layers)))] = layers.pop(old)
    meta["layers"], meta["aliases"] = json.dumps(layers), json.dumps(aliases)
    raw = json.dumps(header).encode()
    _check(target, struct.pack("<Q", len(raw)) + raw + body)
