"""LowRankLlamaConfig: ranks, validation (R14), presets and parameter accounting."""

import math

import pytest
import torch

from hf_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaConfig, LowRankLlamaForCausalLM, count_parameters, preset_config
from hf_lowrank.presets import PRESETS, dense_counterpart, parameter_table

# (overrides, fragment of the expected message): each an impossible config a user could write.
INVALID = [
    (dict(rank_ratio=0.0), "`rank_ratio` must be in (0, 1)"),
    (dict(rank_ratio=1.0), "`rank_ratio` must be in (0, 1)"),
    (dict(rank=0), "`rank` must be a positive integer"),
    (dict(rank=-3), "`rank` must be a positive integer"),
    (dict(rank=32), "must be smaller than min(in, out)"),  # k_proj of tiny is 64 -> 32
    (dict(hidden_size=64, num_attention_heads=5), "not divisible by `num_attention_heads`"),
    (dict(num_key_value_heads=3), "multiple of `num_key_value_heads`"),
    (dict(lowrank_modules=["q_proj", "qkv"]), "Unknown `lowrank_modules`"),
    (dict(lowrank_modules=["q_proj", "q_proj"]), "lists a projection twice"),
    (dict(lowrank_init="xavier"), "Unknown `lowrank_init`"),
    (dict(rank_overrides={"lm_head": 4}), "`rank_overrides` names"),
    (dict(lowrank_modules=["q_proj"], rank_overrides={"down_proj": 4}), "`rank_overrides` names"),
    (dict(rank_overrides={"down_proj": 64}), "The rank of `down_proj` (64)"),
    (dict(num_hidden_layers=0), "`num_hidden_layers` must be a positive integer"),
    (dict(vocab_size=-1), "`vocab_size` must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[m for _, m in INVALID])
def test_impossible_configs_are_refused(overrides, message):
    with pytest.raises(ValueError) as error:
        preset_config("tiny", **overrides)
    assert message in str(error.value)


def test_rank_formula_and_overrides():
    config = preset_config("60m")
    for name, (fan_in, fan_out) in config.projection_shapes().items():
        assert config.rank_for(name) == max(1, math.floor(0.25 * min(fan_in, fan_out)))
    config = preset_config("tiny", rank=4, rank_overrides={"down_proj": 8}, lowrank_modules=["q_proj", "down_proj"])
    assert config.rank_for("q_proj") == 4
    assert config.rank_for("down_proj") == 8
    assert config.rank_for("k_proj") is None


def test_round_trip_through_json(tmp_path):
    config = preset_config("tiny", rank_overrides={"up_proj": 12}, lowrank_init="normal", tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    loaded = LowRankLlamaConfig.from_pretrained(tmp_path)
    for field in ("rank_ratio", "rank_overrides", "lowrank_modules", "lowrank_init", "tie_word_embeddings", "head_dim"):
        assert getattr(loaded, field) == getattr(config, field), field


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_match_formula(preset):
    count = count_parameters(preset_config(preset))
    dense = count_parameters(dense_counterpart(preset_config(preset)))
    assert dense.total == count.dense_total
    assert count.total < count.dense_total
    # rank = 1/4 of min(in, out): every projection keeps between 1/4 and 1/2 of its dense size
    assert 0.25 < count.projections / count.dense_projections <= 0.5
    if preset in ("tiny", "small"):  # small enough to build here: the formula must be exact
        for config, expected in (
            (preset_config(preset), count.total),
            (dense_counterpart(preset_config(preset)), dense.total),
        ):
            model = LowRankLlamaForCausalLM(config)
            assert sum(p.numel() for p in model.parameters()) == expected


def test_research_preset_shapes():
    expected = {
        "60m": (512, 8, 8, 1376),
        "130m": (768, 12, 12, 2048),
        "350m": (1024, 24, 16, 2736),
        "1b": (2048, 24, 32, 5461),
    }
    for name, (hidden, layers, heads, intermediate) in expected.items():
        c = preset_config(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
            hidden,
            layers,
            heads,
            intermediate,
        )
        assert (c.vocab_size, c.max_position_embeddings) == (32000, 256)
    assert "| 1b |" in parameter_table()


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        preset_config("huge")


def test_dense_baseline_is_same_code(tiny_config):
    dense = LowRankLlamaForCausalLM(dense_counterpart(tiny_config))
    names = {n for n, _ in dense.named_modules()}
    assert "model.layers.0.self_attn.q_proj" in names
    assert all(not isinstance(m, torch.nn.Module) or type(m).__name__ != "LowRankLinear" for m in dense.modules())
    assert set(LOWRANK_PROJECTIONS) == set(tiny_config.lowrank_modules)
