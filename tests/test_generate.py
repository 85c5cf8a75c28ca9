"""``tritium generate`` and `load_pretrained` / `generate`: tiny Llama and GPT-2 models built from configs,
quantized, trained a few steps, frozen and saved with a tokenizer trained here (no download)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

import tritium
from tritium.cli import main
from tritium.formats.native import TritiumFormatError, load_tokenizer
from tritium.generation import generate, load_pretrained
from tritium.info import describe

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a dog ate the bone", "the bird flew over the tree",
             "the cat ate the fish", "a bird sat on the tree"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def _word_tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, tokenizers.trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return tok


def _byte_tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(SENTENCES, tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                                      initial_alphabet=alphabet))
    return tok


def _model(arch: str, vocab: int):
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(cfg)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=2,
                        eos_token_id=3, pad_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def _train_freeze(model, tok, steps: int = 15):
    """Quantize, a few QAT steps on the sentences, freeze."""
    tritium.quantize(model)
    ids = [tok.encode(s).ids for s in SENTENCES]
    n = max(map(len, ids))
    batch = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch.masked_fill(batch == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tritium.freeze(model.eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{arch: (path with tokenizer, path without)}."""
    root = tmp_path_factory.mktemp("generate")
    out = {}
    for arch, make_tok in (("llama", _word_tokenizer), ("gpt2", _byte_tokenizer)):
        torch.manual_seed(0)
        tok = make_tok()
        model = _train_freeze(_model(arch, tok.get_vocab_size()), tok)
        with_tok, without = root / f"{arch}.safetensors", root / f"{arch}-bare.safetensors"
        tritium.save(model, with_tok, tokenizer=tok)
        tritium.save(model, without)
        out[arch] = (str(with_tok), str(without))
    return out


