"""Files that cannot hurt: size caps, non-regular files, modes, what `save` refuses, eval mode at load."""

import json
import os
import stat
import struct

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import deadline
from tritium import freeze, load, quantize, save
from tritium.cli import main as cli_main
from tritium.formats import codecs, native
from tritium.formats.native import (
    MAX_HEADER_BYTES,
    MAX_JSON_ITEMS,
    MAX_TENSORS,
    Checkpoint,
    TritiumFormatError,
    read_header,
)
from tritium.info import describe

META = {"format": "tritium", "format_version": "1", "layers": "{}", "aliases": "{}"}


def _write(path, header, data=b""):
    blob = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _frozen(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.Dropout(0.5), nn.ReLU(), nn.Linear(20, 7), nn.Dropout(0.5))
    return freeze(quantize(model).eval())


def _skeleton():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(12, 20), nn.Dropout(0.5), nn.ReLU(), nn.Linear(20, 7), nn.Dropout(0.5))


def _refused(path, match):
    """Every reader refuses ``path`` with `TritiumFormatError` matching ``match``; `tritium info` exits 1."""
    for fn in (load, lambda p: load(p, _skeleton()), read_header, describe):
        with pytest.raises(TritiumFormatError, match=match):
            fn(path)
    assert cli_main(["info", str(path)]) == 2


# -------------------------------------------------------------------------------------------------- caps


def test_too_many_tensors(tmp_path, capsys):
    header = {"__metadata__": META}
    header.update({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)})
    path = _write(tmp_path / "many", header)
    assert os.path.getsize(path) < 10 * 2**20  # a small file: no more than this is needed to hit the cap
    with pytest.raises(TritiumFormatError, match=f"{MAX_TENSORS + 1} tensors, more than MAX_TENSORS"):
        read_header(path)
    assert cli_main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "MAX_TENSORS" in err and err.count("\n") == 1


def test_header_cap(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:  # a sparse file larger than the cap: nothing is read past the 8-byte length
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 2**20)
    _refused(path, "MAX_HEADER_BYTES")


def test_json_item_cap(tmp_path):
    meta = dict(META, layers="[" + "[]," * MAX_JSON_ITEMS + "[]]")
    _refused(_write(tmp_path / "items", {"__metadata__": meta}), "MAX_JSON_ITEMS")
    # escaped brackets in the outer JSON are counted again in the inner one
    header = json.dumps({"__metadata__": dict(META, aliases="{}")}).encode()
    inner = b"\\u002c" * (MAX_JSON_ITEMS + 1)  # commas
    header = header.replace(b'"aliases": "{}"', b'"aliases": "' + inner + b'"')
    _refused(_write(tmp_path / "escaped", header), "MAX_JSON_ITEMS")


def test_many_layer_records_and_aliases(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "MAX_TENSORS", 4)
    layers = {f"l{i}": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False} for i in range(5)}
    _refused(_write(tmp_path / "l", {"__metadata__": dict(META, layers=json.dumps(layers))}), "'layers' has 5")
    aliases = {f"a{i}": "t" for i in range(5)}
    header = {"__metadata__": dict(META, aliases=json.dumps(aliases)),
              "t": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}
    _refused(_write(tmp_path / "a", header), "'aliases' has 5")


@pytest.mark.parametrize("what", [
    "[" * 100_000, '{"a":' * 100_000, "1" * 40, '{"a": 1, "a": 2}',
])
def test_hostile_json(tmp_path, what):
    _refused(_write(tmp_path / "h", {"__metadata__": dict(META, layers=what)}), "metadata 'layers'")
    header = json.dumps({"__metadata__": META}).encode()[:-1] + b', "x": ' + what.encode() + b"}"
    _refused(_write(tmp_path / "o", header), "header")


def test_duplicate_keys_and_encoding(tmp_path):
    t = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    dup = f'{{"__metadata__": {json.dumps(META)}, "t": {t}, "t": {t}}}'.encode()
    _refused(_write(tmp_path / "dup", dup, b"\0"), "duplicate key 't'")
    dup_meta = f'{{"__metadata__": {json.dumps(META)[:-1]}, "format": "other"}}}}'.encode()
    _refused(_write(tmp_path / "dupmeta", dup_meta), "duplicate key 'format'")
    bad = json.dumps({"__metadata__": META}).encode().replace(b"tritium", b"trit\xffum")
    _refused(_write(tmp_path / "utf8", bad), "not UTF-8")
    utf16 = json.dumps({"__metadata__": META}).encode("utf-16")
    _refused(_write(tmp_path / "utf16", utf16), "not UTF-8")
    _refused(_write(tmp_path / "version", {"__metadata__": dict(META, format_version="\u00b2")}), "format_version")


