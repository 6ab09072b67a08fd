"""Optimizers for factorized models: Spectron (pure functions + a thin optimizer), parameter routing, and
Spectron's sharded (FSDP2) step with its traffic accounting."""

from .distributed import (
    CommTraffic,
    TrafficEstimate,
    count_traffic,
    init_optimizer_state,
    spectron_traffic,
)
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
    "CommTraffic",
    "DEFAULT_ADAMW_LR",
    "NS_COEFFICIENTS",
    "OPTIMIZER_NAMES",
    "Spectron",
    "TrafficEstimate",
    "adamw_update",
    "assert_partition",
    "build_optimizer",
    "count_traffic",
    "gram",
    "init_optimizer_state",
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
    "spectron_traffic",
]
