"""GGUF export (`tritium.export`, ``tritium export``): the file read back with the gguf package and compared
with tritium's weights, the refusals, and the exported model run by llama.cpp (llama-cpp-python) against
tritium's own logits (skipped when llama_cpp is not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
)

import tritium  # noqa: E402
from helpers import random_decoder, shakespeare_text, train_bpe  # noqa: E402
from tritium import kernels  # noqa: E402
from tritium.cli import main  # noqa: E402
from tritium.formats import ExportError  # noqa: E402
from tritium.formats.gguf import PRESET, GGUFExportError  # noqa: E402

VOCAB = 512
#: What llama.cpp's bitnet graph computes: SiLU (transformers' BitNet default is relu2) and a tied head.
BITNET = {"hidden_act": "silu", "tie_word_embeddings": True}
#: llama.cpp architecture of each transformers architecture.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "bitnet": "bitnet"}
SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


def train_tokenizer(text: str, vocab: int = VOCAB) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style) with one special token, id 0."""
    return train_bpe(text, vocab)


def tiny(arch: str = "llama", config: tritium.BitConfig | None = PRESET, seed: int = 0, **kw) -> torch.nn.Module:
    """A random 2-block decoder of ``arch`` (hidden 256, GQA 4/2 heads of 64), quantized with ``config``."""
    args = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=0,
                eos_token_id=0, pad_token_id=None)
    model = random_decoder(arch, seed, **{**args, **kw})
    return model if config is None else tritium.quantize(model, config)


def fields(reader) -> dict:
    """The scalar and string metadata of a GGUF file (arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def gguf_name(arch: str, name: str) -> str:
    """The GGUF name of a transformers tensor: the gguf package's map, and the two sub-norms of llama.cpp's
    bitnet graph (``blk.N.attn_sub_norm``, ``blk.N.ffn_sub_norm``) that it does not name."""
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch].upper()), 2)
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None and arch == "bitnet":
        block = name.split(".")[2]
        found = {"attn_sub_norm.weight": f"blk.{block}.attn_sub_norm.weight",
                 "ffn_sub_norm.weight": f"blk.{block}.ffn_sub_norm.weight"}[".".join(name.split(".")[-2:])]
    return found


def rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """GGUF row order of a query/key projection for llama.cpp's llama graph, which rotates adjacent pairs
    (2i, 2i+1) of a head where transformers rotates (i, i + head_dim / 2)."""
    half = torch.arange(head_dim // 2)
    within = torch.stack([half, half + head_dim // 2], dim=1).reshape(-1)
    return (torch.arange(n_heads).reshape(-1, 1) * head_dim + within).reshape(-1)


def ternary_layers(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """name -> (int8 codes, float32 row scales, bias) of each ternary layer, frozen or not."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, tritium.BitLinear):
            m = tritium.TernaryLinear.from_bitlinear(m)
        if isinstance(m, tritium.TernaryLinear):
            q = kernels.unpack(m.weight_packed, m.out_features, m.in_features)
            out[name] = (q, m.weight_scale.expand(m.out_features), m.bias)
    return out


# ------------------------------------------------------------------------------ the file, read back


