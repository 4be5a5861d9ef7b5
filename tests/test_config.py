"""LoraConfig validation, pattern syntax and scaling."""

import math
import re

import pytest

from lora_jax import LoraConfig
from lora_jax.config import compile_pattern


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, r"LoraConfig.rank must be a positive int, got 0"),
    ("rank", -3, r"LoraConfig.rank must be a positive int, got -3"),
    ("rank", 2.5, r"LoraConfig.rank must be a positive int, got 2.5"),
    ("rank", True, r"LoraConfig.rank must be a positive int, got True"),
    ("alpha", 0, r"LoraConfig.alpha must be a positive finite number, got 0"),
    ("alpha", -1.0, r"LoraConfig.alpha must be a positive finite number, got -1.0"),
    ("alpha", float("nan"), r"LoraConfig.alpha must be a positive finite number, got nan"),
    ("alpha", "16", r"LoraConfig.alpha must be a positive finite number, got '16'"),
    ("dropout", 1.0, r"LoraConfig.dropout must be a number in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"LoraConfig.dropout must be a number in \[0, 1\), got -0.1"),
    ("use_rslora", 1, r"LoraConfig.use_rslora must be a bool, got 1"),
    ("init", "pissa_niter_4", r"LoraConfig.init must be one of \('default', 'gaussian'\), got 'pissa_niter_4'"),
    ("targets", "re:q_proj(", r"LoraConfig.targets: invalid regex 're:q_proj\('"),
    ("exclude", ["re:[unclosed"], r"LoraConfig.exclude: invalid regex 're:\[unclosed'"),
    ("targets", (), r"LoraConfig.targets must name at least one layer, preset or pattern, got \(\)"),
    ("targets", [""], r"LoraConfig.targets: entries must be non-empty strings or re.Pattern, got ''"),
    ("targets", [3], r"LoraConfig.targets: entries must be non-empty strings or re.Pattern, got 3"),
    ("targets", 3, r"LoraConfig.targets must be a string or a sequence of strings, got 3"),
])
def test_invalid_values_name_the_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_normalises_types_and_is_hashable():
    cfg = LoraConfig(rank=4, alpha=8, targets="q_proj", exclude=["re:.*0.*"])
    assert cfg.targets == ("q_proj",) and cfg.exclude == ("re:.*0.*",)
    assert isinstance(cfg.alpha, float) and cfg.alpha == 8.0
    assert hash(cfg) == hash(LoraConfig(rank=4, alpha=8.0, targets=("q_proj",), exclude=("re:.*0.*",)))


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 16.0), (8, 16.0), (64, 16.0), (7, 3.5)])
def test_scaling(rank, alpha):
    assert LoraConfig(rank=rank, alpha=alpha).scaling("x") == alpha / rank
    assert LoraConfig(rank=rank, alpha=alpha, use_rslora=True).scaling("x") == alpha / math.sqrt(rank)
    assert LoraConfig(rank=rank, alpha=alpha).scaling("x", rank=2) == alpha / 2


@pytest.mark.parametrize("pattern, path, expected", [
    ("query", "layers_0/attn/query", True),
    ("query", "layers_0/attn/query_norm", False),
    ("attn/*", "layers_0/attn/query", True),
    ("attn/*", "layers_0/attn/sub/query", False),
    ("attn/**", "layers_0/attn/sub/query", True),
    ("layers_?/mlp/up_proj", "model/layers_3/mlp/up_proj", True),
    ("layers_?/mlp/up_proj", "model/layers_13/mlp/up_proj", False),
    ("*_proj", "model/layers_0/self_attn/q_proj", True),
    ("re:.*q_proj", "model/layers_0/self_attn/q_proj", True),
    ("re:q_proj", "model/layers_0/self_attn/q_proj", False),  # regexes match the whole path
    ("re:model/layers_[01]/.*", "model/layers_2/mlp/up", False),
    (re.compile(r".*/(q|v)_proj"), "model/layers_0/self_attn/v_proj", True),
])
def test_pattern_syntax(pattern, path, expected):
    assert (compile_pattern(pattern).fullmatch(path) is not None) is expected


def test_rank_and_alpha_patterns_first_match_wins():
    cfg = LoraConfig(rank=8, alpha=16, rank_pattern={"layers_0/**": 4, "q_proj": 2},
                     alpha_pattern=[("re:.*/v_proj", 3.0)])
    assert cfg.rank_pattern == (("layers_0/**", 4), ("q_proj", 2))
    assert cfg.rank_for("model/layers_0/self_attn/q_proj") == 4  # the first entry matches first
    assert cfg.rank_for("model/layers_1/self_attn/q_proj") == 2
    assert cfg.rank_for("model/layers_1/self_attn/k_proj") == 8
    assert cfg.alpha_for("model/layers_1/self_attn/v_proj") == 3.0
    assert cfg.scaling("model/layers_1/self_attn/v_proj") == 3.0 / 8
    assert cfg.scaling("model/layers_0/self_attn/v_proj") == 3.0 / 4
    assert LoraConfig(rank=8, alpha=16, use_rslora=True, rank_pattern={"q": 4}).scaling("a/q") == 16 / 2
    assert hash(cfg) == hash(LoraConfig(rank=8, alpha=16, rank_pattern=(("layers_0/**", 4), ("q_proj", 2)),
                                        alpha_pattern={"re:.*/v_proj": 3}))


@pytest.mark.parametrize("field, value, message", [
    ("rank_pattern", {"q": 0}, r"LoraConfig.rank_pattern\['q'\] must be a positive int, got 0"),
    ("rank_pattern", {"q": 2.0}, r"LoraConfig.rank_pattern\['q'\] must be a positive int, got 2.0"),
    ("alpha_pattern", {"q": -1}, r"LoraConfig.alpha_pattern\['q'\] must be a positive finite number, got -1"),
    ("rank_pattern", {"re:(": 2}, r"LoraConfig.rank_pattern: invalid regex 're:\('"),
    ("alpha_pattern", 5, r"LoraConfig.alpha_pattern must be a mapping or a sequence of \(pattern, value\) pairs"),
])
def test_invalid_patterns_name_the_entry(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})
