"""Optimizers for factorized models, in layers that import only downward:

- ``functional``: Spectron's maths as pure functions (Newton–Schulz, power iteration, the pair update, AdamW,
  rebalancing), and ``hyperparameters``: every hyperparameter once, with its units and validation;
- ``batched``: the fast path, all pairs of one rank at once; ``sharded``: the pair on FSDP2 local shards;
- ``spectron``: the thin ``torch.optim.Optimizer`` and the one group-step driver of local and sharded pairs;
- ``routing``: which parameter of a model goes to which group.

Reference, batched and sharded paths are tied by parity tests. Spectron's communication cost model and counter are
benchmarks: ``hf_lowrank.bench.traffic``.
"""

from .functional import (
    NS_COEFFICIENTS,
    PairView,
    adamw_update,
    gram,
    init_adamw_state,
    init_muon_state,
    init_power_vectors,
    init_spectron_state,
    muon_update,
    newton_schulz,
    power_iteration,
    rebalance_pair,
    spectral_norm,
    spectral_normalize,
    spectron_pair_update,
)
from .hyperparameters import ADAMW_DEFAULTS, AdamWHyperparameters, SpectronHyperparameters
from .routing import (
    DEFAULT_ADAMW_LR,
    OPTIMIZER_NAMES,
    assert_partition,
    build_optimizer,
    lowrank_pairs,
    routing_table,
)
from .spectron import Spectron, init_optimizer_state

__all__ = [
    "ADAMW_DEFAULTS",
    "AdamWHyperparameters",
    "DEFAULT_ADAMW_LR",
    "NS_COEFFICIENTS",
    "OPTIMIZER_NAMES",
    "PairView",
    "Spectron",
    "SpectronHyperparameters",
    "adamw_update",
    "assert_partition",
    "build_optimizer",
    "gram",
    "init_adamw_state",
    "init_muon_state",
    "init_optimizer_state",
    "init_power_vectors",
    "init_spectron_state",
    "lowrank_pairs",
    "muon_update",
    "newton_schulz",
    "power_iteration",
    "rebalance_pair",
    "routing_table",
    "spectral_norm",
    "spectral_normalize",
    "spectron_pair_update",
]
