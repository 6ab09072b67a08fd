"""Crash-safe checkpoints: atomic saves, a completion manifest, verified resume, safe loading (R1, R2, R7).

A save writes everything into a hidden staging folder next to the final one (``.tmp-checkpoint-N``), fsyncs
every file and the folder, renames it to ``checkpoint-N``, fsyncs the parent, and only then writes
``checkpoint_manifest.json`` (the size and sha256 of every file), itself atomically. A checkpoint is
*complete* when its manifest exists and every listed file has the listed size and hash. Resume picks the
newest complete checkpoint; an incomplete or torn one is skipped with a warning naming the bad file, and
rotation never deletes the newest checkpoint that verifies nor counts one that does not (R28).

Everything in a checkpoint other than the weights (safetensors) is loaded with ``torch.load(weights_only=True)``
or is JSON. ``training_args.bin``, which transformers pickles, is never loaded.

Test hook: with the environment variable ``HF_LOWRANK_TEST_CRASH_AT`` set to one of :data:`SAVE_STAGES`, the
process kills itself with SIGKILL when a save reaches that stage, so tests can crash a real run mid-save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState

from ..files import STAGING_PREFIX, fsync_dir, fsync_file, write_json_atomic
from .guards import check_state_dict

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
EXTRA_STATE_NAME = "lowrank_trainer_state.json"  # guard counters and spike-detector state, JSON
TRASH_PREFIX = ".trash-"  # .trash-checkpoint-N: being deleted
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

CRASH_ENV = "HF_LOWRANK_TEST_CRASH_AT"
# In order: weights written, optimizer/scheduler/RNG written, trainer state written, files fsynced, folder
# renamed (no manifest yet), manifest written, first old checkpoint moved out by rotation.
SAVE_STAGES = ("model", "optimizer", "state", "fsync", "rename", "manifest", "rotate")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, torn, tampered with or unsafe to load; the message names the file."""