def test_zero_size_tensor_with_huge_dimensions(tmp_path):
    header = {"__metadata__": META, "z": {"dtype": "F32", "shape": [0] + [2**31 - 1] * 7, "data_offsets": [0, 0]}}
    _refused(_write(tmp_path / "z", header), "too large")
    header["z"].update(dtype="U8", shape=[0, 2**31 - 1, 2**31 - 1])
    assert load(_write(tmp_path / "ok", header)).tensors["z"].shape == (0, 2**31 - 1, 2**31 - 1)


def test_hostile_names_are_escaped_by_info(tmp_path, capsys):
    name = "evil\x1b]0;title\x07\ud800"
    header = {"__metadata__": META, name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    path = _write(tmp_path / "n", json.dumps(header).encode(), b"\0")
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evil\\x1b]0;title\\x07\\ud800" in out
    layers = {name + "x" * 10_000: {"kind": "conv"}}
    assert cli_main(["info", str(_write(tmp_path / "m", {"__metadata__": dict(META, layers=json.dumps(layers))}))]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and len(err) < 500  # names in errors are shortened


# ----------------------------------------------------------------------------------- non-regular files


def test_fifo_folder_and_device_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(20):
        _refused(fifo, f"{fifo}: cannot read: a FIFO, not a regular file")
        _refused(tmp_path, "a folder, not a regular file")
        if os.path.exists("/dev/zero"):
            _refused("/dev/zero", "/dev/zero: cannot read: a character device")
    _refused(tmp_path / "absent", "cannot read")


def test_symlink_to_a_file_loads(tmp_path):
    save(_frozen(), tmp_path / "m")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    assert isinstance(load(tmp_path / "link"), Checkpoint)


# ----------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_honour_the_umask(tmp_path, mask, mode, capsys):
    model = _frozen()
    old = os.umask(mask)
    try:
        save(model, tmp_path / "m.safetensors")
        assert cli_main(["info", str(tmp_path / "m.safetensors"), "--json", str(tmp_path / "i.json")]) == 0
    finally:
        os.umask(old)
    for name in ("m.safetensors", "i.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name


# ---------------------------------------------------------------------------------------- save refuses


def test_save_refuses_nan_weights(tmp_path):
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7)))
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    frozen = freeze(model.eval())
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"layer '2': weight scale must be finite") as err:
        save(frozen, path)
    assert not isinstance(err.value, TritiumFormatError) and "would not load" in str(err.value)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        save(frozen, path)
    assert path.read_bytes() == b"old"


def test_save_refuses_invalid_codes_and_scales(tmp_path):
    model = _frozen()
    model[0].weight_packed[0, 0] = 0xFF
    with pytest.raises(ValueError, match="layer '0'.*invalid code 3"):
        save(model, tmp_path / "m")
    model = _frozen()
    model[3].weight_scale.fill_(-1.0)
    with pytest.raises(ValueError, match="layer '3': weight scale must be finite and positive"):
        save(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_save_refuses_too_many_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "MAX_TENSORS", 3)
    with pytest.raises(ValueError, match="more than the 3 a file may hold"):
        save(_frozen(), tmp_path / "m")


def test_save_refuses_what_the_loader_cannot_read(tmp_path):
    model = nn.Linear(3, 2)
    model.register_buffer("meta_only", torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        save(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_all_dtypes_round_trip(tmp_path):
    model = nn.Module()
    values = torch.tensor([0.0, 1.5, -2.0, 3.0])
    for i, dtype in enumerate(native._DTYPES.values()):
        model.register_buffer(f"b{i}", values.to(dtype).reshape(2, 2))
    model.register_buffer("scalar", torch.tensor(7, dtype=torch.int64))
    save(model, tmp_path / "m")
    ck = load(tmp_path / "m")
    for name, b in model.named_buffers():
        got = ck.tensors[name]
        same = torch.equal(got.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        assert got.dtype == b.dtype and same, name


# ------------------------------------------------------------------------------------------- eval mode


def test_load_returns_eval_mode(tmp_path):
    model = _frozen()
    save(model, tmp_path / "m")
    skeleton = _skeleton().train()
    loaded = load(tmp_path / "m", skeleton)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = torch.randn(4, 12)
    assert torch.equal(loaded(x), loaded(x)) and torch.equal(loaded(x), model(x))


# -------------------------------------------------------------------------------------- 2-bit checking


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 3), st.integers(1, 13), st.data())
def test_in_place_2bit_check_agrees_with_unpacking(n, k, data):
    q = torch.tensor(data.draw(st.lists(st.integers(-1, 1), min_size=n * k, max_size=n * k)),
                     dtype=torch.int8).reshape(n, k)
    p = codecs.pack("2bit", q)
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, p.shape[1] - 1))
    p[i, j] = data.draw(st.integers(0, 255))

    def ok(fn):
        try:
            fn()
        except TritiumFormatError:
            return False
        return True

    assert ok(lambda: codecs.check("2bit", p, n, k, "x")) == ok(lambda: codecs.unpack("2bit", p, n, k, "x"))


