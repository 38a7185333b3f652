"""spqr.config: validation messages, presets and (de)serialization."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spqr.config import CalibrationConfig, ConfigError, QuantConfig, SamplingConfig, preset


@pytest.mark.parametrize("option,value", [
    ("wbits", 1), ("wbits", 9), ("wbits", 3.0), ("wbits", "3"),
    ("beta1", 0), ("beta1", 4097), ("beta2", 0), ("beta2", -3),
    ("qq_bits", 1), ("qq_bits", 9),
    ("outlier_threshold", -1.0), ("outlier_threshold", 0.0), ("outlier_threshold", math.nan),
    ("perm", "foo"), ("perm", "random"),
    ("percdamp", -1.0), ("percdamp", math.inf), ("percdamp", math.nan),
    ("blocksize", 0), ("blocksize", 1.5),
    ("stats_dtype", "bfloat16"), ("stats_dtype", "float32"),  # float32 needs qq_bits=None
    # wrong types, as an edited config.json or a script gives them (bools passed as 1, strings failed inside math)
    ("beta1", True), ("wbits", False), ("qq_bits", True), ("outlier_threshold", "0.2"), ("outlier_threshold", None),
    ("percdamp", "1"), ("error_feedback", "no"), ("error_feedback", 0),
])
def test_out_of_range_values_name_the_option(option, value):
    with pytest.raises(ConfigError) as info:
        QuantConfig(**{option: value})
    assert option in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("option,value", [("nsamples", 0), ("seqlen", 1), ("batch_size", 0), ("nsamples", 2.0),
                                          ("nsamples", True), ("seed", -1), ("seed", 10**23), ("seed", 1.5),
                                          ("dataset", 123), ("dataset", ""), ("split", "train"),
                                          ("split", 3)])
def test_calibration_config_validation(option, value):
    with pytest.raises(ConfigError, match=option):
        CalibrationConfig(**{option: value})


def test_calibration_split_defaults_to_valid_and_files_have_none(tmp_path):
    import dataclasses

    assert CalibrationConfig().resolved_split == "valid" == CalibrationConfig(dataset="ptb").to_dict()["split"]
    assert CalibrationConfig(dataset="wikitext2", split="test").resolved_split == "test"
    text = str(tmp_path / "calib.txt")
    assert CalibrationConfig(dataset=text).resolved_split is None
    assert dataclasses.replace(CalibrationConfig(), dataset=text).resolved_split is None  # the default is no split
    with pytest.raises(ConfigError, match="split 'valid' given for .*a file has no splits"):
        CalibrationConfig(dataset=text, split="valid")


def test_valid_edge_values_are_accepted():
    for kw in (dict(wbits=2), dict(wbits=8), dict(beta1=1), dict(beta1=4096), dict(qq_bits=None), dict(qq_bits=2),
               dict(qq_bits=8), dict(outlier_threshold=math.inf), dict(outlier_threshold=1e-9), dict(percdamp=0.0),
               dict(perm="identity"), dict(blocksize=1)):
        QuantConfig(**kw)


def test_defaults_are_the_paper_recipe():
    c = QuantConfig()
    assert (c.wbits, c.beta1, c.beta2, c.qq_bits, c.outlier_threshold, c.perm, c.error_feedback) == \
           (3, 16, 16, 3, 0.2, "act_order", True)
    assert preset("spqr") == c
    assert c.has_outliers and c.needs_hessian


def test_presets():
    gptq = preset("gptq")
    assert (gptq.wbits, gptq.beta1, gptq.qq_bits, gptq.outlier_threshold, gptq.percdamp) == \
           (4, 128, None, math.inf, 0.01)
    assert gptq.error_feedback and not gptq.has_outliers and gptq.needs_hessian
    rtn = preset("rtn")
    assert (rtn.wbits, rtn.beta1, rtn.qq_bits, rtn.outlier_threshold, rtn.perm, rtn.error_feedback) == \
           (4, 16, None, math.inf, "identity", False)
    assert not rtn.needs_hessian
    assert preset("rtn", wbits=3).wbits == 3 and preset("gptq", perm="identity").perm == "identity"
    with pytest.raises(ConfigError, match="method"):
        preset("awq")
    with pytest.raises(ConfigError, match="wbits"):
        preset("gptq", wbits=9)


def test_fp32_statistics_only_as_plain_values():
    assert QuantConfig(qq_bits=None, stats_dtype="float32").plain_stats_dtype == torch.float32
    assert preset("rtn").plain_stats_dtype == torch.float16


def test_needs_hessian():
    assert not QuantConfig(error_feedback=False, perm="identity", outlier_threshold=math.inf).needs_hessian
    assert QuantConfig(error_feedback=False, perm="act_order", outlier_threshold=math.inf).needs_hessian
    assert QuantConfig(error_feedback=False, perm="identity", outlier_threshold=1.0).needs_hessian


@pytest.mark.parametrize("blocksize,beta1,expected", [(128, 16, 128), (100, 16, 96), (10, 16, 16), (1, 7, 7),
                                                      (128, 128, 128), (200, 128, 128)])
def test_sweep_block_is_whole_groups(blocksize, beta1, expected):
    assert QuantConfig(blocksize=blocksize, beta1=beta1).sweep_block == expected


@pytest.mark.parametrize("config", [QuantConfig(), preset("gptq"), preset("rtn"),
                                    QuantConfig(wbits=2, beta1=7, beta2=5, qq_bits=4, outlier_threshold=0.37)])
def test_to_dict_from_dict_round_trip_through_json(config):
    d = config.to_dict()
    again = QuantConfig.from_dict(json.loads(json.dumps(d)))  # strict JSON: no Infinity tokens
    assert again == config
    if not config.has_outliers:
        assert d["outlier_threshold"] is None
        assert math.isinf(again.outlier_threshold)
    json.dumps(d, allow_nan=False)


def test_from_dict_rejects_unknown_options():
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({"wbits": 3, "bogus": 1})


def test_configs_are_frozen():
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        QuantConfig().wbits = 4  # type: ignore[misc]


@pytest.mark.parametrize("option, value", [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
                                           ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5),
                                           ("top_p", math.nan), ("seed", -1), ("seed", 2**63),
                                           ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                                           ("repetition_penalty", math.inf), ("repetition_penalty", 1e-300),
                                           ("temperature", 1e-40), ("temperature", 1e39), ("repetition_penalty", 1e39),
                                           ("top_k", True), ("seed", True), ("temperature", "1")])
def test_sampling_config_validation(option, value):
    with pytest.raises(ConfigError, match=option):
        SamplingConfig(**{option: value})


def test_sampling_config_defaults_are_greedy():
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.7).greedy
    assert SamplingConfig(temperature=1, top_k=5, top_p=0.9, seed=3).to_dict() == {
        "temperature": 1, "top_k": 5, "top_p": 0.9, "seed": 3, "repetition_penalty": 1.0}
