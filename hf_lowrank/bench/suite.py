"""What the benchmark measures: training steps, optimizer steps and greedy generation of a factorized model and
its dense counterpart, side by side in one process with interleaved repetitions.

Shapes are data (:class:`BenchShape`); every measurement returns a plain dict that goes into the JSON report
as is. Memory is measured in fresh processes (:mod:`hf_lowrank.bench.memory`).
"""

import gc
from dataclasses import asdict, dataclass

import torch

from ..configuration_lowrank import LowRankLlamaConfig
from ..modeling_lowrank import LowRankLlamaForCausalLM
from ..optim import build_optimizer
from .flops import generation_flops_per_token, ideal_speedup, training_flops_per_token
from .timing import interleaved, median, median_of, quartiles, timed

# Tokens per optimizer step of the GaLore/CoLA/SLTrain recipes for LLaMA 60M-1B (512 sequences of 256): the batch
# at which the optimizer's share of a real pretraining step is extrapolated.
REFERENCE_GLOBAL_BATCH_TOKENS = 512 * 256


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked model shape. Defaults: LLaMA-style, sized for a 2-core CPU (see docs/benchmarks.md)."""

    hidden_size: int
    num_layers: int
    batch_size: int = 2
    seq_len: int = 256
    vocab_size: int = 8192  # on a few layers, keeps the head's share of flops near a full-depth 32k-vocab model's
    intermediate_ratio: float = 2.75  # LLaMA's 8/3 rounded up to a multiple of 128: 1408, 2816, 5632
    rank_ratio: float = 0.25
    head_dim: int = 64

    @property
    def name(self) -> str:
        return f"w{self.hidden_size}-L{self.num_layers}"

    @property
    def intermediate_size(self) -> int:
        return int(-(-self.intermediate_ratio * self.hidden_size // 128) * 128)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def config(self, factorized: bool) -> LowRankLlamaConfig:
        return LowRankLlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.hidden_size // self.head_dim,
            max_position_embeddings=self.seq_len,
            rank_ratio=self.rank_ratio,
            lowrank_modules=None if factorized else [],
            lowrank_init="normal",  # init does not change speed; spectral init's SVDs cost minutes at width 2048
        )

    def describe(self) -> dict:
        return {**asdict(self), "name": self.name, "intermediate_size": self.intermediate_size}


DEFAULT_SHAPES = (BenchShape(512, 4), BenchShape(1024, 4), BenchShape(2048, 2))
SMOKE_SHAPES = (BenchShape(128, 2, batch_size=1, seq_len=32, vocab_size=512),)


def build_model(shape: BenchShape, factorized: bool, seed: int = 0, device=None, dtype=None) -> LowRankLlamaForCausalLM:
    torch.manual_seed(seed)
    return LowRankLlamaForCausalLM(shape.config(factorized)).to(device=device, dtype=dtype)


def synchronizer(model: torch.nn.Module):
    """What ``timed`` must call to wait for ``model``'s device (None on CPU, where calls are synchronous)."""
    device = next(model.parameters()).device
    return torch.cuda.synchronize if device.type == "cuda" else None


def random_tokens(shape: BenchShape, rows: int, length: int, model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, shape.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    return tokens.to(next(model.parameters()).device)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The AdamW baseline: torch's fused kernel where it exists, the fastest AdamW torch has (10x the default
    single-tensor loop on CPU), so that Spectron's overhead is measured against the strictest baseline."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)


def _forward_backward(model, batch) -> None:
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()


def measure_training(
    shape: BenchShape,
    dense,
    factorized,
    repetitions: int,
    warmup: int = 2,
    spectron: bool = True,
    reference: bool = True,
    compile: bool = False,
) -> list[dict[str, float]]:
    """Step times of dense + AdamW and factorized + {AdamW, Spectron, reference Spectron}, interleaved.

    Each repetition times, per model, the forward + backward pass and then each optimizer's step on the same
    gradients (the factorized model is stepped by all its optimizers, which does not change their cost).
    ``compile`` runs the forward and backward of both models through ``torch.compile`` (compiled during warmup).
    Returns one row of durations (seconds) per repetition.
    """
    batch = random_tokens(shape, shape.batch_size, shape.seq_len, dense)
    sync = synchronizer(dense)
    optimizers = {"dense_adamw": (dense, adamw(dense)), "factorized_adamw": (factorized, adamw(factorized))}
    if spectron:
        optimizers["factorized_spectron"] = (factorized, build_optimizer(factorized, "spectron", lr=1e-3))
    if spectron and reference:  # the per-pair reference path, to report the batched path's speedup in the same process
        optimizers["factorized_spectron_reference"] = (
            factorized,
            build_optimizer(factorized, "spectron", lr=1e-3, batched=False),
        )

    def task(model, prefix):
        model.train()
        forward = torch.compile(model) if compile else model

        def run():
            times = {f"{prefix}_fb": timed(lambda: _forward_backward(forward, batch), sync)}
            for name, (owner, optimizer) in optimizers.items():
                if owner is model:
                    times[name] = timed(optimizer.step, sync)
            model.zero_grad(set_to_none=True)
            return times

        return run

    tasks = {"dense": task(dense, "dense"), "factorized": task(factorized, "factorized")}
    interleaved(tasks, warmup)
    rows = interleaved(tasks, repetitions)
    optimizers.clear()
    gc.collect()
    return rows


