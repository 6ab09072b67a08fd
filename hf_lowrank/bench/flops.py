"""Model FLOPs per token and the FLOP-ideal speedup of a factorized model over its dense counterpart.

Conventions (stated once, used everywhere in the benchmark):

* a matmul of (m × k) by (k × n) costs 2·m·k·n flops; elementwise work, norms, softmax and the embedding lookup
  count zero (they cost time, not flops, and are the same in both models);
* per token and layer, every projection costs twice its weight parameters (``LowRankLlamaConfig.projection_parameters``
  without bias): ``2·in·out`` if dense and ``2·r·(in + out)`` if factorized; the LM head ``2·hidden·vocab``, and attention ``4·ctx·heads·head_dim`` (QKᵀ and AV over ``ctx`` keys);
* training costs 3× the forward pass (backward = 2× forward), the optimizer is not counted;
* a causal model attends on average to ``(T + 1)/2`` keys per token of a length-T sequence (what a causal kernel
  computes; PaLM's ``6N + 12·L·d·T`` counts T, which raises both models equally and lowers the ideal by ~1%).
"""

from ..configuration_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaConfig


def projection_flops(config: LowRankLlamaConfig) -> int:
    """Forward flops per token of all projections of all layers (factorized or dense, as ``config`` says)."""
    per_layer = sum(2 * config.projection_parameters(name, bias=False) for name in LOWRANK_PROJECTIONS)
    return per_layer * config.num_hidden_layers


def forward_flops_per_token(config: LowRankLlamaConfig, context: float) -> float:
    """Forward flops of one token that attends to ``context`` keys: projections + LM head + attention."""
    head = 2 * config.hidden_size * config.vocab_size
    attention = 4 * context * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    return projection_flops(config) + head + attention


def training_flops_per_token(config: LowRankLlamaConfig, seq_len: int) -> float:
    """Forward + backward flops per token of causal training on sequences of ``seq_len`` tokens."""
    return 3 * forward_flops_per_token(config, (seq_len + 1) / 2)


def generation_flops_per_token(config: LowRankLlamaConfig, prompt_len: int, new_tokens: int) -> float:
    """Forward flops per generated token with a KV cache, averaged over ``new_tokens`` steps after the prompt."""
    return forward_flops_per_token(config, prompt_len + (new_tokens + 1) / 2)


def ideal_speedup(dense_flops: float, factorized_flops: float) -> float:
    """How much faster the factorized model would be if time were proportional to flops."""
    return dense_flops / factorized_flops
