"""Spectron on FSDP2-sharded factors: the math of ``spectron.py`` on local shards, with only r × r Grams and
r-vectors all-reduced, plus a counter of those bytes and the analytic traffic of a model config.

:class:`~hf_lowrank.optim.Spectron` hands every param group that holds a ``DTensor`` to :func:`dtensor_group_step`,
so the same optimizer (built by ``build_optimizer`` before or after ``fully_shard``) runs under FSDP2.

A factor seen as its tall matrix X (long × r) sharded by rows, ``X = [X₁; X₂; …]``, has ``XᵀX = Σₖ XₖᵀXₖ``: the
Newton–Schulz Gram is an all-reduce of the shards' r × r partial Grams (packed to its upper triangle, since it is
symmetric), after which ``X ← aX + X(bS + cS²)`` is local; power iteration reduces one r-vector and two scalars
per round. That is what ``shard_lowrank_model``'s placement (``up.weight`` (out × r) by rows, ``down.weight``
(r × in) by columns) gives. A factor sharded any other way (plain ``fully_shard`` splits ``down.weight`` along r)
is redistributed to its long-dimension sharding for the step and back (all-to-all on NCCL; all-gather and slice
on gloo); its momentum and power vector always live in that sharding, so the state does not depend on the
parameter's placement. AdamW groups are elementwise and run on the local shards.

``python -m hf_lowrank.optim.distributed --traffic-report`` prints the per-step traffic table of docs/distributed.md.
"""

import argparse
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .spectron import (
    Spectron,
    adamw_update,
    init_adamw_state,
    init_power_vectors,
    init_spectron_state,
    rebalance_pair,
    spectron_pair_update,
)

# ----------------------------------------------------------------------------------------------- traffic counting


@dataclass
class CommTraffic:
    """Bytes Spectron moved while counting: payloads of its all-reduces, and global sizes of the tensors it had to
    redistribute (factors not sharded along their long dimension, and their gradients)."""

    all_reduce_bytes: int = 0
    all_reduce_calls: int = 0
    redistributed_bytes: int = 0


_COUNTERS: list[CommTraffic] = []


@contextmanager
def count_traffic() -> Iterator[CommTraffic]:
    """``with count_traffic() as traffic: optimizer.step()`` fills ``traffic`` with what that code communicated."""
    traffic = CommTraffic()
    _COUNTERS.append(traffic)
    try:
        yield traffic
    finally:
        _COUNTERS.remove(traffic)


def _count(all_reduce_bytes: int = 0, calls: int = 0, redistributed_bytes: int = 0) -> None:
    for traffic in _COUNTERS:
        traffic.all_reduce_bytes += all_reduce_bytes
        traffic.all_reduce_calls += calls
        traffic.redistributed_bytes += redistributed_bytes


# ------------------------------------------------------------------------------------------------ sharded reductions


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor); other tensors unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def _long_dim(shape: torch.Size) -> int:
    """The dimension ``spectron._tall`` keeps as rows: 0 unless the matrix is wide."""
    return 1 if shape[0] < shape[1] else 0


def _sharded_mesh_dims(up: DTensor, down: DTensor) -> tuple[bool, ...]:
    """Per mesh dimension, whether the pair is sharded on it (either factor is): the dimensions Spectron reduces
    over. Both factors are then handled sharded along their long dimension on exactly those mesh dimensions."""
    sharded = []
    for mesh_dim, (p_up, p_down) in enumerate(zip(up.placements, down.placements)):
        if p_up.is_partial() or p_down.is_partial():
            raise ValueError(
                f"Spectron: a factor has a Partial placement on mesh dimension {mesh_dim}; shard or replicate it."
            )
        sharded.append(p_up.is_shard() or p_down.is_shard())
    return tuple(sharded)


def _long_dim_placements(weight: DTensor, sharded: tuple[bool, ...]) -> tuple:
    return tuple(Shard(_long_dim(weight.shape)) if s else Replicate() for s in sharded)


def _vector_placements(sharded: tuple[bool, ...]) -> tuple:
    """Placements of the power vector ``u`` (long,): indexed by the tall view's rows, sharded like them."""
    return tuple(Shard(0) if s else Replicate() for s in sharded)


