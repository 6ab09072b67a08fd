"""The stability study: the paper's ablation (dense AdamW, naive low-rank AdamW, orthogonalization only,
renormalization only, Spectron) over learning-rate grids, with further seeds, runs without gradient clipping,
the rank ablation and the equal-training-FLOPs comparison.

What runs when is decided by :mod:`.plan` (successive halving: the whole grid to a first rung, then only the
runs that can still matter to the end, from their checkpoints); each run segment is trained by :mod:`.runner`
through the package's own pretraining path; :mod:`.report` turns the records into ``summary.json``,
``results.md`` and the plots. A run's record is written atomically after each of its segments and checkpoints
are kept under ``--cache_dir``, so a killed study restarts where it stood: finished runs are not redone and a
run interrupted mid-segment continues from its last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from .plan import VARIANTS, StudyPlan, StudySettings, smoke_settings
from .report import write_report
from .runner import prepare_data
from .scheduler import add_scheduling_flags, checkpoints_dir, holding, quiet_environment, study_parser, train_pending


def run_study(
    settings: StudySettings,
    out_dir: str | os.PathLike,
    *,
    variants: list[str] | None = None,
    workers: int = 2,
    cache_dir: str | os.PathLike = "runs/stability-cache",
    max_segments: int | None = None,
    log=print,
) -> dict:
    """Train every segment of the study not already recorded under ``out_dir/runs``, then write the report.

    ``max_segments`` stops after that many segments (the report is still written): the study resumes from there.
    Returns ``{"trained": [run ids, one per segment trained by this call], "summary": the summary.json payload}``.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = StudyPlan(settings, variants)
    data_dir, data_info = prepare_data(settings, cache_dir, log=log)
    # The study's only checkpoint folder doubles as its lock: one study per results folder.
    with holding(checkpoints_dir(cache_dir, settings, out_dir), "stability study", out_dir):
        done, trained = train_pending(
            plan, runs_dir, data_dir, cache_dir, out_dir, workers=workers, threads=settings.threads_per_worker,
            max_segments=max_segments, log=log,
        )  # fmt: skip
        summary = write_report(out_dir, plan, done, data_info)
    state = "complete" if plan.finished(done) else f"{len(plan.segments(done))} segments still to train"
    log(f"wrote {out_dir}/summary.json, results.md and plots ({len(trained)} segments trained by this call; {state})")
    return {"trained": trained, "summary": summary}


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = study_parser("hf-lowrank stability-study", __doc__)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="Default: every variant.")
    parser.add_argument("--seeds", type=int, help="Seeds at each variant's best and largest stable lr (default 2).")
    add_scheduling_flags(parser, "runs/stability-cache", device=False)
    args = parser.parse_args(argv)
    settings = smoke_settings() if args.smoke else StudySettings()
    settings.threads_per_worker = args.threads
    if args.seeds is not None:
        settings.seeds = args.seeds
    quiet_environment()
    run_study(
        settings,
        args.out,
        variants=args.variants,
        workers=args.workers,
        cache_dir=args.cache_dir,
        max_segments=0 if args.report_only else args.max_segments,
    )
    return 0
