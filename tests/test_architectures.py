"""Real architectures end to end: quantize, QAT, freeze, save, load into a meta skeleton, compare.

Tiny transformers models built from configs (nothing is downloaded) and PyTorch Geometric convolutions.
For each: a few AdamW steps of QAT, the eval-mode logits (and greedy generation where it applies), then
`freeze`, `save` and `load` into a skeleton built on the meta device. On every kernel backend the loaded
model must give bit-identical logits and the same generated tokens; `torch.compile` of the loaded model
(default kernel backend, aot_eager) must give the same logits too, and inductor the same to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tritium
from tritium import TernaryLinear, kernels

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN, LAYERS, HEADS = 64, 32, 64, 2, 2


@dataclasses.dataclass
class Case:
    build: Callable[[], nn.Module]  # a fresh model (on the current default device)
    inputs: Callable[[], dict]  # forward kwargs
    kind: str  # "decoder", "seq2seq", "encoder" or "graph"
    spec: str = "1.58-absmedian"
    generate: Callable[[], dict] | None = None  # generate kwargs


def _ids(n: int = 2, t: int = 8, lo: int = 3) -> torch.Tensor:
    return torch.randint(lo, VOCAB, (n, t))


def _hf(config_cls: str, model_cls: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))

    return build


_DEC = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def _decoder(config_cls: str, model_cls: str, spec: str = "1.58-absmedian", **kw) -> Case:
    return Case(_hf(config_cls, model_cls, **{**_DEC, **kw}), lambda: {"input_ids": _ids()}, "decoder", spec,
                lambda: {"input_ids": _ids(2, 5)})


def _seq2seq_inputs() -> dict:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(2, 6)}


def _whisper_inputs() -> dict:
    return {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": _ids(2, 6)}


def _pyg(conv: str, **kw) -> Case:
    def build() -> nn.Module:
        import torch_geometric.nn as pyg_nn

        return getattr(pyg_nn, conv)(8, 4, **kw)

    def inputs() -> dict:
        edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 4, 5, 5, 0], [1, 0, 2, 1, 4, 3, 5, 4, 0, 5]])
        return {"x": torch.randn(6, 8), "edge_index": edge_index}

    return Case(build, inputs, "graph", "1.58-absmean")


CASES: dict[str, Case] = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", "1.58-absmean-channel", num_key_value_heads=1),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=1),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", "1.58-absmean", num_key_value_heads=1, head_dim=16),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2),
    "gpt_neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", "1.58-absmedian-channel"),
    "gpt2": Case(_hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                     n_head=HEADS, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                 lambda: {"input_ids": _ids()}, "decoder", "1.58-absmean", lambda: {"input_ids": _ids(2, 5)}),
    "bitnet": _decoder("BitNetConfig", "BitNetForCausalLM", num_key_value_heads=1),
    "bert": Case(_hf("BertConfig", "BertForMaskedLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                     max_position_embeddings=64), lambda: {"input_ids": _ids()}, "encoder"),
    "roberta": Case(_hf("RobertaConfig", "RobertaForMaskedLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                        max_position_embeddings=64), lambda: {"input_ids": _ids()}, "encoder",
                    "1.58-absmean-channel"),
    "t5": Case(_hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=HIDDEN, d_kv=16,
                   d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=2),
               _seq2seq_inputs, "seq2seq", generate=lambda: {"input_ids": _ids()}),
    "bart": Case(_hf("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=HIDDEN,
                     encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                     decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None),
                 _seq2seq_inputs, "seq2seq", "1.58-absmean", lambda: {"input_ids": _ids()}),
    "whisper": Case(_hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, num_mel_bins=8,
                        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                        decoder_ffn_dim=FFN, max_source_positions=16, max_target_positions=32,
                        pad_token_id=VOCAB - 1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        suppress_tokens=[], begin_suppress_tokens=[]),
                    _whisper_inputs, "seq2seq", "1.58-absmedian-channel",
                    lambda: {"input_features": torch.randn(2, 8, 32)}),
    "vit": Case(_hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=4, num_channels=3,
                    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=FFN, num_labels=3),
                lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, "encoder"),
    "gcn": _pyg("GCNConv"),
    "sgc": _pyg("SGConv", K=2),
    "gat": _pyg("GATConv", heads=2),
    "sage": _pyg("SAGEConv"),
}

BACKENDS = kernels.available_backends()


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _generate(model: nn.Module, kwargs: dict) -> torch.Tensor:
    return model.generate(**kwargs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=1)


@dataclasses.dataclass
class Trained:
    path: str
    frozen: nn.Module
    inputs: dict
    logits: torch.Tensor
    gen_inputs: dict | None
    tokens: torch.Tensor | None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(name)``: the QAT-trained, frozen and saved model of a case (built once per module)."""
    cache: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in cache:
            case = CASES[name]
            if case.kind == "graph":
                pytest.importorskip("torch_geometric")
            torch.manual_seed(0)
            model = tritium.quantize(case.build(), case.spec)
            assert any(isinstance(m, tritium.BitLinear) for m in model.modules())
            inputs = case.inputs()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(3):
                loss = -_logits(model, inputs).float().log_softmax(-1)[..., 0].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                logits = _logits(model, inputs)
            gen_inputs = case.generate() if case.generate else None
            tokens = _generate(model, gen_inputs) if gen_inputs else None
            tritium.freeze(model)
            assert not any(isinstance(m, tritium.BitLinear) for m in model.modules())
            path = str(tmp_path_factory.mktemp(name) / "model.safetensors")
            tritium.save(model, path)
            cache[name] = Trained(path, model, inputs, logits, gen_inputs, tokens)
        return cache[name]

    return get