def summarize_training(shape: BenchShape, rows: list[dict]) -> dict:
    tokens = shape.tokens_per_step
    dense_flops = training_flops_per_token(shape.config(False), shape.seq_len)
    factorized_flops = training_flops_per_token(shape.config(True), shape.seq_len)
    ideal = ideal_speedup(dense_flops, factorized_flops)
    dense_step = [r["dense_fb"] + r["dense_adamw"] for r in rows]
    factorized_step = [r["factorized_fb"] + r["factorized_adamw"] for r in rows]
    speedups = [(r["dense_fb"] + r["dense_adamw"]) / (r["factorized_fb"] + r["factorized_adamw"]) for r in rows]
    speedup = median(speedups)
    summary = {
        "tokens_per_step": tokens,
        "dense_flops_per_token": dense_flops,
        "factorized_flops_per_token": factorized_flops,
        "ideal_speedup": ideal,
        "dense_tokens_per_s": tokens / median(dense_step),
        "factorized_tokens_per_s": tokens / median(factorized_step),
        "speedup": speedup,
        "speedup_quartiles": quartiles(speedups),
        "fraction_of_ideal_quartiles": tuple(q / ideal for q in quartiles(speedups)),
        "speedup_forward_backward": median_of(rows, lambda r: r["dense_fb"] / r["factorized_fb"]),
        "fraction_of_ideal": speedup / ideal,
        "dense_step_s": median(dense_step),
        "factorized_step_s": median(factorized_step),
        # achieved model flop rate, a sanity check of the timings (a core of this CPU peaks near 70 GFLOP/s fp32)
        "dense_gflops": dense_flops * tokens / median(r["dense_fb"] for r in rows) / 1e9,
        "factorized_gflops": factorized_flops * tokens / median(r["factorized_fb"] for r in rows) / 1e9,
    }
    if "factorized_spectron" in rows[0]:
        summary["factorized_spectron_tokens_per_s"] = tokens / median(
            r["factorized_fb"] + r["factorized_spectron"] for r in rows
        )
    return summary


def summarize_optimizer(shape: BenchShape, rows: list[dict]) -> dict:
    """Spectron vs AdamW on the factorized model: step times, share of a step, and the extrapolation to larger
    batches (a step of k micro-batches costs k forward-backward passes and one optimizer step)."""
    tokens = shape.tokens_per_step

    def overhead(r, micro_batches=1):
        return (r["factorized_spectron"] - r["factorized_adamw"]) / (
            micro_batches * r["factorized_fb"] + r["factorized_adamw"]
        )

    spectron, adamw_s, fb = (
        median(r[k] for r in rows) for k in ("factorized_spectron", "factorized_adamw", "factorized_fb")
    )
    accumulation = REFERENCE_GLOBAL_BATCH_TOKENS / tokens
    result = {
        "spectron_step_s": spectron,
        "adamw_step_s": adamw_s,
        "forward_backward_s": fb,
        "spectron_share_of_step": median_of(
            rows, lambda r: r["factorized_spectron"] / (r["factorized_fb"] + r["factorized_spectron"])
        ),
        "adamw_share_of_step": median_of(
            rows, lambda r: r["factorized_adamw"] / (r["factorized_fb"] + r["factorized_adamw"])
        ),
        "spectron_overhead": median_of(rows, overhead),
        "spectron_overhead_quartiles": quartiles(overhead(r) for r in rows),
        "spectron_overhead_at_reference_batch": median_of(rows, lambda r: overhead(r, accumulation)),
        "reference_batch_tokens": REFERENCE_GLOBAL_BATCH_TOKENS,
        # tokens per optimizer step at which Spectron adds exactly 5%: (S − A) = 0.05·(k·FB + A)
        "tokens_per_step_for_5pct": tokens * max(0.0, ((spectron - adamw_s) / 0.05 - adamw_s) / fb),
    }
    if "factorized_spectron_reference" in rows[0]:
        result["reference_spectron_step_s"] = median(r["factorized_spectron_reference"] for r in rows)
        result["batched_speedup_over_reference"] = median_of(
            rows, lambda r: r["factorized_spectron_reference"] / r["factorized_spectron"]
        )
    return result


@torch.no_grad()
def measure_generation(
    shape: BenchShape, dense, factorized, repetitions: int, prompt_len: int | None = None, new_tokens: int | None = None
) -> dict:
    """Greedy decoding with a KV cache, batch 1, ``new_tokens`` tokens (default 64) after a ``prompt_len``-token
    prompt (default 32), both capped so that the whole sequence fits the shape's ``seq_len``."""
    prompt_len = prompt_len or min(32, shape.seq_len // 4)
    new_tokens = new_tokens or min(64, shape.seq_len // 2)
    prompt = random_tokens(shape, 1, prompt_len, dense, seed=1)
    sync = synchronizer(dense)

    def task(model, name):
        model.eval()

        def run():
            seconds = timed(
                lambda: model.generate(
                    prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
                ),
                sync,
            )
            return {name: seconds}

        return run

    tasks = {"dense": task(dense, "dense"), "factorized": task(factorized, "factorized")}
    interleaved(tasks, 1)
    rows = interleaved(tasks, repetitions)
    dense_flops = generation_flops_per_token(shape.config(False), prompt_len, new_tokens)
    factorized_flops = generation_flops_per_token(shape.config(True), prompt_len, new_tokens)
    return {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "dense_tokens_per_s": new_tokens / median(r["dense"] for r in rows),
        "factorized_tokens_per_s": new_tokens / median(r["factorized"] for r in rows),
        "speedup": median_of(rows, lambda r: r["dense"] / r["factorized"]),
        "speedup_quartiles": quartiles(r["dense"] / r["factorized"] for r in rows),
        "ideal_speedup": ideal_speedup(dense_flops, factorized_flops),
        "rows": rows,
    }
