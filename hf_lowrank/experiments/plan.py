"""The stability study's plan: which runs it holds and in what order, derived from the finished records alone.

Pure logic (no torch, no training), so the scheduling rules are testable in milliseconds and a restarted study
recomputes exactly where it stands from ``runs/*.json``.

Successive halving over learning rates. Every run of a variant's grid trains to the first *rung*
(``rung_steps``) of the full ``steps``-long schedule and is checkpointed there. Once the whole grid has reached
the rung, the runs that can still matter continue from their checkpoints to the end of the same schedule
(resume is bitwise exact, so a continued run is the run that never stopped): the ``promote_top`` best by rung
loss, every run within ``promote_margin`` nats of the best, and the largest learning rate that has not diverged.
A grid whose runs all survive is first extended upward by half-decades until one diverges or the grid reaches
10× past its best (``max_extensions`` at most), so every loss-vs-lr curve shows its edge.

Follow-ups, each once the grids they depend on are final: further seeds at each variant's best and largest
non-diverged learning rate; the "stress" runs without gradient clipping; the rank ablation; and the
equal-training-FLOPs comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from ..bench.flops import training_flops_per_token
from ..presets import preset_config


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    label: str
    dense: bool
    optimizer: str  # an `OptimizerArguments.optimizer` name


VARIANTS: dict[str, Variant] = {
    "dense_adamw": Variant("dense + AdamW", dense=True, optimizer="adamw"),
    "lowrank_adamw": Variant("low-rank + AdamW (naive)", dense=False, optimizer="adamw"),
    "spectron": Variant("low-rank + Spectron", dense=False, optimizer="spectron"),
    "orthogonalize_only": Variant("low-rank + orthogonalization only", dense=False, optimizer="muon"),
    "renormalize_only": Variant("low-rank + renormalization only", dense=False, optimizer="renorm"),
    # The dense baseline a practitioner picks today: Muon on the dense projections, AdamW on the rest.
    "dense_muon": Variant("dense + Muon", dense=True, optimizer="muon"),
}

# Listed in the order the study trains them: the paper's comparison (dense, naive, Spectron) first, the ablations after,
# then dense Muon (added after the first five had run).
# Half-decade grids of 7 points spanning 1000×. AdamW's lr is a per-entry step; the Spectron family's lr is the
# spectral-norm bound of each step's ΔW (with orthogonalization only, ‖ΔA‖₂ ≈ lr per factor). Grids are then
# extended upward by the plan until they show their edge.
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "dense_adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "lowrank_adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "spectron": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
    "orthogonalize_only": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    "renormalize_only": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
    "dense_muon": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),  # ‖ΔW‖₂ ≈ lr, as orthogonalization only
}

STRESS_VARIANTS = ("lowrank_adamw", "spectron")  # trained without gradient clipping at 1× and 3× their best lr
FLOPS_VARIANTS = ("lowrank_adamw", "spectron")  # trained at the dense baseline's training FLOPs
RANK_VARIANT = "spectron"


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class StudySettings:
    """Everything that defines a run besides its variant, lr, seed and schedule length (hashed into each record's
    fingerprint, so records of other settings are never mixed in)."""

    # h=256, 4 layers, BPE vocabulary 2048 trained on the built-in corpus: 2.30M parameters factorized (1.25M in
    # projections, 1.05M in embeddings), 4.21M dense (3.16M in projections). A 2048-token vocabulary keeps the
    # embeddings from being the bulk of the model, and 4 layers at 1,024 tokens per step run at ~0.2 s per step
    # on one core, which is what ~70k steps of study in about 3 hours on 2 cores allow.
    preset: str = "small"
    model_overrides: dict = field(
        default_factory=lambda: dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=2048,
            max_position_embeddings=128,
        )
    )
    block_size: int = 128
    batch_size: int = 8  # 1,024 tokens per step
    steps: int = 1500  # the paper's ablation ran 1,800; 1.54M training tokens per run
    rung_steps: int = 375  # the successive-halving rung (0: every grid run trains to the end)
    save_steps: int = 125  # checkpoint interval: a killed run loses at most this many steps
    warmup_ratio: float = 0.05  # linear warm-up as in the paper, then cosine decay to 0 (0: no warm-up at all)
    lr_scheduler: str = "cosine"  # a `TrainingArguments.lr_scheduler_type`; the instability hunt holds the lr constant
    bf16: bool = False  # bf16 autocast (`TrainingArguments.bf16`; CPU autocast on the CPU), float32 weights
    max_grad_norm: float = 1.0  # the "stress" runs train without clipping
    adamw_lr: float = 3e-3  # AdamW groups (embeddings, LM head, norms) next to the Spectron family
    # Betas of every AdamW group (the AdamW variants' whole model, the Spectron family's embeddings, LM head and
    # norms). The study was run with TrainingArguments' (0.9, 0.999), not the package's (0.9, 0.95) default.
    adamw_betas: tuple = (0.9, 0.999)
    diagnostics_every: int = 10  # steps between measurements of σ(up), σ(down), ‖ΔW‖₂, ‖W‖₂
    divergence_patience: int = 50  # `--divergence_patience`: loss above the first step's loss this many steps
    eval_blocks: int = 512  # the fixed validation subset (65,536 tokens): the first blocks of the validation split
    eval_batch_size: int = 32
    max_corpus_bytes: int = 0  # the whole built-in corpus (~12 MB): more tokens than the longest run trains on
    # Another text source: `DataArguments` fields, e.g. {"dataset_name": "allenai/c4", "dataset_config_name": "en"}
    # or {"train_files": ["corpus/*.txt"]}; empty: the built-in corpus (`max_corpus_bytes` of it).
    data: dict = field(default_factory=dict)
    seed: int = 0  # seed of the grid runs; further seeds are seed + 1, ...
    # Not part of a run's identity:
    seeds: int = 2  # seeds at each variant's best and largest non-diverged lr
    lr_grids: dict = field(default_factory=lambda: dict(DEFAULT_LR_GRIDS))
    promote_top: int = 3
    promote_margin: float = 0.1  # nats above the best rung loss
    max_extensions: int = 3
    stress_factor: float = 3.0
    rank_ratios: tuple = (0.125, 0.4)  # besides the default 0.25, which the main grid trains
    parts: tuple = ("grid", "seeds", "equal_flops", "rank_ablation", "stress")
    threads_per_worker: int = 1
    # Where runs train: "cpu", or "cuda" on a GPU machine. Not part of a run's identity (the same run on another
    # device), but recorded in each run's record.
    device: str = "cpu"

    _NOT_IN_FINGERPRINT = (
        "seeds", "lr_grids", "promote_top", "promote_margin", "max_extensions", "stress_factor", "rank_ratios",
        "parts", "threads_per_worker", "save_steps", "device",
    )  # fmt: skip

    # Fields added after records were written, with the value those records were trained with: at that value a
    # field is left out of the fingerprint, so the older records stay valid; any other value changes it.
    _ADDED_LATER = {"adamw_betas": (0.9, 0.999), "lr_scheduler": "cosine", "bf16": False, "data": {}}

    def fingerprint(self) -> str:
        fields = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in self._NOT_IN_FINGERPRINT and not (k in self._ADDED_LATER and _same(v, self._ADDED_LATER[k]))
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def data_fingerprint(self) -> str:
        fields = [self.max_corpus_bytes, self.block_size, self.model_overrides.get("vocab_size"), self.eval_blocks]
        if self.data:  # appended only when set: the built-in corpus keeps the folder it had
            fields.append(self.data)
        return hashlib.sha256(json.dumps([self.preset, *fields]).encode()).hexdigest()[:12]

    def model_config(self, dense: bool, rank_ratio: float | None = None, **special_ids):
        overrides = {**self.model_overrides, **special_ids}
        if dense:
            overrides["lowrank_modules"] = []
        elif rank_ratio is not None:
            overrides["rank_ratio"] = rank_ratio
        return preset_config(self.preset, **overrides)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def flops_per_token(self, dense: bool, rank_ratio: float | None = None) -> float:
        """Training FLOPs per token, from the function the benchmarks use."""
        return training_flops_per_token(self.model_config(dense, rank_ratio), self.block_size)


def _same(value, default) -> bool:
    """A setting equals its pre-field default (a list read back from JSON counts as the tuple it was)."""
    return (tuple(value) if isinstance(value, list) else value) == default


def smoke_settings() -> StudySettings:
    """Seconds-long settings on the `tiny` preset that still exercise every part of the plan."""
    return StudySettings(
        preset="tiny",
        model_overrides=dict(max_position_embeddings=32),
        block_size=32,
        batch_size=4,
        steps=12,
        rung_steps=4,
        save_steps=4,
        diagnostics_every=2,
        divergence_patience=6,
        eval_blocks=8,
        eval_batch_size=8,
        max_corpus_bytes=150_000,
        lr_grids={
            "dense_adamw": (1e-3, 1e-2),
            "lowrank_adamw": (1e-3, 1e-2),
            "spectron": (0.03, 0.1),
            "dense_muon": (0.03, 0.1),
        },  # fmt: skip
        promote_top=1,
        promote_margin=0.0,
        max_extensions=1,
        rank_ratios=(0.125,),
    )


# ------------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class Job:
    """One training run: a variant at one lr and seed, on a ``steps``-long schedule."""

    variant: str
    lr: float
    seed: int
    steps: int
    clip: bool = True
    rank_ratio: float | None = None  # None: the config's default (0.25)
    # Which of a study's settings the run trains under, for studies that hold several (a model size of the scaling
    # study, a condition of the instability hunt); "" for the stability study's single settings.
    tag: str = ""

    @property
    def id(self) -> str:
        suffix = ("" if self.clip else "_noclip") + ("" if self.rank_ratio is None else f"_rank{self.rank_ratio:g}")
        tag = f"_{self.tag}" if self.tag else ""
        return f"{self.variant}{tag}_lr{self.lr:.4g}_seed{self.seed}_steps{self.steps}{suffix}"


@dataclass(frozen=True)
class Segment:
    """Train ``job`` from wherever its checkpoints stand up to step ``stop_at`` of its schedule."""

    job: Job
    stop_at: int
    part: str  # which part of the study asked for it (for progress and priorities)


def next_half_decade(lr: float) -> float:
    """1 → 3 → 10 → 30 ...: the next point of a half-decade grid."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    return float(f"{(3 if mantissa < 2 else 10) * 10**exponent:.3g}")