def make_all_reduce(groups: list) -> Callable[[Tensor], Tensor]:
    """In-place sum over ``groups`` (the process groups of the sharded mesh dimensions), counted."""

    def all_reduce(t: Tensor) -> Tensor:
        for group in groups:
            dist.all_reduce(t, group=group)
            _count(all_reduce_bytes=t.numel() * t.element_size(), calls=1)
        return t

    return all_reduce


@functools.lru_cache(maxsize=64)
def _upper_triangle(r: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(r, r, device=device)
    return rows, cols


def make_sharded_gram(all_reduce: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``gram_fn`` for row-sharded tall matrices: ``XᵀX = Σ XₖᵀXₖ``, all-reducing the r(r+1)/2 upper triangle."""

    def gram(x: Tensor) -> Tensor:
        partial = x.mT @ x  # (r, r): this shard's rows only
        rows, cols = _upper_triangle(partial.shape[0], partial.device)
        packed = all_reduce(partial[rows, cols].contiguous())  # (r(r+1)/2,)
        s = torch.empty_like(partial)
        s[rows, cols] = packed
        s[cols, rows] = packed
        return s

    return gram


def _mesh_groups(weight: DTensor, sharded: tuple[bool, ...]) -> list:
    mesh = weight.device_mesh
    return [mesh.get_group(mesh_dim) for mesh_dim, s in enumerate(sharded) if s]


# ------------------------------------------------------------------------------------------------ optimizer state


def init_sharded_spectron_state(weight: DTensor, sharded: tuple[bool, ...] | None = None) -> dict[str, Tensor]:
    """:func:`init_spectron_state` for a DTensor factor: the momentum (float32) and the power vector ``u`` are
    DTensors sharded along the factor's long dimension (whatever the factor's own placement); ``v`` (r,), ``sigma``
    and ``step`` are plain tensors, equal on every rank. ``u`` starts from the same fixed vector as unsharded."""
    sharded = sharded or tuple(p.is_shard() for p in weight.placements)
    mesh = weight.device_mesh
    device = weight.to_local().device
    u, v = init_power_vectors(weight)  # the global shape's vectors, as unsharded
    return {
        "step": torch.tensor(0.0),
        "momentum_buffer": torch.distributed.tensor.zeros(
            weight.shape, dtype=torch.float32, device_mesh=mesh, placements=_long_dim_placements(weight, sharded)
        ),
        "u": distribute_tensor(u.to(device), mesh, _vector_placements(sharded), src_data_rank=None),
        "v": v.to(device),
        "sigma": torch.zeros((), device=device),
    }


def init_optimizer_state(optimizer: Spectron) -> None:
    """Create the state of every parameter now instead of at its first step.

    ``torch.distributed.checkpoint`` needs the state to exist before loading into it; without this,
    ``get_state_dict``/``set_state_dict`` create it by running a step with zero gradients and lr 0. Idempotent.
    """
    for group in optimizer.param_groups:
        params = group["params"]
        if group["algorithm"] == "adamw":
            for param in params:
                if not optimizer.state[param]:
                    optimizer.state[param].update(init_adamw_state(param))
            continue
        up, down = params
        sharded = None
        if isinstance(up, DTensor) or isinstance(down, DTensor):
            _validate_dtensor_pair(up, down, group.get("name", ""))
            sharded = _sharded_mesh_dims(up, down)
        for param in params:
            if not optimizer.state[param]:
                optimizer.state[param].update(
                    init_spectron_state(param) if sharded is None else init_sharded_spectron_state(param, sharded)
                )


# ------------------------------------------------------------------------------------------------ the DTensor step


@contextmanager
def _long_dim_shard(param: DTensor, placements: tuple) -> Iterator[Tensor]:
    """The local shard of ``param`` sharded along its long dimension; in-place changes reach ``param``.

    A no-op view when ``param`` is already sharded that way; otherwise a redistributed copy, written back on exit.
    """
    if tuple(param.placements) == placements:
        yield param.to_local()
        return
    resharded = param.redistribute(param.device_mesh, placements)
    _count(redistributed_bytes=param.numel() * param.element_size())
    yield resharded.to_local()
    param.to_local().copy_(resharded.redistribute(param.device_mesh, param.placements).to_local())
    _count(redistributed_bytes=param.numel() * param.element_size())


def _local_grad(param: DTensor, placements: tuple) -> Tensor | None:
    """The local shard of ``param.grad`` in ``placements`` (redistributed if FSDP left it otherwise)."""
    grad = param.grad
    if grad is None:
        return None
    if tuple(grad.placements) != placements:
        grad = grad.redistribute(grad.device_mesh, placements)
        _count(redistributed_bytes=grad.numel() * grad.element_size())
    return grad.to_local()


def _validate_dtensor_pair(up: Tensor, down: Tensor, name: str) -> None:
    if not (isinstance(up, DTensor) and isinstance(down, DTensor)) or up.device_mesh != down.device_mesh:
        raise ValueError(
            f"Spectron group {name!r}: up.weight and down.weight must both be DTensors on the same device mesh "
            f"(got {type(up).__name__} and {type(down).__name__}); shard the whole model with "
            "hf_lowrank.training.distributed.shard_lowrank_model (or fully_shard both factors' module)."
        )


def dtensor_group_step(optimizer: Spectron, group: dict) -> None:
    """One step of ``group`` whose parameters are DTensors (FSDP2): the same update as unsharded, up to the order
    of floating-point sums. Called by ``Spectron.step``."""
    if group["algorithm"] == "adamw":
        for param in group["params"]:
            if param.grad is None:
                continue
            state = optimizer.state[param]
            if not state:
                state.update(init_adamw_state(param))  # zeros_like keeps the DTensor placement
            grad = param.grad
            if isinstance(param, DTensor) and tuple(grad.placements) != tuple(param.placements):
                grad = grad.redistribute(param.device_mesh, param.placements)
            adamw_update(
                _local(param),
                _local(grad),
                {key: _local(value) for key, value in state.items()},
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return

    up, down = group["params"]
    _validate_dtensor_pair(up, down, group.get("name", ""))
    if up.grad is None and down.grad is None:
        return
    sharded = _sharded_mesh_dims(up, down)
    for param in (up, down):
        if not optimizer.state[param]:
            optimizer.state[param].update(init_sharded_spectron_state(param, sharded))
    state_up, state_down = optimizer.state[up], optimizer.state[down]
    all_reduce = make_all_reduce(_mesh_groups(up, sharded))
    gram_fn = make_sharded_gram(all_reduce)
    placement_up, placement_down = _long_dim_placements(up, sharded), _long_dim_placements(down, sharded)
    grad_up, grad_down = _local_grad(up, placement_up), _local_grad(down, placement_down)
    local_state_up = {key: _local(value) for key, value in state_up.items()}
    local_state_down = {key: _local(value) for key, value in state_down.items()}
    first = state_up["step"].item() == 0
    with _long_dim_shard(up, placement_up) as local_up, _long_dim_shard(down, placement_down) as local_down:
        spectron_pair_update(
            local_up,
            local_down,
            grad_up if grad_up is not None else torch.zeros_like(local_up),
            grad_down if grad_down is not None else torch.zeros_like(local_down),
            local_state_up,
            local_state_down,
            lr=group["lr"],
            momentum=group["momentum"],
            ns_steps=group["ns_steps"],
            power_iters=max(group["first_power_iters"], group["power_iters"]) if first else group["power_iters"],
            weight_decay=group["weight_decay"],
            orthogonalize=group["orthogonalize"],
            renormalize=group["renormalize"],
            eps=group["eps"],
            gram_fn=gram_fn,
            reduce_fn=all_reduce,
        )
        state_up["step"] += 1
        state_down["step"] += 1
        every = group["rebalance_every"]
        if every and int(state_up["step"].item()) % every == 0:
            rebalance_pair(
                local_up,
                local_down,
                local_state_up,
                local_state_down,
                power_iters=group["power_iters"],
                eps=group["eps"],
                reduce_fn=all_reduce,
            )


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
    """The markdown table of docs/distributed.md."""
    from ..presets import preset_config

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_lowrank.optim.distributed", description="Spectron's communication under FSDP2."
    )
    parser.add_argument("--traffic-report", action="store_true", help="print bytes per step for the presets")
    args = parser.parse_args(argv)
    if not args.traffic_report:
        parser.print_help()
        return 0
    print(traffic_report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
