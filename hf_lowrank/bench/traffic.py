"""Spectron's communication under FSDP2: an analytic model of the bytes per step, and a counter of what the
sharded step (``hf_lowrank.optim.sharded``) actually all-reduces and redistributes. docs/distributed.md shows both;
``python scripts/bench.py --traffic_report`` prints its table, and tests/test_distributed.py checks that the
counted bytes of a steady step equal the model's.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..optim.sharded import COMM_OBSERVERS
from ..presets import preset_config

# ----------------------------------------------------------------------------------------------- traffic counting


@dataclass
class CommTraffic:
    """Bytes Spectron moved while counting: payloads of its all-reduces, and global sizes of the tensors it had to
    redistribute (factors not sharded along their long dimension, and their gradients)."""

    all_reduce_bytes: int = 0
    all_reduce_calls: int = 0
    redistributed_bytes: int = 0

    def add(self, all_reduce_bytes: int = 0, calls: int = 0, redistributed_bytes: int = 0) -> None:
        self.all_reduce_bytes += all_reduce_bytes
        self.all_reduce_calls += calls
        self.redistributed_bytes += redistributed_bytes


@contextmanager
def count_traffic() -> Iterator[CommTraffic]:
    """``with count_traffic() as traffic: optimizer.step()`` fills ``traffic`` with what that code communicated."""
    traffic = CommTraffic()
    observer = traffic.add
    COMM_OBSERVERS.append(observer)
    try:
        yield traffic
    finally:
        COMM_OBSERVERS.remove(observer)


# ------------------------------------------------------------------------------------------------ analytic traffic


@dataclass(frozen=True)
class TrafficEstimate:
    """Bytes per optimizer step (float32 payloads): Spectron's all-reduces on long-dimension shards vs an
    all-gather of every factor whole, summed over the model's factor pairs."""

    sharded_bytes: int
    gather_bytes: int
    pairs: int

    @property
    def ratio(self) -> float:
        """How many times fewer bytes the sharded step moves than gathering every factor."""
        return self.gather_bytes / self.sharded_bytes


def pair_traffic(in_features: int, out_features: int, rank: int, ns_steps: int = 5, power_iters: int = 1):
    """``(sharded, gathered)`` float32 elements per step of one factor pair.

    Sharded, per factor: ``max(ns_steps, 1)`` packed Grams of r(r+1)/2 (the first also gives the Frobenius norm)
    and, per power-iteration round, one r-vector and two scalars. Gathered: out×r + r×in.
    """
    grams = max(ns_steps, 1) * rank * (rank + 1) // 2
    power = power_iters * (rank + 2)
    return 2 * (grams + power), rank * (in_features + out_features)


def spectron_traffic(config, ns_steps: int = 5, power_iters: int = 1, bytes_per_element: int = 4) -> TrafficEstimate:
    """Steady-state traffic of one Spectron step for a ``LowRankLlamaConfig`` (the first step runs
    ``first_power_iters`` rounds, a few hundred bytes more per pair)."""
    sharded = gathered = pairs = 0
    for name, (in_features, out_features) in config.projection_shapes().items():
        rank = config.rank_for(name)
        if rank is None:
            continue
        s, g = pair_traffic(in_features, out_features, rank, ns_steps, power_iters)
        sharded += s * config.num_hidden_layers
        gathered += g * config.num_hidden_layers
        pairs += config.num_hidden_layers
    return TrafficEstimate(sharded * bytes_per_element, gathered * bytes_per_element, pairs)


def traffic_report(presets=("tiny", "130m", "1b")) -> str:
    """The markdown table of docs/distributed.md (``python scripts/bench.py --traffic_report``)."""
    rows = [
        "| preset | factor pairs | Spectron all-reduce / step | all-gather of every factor / step | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in presets:
        t = spectron_traffic(preset_config(name))
        rows.append(
            f"| {name} | {t.pairs} | {t.sharded_bytes / 2**20:.3f} MiB | {t.gather_bytes / 2**20:.3f} MiB | "
            f"{t.ratio:.2f}x |"
        )
    return "\n".join(rows)
