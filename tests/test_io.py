"""`save`/`load` round trips, size bounds, hostile files (with fuzzing), atomic writes, `tritium info`."""

import json
import os
import random
import struct

import pytest
import torch
from torch import nn

import tritium
from tritium import TernaryLinear, freeze, load, quantize, save
from tritium.cli import main as cli_main
from tritium.formats import codecs
from tritium.formats.native import Checkpoint, TritiumFormatError
from tritium.info import describe


def _mlp():
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 13, bias=False), nn.Tanh(), nn.Linear(13, 6))


def _frozen_mlp(spec="1.58-absmedian"):
    torch.manual_seed(0)
    model = _mlp()
    quantize(model, spec, exclude=[r"^4$"])  # the last layer stays nn.Linear
    model.register_buffer("steps", torch.tensor(7))
    return freeze(model.eval())


def _skeleton(meta=True):
    with torch.device("meta" if meta else "cpu"):
        model = _mlp()
        model.register_buffer("steps", torch.tensor(0))
    return model


def _read(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def _write(path, header, data):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _frozen_mlp("1.58-absmedian-channel")
    path = tmp_path_factory.mktemp("io") / "mlp.safetensors"
    save(model, path)
    return model, path


@pytest.mark.parametrize("storage", ["2bit", "base3"])
@pytest.mark.parametrize("meta", [True, False])
def test_round_trip_into_skeleton(tmp_path, storage, meta):
    model = _frozen_mlp()
    path = tmp_path / "m.safetensors"
    save(model, path, storage=storage)
    loaded = load(path, _skeleton(meta))
    assert isinstance(loaded[0], TernaryLinear) and isinstance(loaded[2], TernaryLinear)
    assert isinstance(loaded[4], nn.Linear) and loaded.steps.item() == 7
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    x = torch.randn(5, 24)
    assert torch.equal(loaded(x), model(x))
    # a QAT skeleton (BitLinear layers) and an already frozen one load too
    assert torch.equal(load(path, quantize(_skeleton(), exclude=[r"^4$"]))(x), model(x))
    assert torch.equal(load(path, _frozen_mlp())(x), model(x))


def test_load_without_model_returns_checkpoint(saved):
    model, path = saved
    ck = load(path)
    assert isinstance(ck, Checkpoint)
    assert set(ck.modules) == {"0", "2"} and set(ck.tensors) == {"4.weight", "4.bias", "steps"}
    assert ck.layers["0"]["kind"] == "ternary" and ck.layers["4"]["kind"] == "linear"
    x = torch.randn(3, 24)
    assert torch.equal(ck.modules["0"](x), model[0](x))


def test_unfrozen_bitlinear_round_trip(tmp_path):
    torch.manual_seed(0)
    model = quantize(_mlp(), "1.58-absmean-a4", exclude=[r"^4$"])
    with pytest.warns(UserWarning):
        freeze(model, strict=False)
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", _mlp().to("meta"))
    assert isinstance(loaded[0], tritium.BitLinear) and loaded[0].config == model[0].config
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_sizes(tmp_path):
    torch.manual_seed(0)
    model = freeze(quantize(nn.Sequential(nn.Linear(256, 120, bias=False))))
    sizes = {}
    for storage in ("2bit", "base3"):
        save(model, tmp_path / storage, storage=storage)
        sizes[storage] = os.path.getsize(tmp_path / storage)
        info = describe(tmp_path / storage)
        assert info["layers"][0]["bits_per_weight"] <= {"2bit": 2.0, "base3": 1.6}[storage]
    overhead = 1024  # header and the one scale
    assert sizes["2bit"] <= 256 * 120 * 2.05 / 8 + overhead
    assert sizes["base3"] <= 256 * 120 * 1.6 / 8 + overhead


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 5), (2, 13), (4, 16)])
def test_packing_round_trip(n, k):
    q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    assert codecs.pack("2bit", q).shape == (n, (k + 3) // 4)
    assert codecs.pack("base3", q).numel() == -(-n * k // 5)
    assert torch.equal(codecs.unpack("2bit", codecs.pack("2bit", q), n, k), q)
    assert torch.equal(codecs.unpack("base3", codecs.pack("base3", q), n, k), q)


def test_transformers_model_meta_skeleton_tied(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = freeze(quantize(transformers.LlamaForCausalLM(cfg)).eval())
    path = tmp_path / "llama.safetensors"
    save(model, path, storage="base3")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    loaded = load(path, skeleton).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    ck = load(path)
    assert ck.model_class == "LlamaForCausalLM" and ck.model_config["hidden_size"] == 32


# ---------------------------------------------------------------------------------------- hostile files


def _mutated(saved, tmp_path, fn):
    header, data = _read(saved[1])
    data = bytearray(data)
    fn(header, data)
    path = tmp_path / "bad.safetensors"
    _write(path, header, bytes(data))
    return path


def _layers(h, fn):
    layers = json.loads(h["__metadata__"]["layers"])
    fn(layers)
    h["__metadata__"]["layers"] = json.dumps(layers)


def _set_byte(key, value):
    def fn(h, data):
        data[h[key]["data_offsets"][0]] = value
    return fn


BAD = {
    "version too new": (lambda h, d: h["__metadata__"].update(format_version="2"), "newer"),
    "not tritium": (lambda h, d: h["__metadata__"].update(format="other"), "not a tritium file"),
    "layers json": (lambda h, d: h["__metadata__"].update(layers="{oops"), "not valid JSON"),
    "wrong dtype": (lambda h, d: h["0.weight_scale"].update(dtype="I32"), "expected F32"),
    "gap": (lambda h, d: h.pop("2.weight_scale"), "gaps"),
    "wrong shape": (lambda h, d: h["0.weight_scale"].update(shape=[20, 2]), "expected F32"),
    "absurd size": (lambda h, d: _layers(h, lambda ls: ls["0"].update(in_features=2**40)), "in_features"),
    "bool size": (lambda h, d: _layers(h, lambda ls: ls["0"].update(out_features=True)), "out_features"),
    "bad storage": (lambda h, d: _layers(h, lambda ls: ls["0"].update(storage="1bit")), "storage"),
    "bad kind": (lambda h, d: _layers(h, lambda ls: ls["0"].update(kind="conv")), "kind"),
    "code 3": (_set_byte("0.weight_packed", 0xFF), "code 3"),
    "bad padding": (_set_byte("2.weight_packed", 0b11_01_01_10), "code 3|padding"),
    "nan scale": (lambda h, d: d.__setitem__(slice(h["0.weight_scale"]["data_offsets"][0],
                                                   h["0.weight_scale"]["data_offsets"][0] + 4),
                                             struct.pack("<f", float("nan"))), "finite"),
    "overlap": (lambda h, d: h["0.weight_scale"].update(data_offsets=[0, 160]), "overlaps|gaps"),
    "alias": (lambda h, d: h["__metadata__"].update(aliases='{"x": "nope"}'), "alias"),
    "metadata type": (lambda h, d: h.update(__metadata__={"format": 3}), "strings"),
    "dims": (lambda h, d: h["0.weight_scale"].update(shape=[-40]), "dimension"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_raise_clear_errors(saved, tmp_path, case):
    fn, match = BAD[case]
    path = _mutated(saved, tmp_path, fn)
    with pytest.raises(TritiumFormatError, match=match):
        load(path)


def test_missing_tensor(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(saved[1], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "2.weight_scale"}
        meta = f.metadata()
    save_file(tensors, tmp_path / "m", metadata=meta)
    with pytest.raises(TritiumFormatError, match="'2.weight_scale' is missing"):
        load(tmp_path / "m")


def test_base3_bad_byte(tmp_path):
    path = tmp_path / "b3.safetensors"
    save(_frozen_mlp(), path, storage="base3")
    header, data = _read(path)
    data = bytearray(data)
    data[header["0.weight_packed"]["data_offsets"][0]] = 250
    _write(path, header, bytes(data))
    with pytest.raises(TritiumFormatError, match="243"):
        load(path)


def test_truncated_and_garbage(saved, tmp_path):
    raw = saved[1].read_bytes()
    for cut in (0, 4, 8, 20, len(raw) // 2, len(raw) - 1):
        (tmp_path / "t").write_bytes(raw[:cut])
        with pytest.raises(TritiumFormatError):
            load(tmp_path / "t")
    with pytest.raises(TritiumFormatError, match="cannot read"):
        load(tmp_path / "does-not-exist")
    (tmp_path / "huge").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(TritiumFormatError, match="header length"):
        load(tmp_path / "huge")


def test_skeleton_mismatch(saved):
    _, path = saved
    with pytest.raises(TritiumFormatError, match="has no module"):
        load(path, nn.Sequential(nn.Linear(24, 40)))
    wrong = _skeleton()
    wrong[2] = nn.Linear(40, 14, bias=False, device="meta")
    with pytest.raises(TritiumFormatError, match="shape"):
        load(path, wrong)
    extra = _skeleton()
    extra.register_buffer("other", torch.zeros(2))
    with pytest.raises(TritiumFormatError, match="no tensor for 'other'"):
        load(path, extra)
    with pytest.raises(TritiumFormatError, match="is a ReLU"):
        load(path, nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()))


@pytest.mark.parametrize("meta", [True, False])
def test_a_skeleton_that_does_not_fit_is_left_as_it_was(saved, meta):
    """A load that fails late (after layers and tensors were already put in) undoes all of it."""
    _, path = saved

    def snapshot(model):
        return [(n, type(m), {k: id(v) for k, v in {**m._parameters, **m._buffers}.items()})
                for n, m in model.named_modules()]

    extra = _skeleton(meta)  # fails at the very end: a buffer the file does not have
    extra.register_buffer("other", torch.zeros(2))
    before = snapshot(extra)
    with pytest.raises(TritiumFormatError, match="no tensor for 'other'"):
        load(path, extra)
    assert snapshot(extra) == before
    wrong = _skeleton(meta)  # fails half-way: the second linear layer has another shape
    wrong[4] = nn.Linear(13, 7, device=wrong[0].weight.device)
    before = snapshot(wrong)
    with pytest.raises(TritiumFormatError):
        load(path, wrong)
    assert snapshot(wrong) == before
    assert not any(isinstance(m, TernaryLinear) for m in wrong.modules())
    load(path, _skeleton(meta))  # and a fitting skeleton still loads


def _check_fuzz(path, skeleton=None):
    try:
        out = load(path)
        if skeleton is not None:
            load(path, skeleton())
    except TritiumFormatError:
        return False
    assert isinstance(out, Checkpoint)
    return True


def test_fuzz_random_bytes(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "fuzz"
    for i in range(150):
        n = rng.randrange(0, 200)
        body = bytes(rng.randrange(256) for _ in range(n))
        if i % 3 == 0:  # plausible header length with random JSON-ish content
            body = struct.pack("<Q", n) + b'{"__metadata__": ' + body
        path.write_bytes(body)
        assert not _check_fuzz(path)


def test_fuzz_mutated_valid_files(saved, tmp_path):
    rng = random.Random(1)
    raw = saved[1].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path = tmp_path / "fuzz"
    for _ in range(300):
        data = bytearray(raw)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes anywhere
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # flip bytes in the header
            for _ in range(rng.randrange(1, 4)):
                data[8 + rng.randrange(n)] = rng.randrange(32, 127)
        elif kind == 2:  # truncate or extend
            data = data[: rng.randrange(len(data))] if rng.random() < 0.7 else data + b"\0" * rng.randrange(1, 9)
        else:  # overwrite a digit in the header (sizes, offsets, versions)
            digits = [i for i in range(8, 8 + n) if chr(data[i]).isdigit()]
            data[rng.choice(digits)] = ord(str(rng.randrange(10)))
        path.write_bytes(bytes(data))
        _check_fuzz(path, _skeleton)


# ------------------------------------------------------------------------------------------ atomic save


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save(_frozen_mlp(), path)
    before = path.read_bytes()

    class Boom(OSError):
        pass

    class Failing:  # writes part of the data, then fails
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.f.write(b[:100])
            raise Boom("disk full")

    monkeypatch.setattr(tritium.atomic, "open", lambda p, mode: Failing(open(p, mode)), raising=False)
    other = freeze(quantize(nn.Sequential(nn.Linear(64, 64))))
    with pytest.raises(Boom):
        save(other, path)
    monkeypatch.undo()
    monkeypatch.setattr(tritium.atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(Boom("fsync")))
    with pytest.raises(Boom):
        save(other, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------- info


def test_info_command(saved, tmp_path, capsys):
    _, path = saved
    out_json = tmp_path / "info.json"
    assert cli_main(["info", str(path), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "Horowitz" in text and "ternary-2bit" in text and "4.weight" in text
    d = json.loads(out_json.read_text())
    ops = d["ops_per_token"]
    assert ops["ternary_adds"] == 24 * 40 + 40 * 13
    assert ops["rescale_mults"] == 2 * (40 + 13) and ops["bias_adds"] == 40
    assert ops["fp_linear_mults"] == 13 * 6
    e = d["energy_pj_per_token"]
    assert e["ternary_int8_adds"] < e["fp16"] < e["fp32"]
    assert d["energy_figures_pj"]["fp32_mult"] == 3.7 and d["energy_figures_pj"]["int8_add"] == 0.03
    (tmp_path / "bad").write_bytes(b"nonsense")
    assert cli_main(["info", str(tmp_path / "bad")]) == 2
