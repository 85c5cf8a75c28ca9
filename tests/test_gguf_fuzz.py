"""Hostile GGUF files for `import_gguf` and ``tritium info``: valid small files exported by tritium are taken
apart into their metadata, tensor table and data (read with the gguf package), mutated (values, value types,
string lengths and array counts, tensor shapes, types, names and offsets, header counts, data bytes, raw byte
flips and truncations) and written back by an independent GGUF writer. Every mutated file must import (and
then hold exactly the file's dequantized ternary weights) or raise `TritiumFormatError` in one line, within a
time limit and without unbounded memory. ``TRITIUM_FUZZ_SCALE`` multiplies the number of examples; examples are
derandomized so that runs are reproducible, unless ``TRITIUM_FUZZ_RANDOM=1`` (for longer hunts)."""

from __future__ import annotations

import contextlib
import os
import resource
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tritium  # noqa: E402
from helpers import deadline  # noqa: E402
from test_gguf import SAMPLE, tiny, train_tokenizer  # noqa: E402
from tritium.formats import import_gguf  # noqa: E402
from tritium.formats.gguf import MAX_GGUF_TENSORS, PRESET  # noqa: E402
from tritium.formats.native import TritiumFormatError  # noqa: E402
from tritium.info import describe_gguf  # noqa: E402

SCALE = float(os.environ.get("TRITIUM_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, derandomize=not os.environ.get("TRITIUM_FUZZ_RANDOM"), database=None,
            suppress_health_check=list(HealthCheck))
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
TQ = {34: "TQ1_0", 35: "TQ2_0"}
SECONDS = 20  # per example, generous for a loaded machine (a clean import takes about 0.03 s)


# --------------------------------------------------------------------------------- an independent writer


def enc_str(b: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if length is None else length) + b


def enc_value(vtype: int, value) -> bytes:
    """The payload of a GGUF metadata value (after its type tag)."""
    if vtype in SCALARS:
        return struct.pack("<" + SCALARS[vtype], value)
    if vtype == STRING:
        return enc_str(value if isinstance(value, bytes) else value.encode())
    itype, items = value
    return struct.pack("<IQ", itype, len(items)) + b"".join(enc_value(itype, v) for v in items)


@dataclass(repr=False)
class Layout:
    """A GGUF file as the parts the fuzzers edit; `to_bytes` writes exactly what they say (counts included)."""

    kvs: list[tuple[bytes, int, bytes]]  # key, value type, payload
    tensors: list[tuple[bytes, list[int], int, int]]  # name, dims (ggml order), type, offset into data
    data: bytes
    version: int = 3
    n_tensors: int | None = None
    n_kvs: int | None = None
    alignment: int = 32
    cut: int | None = None
    flips: list[tuple[int, int]] = field(default_factory=list)

    def __repr__(self) -> str:
        kvs = [(k, t, p[:40]) for k, t, p in self.kvs]
        return (f"Layout(version={self.version}, n_tensors={self.n_tensors}, n_kvs={self.n_kvs}, "
                f"alignment={self.alignment}, cut={self.cut}, flips={self.flips}, kvs={kvs}, "
                f"tensors={self.tensors}, data=<{len(self.data)} bytes>)")

    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<I", self.version))
        out += struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kvs) if self.n_kvs is None else self.n_kvs)
        for key, vtype, payload in self.kvs:
            out += enc_str(key) + struct.pack("<I", vtype) + payload
        for name, dims, ttype, offset in self.tensors:
            out += enc_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            out += struct.pack("<IQ", ttype, offset)
        out += b"\0" * ((-len(out)) % self.alignment) + self.data
        for pos, value in self.flips:
            if pos < len(out):
                out[pos] = value
        return bytes(out if self.cut is None else out[: self.cut])


def take_apart(path: Path) -> Layout:
    """The `Layout` of a valid GGUF file, read with the gguf package."""
    reader = gguf.GGUFReader(path)
    kvs = []
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            kvs.append((key.encode(), int(f.types[0]), b"".join(p.tobytes() for p in f.parts[3:])))
    tensors = [(t.name.encode(), [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset - reader.data_offset))
               for t in reader.tensors]
    layout = Layout(kvs, tensors, bytes(reader.data[reader.data_offset:]))
    assert layout.to_bytes() == path.read_bytes()  # the writer above is faithful
    return layout


