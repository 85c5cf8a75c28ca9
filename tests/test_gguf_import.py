"""GGUF import (`tritium.formats.import_gguf`, ``tritium info FILE.gguf``): a model exported with
`tritium.export` comes back with the same ternary codes, scales and logits, re-exports to the same bytes, and
malformed or unsupported files are refused with `TritiumFormatError`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tritium  # noqa: E402
from test_gguf import BITNET, SAMPLE, agreement, ternary_layers, tiny, train_tokenizer  # noqa: E402
from tritium.cli import main  # noqa: E402
from tritium.formats import import_gguf  # noqa: E402
from tritium.formats.gguf import PRESET  # noqa: E402
from tritium.formats.native import TritiumFormatError  # noqa: E402
from tritium.info import describe_gguf  # noqa: E402


def frozen(arch: str = "llama", granularity: str = "tensor", **kw) -> torch.nn.Module:
    """A frozen `tiny` model whose weight scales and float weights are rounded to fp16 (so that the TQ block
    scales and an F16 embedding and head hold them exactly)."""
    model = tritium.freeze(tiny(arch, PRESET.replace(granularity=granularity), **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    for m in model.modules():
        if isinstance(m, tritium.TernaryLinear):
            m.weight_scale = m.weight_scale.half().float()
    return model


CASES = [
    ("llama", "tq2_0", "tensor", "f32", {}),
    ("llama", "tq1_0", "channel", "f16", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", "tq1_0", "tensor", "f32", {}),
    ("qwen2", "tq2_0", "channel", "f16", {}),
    ("bitnet", "tq1_0", "tensor", "f16", BITNET),
    ("bitnet", "tq2_0", "channel", "f32", BITNET),
]


@pytest.mark.parametrize("arch,qtype,granularity,float_type,kw", CASES)
def test_import_is_the_inverse_of_export(tmp_path, arch, qtype, granularity, float_type, kw):
    """With fp16-exact scales the imported model has the original's codes, scales and floats, and its logits
    are bit-identical (torch.equal); the tokenizer encodes alike; re-exporting gives the same file bytes."""
    model = frozen(arch, granularity, **kw)
    tok = train_tokenizer(SAMPLE)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    tritium.export(model, a, qtype=qtype, tokenizer=tok, float_type=float_type)
    back, tok2 = import_gguf(a)
    assert not back.training
    assert type(back).__name__ == {"mistral": "LlamaForCausalLM"}.get(arch, type(model).__name__)
    want, got = ternary_layers(model), ternary_layers(back)
    assert want.keys() == got.keys()
    for name, (q, s, bias) in want.items():
        q2, s2, bias2 = got[name]
        assert torch.equal(q, q2), name
        assert torch.equal(s.float(), s2.float()), name
        assert (bias is None) == (bias2 is None) and (bias is None or torch.equal(bias, bias2)), name
        assert back.get_submodule(name).norm is None
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert back.config.tie_word_embeddings == bool(kw.get("tie_word_embeddings", False))
    text = "First Citizen: speak, speak! <|endoftext|>"
    assert tok2.encode(text).ids == tok.encode(text).ids
    assert tok2.decode(tok.encode(text).ids) == tok.decode(tok.encode(text).ids)
    tritium.export(back, b, qtype=qtype, tokenizer=tok2, float_type=float_type)
    assert a.read_bytes() == b.read_bytes()


def test_unrounded_scales_agree_up_to_fp16(tmp_path):
    """Scales not representable in fp16 come back rounded to fp16 (relative error <= 2^-11); the logits
    stay close."""
    model = tritium.freeze(tiny("llama", PRESET))
    path = tmp_path / "m.gguf"
    tritium.export(model, path)
    back, tok = import_gguf(path)
    assert tok is None
    for name, (_, s, _) in ternary_layers(model).items():
        s2 = ternary_layers(back)[name][1]
        assert torch.equal(s2, s.half().float()) and ((s2 - s).abs() <= s.abs() * 2.0**-11).all()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0.05)


def rewrite(src: Path, dst: Path, change, add: dict | None = None) -> None:
    """Copy a GGUF file with ``change(name, array, type) -> (array, type)`` applied to its tensors (None
    drops the tensor) and ``add`` (name -> (array, type)) appended; the metadata is kept, plus ``add``'s
    ``str`` values as string metadata."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = {"sub_type": field.types[-1]} if vtype == gguf.GGUFValueType.ARRAY else {}
        writer.add_key_value(key, field.contents(), vtype, **sub)
    for key, value in (add or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
    tensors = [(t.name, change(t.name, np.array(t.data), t.tensor_type)) for t in reader.tensors]
    tensors += [(k, v) for k, v in (add or {}).items() if not isinstance(v, str)]
    for name, new in tensors:
        if new is None:
            continue
        data, raw = new
        if raw in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    tritium.export(frozen("llama", num_hidden_layers=1), path, tokenizer=train_tokenizer(SAMPLE))
    return path


def test_rewrite_unchanged_imports(tmp_path, exported):
    out = tmp_path / "same.gguf"
    rewrite(exported, out, lambda name, data, raw: (data, raw))
    import_gguf(out)


def test_varying_block_scales_are_refused(tmp_path, exported):
    def change(name, data, raw):
        if name == "blk.0.ffn_down.weight":  # 512 wide: the second block of row 0 gets another fp16 scale
            data = data.copy()
            d = data[0, 66 + 64:66 + 66].view(np.float16)
            d[0] = np.float16(d[0] * 2)
        return data, raw

    out = tmp_path / "vary.gguf"
    rewrite(exported, out, change)
    with pytest.raises(TritiumFormatError, match="block scales vary within a row; tritium stores one scale per row"):
        import_gguf(out)


def test_other_tensor_types_are_refused(tmp_path, exported):
    def linear_q8(name, data, raw):
        if name == "blk.0.attn_v.weight":
            w = gguf.quants.dequantize(data, raw)
            return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        return data, raw

    out = tmp_path / "q8.gguf"
    rewrite(exported, out, linear_q8)
    with pytest.raises(TritiumFormatError, match="blk.0.attn_v.weight.*Q8_0; tritium imports linear layers in TQ2_0"):
        import_gguf(out)


def test_missing_tensor_and_bad_shape_are_refused(tmp_path, exported):
    out = tmp_path / "missing.gguf"
    rewrite(exported, out, lambda name, data, raw: None if name == "blk.0.ffn_norm.weight" else (data, raw))
    with pytest.raises(TritiumFormatError, match="'blk.0.ffn_norm.weight' is missing"):
        import_gguf(out)
    out = tmp_path / "shape.gguf"
    rewrite(exported, out, lambda name, data, raw: (data[:-1] if name == "output_norm.weight" else data, raw))
    with pytest.raises(TritiumFormatError, match="'output_norm.weight' has shape \\[255\\], the model needs \\[256\\]"):
        import_gguf(out)


def test_unknown_architecture_and_non_files_are_refused(tmp_path, exported):
    data = bytearray(exported.read_bytes())
    i = data.find(b"llama")
    data[i:i + 5] = b"gemma"
    bad = tmp_path / "gemma.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(TritiumFormatError, match="architecture 'gemma' is not supported"):
        import_gguf(bad)
    with pytest.raises(TritiumFormatError, match="not a regular file"):
        import_gguf(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, clearly")
    with pytest.raises(TritiumFormatError, match="no GGUF magic"):
        import_gguf(tmp_path / "x.gguf")


def test_truncated_file_is_refused(tmp_path, exported):
    data = exported.read_bytes()
    for n in (0, 10, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"t{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(TritiumFormatError):
            import_gguf(p)


def test_fuzzed_bytes_raise_only_format_errors(tmp_path, exported):
    """Truncations and byte mutations of an exported file either import or raise TritiumFormatError."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    data = exported.read_bytes()
    header_end = data.find(b"token_embd.weight") + 200  # mutations favour the metadata and tensor infos

    @hypothesis.settings(max_examples=100, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cut=st.integers(0, len(data)), edits=st.lists(
        st.tuples(st.integers(0, header_end), st.integers(0, 255)), max_size=4), truncate=st.booleans())
    def check(cut, edits, truncate):
        b = bytearray(data[:cut] if truncate else data)
        for pos, value in edits:
            if pos < len(b):
                b[pos] = value
        p = tmp_path / "fuzz.gguf"
        p.write_bytes(bytes(b))
        try:
            import_gguf(p)
        except TritiumFormatError as e:
            assert "\n" not in str(e)

    check()


def test_info_describes_gguf(tmp_path, exported, capsys):
    d = describe_gguf(exported)
    assert d["architecture"] == "llama" and d["tokenizer"] == "gpt2"
    assert d["by_type"]["TQ2_0"]["tensors"] == 7
    assert d["tq_bits_per_weight"] == pytest.approx(66 * 8 / 256)
    assert main(["info", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "GGUF" in out and "TQ2_0" in out and "2.062 bits/weight" in out
    bad = tmp_path / "t.gguf"
    bad.write_bytes(exported.read_bytes()[:3000])
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.gguf" in err


def test_ternary_head_imports_as_ternary(tmp_path):
    """A head quantized with the blocks (exported in the TQ type) comes back as a TernaryLinear."""
    model = tiny("llama", None)
    tritium.quantize(model, PRESET, exclude=[])
    tritium.freeze(model)
    for m in model.modules():
        if isinstance(m, tritium.TernaryLinear):
            m.weight_scale = m.weight_scale.half().float()
    path = tmp_path / "head.gguf"
    tritium.export(model, path, qtype="tq1_0")
    back, _ = import_gguf(path)
    assert isinstance(back.lm_head, tritium.TernaryLinear)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_load_pretrained_and_generate_read_gguf(exported, capsys):
    model, tok = tritium.load_pretrained(exported)
    ref, _ = import_gguf(exported)
    ids = torch.tensor([tok.encode(SAMPLE[:40]).ids])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert main(["generate", str(exported), "--prompt", SAMPLE[:20], "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    g = tritium.generate(model, SAMPLE[:20], tok, max_new_tokens=4)
    assert out.out.strip() == g.text.strip() and "decode" in out.err


# ------------------------------------------------------------------------------ llama.cpp's bitnet graph


@pytest.fixture(scope="module")
def bitnet(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random BitNet (SiLU, tied head; weights large enough that every block matters) frozen with
    fp16-exact scales and exported to GGUF: (path, model)."""
    path = tmp_path_factory.mktemp("bitnet") / "m.gguf"
    model = frozen("bitnet", "channel", initializer_range=0.1, **BITNET)
    tritium.export(model, path)
    return path, model


F32 = gguf.GGMLQuantizationType.F32


def test_bitnet_scale_tensors_are_what_llamacpp_multiplies(tmp_path, bitnet):
    """Optional ``.scale`` tensors (one number that llama.cpp's bitnet graph multiplies a layer's output by)
    fold into the imported layer's scale, a negative one into its codes; llama.cpp runs the file with them as
    the imported model computes (cosine min above 0.997 on this chaotic random model, as without them)."""
    path, model = bitnet
    out = tmp_path / "scaled.gguf"
    rewrite(path, out, lambda name, data, raw: (data, raw),
            add={"blk.0.attn_q.scale": (np.array([-2.0], np.float32), F32),
                 "blk.1.ffn_down.scale": (np.array([0.5], np.float32), F32)})
    back, _ = import_gguf(out)
    want, got = ternary_layers(model), ternary_layers(back)
    for name, factor in (("model.layers.0.self_attn.q_proj", -2.0), ("model.layers.1.mlp.down_proj", 0.5)):
        q, s, _ = want[name]
        q2, s2, _ = got[name]
        assert torch.equal(q2, q * int(np.sign(factor))) and torch.equal(s2, s * abs(factor)), name
    assert all(torch.equal(want[n][0], got[n][0]) for n in want if n.endswith(("k_proj", "up_proj")))
    ids = torch.randint(1, 512, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    r = agreement(out, back, ids, n_new=4)
    assert r["cos_min"] > 0.997 and r["cos_mean"] > 0.999


BITNET_REFUSALS = {
    "activation": ({"bitnet.hidden_activation": "relu2"}, None,
                   "bitnet.hidden_activation 'relu2' is not supported"),
    "output head": ({"output.weight": (np.zeros((512, 256), np.float32), F32)}, None,
                    "'output.weight' has no place in the bitnet model"),
    "scale type": ({"blk.0.attn_k.scale": (np.ones(2, np.float32), F32)}, None,
                   "'blk.0.attn_k.scale' is F32 \\[2\\]; a layer's scale is one F32 number"),
    "scale value": ({"blk.0.attn_k.scale": (np.zeros(1, np.float32), F32)}, None, "not a finite non-zero number"),
    "sub-norm": ({}, "blk.1.ffn_sub_norm.weight", "'blk.1.ffn_sub_norm.weight' is missing"),
}


@pytest.mark.parametrize("case", list(BITNET_REFUSALS))
def test_bitnet_files_tritium_cannot_compute_alike_are_refused(tmp_path, bitnet, case):
    add, drop, match = BITNET_REFUSALS[case]
    out = tmp_path / "bad.gguf"
    rewrite(bitnet[0], out, lambda name, data, raw: None if name == drop else (data, raw), add=add)
    with pytest.raises(TritiumFormatError, match=match) as info:
        import_gguf(out)
    assert "\n" not in str(info.value)


def test_bitnet_rewritten_unchanged_imports(tmp_path, bitnet):
    """The file the refusals start from, rewritten as they are, imports (with a silu activation key too)."""
    out = tmp_path / "same.gguf"
    rewrite(bitnet[0], out, lambda name, data, raw: (data, raw), add={"bitnet.hidden_activation": "silu"})
    assert type(import_gguf(out)[0]).__name__ == "BitNetForCausalLM"