# ------------------------------------------------------------------------------------ found by fuzzing


def test_bitlinear_config_that_does_not_fit_the_layer(tmp_path):
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(12, 20)), "1.58-absmean-a4")
    with pytest.warns(UserWarning):
        freeze(model, strict=False)
    save(model, tmp_path / "m")
    raw = (tmp_path / "m").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    layers = json.loads(header["__metadata__"]["layers"])
    layers["0"]["config"]["granularity"] = ["group", 5]  # 5 does not divide in_features=12
    header["__metadata__"]["layers"] = json.dumps(layers)
    path = _write(tmp_path / "bad", header, raw[8 + n:])
    with pytest.raises(TritiumFormatError, match="group size 5 does not divide"):
        load(path, nn.Sequential(nn.Linear(12, 20, device="meta")))


def test_save_refuses_a_header_above_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "MAX_HEADER_BYTES", 100)
    with pytest.raises(ValueError, match="MAX_HEADER_BYTES"):
        save(_frozen(), tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_info_json_into_a_missing_folder(tmp_path, capsys):
    save(_frozen(), tmp_path / "m")
    assert cli_main(["info", str(tmp_path / "m"), "--json", str(tmp_path / "no" / "i.json")]) == 0
    assert json.loads((tmp_path / "no" / "i.json").read_text())["layers"]
    (tmp_path / "file").write_text("")
    assert cli_main(["info", str(tmp_path / "m"), "--json", str(tmp_path / "file" / "i.json")]) == 2
    captured = capsys.readouterr()
    assert "--json" in captured.err and captured.err.count("\n") == 1


# ------------------------------------------------------------------ what save writes, load reads back

_SPECS = ["1.58-absmean", "1.58-absmedian-channel", "1.58-absmax-rmsnorm", "1.58-absmean-a4", "4-absmax-channel",
          "2-absmean-group4", "fp32"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_save_writes_only_files_that_load_reads_back(data):
    import tempfile
    import warnings

    sizes = data.draw(st.lists(st.integers(1, 24), min_size=2, max_size=4))
    biases = [data.draw(st.booleans()) for _ in sizes[1:]]

    def build():
        pairs = zip(sizes, sizes[1:], biases, strict=False)
        return nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b, bias in pairs])

    torch.manual_seed(data.draw(st.integers(0, 9)))
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = data.draw(st.sampled_from(_SPECS))
        try:
            quantize(model, spec)
        except ValueError:  # a spec that does not fit these sizes (group size)
            event("spec does not fit")
            return
        with torch.no_grad():
            for _ in range(data.draw(st.integers(0, 2))):  # poison some latent weights
                layer = model[data.draw(st.integers(0, len(model) - 1))]
                i = data.draw(st.integers(0, layer.out_features - 1))
                j = data.draw(st.integers(0, layer.in_features - 1))
                layer.weight[i, j] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
        try:
            freeze(model.eval(), strict=False)
        except ValueError:
            event("freeze refused")
            return
    for i, dtype in enumerate(data.draw(st.lists(st.sampled_from(list(native._DTYPES.values())), max_size=3))):
        model.register_buffer(f"buf{i}", torch.arange(6).to(dtype).reshape(2, 3))
    storage = data.draw(st.sampled_from(["2bit", "base3"]))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        try:
            save(model, path, storage=storage)
        except ValueError as e:
            assert "would not load" in str(e) and os.listdir(folder) == []
            event("save refused")
            return
        event("saved and loaded back")
        ck = load(path)
        assert set(ck.modules) | {k.rpartition(".")[0] for k in ck.tensors} >= {str(i) for i in range(len(model))}
        skeleton = build().to("meta")
        for i in range(sum(1 for n, _ in model.named_buffers() if n.startswith("buf"))):
            skeleton.register_buffer(f"buf{i}", torch.empty(2, 3, device="meta"))
        loaded = load(path, skeleton)
        x = torch.randn(3, sizes[0])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0, equal_nan=True)