def _one_line_error(rc: int, captured, *words: str) -> None:
    assert rc == 2, captured
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_cli_equals_api_and_transformers(saved, arch, capsys):
    path = saved[arch][0]
    assert main(["generate", path, "--prompt", "the cat", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "prefill" in err and "decode" in err

    model, tok = load_pretrained(path)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    assert not model.training
    assert any(isinstance(m, tritium.TernaryLinear) for m in model.modules())
    pieces = []
    g = generate(model, "the cat", tok, max_new_tokens=12, on_token=lambda i, p: pieces.append(p))
    assert out == g.text + "\n" and "".join(pieces) == g.text
    assert g.prompt_tokens == len(tok.encode("the cat").ids) and 1 <= len(g.ids) <= 12
    assert g.prefill_tokens_per_s > 0

    prompt = torch.tensor([tok.encode("the cat").ids])
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                         pad_token_id=0)
    assert g.ids == ref[0, prompt.shape[1]:].tolist()
    assert g.text == tok.decode(g.ids, skip_special_tokens=True)


def test_sampling_with_a_seed_is_reproducible(saved, capsys):
    path = saved["llama"][0]
    argv = ["generate", path, "--prompt", "a bird", "--temperature", "1.5", "--top-p", "0.95",
            "--seed", "7", "--max-new-tokens", "16"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    model, tok = load_pretrained(path)
    state = torch.random.get_rng_state()
    g = generate(model, "a bird", tok, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert outs[0] == g.text + "\n"
    others = {tuple(generate(model, "a bird", tok, max_new_tokens=16, temperature=1.5, seed=s).ids)
              for s in range(4)}
    assert len(others) > 1  # sampling samples


def test_no_tokenizer_needs_ids(saved, capsys):
    bare = saved["llama"][1]
    _one_line_error(main(["generate", bare, "--prompt", "the cat"]), capsys.readouterr(), "no tokenizer", "--ids")
    model, tok = load_pretrained(saved["llama"][0])
    ids = tok.encode("the cat").ids
    assert main(["generate", bare, "--ids", ",".join(map(str, ids)), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == ",".join(map(str, generate(model, ids, max_new_tokens=8).ids)) + "\n"
    assert load_pretrained(bare)[1] is None


def test_file_without_config(tmp_path, capsys):
    def make():
        return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))

    model = tritium.freeze(tritium.quantize(make(), exclude=[]).eval())
    path = tmp_path / "plain.safetensors"
    tritium.save(model, path)
    _one_line_error(main(["generate", str(path), "--ids", "1,2"]), capsys.readouterr(),
                    "no transformers model class and config")
    with pytest.raises(TritiumFormatError, match="model=skeleton"):
        load_pretrained(path)
    loaded, tok = load_pretrained(path, model=make().to("meta"))
    assert tok is None and isinstance(loaded[1], tritium.TernaryLinear)
    with pytest.raises(ValueError, match="does not generate"):
        generate(loaded, [1, 2])


@pytest.mark.parametrize("extra,words", [
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--max-new-tokens", "x"], ["--max-new-tokens"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--top-p", "0.9"], ["--top-p", "--temperature"]),
    (["--seed", "-1"], ["--seed"]),
    (["--max-new-tokens", "100"], ["--max-new-tokens", "positions"]),
    (["--ids", "1"], ["--ids", "--prompt"]),
    ([], []),
])
def test_bad_arguments_are_one_line(saved, extra, words, capsys):
    _one_line_error(main(["generate", saved["llama"][0], "--prompt", "the", *extra]), capsys.readouterr(), *words)


@pytest.mark.parametrize("argv,words", [
    (["{path}"], ["--prompt", "--ids"]),
    (["{path}", "--ids", ""], ["--ids"]),
    (["{path}", "--ids", "1,,2"], ["--ids"]),
    (["{path}", "--ids", "1,x"], ["--ids"]),
    (["{path}", "--ids", "99999"], ["--ids", "vocabulary"]),
    (["{path}", "--prompt", ""], ["--prompt"]),
    (["{missing}", "--ids", "1"], ["no such file"]),
    (["{folder}", "--ids", "1"], ["not a regular file"]),
])
def test_bad_inputs_are_one_line(saved, tmp_path, argv, words, capsys):
    values = {"path": saved["gpt2"][1], "missing": str(tmp_path / "nope"), "folder": str(tmp_path)}
    rc = main(["generate", *(a.format(**values) for a in argv)])
    if argv[1:] == ["--prompt", ""]:  # an empty prompt: exit 2 for no tokenizer
        words = ["no tokenizer"]
    _one_line_error(rc, capsys.readouterr(), *words)


def test_empty_prompt_starts_from_bos(saved):
    model, tok = load_pretrained(saved["llama"][0])
    assert generate(model, "", tok, max_new_tokens=3).prompt_tokens == 1  # [BOS]


def _rewrite(src, dst, edit) -> None:
    """Copy a safetensors file with its ``__metadata__`` changed by ``edit(meta)``."""
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    edit(header["__metadata__"])
    new = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("value", ["not json", "[]", '{"model": 3}', '{"version": "1.0"}',
                                   '{"model": {"type": "Nope"}}', '{"model": {"type": "BPE", "vocab": 5}}',
                                   '{"model": {"type": "WordLevel", "vocab": {"a": -1}, "unk_token": 7}}'])
def test_malformed_tokenizer(saved, tmp_path, value, capsys):
    bad = tmp_path / "bad.safetensors"
    _rewrite(saved["llama"][0], bad, lambda meta: meta.__setitem__("tokenizer", value))
    with pytest.raises(TritiumFormatError, match="tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(TritiumFormatError, match="tokenizer"):
        load_pretrained(bad)
    _one_line_error(main(["generate", str(bad), "--prompt", "the"]), capsys.readouterr(), "tokenizer")


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.__setitem__("model_class", "os.system"), "not one tritium rebuilds"),
    (lambda m: m.__setitem__("model_class", "AutoModelForCausalLM"), "not one tritium rebuilds"),
    (lambda m: m.__setitem__("model_class", "GPT2LMHeadModel"), "model_type"),
    (lambda m: m.__setitem__("model_config", json.dumps({**json.loads(m["model_config"]),
                                                         "num_hidden_layers": 10**9})), "num_hidden_layers"),
    (lambda m: m.__setitem__("model_config", json.dumps({**json.loads(m["model_config"]), "hidden_size": 48})),
     "shape"),
    (lambda m: m.__setitem__("model_config", json.dumps({**json.loads(m["model_config"]),
                                                         "hidden_act": "nope"})), "cannot build"),
])
def test_stored_config_is_checked(saved, tmp_path, edit, words):
    bad = tmp_path / "bad.safetensors"
    _rewrite(saved["llama"][0], bad, edit)
    with pytest.raises(TritiumFormatError, match=words):
        load_pretrained(bad)


def test_hub_kernel_attention_is_ignored(saved, tmp_path):
    bad = tmp_path / "attn.safetensors"
    edit = {"attn_implementation": "kernels-community/flash-attn", "_attn_implementation": "x/y",
            "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    _rewrite(saved["llama"][0], bad,
             lambda m: m.__setitem__("model_config", json.dumps({**json.loads(m["model_config"]), **edit})))
    model, _ = load_pretrained(bad)
    assert "kernels-community" not in str(model.config._attn_implementation)


def test_fast_tokenizer_and_info(tmp_path, capsys):
    tok = _word_tokenizer()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    model = tritium.freeze(tritium.quantize(_model("llama", tok.get_vocab_size())).eval())
    path = tmp_path / "fast.safetensors"
    tritium.save(model, path, tokenizer=fast)
    stored = fast.backend_tokenizer.to_str()
    assert load_tokenizer(path).to_str() == stored
    assert describe(path)["tokenizer_bytes"] == len(stored.encode())
    assert main(["info", str(path)]) == 0
    assert "tokenizer stored" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(TypeError, match="tokenizer"):
        tritium.save(model, path, tokenizer="not a tokenizer")


