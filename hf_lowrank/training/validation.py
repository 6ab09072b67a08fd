"""Checks of a pretraining run's inputs that need more than one argument class: the config overrides' names and
the memory a config needs (R26). They run before anything is built, allocated or written.

Single-argument checks (a NaN learning rate, ``--block_size 1``, an empty sample prompt) live in the argument
dataclasses' ``__post_init__``; a config's own impossible values in :class:`LowRankLlamaConfig`; checks that need
the packed data (a validation split smaller than one batch) in :meth:`LowRankTrainer.train`.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from ..configuration_lowrank import LowRankLlamaConfig
from ..presets import count_parameters
from .data import resolve_block_size

# Bytes per parameter while training in float32: the weight, its gradient, and two float32 optimizer buffers
# (AdamW's moments; Spectron's momentum plus the AdamW moments of embeddings and norms are no more).
TRAIN_BYTES_PER_PARAMETER = 16
FLOAT_BYTES = 4


def config_keys() -> frozenset[str]:
    """Names `--config_overrides` may set: the config's own arguments and `PretrainedConfig`'s public fields."""
    own = set(inspect.signature(LowRankLlamaConfig.__init__).parameters) - {"self", "kwargs"}
    common = {key for key in PretrainedConfig().to_dict() if not key.startswith("_")}
    return frozenset(own | common | {"partial_rotary_factor"})  # moved into rope_parameters by the config


def check_config_keys(overrides: dict) -> None:
    """Refuse a `--config_overrides` key the config does not have (a typo would otherwise be stored and ignored)."""
    known = config_keys()
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"--config_overrides sets {key!r}, which is not a field of the model config, so it would be ignored."
                f"{hint} Fields: {', '.join(sorted(known))}."
            )


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower estimate of the memory one training process needs, in bytes."""

    parameters: int
    state_bytes: int  # weights, gradients, optimizer state
    activation_bytes: int  # saved activations and logits of one micro-batch

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def estimate_training_memory(config: LowRankLlamaConfig, micro_batch: int, block_size: int) -> MemoryEstimate:
    """Memory to train ``config`` on micro-batches of ``micro_batch`` x ``block_size`` tokens, from the config alone.

    Deliberately an underestimate (float32, no allocator slack, only the largest saved tensors): a refusal based
    on it is certain, never a false alarm. Per layer and token the backward pass keeps at least the normed inputs
    and outputs of attention and MLP (~8 x hidden) and the MLP's three intermediate activations (3 x intermediate);
    the logits and their gradient add 2 x vocab per token.
    """
    parameters = count_parameters(config).total
    tokens = micro_batch * block_size
    per_token = config.num_hidden_layers * (8 * config.hidden_size + 3 * config.intermediate_size)
    per_token += 2 * config.vocab_size
    return MemoryEstimate(parameters, parameters * TRAIN_BYTES_PER_PARAMETER, tokens * per_token * FLOAT_BYTES)


def available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (host: MemAvailable), or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_memory(config: LowRankLlamaConfig, micro_batch: int, block_size: int, device: torch.device) -> None:
    """Refuse a config whose training cannot fit in the free memory of ``device`` (R26), with the estimate."""
    estimate = estimate_training_memory(config, micro_batch, block_size)
    free = available_memory(device)
    host_free = free if device.type == "cpu" else available_memory(torch.device("cpu"))
    # The model is built on the host first, whatever the device: its float32 weights must fit there too.
    checks = [(estimate.total, free, str(device))]
    if device.type != "cpu":
        checks.append((estimate.parameters * FLOAT_BYTES, host_free, "the host (where the model is built)"))
    for needed, have, where in checks:
        if have is not None and needed > have:
            raise ValueError(
                f"This model cannot be trained here: it needs at least {_gib(needed)} on {where}, which has "
                f"{_gib(have)} free. Estimate: {estimate.parameters:,} parameters x {TRAIN_BYTES_PER_PARAMETER} bytes "
                f"(weights, gradients, optimizer state) = {_gib(estimate.state_bytes)}, plus "
                f"{_gib(estimate.activation_bytes)} of activations for a micro-batch of {micro_batch} x {block_size} "
                f"tokens (num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}). Choose a smaller "
                "--preset or lower these in --config_overrides, or lower --per_device_train_batch_size/--block_size."
            )


def check_inputs(config: LowRankLlamaConfig, data_args, training_args) -> None:
    """Checks of a pretraining run that combine the model config with the data and training arguments; they run
    before the output folder is created, the tokenizer trained or the model built."""
    block_size = resolve_block_size(data_args, config)
    if data_args.tokenizer_name is None and data_args.tokenizer_vocab_size is not None:
        if data_args.tokenizer_vocab_size > config.vocab_size:
            raise ValueError(
                f"--tokenizer_vocab_size {data_args.tokenizer_vocab_size} exceeds the model's vocab_size "
                f"{config.vocab_size}: ids past {config.vocab_size - 1} would have no embedding. Lower "
                "--tokenizer_vocab_size, or raise vocab_size with --config_overrides."
            )
    check_memory(config, training_args.per_device_train_batch_size, block_size, training_args.device)


__all__ = [
    "MemoryEstimate",
    "available_memory",
    "check_config_keys",
    "check_inputs",
    "check_memory",
    "config_keys",
    "estimate_training_memory",
]
