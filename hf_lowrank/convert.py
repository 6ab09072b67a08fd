"""Dense ⇄ low-rank conversion of LLaMA-style models, and `hf-lowrank convert`.

``from_dense`` factorizes every chosen projection of a stock ``LlamaForCausalLM`` by truncated SVD (the best
rank-r approximation, Eckart–Young) and copies everything else exactly; ``to_dense`` multiplies the factors back
out into a stock ``LlamaForCausalLM`` that loads with plain transformers (``model_type: "llama"``).
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from .cli_support import CommandParser
from .configuration_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaConfig
from .files import TOKENIZER_FILES, write_text_atomic
from .loading import load_causal_lm
from .modeling_lowrank import LowRankLinear, LowRankLlamaForCausalLM

REPORT_NAME = "conversion_report.json"
# Llama config fields that mean the same thing in LowRankLlamaConfig and are copied as they are.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)


# ---------------------------------------------------------------------------------------------- configs
def lowrank_config_from_llama(
    config: LlamaConfig,
    rank_ratio: float = 0.25,
    rank: int | None = None,
    lowrank_modules: list[str] | tuple[str, ...] | None = None,
    rank_overrides: dict[str, int] | None = None,
) -> LowRankLlamaConfig:
    """The ``LowRankLlamaConfig`` of the same architecture; ``ValueError`` for what it cannot represent."""
    if config.model_type != "llama":
        raise ValueError(
            f"Expected a Llama model (config model_type 'llama'), got {config.model_type!r}; only LLaMA-architecture "
            "checkpoints can be factorized into a LowRankLlamaForCausalLM."
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"The source uses RoPE scaling {rope_type!r} ({rope}); the low-rank model implements plain RoPE only "
            "(rope_type 'default'). Convert a checkpoint without rope scaling."
        )
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(
            f"`pretraining_tp` = {config.pretraining_tp}: sliced tensor-parallel projections are not supported; "
            "set it to 1 in the source config."
        )
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope_theta is None:
        raise ValueError("The source config has no `rope_theta` (in `rope_parameters`); cannot carry RoPE over.")
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    return LowRankLlamaConfig(
        **fields,
        rope_theta=float(rope_theta),
        rank_ratio=rank_ratio,
        rank=rank,
        rank_overrides=rank_overrides,
        lowrank_modules=lowrank_modules,
        dtype=config.dtype,
    )


def llama_config_from_lowrank(config: LowRankLlamaConfig) -> LlamaConfig:
    """The stock ``LlamaConfig`` of the same architecture (every projection dense)."""
    fields = {name: getattr(config, name) for name in SHARED_FIELDS}
    return LlamaConfig(
        **fields,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        dtype=config.dtype,
    )


# ---------------------------------------------------------------------------------------------- weights
@torch.no_grad()
def reconstruction_errors(weight: torch.Tensor, approximation: torch.Tensor) -> dict[str, float]:
    """Relative errors of ``approximation`` to ``weight`` (both (out, in)), measured in float32.

    ``relative_frobenius_error`` = ‖W − Ŵ‖_F / ‖W‖_F and ``relative_spectral_error`` = ‖W − Ŵ‖₂ / ‖W‖₂; for the
    truncated SVD these are sqrt(Σ_{i>r} σᵢ²) / sqrt(Σ σᵢ²) and σ_{r+1} / σ₁.
    """
    weight, residual = weight.float(), weight.float() - approximation.float()
    return {
        "relative_frobenius_error": float(residual.norm() / weight.norm()),
        "relative_spectral_error": float(
            torch.linalg.matrix_norm(residual, ord=2) / torch.linalg.matrix_norm(weight, ord=2)
        ),
    }


def _owned_by_lowrank(name: str, lowrank_names: set[str]) -> bool:
    return name.rpartition(".")[0].rpartition(".")[0] in lowrank_names


@torch.no_grad()
def from_dense(
    llama_model_or_path: PreTrainedModel | str | Path,
    rank_ratio: float = 0.25,
    rank: int | None = None,
    lowrank_modules: list[str] | tuple[str, ...] | None = None,
    rank_overrides: dict[str, int] | None = None,
) -> tuple[LowRankLlamaForCausalLM, dict]:
    """Factorize a ``LlamaForCausalLM`` into a ``LowRankLlamaForCausalLM`` by truncated SVD.

    Each projection in ``lowrank_modules`` (default: all seven) becomes the best rank-r approximation of its
    weight, r from ``rank_overrides`` / ``rank`` / ``rank_ratio`` as in ``LowRankLlamaConfig``; embeddings, norms,
    LM head, biases and projections left dense are copied bit for bit. Returns the model (in eval mode, in the
    source's dtype and device) and a report of the per-layer relative reconstruction errors.
    """
    source = llama_model_or_path
    if not isinstance(source, PreTrainedModel):
        source = load_model(source, expect="llama")
    config = lowrank_config_from_llama(source.config, rank_ratio, rank, lowrank_modules, rank_overrides)
    model = _empty_like(LowRankLlamaForCausalLM, config, source)

    errors: dict[str, dict] = {}
    lowrank_names = {name for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
    for name in sorted(lowrank_names):
        target, dense = model.get_submodule(name), source.get_submodule(name)
        target.set_from_dense(dense.weight)
        if dense.bias is not None:
            target.up.bias.copy_(dense.bias)
        errors[name] = {
            "shape": list(dense.weight.shape),
            "rank": target.rank,
            **reconstruction_errors(dense.weight, target.merged_weight()),
        }
    _copy_remaining(source, model, skip=lambda n: _owned_by_lowrank(n, lowrank_names))
    consumed = {f"{name}.{p}" for name in lowrank_names for p in ("weight", "bias")}
    unused = set(dict(source.named_parameters(remove_duplicate=False))) - consumed - _names(model)
    assert not unused, f"source parameters with no counterpart: {sorted(unused)}"
    return model, build_report(config, errors, source_parameters=_count(source), target_parameters=_count(model))


@torch.no_grad()
def to_dense(lowrank_model_or_path: PreTrainedModel | str | Path) -> LlamaForCausalLM:
    """Multiply every factor pair back out (``up.weight @ down.weight``) into a stock ``LlamaForCausalLM``.

    The result computes the same function (logits equal up to float rounding) and loads anywhere with plain
    transformers. Returned in eval mode, in the source's dtype and device.
    """
    source = lowrank_model_or_path
    if not isinstance(source, PreTrainedModel):
        source = load_model(source, expect="lowrank_llama")
    if not isinstance(source, LowRankLlamaForCausalLM):
        raise ValueError(f"Expected a LowRankLlamaForCausalLM, got {type(source).__name__}.")
    model = _empty_like(LlamaForCausalLM, llama_config_from_lowrank(source.config), source)

    lowrank_names = {name for name, module in source.named_modules() if isinstance(module, LowRankLinear)}
    for name in lowrank_names:
        factors, dense = source.get_submodule(name), model.get_submodule(name)
        dense.weight.copy_(factors.merged_weight())
        if factors.up.bias is not None:
            dense.bias.copy_(factors.up.bias)
    _copy_remaining(source, model, skip=lambda n: n.rpartition(".")[0] in lowrank_names)
    return model


def _empty_like(model_class, config, source: PreTrainedModel) -> PreTrainedModel:
    """An uninitialized ``model_class(config)`` on the source's device and dtype, tied like the config says."""
    weight = source.get_input_embeddings().weight
    # Every tensor is overwritten by the caller; the spectral init alone would cost one SVD per matrix. Built
    # directly in the source's dtype, so a bf16 checkpoint never exists in float32.
    with no_init_weights():
        model = model_class._from_config(config, dtype=weight.dtype)
    model.to(device=weight.device).eval()
    model.tie_weights()  # `no_init_weights` also skips the tying that `post_init` would do
    model.generation_config = copy.deepcopy(source.generation_config)
    return model


def _copy_remaining(source: nn.Module, target: nn.Module, skip) -> None:
    """Copy every parameter of ``target`` not excluded by ``skip(name)`` from the same name in ``source``."""
    source_params = dict(source.named_parameters(remove_duplicate=False))
    for name, param in target.named_parameters(remove_duplicate=False):
        if skip(name):
            continue
        if name not in source_params or source_params[name].shape != param.shape:
            raise ValueError(f"Cannot map `{name}` {tuple(param.shape)} from the source model.")
        param.copy_(source_params[name])


def _names(model: nn.Module) -> set[str]:
    return set(dict(model.named_parameters(remove_duplicate=False)))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


# ---------------------------------------------------------------------------------------------- report
def build_report(config: LowRankLlamaConfig, errors: dict[str, dict], source_parameters: int, target_parameters: int):
    """``{"layers": [{"layer": i, "projections": {proj: errors}}], "summary": {...}, ...}``, JSON-ready."""
    layers = []
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        projections = {
            name.rpartition(".")[2]: stats for name, stats in sorted(errors.items()) if name.startswith(prefix)
        }
        order = {proj: i for i, proj in enumerate(LOWRANK_PROJECTIONS)}
        layers.append({"layer": index, "projections": dict(sorted(projections.items(), key=lambda kv: order[kv[0]]))})
    summary = {}
    for key in ("relative_frobenius_error", "relative_spectral_error"):
        values = {name: stats[key] for name, stats in errors.items()}
        worst = max(values, key=values.get) if values else None
        summary[key] = {
            "mean": sum(values.values()) / len(values) if values else 0.0,
            "max": values[worst] if values else 0.0,
            "argmax": worst,
        }
    return {
        "direction": "dense_to_lowrank",
        "rank_ratio": config.rank_ratio,
        "rank": config.rank,
        "rank_overrides": config.rank_overrides,
        "lowrank_modules": config.lowrank_modules,
        "ranks": {proj: config.rank_for(proj) for proj in config.lowrank_modules},
        "parameters": {
            "source": source_parameters,
            "converted": target_parameters,
            "ratio": target_parameters / source_parameters,
        },
        "layers": layers,
        "summary": summary,
    }


def format_report(report: dict) -> str:
    """A per-layer table of ``frobenius / spectral`` relative errors, one column per factorized projection."""
    projections = report["lowrank_modules"]
    header = ["layer", *(f"{p} (r={report['ranks'][p]})" for p in projections)]
    rows = [
        [str(layer["layer"])]
        + [
            f"{layer['projections'][p]['relative_frobenius_error']:.4f} / "
            f"{layer['projections'][p]['relative_spectral_error']:.4f}"
            for p in projections
        ]
        for layer in report["layers"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["relative reconstruction error ‖W − up·down‖ / ‖W‖ (Frobenius / spectral):"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    for key, label in (("relative_frobenius_error", "Frobenius"), ("relative_spectral_error", "spectral")):
        stats = report["summary"][key]
        lines.append(f"{label}: mean {stats['mean']:.4f}, max {stats['max']:.4f} ({stats['argmax']})")
    params = report["parameters"]
    lines.append(f"parameters: {params['source']:,} -> {params['converted']:,} ({params['ratio']:.1%})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- loading
def load_model(source: str | Path, expect: str) -> PreTrainedModel:
    """``from_pretrained`` a local folder or Hub id after checking its config's model_type is ``expect``; only
    safetensors weights that fit the config are read (`load_causal_lm`)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load a model config from {str(source)!r}: not an existing folder with a config.json, "
            f"nor a Hub model id that can be resolved (offline?). ({error})"
        ) from None
    if config.model_type != expect:
        wanted = {"llama": "a Llama model", "lowrank_llama": "a low-rank model (model_type 'lowrank_llama')"}
        raise ValueError(f"{str(source)!r} is not {wanted[expect]}: its config has model_type {config.model_type!r}.")
    return load_causal_lm(source, "converted", config=config).eval()


def load_tokenizer(source: str | Path):
    """The tokenizer saved with ``source``, or ``None`` when it has none."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        print(f"warning: no usable tokenizer in {source} ({str(error).splitlines()[0]}); none copied.", file=sys.stderr)
        return None


def check_destination(destination: Path, overwrite: bool) -> None:
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"Destination {destination} exists and is not a folder.")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ValueError(
            f"Destination {destination} exists and is not empty; choose another folder or pass --overwrite "
            "(files are written over, nothing else is deleted)."
        )


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="hf-lowrank convert",
        description="Convert a Llama checkpoint to a low-rank one (truncated SVD) or a low-rank one back to Llama.",
        usage="hf-lowrank convert (--from_dense | --to_dense) SRC DST [options]",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from_dense",
        dest="direction",
        action="store_const",
        const="from_dense",
        help="SRC is a LlamaForCausalLM; write a LowRankLlamaForCausalLM.",
    )
    direction.add_argument(
        "--to_dense",
        dest="direction",
        action="store_const",
        const="to_dense",
        help="SRC is a LowRankLlamaForCausalLM; write a stock LlamaForCausalLM.",
    )
    parser.add_argument("source", metavar="SRC", help="Local folder or Hub model id.")
    parser.add_argument("destination", metavar="DST", type=Path, help="Output folder (created).")
    parser.add_argument("--rank_ratio", type=float, default=0.25, help="Rank as a fraction of min(in, out).")
    parser.add_argument("--rank", type=int, default=None, help="Absolute rank of every projection (overrides ratio).")
    parser.add_argument(
        "--lowrank_modules",
        default=None,
        help=f"Comma-separated projections to factorize (default: all of {','.join(LOWRANK_PROJECTIONS)}).",
    )
    parser.add_argument(
        "--eval_files",
        nargs="+",
        type=Path,
        default=None,
        help="Held-out .txt/.json/.jsonl files: report perplexity before and after conversion.",
    )
    parser.add_argument("--max_length", type=int, default=None, help="Perplexity window (default: model context).")
    parser.add_argument("--stride", type=int, default=None, help="Perplexity stride (default: max_length // 2).")
    parser.add_argument("--max_tokens", type=int, default=None, help="Evaluate at most this many tokens.")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty DST.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`hf-lowrank convert`; a bad argument or input raises `ValueError` (reported by `hf_lowrank.cli.main`)."""
    args = build_parser().parse_args(argv)
    destination = args.destination
    if Path(args.source).resolve() == destination.resolve():
        raise ValueError("SRC and DST are the same folder; write the converted model elsewhere.")
    check_destination(destination, args.overwrite)
    source = load_model(args.source, expect="llama" if args.direction == "from_dense" else "lowrank_llama")
    tokenizer = load_tokenizer(args.source)
    texts = None
    if args.eval_files:  # read and check them before the conversion, which may take a while
        from .evaluation import load_eval_texts

        if tokenizer is None:
            raise ValueError(f"--eval_files needs a tokenizer, and {args.source} has none.")
        texts = list(load_eval_texts(files=args.eval_files)[0])

    if args.direction == "from_dense":
        modules = None if args.lowrank_modules is None else [m.strip() for m in args.lowrank_modules.split(",")]
        model, report = from_dense(source, rank_ratio=args.rank_ratio, rank=args.rank, lowrank_modules=modules)
        print(format_report(report))
    else:
        model = to_dense(source)
        params = _count(source), _count(model)
        report = {
            "direction": "lowrank_to_dense",
            "parameters": {"source": params[0], "converted": params[1], "ratio": params[1] / params[0]},
            "note": "factors multiplied out exactly (up to float rounding); no approximation",
        }
        print(f"merged factors: parameters {params[0]:,} -> {params[1]:,}")
    report["source"] = str(args.source)
    if texts is not None:
        report["perplexity"] = _compare_perplexity(source, model, tokenizer, texts, args)

    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    if tokenizer is not None:
        tokenizer.save_pretrained(destination)
    write_text_atomic(destination / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    print(f"saved {type(model).__name__} to {destination}" + (" with its tokenizer" if tokenizer else ""))
    return 0


def _compare_perplexity(source, converted, tokenizer, texts: list[str], args) -> dict:
    from .evaluation import evaluate_perplexity

    options = dict(max_length=args.max_length, stride=args.stride, max_tokens=args.max_tokens)
    before = evaluate_perplexity(source, tokenizer, texts, **options)
    after = evaluate_perplexity(converted, tokenizer, texts, **options)
    print(
        f"held-out perplexity ({before['tokens']:,} tokens, max_length {before['max_length']}, stride "
        f"{before['stride']}): before {before['perplexity']:.4f}, after {after['perplexity']:.4f} "
        f"(loss {before['loss']:.4f} -> {after['loss']:.4f}, Δ {after['loss'] - before['loss']:+.4f})"
    )
    keys = ("perplexity", "loss", "tokens", "max_length", "stride")
    return {
        "files": [str(f) for f in args.eval_files],
        "before": {k: before[k] for k in keys},
        "after": {k: after[k] for k in keys},
        "loss_increase": after["loss"] - before["loss"],
        "perplexity_ratio": math.exp(after["loss"] - before["loss"]),
    }


__all__ = [
    "from_dense",
    "to_dense",
    "lowrank_config_from_llama",
    "llama_config_from_lowrank",
    "reconstruction_errors",
    "format_report",
    "main",
]
