"""The scaling study: dense AdamW, dense Muon and Spectron at several model sizes and training-FLOP budgets, with
learning rates carried from size to size, and fitted laws of loss vs parameters and of the compute-optimal size.

What runs when is decided by :mod:`.scaling_plan`; every run is trained by :mod:`.runner` through the package's own
pretraining path and scheduled by :mod:`.scheduler`, as the stability study's runs are; :mod:`.scaling_report`
turns the records into ``summary.json``, ``results.md`` and the plots. Records are written atomically per run and
checkpoints kept under ``--cache_dir``, so a killed study restarts where it stood.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from pathlib import Path

from ..cli_support import CommandParser
from .plan import VARIANTS
from .runner import prepare_data
from .scaling_plan import ScalingPlan, ScalingSettings, smoke_scaling_settings
from .scaling_report import write_report
from .scheduler import add_scheduling_flags, holding, quiet_environment, study_key, study_parser, train_pending


def run_scaling_study(
    settings: ScalingSettings,
    out_dir: str | os.PathLike,
    *,
    workers: int = 2,
    cache_dir: str | os.PathLike = "runs/scaling-cache",
    max_segments: int | None = None,
    command: str | None = None,
    log=print,
) -> dict:
    """Train every run of the study not yet recorded under ``out_dir/runs``, then write the report.

    Returns ``{"trained": [run ids, one per segment trained by this call], "summary": the summary.json payload}``.
    """
    plan = ScalingPlan(settings)  # refuses impossible settings before anything is written
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Every size shares the tokenizer and the packed corpus (the data fingerprint leaves the model's shape out).
    data_dir, data_info = prepare_data(plan.size_settings(plan.sizes[0]), cache_dir, log=log)
    with holding(cache_dir / f"scaling-{study_key(out_dir)}", "scaling study", out_dir):
        done, trained = train_pending(
            plan, runs_dir, data_dir, cache_dir, out_dir, workers=workers, threads=settings.base.threads_per_worker,
            max_segments=max_segments, log=log,
        )  # fmt: skip
        summary = write_report(out_dir, plan, done, data_info, command or command_line(settings, out_dir))
    state = "complete" if plan.finished(done) else f"{len(plan.segments(done))} segments ready to train"
    log(f"wrote {out_dir}/summary.json, results.md and plots ({len(trained)} segments trained by this call; {state})")
    return {"trained": trained, "summary": summary}


def command_line(settings: ScalingSettings, out_dir, *, smoke: bool = False, workers: int = 2) -> str:
    """The command that trains (or, finished, regenerates) the study ``settings`` describe."""
    words = ["hf-lowrank", "scaling-study", "--out", str(out_dir)] + (["--smoke"] if smoke else [])
    words += ["--widths", *map(str, settings.widths), "--layers", str(settings.layers)]
    words += ["--budgets", *(f"{b:g}" for b in settings.budgets), "--variants", *settings.variants]
    words += ["--seeds", str(settings.seeds), "--workers", str(workers)]
    words += ["--batch_size", str(settings.base.batch_size), "--block_size", str(settings.base.block_size)]
    for name, value in settings.base.data.items():
        words += [f"--{name}", *(value if isinstance(value, list) else [value])]
    if settings.base.bf16:
        words += ["--bf16"]
    if settings.base.device != "cpu":
        words += ["--device", settings.base.device]
    return shlex.join(words)


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> CommandParser:
    parser = study_parser("hf-lowrank scaling-study", __doc__)
    defaults = ScalingSettings()
    parser.add_argument("--widths", type=int, nargs="+", help=f"Model widths (default {list(defaults.widths)}).")
    parser.add_argument("--layers", type=int, help=f"Layers of every size (default {defaults.layers}).")
    parser.add_argument(
        "--budgets", type=float, nargs="+", help=f"Training FLOPs per run (default {list(defaults.budgets)})."
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help=f"Default: {list(defaults.variants)}.")
    parser.add_argument("--seeds", type=int, help=f"Seeds at the largest size (default {defaults.seeds}).")
    parser.add_argument(
        "--batch_size", type=int, help=f"Sequences per step (default {defaults.base.batch_size}; raise it on GPUs)."
    )
    parser.add_argument("--block_size", type=int, help=f"Tokens per sequence (default {defaults.base.block_size}).")
    parser.add_argument("--dataset_name", help="Text to train on: a Hub dataset or a save_to_disk folder.")
    parser.add_argument("--dataset_config_name", help="Configuration of --dataset_name, e.g. 'en'.")
    parser.add_argument("--train_files", nargs="+", help="Local text files or globs (.txt, .jsonl, .parquet ...).")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 weights), as on GPUs.")
    add_scheduling_flags(parser, "runs/scaling-cache")
    return parser


def settings_from_args(args: argparse.Namespace) -> ScalingSettings:
    """The study the parsed flags describe: the defaults (or the smoke settings) with every given flag applied."""
    settings = smoke_scaling_settings() if args.smoke else ScalingSettings()
    for name in ("widths", "budgets", "variants"):
        if getattr(args, name) is not None:
            setattr(settings, name, tuple(getattr(args, name)))
    for name in ("layers", "seeds"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.base = dataclasses.replace(
        settings.base, threads_per_worker=args.threads, device=args.device, bf16=args.bf16 or settings.base.bf16
    )
    if args.batch_size is not None:
        settings.base = dataclasses.replace(settings.base, batch_size=args.batch_size)
    if args.block_size is not None:  # the model's positions must cover a block
        overrides = {**settings.base.model_overrides, "max_position_embeddings": args.block_size}
        settings.base = dataclasses.replace(settings.base, block_size=args.block_size, model_overrides=overrides)
    data = {k: getattr(args, k) for k in ("dataset_name", "dataset_config_name", "train_files") if getattr(args, k)}
    if data:  # default: the built-in corpus
        settings.base = dataclasses.replace(settings.base, data=data)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    quiet_environment()
    run_scaling_study(
        settings,
        args.out,
        workers=args.workers,
        cache_dir=args.cache_dir,
        max_segments=0 if args.report_only else args.max_segments,
        command=command_line(settings, args.out, smoke=args.smoke, workers=args.workers),
    )
    return 0