def crash_point(stage: str) -> None:
    """Test hook: SIGKILL this process at ``stage`` of a save when ``HF_LOWRANK_TEST_CRASH_AT`` names it."""
    assert stage in SAVE_STAGES, stage
    if os.environ.get(CRASH_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- durability
# The writers (`write_json_atomic`, `write_text_atomic`, `fsync_*`) and `STAGING_PREFIX` (.tmp-checkpoint-N: being
# written; never matches checkpoint-*) live in `hf_lowrank.files`, a leaf that light modules can import too.
def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- naming
def staging_dir(run_dir: str | os.PathLike, name: str) -> Path:
    return Path(run_dir) / f"{STAGING_PREFIX}{name}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of ``run_dir``, oldest (smallest N) first, complete or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether the save of ``checkpoint`` finished (its manifest exists); :func:`verify_checkpoint` checks files."""
    return (Path(checkpoint) / MANIFEST_NAME).is_file()


# ---------------------------------------------------------------------------------------------- save
def commit_checkpoint(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Turn a fully written staging folder into the complete checkpoint ``final`` (main process only).

    fsync every file and the folder, rename to ``final``, fsync the parent, then write the manifest last. A folder
    already named ``final`` (an interrupted save of the same step, or a checkpoint being redone after resuming
    from an older one) is moved aside to ``.trash-checkpoint-N`` and deleted only once the new one is complete;
    :func:`remove_leftovers` puts it back if the process dies before that.
    """
    staging, final = Path(staging), Path(final)
    for path in _files(staging):
        fsync_file(path)
    for folder in sorted({p.parent for p in _files(staging)} | {staging}, key=lambda p: -len(p.parts)):
        fsync_dir(folder)
    crash_point("fsync")
    replaced = None
    if final.exists():
        logger.warning("Replacing %s, which an earlier save left behind, with a new save of the same step.", final)
        replaced = final.with_name(f"{TRASH_PREFIX}{final.name}")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(staging, final)
    fsync_dir(final.parent)
    crash_point("rename")
    write_manifest(final)
    crash_point("manifest")
    # The manifest was just hashed from these very files: rotation, resume and the exit messages need not hash them
    # again to know they verify.
    _verified[_key(final)] = _signature(final)
    if replaced is not None:
        shutil.rmtree(replaced)


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record the size and sha256 of every file of ``checkpoint`` in its manifest, atomically: the completion
    marker, written last."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in _files(checkpoint)
        if p.name != MANIFEST_NAME
    }
    write_json_atomic(checkpoint / MANIFEST_NAME, {"format": 1, "files": files})


def _remove_tree(path: Path) -> None:
    """Delete a folder so that a crash midway never leaves a half-deleted ``checkpoint-N``: rename it to a
    hidden trash name first (atomic), then delete."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def remove_leftovers(run_dir: str | os.PathLike) -> None:
    """Clean up after a save or a rotation that was interrupted (main process, when training starts).

    Staging folders are deleted. A trash folder holds a checkpoint that was being replaced or deleted: it is put
    back when it is complete and its step has no complete checkpoint any more, and deleted otherwise.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.iterdir()):
        if not (path.is_dir() and path.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and "checkpoint-" in path.name):
            continue
        if path.name.startswith(TRASH_PREFIX):
            final = run_dir / path.name[len(TRASH_PREFIX) :]
            if is_complete(path) and not is_complete(final):
                if final.exists():
                    shutil.rmtree(final)
                os.rename(path, final)
                logger.warning("Restored %s, whose replacement was interrupted.", final)
                continue
        logger.warning("Removing %s, left by an interrupted checkpoint save.", path)
        shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(run_dir: str | os.PathLike, save_total_limit: int | None, keep: set[str] = frozenset()) -> None:
    """Keep the newest ``save_total_limit`` checkpoints that *verify* (plus those in ``keep``: the best one, the one
    a stopping run just saved) and delete the older ones (R28).

    Candidates are verified newest first, and only until ``save_total_limit`` have passed; a checkpoint this process
    saved, or verified before and unchanged since, is not hashed again, so rotation hashes each older checkpoint at
    most once per process and the ones this process saved not at all. One that fails (no manifest, torn, corrupted)
    does not count toward the limit. Every checkpoint older than the newest one that verifies and not kept is
    deleted, failed or not: resume always prefers that newer one. Failed checkpoints *newer* than it are left alone:
    resume never picks them, the run replaces each when it saves that step again, and until then they are there to
    be inspected. When none verifies, nothing is deleted.
    """
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = list_checkpoints(run_dir)
    kept: list[Path] = []  # verified, newest first
    for checkpoint in reversed(checkpoints):
        if len(kept) == save_total_limit:
            break
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as error:
            logger.warning("Not counting %s toward save_total_limit=%d: %s", checkpoint, save_total_limit, error)
            continue
        kept.append(checkpoint)
    if not kept:
        return
    newest = checkpoint_step(kept[0])
    protected = {_key(p) for p in kept} | {_key(k) for k in keep}
    doomed = [p for p in checkpoints if checkpoint_step(p) < newest and _key(p) not in protected]
    for i, path in enumerate(doomed):
        logger.info("Deleting older checkpoint %s (save_total_limit=%d).", path, save_total_limit)
        _remove_tree(path)
        if i == 0:
            crash_point("rotate")


# ---------------------------------------------------------------------------------------------- verify
_verified: dict[str, tuple] = {}  # _key(path) -> file signature when its files last matched its manifest


def _key(checkpoint: str | os.PathLike) -> str:
    return os.path.abspath(checkpoint)


def _signature(checkpoint: Path) -> tuple:
    return tuple((str(p.relative_to(checkpoint)), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(checkpoint))


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the file unless every file in the manifest has its size and hash and
    the small state files load (:func:`check_state_files`).

    A checkpoint whose files have not changed (names, sizes, modification times) since they last matched the
    manifest, in a check or in this process's save, is not hashed again.
    """
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"Checkpoint {checkpoint} is incomplete: it has no {MANIFEST_NAME} (its save was interrupted)."
        )
    signature = _signature(checkpoint)
    if _verified.get(_key(checkpoint)) != signature:
        _check_hashes(checkpoint, manifest_path)
        _verified[_key(checkpoint)] = signature
    check_state_files(checkpoint)


def _check_hashes(checkpoint: Path, manifest_path: Path) -> None:
    files = _read_manifest(manifest_path)
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {manifest_path}).")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path} is torn: {size} bytes where the manifest records {expected['size']} (truncated or rewritten "
                "after the save)."
            )
        if sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {manifest_path} (corrupted or tampered with).")


