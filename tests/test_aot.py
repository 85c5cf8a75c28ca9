"""Ahead-of-time compiled decoding (`tritium.aot.AotDecoder`): bit-identical logits to the eager model, for frozen
models with and without input norms, biases and grouped-query attention; `generate(compile="aot")` and the CLI."""

import pytest
import torch

import tritium
from tritium import aot, generation, kernels
from tritium.formats.gguf import PRESET

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not kernels.native(), reason="the C++ op needs a native kernel backend")

MAX_LEN = 32


def _llama(kv_heads: int = 4):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():  # biases on q, k and v
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


CASES = {"llama-input-norm": (_llama, None), "llama-preset": (_llama, PRESET), "qwen2-bias": (_qwen2, None),
         "llama-grouped-query": (lambda: _llama(kv_heads=2), None)}


@pytest.fixture(scope="module", params=list(CASES))
def frozen(request):
    build, config = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    model = tritium.quantize(model) if config is None else tritium.quantize(model, config)
    return tritium.freeze(model)


@pytest.fixture(scope="module")
def decoder(frozen):
    return aot.AotDecoder(frozen, MAX_LEN)


def test_logits_bit_identical_to_the_eager_model(frozen, decoder):
    """Prefill 7 tokens, then decode to the end of the cache, beside the eager model with transformers' cache."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=frozen.config)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    key = generation._cache_key(frozen)
    decoder.reset()
    with torch.inference_mode():
        got = decoder.prefill(prompt)
        want = frozen(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache}).logits
        assert torch.equal(got, want)  # the prefill is the eager forward
        for _ in range(MAX_LEN - 7):
            token = want[:, -1].argmax(-1, keepdim=True)
            got = decoder.step(token)
            want = frozen(input_ids=token, use_cache=True, logits_to_keep=1, **{key: cache}).logits
            assert got.shape == want.shape == (1, 1, 128)
            assert torch.equal(got, want)
        with pytest.raises(ValueError, match="holds 32 positions, 33 needed"):
            decoder.step(token)
    assert decoder.compile_s > 0


@pytest.mark.parametrize("backend", [b for b in kernels.BACKENDS if b != "reference"])
def test_every_native_backend_runs_the_compiled_step_exactly(request, frozen, decoder, backend):
    """The compiled library calls the backend in use when it runs, not the one it was built under: each CPU's
    code path (AVX-512 without AMX on AMD Zen 4, AVX2, generic C) decodes the eager model's logits."""
    if request.node.callspec.params["frozen"] not in ("llama-preset", "qwen2-bias"):
        pytest.skip("two models suffice for the backends")
    if backend not in kernels.available_backends():
        pytest.skip(f"this CPU cannot run the {backend} backend")
    before = kernels.get_backend()
    kernels.set_backend(backend)
    try:
        test_logits_bit_identical_to_the_eager_model(frozen, decoder)
    finally:
        kernels.set_backend(before)


def test_reset_starts_a_new_sequence(decoder):
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    runs = []
    for _ in range(2):
        decoder.reset()
        logits = [decoder.prefill(prompt)]
        for _ in range(4):
            logits.append(decoder.step(logits[-1][:, -1].argmax(-1, keepdim=True)))
        runs.append(torch.cat(logits, dim=1))
    assert torch.equal(runs[0], runs[1])


def test_generate_aot_matches_transformers_generate(frozen):
    """The tokens are transformers' greedy tokens; the decoder is kept and reused."""
    prompt = [5, 6, 7, 8]
    with torch.inference_mode():
        want = frozen.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                               do_sample=False, max_new_tokens=12, min_new_tokens=12)[0, 4:].tolist()
    first = generation.generate(frozen, prompt, max_new_tokens=12, compile="aot")
    decoder = generation._AOT[frozen]
    again = generation.generate(frozen, prompt, max_new_tokens=12, compile="aot")
    assert first.ids == want == again.ids
    assert generation._AOT[frozen] is decoder and decoder.max_len == 64  # 16 positions, rounded up, within 64


def test_bad_arguments():
    torch.manual_seed(0)
    model = tritium.freeze(tritium.quantize(_llama().eval()))
    with pytest.raises(ValueError, match="compile must be"):
        generation.generate(model, [1, 2], max_new_tokens=2, compile="fast")
    with pytest.raises(ValueError, match="max_len must be at least 2"):
        aot.AotDecoder(model, 1)
    decoder = aot.AotDecoder(model, 8)
    with pytest.raises(ValueError, match="needs a prefilled position"):
        decoder.step(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="holds 8 positions, 9 needed"):
        decoder.prefill(torch.ones((1, 9), dtype=torch.long))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="decoder-only"):
        aot.AotDecoder(t5, 8)


def test_cli_compile_aot(tmp_path, capsys):
    from tritium.cli import main

    torch.manual_seed(0)
    model = tritium.freeze(tritium.quantize(_llama().eval(), PRESET))
    path = tmp_path / "m.safetensors"
    tritium.save(model, path)
    assert main(["generate", str(path), "--ids", "1,2,3", "--max-new-tokens", "5", "--compile", "aot"]) == 0
    aot_out = capsys.readouterr()
    assert main(["generate", str(path), "--ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    eager_out = capsys.readouterr()
    assert aot_out.out == eager_out.out and "compile:" in aot_out.err
    assert main(["generate", str(path), "--ids", "1,2,3", "--compile", "later"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--compile" in err
