"""Spectron on FSDP2-sharded factors: the maths of ``functional.py`` on local shards, with only r × r Grams and
r-vectors all-reduced.

:class:`~hf_lowrank.optim.Spectron` opens every factor pair whose parameters are ``DTensor``s with
:func:`sharded_pair_view` and steps it with the same driver as an unsharded pair, so the same optimizer (built by
``build_optimizer`` before or after ``fully_shard``) runs under FSDP2.

A factor seen as its tall matrix X (long × r) sharded by rows, ``X = [X₁; X₂; …]``, has ``XᵀX = Σₖ XₖᵀXₖ``: the
Newton–Schulz Gram is an all-reduce of the shards' r × r partial Grams (packed to its upper triangle, since it is
symmetric), after which ``X ← aX + X(bS + cS²)`` is local; power iteration reduces one r-vector and two scalars
per round. That is what ``shard_lowrank_model``'s placement (``up.weight`` (out × r) by rows, ``down.weight``
(r × in) by columns) gives. A factor sharded any other way (plain ``fully_shard`` splits ``down.weight`` along r)
is redistributed to its long-dimension sharding for the step and back (all-to-all on NCCL; all-gather and slice
on gloo); its momentum and power vector always live in that sharding, so the state does not depend on the
parameter's placement. AdamW groups are elementwise and run on the local shards (:func:`local_adamw_view`).

What the step communicates is reported to :data:`COMM_OBSERVERS`; the benchmarks' traffic model and counter
(``hf_lowrank.bench.traffic``) read it there.
"""

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..configuration_lowrank import long_dim
from .functional import PairView, init_power_vectors

# Called after every collective of the sharded step as ``observer(all_reduce_bytes=, calls=, redistributed_bytes=)``:
# all-reduce payloads, and global sizes of the tensors redistributed to their long-dimension sharding.
COMM_OBSERVERS: list[Callable[..., None]] = []


def _count(all_reduce_bytes: int = 0, calls: int = 0, redistributed_bytes: int = 0) -> None:
    for observer in COMM_OBSERVERS:
        observer(all_reduce_bytes=all_reduce_bytes, calls=calls, redistributed_bytes=redistributed_bytes)


def holds_dtensor(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2): its group takes the sharded step."""
    return any(isinstance(p, DTensor) for p in params)


# ------------------------------------------------------------------------------------------------ sharded reductions


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor); other tensors unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


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
    return tuple(Shard(long_dim(weight.shape)) if s else Replicate() for s in sharded)


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


def init_sharded_pair_state(up: DTensor, down: DTensor, state: dict, name: str = "") -> tuple[bool, ...]:
    """Create the state of a sharded pair's factors where it is missing; returns the pair's sharded mesh dims."""
    _validate_dtensor_pair(up, down, name)
    sharded = _sharded_mesh_dims(up, down)
    for param in (up, down):
        if not state[param]:
            state[param].update(init_sharded_spectron_state(param, sharded))
    return sharded


@contextmanager
def sharded_pair_view(up: DTensor, down: DTensor, state: dict, name: str = "") -> Iterator[PairView | None]:
    """The pair as local shards along each factor's long dimension, with all-reducing ``gram_fn``/``reduce_fn``
    (``None`` if neither factor has a gradient). ``state`` is the optimizer's; factors resharded for the step are
    written back on exit. The step on the view is the unsharded one up to the order of floating-point sums."""
    _validate_dtensor_pair(up, down, name)
    if up.grad is None and down.grad is None:
        yield None
        return
    sharded = init_sharded_pair_state(up, down, state, name)
    all_reduce = make_all_reduce(_mesh_groups(up, sharded))
    placement_up, placement_down = _long_dim_placements(up, sharded), _long_dim_placements(down, sharded)
    grad_up, grad_down = _local_grad(up, placement_up), _local_grad(down, placement_down)
    local_state_up = {key: _local(value) for key, value in state[up].items()}
    local_state_down = {key: _local(value) for key, value in state[down].items()}
    with _long_dim_shard(up, placement_up) as local_up, _long_dim_shard(down, placement_down) as local_down:
        yield PairView(
            local_up,
            local_down,
            grad_up,
            grad_down,
            local_state_up,
            local_state_down,
            gram_fn=make_sharded_gram(all_reduce),
            reduce_fn=all_reduce,
            distributed=True,
        )


def local_adamw_view(param: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(param, grad, state)`` of an AdamW parameter as local shards (plain tensors pass through); the gradient
    is redistributed to the parameter's placement if FSDP left it otherwise. AdamW is elementwise, so that is all
    the sharded step needs."""
    grad = param.grad
    if isinstance(param, DTensor) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return _local(param), _local(grad), {key: _local(value) for key, value in state.items()}