def _read_manifest(manifest_path: Path) -> dict:
    """The ``files`` entry of a manifest, checked: every entry a relative name with an integer size and a sha256,
    and a weights file among them (a manifest listing nothing would vouch for nothing)."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable ({error}).") from error
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path} is malformed: it has no 'files' object.")
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (
            not (isinstance(size, int) and isinstance(digest, str))
            or Path(name).is_absolute()
            or ".." in Path(name).parts
        ):
            raise CheckpointError(f"{manifest_path} is malformed: its entry for {name!r} is {entry!r}.")
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"{manifest_path} lists no weights file ({sorted(files) or 'no files at all'}).")
    return files


def read_extra_state(path: str | os.PathLike) -> dict:
    """The package's trainer state (`EXTRA_STATE_NAME`), checked; a malformed file is a :class:`CheckpointError`
    naming it."""
    try:
        state = json.loads(Path(path).read_text())
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}, not an object")
        check_state_dict(state.get("guard"))
        if not isinstance(state.get("settings", {}), dict):
            raise ValueError("its 'settings' entry is not an object")
        offset = state.get("data_step_offset", 0)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"its 'data_step_offset' is {offset!r}, not a non-negative integer")
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is malformed ({error}).") from error
    return state


def check_state_files(checkpoint: str | os.PathLike) -> None:
    """Check that the small state files of ``checkpoint`` can be loaded: ``trainer_state.json`` (a TrainerState of
    this checkpoint's step), the package's trainer state and ``scheduler.pt``. A malformed one would otherwise crash
    the resume with a KeyError/TypeError deep in the Trainer; here it is a :class:`CheckpointError` naming it,
    so auto-resume falls back to an older checkpoint."""
    checkpoint = Path(checkpoint)
    path = checkpoint / TRAINER_STATE_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"it holds a {type(data).__name__}, not an object")
            state = TrainerState(**data)
            step = state.global_step
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"its global_step is {step!r}")
            if checkpoint_step(checkpoint) not in (None, step):
                raise ValueError(f"its global_step {step} is not the step of {checkpoint.name}")
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is malformed ({error}).") from error
    path = checkpoint / EXTRA_STATE_NAME
    if path.is_file():
        read_extra_state(path)
    path = checkpoint / SCHEDULER_NAME
    if path.is_file():
        state = load_state_file(path)
        if not (isinstance(state, dict) and isinstance(state.get("last_epoch"), int)):
            raise CheckpointError(
                f"{path} is malformed: not a learning-rate scheduler's state (no integer last_epoch)."
            )


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``run_dir`` that is complete and verified, or None.

    Newer checkpoints that are incomplete or torn are skipped with a warning that names the bad file.
    """
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as error:
            logger.warning("Not resuming from %s: %s Falling back to an older checkpoint.", checkpoint, error)
            continue
        return str(checkpoint)
    return None


def resolve_resume_checkpoint(path: str | os.PathLike) -> str:
    """Check a user-given ``resume_from_checkpoint`` folder before anything is loaded or written."""
    checkpoint = Path(path)
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: no such folder. Pass an existing checkpoint-N folder, or leave it "
            "unset to resume from the newest complete checkpoint in --output_dir (or start fresh if there is none)."
        )
    if not checkpoint.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path} is a file; pass a checkpoint-N folder.")
    if is_complete(checkpoint):
        verify_checkpoint(checkpoint)
    elif list_checkpoints(checkpoint):
        raise ValueError(
            f"--resume_from_checkpoint {path} is a run folder, not a checkpoint; pass one of its checkpoint-N "
            f"folders (e.g. {list_checkpoints(checkpoint)[-1]})."
        )
    else:
        logger.warning(
            "Checkpoint %s has no %s (written by another tool, or its save was interrupted): loading it unverified.",
            checkpoint,
            MANIFEST_NAME,
        )
    return str(checkpoint)


