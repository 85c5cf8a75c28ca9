"""Hugging Face BitNet checkpoints (`tritium.formats.hf_bitnet`): folders written by `export_hf_bitnet` are
loaded by transformers' own BitNet quantizer (``AutoModelForCausalLM.from_pretrained``) and computed by its
``BitLinear``, compared with tritium's frozen model; folders saved by transformers import into tritium and
compute what transformers computes; both round trips; and the refusals."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations.bitnet import BitLinear as HFBitLinear  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402

import tritium  # noqa: E402
from helpers import random_decoder, shakespeare_text, train_bpe  # noqa: E402
from tritium import kernels, quant  # noqa: E402
from tritium.convert import bit_layers  # noqa: E402
from tritium.formats import TritiumFormatError, codecs  # noqa: E402
from tritium.formats.hf_bitnet import (  # noqa: E402
    PRESET,
    HFExportError,
    export_hf_bitnet,
    hf_weight_scale,
    import_hf_bitnet,
    tritium_scale,
)

VOCAB = 256
SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20
#: How transformers' logits may differ from tritium's, relative to the largest |logit|. Both compute the same
#: integers and rescale them differently (transformers divides by ``weight_scale * 127 * fl(1 / a)``, tritium
#: multiplies by ``fl(a / 127) * s``): a few float32 roundings per layer, about 1e-7 of the logits. Where such a
#: rounding difference meets an activation within about 1e-5 of a rounding tie (``x * 127 / a`` near k + 1/2),
#: that activation's integer differs by one step, and every later position that attends to it moves by up to
#: about 1e-2 (measured on these random models with two inputs: at most 8.7e-3, on up to 16% of the positions; most
#: inputs have no such tie: at most 5e-7 everywhere). Wrong files are far outside: measured on `tiny`, weight scales
#: written as ``s`` instead of ``1 / s`` move the logits by 138% of the largest |logit|, gate and up projections
#: swapped by 109%, two norms of a block swapped by 43%.
EXACT = 1e-5
WORST = 2e-2


def assert_agrees(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """Assert that every position is within `WORST` and at least half of them within `EXACT` (float
    rounding) of the largest |logit|; return (largest difference, largest difference of the positions within
    `EXACT`, share of positions beyond `EXACT`), relative to the largest |logit|."""
    per = ((got - want).abs().amax(-1) / want.abs().max()).flatten()
    worst, share = per.max().item(), per.gt(EXACT).float().mean().item()
    assert worst < WORST and share <= 0.5, (worst, share)
    return worst, per[per <= EXACT].max().item(), share


@pytest.fixture(autouse=True)
def quiet_transformers():
    """transformers' load reports and CPU warnings off for the test, restored after."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.utils.logging.enable_progress_bar()


def tiny(arch: str = "bitnet", config: tritium.BitConfig | None = PRESET, seed: int = 0, exclude=None,
         include=None, **kw) -> torch.nn.Module:
    """A random 2-block decoder of ``arch`` (hidden 64, GQA 4/2 heads of 16), quantized with ``config``."""
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
                eos_token_id=0, pad_token_id=None, initializer_range=0.1)
    model = random_decoder(arch, seed, **{**args, **kw})
    if config is None:
        return model
    return tritium.quantize(model, config, exclude=exclude, include=include)


def hf_load(path: Path) -> torch.nn.Module:
    """The folder loaded by transformers' own BitNet quantizer."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def train_tokenizer(text: str, vocab: int = 512) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 style) with one special token, id 0."""
    return train_bpe(text, vocab)