# ------------------------------------------------------------------------------------- the valid files


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny tensor operations: one thread avoids oversubscribing a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, one_thread) -> dict[str, tuple[Path, Layout]]:
    """A 1-block Llama in TQ2_0 with a gpt2 vocabulary and a 1-block Qwen2 (biases, per-channel scales) in
    TQ1_0, both 256 wide with 300 tokens."""
    folder = tmp_path_factory.mktemp("gguf_fuzz")
    tok = train_tokenizer(SAMPLE, 300)
    out = {}
    for arch, qtype, granularity in (("llama", "tq2_0", "tensor"), ("qwen2", "tq1_0", "channel")):
        model = tritium.freeze(tiny(arch, PRESET.replace(granularity=granularity), num_hidden_layers=1,
                                    intermediate_size=256, vocab_size=300))
        path = folder / f"{arch}.gguf"
        tritium.export(model, path, qtype=qtype, tokenizer=tok if arch == "llama" else None, float_type="f16")
        out[arch] = (path, take_apart(path))
    return out


# ------------------------------------------------------------------------------------------- the checks


class Hang(KeyboardInterrupt):
    """Raised by the alarm (a KeyboardInterrupt, so that no ``except Exception`` in the importer swallows it)."""


def limit(seconds: int):
    """`helpers.deadline` raising `Hang`."""
    return deadline(seconds, Hang)


def permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py row order of a query/key projection."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def check_weights(path: Path, model: torch.nn.Module) -> None:
    """Every ternary layer of an imported model computes with exactly the file's dequantized weights."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    files = {t.name: t for t in reader.tensors}
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    for mname, m in model.named_modules():
        if not isinstance(m, tritium.TernaryLinear):
            continue
        t = files[names.get_name(mname + ".weight", try_suffixes=(".weight", ".bias"))]
        want = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).copy())
        q = tritium.kernels.unpack(m.weight_packed, m.out_features, m.in_features)
        w = q.float() * m.weight_scale.reshape(-1, 1)
        if arch == "llama" and mname.endswith("q_proj"):
            w = permute(w, cfg.num_attention_heads)
        if arch == "llama" and mname.endswith("k_proj"):
            w = permute(w, cfg.num_key_value_heads)
        assert torch.equal(w, want), mname
        assert m.weight_scale.gt(0).all() and torch.isfinite(m.weight_scale).all(), mname


def attempt(path: Path, data: bytes, tmp: Path) -> str:
    """Import and describe ``data``: "ok" or "refused"; anything else (another exception, a hang) fails."""
    file = tmp / "fuzz.gguf"
    file.write_bytes(data)
    outcome = "ok"
    try:
        with limit(SECONDS):
            start = time.monotonic()
            try:
                model, _ = import_gguf(file)
            except TritiumFormatError as e:
                assert "\n" not in str(e) and str(e).startswith(str(file))
                outcome = "refused"
            else:
                assert not model.training
                check_weights(file, model)
            try:
                describe_gguf(file)
            except TritiumFormatError as e:
                assert "\n" not in str(e)
            assert time.monotonic() - start < SECONDS
    except Hang as e:
        pytest.fail(f"import_gguf or describe_gguf hung: {e}")
    with contextlib.suppress(Exception):  # outside a Hypothesis test there is no statistics to note
        event(outcome)
    return outcome


@pytest.fixture(scope="module")
def rss_guard():
    """The fuzzers must not raise the process's peak memory by more than 1 GiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # ru_maxrss is in KiB
    assert grown < 1, f"peak memory grew by {grown:.2f} GiB"


def test_bases_import_and_round_trip(bases, tmp_path):
    for path, layout in bases.values():
        assert attempt(path, layout.to_bytes(), tmp_path) == "ok"


# ------------------------------------------------------------------------------------------ the mutations