@pytest.fixture
def backend(request):
    before = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(before)


def _skeleton(name: str) -> nn.Module:
    torch.manual_seed(1)  # a different initialisation: everything must come from the file
    with torch.device("meta"):
        return CASES[name].build()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", list(CASES))
def test_frozen_loaded_model_equals_trained(name, backend, trained):
    t = trained(name)
    with torch.no_grad():
        assert torch.equal(_logits(t.frozen, t.inputs), t.logits)
    model = tritium.load(t.path, model=_skeleton(name)).eval()
    n_frozen = sum(isinstance(m, TernaryLinear) for m in model.modules())
    assert n_frozen == sum(isinstance(m, TernaryLinear) for m in t.frozen.modules()) > 0
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    with torch.inference_mode():
        got = _logits(model, t.inputs)
    assert got.dtype == t.logits.dtype and torch.equal(got, t.logits), (got - t.logits).abs().max()
    if t.gen_inputs is not None:
        assert torch.equal(_generate(model, t.gen_inputs), t.tokens)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_frozen_model_equals_trained(name, trained):
    """aot_eager runs the same kernels and float ops as eager, so the logits are bit-identical; the
    transformers models compile without graph breaks (PyG's conv layers break on data-dependent shapes)."""
    t = trained(name)
    torch._dynamo.reset()
    model = tritium.load(t.path, model=_skeleton(name)).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=CASES[name].kind != "graph")
    with torch.no_grad():
        got = _logits(compiled, t.inputs)
    assert torch.equal(got, t.logits), (got - t.logits).abs().max()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler")
def test_inductor_frozen_decoder(trained):
    """Inductor fuses the float ops around the ternary layers (norms, rotary embeddings, softmax) in its own
    order, so the logits agree to float32 rounding rather than bit for bit; the greedy tokens are equal."""
    t = trained("llama")
    torch._dynamo.reset()
    model = tritium.load(t.path, model=_skeleton("llama")).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = _logits(compiled, t.inputs)
    torch.testing.assert_close(got, t.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), t.logits.argmax(-1))


def test_gpt2_partly_frozen_round_trip(tmp_path):
    """Layers left as BitConv1D by ``freeze(strict=False)`` are saved in GPT-2's Conv1D layout and load back
    as BitConv1D into a plain meta skeleton."""
    from tritium.nn import BitConv1D

    case = CASES["gpt2"]
    torch.manual_seed(0)
    model = case.build()
    tritium.quantize(model, "1.58-absmean", include=r"\.attn\.")
    tritium.quantize(model, "2-absmax", include=r"\.mlp\.")
    model.eval()
    inputs = case.inputs()
    with torch.no_grad():
        want = _logits(model, inputs)
    with pytest.warns(UserWarning, match="kept as BitLinear"):
        tritium.freeze(model, strict=False)
    tritium.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = case.build()
    loaded = tritium.load(tmp_path / "m.safetensors", model=skeleton).eval()
    mlp = loaded.transformer.h[0].mlp
    assert isinstance(mlp.c_fc, BitConv1D) and mlp.c_fc.weight.shape == (HIDDEN, 4 * HIDDEN)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, TernaryLinear)
    with torch.no_grad():
        assert torch.equal(_logits(loaded, inputs), want)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "whisper"])
def test_frozen_model_cast_to_bf16(name, trained):
    """A loaded frozen model cast with ``.to(torch.bfloat16)`` runs in bf16 (the frozen layers compute in
    float32 inside and round) and stays close to the float32 logits."""
    t = trained(name)
    model = tritium.load(t.path, model=_skeleton(name)).eval().to(torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, TernaryLinear))
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.inputs.items()}
    with torch.no_grad():
        got = _logits(model, inputs)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err = (got.float() - t.logits).abs().mean() / t.logits.abs().mean()
    assert err < 0.03, err
