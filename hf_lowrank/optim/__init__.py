"""Optimizers for factorized models: Spectron (pure functions + a thin optimizer) and parameter routing."""

from .routing import (
    DEFAULT_ADAMW_LR,
    OPTIMIZER_NAMES,
    assert_partition,
    build_optimizer,
    lowrank_pairs,
    routing_table,
)
from .spectron import (
    NS_COEFFICIENTS,
    Spectron,
    adamw_update,
    gram,
    init_power_vectors,
    init_spectron_state,
    newton_schulz,
    power_iteration,
    rebalance_pair,
    spectral_norm,
    spectral_normalize,
    spectron_pair_update,
)

__all__ = [
    "DEFAULT_ADAMW_LR",
    "NS_COEFFICIENTS",
    "OPTIMIZER_NAMES",
    "Spectron",
    "adamw_update",
    "assert_partition",
    "build_optimizer",
    "gram",
    "init_power_vectors",
    "init_spectron_state",
    "lowrank_pairs",
    "newton_schulz",
    "power_iteration",
    "rebalance_pair",
    "routing_table",
    "spectral_norm",
    "spectral_normalize",
    "spectron_pair_update",
]