EDGE_INTS = [0, 1, 2, 3, 4, 31, 32, 64, 128, 255, 256, 257, 300, 512, 2**16, 2**20 + 1, 2**24 + 1, 2**31 - 1,
             2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
KNOWN_KEYS = [
    "general.architecture", "general.alignment", "general.name", "llama.block_count", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count",
    "llama.context_length", "llama.vocab_size", "llama.rope.freq_base", "llama.rope.scaling.type",
    "llama.rope.scaling.factor", "llama.attention.layer_norm_rms_epsilon", "qwen2.block_count",
    "qwen2.embedding_length", "qwen2.attention.head_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
]
TENSOR_TYPES = [int(t) for t in gguf.GGMLQuantizationType] + [31, 36, 99, 2**16, 2**32 - 1]


def fit(vtype: int, v: int | float):
    """``v`` wrapped into the range of scalar type ``vtype``."""
    fmt = SCALARS[vtype]
    if fmt in "fd":
        return float(v)
    if fmt == "?":
        return bool(v)
    bits = 8 * struct.calcsize(fmt)
    v = int(v) % 2**bits
    return v - 2**bits if fmt.islower() and v >= 2 ** (bits - 1) else v


@st.composite
def scalar_values(draw, vtype: int):
    fmt = SCALARS[vtype]
    if fmt in "fd":
        return draw(st.one_of(st.sampled_from([0.0, -0.0, 1e-6, -1.0, 1e4, float("nan"), float("inf"), 1e300]),
                              st.floats(width=32 if fmt == "f" else 64)))
    return fit(vtype, draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))))


@st.composite
def values(draw, depth: int = 0):
    """(value type, payload) of a random metadata value; arrays may nest once and may lie about their count."""
    kind = draw(st.sampled_from(["scalar", "string", "array"]))
    if kind == "scalar":
        vtype = draw(st.sampled_from(sorted(SCALARS)))
        return vtype, enc_value(vtype, draw(scalar_values(vtype)))
    if kind == "string":
        text = draw(st.one_of(st.sampled_from([b"llama", b"qwen2", b"gpt2", b"none", b"linear", b"", b"a b"]),
                              st.binary(max_size=12), st.text(max_size=8).map(str.encode)))
        return STRING, enc_str(text)
    itype = draw(st.sampled_from(sorted(SCALARS) + [STRING, ARRAY]))
    n = draw(st.integers(0, 4))
    if itype == STRING:
        body = [enc_str(draw(st.binary(max_size=6))) for _ in range(n)]
    elif itype == ARRAY:  # arrays of one scalar type each
        inner = draw(st.sampled_from(sorted(SCALARS)))
        body = [enc_value(ARRAY, (inner, [draw(scalar_values(inner)) for _ in range(draw(st.integers(0, 3)))]))
                for _ in range(n)]
    else:
        body = [enc_value(itype, draw(scalar_values(itype))) for _ in range(n)]
    count = draw(st.one_of(st.just(n), st.sampled_from([n + 1, 2**20, 2**32, 2**63, 2**64 - 1])))
    return ARRAY, struct.pack("<IQ", itype, count) + b"".join(body)


