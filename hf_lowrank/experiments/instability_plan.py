"""The instability hunt's plan: naive low-rank AdamW against Spectron (dense AdamW as the control) under the
conditions that plausibly cause the paper's divergence, one factor at a time and all together.

Pure logic, like the stability study's `plan`. The baseline is the stability study's run at each variant's best lr
(width 256, 4 layers, 5% warm-up then cosine decay, clipping 1.0, float32); every other condition is a named set of
overrides of it: a deeper and narrower model, no warm-up, a constant lr at the peak, bf16 autocast, no gradient
clipping, 3× and 10× the tuned lr, and the combinations. Each condition's settings have their own fingerprint and
its name is the runs' tag, so a condition's records are never mixed with another's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .plan import VARIANTS, Job, Segment, StudySettings, is_done, remaining_flops, smoke_settings
from .scaling_plan import ModelSize

HUNT_VARIANTS = ("lowrank_adamw", "spectron", "dense_adamw")

# Each variant's best lr in the stability study (docs/results/stability/summary.json: width 256, 1,500 steps).
TUNED_LRS = {
    "dense_adamw": 1e-3,
    "lowrank_adamw": 1e-3,
    "spectron": 1e-2,
    "orthogonalize_only": 3e-3,
    "renormalize_only": 3e-2,
    "dense_muon": 1e-2,
}

# The deep condition's shape: 12 layers at width 128 hold 0.75× the projection parameters of the baseline's 4 at
# width 256 (2.37M vs 3.16M dense), so depth grows while the model and a step's cost stay about the same.
DEEP_SIZE = ModelSize(width=128, layers=12)


@dataclass(frozen=True)
class Condition:
    """A named way to train: `StudySettings` overrides (``model_overrides`` are merged into the base model's), a
    factor on each variant's tuned lr, and whether gradients are clipped."""

    name: str
    description: str
    settings: dict = field(default_factory=dict)
    lr_factor: float = 1.0
    clip: bool = True


def combine(name: str, description: str, *parts: Condition) -> Condition:
    """Every override of ``parts`` at once (lr factors multiply; clipping only if every part clips)."""
    settings: dict = {}
    factor = 1.0
    for part in parts:
        models = {**settings.get("model_overrides", {}), **part.settings.get("model_overrides", {})}
        settings.update(part.settings)
        if models:
            settings["model_overrides"] = models
        factor *= part.lr_factor
    return Condition(name, description, settings, factor, all(part.clip for part in parts))


def default_conditions(deep: ModelSize = DEEP_SIZE) -> tuple[Condition, ...]:
    """The baseline, each factor alone, and two combinations (at 3× and 10× the tuned lr)."""
    deep_condition = Condition(
        "deep", f"{deep.layers} layers at width {deep.width}", {"model_overrides": deep.overrides()}
    )
    no_warmup = Condition("no_warmup", "no warm-up (full lr from step 1), then cosine decay", {"warmup_ratio": 0.0})
    constant = Condition(
        "constant_lr", "warm-up, then the peak lr to the end (no decay)", {"lr_scheduler": "constant_with_warmup"}
    )
    bf16 = Condition("bf16", "bf16 autocast (float32 weights and optimizer state)", {"bf16": True})
    no_clip = Condition("no_clip", "no gradient clipping", clip=False)
    lr_3x = Condition("lr_3x", "3× the tuned lr", lr_factor=3.0)
    lr_10x = Condition("lr_10x", "10× the tuned lr", lr_factor=10.0)
    everything = (deep_condition, no_warmup, constant, bf16, no_clip)
    return (
        Condition("baseline", "the stability study's setting at the tuned lr"),
        deep_condition, no_warmup, constant, bf16, no_clip, lr_3x, lr_10x,
        combine("combined_3x", "all of the above at once, 3× the tuned lr", *everything, lr_3x),
        combine("combined_10x", "all of the above at once, 10× the tuned lr", *everything, lr_10x),
    )  # fmt: skip


def hunt_base_settings() -> StudySettings:
    """The stability study's settings; each run's steps come from the hunt (``steps``), not from here."""
    return dataclasses.replace(StudySettings(), steps=0, rung_steps=0)


@dataclass
class HuntSettings:
    """What the hunt trains (none of it is a run's identity: each condition's `StudySettings` is)."""

    base: StudySettings = field(default_factory=hunt_base_settings)
    steps: int = 1000  # every run; a constant-lr run spends 95% of them at the peak lr
    variants: tuple = HUNT_VARIANTS
    lrs: dict = field(default_factory=lambda: dict(TUNED_LRS))
    conditions: tuple = field(default_factory=default_conditions)
    seeds: int = 1
    # The control (dense AdamW) trains at these conditions only (None: at every one); the other variants train at
    # every condition. A dense run costs about 1.5× a factorized one, so on a small machine the control can be kept
    # to the conditions where it separates "low-rank breaks" from "this breaks any model".
    control: str = "dense_adamw"
    control_conditions: tuple | None = None
    # A run "learned" once its smoothed training loss got this far below the unigram baseline, and it "stalled at
    # unigram" when it did not diverge but its final validation loss ended within `stall_margin` of that baseline
    # (or above it) while the factor norms (dense: weight norms) grew: the paper's "6.95 (diverged)" picture.
    learn_margin: float = 0.5
    stall_margin: float = 0.25


def smoke_hunt_settings() -> HuntSettings:
    """Seconds-long settings on the `tiny` preset: every condition, 16 steps."""
    base = dataclasses.replace(smoke_settings(), steps=0, rung_steps=0, save_steps=1000)  # checkpoint at the end only
    return HuntSettings(base=base, steps=16, conditions=default_conditions(ModelSize(width=32, layers=4, head_dim=16)))


class HuntPlan:
    """Every (condition, variant, seed) run; none depends on another, so all are ready at once."""

    def __init__(self, settings: HuntSettings):
        self.settings = s = settings
        unknown = [v for v in s.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
        missing = [v for v in s.variants if v not in s.lrs]
        if missing:
            raise ValueError(
                f"No tuned lr for {missing} (the stability study tuned {sorted(s.lrs)}); choose from those, or add "
                "theirs to `HuntSettings.lrs`."
            )
        names = [c.name for c in s.conditions]
        if not names or len(set(names)) < len(names):
            raise ValueError(f"Conditions must be given and named uniquely, got {names}.")
        bad = [n for n in names if not re.fullmatch(r"[a-z0-9_]+", n)]
        if bad:
            raise ValueError(f"Condition names {bad} must be lowercase letters, digits and '_' (they go in run ids).")
        if s.control_conditions is not None:
            unknown = [n for n in s.control_conditions if n not in names]
            if unknown:
                raise ValueError(f"Control conditions {unknown} are not among the hunt's conditions {names}.")
            if s.control not in s.variants:
                raise ValueError(
                    f"Control conditions are given but the control ({s.control}) is not among the variants "
                    f"{list(s.variants)}: add it to --variants, or leave out --control_conditions."
                )
        if s.steps < 1 or s.seeds < 1:
            raise ValueError(f"steps and seeds must be at least 1, got {s.steps} and {s.seeds}.")
        self.variants = list(s.variants)
        self.conditions = {c.name: c for c in s.conditions}
        self._settings = {c.name: condition_settings(s.base, c) for c in s.conditions}

    def condition_settings(self, name: str) -> StudySettings:
        return self._settings[name]

    def lr(self, variant: str, condition: Condition) -> float:
        return float(f"{self.settings.lrs[variant] * condition.lr_factor:.4g}")

    def job(self, variant: str, condition: Condition, seed: int = 0) -> Job:
        s = self.settings
        return Job(variant, self.lr(variant, condition), s.base.seed + seed, s.steps, clip=condition.clip,
                   tag=condition.name)  # fmt: skip

    def trains(self, variant: str, condition: Condition) -> bool:
        """Whether ``variant`` trains at ``condition``: always, except the control outside its conditions."""
        s = self.settings
        return variant != s.control or s.control_conditions is None or condition.name in s.control_conditions

    def jobs(self) -> list[Job]:
        return [
            self.job(variant, condition, seed)
            for condition in self.conditions.values() for variant in self.variants if self.trains(variant, condition)
            for seed in range(self.settings.seeds)
        ]  # fmt: skip

    def segments(self, done: dict) -> list[Segment]:
        """Every run not yet trained, the costliest first (the slowest finish early, not last)."""
        pending = [Segment(job, job.steps, "hunt") for job in self.jobs() if not is_done(done.get(job.id), job.steps)]
        return sorted(pending, key=lambda segment: -self.cost(segment, done))

    def finished(self, done: dict) -> bool:
        return not self.segments(done)

    def settings_for(self, job: Job) -> StudySettings:
        return self._settings[job.tag]

    def fingerprint_of(self, record: dict) -> str | None:
        """Records of a condition this call does not train (another --conditions) are left alone."""
        settings = self._settings.get(record.get("tag", ""))
        return None if settings is None else settings.fingerprint()

    def cost(self, segment: Segment, done: dict) -> float:
        """Training FLOPs still to spend on ``segment``."""
        return remaining_flops(self.settings_for(segment.job), segment, done)

    def remaining_cost(self, done: dict) -> float:
        return sum(self.cost(segment, done) for segment in self.segments(done))


def condition_settings(base: StudySettings, condition: Condition) -> StudySettings:
    """``base`` with ``condition``'s overrides (its model overrides merged into the base model's)."""
    overrides = dict(condition.settings)
    if "model_overrides" in overrides:
        overrides["model_overrides"] = {**base.model_overrides, **overrides["model_overrides"]}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(StudySettings)}
    if unknown:
        raise ValueError(f"Condition {condition.name!r} overrides unknown settings {sorted(unknown)}.")
    return dataclasses.replace(base, **overrides)
