"""The one export entry point across formats: ``tritium.export(..., format="hf-bitnet" | "tritium")`` and
``tritium export SRC OUT --format ...`` from a tritium file, a GGUF file or a Hugging Face BitNet folder; each
output read back by the engine that reads that format (transformers for HF BitNet, tritium for its own file);
``tritium info`` on an HF BitNet folder; and the refusals (one line, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")
pytest.importorskip("gguf")

import test_gguf  # noqa: E402
import tritium  # noqa: E402
from test_hf_bitnet import IDS, PRESET, SAMPLE, assert_agrees, hf_load, logits, tiny, train_tokenizer  # noqa: E402
from tritium.cli import main  # noqa: E402
from tritium.formats import ExportError, import_gguf, import_hf_bitnet  # noqa: E402
from tritium.info import describe_hf_bitnet  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A frozen tiny BitNet (hidden 64, 320 tokens) saved by tritium with its tokenizer of 300: (path, model,
    tokenizer)."""
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    model = tritium.freeze(tiny(tie_word_embeddings=True, vocab_size=320))
    tok = train_tokenizer(SAMPLE, vocab=300)
    tritium.save(model, path, tokenizer=tok)
    return path, model, tok


def test_export_api_writes_what_transformers_loads(tmp_path, saved):
    _, model, tok = saved
    tritium.export(model, tmp_path / "out", format="hf-bitnet", tokenizer=tok)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "bitnet"
    assert_agrees(logits(hf_load(tmp_path / "out"), IDS), logits(model, IDS))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(SAMPLE[:200])["input_ids"] == tok.encode(SAMPLE[:200]).ids


@pytest.mark.parametrize("fmt", ["hf-bitnet", "tritium"])
@pytest.mark.parametrize("option", [{"qtype": "tq1_0"}, {"float_type": "f16"}])
def test_export_api_refuses_gguf_options_for_other_formats(tmp_path, saved, fmt, option):
    with pytest.raises(ExportError, match=f"{next(iter(option))}=.* applies to format='gguf' only") as info:
        tritium.export(saved[1], tmp_path / "out", format=fmt, **option)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_hf_bitnet(tmp_path, saved, capsys):
    """``tritium export m.safetensors DIR --format hf-bitnet``: transformers loads the folder and computes the
    saved model's logits; ``tritium info DIR`` describes it."""
    path, model, tok = saved
    out = tmp_path / "hf"
    assert main(["export", str(path), str(out), "--format", "hf-bitnet"]) == 0
    printed = capsys.readouterr().out
    assert "hf-bitnet" in printed and "with tokenizer" in printed
    assert (out / "tokenizer.json").is_file()
    assert_agrees(logits(hf_load(out), IDS), logits(model, IDS))

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Hugging Face BitNet folder" in text and "BitNetForCausalLM" in text and "14 layers" in text
    d = describe_hf_bitnet(out)
    weights = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, tritium.TernaryLinear))
    assert d["ternary_layers"] == 14 and d["ternary_weights"] == weights
    assert d["ternary_bits_per_weight"] == pytest.approx(2 + 8 * 4 * 14 / weights)  # packed codes + fp32 scales


def test_cli_converts_hf_bitnet_to_tritium_and_generates(tmp_path, saved, capsys):
    """An HF BitNet folder becomes a tritium file (frozen, with its class, config and tokenizer) that loads to
    the same logits and that ``tritium generate`` runs."""
    path, model, tok = saved
    tritium.export(model, tmp_path / "hf", format="hf-bitnet", tokenizer=tok)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "hf"), str(out), "--format", "tritium"]) == 0
    assert "tritium" in capsys.readouterr().out
    back, tok2 = tritium.load_pretrained(out)
    ref, _ = import_hf_bitnet(tmp_path / "hf")
    assert type(back).__name__ == "BitNetForCausalLM" and tok2 is not None
    assert torch.equal(logits(back, IDS), logits(ref, IDS))
    assert torch.equal(logits(back, IDS), logits(model, IDS))  # the exact scales came through
    assert main(["generate", str(out), "--prompt", SAMPLE[:20], "--max-new-tokens", "4"]) == 0
    g = tritium.generate(back, SAMPLE[:20], tok2, max_new_tokens=4)
    assert capsys.readouterr().out.strip() == g.text.strip()


def test_cli_converts_gguf_to_hf_bitnet_and_tritium(tmp_path, capsys):
    """A GGUF file (per-tensor scales) becomes an HF BitNet folder that transformers computes alike, and a
    tritium file with the imported model's exact logits."""
    model = test_gguf.tiny("llama", PRESET, num_hidden_layers=1)
    tritium.export(model, tmp_path / "m.gguf", tokenizer=test_gguf.train_tokenizer(test_gguf.SAMPLE))
    ref, _ = import_gguf(tmp_path / "m.gguf")
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--format", "hf-bitnet"]) == 0
    assert_agrees(logits(hf_load(tmp_path / "hf"), ids), logits(ref, ids))
    assert main(["export", str(tmp_path / "m.gguf"), str(tmp_path / "m.safetensors"), "--format", "tritium"]) == 0
    back, tok = tritium.load_pretrained(tmp_path / "m.safetensors")
    assert tok is not None and torch.equal(logits(back, ids), logits(ref, ids))
    capsys.readouterr()


def _one_line_error(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["qtype", "float type", "tritium qtype", "out is a file", "foreign folder",
                                  "does not map", "bad folder"])
def test_cli_refusals_are_one_line(tmp_path, saved, capsys, case):
    path = saved[0]
    out = tmp_path / "out"
    argv = ["export", str(path), str(out), "--format", "hf-bitnet"]
    needles: tuple[str, ...]
    if case == "qtype":
        argv += ["--qtype", "tq1_0"]
        needles = ("--qtype applies to --format gguf only",)
    elif case == "float type":
        argv += ["--float-type", "f16"]
        needles = ("--float-type applies to --format gguf only",)
    elif case == "tritium qtype":
        argv = ["export", str(path), str(tmp_path / "m.safetensors"), "--format", "tritium", "--qtype", "tq2_0"]
        needles = ("--qtype",)
    elif case == "out is a file":
        out.write_text("x")
        needles = ("OUT:", "not a folder")
    elif case == "foreign folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        needles = ("notes.txt",)
    elif case == "does not map":
        per_channel = tmp_path / "pc.safetensors"
        tritium.save(tritium.freeze(tiny(config=PRESET.replace(granularity="channel"))), per_channel)
        argv[1] = str(per_channel)
        needles = ("pc.safetensors", "granularity='channel'")
    else:
        tritium.export(saved[1], tmp_path / "hf", format="hf-bitnet")
        (tmp_path / "hf" / "config.json").write_text("{")
        argv = ["export", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]
        needles = ("config.json is not valid JSON",)
    assert main(argv) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.gguf").exists()
    if case not in ("out is a file", "foreign folder"):
        assert not out.exists()
    if case == "foreign folder":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_info_refuses_a_malformed_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bitnet"}))
    assert main(["info", str(tmp_path)]) == 2
    _one_line_error(capsys, "not a BitNet checkpoint")