@pytest.mark.parametrize("arch,qtype,granularity,float_type,kw", [
    ("llama", "tq2_0", "tensor", "f32", {}),
    ("llama", "tq1_0", "channel", "f16", {"attention_bias": True, "mlp_bias": True}),
    ("llama", "tq2_0", "tensor", "f32", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("mistral", "tq1_0", "tensor", "f32", {}),
    ("qwen2", "tq2_0", "channel", "f32", {}),
    ("bitnet", "tq1_0", "channel", "f16", BITNET),
])
def test_file_holds_tritium_weights(tmp_path, arch, qtype, granularity, float_type, kw):
    """Every TQ tensor dequantized by gguf is q x fp16(s) of the tritium layer (query/key rows in llama.cpp's
    rotary order for the llama graph, as they are for bitnet), every float tensor is the model's, and the
    metadata describes the model."""
    model = tiny(arch, PRESET.replace(granularity=granularity), **kw)
    tritium.freeze(model)
    path = tmp_path / "m.gguf"
    tritium.export(model, path, qtype=qtype, float_type=float_type)
    reader = gguf.GGUFReader(path)
    meta = fields(reader)
    cfg = model.config
    gguf_arch = GGUF_ARCH[arch]
    assert meta["general.architecture"] == gguf_arch
    assert meta[f"{gguf_arch}.block_count"] == 2
    assert meta[f"{gguf_arch}.embedding_length"] == 256
    assert meta[f"{gguf_arch}.feed_forward_length"] == 512
    assert meta[f"{gguf_arch}.attention.head_count"] == 4
    assert meta[f"{gguf_arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert meta[f"{gguf_arch}.context_length"] == 256
    assert meta[f"{gguf_arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta[f"{gguf_arch}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])  # BitNet: 5e5
    assert meta[f"{gguf_arch}.vocab_size"] == VOCAB
    want_ftype = gguf.LlamaFileType.MOSTLY_TQ2_0 if qtype == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0
    assert meta["general.file_type"] == int(want_ftype)
    assert meta["tokenizer.ggml.model"] == "none"

    tensors = {t.name: t for t in reader.tensors}
    want_type = gguf.GGMLQuantizationType.TQ2_0 if qtype == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    seen = set()
    for name, (q, s, bias) in ternary_layers(model).items():
        w = q.float() * s.half().float().reshape(-1, 1)
        b = bias
        if gguf_arch == "llama" and name.endswith(("q_proj", "k_proj")):
            n_heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            rows = rope_rows(n_heads, 64)
            w = w[rows]
            b = None if b is None else b[rows]
        gname = gguf_name(arch, name + ".weight")
        t = tensors[gname]
        assert t.tensor_type == want_type, gname
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        np.testing.assert_array_equal(got, w.numpy(), err_msg=gname)
        seen.add(gname)
        if b is not None:
            bname = gname.removesuffix(".weight") + ".bias"
            np.testing.assert_array_equal(np.asarray(tensors[bname].data), b.numpy(), err_msg=bname)
            seen.add(bname)
    assert sum(t.tensor_type == want_type for t in tensors.values()) == 2 * 7
    for name, p in model.named_parameters():
        gname = gguf_name(arch, name)
        t = tensors[gname]
        expect = p.detach().float().numpy()
        if p.dim() == 2 and float_type == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, gname
            expect = expect.astype(np.float16)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gname
        np.testing.assert_array_equal(np.asarray(t.data).reshape(expect.shape), expect, err_msg=gname)
        seen.add(gname)
    assert ("output.weight" in tensors) == (not kw.get("tie_word_embeddings", False))
    assert set(tensors) == seen


def test_mistral_context_is_its_window(tmp_path):
    model = tiny("mistral", sliding_window=128)
    tritium.export(model, tmp_path / "m.gguf")
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["llama.context_length"] == 128


def test_qat_and_frozen_models_give_the_same_file(tmp_path):
    model = tiny()
    tritium.export(model, tmp_path / "qat.gguf", qtype="tq1_0")
    tritium.freeze(model)
    tritium.export(model, tmp_path / "frozen.gguf", qtype="tq1_0")
    assert (tmp_path / "qat.gguf").read_bytes() == (tmp_path / "frozen.gguf").read_bytes()


def test_tokenizer_metadata(tmp_path):
    tok = train_tokenizer(SAMPLE, vocab=300)  # smaller than the model's vocabulary: the rest is padding
    tok.add_tokens(["<user>"])
    model = tiny()
    tritium.export(model, tmp_path / "m.gguf", tokenizer=tok)
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        assert tokens[i] == text
    assert types[0] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert types[tok.token_to_id("<user>")] == gguf.TokenType.USER_DEFINED
    assert types[tok.token_to_id("e")] == gguf.TokenType.NORMAL
    n = tok.get_vocab_size(with_added_tokens=True)
    assert tokens[n] == f"[PAD{n}]" and types[n] == gguf.TokenType.UNUSED
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False


def test_transformers_fast_tokenizer_is_accepted(tmp_path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(SAMPLE, vocab=300))
    tritium.export(tiny(), tmp_path / "m.gguf", tokenizer=fast)
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["tokenizer.ggml.model"] == "gpt2"


# ------------------------------------------------------------------------------ refusals


def _wordlevel():
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _too_big():
    tok = train_tokenizer(SAMPLE, vocab=300)
    tok.add_tokens([f"<t{i}>" for i in range(VOCAB)])
    return tok


def _frozen(config):
    return tritium.freeze(tiny(config=config))


REFUSALS = {
    "float model": (lambda: tiny(config=None), {}, "not a ternary layer"),
    "input norm": (lambda: tiny(config=tritium.BitConfig()), {}, "norm='layernorm'"),
    "rmsnorm, frozen": (lambda: _frozen(PRESET.replace(norm="rmsnorm")), {}, "frozen with norm='rmsnorm'"),
    "group scales": (lambda: tiny(config=PRESET.replace(granularity=("group", 256))), {}, "granularity"),
    "4-bit": (lambda: tiny(config=PRESET.replace(weight_bits=4)), {}, "weight_bits=4"),
    "4-bit activations": (lambda: tiny(config=PRESET.replace(act_bits=4)), {}, "act_bits=4"),
    "warm-up": (lambda: tiny(config=PRESET.replace(lambda_=0.5)), {}, "lambda_=0.5"),
    "gpt2": (lambda: tritium.quantize(GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=1, n_head=4)), PRESET),
             {}, "GPT2LMHeadModel"),
    "width": (lambda: tiny(hidden_size=192, num_attention_heads=3, num_key_value_heads=3), {}, "multiple of 256"),
    "rope scaling": (lambda: tiny(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), {},
                     "rope type 'linear'"),
    "activation": (lambda: tiny(hidden_act="gelu"), {}, "hidden_act='gelu'"),
    "bitnet relu2": (lambda: tiny("bitnet", tie_word_embeddings=True), {},
                     "hidden_act='relu2' \\(llama.cpp's bitnet graph computes silu and does not read"),
    "bitnet untied head": (lambda: tiny("bitnet", hidden_act="silu"), {}, "head is not tied"),
    "bitnet ternary head": (lambda: tritium.quantize(tiny("bitnet", None, **BITNET), PRESET, exclude=[]), {},
                            "head is not tied"),
    "bitnet bias": (lambda: tiny("bitnet", attention_bias=True, **BITNET), {}, "bitnet graph has no biases"),
    "bitnet head_dim": (lambda: tiny("bitnet", head_dim=128, **BITNET), {}, "4 x 128 != 256"),
    "qtype": (tiny, {"qtype": "q4_0"}, "qtype='q4_0'"),
    "float type": (tiny, {"float_type": "bf16"}, "float_type='bf16'"),
    "format": (tiny, {"format": "onnx"}, "format='onnx'"),
    "tokenizer": (tiny, {"tokenizer": _wordlevel}, "not byte-level BPE"),
    "tokenizer too big": (tiny, {"tokenizer": _too_big}, "does not fit"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_export_refuses_what_llamacpp_computes_differently(tmp_path, case):
    build, kwargs, match = REFUSALS[case]
    model = build()
    kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
    path = tmp_path / "m.gguf"
    with pytest.raises(ExportError if case == "format" else GGUFExportError, match=match) as info:
        tritium.export(model, path, **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


# ------------------------------------------------------------------------------ the command


def test_cli_export(tmp_path, capsys):
    tok = train_tokenizer(SAMPLE, vocab=300)
    model = tritium.freeze(tiny())
    tritium.save(model, tmp_path / "m.safetensors", tokenizer=tok)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "m.safetensors"), str(out), "--qtype", "tq1_0", "--float-type", "f16"]) == 0
    assert "with tokenizer" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_TQ1_0)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert {t.name: t for t in reader.tensors}["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_cli_export_refusal_is_one_line(tmp_path, capsys):
    tritium.save(_frozen(tritium.BitConfig()), tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "norm='layernorm'" in err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("case", ["no file", "not tritium", "no model class", "qtype", "float type", "format",
                                  "out is a folder"])
def test_cli_export_bad_input_is_one_line(tmp_path, capsys, case):
    good = tmp_path / "m.safetensors"
    tritium.save(tritium.freeze(tiny()), good)
    plain = tmp_path / "plain.safetensors"
    tritium.save(tritium.freeze(tritium.quantize(torch.nn.Sequential(torch.nn.Linear(256, 256)), PRESET)), plain)
    (tmp_path / "junk").write_text("junk")
    src, out, extra = str(good), str(tmp_path / "m.gguf"), []
    if case == "no file":
        src = str(tmp_path / "missing.safetensors")
    elif case == "not tritium":
        src = str(tmp_path / "junk")
    elif case == "no model class":
        src = str(plain)
    elif case == "out is a folder":
        out = str(tmp_path)
    else:
        extra = {"qtype": ["--qtype", "q8_0"], "float type": ["--float-type", "bf16"],
                 "format": ["--format", "onnx"]}[case]
    assert main(["export", src, out, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "Traceback" not in captured.err
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------------ llama.cpp runs the file


def llama_cpp_or_skip():
    """The llama_cpp module, or a skip saying why it cannot be used."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        pytest.skip(f"llama-cpp-python is not usable ({type(e).__name__}: {e}); pip install 'tritium[llamacpp]' "
                    "(it compiles llama.cpp)")
    return llama_cpp


def agreement(path: Path, model, ids: list[int], n_new: int = 32) -> dict:
    """Cosine similarity and top-1 agreement of llama.cpp's and tritium's logits on ``ids``, and the greedy
    continuation of ``ids[:16]`` by both (llama.cpp's KV cache in F32)."""
    llama_cpp = llama_cpp_or_skip()
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, vocab_only=False, n_ctx=256, n_batch=256,
                          n_threads=2, type_k=0, type_v=0, verbose=False)  # type 0 = F32
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    prompt = ids[:16]
    with torch.inference_mode():
        ours = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 16, dtype=torch.long),
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, 16:].tolist()
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(n_new):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(t)
        llm.eval([t])
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), n_new)
    result = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
              "top1": float((got.argmax(1) == ref.argmax(1)).mean()), "greedy_same": same,
              "greedy_prefix": first, "n_new": n_new, "llm": llm}
    print(f"{path.name}: cosine min {result['cos_min']:.7f} mean {result['cos_mean']:.7f}, top-1 "
          f"{result['top1']:.4f} over {len(ids)} positions, greedy {same}/{n_new} tokens equal "
          f"(first {first} identical)")
    return result


