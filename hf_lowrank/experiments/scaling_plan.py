"""The scaling study's plan: which runs it holds and in what order, derived from the finished records alone.

Pure logic (no torch, no training), like the stability study's `plan`: a restarted study recomputes where it
stands from ``runs/*.json``.

The study trains each variant at several model sizes (one width per size at a matched depth, the stability
study's proportions: head dimension 64, MLP 2.6875× the width) and at several training-FLOP budgets. A run's
steps are its budget over the FLOPs of one step (`hf_lowrank.bench.flops.training_flops_per_token` × tokens per
step), so at equal FLOPs a factorized model trains more steps than the dense one of the same width.

Learning rates are carried from size to size. At the smallest budget each (variant, size) trains 3 half-decade
points around a centre: the stability study's best lr at the smallest size, the previous (smaller) size's chosen
lr after that. A best point at an edge of the points trained adds the next half-decade point beyond it (at most
``max_lr_extensions`` of them); the lowest final loss of a run that did not diverge is the chosen lr. The other
budgets reuse the chosen lr (one seed), and the largest size trains ``seeds`` seeds at every budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .plan import (
    VARIANTS,
    Job,
    Segment,
    StudySettings,
    is_done,
    next_half_decade,
    previous_half_decade,
    remaining_flops,
    smoke_settings,
)

# The stability study's MLP proportion (688 / 256), rounded per size to a multiple of 8.
MLP_RATIO = 2.6875
MLP_MULTIPLE = 8

SCALING_VARIANTS = ("dense_adamw", "dense_muon", "spectron")

# Centre of each variant's first lr search (the smallest size): the stability study's best lr at width 256
# (docs/results/stability/summary.json; dense Muon's too: 0.01, 3.357 and 3.327 at 1,500 steps).
LR_CENTRES = {
    "dense_adamw": 1e-3,
    "lowrank_adamw": 1e-3,
    "spectron": 1e-2,
    "orthogonalize_only": 3e-3,
    "renormalize_only": 3e-2,
    "dense_muon": 1e-2,
}
TUNING_POINTS = 3  # half-decade points per (variant, size) before edge extensions


@dataclass(frozen=True, order=True)
class ModelSize:
    """One model size: ``width`` hidden units, ``layers`` layers, heads of ``head_dim``, MLP at `MLP_RATIO`."""

    width: int
    layers: int
    head_dim: int = 64

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def intermediate(self) -> int:
        return max(MLP_MULTIPLE, round(self.width * MLP_RATIO / MLP_MULTIPLE) * MLP_MULTIPLE)

    @property
    def tag(self) -> str:
        """The size's part of a run id (`Job.tag`)."""
        return f"w{self.width}d{self.layers}"

    def overrides(self) -> dict:
        # Multi-head attention (as the stability shape): no grouped-query heads whose count a width would have to
        # divide.
        return dict(
            hidden_size=self.width,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
        )


def scaling_base_settings() -> StudySettings:
    """The stability study's settings (vocabulary 2,048, 128-token blocks, 8 per step, cosine with 5% warm-up,
    clipping 1.0); each size replaces the model's shape and each run's steps come from its budget."""
    return dataclasses.replace(StudySettings(), steps=0, rung_steps=0, save_steps=250)


@dataclass
class ScalingSettings:
    """What the scaling study trains (none of it is a run's identity: each size's `StudySettings` is)."""

    base: StudySettings = field(default_factory=scaling_base_settings)
    widths: tuple = (128, 256, 384)  # non-embedding parameters of the dense models: 0.79M, 3.16M, 7.12M (9×)
    layers: int = 4
    head_dim: int = 64
    # Training FLOPs per run, 3.3× apart, sized so the whole study fits about 4 worker-hours of a 2-core CPU: 3e12 is
    # 0.085× the stability study's dense run (3.52e13). Steps at width 128 / 256 / 384: dense 436 / 128 / 60 and
    # 1,455 / 426 / 201, factorized 762 / 256 / 129 and 2,541 / 854 / 429; no run repeats the built-in corpus.
    budgets: tuple = (3e12, 1e13)
    variants: tuple = SCALING_VARIANTS
    lr_centres: dict = field(default_factory=lambda: dict(LR_CENTRES))
    seeds: int = 2  # at the largest size, at every budget
    max_lr_extensions: int = 2  # half-decade points added beyond an edge of the 3 tuning points
    min_steps: int = 20  # a budget that leaves a run fewer steps than this is refused (warm-up, a curve to read)