@st.composite
def mutated(draw, layout: Layout) -> Layout:
    """``layout`` with one to three random mutations."""
    out = replace(layout, kvs=list(layout.kvs), tensors=[(n, list(d), t, o) for n, d, t, o in layout.tensors],
                  flips=[])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "type", "length", "drop_kv", "dup_kv", "add_kv", "dims", "ttype",
                                     "offset", "name", "drop_t", "dup_t", "counts", "version", "alignment",
                                     "data", "flip", "cut"]))
        i = draw(st.integers(0, max(len(out.kvs) - 1, 0)))
        j = draw(st.integers(0, max(len(out.tensors) - 1, 0)))
        if kind in ("value", "type", "length", "drop_kv", "dup_kv") and not out.kvs:
            continue
        if kind in ("dims", "ttype", "offset", "name", "drop_t", "dup_t") and not out.tensors:
            continue
        if kind == "value":
            out.kvs[i] = (out.kvs[i][0], *draw(values()))
        elif kind == "type":
            out.kvs[i] = (out.kvs[i][0], draw(st.one_of(st.integers(0, 14), st.sampled_from([2**31, 2**32 - 1]))),
                          out.kvs[i][2])
        elif kind == "length":  # the length of a string or the count of an array, or of the key
            key, vtype, payload = out.kvs[i]
            n = draw(st.sampled_from(EDGE_INTS))
            if vtype == STRING:
                payload = struct.pack("<Q", n) + payload[8:]
            elif vtype == ARRAY:
                payload = payload[:4] + struct.pack("<Q", n) + payload[12:]
            else:
                key = key[: n % (len(key) + 1)]
            out.kvs[i] = (key, vtype, payload)
        elif kind == "drop_kv":
            del out.kvs[i]
        elif kind == "dup_kv":
            out.kvs.insert(draw(st.integers(0, len(out.kvs))), out.kvs[i])
        elif kind == "add_kv":
            out.kvs.append((draw(st.sampled_from(KNOWN_KEYS)).encode(), *draw(values())))
        elif kind == "dims":
            dims = draw(st.lists(st.sampled_from(EDGE_INTS), min_size=0, max_size=5))
            out.tensors[j] = (out.tensors[j][0], dims, *out.tensors[j][2:])
        elif kind == "ttype":
            name, dims, _, offset = out.tensors[j]
            out.tensors[j] = (name, dims, draw(st.sampled_from(TENSOR_TYPES)), offset)
        elif kind == "offset":
            name, dims, ttype, offset = out.tensors[j]
            delta = draw(st.sampled_from([-64, -32, -1, 1, 32, 64, 2**32, 2**63]))
            out.tensors[j] = (name, dims, ttype, max(offset + delta, 0) % 2**64)
        elif kind == "name":
            other = draw(st.one_of(st.sampled_from([t[0] for t in out.tensors]), st.binary(max_size=24)))
            out.tensors[j] = (other, *out.tensors[j][1:])
        elif kind == "drop_t":
            del out.tensors[j]
        elif kind == "dup_t":
            out.tensors.append(out.tensors[j])
        elif kind == "counts":
            n = draw(st.sampled_from(EDGE_INTS + [len(out.tensors) + 1, len(out.kvs) + 1]))
            if draw(st.booleans()):
                out.n_tensors = n
            else:
                out.n_kvs = n
        elif kind == "version":
            out.version = draw(st.sampled_from([0, 1, 2, 4, 2**16, 3 << 16, 3 << 24, 2**32 - 1]))
        elif kind == "alignment":
            out.kvs = [kv for kv in out.kvs if kv[0] != b"general.alignment"]
            vtype, payload = draw(st.one_of(values(), st.sampled_from(
                [(4, struct.pack("<I", a)) for a in (0, 1, 3, 16, 32, 64, 2**31)])))
            out.kvs.append((b"general.alignment", vtype, payload))
            out.alignment = draw(st.sampled_from([1, 8, 32, 64]))
        elif kind == "data":  # bytes inside the tensor data: TQ codes and fp16 block scales, floats
            data = bytearray(out.data)
            for _ in range(draw(st.integers(1, 8))):
                pos = draw(st.integers(0, len(data) - 1))
                data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7C, 0xFC, 0x7E, 0xBC, 0x3C, 0x55, 0xAA, 0x01]))
            out.data = bytes(data)
        elif kind == "flip":
            size = len(out.to_bytes())
            out.flips.append((draw(st.integers(0, size - 1)), draw(st.integers(0, 255))))
        elif kind == "cut":
            out.cut = draw(st.integers(0, len(out.to_bytes())))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@settings(max_examples=int(120 * SCALE), **FUZZ)
@given(data=st.data())
def test_structured_mutations(bases, arch, data, tmp_path_factory, rss_guard):
    path, layout = bases[arch]
    attempt(path, data.draw(mutated(layout)).to_bytes(), tmp_path_factory.getbasetemp())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@settings(max_examples=int(60 * SCALE), **FUZZ)