# ---------------------------------------------------------------------------------------------- load
def load_state_file(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a pickle payload is
    refused and never runs. Any failure is a :class:`CheckpointError` naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the file's name
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"Refused to load {path}: it is not a plain tensor file (torch.load(weights_only=True) rejected it; "
                "it may carry code). Nothing from it was run. Delete this checkpoint or restore it from a trusted "
                f"copy. Details: {str(error).splitlines()[0]}"
            ) from error
        raise CheckpointError(f"Could not load {path} (truncated or corrupted?): {error}") from error


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of the safetensors file ``path``, read from its header (no data is read); a
    file whose header cannot be read, or does not cover the file, is a :class:`CheckpointError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Could not read {path} (truncated or corrupted?): {error}") from error


def weights_misfit(saved: dict[str, tuple[int, ...]], model: torch.nn.Module, saved_as: str, model_as: str = "model"):
    """What keeps tensors of these names and shapes (``saved``) from loading into ``model``, as one phrase, or None.

    Tensors the model ties to another one (the LM head of tied embeddings) may be absent. Ties are found by
    parameter identity, so ``model`` may live on the meta device. ``saved_as``/``model_as`` name the two sides."""
    parameters = model.state_dict(keep_vars=True)  # the model's own tensors: tied ones are the same object
    expected = {name: tuple(tensor.shape) for name, tensor in parameters.items()}
    tied: dict[int, set[str]] = {}
    for name, tensor in parameters.items():
        tied.setdefault(id(tensor), set()).add(name)
    wrong_shape = [
        f"{k}: {saved_as} {saved[k]}, {model_as} {v}" for k, v in expected.items() if k in saved and saved[k] != v
    ]
    unexpected = sorted(set(saved) - set(expected))
    missing = [k for k in expected if not tied[id(parameters[k])] & set(saved)]
    return (
        "; ".join(
            part
            for part in (
                f"{len(wrong_shape)} tensors differ in shape (e.g. {wrong_shape[0]})" if wrong_shape else "",
                f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(missing)} model tensors missing (e.g. {missing[0]})" if missing else "",
            )
            if part
        )
        or None
    )


def check_weights_fit(checkpoint: str | os.PathLike, model: torch.nn.Module) -> None:
    """Refuse, before any weight is loaded, a checkpoint saved for a model of another shape.

    Compares the safetensors headers (names and shapes; no data is read) with ``model``'s state dict. Tensors the
    model ties to another one (the LM head of tied embeddings) may be absent from the file.
    """
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        return  # a PEFT adapter checkpoint: PEFT checks its own tensors
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        if any(checkpoint.glob("pytorch_model*.bin")):
            raise CheckpointError(
                f"{checkpoint} holds pickled weights (pytorch_model*.bin) and no model.safetensors; only safetensors weights are "
                "loaded (pickle can run code). Convert the weights to safetensors."
            )
        return
    saved = {key: shape for path in files for key, shape in tensor_shapes(path).items()}
    details = weights_misfit(saved, model, saved_as="checkpoint")
    if details:
        raise ValueError(
            f"Checkpoint {checkpoint} was saved for a different model: {details}. Resume with the model settings it "
            "was trained with (--preset, --config_overrides, --rank/--rank_ratio, --dense), or start a new run in a "
            "new --output_dir."
        )