def smoke_scaling_settings() -> ScalingSettings:
    """Seconds-long settings on the `tiny` preset (widths 32/48/64, 2 layers) that exercise every rule."""
    base = dataclasses.replace(smoke_settings(), steps=0, rung_steps=0, save_steps=1000)  # checkpoint at the end only
    return ScalingSettings(
        base=base, widths=(32, 48, 64), layers=2, head_dim=16, budgets=(6e8, 1.2e9), max_lr_extensions=1, min_steps=4
    )


class ScalingPlan:
    """Which segments the scaling study holds, given the finished records (``done``: run id → record)."""

    def __init__(self, settings: ScalingSettings):
        self.settings = s = settings
        unknown = [v for v in s.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
        missing = [v for v in s.variants if v not in s.lr_centres]
        if missing:
            raise ValueError(f"No starting lr for {missing}; add them to `lr_centres`.")
        if not s.widths or not s.budgets:
            raise ValueError("Give at least one width (--widths) and one training-FLOP budget (--budgets).")
        if len(set(s.widths)) < len(s.widths) or len(set(s.budgets)) < len(s.budgets):
            raise ValueError(f"Widths {list(s.widths)} and budgets {list(s.budgets)} must not repeat.")
        bad = [w for w in s.widths if w <= 0 or w % s.head_dim]
        if bad:
            raise ValueError(f"Widths {bad} are not positive multiples of the head dimension {s.head_dim}.")
        if s.seeds < 1 or s.layers < 1:
            raise ValueError(f"seeds and layers must be at least 1, got {s.seeds} and {s.layers}.")
        self.variants = list(s.variants)
        self.sizes = sorted(ModelSize(w, s.layers, s.head_dim) for w in s.widths)
        self.budgets = sorted(float(b) for b in s.budgets)
        overrides = s.base.model_overrides
        self._settings = {
            size.tag: dataclasses.replace(s.base, model_overrides={**overrides, **size.overrides()})
            for size in self.sizes
        }
        short = [
            f"{v} at width {size.width}: {self.steps(v, size, b)} steps at {b:.3g} FLOPs"
            for v in self.variants for size in self.sizes for b in self.budgets
            if self.steps(v, size, b) < s.min_steps
        ]  # fmt: skip
        if short:
            raise ValueError(
                f"Budgets too small for these sizes (fewer than {s.min_steps} steps): {'; '.join(short)}. Raise "
                "--budgets or lower --widths."
            )

    # ---------------------------------------------------------------------------------------- sizes and budgets
    def size_settings(self, size: ModelSize) -> StudySettings:
        return self._settings[size.tag]

    def flops_per_step(self, variant: str, size: ModelSize) -> float:
        settings = self.size_settings(size)
        return settings.flops_per_token(VARIANTS[variant].dense) * settings.tokens_per_step

    def steps(self, variant: str, size: ModelSize, budget: float) -> int:
        """Steps that spend ``budget`` training FLOPs (rounded to a whole step)."""
        return round(budget / self.flops_per_step(variant, size))

    def job(self, variant: str, size: ModelSize, budget: float, lr: float, seed: int = 0) -> Job:
        return Job(variant, lr, self.settings.base.seed + seed, self.steps(variant, size, budget), tag=size.tag)

    @property
    def tuning_budget(self) -> float:
        return self.budgets[0]

    # ---------------------------------------------------------------------------------------- lr carried by size
    def centre(self, variant: str, index: int, done: dict) -> float | None:
        """Centre of the lr search at ``self.sizes[index]``: the previous size's chosen lr (None until chosen)."""
        if index == 0:
            return self.settings.lr_centres[variant]
        return self.chosen_lr(variant, index - 1, done)

    def tuning_lrs(self, variant: str, index: int, done: dict) -> list[float] | None:
        """The lrs tuned at this size: 3 half-decade points around the centre, extended by one point past an edge
        that holds the best loss (or downward while every point diverged), at most ``max_lr_extensions`` times."""
        centre = self.centre(variant, index, done)
        if centre is None:
            return None
        lrs = [previous_half_decade(centre), centre, next_half_decade(centre)]
        for _ in range(self.settings.max_lr_extensions):
            finals = self._finals(variant, index, lrs, done)
            if finals is None:
                break
            alive = {lr: loss for lr, (loss, diverged) in finals.items() if not diverged}
            best = min(alive, key=alive.get) if alive else None
            if best is None or best == lrs[0]:
                lrs.insert(0, previous_half_decade(lrs[0]))
            elif best == lrs[-1]:
                lrs.append(next_half_decade(lrs[-1]))
            else:
                break
        return lrs

    def _finals(self, variant, index, lrs, done) -> dict[float, tuple[float, bool]] | None:
        """lr → (final loss, diverged) once every run at ``lrs`` has finished, else None."""
        jobs = {lr: self.job(variant, self.sizes[index], self.tuning_budget, lr) for lr in lrs}
        records = {lr: done.get(job.id) for lr, job in jobs.items()}
        if not all(is_done(records[lr], job.steps) for lr, job in jobs.items()):
            return None
        return {lr: (r["final_loss"], r["diverged"]) for lr, r in records.items()}

    def tuning_finals(self, variant: str, index: int, done: dict) -> dict[float, tuple[float, bool]] | None:
        """The settled tuning points of this size (None while any is still to train or to be added)."""
        lrs = self.tuning_lrs(variant, index, done)
        return None if lrs is None else self._finals(variant, index, lrs, done)

    def chosen_lr(self, variant: str, index: int, done: dict) -> float | None:
        """The tuned lr whose run ended lowest without diverging (None until settled, or if every point diverged)."""
        finals = self.tuning_finals(variant, index, done)
        alive = {lr: loss for lr, (loss, diverged) in (finals or {}).items() if not diverged}
        return min(alive, key=alive.get) if alive else None

    # ---------------------------------------------------------------------------------------- runs at the chosen lr
    def seeds_at(self, index: int) -> int:
        return self.settings.seeds if index == len(self.sizes) - 1 else 1

    def chosen_jobs(self, variant: str, index: int, done: dict) -> list[Job]:
        """Every run at the chosen lr: each budget, ``seeds`` seeds at the largest size (1 elsewhere); the run at
        the tuning budget and the first seed is the tuning run itself."""
        lr = self.chosen_lr(variant, index, done)
        if lr is None:
            return []
        size = self.sizes[index]
        return [self.job(variant, size, b, lr, seed) for b in self.budgets for seed in range(self.seeds_at(index))]

    # ---------------------------------------------------------------------------------------- what to run
    def segments(self, done: dict) -> list[Segment]:
        """Segments not yet trained that can run now: the lr tuning first (each size waits for the previous one's
        choice, so it is the critical path), then the runs at the chosen lrs, longest first."""
        tuning, chosen = [], []
        for index, size in enumerate(self.sizes):
            for variant in self.variants:
                for lr in self.tuning_lrs(variant, index, done) or []:
                    job = self.job(variant, size, self.tuning_budget, lr)
                    tuning.append(Segment(job, job.steps, "tuning"))
                chosen += [Segment(job, job.steps, "budgets") for job in self.chosen_jobs(variant, index, done)]
        chosen.sort(key=lambda segment: -self.cost(segment, done))
        seen, pending = set(), []
        for segment in tuning + chosen:
            if segment.job.id not in seen and not is_done(done.get(segment.job.id), segment.stop_at):
                seen.add(segment.job.id)
                pending.append(segment)
        return pending

    def finished(self, done: dict) -> bool:
        return not self.segments(done)

    def settings_for(self, job: Job) -> StudySettings:
        return self._settings[job.tag]

    def fingerprint_of(self, record: dict) -> str | None:
        """Records of a size this call does not train (another --widths) are left alone."""
        settings = self._settings.get(record.get("tag", ""))
        return None if settings is None else settings.fingerprint()

    def cost(self, segment: Segment, done: dict) -> float:
        """Training FLOPs still to spend on ``segment``."""
        return remaining_flops(self.settings_for(segment.job), segment, done)

    def remaining_cost(self, done: dict) -> float:
        """FLOPs of the segments ready now plus those that wait on an lr choice (a run spends about its budget):
        3 tuning points per size not reached yet, and every chosen-lr run of a size not yet tuned."""
        total = sum(self.cost(segment, done) for segment in self.segments(done))
        for variant in self.variants:
            for index in range(len(self.sizes)):
                if self.tuning_lrs(variant, index, done) is None:
                    total += TUNING_POINTS * self.tuning_budget
                if self.chosen_lr(variant, index, done) is None:
                    total += sum(self.budgets) * self.seeds_at(index) - self.tuning_budget
        return total
