"""Two ranks under torchrun; rank 1 hangs, rank 0 waits for it in a collective. With `--ddp_timeout` applied to
the CPU process group, rank 0 fails after about that many seconds instead of torch's default 30 minutes."""

import sys
import time

import torch
import torch.distributed as dist

from hf_lowrank.training.arguments import PretrainingArguments
from hf_lowrank.training.distributed import check_launch

args = PretrainingArguments(output_dir=sys.argv[1], use_cpu=True, ddp_timeout=int(sys.argv[2]), report_to="none")
check_launch(args)  # as `hf-lowrank pretrain` does first; the Trainer then reuses this process group
assert args.world_size == 2, args.world_size
if dist.get_rank() == 1:
    time.sleep(60)  # a hung rank
else:
    started = time.time()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as error:  # noqa: BLE001 - the timeout's type differs across torch versions
        print(f"rank 0 gave up after {time.time() - started:.1f} s: {type(error).__name__}", flush=True)
        sys.exit(3)
    print("rank 0 was never blocked", flush=True)
