"""Files every command writes or looks for: the atomic writers and the names shared between commands.

A leaf (standard library only), so light modules (cards, conversion, evaluation) can use it without importing torch
or the training stack. A file written here is complete or absent, never torn: it is written under a temporary name
beside its destination, fsynced, renamed over it, and the rename is made durable.
"""

import json
import os
import shutil
from pathlib import Path

STAGING_PREFIX = ".tmp-"  # a file or folder being written: .tmp-checkpoint-N, .tmp-metrics.json.<pid>

# Records a model folder carries beside its weights: written by `pretrain` and `evaluate`, read by the card and
# uploaded by `push`.
TRAINING_SUMMARY_NAME = "training_summary.json"
EVAL_RESULTS_NAME = "eval_results.json"

# The files a saved tokenizer may consist of (any `transformers` tokenizer, slow or fast): a model folder holding one
# of them carries a tokenizer, which conversion copies and publishing uploads.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (the folder's own metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsynced and renamed, so readers see all or nothing."""
    path = Path(path)
    tmp = path.with_name(f"{STAGING_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: dict, *, sort_keys: bool = True) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (see `write_text_atomic`). ``sort_keys=False`` keeps
    the payload's order, for records people read (a run's metrics and summary); values JSON cannot hold (a path, a
    NumPy integer) are written as their ``str``."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_folder_atomic(folder: str | os.PathLike, files: dict[str, "os.PathLike | bytes"]) -> None:
    """Create ``folder`` (absent or empty) holding ``files``, relative path -> bytes or a file to copy, all or nothing:
    they are written into a staging folder beside it, fsynced, and the folder is renamed into place."""
    folder = Path(folder)
    staging = folder.with_name(f"{STAGING_PREFIX}{folder.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
            fsync_file(target)
        if folder.exists():
            folder.rmdir()  # empty, as the caller checked; a file that appeared since makes this fail, losing nothing
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(folder.parent)


__all__ = [
    "EVAL_RESULTS_NAME",
    "STAGING_PREFIX",
    "TOKENIZER_FILES",
    "TRAINING_SUMMARY_NAME",
    "fsync_dir",
    "fsync_file",
    "write_folder_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
