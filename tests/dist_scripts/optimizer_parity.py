"""Launched by tests/test_distributed.py: `torchrun --standalone --nproc_per_node 2 optimizer_parity.py REPORT`.

Two gloo processes on CPU, tiny preset, fp32, the same global batch everywhere. Checks, against the unsharded
optimizer run on the whole batch in one process: DDP (each rank half the batch), FSDP2 with every factor
sharded along its long dimension, and FSDP2 with plain `fully_shard` placements (Shard(0) everywhere). Also:
rank agreement, independence from the global RNG, sharded checkpoints (save, load, next steps equal the
uninterrupted run) and the bytes Spectron all-reduces. Rank 0 writes the JSON report after the last collective.
"""

import hashlib
import json
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from hf_lowrank import LowRankLlamaForCausalLM, build_optimizer, lowrank_pairs, preset_config
from hf_lowrank.bench.traffic import count_traffic
from hf_lowrank.modeling_lowrank import LowRankLlamaDecoderLayer
from hf_lowrank.training.distributed import load_sharded_checkpoint, save_sharded_checkpoint, shard_lowrank_model

STEPS, RESUME_AFTER = 4, 2
GLOBAL_BATCH, SEQUENCE = 4, 32
OPTIMIZER = dict(lr=0.05, adamw_lr=3e-3, weight_decay=0.1, rebalance_every=2)


def make_model():
    torch.manual_seed(0)
    return LowRankLlamaForCausalLM(preset_config("tiny"))


def batches():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, preset_config("tiny").vocab_size, (STEPS, GLOBAL_BATCH, SEQUENCE), generator=generator)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def params_of(model):
    return {name: full(p.detach()).clone() for name, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(optimizer, local=True):
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for _, v in sorted(optimizer.state[p].items()):
                out.append(v.to_local() if local and isinstance(v, DTensor) else v)
    return out


def all_equal(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def train(model, optimizer, data, rank, steps, shard_batch, traffic=None):
    for step in steps:
        x = data[step]
        if shard_batch:
            x = x.chunk(dist.get_world_size())[rank]
        model(input_ids=x, labels=x).loss.backward()
        rng = torch.get_rng_state()
        with count_traffic() as counted:
            optimizer.step()
        if not torch.equal(rng, torch.get_rng_state()):
            raise AssertionError("optimizer.step() consumed the global RNG")
        if traffic is not None:
            traffic.append(vars(counted))
        optimizer.zero_grad(set_to_none=True)


def fsdp_run(kind, mesh, data, rank, checkpoint_dir):
    """FSDP2 run of STEPS steps, a sharded checkpoint after RESUME_AFTER, then a resumed copy of the rest."""

    def sharded():
        model = make_model()
        if kind == "long":
            shard_lowrank_model(model, mesh)
        else:
            for layer in model.modules():
                if isinstance(layer, LowRankLlamaDecoderLayer):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model, build_optimizer(model, "spectron", **OPTIMIZER)

    model, optimizer = sharded()
    placements = {
        name: str(p.placements[0])
        for pair_name, up, down in lowrank_pairs(model)
        for name, p in ((f"{pair_name}.up.weight", up), (f"{pair_name}.down.weight", down))
    }
    torch.manual_seed(1000 + rank)  # a global RNG that differs per rank must not matter
    traffic = []
    train(model, optimizer, data, rank, range(RESUME_AFTER), True, traffic)
    save_sharded_checkpoint(model, optimizer, checkpoint_dir)
    train(model, optimizer, data, rank, range(RESUME_AFTER, STEPS), True, traffic)
    final = params_of(model)
    replicated = [t for t in optimizer_tensors(optimizer, local=False) if not isinstance(t, DTensor)]  # v, σ, steps

    resumed, resumed_optimizer = sharded()
    load_sharded_checkpoint(resumed, resumed_optimizer, checkpoint_dir)
    train(resumed, resumed_optimizer, data, rank, range(RESUME_AFTER, STEPS), True)
    state_after = [full(t) for t in optimizer_tensors(optimizer, local=False)]
    state_resumed = [full(t) for t in optimizer_tensors(resumed_optimizer, local=False)]
    return {
        "final": final,
        "placements": placements,
        "traffic": traffic,
        "resume_max_abs_diff": max(
            max_diff(final, params_of(resumed)), max_diff(dict(enumerate(state_after)), dict(enumerate(state_resumed)))
        ),
        "replicated_state_agrees": all_equal(digest(replicated)),
        "factor_bytes": sum((up.numel() + down.numel()) * 4 for _, up, down in lowrank_pairs(model)),
    }


def main(report_path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    data = batches()

    reference = make_model()
    optimizer = build_optimizer(reference, "spectron", **OPTIMIZER)
    train(reference, optimizer, data, rank, range(STEPS), False)
    expected = params_of(reference)

    ddp = DistributedDataParallel(make_model())
    ddp_optimizer = build_optimizer(ddp.module, "spectron", **OPTIMIZER)
    train(ddp, ddp_optimizer, data, rank, range(STEPS), True)
    report = {
        "world_size": dist.get_world_size(),
        "ddp_max_abs_diff": max_diff(params_of(ddp.module), expected),
        "ddp_params_agree": all_equal(digest(ddp.module.parameters())),
        "ddp_optimizer_state_agrees": all_equal(digest(optimizer_tensors(ddp_optimizer))),
    }

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = [f"{tmp}/checkpoint"]
        dist.broadcast_object_list(checkpoint_dir)  # one folder for all ranks: rank 0's
        for kind in ("long", "default"):
            run = fsdp_run(kind, mesh, data, rank, f"{checkpoint_dir[0]}-{kind}")
            report[kind] = {
                "max_abs_diff": max_diff(run.pop("final"), expected),
                **run,
            }
        dist.barrier()
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
