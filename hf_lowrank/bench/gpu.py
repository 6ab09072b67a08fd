"""`hf-lowrank gpu-check` (``scripts/gpu_check.py``): the benchmark in bf16 on one GPU at widths 1024 and 2048,
plus a short stability comparison of Spectron and naive low-rank AdamW, in under 5 minutes, written to one JSON
file.

* Benchmark: the same measurements as on CPU (``suite.py``), with bf16 weights (pure bf16: AdamW moments in bf16,
  Spectron's momentum in float32 as it always is), GPU-sized batches and a 32k vocabulary; memory is the CUDA
  allocator's peak per variant (exact, no subprocess needed).
* Stability: a small factorized model trained from scratch with fp32 weights under bf16 autocast on a synthetic
  language (a fixed random Markov chain, so the loss has a known floor and nothing is downloaded), Spectron vs
  naive AdamW at a moderate and a high learning rate. Recorded per run: loss curve, divergence, and the spectral
  norm of the update ‖ΔW‖₂ of two projections (the quantity the paper blames for instability).

The JSON is rewritten after every phase, so a run stopped by a time limit keeps what it finished; a phase that
would start after ``--budget_s`` is recorded as skipped. ``--cpu_smoke`` runs every phase at toy sizes on CPU
in about a minute: the way to check this file without a GPU.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cli_support import CommandParser
from ..files import write_text_atomic
from ..optim import build_optimizer, lowrank_pairs
from .memory import VARIANTS
from .suite import (
    BenchShape,
    adamw,
    build_model,
    measure_generation,
    measure_training,
    summarize_optimizer,
    summarize_training,
)

GPU_SHAPES = (
    BenchShape(1024, 8, batch_size=16, seq_len=512, vocab_size=32000),
    BenchShape(2048, 4, batch_size=8, seq_len=512, vocab_size=32000),
)
SMOKE_SHAPES = (BenchShape(128, 2, batch_size=2, seq_len=32, vocab_size=512),)


@dataclass(frozen=True)
class StabilityRun:
    optimizer: str  # "spectron" or "adamw" (naive: AdamW on the factors)
    lr: float


@dataclass(frozen=True)
class StabilitySettings:
    shape: BenchShape
    steps: int
    runs: tuple[StabilityRun, ...]
    log_every: int = 10
    markov_branching: int = 8  # successors per token of the synthetic language: entropy floor ≈ log(8) nats


STABILITY = StabilitySettings(
    BenchShape(512, 4, batch_size=32, seq_len=256, vocab_size=4096),
    steps=300,
    runs=(
        StabilityRun("spectron", 0.05),
        StabilityRun("spectron", 0.2),
        StabilityRun("adamw", 1e-3),
        StabilityRun("adamw", 1e-2),
    ),
)
SMOKE_STABILITY = StabilitySettings(
    BenchShape(64, 2, batch_size=4, seq_len=32, vocab_size=256),
    steps=12,
    runs=(StabilityRun("spectron", 0.05), StabilityRun("adamw", 1e-2)),
    log_every=4,
)


# ------------------------------------------------------------------------------------------------ benchmark
def cuda_memory(shape: BenchShape, variant: str, device, dtype, steps: int = 2) -> dict:
    """Peak bytes the CUDA allocator handed out over steady-state training steps of one variant."""
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    model = build_model(shape, factorized=variant.startswith("factorized"), device=device, dtype=dtype)
    optimizer = build_optimizer(model, "spectron", lr=1e-3) if variant.endswith("spectron") else adamw(model)
    batch = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len), device=device)
    for step in range(steps + 1):
        if step == 1:  # the first step creates the optimizer state; measure the steps after it
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    del model, optimizer
    return {"variant": variant, "peak_bytes": peak}


def benchmark_shape(shape: BenchShape, device, dtype, repetitions: int) -> dict:
    dense = build_model(shape, False, device=device, dtype=dtype)
    factorized = build_model(shape, True, device=device, dtype=dtype)
    rows = measure_training(shape, dense, factorized, repetitions)
    entry = {
        "shape": shape.describe(),
        "training": summarize_training(shape, rows),
        "optimizer": summarize_optimizer(shape, rows),
        "generation": measure_generation(shape, dense, factorized, max(2, repetitions // 2)),
        "training_rows": rows,
    }
    del dense, factorized
    if device.type == "cuda":
        variants = {v: cuda_memory(shape, v, device, dtype) for v in VARIANTS}
        entry["memory"] = {
            "variants": variants,
            "peak_ratio": variants["factorized_spectron"]["peak_bytes"] / variants["dense_adamw"]["peak_bytes"],
        }
    return entry


# ------------------------------------------------------------------------------------------------ stability
class MarkovLanguage:
    """Token sequences from a fixed random Markov chain: each token has ``branching`` successors with Zipf
    weights, so a model can learn it and the achievable loss is the chain's conditional entropy."""

    def __init__(self, vocab_size: int, branching: int, device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=generator).to(device)
        weights = 1.0 / torch.arange(1, branching + 1, dtype=torch.float)
        self.probabilities = (weights / weights.sum()).to(device)
        self.entropy = float(-(self.probabilities * self.probabilities.log()).sum())
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)

    def batch(self, rows: int, length: int) -> torch.Tensor:
        device = self.successors.device
        tokens = torch.empty(rows, length, dtype=torch.long, device=device)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (rows,), device=device, generator=self.generator)
        choices = torch.multinomial(
            self.probabilities.expand(rows * (length - 1), -1), 1, replacement=True, generator=self.generator
        ).view(rows, length - 1)
        for t in range(1, length):
            tokens[:, t] = self.successors[tokens[:, t - 1], choices[:, t - 1]]
        return tokens


