"""The packed ternary layouts of `tritium.formats.codecs`: each entry against an independent reference written
here (plain Python loops over the layout's definition), against the projects whose layouts they copy
(transformers' BitNet packing, the gguf package's TQ2_0/TQ1_0 quantizers) bit for bit, and on hostile bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritium.formats import codecs
from tritium.formats.native import TritiumFormatError

SMALL = dict(max_examples=60, deadline=None, derandomize=True, database=None)


def ternary(data, n: int, k: int) -> torch.Tensor:
    values = data.draw(st.lists(st.integers(-1, 1), min_size=n * k, max_size=n * k))
    return torch.tensor(values, dtype=torch.int8).reshape(n, k)


# ------------------------------------------------------------------------------- independent references


def ref_2bit(q: list[list[int]], k: int) -> list[list[int]]:
    out = []
    for row in q:
        codes = [w + 1 for w in row] + [1] * ((-k) % 4)
        out.append([sum(codes[4 * j + t] << (2 * t) for t in range(4)) for j in range(len(codes) // 4)])
    return out


def ref_base3(q: list[list[int]]) -> list[int]:
    flat = [w + 1 for row in q for w in row]
    flat += [1] * ((-len(flat)) % 5)
    return [sum(flat[5 * b + i] * 3**i for i in range(5)) for b in range(len(flat) // 5)]


def ref_hf(q: list[list[int]], n: int, k: int) -> list[list[int]]:
    rows = (n + 3) // 4
    out = [[0] * k for _ in range(rows)]
    for i in range(4):
        for j in range(rows):
            r = i * rows + j
            if r < n:
                for c in range(k):
                    out[j][c] |= (q[r][c] + 1) << (2 * i)
    return out


def fp16_bytes(x: float) -> list[int]:
    return list(np.array([x], dtype=np.float16).view(np.uint8))


def ref_tq2(q: list[list[int]], scale: list[float]) -> list[list[int]]:
    """llama.cpp's quantize_row_tq2_0_ref on rows ``q * scale``."""
    out = []
    for row, s in zip(q, scale, strict=True):
        data = []
        for b in range(0, len(row), 256):
            x = [w * (1 if s > 0 else -1 if s < 0 else 0) for w in row[b: b + 256]]
            live = any(x)
            for j in range(0, 256, 128):
                for m in range(32):
                    data.append(sum((x[j + m + t * 32] + 1) << (2 * t) for t in range(4)))
            data += fp16_bytes(abs(s) if live else 0.0)
        out.append(data)
    return out


def ref_tq1(q: list[list[int]], scale: list[float]) -> list[list[int]]:
    """llama.cpp's quantize_row_tq1_0_ref on rows ``q * scale`` (Horner form, most significant trit first)."""
    def byte(trits: list[int]) -> int:
        v = 0
        for t in trits:
            v = v * 3 + t
        return (v * 256 + 242) // 243

    out = []
    for row, s in zip(q, scale, strict=True):
        data = []
        for b in range(0, len(row), 256):
            x = [w * (1 if s > 0 else -1 if s < 0 else 0) + 1 for w in row[b: b + 256]]
            live = any(v != 1 for v in x)
            data += [byte([x[m + t * 32] for t in range(5)]) for m in range(32)]
            data += [byte([x[160 + m + t * 16] for t in range(5)]) for m in range(16)]
            data += [byte([x[240 + j + t * 4] for t in range(4)] + [0]) for j in range(4)]
            data += fp16_bytes(abs(s) if live else 0.0)
        out.append(data)
    return out


