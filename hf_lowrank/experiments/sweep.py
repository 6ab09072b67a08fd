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

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from ..cli_support import CommandParser
from ..training.run_dir import OutputDirInUseError, RunLock
from .plan import VARIANTS, StudyPlan, StudySettings, smoke_settings
from .report import write_report
from .runner import prepare_data, run_segment, worker_init


def load_finished(runs_dir: Path, fingerprint: str, log=print) -> dict[str, dict]:
    """Records of these settings, by run id; records of other settings are ignored (and will be retrained)."""
    done = {}
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("fingerprint") == fingerprint:
            done[record["id"]] = record
        else:
            log(f"ignoring {path.name}: trained with other settings (fingerprint {record.get('fingerprint')})")
    return done


class _InlineExecutor(Executor):
    """Runs each job at submission, in this process (``--workers 0``: tests and debugging)."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller by future.result(), as a process pool does
            future.set_exception(error)
        return future


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
    # One checkpoint folder per (settings, results folder): two studies never continue each other's runs.
    study_key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:8]
    checkpoints = cache_dir / f"checkpoints-{settings.fingerprint()}-{study_key}"
    lock = RunLock(checkpoints)  # one study per results folder: two would train the same runs into one folder
    try:
        lock.acquire()
    except OutputDirInUseError as error:
        raise OutputDirInUseError(f"Another stability study is writing {out_dir}: {error}") from None
    try:
        return _train_and_report(plan, settings, out_dir, runs_dir, checkpoints, data_dir, data_info, workers,
                                 max_segments, log)  # fmt: skip
    finally:
        lock.release()


def _train_and_report(plan, settings, out_dir, runs_dir, checkpoints, data_dir, data_info, workers, max_segments, log):
    done = load_finished(runs_dir, settings.fingerprint(), log=log)
    log(
        f"{len(done)} runs recorded, {len(plan.segments(done))} segments ready to train; {max(workers, 1)} "
        f"worker(s) with {settings.threads_per_worker} thread(s) each"
    )
    trained: list[str] = []
    started, trained_cost = time.time(), 0.0
    executor = (
        _InlineExecutor()
        if workers == 0
        else ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=worker_init,
            initargs=(settings.threads_per_worker,),
        )
    )
    running: dict[Future, tuple] = {}
    with executor:
        while True:
            busy = {segment.job.id for segment, _ in running.values()}
            ready = [s for s in plan.segments(done) if s.job.id not in busy]
            budget = None if max_segments is None else max_segments - len(trained) - len(running)
            while ready and len(running) < max(workers, 1) and (budget is None or budget > 0):
                segment = ready.pop(0)
                future = executor.submit(run_segment, segment, settings, data_dir, runs_dir, checkpoints)
                running[future] = (segment, plan.cost(segment, done))
                budget = None if budget is None else budget - 1
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                segment, cost = running.pop(future)
                record = future.result()
                done[record["id"]] = record
                trained.append(record["id"])
                trained_cost += cost
                elapsed = time.time() - started
                known = sum(plan.cost(s, done) for s in plan.segments(done))
                eta = known * elapsed / max(trained_cost, 1.0)
                log(
                    f"[{len(trained)} segments, {len(plan.segments(done))} ready] {record['id']} ({segment.part}) "
                    f"step {record['steps_done']}/{record['steps']}: validation loss {record['final_loss']:.3f}"
                    f"{' DIVERGED' if record['diverged'] else ''}, {record['spikes']} spikes, max ‖ΔW‖₂ "
                    f"{record['max_update_norm']:.3g}, {record['segments'][-1]['wall_s']:.0f} s | elapsed "
                    f"{_clock(elapsed)}, ETA of the work known now {_clock(eta)}"
                )
    summary = write_report(out_dir, plan, done, data_info)
    state = "complete" if plan.finished(done) else f"{len(plan.segments(done))} segments still to train"
    log(f"wrote {out_dir}/summary.json, results.md and plots ({len(trained)} segments trained by this call; {state})")
    return {"trained": trained, "summary": summary}


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="hf-lowrank stability-study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="Results folder: runs/*.json, summary.json, results.md, plots.")
    parser.add_argument("--smoke", action="store_true", help="Seconds-long tiny settings (checks the tool).")
    parser.add_argument("--workers", type=int, default=2, help="Training processes (0: in this process).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per worker.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="Default: every variant.")
    parser.add_argument("--seeds", type=int, help="Seeds at each variant's best and largest stable lr (default 2).")
    parser.add_argument("--max_segments", type=int, help="Stop after this many run segments (resume later).")
    parser.add_argument(
        "--report_only", action="store_true", help="Rewrite the report from the records; train nothing."
    )
    parser.add_argument("--cache_dir", default="runs/stability-cache", help="Tokenized corpus and checkpoints.")
    args = parser.parse_args(argv)
    settings = smoke_settings() if args.smoke else StudySettings()
    settings.threads_per_worker = args.threads
    if args.seeds is not None:
        settings.seeds = args.seeds
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads halve throughput on a shared CPU
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    run_study(
        settings,
        args.out,
        variants=args.variants,
        workers=args.workers,
        cache_dir=args.cache_dir,
        max_segments=0 if args.report_only else args.max_segments,
    )
    return 0