def stored(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def layer_state(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """name -> (int8 codes, float32 scale, bias) of each frozen layer."""
    return {name: (kernels.unpack(m.weight_packed, m.out_features, m.in_features), m.weight_scale, m.bias)
            for name, m in model.named_modules() if isinstance(m, tritium.TernaryLinear)}


IDS = torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ the pieces, against transformers


def test_packing_is_transformers_pack_weights():
    q = torch.randint(-1, 2, (64, 48), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    ours = codecs.pack("hf_bitnet", q)
    assert torch.equal(ours, pack_weights(q.clone()))
    assert torch.equal(codecs.unpack("hf_bitnet", ours, 64, 48), q)


def test_activation_quantizer_is_transformers_up_to_ties():
    """transformers' ``BitLinear.activation_quant`` (its compiled form, as its forward runs it) and
    `tritium.quant.quantize_act` give the same per-token integers except at rounding ties: its scale is
    ``127 * fl(1 / a)``, tritium's ``fl(127 / a)``, which differ in the last bit for about a third of the tokens.
    Measured on these 20,000 tokens of 256 values: 34% of the scales differ by one ulp, 6e-7 of the integers
    by one step, none by more."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 256, generator=g) * torch.rand(20000, 1, generator=g) * 10
    q, s = quant.quantize_act(x, 8)
    hq, inv = HFBitLinear(256, 256, False, dtype=torch.float32).activation_quant(x)
    diff = (q - hq.float()).abs()
    assert diff.max() <= 1 and diff.gt(0).float().mean() < 1e-5
    ulps = ((1.0 / s - inv) / torch.finfo(torch.float32).eps / inv).abs()
    assert ulps.max() <= 2


def test_scale_conversion_is_correctly_rounded():
    s = torch.rand(10000, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-4
    for v in s[:200]:
        ws = hf_weight_scale(v)
        assert ws.dtype == torch.float32 and ws.item() == torch.tensor(1.0 / v.double().item()).float().item()
        assert tritium_scale(ws).item() == torch.tensor(1.0 / ws.double().item()).float().item()
    assert hf_weight_scale(s[:1], torch.bfloat16).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ export, loaded by transformers


EXPORTS = {
    "bitnet frozen": (lambda: tritium.freeze(tiny())),
    "bitnet QAT": (lambda: tiny()),
    "bitnet tied, ternary biases": (lambda: tritium.freeze(tiny(attention_bias=True, tie_word_embeddings=True))),
    "bitnet rmsnorm": (lambda: tritium.freeze(tiny(config=PRESET.replace(norm="rmsnorm")))),
    "bitnet ternary head": (lambda: tritium.freeze(tiny(exclude=[]))),
    "llama, biases, tied": (lambda: tritium.freeze(tiny("llama", attention_bias=True, mlp_bias=True,
                                                          tie_word_embeddings=True))),
    "llama, MLP only": (lambda: tritium.freeze(tiny("llama", include=r"\.mlp\."))),
    "mistral absmean": (lambda: tritium.freeze(tiny("mistral", PRESET.replace(measure="absmean")))),
    "qwen2": (lambda: tritium.freeze(tiny("qwen2"))),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_transformers_loads_the_export(tmp_path, case):
    """transformers' quantizer puts its BitLinear exactly where the model has ternary layers, with the
    model's codes and ``weight_scale = 1 / s``, and its logits are tritium's (`assert_agrees`)."""
    model = EXPORTS[case]()
    export_hf_bitnet(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["linear_class"] == "bitlinear"
    assert config["architectures"] == [type(model).__name__]
    hf = hf_load(tmp_path / "out")
    assert type(hf) is type(model)
    frozen = tritium.freeze(model) if case == "bitnet QAT" else model
    ternary = dict(layer_state(frozen))
    hf_layers = {n: m for n, m in hf.named_modules() if isinstance(m, HFBitLinear)}
    assert hf_layers.keys() == ternary.keys()
    for name, (q, s, bias) in ternary.items():
        m = hf_layers[name]
        assert torch.equal(codecs.unpack("hf_bitnet", m.weight, m.out_features, m.in_features), q), name
        assert m.weight_scale.item() == hf_weight_scale(s).item(), name
        assert (m.bias is None) == (bias is None)
        assert (m.rms_norm is not None) == (case == "bitnet rmsnorm")
    assert_agrees(logits(hf, IDS), logits(frozen, IDS))


def test_qat_and_frozen_models_export_the_same_tensors(tmp_path):
    model = tiny("qwen2")
    export_hf_bitnet(model, tmp_path / "qat")
    tritium.freeze(model)
    export_hf_bitnet(model, tmp_path / "frozen")
    a, b = stored(tmp_path / "qat"), stored(tmp_path / "frozen")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ a trained model


@pytest.fixture(scope="module")
def trained():
    """A 2-block BitNetForCausalLM (hidden 128, GQA 4/2, tied embedding as in bitnet-b1.58-2B-4T, byte-level
    BPE of 512 tokens) quantized with PRESET, trained for 300 steps on tiny-shakespeare (one thread: about
    15 s), frozen; with its tokenizer, 128 held-out token ids and the final training loss."""
    text = shakespeare_text()
    tok = train_tokenizer(text[:400_000])
    ids = torch.tensor(tok.encode(text[:1_000_000]).ids)
    split = int(0.9 * len(ids))
    train, held = ids[:split], ids[split:]
    model = tiny(hidden_size=128, intermediate_size=256, vocab_size=512, max_position_embeddings=256,
                 tie_word_embeddings=True, initializer_range=0.02).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    try:
        losses = []
        for _ in range(300):
            starts = torch.randint(0, len(train) - 64, (8,), generator=gen)
            x = torch.stack([train[s: s + 64] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    tritium.freeze(model)
    return model, tok, held[:128].tolist(), sum(losses[-20:]) / 20


def test_transformers_matches_trained_model(tmp_path, trained):
    """The trained model exported with its tokenizer: transformers' tokenizer encodes text as tritium's does,
    its logits on 128 held-out tokens are tritium's (`assert_agrees`), and its greedy continuation of 16 tokens
    by 32 is tritium's. Measured on a 2-core x86 machine (training loss 4.10): 127 of the 128 positions within
    2.8e-7 of the largest |logit|, one (an activation at a rounding tie) at 5.1e-5; top-1 100%; 32 of 32 greedy
    tokens identical."""
    model, tok, ids, loss = trained
    print(f"training loss (last 20 batches) {loss:.3f}")
    assert loss < 4.5  # it learned something (a uniform guess is ln 512 = 6.2)
    export_hf_bitnet(model, tmp_path / "out", tokenizer=tok)
    hf = hf_load(tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.decode(ids)
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    x = torch.tensor([ids])
    want, got = logits(model, x), logits(hf, x)
    worst, rounding, share = assert_agrees(got, want)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    n_new, prompt = 32, x[:, :16]
    with torch.inference_mode():
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                  do_sample=False)
        ours = model.generate(prompt, **kw)[0, 16:].tolist()
        theirs = hf.generate(prompt, **kw)[0, 16:].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), n_new)
    print(f"transformers vs tritium: largest |logit difference| {(got - want).abs().max().item():.3g} "
          f"({worst:.3g} of the largest |logit|), {share:.1%} of the positions beyond {EXACT:g} (the others within "
          f"{rounding:.2g}), top-1 "
          f"{top1:.1%} over {len(ids)} positions, greedy {same}/{n_new} tokens identical")
    assert top1 == 1.0
    assert same == n_new


def test_trained_round_trip_gives_identical_logits(tmp_path, trained):
    """tritium -> HF -> tritium: the same codes, the exact same scales (from the safetensors metadata) and
    bit-identical logits; the tokenizer comes back."""
    model, tok, ids, _ = trained
    export_hf_bitnet(model, tmp_path / "out", tokenizer=tok)
    back, tok2 = import_hf_bitnet(tmp_path / "out")
    assert not back.training and type(back) is type(model)
    x = torch.tensor([ids])
    assert torch.equal(logits(back, x), logits(model, x))
    assert tok2.encode(SAMPLE).ids == tok.encode(SAMPLE).ids
    want, got = layer_state(model), layer_state(back)
    assert want.keys() == got.keys()
    for name, (q, s, _) in want.items():
        assert torch.equal(got[name][0], q) and torch.equal(got[name][1], s), name


# ------------------------------------------------------------------------------ round trips of random models


@pytest.mark.parametrize("case", ["bitnet frozen", "bitnet rmsnorm", "llama, biases, tied", "qwen2"])
def test_tritium_hf_tritium_is_identical(tmp_path, case):
    model = EXPORTS[case]()
    export_hf_bitnet(model, tmp_path / "out")
    back, tok = import_hf_bitnet(tmp_path / "out")
    assert tok is None
    assert torch.equal(logits(back, IDS), logits(model, IDS))


def test_exact_scales_come_from_the_metadata(tmp_path):
    """``fl(1 / fl(1 / s))`` is not always ``s`` (for about 12% of float32 scales): the exact scales in the
    safetensors metadata make the round trip exact, and an entry that does not give the stored
    ``weight_scale`` is ignored."""
    model = tritium.freeze(tiny())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, tritium.TernaryLinear)}
    a, b = list(layers)[:2]
    odd = torch.tensor([float.fromhex("0x1.cf5c56p-5")])  # a scale whose reciprocal does not invert
    assert tritium_scale(hf_weight_scale(odd)).item() != odd.item()
    layers[a].weight_scale = odd.clone()
    layers[b].weight_scale = torch.tensor([float.fromhex("0x1.d562f4p-5")])
    export_hf_bitnet(model, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    scales = json.loads(meta["tritium.weight_scales"])
    assert scales.keys() == layers.keys()
    assert all(float.fromhex(scales[n]) == m.weight_scale.item() for n, m in layers.items())
    back, _ = import_hf_bitnet(tmp_path / "out")
    got = layer_state(back)
    assert all(torch.equal(got[n][1], m.weight_scale) for n, m in layers.items())
    tensors = stored(tmp_path / "out")
    meta["tritium.weight_scales"] = json.dumps({**scales, a: (2 * odd).item().hex()})  # stale
    save_file(tensors, str(tmp_path / "out" / "model.safetensors"), metadata=meta)
    got = layer_state(import_hf_bitnet(tmp_path / "out")[0])
    assert got[a][1].item() == tritium_scale(hf_weight_scale(odd)).item()
    assert all(torch.equal(got[n][1], m.weight_scale) for n, m in layers.items() if n != a)


def test_qat_import_continues_training(tmp_path):
    """mode="qat": BitLinear layers whose latent weights quantize back to the stored codes and scale. With
    absmax the forward is bit-identical to the frozen import, with absmean (the default, BitNet b1.58's) equal
    to float rounding of the scale; a training step changes the weights and the result exports."""
    model = tritium.freeze(tiny("llama"))
    export_hf_bitnet(model, tmp_path / "out")
    frozen, _ = import_hf_bitnet(tmp_path / "out")
    want = logits(frozen, IDS)
    qat, _ = import_hf_bitnet(tmp_path / "out", mode="qat")
    layers = dict(bit_layers(qat))
    assert layers and all(m.config == PRESET.replace(measure="absmean") for m in layers.values())
    assert not any(isinstance(m, tritium.TernaryLinear) for m in qat.modules())
    assert rel_diff(logits(qat, IDS), want) < 1e-5
    exact, _ = import_hf_bitnet(tmp_path / "out", mode="qat", config=PRESET.replace(measure="absmax"))
    assert torch.equal(logits(exact, IDS), want)
    # the absmax import re-exports the stored tensors exactly
    export_hf_bitnet(exact, tmp_path / "again")
    a, b = stored(tmp_path / "out"), stored(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=1.0)
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    loss = qat(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], m.weight) for n, m in layers.items())
    export_hf_bitnet(qat.eval(), tmp_path / "trained")
    assert_agrees(logits(hf_load(tmp_path / "trained"), IDS), logits(qat, IDS))


def test_qat_import_refuses_a_config_that_computes_otherwise(tmp_path):
    export_hf_bitnet(tritium.freeze(tiny()), tmp_path / "out")
    with pytest.raises(ValueError, match="granularity='channel'"):
        import_hf_bitnet(tmp_path / "out", mode="qat", config=PRESET.replace(granularity="channel"))
    with pytest.raises(ValueError, match="norm='layernorm'"):
        import_hf_bitnet(tmp_path / "out", mode="qat", config=tritium.BitConfig())
    with pytest.raises(ValueError, match="mode='train'"):
        import_hf_bitnet(tmp_path / "out", mode="train")


# ------------------------------------------------------------------------------ folders saved by transformers


def transformers_checkpoint(tmp_path: Path, tie: bool = True, dtype: torch.dtype = torch.float32,
                            shard: str | None = None, **kw) -> tuple[Path, torch.nn.Module]:
    """A BitNetForCausalLM quantized as transformers' own ``WeightQuant`` quantizes (``weight_scale =
    1 / mean |W|``, ``q = clamp(round(W * weight_scale), -1, 1)``), packed with its ``pack_weights``, loaded
    by ``from_pretrained`` and saved again by its ``save_pretrained`` (the layout of bitnet-b1.58-2B-4T:
    tied embedding, default ``quantization_config``); returns the saved folder and the loaded model."""
    model = tiny(config=None, tie_word_embeddings=tie, seed=3, **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.detach().float()
            ws = 1.0 / w.abs().mean().clamp(min=1e-5)
            q = (w * ws).round().clamp(-1, 1).to(torch.int8)
            state[f"{name}.weight"] = pack_weights(q.clone())
            state[f"{name}.weight_scale"] = ws.reshape(1).to(dtype)
    if tie:
        state.pop("lm_head.weight")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(architectures=["BitNetForCausalLM"], dtype=str(dtype).removeprefix("torch."),
                  quantization_config={"quant_method": "bitnet"})
    (src / "config.json").write_text(json.dumps(config))
    hf = hf_load(src)
    dst = tmp_path / "saved"
    hf.save_pretrained(dst, **({"max_shard_size": shard} if shard else {}))
    return dst, hf


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_imports(tmp_path, tie):
    """A folder transformers saved imports into frozen TernaryLinear layers whose logits are transformers'
    own (`assert_agrees`)."""
    path, hf = transformers_checkpoint(tmp_path, tie=tie)
    model, _ = import_hf_bitnet(path)
    n_ternary = sum(isinstance(m, tritium.TernaryLinear) for m in model.modules())
    assert n_ternary == 2 * 7
    assert_agrees(logits(model, IDS), logits(hf, IDS))


def test_hf_tritium_hf_is_identical(tmp_path):
    """HF -> tritium -> HF: every tensor comes back with the same dtype and value (byte-identical), also a
    ``weight_scale`` whose reciprocal does not invert in float32 (the import keeps it as ``hf_weight_scale``)."""
    path, _ = transformers_checkpoint(tmp_path)
    odd = torch.tensor([float.fromhex("0x1.da341ap+4")])
    assert hf_weight_scale(tritium_scale(odd)).item() != odd.item()
    _edit_tensors(path, _set(f"{Q}.weight_scale", odd))
    model, _ = import_hf_bitnet(path)
    assert model.get_submodule(Q).hf_weight_scale.item() == odd.item()
    export_hf_bitnet(model, tmp_path / "again")
    a, b = stored(path), stored(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    quant_a = json.loads((path / "config.json").read_text())["quantization_config"]
    quant_b = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert {k: quant_a.get(k) for k in ("quant_method", "linear_class", "quantization_mode")} == \
        {k: quant_b.get(k) for k in ("quant_method", "linear_class", "quantization_mode")}


def test_bf16_checkpoint_round_trip_is_value_identical(tmp_path):
    """A bfloat16 checkpoint (as bitnet-b1.58-2B-4T) imports exactly into float32 and exports the same values
    (in float32)."""
    path, _ = transformers_checkpoint(tmp_path, dtype=torch.bfloat16)
    model, _ = import_hf_bitnet(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    export_hf_bitnet(model, tmp_path / "again")
    a, b = stored(path), stored(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float() if a[k].is_floating_point() else a[k], b[k]), k
    model.to(torch.bfloat16)
    export_hf_bitnet(model, tmp_path / "bf16")
    c = stored(tmp_path / "bf16")
    assert all(a[k].dtype == c[k].dtype and torch.equal(a[k], c[k]) for k in a)


def test_sharded_checkpoint_imports(tmp_path):
    path, hf = transformers_checkpoint(tmp_path, shard="40KB")
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    model, _ = import_hf_bitnet(path)
    assert_agrees(logits(model, IDS), logits(hf, IDS))


# ------------------------------------------------------------------------------ tokenizers


def test_tokenizer_files(tmp_path):
    tok = train_tokenizer(SAMPLE, vocab=300)
    model = tritium.freeze(tiny())
    export_hf_bitnet(model, tmp_path / "raw", tokenizer=tok)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    export_hf_bitnet(model, tmp_path / "fast", tokenizer=fast)
    for name in ("raw", "fast"):
        loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded(SAMPLE)["input_ids"] == tok.encode(SAMPLE).ids
        assert loaded.eos_token == "<|endoftext|>"
        _, back = import_hf_bitnet(tmp_path / name)
        assert back.encode(SAMPLE).ids == tok.encode(SAMPLE).ids


# ------------------------------------------------------------------------------ export refusals


def _gpt2():
    return tritium.quantize(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4)),
                            PRESET)


def _mixed_norms():
    model = tiny(config=None)
    tritium.quantize(model, PRESET, include=r"\.mlp\.")
    return tritium.quantize(model, PRESET.replace(norm="rmsnorm"), include=r"self_attn")


EXPORT_REFUSALS = {
    "float model": (lambda: tiny(config=None), "has no ternary layer"),
    "layernorm": (lambda: tiny(config=tritium.BitConfig()), "norm='layernorm'"),
    "layernorm, frozen": (lambda: tritium.freeze(tiny(config=tritium.BitConfig())), "frozen with norm='layernorm'"),
    "per-channel": (lambda: tiny(config=PRESET.replace(granularity="channel")), "one weight_scale per tensor"),
    "per-channel, frozen": (lambda: tritium.freeze(tiny(config=PRESET.replace(granularity="channel"))),
                            "frozen with granularity='channel'"),
    "group scales": (lambda: tiny(config=PRESET.replace(granularity=("group", 32))), r"granularity=\('group', 32\)"),
    "4-bit": (lambda: tiny(config=PRESET.replace(weight_bits=4)), "weight_bits=4"),
    "4-bit activations": (lambda: tiny(config=PRESET.replace(act_bits=4)), "act_bits=4"),
    "warm-up": (lambda: tiny(config=PRESET.replace(lambda_=0.5)), "lambda_=0.5"),
    "gpt2": (_gpt2, "GPT2LMHeadModel"),
    "rows": (lambda: tiny(intermediate_size=130), "out_features=130 is not a multiple of 4"),
    "mixed norms": (_mixed_norms, "use_rms_norm applies to every BitLinear"),
    "not a model": (lambda: "model", "a str"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_what_transformers_computes_differently(tmp_path, case):
    build, match = EXPORT_REFUSALS[case]
    with pytest.raises(HFExportError, match=match) as info:
        export_hf_bitnet(build(), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_export_refuses_a_foreign_tokenizer_and_leaves_the_old_export(tmp_path):
    model = tritium.freeze(tiny())
    export_hf_bitnet(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(HFExportError, match="neither a tokenizers.Tokenizer"):
        export_hf_bitnet(tritium.freeze(tiny(seed=1)), tmp_path / "out", tokenizer=object())
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_replaces_an_export_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    export_hf_bitnet(tritium.freeze(tiny()), out, tokenizer=train_tokenizer(SAMPLE, vocab=300))
    export_hf_bitnet(tritium.freeze(tiny(seed=1)), out)  # a new export replaces the old one, tokenizer included
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HFExportError, match="holds 'notes.txt'"):
        export_hf_bitnet(tritium.freeze(tiny()), out)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(HFExportError, match="not a folder"):
        export_hf_bitnet(tritium.freeze(tiny()), tmp_path / "file")


# ------------------------------------------------------------------------------ import refusals


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A folder exported from a frozen tiny BitNet model, with a tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "good"
    export_hf_bitnet(tritium.freeze(tiny(attention_bias=True)), path, tokenizer=train_tokenizer(SAMPLE, vocab=300))
    return path


def _copy(exported: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(exported, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    """Rewrite the folder's model.safetensors with ``edit`` applied to its tensors (metadata kept)."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = stored(path)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


IMPORT_REFUSALS = {
    "no config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "config not JSON": (lambda p: (p / "config.json").write_text("{"), "config.json is not valid JSON"),
    "not bitnet": (lambda p: _edit_config(p, lambda c: c.pop("quantization_config")), "not a BitNet checkpoint"),
    "autobitlinear": (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(
        linear_class="autobitlinear")), "linear_class 'autobitlinear' is not supported"),
    "model type": (lambda p: _edit_config(p, lambda c: c.update(model_type="gpt2", architectures=None)),
                   "model_type 'gpt2' is not supported"),
    "huge width": (lambda p: _edit_config(p, lambda c: c.update(hidden_size=2**40)), "hidden_size"),
    "regex": (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(
        modules_to_not_convert=["(a+)+$"])), "not a plain module name"),
    "learned rms norm": (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(use_rms_norm=True)),
                         "rms_norm.weight' is missing"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has no model.safetensors"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-7]),
                  "truncated"),
    "garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64), "header length"),
    "float weight": (lambda p: _edit_tensors(p, _set(f"{Q}.weight", torch.zeros(64, 64))),
                     f"'{Q}.weight' is F32; expected U8"),
    "packed shape": (lambda p: _edit_tensors(p, _set(f"{Q}.weight", torch.zeros(64, 64, dtype=torch.uint8))),
                     "has shape \\[64, 64\\], the model needs \\[16, 64\\]"),
    "invalid code": (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.weight"].__setitem__((0, 0), 255)),
                     "invalid code 3"),
    "zero scale": (lambda p: _edit_tensors(p, _set(f"{Q}.weight_scale", torch.zeros(1))),
                   "not a positive finite number"),
    "NaN scale": (lambda p: _edit_tensors(p, _set(f"{Q}.weight_scale", torch.full((1,), float("nan")))),
                  "not a positive finite number"),
    "int scale": (lambda p: _edit_tensors(p, _set(f"{Q}.weight_scale", torch.ones(1, dtype=torch.int32))),
                  "is I32"),
    "scale per row": (lambda p: _edit_tensors(p, _set(f"{Q}.weight_scale", torch.ones(64))),
                      "has shape \\[64\\], the model needs \\[1\\]"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.bias")), f"'{Q}.bias' is missing"),
    "extra tensor": (lambda p: _edit_tensors(p, _set("model.extra", torch.zeros(1))), "'model.extra' has no place"),
    "bad tokenizer": (lambda p: (p / "tokenizer.json").write_text('{"model": 1}'), "not a valid tokenizer"),
    "shard outside": (lambda p: ((p / "model.safetensors").rename(p / "x.safetensors"),
                                 (p / "model.safetensors.index.json").write_text(
                                     json.dumps({"weight_map": {"model.norm.weight": "../x.safetensors"}}))),
                      "a shard must be a \\*.safetensors file in the same folder"),
}


def test_import_refuses_a_learned_input_norm(tmp_path):
    """An rmsnorm export imports; rms_norm weights other than 1, or another eps, do not map."""
    export_hf_bitnet(tritium.freeze(tiny(config=PRESET.replace(norm="rmsnorm"))), tmp_path / "out")
    model, _ = import_hf_bitnet(tmp_path / "out")
    assert {m.norm for m in model.modules() if isinstance(m, tritium.TernaryLinear)} == {"rmsnorm"}
    _edit_config(tmp_path / "out", lambda c: c["quantization_config"].update(rms_norm_eps=1e-5))
    with pytest.raises(TritiumFormatError, match="rms_norm_eps=1e-05 does not map"):
        import_hf_bitnet(tmp_path / "out")
    _edit_config(tmp_path / "out", lambda c: c["quantization_config"].update(rms_norm_eps=1e-6))
    _edit_tensors(tmp_path / "out", _set(f"{Q}.rms_norm.weight", torch.full((64,), 2.0)))
    with pytest.raises(TritiumFormatError, match="rms_norm.weight is not all ones"):
        import_hf_bitnet(tmp_path / "out")


@pytest.mark.parametrize("case", list(IMPORT_REFUSALS))
def test_import_refuses_malformed_folders(tmp_path, exported, case):
    edit, match = IMPORT_REFUSALS[case]
    path = _copy(exported, tmp_path)
    edit(path)
    with pytest.raises(TritiumFormatError, match=match) as info:
        import_hf_bitnet(path)
    assert "\n" not in str(info.value)


def test_fuzzed_files_raise_only_format_errors(tmp_path, exported):
    """Random byte changes in model.safetensors and config.json either import or raise `TritiumFormatError`
    (never another exception, never a hang)."""
    import random

    rng = random.Random(0)
    originals = {name: (exported / name).read_bytes() for name in ("model.safetensors", "config.json")}
    outcomes = {"imported": 0, "refused": 0}
    path = _copy(exported, tmp_path)
    for i in range(60):
        name = "config.json" if i % 4 == 3 else "model.safetensors"
        data = bytearray(originals[name])
        header = int.from_bytes(data[:8], "little") + 8 if name == "model.safetensors" else len(data)
        for _ in range(rng.randint(1, 4)):  # mostly in the header and JSON, where the structure is
            pos = rng.randrange(len(data)) if rng.random() < 0.3 else rng.randrange(min(header, len(data)))
            data[pos] = rng.randrange(256)
        for other, raw in originals.items():
            (path / other).write_bytes(bytes(data) if other == name else raw)
        try:
            import_hf_bitnet(path)
            outcomes["imported"] += 1
        except TritiumFormatError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 10


def test_the_good_folder_imports(tmp_path, exported):
    """The folder the refusals start from imports (so each refusal is caused by its edit)."""
    model, tok = import_hf_bitnet(_copy(exported, tmp_path))
    assert tok is not None and sum(isinstance(m, tritium.TernaryLinear) for m in model.modules()) == 14


def test_a_scalar_weight_scale_imports_alike(tmp_path, exported):
    """A ``weight_scale`` stored as a 0-d tensor is the same one number as transformers' ``(1,)`` buffer."""
    want = layer_state(import_hf_bitnet(exported)[0])
    path = _copy(exported, tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"].reshape(())))
    got = layer_state(import_hf_bitnet(path)[0])
    assert all(torch.equal(got[n][1], s) for n, (_, s, _) in want.items())


class _Marker:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_pickle_weights_are_never_unpickled(tmp_path, exported):
    path = _copy(exported, tmp_path)
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(TritiumFormatError, match=r"only pickle weights \(pytorch_model.bin\); tritium never unpickles"):
        import_hf_bitnet(path)
    assert not marker.exists()


def test_import_refuses_a_file_for_a_folder(tmp_path, exported):
    with pytest.raises(TritiumFormatError, match="not a folder"):
        import_hf_bitnet(exported / "config.json")
