"""Benchmarks of the factorized model against its dense counterpart: training throughput vs the FLOP ideal,
Spectron vs AdamW, training memory and generation speed (``scripts/bench.py``, docs/benchmarks.md), the GPU
check (``scripts/gpu_check.py``), and Spectron's FSDP2 traffic, modelled and counted (``traffic.py``,
``scripts/bench.py --traffic_report``, docs/distributed.md).

Timing on a shared CPU: run with ``OMP_WAIT_POLICY=PASSIVE`` (``scripts/bench.py`` sets it unless it is set). With
OpenMP's default spin-waiting, threads of a process that shares its cores with others burn their time slices
waiting at every kernel's barrier, and a factorized model, with twice as many (thinner) matmuls, loses more to
that than it saves: measured 0.98x dense instead of 1.9x (docs/benchmarks.md).
"""

from .flops import forward_flops_per_token, generation_flops_per_token, ideal_speedup, training_flops_per_token
from .report import TARGETS, evaluate_targets, markdown
from .suite import DEFAULT_SHAPES, BenchShape

__all__ = [
    "DEFAULT_SHAPES",
    "TARGETS",
    "BenchShape",
    "evaluate_targets",
    "forward_flops_per_token",
    "generation_flops_per_token",
    "ideal_speedup",
    "markdown",
    "training_flops_per_token",
]