@pytest.mark.parametrize("arch,qtype,granularity,kw", [
    ("llama", "tq2_0", "tensor", {"attention_bias": True, "mlp_bias": True}),
    ("llama", "tq1_0", "tensor", {"head_dim": 128, "tie_word_embeddings": True}),
    ("mistral", "tq2_0", "channel", {}),
    ("qwen2", "tq1_0", "channel", {}),
    ("bitnet", "tq2_0", "channel", BITNET),
])
def test_llamacpp_runs_untrained_export(tmp_path, arch, qtype, granularity, kw):
    """The graph mapping on random ternary weights large enough that every block matters (no data needed):
    llama.cpp's logits are tritium's up to its per-block activation scales and the fp16 weight scales
    (measured: cosine min 0.9989 to 0.9997, mean above 0.9995, on these chaotic random models; with the
    query/key rows left in transformers' order, cosine min 0.74 and 0.19)."""
    model = tritium.freeze(tiny(arch, PRESET.replace(granularity=granularity), initializer_range=0.1, **kw))
    tritium.export(model, tmp_path / "m.gguf", qtype=qtype)
    ids = torch.randint(1, VOCAB, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    r = agreement(tmp_path / "m.gguf", model, ids, n_new=8)
    assert r["cos_min"] > 0.997 and r["cos_mean"] > 0.999


@pytest.fixture(scope="module")
def shakespeare():
    """tiny-shakespeare's byte-level BPE of 512 tokens (trained on its first 400,000 characters) and its token
    ids, split into the first 90% (training) and the rest (held out)."""
    llama_cpp_or_skip()
    text = shakespeare_text()
    tok = train_tokenizer(text[:400_000])
    ids = torch.tensor(tok.encode(text).ids)
    split = int(0.9 * len(ids))
    return tok, ids[:split], ids[split:]


def train_decoder(train: torch.Tensor, arch: str = "llama", **kw) -> tuple[torch.nn.Module, float]:
    """A `tiny` decoder of ``arch`` quantized with PRESET, trained for 300 steps (AdamW, batches of 8 x 64
    tokens of ``train``) and frozen, with the mean loss of its last 20 batches."""
    model = tiny(arch, **kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq, batch, losses = 64, 8, []
    for _ in range(300):
        starts = torch.randint(0, len(train) - seq, (batch,), generator=gen)
        x = torch.stack([train[s: s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    tritium.freeze(model)
    return model, sum(losses[-20:]) / 20


@pytest.fixture(scope="module")
def trained(shakespeare):
    """A 2-block Llama (hidden 256, GQA, byte-level BPE of 512 tokens) quantized with PRESET, trained for 300
    steps on tiny-shakespeare, frozen; with its tokenizer, 128 held-out token ids and the final training loss."""
    tok, train, held = shakespeare
    model, loss = train_decoder(train)
    return model, tok, held[:128].tolist(), loss


@pytest.fixture(scope="module")
def trained_bitnet(shakespeare):
    """The same for a 2-block BitNet (SiLU, tied head) of the same shape."""
    tok, train, held = shakespeare
    model, loss = train_decoder(train, "bitnet", **BITNET)
    return model, tok, held[:128].tolist(), loss


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llamacpp_matches_trained_model(tmp_path, trained, qtype):
    """A trained model exported with its tokenizer: llama.cpp tokenizes text as the tokenizer does, and its
    logits and greedy tokens are tritium's. Measured on a 2-core x86 machine: cosine min 0.99998, mean
    0.999997, top-1 100% over 128 positions, 32 of 32 greedy tokens (59 of 64 before a near-tie); with the
    fp16 weight scales applied in tritium too, 1 - cosine still reaches 1.4e-5, so most of what remains is
    llama.cpp's per-block activation scales. A file with the query/key rows left in transformers' order gives
    cosine min 0.93 and top-1 74%: the thresholds separate a correct graph from a wrong one with a wide
    margin."""
    model, tok, ids, loss = trained
    print(f"training loss (last 20 batches) {loss:.3f}")
    assert loss < 4.5  # it learned something (a uniform guess is ln 512 = 6.2)
    tritium.export(model, tmp_path / "m.gguf", qtype=qtype, tokenizer=tok)
    r = agreement(tmp_path / "m.gguf", model, ids)
    assert r["cos_min"] > 0.999 and r["cos_mean"] > 0.9999
    assert r["top1"] >= 0.97
    assert r["greedy_prefix"] >= 16
    text = tok.decode(ids)
    assert r["llm"].tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llamacpp_matches_trained_bitnet(tmp_path, trained_bitnet, qtype):
    """A trained BitNet exported to llama.cpp's bitnet graph: llama.cpp's logits and greedy tokens are
    tritium's, with the same thresholds as the Llama model's."""
    model, tok, ids, loss = trained_bitnet
    print(f"training loss (last 20 batches) {loss:.3f}")
    assert loss < 4.5
    tritium.export(model, tmp_path / "m.gguf", qtype=qtype, tokenizer=tok)
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.architecture"] == "bitnet"
    r = agreement(tmp_path / "m.gguf", model, ids)
    assert r["cos_min"] > 0.999 and r["cos_mean"] > 0.9999
    assert r["top1"] >= 0.97
    assert r["greedy_prefix"] >= 16