def ref_tq1_decode(p: list[int]) -> list[int] | None:
    """The 256 codes (0..2) of a 54-byte TQ1_0 block, or None if a byte is not ``ceil(v * 256 / 243)``."""
    digits = []
    for b in p[:52]:
        v = b * 243 >> 8
        if (v * 256 + 242) // 243 != b:
            return None
        digits.append([v // 3**e % 3 for e in (4, 3, 2, 1, 0)])
    if any(d[4] for d in digits[48:]):
        return None
    codes = [0] * 256
    for m in range(32):
        for t in range(5):
            codes[m + t * 32] = digits[m][t]
    for m in range(16):
        for t in range(5):
            codes[160 + m + t * 16] = digits[32 + m][t]
    for j in range(4):
        for t in range(4):
            codes[240 + j + t * 4] = digits[48 + j][t]
    return codes


# ------------------------------------------------------------------------------------------- the table


def test_table_entries():
    assert set(codecs.CODECS) == {"2bit", "base3", "tq2_0", "tq1_0", "hf_bitnet"}
    for name, c in codecs.CODECS.items():
        assert c.name == name
        k = 512 if c.block > 1 else 7
        q = torch.zeros(5, k, dtype=torch.int8)
        packed = codecs.pack(name, q, 1.0 if c.scaled else None)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == codecs.packed_shape(name, 5, k)
    assert codecs.bits_per_weight("tq2_0", 4, 256) == 8 * 66 / 256
    assert codecs.bits_per_weight("tq1_0", 4, 256) == 8 * 54 / 256
    assert codecs.bits_per_weight("hf_bitnet", 8, 3) == 2.0


@settings(**SMALL)
@given(st.integers(1, 4), st.integers(1, 11), st.data())
def test_2bit_and_base3_match_reference(n, k, data):
    q = ternary(data, n, k)
    assert codecs.pack("2bit", q).tolist() == ref_2bit(q.tolist(), k)
    assert codecs.pack("base3", q).tolist() == ref_base3(q.tolist())
    for name in ("2bit", "base3"):
        assert torch.equal(codecs.unpack(name, codecs.pack(name, q), n, k), q)


@settings(**SMALL)
@given(st.integers(1, 13), st.integers(1, 6), st.data())
def test_hf_bitnet_matches_reference(n, k, data):
    q = ternary(data, n, k)
    packed = codecs.pack("hf_bitnet", q)
    assert packed.shape == ((n + 3) // 4, k)
    assert packed.tolist() == ref_hf(q.tolist(), n, k)
    assert torch.equal(codecs.unpack("hf_bitnet", packed, n, k), q)


@settings(**SMALL)
@given(st.integers(1, 13), st.integers(1, 6), st.data())
def test_hf_bitnet_matches_transformers(n, k, data):
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    unpack_weights = getattr(bitnet.unpack_weights, "_torchdynamo_orig_callable", None)
    unpack_weights = unpack_weights or getattr(bitnet.unpack_weights, "__wrapped__", bitnet.unpack_weights)
    q = ternary(data, n, k)
    packed = codecs.pack("hf_bitnet", q)
    assert torch.equal(packed, bitnet.pack_weights(q.clone()))  # pack_weights adds 1 to its argument in place
    theirs = unpack_weights(packed, torch.int8)
    assert theirs.shape == (4 * ((n + 3) // 4), k)
    assert torch.equal(theirs[:n], q)
    assert theirs[n:].eq(-1).all()  # padding rows hold code 0


def test_hf_bitnet_docstring_example():
    """transformers' own worked example of its layout."""
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    want = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert codecs.unpack("hf_bitnet", packed, 8, 2).tolist() == want


@pytest.mark.parametrize("name", ["tq2_0", "tq1_0"])
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 3), st.integers(1, 2), st.data())
def test_tq_match_reference_and_gguf(name, n, blocks, data):
    k = 256 * blocks
    q = ternary(data, n, k)
    if data.draw(st.booleans()):
        q[0, :256] = 0  # an all-zero block stores scale 0
    scale = torch.tensor(data.draw(st.lists(st.sampled_from([0.5, -0.25, 1e-3, 3.0, 0.0, 1 / 3]),
                                            min_size=n, max_size=n)), dtype=torch.float32)
    packed = codecs.pack(name, q, scale)
    ref = (ref_tq2 if name == "tq2_0" else ref_tq1)(q.tolist(), scale.tolist())
    assert packed.tolist() == ref
    got_q, d = codecs.unpack_scaled(name, packed, n, k)
    w = got_q.float().reshape(n, -1, 256) * d.unsqueeze(-1)
    expect = (q.float() * scale.reshape(-1, 1).half().float()).reshape(n, -1, 256)
    assert torch.equal(w, expect)
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType.TQ2_0 if name == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    theirs = gguf.quants.quantize((q.float() * scale.reshape(-1, 1)).numpy(), qtype)
    assert np.array_equal(packed.numpy(), theirs)
    assert np.array_equal(w.reshape(n, k).numpy(), gguf.quants.dequantize(theirs, qtype))


def test_tq1_every_byte_against_reference():
    """Every byte value in every position of a TQ1_0 block: decoded as the reference decodes it, or refused."""
    base = codecs.pack("tq1_0", torch.zeros(1, 256, dtype=torch.int8), 1.0)
    for pos in (0, 31, 32, 47, 48, 51):
        for b in range(256):
            p = base.clone()
            p[0, pos] = b
            want = ref_tq1_decode(p[0].tolist())
            if want is None:
                with pytest.raises(TritiumFormatError):
                    codecs.unpack("tq1_0", p, 1, 256)
            else:
                assert (codecs.unpack("tq1_0", p, 1, 256) + 1).tolist() == [want]


# ------------------------------------------------------------------------------------------ hostile bytes


@pytest.mark.parametrize("name", list(codecs.CODECS))
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 9), st.data())
def test_mutated_bytes_are_refused_or_canonical(name, n, data):
    """Any byte changed: unpack raises TritiumFormatError, or what it returns packs back to the same codes."""
    c = codecs.CODECS[name]
    k = 256 if c.scaled else data.draw(st.integers(1, 9))
    q = ternary(data, n, k)
    scale = torch.ones(n) if c.scaled else None
    packed = codecs.pack(name, q, scale)
    flat = packed.view(-1)
    i = data.draw(st.integers(0, flat.numel() - 1))
    flat[i] = data.draw(st.integers(0, 255))
    try:
        got, d = codecs.unpack_scaled(name, packed, n, k)
    except TritiumFormatError:
        return
    assert got.dtype == torch.int8 and got.shape == (n, k) and got.abs().le(1).all()
    again = codecs.pack(name, got, scale)
    if c.scaled:  # compare the code bytes only (the fp16 scales were not re-derived)
        width = 66 if name == "tq2_0" else 54
        again, packed = again.reshape(n, -1, width)[..., :-2], packed.reshape(n, -1, width)[..., :-2]
    assert torch.equal(again, packed)


@pytest.mark.parametrize("name,p,n,k,match", [
    ("2bit", torch.tensor([[0b11]], dtype=torch.uint8), 1, 1, "invalid code 3"),
    ("2bit", torch.tensor([[0b00000001]], dtype=torch.uint8), 1, 1, "invalid padding"),
    ("base3", torch.tensor([243], dtype=torch.uint8), 1, 5, "byte >= 243"),
    ("base3", torch.tensor([2 * 3], dtype=torch.uint8), 1, 1, "invalid padding"),
    ("hf_bitnet", torch.tensor([[0b11000000]], dtype=torch.uint8), 4, 1, "invalid code 3"),
    ("hf_bitnet", torch.tensor([[0b01000001]], dtype=torch.uint8), 3, 1, "invalid padding"),
    ("hf_bitnet", torch.zeros(2, 3, dtype=torch.uint8), 4, 3, r"expected torch.uint8 \[1, 3\]"),
    ("hf_bitnet", torch.zeros(1, 3, dtype=torch.int8), 4, 3, "packed weight is torch.int8"),
    ("tq2_0", torch.full((1, 66), 0xFF, dtype=torch.uint8), 1, 256, "invalid code 3"),
    ("tq2_0", torch.zeros(1, 66, dtype=torch.uint8), 1, 255, "not a multiple"),
    ("tq1_0", torch.ones(1, 54, dtype=torch.uint8), 1, 256, "not a base-3 code"),
])
def test_invalid_bytes_raise_format_error(name, p, n, k, match):
    with pytest.raises(TritiumFormatError, match=match):
        codecs.unpack(name, p, n, k, where="w")
    with pytest.raises(TritiumFormatError, match=match):
        codecs.check(name, p, n, k, where="w")


def test_tq1_padding_trit():
    """The fifth trit of the 4-weight bytes must be zero."""
    p = codecs.pack("tq1_0", torch.zeros(1, 256, dtype=torch.int8), 1.0)
    p[0, 48] = (1 * 256 + 242) // 243  # v = 1: only the padding trit set
    with pytest.raises(TritiumFormatError, match="invalid padding"):
        codecs.unpack("tq1_0", p, 1, 256)


def test_bad_arguments():
    q = torch.zeros(2, 256, dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown packed layout 'nope'"):
        codecs.pack("nope", q)
    with pytest.raises(ValueError, match="only -1, 0 and 1"):
        codecs.pack("2bit", torch.full((2, 2), 2))
    with pytest.raises(ValueError, match="only -1, 0 and 1"):
        codecs.pack("2bit", torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="2-D"):
        codecs.pack("hf_bitnet", torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="pass scale"):
        codecs.pack("tq2_0", q)
    with pytest.raises(ValueError, match="stores no scale"):
        codecs.pack("hf_bitnet", q, 1.0)
    with pytest.raises(ValueError, match="multiple of the block"):
        codecs.pack("tq1_0", torch.zeros(2, 100, dtype=torch.int8), 1.0)
    with pytest.raises(ValueError, match="1 or N=2 finite"):
        codecs.pack("tq2_0", q, torch.ones(3))
    with pytest.raises(ValueError, match="overflows the fp16"):
        codecs.pack("tq2_0", torch.ones(2, 256, dtype=torch.int8), 1e6)
    with pytest.raises(ValueError, match="n=0"):
        codecs.unpack("2bit", torch.zeros(0, 1, dtype=torch.uint8), 0, 1)
