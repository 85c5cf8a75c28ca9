"""Spec strings, the weight/activation quantizers and the sampled median."""

import re

import pytest
import torch

from tritium import BitConfig, format_spec, parse_spec
from tritium.quant import abs_median, quantize_act, quantize_weight


@pytest.mark.parametrize(
    "spec, fields",
    [
        ("1.58-absmedian", dict(weight_bits=1.58, measure="absmedian", granularity="tensor")),
        ("1.58-absmean-channel", dict(measure="absmean", granularity="channel")),
        ("1-absmean", dict(weight_bits=1, measure="absmean")),
        ("2-absmax", dict(weight_bits=2, measure="absmax")),
        ("4-absmax-group128", dict(weight_bits=4, granularity=("group", 128))),
        ("1.58-absmean-a4", dict(act_bits=4)),
        ("8-absmax-afp", dict(weight_bits=8, act_bits=None)),
    ],
)
def test_parse_and_format_spec(spec, fields):
    cfg = parse_spec(spec)
    for k, v in fields.items():
        assert getattr(cfg, k) == v
    assert parse_spec(format_spec(cfg)) == cfg
    assert format_spec(cfg) == spec


def test_float_specs_and_defaults():
    for s in ("fp32", "bf16", "FP16"):
        assert parse_spec(s) is None
    assert parse_spec("1.58") == BitConfig()
    assert BitConfig().spec == "1.58-absmedian"


@pytest.mark.parametrize("bad", ["3-absmean", "1.58-median", "ternary", "1.58-absmean-row", "1.58-group0", "1.58-a3"])
def test_bad_spec_names_the_problem(bad):
    with pytest.raises(ValueError, match="bad precision spec"):
        parse_spec(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="lambda_"):
        BitConfig(lambda_=1.5)
    with pytest.raises(ValueError, match="act_bits"):
        BitConfig(act_bits=16)
    with pytest.raises(ValueError, match="norm"):
        BitConfig(norm="batchnorm")
    with pytest.raises(TypeError, match="weight_bits=True"):
        BitConfig(weight_bits=True)


@pytest.mark.parametrize("bad", ["1.58-absmedian-absmean", "1.58-a8-a4", "1.58-channel-group8",
                                 "1.58-tensor-tensor", "4-absmax-afp-a8", "2-group8-group16"])
def test_spec_part_given_twice_raises(bad):
    with pytest.raises(ValueError, match="both set the"):
        parse_spec(bad)


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("weight_bits", "1.58", TypeError), ("weight_bits", None, TypeError), ("weight_bits", 3, ValueError),
        ("measure", 1, TypeError), ("measure", None, TypeError), ("measure", "mean", ValueError),
        ("granularity", 5, TypeError), ("granularity", ("group", 8.0), TypeError),
        ("granularity", ("group", True), TypeError), ("granularity", ("group", 0), ValueError),
        ("granularity", ("block", 8), ValueError), ("act_bits", 8.0, TypeError), ("act_bits", True, TypeError),
        ("act_bits", "8", TypeError), ("act_bits", 16, ValueError), ("norm", 3, TypeError),
        ("norm", "batchnorm", ValueError), ("lambda_", "0.5", TypeError), ("lambda_", None, TypeError),
        ("lambda_", True, TypeError), ("lambda_", float("nan"), ValueError), ("lambda_", -0.1, ValueError),
        ("median_sample", 1.5, TypeError), ("median_sample", True, TypeError), ("median_sample", "8", TypeError),
        ("median_sample", -1, ValueError),
    ],
)
def test_config_field_types_and_values(field, value, error):
    with pytest.raises(error, match=re.escape(f"{field}={value!r}")):
        BitConfig(**{field: value})


def test_config_accepts_and_normalizes_numbers():
    np = pytest.importorskip("numpy")
    cfg = BitConfig(weight_bits=4.0, lambda_=1, median_sample=np.int64(5), granularity=["group", np.int32(8)],
                    act_bits=np.int64(4))
    assert cfg == BitConfig(weight_bits=4, lambda_=1.0, median_sample=5, granularity=("group", 8), act_bits=4)
    assert type(cfg.lambda_) is float and type(cfg.median_sample) is int and type(cfg.group_size) is int
    assert type(cfg.act_bits) is int and cfg.weight_bits == 4 and type(cfg.weight_bits) is int
    assert BitConfig(lambda_=np.float32(0.5)).lambda_ == 0.5


def test_activation_quant_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 33) * torch.logspace(-3, 3, 6).unsqueeze(1)
    q, s = quantize_act(x, 8)
    for row, qrow, srow in zip(x, q, s, strict=True):
        amax = torch.tensor(max(abs(v) for v in row.tolist()), dtype=torch.float32)
        assert srow.item() == (amax / 127).item()
        inv = (127 / amax).item()  # a float32 number
        assert qrow.tolist() == [float(round(v)) for v in (row * inv).tolist()]  # banker's rounding too
    assert q.abs().max() == 127
    q4, _ = quantize_act(x, 4)
    assert q4.abs().max() == 7
    q0, s0 = quantize_act(torch.zeros(2, 5), 8)
    assert torch.equal(q0, torch.zeros(2, 5)) and (s0 > 0).all()


def test_weight_quant_levels():
    torch.manual_seed(1)
    w = torch.randn(64, 32)
    for bits, levels in ((1.58, {-1, 0, 1}), (1, {-1, 1}), (2, set(range(-2, 2))), (4, set(range(-8, 8)))):
        q, s = quantize_weight(w, BitConfig(weight_bits=bits, measure="absmax" if bits in (2, 4) else "absmean"))
        assert set(q.unique().int().tolist()) <= levels
        assert s.shape == ()
    q, s = quantize_weight(w, BitConfig(granularity="channel"))
    assert s.shape == (64, 1)
    torch.testing.assert_close(s.squeeze(1), w.abs().median(dim=1).values)
    q, s = quantize_weight(w, BitConfig(granularity=("group", 8)))
    assert s.shape == (64, 4)
    torch.testing.assert_close(s[3, 1], w[3, 8:16].abs().median())


def test_all_zero_weights():
    for bits in (1.58, 1, 4):
        q, s = quantize_weight(torch.zeros(4, 8), BitConfig(weight_bits=bits, measure="absmax"))
        assert torch.equal(q * s, torch.zeros(4, 8))


def test_sampled_median_close_to_exact():
    torch.manual_seed(2)
    for shape in ((4096, 1024), (1024, 4096), (11008, 430)):
        w = torch.randn(shape) * torch.rand(shape[1])  # column-structured magnitudes
        exact = w.abs().median()
        approx = abs_median(w, sample=1 << 18)
        assert abs(approx / exact - 1) < 0.005, (shape, exact, approx)
    small = torch.randn(100, 100)
    assert abs_median(small, sample=1 << 18) == small.abs().median()  # small tensors: exact


def test_median_sample_zero_is_exact():
    w = torch.randn(2048, 600)
    q, s = quantize_weight(w, BitConfig(median_sample=0))
    assert s == w.abs().median()
