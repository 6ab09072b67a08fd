"""The instability hunt: naive low-rank AdamW against Spectron (dense AdamW as the control) under conditions that
plausibly cause the paper's divergence, one factor at a time and combined.

The runs are decided by :mod:`.instability_plan`, trained by :mod:`.runner` through the package's own pretraining
path and scheduled by :mod:`.scheduler`, as the stability study's are; :mod:`.instability_report` writes
``summary.json``, ``results.md`` and the plots. Records are written atomically per run and checkpoints kept under
``--cache_dir``, so a killed hunt restarts where it stood.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from pathlib import Path

from ..cli_support import CommandParser
from .instability_plan import HuntPlan, HuntSettings, smoke_hunt_settings
from .instability_report import write_report
from .plan import VARIANTS
from .runner import prepare_data
from .scheduler import add_scheduling_flags, holding, quiet_environment, study_key, study_parser, train_pending


def run_hunt(
    settings: HuntSettings,
    out_dir: str | os.PathLike,
    *,
    workers: int = 2,
    cache_dir: str | os.PathLike = "runs/instability-cache",
    max_segments: int | None = None,
    command: str | None = None,
    log=print,
) -> dict:
    """Train every run of the hunt not yet recorded under ``out_dir/runs``, then write the report.

    Returns ``{"trained": [run ids trained by this call], "summary": the summary.json payload}``.
    """
    plan = HuntPlan(settings)  # refuses impossible settings before anything is written
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Conditions change the model's shape, never the vocabulary: one tokenized corpus serves them all.
    data_dir, data_info = prepare_data(settings.base, cache_dir, log=log)
    with holding(cache_dir / f"instability-{study_key(out_dir)}", "instability hunt", out_dir):
        done, trained = train_pending(
            plan, runs_dir, data_dir, cache_dir, out_dir, workers=workers, threads=settings.base.threads_per_worker,
            max_segments=max_segments, log=log,
        )  # fmt: skip
        summary = write_report(out_dir, plan, done, data_info, command or command_line(settings, out_dir))
    state = "complete" if plan.finished(done) else f"{len(plan.segments(done))} runs still to train"
    log(f"wrote {out_dir}/summary.json, results.md and plots ({len(trained)} runs trained by this call; {state})")
    return {"trained": trained, "summary": summary}


def command_line(settings: HuntSettings, out_dir, *, smoke: bool = False, workers: int = 2) -> str:
    """The command that trains (or, finished, regenerates) the hunt ``settings`` describe."""
    words = ["hf-lowrank", "instability-hunt", "--out", str(out_dir)] + (["--smoke"] if smoke else [])
    words += ["--steps", str(settings.steps), "--variants", *settings.variants]
    words += ["--conditions", *(c.name for c in settings.conditions), "--seeds", str(settings.seeds)]
    if settings.control_conditions is not None:
        words += ["--control_conditions", *settings.control_conditions]
    words += ["--workers", str(workers)]
    if settings.base.device != "cpu":
        words += ["--device", settings.base.device]
    return shlex.join(words)


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> CommandParser:
    parser = study_parser("hf-lowrank instability-hunt", __doc__)
    defaults = HuntSettings()
    names = [c.name for c in defaults.conditions]
    parser.add_argument("--steps", type=int, help=f"Steps of every run (default {defaults.steps}).")
    parser.add_argument("--conditions", nargs="+", choices=names, help=f"Default: all of {names}.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help=f"Default: {list(defaults.variants)}.")
    parser.add_argument("--seeds", type=int, help=f"Seeds per condition and variant (default {defaults.seeds}).")
    parser.add_argument(
        "--control_conditions",
        nargs="+",
        choices=names,
        help=f"Train the control ({defaults.control}) at these conditions only (default: every condition).",
    )
    add_scheduling_flags(parser, "runs/instability-cache")
    return parser


def settings_from_args(args: argparse.Namespace) -> HuntSettings:
    """The hunt the parsed flags describe: the defaults (or the smoke settings) with every given flag applied."""
    settings = smoke_hunt_settings() if args.smoke else HuntSettings()
    if args.conditions is not None:
        settings.conditions = tuple(c for c in settings.conditions if c.name in args.conditions)
    if args.variants is not None:
        settings.variants = tuple(args.variants)
    for name in ("steps", "seeds", "control_conditions"):
        if getattr(args, name) is not None:
            value = getattr(args, name)
            setattr(settings, name, tuple(value) if isinstance(value, list) else value)
    settings.base = dataclasses.replace(settings.base, threads_per_worker=args.threads, device=args.device)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    quiet_environment()
    run_hunt(
        settings,
        args.out,
        workers=args.workers,
        cache_dir=args.cache_dir,
        max_segments=0 if args.report_only else args.max_segments,
        command=command_line(settings, args.out, smoke=args.smoke, workers=args.workers),
    )
    return 0
