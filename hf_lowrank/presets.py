"""Model presets (data, not code) and their parameter table; the counting itself is the config's
(`count_parameters`, importable from here too)."""

from .cli_support import CommandParser
from .configuration_lowrank import LowRankLlamaConfig, ParameterCount, count_parameters

__all__ = ["PRESETS", "ParameterCount", "count_parameters", "dense_counterpart", "parameter_table", "preset_config"]

# Research shapes of LLaMA-60M/130M/350M/1B as used by GaLore, CoLA and SLTrain (vocab 32000, context 256),
# plus `tiny` for tests and `small` for CPU-sized runs (the default main job).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=4096,
        max_position_embeddings=256,
    ),
    "60m": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        vocab_size=32000,
        max_position_embeddings=256,
    ),
    "130m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=32000,
        max_position_embeddings=256,
    ),
    "350m": dict(
        hidden_size=1024,
        intermediate_size=2736,
        num_hidden_layers=24,
        num_attention_heads=16,
        vocab_size=32000,
        max_position_embeddings=256,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5461,
        num_hidden_layers=24,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=256,
    ),
}


def preset_config(name: str, **overrides) -> LowRankLlamaConfig:
    """The config of preset ``name``; keyword arguments override any field (e.g. ``vocab_size``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
    return LowRankLlamaConfig(**{**PRESETS[name], **overrides})


def dense_counterpart(config: LowRankLlamaConfig) -> LowRankLlamaConfig:
    """The same architecture with every projection dense."""
    return LowRankLlamaConfig(**{**config.to_diff_dict(), "lowrank_modules": [], "rank_overrides": {}})


def parameter_table(names=None) -> str:
    """A markdown table of presets: factorized vs dense parameters."""
    rows = ["| preset | factorized | dense | ratio | non-embedding ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in names or PRESETS:
        count = count_parameters(preset_config(name))
        rows.append(
            f"| {name} | {count.total / 1e6:.2f}M | {count.dense_total / 1e6:.2f}M | {count.compression:.3f} | "
            f"{count.projections / count.dense_projections:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """`hf-lowrank presets`: print the parameter table of every preset."""
    CommandParser(prog="hf-lowrank presets", description=main.__doc__).parse_args(argv)
    print(parameter_table())
    return 0
