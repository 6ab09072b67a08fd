"""The scheduler every study shares: which run segments are recorded, training the rest in worker processes with
progress lines and an ETA, one study per results folder, and the environment a study command sets up.

A study supplies a *plan* (the stability study's `plan.StudyPlan`, the scaling study's `scaling_plan.ScalingPlan`,
the instability hunt's `instability_plan.HuntPlan`) with:

* ``segments(done)``: the segments not yet trained that can run now, most urgent first (``done``: run id →
  record);
* ``settings_for(job)``: the `StudySettings` a job trains under (a study may hold several: sizes, conditions);
* ``fingerprint_of(record)``: the fingerprint a record must carry to count as this study's run (``None``: the
  record belongs to no settings of this plan);
* ``cost(segment, done)`` and ``remaining_cost(done)``: training FLOPs, for the ETA.

Every segment is trained by `runner.run_segment` (the package's own pretraining path) and its record written
atomically under ``runs/``; checkpoints live under ``--cache_dir`` in one folder per settings fingerprint and
results folder, so a killed study restarts where it stood.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from ..cli_support import CommandParser
from ..training.run_dir import OutputDirInUseError, RunLock
from .plan import StudySettings
from .runner import run_segment, worker_init


def load_finished(runs_dir: Path, fingerprint_of, log=print) -> dict[str, dict]:
    """This study's records by run id. ``fingerprint_of(record)`` is the fingerprint a record must carry; records of
    other settings are reported and ignored (their runs are retrained), records of no settings of this plan
    (``None``: e.g. a size left out of this call) are kept on disk and left out quietly."""
    done = {}
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        expected = fingerprint_of(record)
        if expected is None:
            continue
        if record.get("fingerprint") == expected:
            done[record["id"]] = record
        else:
            log(f"ignoring {path.name}: trained with other settings (fingerprint {record.get('fingerprint')})")
    return done


def study_key(out_dir: Path) -> str:
    """A short key of the results folder: two studies with the same settings never continue each other's runs."""
    return hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:8]


def checkpoints_dir(cache_dir: Path, settings: StudySettings, out_dir: Path) -> Path:
    """Where the runs of ``settings`` written to ``out_dir`` keep their checkpoints."""
    return Path(cache_dir) / f"checkpoints-{settings.fingerprint()}-{study_key(out_dir)}"


@contextlib.contextmanager
def holding(lock_dir: Path, what: str, out_dir: Path):
    """Hold ``lock_dir`` for the whole study: a second study writing the same results folder would train the
    same runs into it."""
    lock = RunLock(lock_dir)
    try:
        lock.acquire()
    except OutputDirInUseError as error:
        raise OutputDirInUseError(f"Another {what} is writing {out_dir}: {error}") from None
    try:
        yield
    finally:
        lock.release()


class _InlineExecutor(Executor):
    """Runs each job at submission, in this process (``--workers 0``: tests and debugging)."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller by future.result(), as a process pool does
            future.set_exception(error)
        return future


def _executor(workers: int, threads: int) -> Executor:
    if workers == 0:
        return _InlineExecutor()
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=worker_init, initargs=(threads,)
    )


def train_pending(
    plan, runs_dir: Path, data_dir: Path, cache_dir: Path, out_dir: Path, *, workers: int, threads: int,
    max_segments: int | None, log=print,
) -> tuple[dict[str, dict], list[str]]:  # fmt: skip
    """Train every segment ``plan`` holds that ``runs_dir`` does not record yet, as results come in (a finished
    segment can make new ones ready), at most ``workers`` at a time and ``max_segments`` in all.

    Returns ``(done, trained)``: every record of this study by run id, and the ids of the segments this call
    trained, in the order they finished.
    """
    done = load_finished(runs_dir, plan.fingerprint_of, log=log)
    log(
        f"{len(done)} runs recorded, {len(plan.segments(done))} segments ready to train; {max(workers, 1)} "
        f"worker(s) with {threads} thread(s) each"
    )
    trained: list[str] = []
    started, trained_cost = time.time(), 0.0
    running: dict[Future, tuple] = {}
    with _executor(workers, threads) as executor:
        while True:
            busy = {segment.job.id for segment, _ in running.values()}
            ready = [s for s in plan.segments(done) if s.job.id not in busy]
            budget = None if max_segments is None else max_segments - len(trained) - len(running)
            while ready and len(running) < max(workers, 1) and (budget is None or budget > 0):
                segment = ready.pop(0)
                settings = plan.settings_for(segment.job)
                checkpoints = checkpoints_dir(cache_dir, settings, out_dir)
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
                log(_progress_line(plan, done, trained, segment, record, time.time() - started, trained_cost))
    return done, trained


def _progress_line(plan, done, trained, segment, record, elapsed, trained_cost) -> str:
    # The ETA scales the time so far by training FLOPs: the FLOPs still to spend over those spent.
    eta = plan.remaining_cost(done) * elapsed / max(trained_cost, 1.0)
    return (
        f"[{len(trained)} segments, {len(plan.segments(done))} ready] {record['id']} ({segment.part}) "
        f"step {record['steps_done']}/{record['steps']}: validation loss {record['final_loss']:.3f}"
        f"{' DIVERGED' if record['diverged'] else ''}, {record['spikes']} spikes, max ‖ΔW‖₂ "
        f"{record['max_update_norm']:.3g}, {record['segments'][-1]['wall_s']:.0f} s | elapsed "
        f"{clock(elapsed)}, ETA of the work planned now {clock(eta)}"
    )


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def study_parser(prog: str, doc: str) -> CommandParser:
    """The parser of a study command (described by the first paragraph of ``doc``), with the flags every study takes
    first: where its results go and the smoke settings."""
    parser = CommandParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", required=True, help="Results folder: runs/*.json, summary.json, results.md, plots.")
    parser.add_argument("--smoke", action="store_true", help="Seconds-long tiny settings (checks the tool).")
    return parser


def add_scheduling_flags(parser: CommandParser, cache_dir: str, *, device: bool = True) -> None:
    """The flags every study takes last: how its runs are scheduled (`train_pending`) and where its cache lives."""
    parser.add_argument("--workers", type=int, default=2, help="Training processes (0: in this process).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per worker.")
    if device:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where the runs train.")
    parser.add_argument("--max_segments", type=int, help="Stop after this many run segments (resume later).")
    parser.add_argument(
        "--report_only", action="store_true", help="Rewrite the report from the records; train nothing."
    )
    parser.add_argument("--cache_dir", default=cache_dir, help="Tokenized corpus and checkpoints.")


def quiet_environment() -> None:
    """What every study command sets before training: offline data, no progress bars, quiet libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads halve throughput on a shared CPU
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