@given(data=st.data())
def test_tensor_data_mutations(bases, arch, data, tmp_path_factory, rss_guard):
    """Bytes of the ternary tensors (codes and fp16 block scales) changed: an import that succeeds computes with
    exactly the file's dequantized weights (checked in `attempt`)."""
    path, layout = bases[arch]
    blob = bytearray(layout.data)
    width = {35: 66, 34: 54}
    tq = [(o, o + int(np.prod(d)) // 256 * width[t], width[t]) for _, d, t, o in layout.tensors if t in TQ]
    for _ in range(data.draw(st.integers(1, 6))):
        start, end, width = data.draw(st.sampled_from(tq))
        block = start + width * data.draw(st.integers(0, (end - start) // width - 1))
        if data.draw(st.booleans()):  # the block's scale
            scale = data.draw(st.sampled_from([0.0, -0.0, -1.0, 2.0, 1e-7, 65504.0, float("nan"), float("inf")]))
            blob[block + width - 2: block + width] = np.float16(scale).tobytes()
        else:
            blob[block + data.draw(st.integers(0, width - 3))] = data.draw(st.integers(0, 255))
    attempt(path, layout.to_bytes()[: -len(layout.data)] + bytes(blob), tmp_path_factory.getbasetemp())


@settings(max_examples=int(150 * SCALE), **FUZZ)
@given(data=st.data())
def test_raw_byte_flips_and_truncations(bases, data, tmp_path_factory, rss_guard):
    path, layout = bases["llama"]
    blob = bytearray(layout.to_bytes())
    header = len(blob) - len(layout.data)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.one_of(st.integers(0, header - 1), st.integers(0, len(blob) - 1)))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    attempt(path, bytes(blob), tmp_path_factory.getbasetemp())


# ------------------------------------------------------------------------------- found by these fuzzers


def refused(layout: Layout, tmp_path: Path, match: str, seconds: float = 5.0) -> None:
    file = tmp_path / "bad.gguf"
    file.write_bytes(layout.to_bytes())
    start = time.monotonic()
    with limit(60), pytest.raises(TritiumFormatError, match=match):
        import_gguf(file)
    with limit(60), pytest.raises(TritiumFormatError, match=match):
        describe_gguf(file)
    assert time.monotonic() - start < seconds


def test_huge_array_count_is_refused_at_once(bases, tmp_path):
    """An array of 2**60 numbers in a few bytes: the gguf package's reader looped over the missing items."""
    _, layout = bases["llama"]
    bad = replace(layout, kvs=layout.kvs + [(b"x", ARRAY, struct.pack("<IQ", 0, 2**60))])
    refused(bad, tmp_path, "MAX_GGUF_ARRAY_ITEMS")
    bad = replace(layout, kvs=layout.kvs + [(b"x", ARRAY, struct.pack("<IQ", 0, 2**20))])
    refused(bad, tmp_path, "'x' runs past the end of the file")
    strings = struct.pack("<IQ", STRING, 10**6) + enc_str(b"")
    refused(replace(layout, kvs=layout.kvs + [(b"x", ARRAY, strings)]), tmp_path, "'x' runs past the end")


def test_header_counts_are_bounded(bases, tmp_path):
    _, layout = bases["llama"]
    refused(replace(layout, n_tensors=MAX_GGUF_TENSORS + 1), tmp_path, "exceeds MAX_GGUF_TENSORS")
    refused(replace(layout, n_kvs=2**63), tmp_path, "exceeds MAX_GGUF_FIELDS")
    refused(replace(layout, n_kvs=len(layout.kvs) + 1000), tmp_path, "runs past the end of the file")
    nested = struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", 0, 0)
    refused(replace(layout, kvs=layout.kvs + [(b"x", ARRAY, nested)]), tmp_path, "deeper than MAX_GGUF_DEPTH")
    refused(replace(layout, kvs=layout.kvs + [(b"x", STRING, enc_str(b"", 2**62))]), tmp_path, "past the end")


def test_tensor_table_is_checked(bases, tmp_path):
    _, layout = bases["llama"]
    name, dims, ttype, offset = layout.tensors[0]

    def with_tensor(**kw) -> Layout:
        t = dict(name=name, dims=dims, ttype=ttype, offset=offset) | kw
        return replace(layout, tensors=[(t["name"], t["dims"], t["ttype"], t["offset"])] + layout.tensors[1:])

    refused(with_tensor(dims=[256, 2**62]), tmp_path, "extends past the end of the file")
    refused(with_tensor(dims=[2**32, 2**32, 2**32, 2**32]), tmp_path, "extends past the end of the file")
    refused(with_tensor(dims=[1, 1, 1, 1, 1]), tmp_path, "5 dimensions")
    refused(with_tensor(ttype=99), tmp_path, "unknown type 99")
    refused(with_tensor(ttype=35, dims=[100, 4]), tmp_path, "not a multiple of the TQ2_0 block of 256")
    refused(with_tensor(offset=offset + 1), tmp_path, "not a multiple of the alignment 32")
    refused(with_tensor(offset=2**63), tmp_path, "extends past the end of the file")
    refused(with_tensor(name=layout.tensors[1][0]), tmp_path, "appears twice")
    refused(with_tensor(name=b"\xff\xfe"), tmp_path, "a tensor name is not UTF-8")


def test_big_endian_and_unknown_versions(bases, tmp_path):
    """A big-endian file is described but not imported; other versions are refused."""
    file = tmp_path / "be.gguf"
    file.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 2) + struct.pack(">Q", 20) + b"general.architecture"
                     + struct.pack(">IQ", STRING, 5) + b"llama" + struct.pack(">Q", 10) + b"llama.rope"
                     + struct.pack(">IIQ", ARRAY, 4, 2) + struct.pack(">II", 7, 2**20))
    d = describe_gguf(file)
    assert d["architecture"] == "llama" and d["tensors"] == 0
    with pytest.raises(TritiumFormatError, match="big-endian GGUF files are not supported"):
        import_gguf(file)
    _, layout = bases["llama"]
    refused(replace(layout, version=4), tmp_path, "version 4 is not supported")
    refused(replace(layout, version=1), tmp_path, "version 1 is not supported")


def test_bos_token_the_template_cannot_hold_is_refused(bases, tmp_path):
    """A BOS token with a space made tokenizers' TemplateProcessing raise a plain ValueError."""
    _, layout = bases["llama"]
    kvs = []
    for key, vtype, payload in layout.kvs:
        if key == b"tokenizer.ggml.tokens":
            count = struct.unpack_from("<Q", payload, 4)[0]
            first = struct.unpack_from("<Q", payload, 12)[0]
            rest = payload[12 + 8 + first:]
            payload = struct.pack("<IQ", STRING, count) + enc_str(b"a b") + rest
        if key not in (b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.add_bos_token"):
            kvs.append((key, vtype, payload))
    kvs += [(b"tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 0)),
            (b"tokenizer.ggml.add_bos_token", 7, struct.pack("<?", True))]
    file = tmp_path / "bos.gguf"
    file.write_bytes(replace(layout, kvs=kvs).to_bytes())
    with pytest.raises(TritiumFormatError, match="the gpt2 vocabulary is malformed"):
        import_gguf(file)


def tq_scale_edit(layout: Layout, scale: float, codes_zero: bool) -> Layout:
    """``layout`` with the first block of the first TQ2_0 tensor given ``scale`` (and all-zero codes)."""
    name, dims, ttype, offset = next(t for t in layout.tensors if t[2] == 35)
    blob = bytearray(layout.data)
    if codes_zero:
        blob[offset: offset + 64] = bytes([0x55]) * 64
    blob[offset + 64: offset + 66] = np.float16(scale).tobytes()
    return replace(layout, data=bytes(blob))


def test_block_scales(bases, tmp_path):
    """A non-finite scale is refused even in an all-zero block (llama.cpp would multiply by it); a negative
    scale imports as negated codes with a positive scale, the same weights."""
    path, layout = bases["llama"]
    for scale in (float("nan"), float("inf")):
        file = tmp_path / "nan.gguf"
        file.write_bytes(tq_scale_edit(layout, scale, codes_zero=True).to_bytes())
        with pytest.raises(TritiumFormatError, match="non-finite block scale"):
            import_gguf(file)
    name, dims, ttype, offset = next(t for t in layout.tensors if t[2] == 35)
    d = np.frombuffer(layout.data[offset + 64: offset + 66], dtype=np.float16)[0]
    blob = bytearray(layout.data)
    for b in range(dims[1] * dims[0] // 256):  # every block of the tensor: scale -d
        blob[offset + 66 * b + 64: offset + 66 * b + 66] = np.float16(-d).tobytes()
    assert attempt(path, replace(layout, data=bytes(blob)).to_bytes(), tmp_path) == "ok"
