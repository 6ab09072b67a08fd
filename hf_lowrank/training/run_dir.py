"""The output folder of a run: one writer at a time (R20), no foreign folder overwritten (R21), and a completion
marker that makes re-running a finished command a no-op (R19).

* **Lock.** The main process holds an exclusive ``fcntl.flock`` on ``run.lock`` inside the folder for the whole run
  and writes its pid, host, command and start time into it. The OS releases the lock when the holder dies, however
  it dies, so a second run is refused only while the first one is alive; a lock file that still names a holder but
  is not locked was left by a killed run and is taken over with a warning. The file stays (empty) after a clean
  exit: it is also what marks the folder as a run of this package. On a filesystem without ``flock`` (some cluster
  filesystems), a holder that is alive on this host is still refused.
* **Foreign folders.** An existing non-empty folder that holds no lock file, ``training_summary.json``,
  completion marker or checkpoint saved by this package is refused unless ``--overwrite_output_dir`` is given.
* **Completion.** ``run_complete.json`` is written atomically after every other output file; a run whose marker
  records that it reached the requested ``--max_steps`` (or epochs) is complete, and re-running its command
  changes nothing.

Multi-process launches check and lock once, on the main process; the outcome (go, complete, or the error) is
broadcast to every process, so that no rank trains alone while rank 0 refuses, and the broadcast is issued by every
rank (never in a rank-0-only branch, R17).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import torch.distributed as dist

from ..files import TRAINING_SUMMARY_NAME
from .checkpointing import MANIFEST_NAME, STAGING_PREFIX, TRASH_PREFIX, list_checkpoints, write_json_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
COMPLETE_NAME = "run_complete.json"

T = TypeVar("T")


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output folder's lock; the message names it."""


# ---------------------------------------------------------------------------------------------- R21
def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by a run of this package (a lock file, a summary, a completion marker, or a
    checkpoint saved with this package's manifest, complete or still being written)."""
    path = Path(path)
    if any((path / name).is_file() for name in (LOCK_NAME, TRAINING_SUMMARY_NAME, COMPLETE_NAME)):
        return True
    if any((checkpoint / MANIFEST_NAME).is_file() for checkpoint in list_checkpoints(path)):
        return True
    return any(p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and "checkpoint-" in p.name for p in path.iterdir())


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an empty ``--output_dir`` and an existing non-empty folder that is not a run of this package (whose
    files a run would overwrite), unless ``overwrite``."""
    if not str(output_dir).strip():
        raise ValueError(
            "--output_dir is empty, which would write the run into the current folder; pass a folder for the run."
        )
    path = Path(output_dir)
    if overwrite or not path.is_dir() or is_run_dir(path):
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"--output_dir {path} is a non-empty folder ({shown}) that is not a run of hf-lowrank (no {LOCK_NAME}, "
            f"{TRAINING_SUMMARY_NAME} or checkpoint of this package): its files would be overwritten. Choose a new or empty "
            "--output_dir, or pass --overwrite_output_dir to write into it anyway."
        )


# ---------------------------------------------------------------------------------------------- R20
def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (
        f"process {holder.get('pid')} on host {holder.get('host')}, started {started}, command: {holder.get('command')}"
    )


def _read_holder(path: Path) -> dict | None:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "(unreadable lock file)"}


def _alive_here(holder: dict) -> bool:
    """Whether ``holder`` is a live process on this host (other than this one)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """An exclusive lock on a run folder, held by the main process for the whole run (see the module docs)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _read_holder(self.path) or {"pid": "?", "host": "?", "command": "(not written yet)"}
            handle.close()
            raise OutputDirInUseError(
                f"{self.path.parent} is in use by another run ({_describe(holder)}); two runs in one folder would "
                "overwrite each other's checkpoints. Wait for it to finish or stop it, or choose another --output_dir."
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                handle.close()
                raise
            locked = False
        previous = _read_holder(self.path)
        if not locked:
            if previous and _alive_here(previous):
                handle.close()
                raise OutputDirInUseError(
                    f"{self.path.parent} is in use by another run ({_describe(previous)}); choose another --output_dir."
                )
            logger.warning(
                "The filesystem of %s does not support flock: a second run started on another host is not detected.",
                self.path.parent,
            )
        if previous:
            logger.warning(
                "Taking over the stale lock %s of %s: that process is no longer running (it was killed or crashed). "
                "Its complete checkpoints are kept.",
                self.path,
                _describe(previous),
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv),
            "started": time.time(),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle

    def release(self) -> None:
        """Empty the file (an empty lock file is a clean exit, not a stale lock), then unlock. The file is not
        deleted: a process that opened it before the deletion could then lock a file nobody else sees."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        handle.seek(0)
        handle.truncate()
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ---------------------------------------------------------------------------------------------- R19
def mark_complete(output_dir: str | os.PathLike, global_step: int, training_args) -> None:
    """Record, atomically and last, that the run in ``output_dir`` finished at ``global_step``."""
    write_json_atomic(
        Path(output_dir) / COMPLETE_NAME,
        {
            "global_step": global_step,
            "max_steps": training_args.max_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def already_complete_message(output_dir: str | os.PathLike, record: dict) -> str:
    """What every command prints when re-running it finds its run complete (``record``: `completed_run`'s)."""
    return (
        f"The run in {output_dir} is complete (step {record['global_step']}); nothing was changed. To train further, "
        "raise --max_steps; to start over, use a new --output_dir."
    )


def completed_run(output_dir: str | os.PathLike, training_args) -> dict | None:
    """The completion record of the run in ``output_dir`` if it already reached the target of ``training_args``
    (``--max_steps``, or the same number of epochs when ``--max_steps`` is not set), else None: a run that was
    stopped before its end, or asked now to train further, resumes."""
    path = Path(output_dir) / COMPLETE_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if training_args.max_steps > 0:
        done = record["global_step"] >= training_args.max_steps
    else:
        done = record["max_steps"] <= 0 and record["num_train_epochs"] == training_args.num_train_epochs
    return record if done else None


# ---------------------------------------------------------------------------------------------- the whole folder
def on_main_process(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and give every process its result, or raise its error everywhere.

    Every process issues the broadcast (R17); without a process group this is just ``fn()``.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(fn(), None)]
        except Exception as error:  # noqa: BLE001 - re-raised on every rank after the broadcast
            outcome = [(None, error)]
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


@contextmanager
def open_run_dir(output_dir: str | os.PathLike, training_args, overwrite: bool = False) -> Iterator[dict | None]:
    """Check (R21) and lock (R20) ``output_dir`` for the ``with`` block, on the main process only; yield the
    completion record when the run there has already reached this run's target (R19), else None."""
    lock = RunLock(output_dir)

    def check_and_lock() -> dict | None:
        check_output_dir(output_dir, overwrite)
        lock.acquire()
        try:
            return completed_run(output_dir, training_args)
        except BaseException:
            lock.release()
            raise

    completed = on_main_process(check_and_lock)
    try:
        yield completed
    finally:
        lock.release()
