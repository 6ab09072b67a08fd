"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): load a saved model with Transformers' tensor parallelism
(`tp_plan="auto"`, the config's plan) and write, from rank 0, how far its logits are from the unsharded ones.

argv: model folder, output JSON. The folder holds `reference.pt` = {"input_ids", "logits"} of the unsharded model.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import hf_lowrank  # noqa: F401  (registers the model)

torch.set_num_threads(1)
folder, output = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto")).eval()
reference = torch.load(f"{folder}/reference.pt", weights_only=True)
with torch.no_grad():
    logits = model(reference["input_ids"]).logits
sharded = {}
for name, param in model.named_parameters():
    local = param.to_local() if hasattr(param, "to_local") else param
    if local.shape != param.shape:
        sharded[name] = list(local.shape)
if dist.get_rank() == 0:
    result = {
        "world_size": dist.get_world_size(),
        "max_abs_diff": (logits - reference["logits"]).abs().max().item(),
        "sharded": sharded,
    }
    with open(output, "w") as f:
        json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
