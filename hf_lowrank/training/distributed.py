"""Multi-process training: launch checks for the Trainer (DDP), and FSDP2 sharding with sharded checkpoints.

Commands, placements and CPU limitations are in docs/distributed.md. Imports torch, the model and the optimizer
only, so it works where ``datasets`` is not installed.
"""

import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers.training_args import ParallelMode

from ..configuration_lowrank import long_dim
from ..modeling_lowrank import LowRankLinear, LowRankLlamaDecoderLayer
from ..optim import Spectron, init_optimizer_state


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_launch(training_args) -> None:
    """Refuse a multi-process launch in which the ranks would train alone or drift apart (R18).

    Launchers (``torchrun``, ``accelerate launch``) set ``WORLD_SIZE``. The Trainer wraps the model in DDP only
    when its arguments agree: on a machine without CUDA that takes ``use_cpu=True`` (``--use_cpu``). Without it,
    each process trains alone on its own data shard; with ``--ddp_backend gloo`` but no ``--use_cpu``, a process
    group exists yet gradients are never synchronized and the replicas drift apart, without any error.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched <= 1:
        return
    cuda = torch.cuda.is_available()
    use_cpu = bool(training_args.use_cpu) or _env_flag("ACCELERATE_USE_CPU")
    if use_cpu:
        set_cpu_process_group_timeout(training_args)
    if not cuda and not use_cpu:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) on a machine without CUDA, but use_cpu is "
            "off: the Trainer would not wrap the model in DDP, so each process would train alone (with "
            "--ddp_backend gloo: never synchronize gradients and drift apart). Add --use_cpu to the training "
            "arguments to train data-parallel on CPUs over gloo (docs/distributed.md)."
        )
    if (use_cpu or not cuda) and training_args.ddp_backend == "nccl":
        raise ValueError("--ddp_backend nccl needs CUDA GPUs; on CPUs drop it (gloo is the default) or pass gloo.")
    if training_args.world_size != launched or training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"WORLD_SIZE={launched}, but the Trainer sees world_size={training_args.world_size} and parallel mode "
            f"{training_args.parallel_mode.name}: the ranks would not synchronize. Launch with torchrun or accelerate launch and let the "
            "Trainer set up the process group (do not initialize one yourself with another backend); on CPUs add "
            "--use_cpu."
        )
    fsdp_requested = bool(getattr(training_args, "fsdp", None)) or _env_flag("ACCELERATE_USE_FSDP")
    if fsdp_requested and (use_cpu or not cuda):
        warnings.warn(
            "FSDP through the Trainer needs GPUs: on CPUs it runs as DDP (every rank holds the whole model and "
            "optimizer state). To shard on CPUs, use hf_lowrank.training.distributed.shard_lowrank_model in your own "
            "loop (docs/distributed.md).",
            stacklevel=2,
        )


def set_cpu_process_group_timeout(training_args) -> None:
    """Give the gloo process group of a CPU launch ``--ddp_timeout`` (R25).

    Transformers passes ``ddp_timeout`` to the process group only on its GPU branch; with ``use_cpu`` the group
    gets torch's default of 30 minutes, so one hung rank blocks the others that long. ``TrainingArguments``
    creates the group as soon as it is constructed (it reads ``self.device``), and the Trainer reuses it: the
    timeout is set on that group.
    """
    if not dist.is_initialized():  # not launched through TrainingArguments: nothing to configure
        return
    # torch has no public setter; this private one exists since torch 2.3 (the package needs >= 2.6).
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=training_args.ddp_timeout), dist.group.WORLD)


# ------------------------------------------------------------------------------------------------ FSDP2


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError(
            "shard_lowrank_model needs a process group: launch with torchrun and call "
            "torch.distributed.init_process_group() first, or pass a DeviceMesh."
        )
    return init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))


def lowrank_placements(model: nn.Module, shards: int) -> dict[int, object]:
    """``{id(factor weight): Shard(long dim)}`` for every ``LowRankLinear`` of ``model``.

    ``up.weight`` (out × r) is sharded by rows, ``down.weight`` (r × in) by columns, so that every shard holds
    whole rows of the factor's tall view. FSDP2 shards unevenly only along dim 0: a ``down.weight`` whose ``in``
    does not divide by ``shards`` keeps the default ``Shard(0)`` (the optimizer then redistributes it per step).
    """
    from torch.distributed.tensor import Shard

    placements = {}
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            for factor in module.factors():
                dim = long_dim(factor.weight.shape)
                even = factor.weight.shape[dim] % shards == 0
                placements[id(factor.weight)] = Shard(dim if dim == 0 or even else 0)
    return placements


def shard_lowrank_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, **fully_shard_kwargs):
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every decoder layer, then on the root.

    Every factor is sharded along its long dimension (see :func:`lowrank_placements`), so Spectron never gathers
    a whole factor: it all-reduces r × r Grams and r-vectors only. Other parameters use FSDP2's default
    ``Shard(0)``. ``mesh`` defaults to a 1-D mesh over all ranks on CUDA, or on CPU without it (gloo).
    Extra keyword arguments (``mp_policy``, ``offload_policy``, ...) go to every ``fully_shard`` call.
    Build the optimizer after this call, on the sharded parameters. Returns ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = _default_mesh() if mesh is None else mesh
    layers = [m for m in model.modules() if isinstance(m, LowRankLlamaDecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LowRankLlamaDecoderLayer to shard; pass a hf_lowrank model.")
    placements = lowrank_placements(model, mesh.shape[-1])

    def placement(param: nn.Parameter):
        return placements.get(id(param))  # None: FSDP2's default Shard(0)

    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            shard_placement_fn=placement,
            **fully_shard_kwargs,
        )
    fully_shard(
        model,
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        shard_placement_fn=placement,
        **fully_shard_kwargs,
    )
    return model


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if isinstance(optimizer, Spectron):
        init_optimizer_state(optimizer)  # DCP loads into existing tensors
    return get_state_dict(model, optimizer)


def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Save model and optimizer state with ``torch.distributed.checkpoint``: each rank writes its shards.

    Call on every rank (it is collective). Loads back on any number of ranks with :func:`load_sharded_checkpoint`.
    """
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _state_dicts(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(Path(path)))


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load what :func:`save_sharded_checkpoint` wrote into a model sharded (and optimizer built) the same way.

    Call on every rank (it is collective).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not Path(path).is_dir():
        raise FileNotFoundError(f"No sharded checkpoint at {path}.")
    model_state, optimizer_state = _state_dicts(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(Path(path)))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