@torch.no_grad()
def _update_norm(before: tuple[torch.Tensor, torch.Tensor], module) -> float:
    from ..training.diagnostics import lowrank_difference_spectral_norm

    return float(lowrank_difference_spectral_norm(*before, module.up.weight, module.down.weight))


def stability_run(settings: StabilitySettings, run: StabilityRun, device) -> dict:
    shape = settings.shape
    model = build_model(shape, True, device=device)  # fp32 weights; bf16 autocast below
    if run.optimizer == "spectron":
        optimizer = build_optimizer(model, "spectron", lr=run.lr)
    else:
        optimizer = build_optimizer(model, "adamw", lr=run.lr)
    watched = {
        name: module
        for name, module in model.named_modules()
        if name in ("model.layers.0.self_attn.q_proj", f"model.layers.{shape.num_layers - 1}.mlp.down_proj")
    }
    assert len(watched) == 2 and len(lowrank_pairs(model)) == 7 * shape.num_layers
    language = MarkovLanguage(shape.vocab_size, settings.markov_branching, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, update_norms, diverged = [], [], False
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = language.batch(shape.batch_size, shape.seq_len)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        measure = step % settings.log_every == 0
        if measure:
            before = {n: (m.up.weight.detach().clone(), m.down.weight.detach().clone()) for n, m in watched.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if measure:
            value = loss.item()
            losses.append([step, value])
            update_norms.append([step, max(_update_norm(before[n], m) for n, m in watched.items())])
            if not math.isfinite(value):
                diverged = True
                break
    tail = [v for _, v in losses[-3:]]
    final = sum(tail) / len(tail)
    first = losses[0][1]
    return {
        **asdict(run),
        "losses": losses,
        "max_update_norms": update_norms,
        "final_loss": final,
        "entropy_floor": language.entropy,
        "diverged": diverged or not math.isfinite(final) or final > first,
        "max_update_norm": max(v for _, v in update_norms),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------ driver
def run_gpu_check(out: Path, cpu_smoke: bool = False, budget_s: float = 270.0, repetitions: int = 6) -> dict:
    began = time.perf_counter()
    if cpu_smoke:
        device, shapes, stability, repetitions = torch.device("cpu"), SMOKE_SHAPES, SMOKE_STABILITY, 2
    else:
        if not torch.cuda.is_available():
            raise ValueError("No CUDA device: run on a GPU machine, or pass --cpu_smoke to check the script on CPU.")
        # TF32 stays off (torch's default): Spectron's Newton–Schulz is specified in float32.
        device, shapes, stability = torch.device("cuda"), GPU_SHAPES, STABILITY
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "budget_s": budget_s,
        "shapes": [],
        "stability": {"settings": {**asdict(stability), "shape": stability.shape.describe()}, "runs": []},
        "skipped": [],
    }

    def save():
        result["elapsed_s"] = time.perf_counter() - began
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")

    def within_budget(what: str) -> bool:
        if time.perf_counter() - began > budget_s:
            result["skipped"].append(what)
            save()
            return False
        return True

    for shape in shapes:
        if within_budget(f"benchmark {shape.name}"):
            print(f"[gpu_check] benchmark {shape.name}", flush=True)
            result["shapes"].append(benchmark_shape(shape, device, torch.bfloat16, repetitions))
            save()
    for run in stability.runs:
        if within_budget(f"stability {run.optimizer} lr={run.lr}"):
            print(f"[gpu_check] stability {run.optimizer} lr={run.lr}", flush=True)
            result["stability"]["runs"].append(stability_run(stability, run, device))
            save()
    save()
    return result


def summary_lines(result: dict) -> list[str]:
    lines = []
    for entry in result["shapes"]:
        t, o, g = entry["training"], entry["optimizer"], entry["generation"]
        line = (
            f"{entry['shape']['name']}: train {t['speedup']:.2f}x ({100 * t['fraction_of_ideal']:.0f}% of ideal "
            f"{t['ideal_speedup']:.2f}x), Spectron +{100 * o['spectron_overhead']:.1f}% vs AdamW "
            f"(batched {o.get('batched_speedup_over_reference', float('nan')):.2f}x the reference), "
            f"generation {g['speedup']:.2f}x"
        )
        if "memory" in entry:
            line += f", peak memory {100 * entry['memory']['peak_ratio']:.0f}% of dense + AdamW"
        lines.append(line)
    for run in result["stability"]["runs"]:
        lines.append(
            f"stability {run['optimizer']} lr={run['lr']}: final loss {run['final_loss']:.3f} "
            f"(floor {run['entropy_floor']:.2f}), max ||dW||_2 {run['max_update_norm']:.3g}, "
            f"{'DIVERGED' if run['diverged'] else 'stable'}"
        )
    lines += [f"skipped: {what}" for what in result["skipped"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="hf-lowrank gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--cpu_smoke", action="store_true", help="toy sizes on CPU: checks the script, not the GPU")
    parser.add_argument("--budget_s", type=float, default=270.0, help="start no phase after this many seconds")
    args = parser.parse_args(argv)
    result = run_gpu_check(args.out, cpu_smoke=args.cpu_smoke, budget_s=args.budget_s)
    print("\n".join(summary_lines(result)))
    return 0