def previous_half_decade(lr: float) -> float:
    """1 → 0.3 → 0.1 ...: the previous point of a half-decade grid (the inverse of `next_half_decade`)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if mantissa > 3 * (1 + 1e-9):
        return float(f"{3 * 10**exponent:.3g}")
    if mantissa > 1 + 1e-9:
        return float(f"{10**exponent:.3g}")
    return float(f"{3 * 10 ** (exponent - 1):.3g}")


def is_done(record: dict | None, stop_at: int) -> bool:
    """A run has reached ``stop_at`` (or stopped for good by diverging)."""
    return record is not None and (record["diverged"] or record["steps_done"] >= stop_at)


def remaining_flops(settings: StudySettings, segment: Segment, done: dict) -> float:
    """Training FLOPs still to spend on ``segment`` under ``settings``, given the records ``done`` (what every study's
    plan reports as a segment's cost, for the scheduler's order and ETA)."""
    record = done.get(segment.job.id)
    steps = segment.stop_at - (record["steps_done"] if record else 0)
    flops = settings.flops_per_token(VARIANTS[segment.job.variant].dense, segment.job.rank_ratio)
    return max(steps, 0) * settings.tokens_per_step * flops


class StudyPlan:
    """Which segments the study holds, given the finished records (``done``: run id → record)."""

    def __init__(self, settings: StudySettings, variants: list[str] | None = None):
        self.settings = settings
        self.variants = list(variants or settings.lr_grids)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
        missing = [v for v in self.variants if not settings.lr_grids.get(v)]
        if missing:
            raise ValueError(f"No learning-rate grid for {missing}; add them to `lr_grids`.")
        if settings.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {settings.seeds}.")
        if not 0 <= settings.rung_steps <= settings.steps:
            raise ValueError(f"rung_steps must be in [0, steps={settings.steps}], got {settings.rung_steps}.")
        unknown_parts = set(settings.parts) - {"grid", "seeds", "equal_flops", "rank_ablation", "stress"}
        if unknown_parts:
            raise ValueError(f"Unknown study parts {sorted(unknown_parts)}.")

    # ---------------------------------------------------------------------------------------- the main grid
    @property
    def rung(self) -> int:
        s = self.settings
        return s.rung_steps if 0 < s.rung_steps < s.steps else s.steps

    def grid_job(self, variant: str, lr: float) -> Job:
        return Job(variant, lr, self.settings.seed, self.settings.steps)

    def grid_lrs(self, variant: str, done: dict) -> list[float]:
        """The grid, extended upward while every run at the rung survives and the top is < 10× the best."""
        s = self.settings
        lrs = sorted(s.lr_grids[variant])
        for _ in range(s.max_extensions):
            records = [done.get(self.grid_job(variant, lr).id) for lr in lrs]
            if not all(is_done(r, self.rung) for r in records) or any(r["diverged"] for r in records):
                break
            best = min(records, key=lambda r: r["evals"][str(self.rung)])["lr"]
            if max(lrs) >= 10 * best * (1 - 1e-9):
                break
            lrs.append(next_half_decade(max(lrs)))
        return lrs

    def rung_complete(self, variant: str, done: dict) -> bool:
        """Every grid run has reached the rung; then `grid_lrs` has also stopped growing (it extends only while
        they all have)."""
        return all(is_done(done.get(self.grid_job(variant, lr).id), self.rung) for lr in self.grid_lrs(variant, done))

    def promoted(self, variant: str, done: dict) -> list[float]:
        """Grid lrs that train to the end: the best few at the rung, those close to the best, and the largest
        lr that has not diverged (if it diverges later, the next largest one, and so on)."""
        s = self.settings
        lrs = self.grid_lrs(variant, done)
        alive = [done[self.grid_job(variant, lr).id] for lr in lrs]
        alive = [r for r in alive if not (r["diverged"] and r["steps_done"] <= self.rung)]
        if not alive:
            return []
        rung_loss = {r["lr"]: r["evals"][str(self.rung)] for r in alive}
        ranked = sorted(rung_loss, key=rung_loss.get)
        best = rung_loss[ranked[0]]
        chosen = set(ranked[: s.promote_top]) | {lr for lr in ranked if rung_loss[lr] <= best + s.promote_margin}
        for lr in sorted(rung_loss, reverse=True):  # the largest surviving lr, falling back while it diverges
            chosen.add(lr)
            record = done.get(self.grid_job(variant, lr).id)
            if not (record and record["diverged"]):
                break
        return sorted(chosen)

    def grid_final(self, variant: str, done: dict) -> bool:
        """The grid is settled: every promoted run has finished (or diverged)."""
        if not self.rung_complete(variant, done):
            return False
        promoted = self.promoted(variant, done)
        return all(is_done(done.get(self.grid_job(variant, lr).id), self.settings.steps) for lr in promoted)

    def best_lr(self, variant: str, done: dict) -> float | None:
        """The lr whose fully trained grid run has the lowest final loss (diverged runs never win)."""
        finals = self.grid_finals(variant, done)
        alive = {lr: loss for lr, (loss, diverged) in finals.items() if not diverged}
        return min(alive, key=alive.get) if alive else None

    def top_stable_lr(self, variant: str, done: dict) -> float | None:
        """The largest lr whose fully trained grid run did not diverge."""
        finals = self.grid_finals(variant, done)
        alive = [lr for lr, (_, diverged) in finals.items() if not diverged]
        return max(alive) if alive else None

    def grid_finals(self, variant: str, done: dict) -> dict[float, tuple[float, bool]]:
        """lr → (final loss, diverged) of the grid runs trained to the end (or diverged at any point)."""
        out = {}
        for lr in self.grid_lrs(variant, done):
            record = done.get(self.grid_job(variant, lr).id)
            if record is not None and (record["diverged"] or record["steps_done"] >= self.settings.steps):
                out[lr] = (record["final_loss"], record["diverged"])
        return out

    # ---------------------------------------------------------------------------------------- follow-ups
    def seed_jobs(self, variant: str, done: dict) -> list[Job]:
        if not self.grid_final(variant, done):
            return []
        lrs = {self.best_lr(variant, done), self.top_stable_lr(variant, done)} - {None}
        s = self.settings
        return [Job(variant, lr, s.seed + i, s.steps) for lr in sorted(lrs) for i in range(1, s.seeds)]

    def stress_jobs(self, done: dict) -> list[Job]:
        s, jobs = self.settings, []
        for variant in STRESS_VARIANTS:
            if variant not in self.variants or not self.grid_final(variant, done):
                continue
            best = self.best_lr(variant, done)
            if best is not None:
                for lr in (best, float(f"{best * s.stress_factor:.4g}")):
                    jobs.append(Job(variant, lr, s.seed, s.steps, clip=False))
        return jobs

    def rank_jobs(self, done: dict) -> list[Job]:
        s = self.settings
        if RANK_VARIANT not in self.variants or not self.grid_final(RANK_VARIANT, done):
            return []
        best = self.best_lr(RANK_VARIANT, done)
        if best is None:
            return []
        return [
            Job(RANK_VARIANT, best, s.seed + i, s.steps, rank_ratio=r) for r in s.rank_ratios for i in range(s.seeds)
        ]

    def flops_steps(self, variant: str) -> int:
        """Steps at which ``variant`` spends the dense model's training FLOPs of a ``steps``-long run."""
        s = self.settings
        ratio = s.flops_per_token(dense=True) / s.flops_per_token(dense=VARIANTS[variant].dense)
        return round(s.steps * ratio)

    def flops_jobs(self, done: dict) -> list[Job]:
        s, jobs = self.settings, []
        for variant in FLOPS_VARIANTS:
            if variant not in self.variants or not self.grid_final(variant, done):
                continue
            best = self.best_lr(variant, done)
            if best is not None:
                jobs += [Job(variant, best, s.seed + i, self.flops_steps(variant)) for i in range(s.seeds)]
        return jobs

    # ---------------------------------------------------------------------------------------- what to run
    def segments(self, done: dict) -> list[Segment]:
        """Every segment not yet trained that can run now, most urgent first: runs that continue to the end
        (long, so they start early), then the grid's rung runs, then the follow-ups."""
        s, out = self.settings, []
        if "grid" in s.parts:
            for variant in self.variants:
                if self.rung_complete(variant, done):
                    for lr in self.promoted(variant, done):
                        out.append(Segment(self.grid_job(variant, lr), s.steps, "grid"))
            for variant in self.variants:
                for lr in self.grid_lrs(variant, done):
                    out.append(Segment(self.grid_job(variant, lr), self.rung, "grid"))
        if "seeds" in s.parts:
            out += [Segment(job, job.steps, "seeds") for v in self.variants for job in self.seed_jobs(v, done)]
        if "equal_flops" in s.parts:
            out += [Segment(job, job.steps, "equal_flops") for job in self.flops_jobs(done)]
        if "rank_ablation" in s.parts:
            out += [Segment(job, job.steps, "rank_ablation") for job in self.rank_jobs(done)]
        if "stress" in s.parts:
            out += [Segment(job, job.steps, "stress") for job in self.stress_jobs(done)]
        seen, pending = set(), []
        for segment in out:
            if segment.job.id not in seen and not is_done(done.get(segment.job.id), segment.stop_at):
                seen.add(segment.job.id)
                pending.append(segment)
        return pending

    def finished(self, done: dict) -> bool:
        return not self.segments(done)

    # What the shared scheduler (`scheduler.train_pending`) asks of every study's plan.
    def settings_for(self, job: Job) -> StudySettings:
        """The settings ``job`` trains under: this study has one set for all its runs."""
        return self.settings

    def fingerprint_of(self, record: dict) -> str | None:
        """The fingerprint a record must carry to count as one of this study's runs."""
        return self.settings.fingerprint()

    def cost(self, segment: Segment, done: dict) -> float:
        """Training FLOPs still to spend on ``segment`` (for the ETA)."""
        return remaining_flops(self.settings, segment, done)

    def remaining_cost(self, done: dict) -> float:
        """Training FLOPs of the work known now (later segments depend on results not yet in)."""
        return sum(self.cost(segment, done) for segment in self.segments(done))