def test_allowed_classes_exist():
    from tritium.models.transformers import MODEL_CLASSES

    missing = [name for name in MODEL_CLASSES if not hasattr(tf, name)]
    assert not missing or tf.__version__.startswith("4."), missing


def test_stored_tokenizer_fuzz(saved, tmp_path):
    """Edits of the stored tokenizer JSON: it loads or raises TritiumFormatError, nothing else."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    base = json.loads(load_tokenizer(saved["gpt2"][0]).to_str())
    values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=5),
                       st.lists(st.integers(-3, 400), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                  st.integers(-3, 3), max_size=2))

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in list(node.items())[:40]:
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                yield from paths(v, (*prefix, i))

    targets = list(paths(base))[1:]

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.data())
    def check(data):
        tree = json.loads(json.dumps(base))
        for _ in range(data.draw(st.integers(1, 3))):
            where = data.draw(st.sampled_from(targets))
            node = tree
            try:
                for k in where[:-1]:
                    node = node[k]
                node[where[-1]] = data.draw(values)
            except (KeyError, IndexError, TypeError):
                continue
        bad = tmp_path / "fuzz.safetensors"
        _rewrite(saved["gpt2"][0], bad, lambda meta: meta.__setitem__("tokenizer", json.dumps(tree)))
        try:
            load_tokenizer(bad)
        except TritiumFormatError:
            pass

    check()


def test_encoder_decoder_and_encoder_only(tmp_path, capsys):
    """T5 generates (its decoder start token is not part of the output); BERT is refused in one line."""
    from tritium.models.transformers import build_model, quantize_excludes

    for arch in ("seq2seq", "encoder"):
        torch.manual_seed(0)
        model = build_model(arch, 40, 32, 1, 32)
        tritium.freeze(tritium.quantize(model, exclude=quantize_excludes(arch)).eval())
        tritium.save(model, tmp_path / f"{arch}.safetensors")
    path = str(tmp_path / "seq2seq.safetensors")
    assert main(["generate", path, "--ids", "5,6,7", "--max-new-tokens", "6"]) == 0
    model, _ = load_pretrained(path)
    ref = model.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=6)
    assert capsys.readouterr().out == ",".join(map(str, ref[0, 1:].tolist())) + "\n"
    _one_line_error(main(["generate", str(tmp_path / "encoder.safetensors"), "--ids", "5"]), capsys.readouterr(),
                    "BertForMaskedLM does not generate")


def test_model_trained_by_run_decoder_generates(tmp_path, capsys):
    """``tritium run decoder --save-model`` writes a frozen model with its tokenizer that ``tritium generate`` runs,
    with transformers' greedy tokens and the run's own validation loss."""
    from tritium.experiments import lm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[i % len(SENTENCES)] + f" {i % 7}" for i in range(400)) + "\n")
    sets = {"hidden": 32, "layers": 1, "head_dim": 16, "vocab_size": 300, "steps": 30, "batch_size": 8,
            "seq_len": 16, "eval_every": 30, "eval_batches": 2, "warmup": 3, "lr": 0.01}
    out = tmp_path / "out"
    argv = ["run", "decoder", "--corpus", str(corpus), "--out", str(out), "--precision", "1.58-absmedian",
            "--threads", "1", "--no-progress", "--save-model",
            *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]
    assert main(argv) == 0
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    path = row["model_file"]
    assert path == str(out / "runs" / row["key"] / "model.safetensors")
    capsys.readouterr()
    assert main(["generate", path, "--prompt", "the cat", "--max-new-tokens", "8"]) == 0
    text, err = capsys.readouterr()
    assert "tokens/s" in err and text.endswith("\n")

    model, tok = load_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert any(isinstance(m, tritium.TernaryLinear) for m in model.modules())
    assert not any(True for _ in tritium.convert.bit_layers(model))  # frozen: no float latent weights left
    g = generate(model, "the cat", tok, max_new_tokens=8)
    assert text == g.text + "\n"
    prompt = torch.tensor([tok.encode("the cat").ids])
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                         pad_token_id=0)
    assert g.ids == ref[0, prompt.shape[1]:].tolist()
    # the saved model is the evaluated one: the same validation loss on the run's own evaluation batches
    corpus_obj = lm._corpus({**row, "val_fraction": 0.1}, type("A", (), {"corpus": str(corpus), "out": str(out)})())
    batch = lm.make_batch_fn("decoder", corpus_obj, corpus_obj.val, 8, 16)
    g2 = torch.Generator().manual_seed(1234)
    train_fn = lm.make_batch_fn("decoder", corpus_obj, corpus_obj.train, 8, 16)
    for _ in range(2):
        train_fn(g2)  # the evaluation sets draw the training batches first
    val = [batch(g2) for _ in range(2)]
    assert lm.evaluate(model, val) == pytest.approx(row["val_loss"], rel=1e-5)
