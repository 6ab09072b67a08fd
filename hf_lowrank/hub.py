"""Publishing a checkpoint to the Hugging Face Hub.

One push is one commit carrying every file (R9): weights (safetensors only, R7), config, the model code that makes
the repo loadable with ``trust_remote_code=True`` without this package (R8), tokenizer files, the rendered model
card, plots and the training/evaluation records. The Hub applies a commit whole or not at all, so a failed push
leaves the branch as it was.

Only a whole model is published, and the repo then holds that model alone (R30): a run folder whose final save did
not finish, torn weights, and weights whose tensor names or shapes do not fit the model their own config builds are
refused before anything is sent; files an earlier model left in the repo (weights in any format, shard indexes,
tokenizer and config files) are deleted by the same commit. Every request to the Hub waits at most ``timeout``
seconds per step, and a Hub that stalls, answers HTML instead of its API's JSON, or fails is one `PushError`
(exit status 1), never a hang or a bad-input error (R32).
"""

import fcntl
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
    set_client_factory,
)
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http as hub_http
from huggingface_hub.utils import validate_repo_id

from . import __version__, modeling_lowrank
from .cards import (
    load_lowrank_config,
    plot_files,
    render_model_card,
)
from .cli_support import CommandParser
from .configuration_lowrank import LowRankLlamaConfig, count_parameters
from .files import EVAL_RESULTS_NAME, TOKENIZER_FILES, TRAINING_SUMMARY_NAME, write_folder_atomic
from .modeling_lowrank import AUTO_CLASSES
from .training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_step,
    list_checkpoints,
    tensor_shapes,
    verify_checkpoint,
    weights_misfit,
)
from .training.run_dir import COMPLETE_NAME, LOCK_NAME

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
CODE_FILES = ("configuration_lowrank.py", "modeling_lowrank.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The names `from_pretrained` reads safetensors weights from: one file, or an index naming its shards.
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# What makes a file in a repo part of a model (R30). Weights in any format, and their indexes, anywhere in the repo;
# config, generation, adapter, tokenizer and record files under these names anywhere; model code and plots at the
# top level. A push deletes those of an earlier model that its own upload does not replace.
MODEL_WEIGHT_SUFFIXES = (
    ".safetensors",
    *PICKLE_SUFFIXES,
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".h5",
    ".msgpack",
    ".tflite",
)
MODEL_FILE_NAMES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    *TOKENIZER_FILES,
    TRAINING_SUMMARY_NAME,
    EVAL_RESULTS_NAME,
)
MODEL_TOP_LEVEL_SUFFIXES = (".py", ".png")
DEFAULT_TIMEOUT_S = 60.0
# What `save_pretrained` writes once the classes are registered for the Auto classes (see hf_lowrank/__init__.py).
AUTO_MAP = {
    "AutoConfig": "configuration_lowrank.LowRankLlamaConfig",
    **{auto: f"modeling_lowrank.{name}" for auto, name in AUTO_CLASSES.items()},
}
# A git branch or tag name as the Hub accepts it, or a commit sha: it is pasted into the card's usage snippets.
_REVISION = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
# HfHubHTTPError derives from the HTTP client's base error (and OSError); catching its bases also catches
# connection errors, timeouts and unreadable files, which fail the upload the same way.
_UPLOAD_ERRORS = (HfHubHTTPError, *HfHubHTTPError.__bases__)
# huggingface_hub 1.x sends its requests with httpx, 2.x with httpx2: the library its HTTP error derives from.
_HTTP_LIBRARY = sys.modules[HfHubHTTPError.__bases__[0].__module__.partition(".")[0]]
_TIMEOUT_PHASES = ("connect", "read", "write", "pool")


class PushError(RuntimeError):
    """The Hub refused or failed the upload."""


def _check_repo_id(repo_id: str) -> None:
    validate_repo_id(repo_id)  # raises HFValidationError, a ValueError
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'ORG/NAME' (a user or organization, then the model name), got {repo_id!r}.")


def check_revision(revision: str | None) -> None:
    """A branch name or commit sha that is safe to create, commit to and paste into the card's code (R27)."""
    if revision is not None and not _REVISION.fullmatch(revision):
        raise ValueError(
            f"--revision {revision!r} is not a valid branch name or commit sha: use letters, digits, '.', '_', '-' "
            "and '/' (no spaces, quotes or '..', not starting with '-' or ending with '/' or '.')."
        )


def check_auto_map(config_dict: dict, config_path: Path) -> None:
    """Refuse an ``auto_map`` that would make remote-code users run anything but the uploaded model code (R27):
    entries must name a class of ``configuration_lowrank``/``modeling_lowrank``, never another repository's code
    (``org/repo--module.Class``)."""
    modules = {name.removesuffix(".py") for name in CODE_FILES}
    for auto_class, reference in (config_dict.get("auto_map") or {}).items():
        references = reference if isinstance(reference, (list, tuple)) else [reference]
        for ref in references:
            if ref is None:
                continue
            module, _, class_name = str(ref).rpartition(".")
            if "--" in str(ref) or module not in modules or not class_name.isidentifier():
                raise ValueError(
                    f"{config_path}: auto_map[{auto_class!r}] = {ref!r} does not point at this model's own code "
                    f"({' or '.join(sorted(modules))}); a published config must never load code from elsewhere. "
                    "Save the model again with `save_pretrained` (with hf_lowrank imported) to rewrite it."
                )


def _regular_files(model_dir: Path) -> list[Path]:
    """The top-level files of ``model_dir``; a symlink is refused unless it resolves inside the folder (R27)."""
    root = model_dir.resolve()
    files = []
    for path in sorted(model_dir.iterdir()):
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise ValueError(
                    f"{path} is a symbolic link to {target}, outside {model_dir}: a push uploads only files inside "
                    "the model folder. Replace the link with a copy of the file, or remove it."
                )
        if path.is_file():
            files.append(path)
    return files


# ---------------------------------------------------------------------------------------------- a whole model (R30)
def _lock_held(lock_path: Path) -> bool:
    """Whether a live run holds ``lock_path`` (the exclusive ``flock`` of `RunLock`); False where flock is missing."""
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a filesystem without flock: the run's own lock cannot be seen from here either
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def check_final_save(model_dir: Path) -> None:
    """Refuse a folder whose final save is not verified.

    A ``checkpoint-N`` folder (or any folder with a checkpoint manifest) must verify against its manifest. A run
    folder of ``hf-lowrank pretrain`` (its lock file, completion marker, or a checkpoint with this package's manifest)
    must not be in use by a live run and must hold the completion marker, which the run writes after its final save
    and every record; a run killed or stopped before that left weights that may be torn or from an earlier step. A
    training summary alone does not make a run folder (it travels with a model copied out of its run), nor do the
    checkpoints of another trainer.

    Raises:
        ValueError (`CheckpointError` for a checkpoint that does not verify): the message says what to do.
    """
    if checkpoint_step(model_dir) is not None or (model_dir / MANIFEST_NAME).is_file():
        verify_checkpoint(model_dir)
        return
    markers = [model_dir / LOCK_NAME, model_dir / COMPLETE_NAME] + [
        c / MANIFEST_NAME for c in list_checkpoints(model_dir)
    ]
    if not any(marker.is_file() for marker in markers):
        return
    if (model_dir / LOCK_NAME).is_file() and _lock_held(model_dir / LOCK_NAME):
        raise ValueError(
            f"{model_dir} is in use by a running `hf-lowrank pretrain` (it holds {model_dir / LOCK_NAME}): its weights "
            "may change while they are uploaded. Push it once the run has finished."
        )
    if not (model_dir / COMPLETE_NAME).is_file():
        raise ValueError(
            f"{model_dir} is a run folder of `hf-lowrank pretrain` without {COMPLETE_NAME}: the run was stopped or "
            "killed before its final save finished, so its weights may be torn or from an earlier step. Run the same "
            "`hf-lowrank pretrain` command again to finish it (it resumes from its newest complete checkpoint), then "
            "push."
        )


def model_weight_files(model_dir: Path, top_level: list[Path]) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads from ``model_dir``: ``model.safetensors``, or the index and
    every shard it names. A folder holding other safetensors files beside them, or both layouts, is refused: the
    repo would hold two models' weights.

    Raises:
        ValueError: no weights, pickled weights only, an unreadable index, a missing shard, extra weights files.
    """
    safetensors = {p.name: p for p in top_level if p.name.endswith(".safetensors")}
    index = model_dir / WEIGHTS_INDEX_NAME
    if WEIGHTS_NAME in safetensors and index.is_file():
        raise ValueError(
            f"{model_dir} holds both {WEIGHTS_NAME} and {WEIGHTS_INDEX_NAME}: two sets of weights, of which "
            f"`from_pretrained` reads only {WEIGHTS_NAME}. Remove the one that is not the model's."
        )
    if index.is_file():
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if name not in safetensors]
        if missing:
            raise ValueError(f"{index} names shards that are not in {model_dir}: {', '.join(missing)}.")
        weights = [index] + [safetensors[name] for name in shards]
    elif WEIGHTS_NAME in safetensors:
        weights = [safetensors[WEIGHTS_NAME]]
    else:
        pickled = [p.name for p in top_level if p.suffix in PICKLE_SUFFIXES]
        if pickled and not safetensors:
            raise ValueError(
                f"{model_dir} holds pickled weights ({', '.join(pickled)}) and no *.safetensors. Pickle files can run "
                "code when loaded, so they are never published: load the model and save it again with "
                "`model.save_pretrained(folder)`, which writes safetensors."
            )
        raise ValueError(
            f"{model_dir} holds no weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}); pass the folder written by "
            "`save_pretrained`."
        )
    extra = sorted(set(safetensors) - {p.name for p in weights})
    if extra:
        raise ValueError(
            f"{model_dir} holds {', '.join(extra)} beside the model's weights ({', '.join(p.name for p in weights)}): "
            "`from_pretrained` never reads them, and publishing them would put a second model's weights in the "
            "repo. Move them out of the folder."
        )
    return weights


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a safetensors index, checked."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{index} is not a safetensors index ({error}).") from error
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) and shard == Path(shard).name for shard in weight_map.values()
    ):
        raise ValueError(f"{index} is not a safetensors index: its weight_map must name shard files of the folder.")
    return weight_map


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """`tensor_shapes` of ``path`` (its header only; a torn file is refused there), as push's bad-input error."""
    try:
        return tensor_shapes(path)
    except CheckpointError as error:
        raise ValueError(
            f"{path} is torn or not a safetensors file ({error.__cause__}): save the model again (or finish the run "
            "that writes it) before pushing."
        ) from error


def check_weights_load(weights: list[Path], config: LowRankLlamaConfig) -> None:
    """Refuse weights that would not load under ``config``: the name and shape of every tensor in the safetensors
    headers are compared with the model the config builds, on the meta device (nothing is allocated or read).
    Tensors the model ties to another (the LM head of tied embeddings) may be absent, as ``save_pretrained``
    leaves them out.

    Raises:
        ValueError: torn files, an index that disagrees with its shards, tensors missing, extra or of another shape.
    """
    saved: dict[str, tuple[int, ...]] = {}
    if weights[0].name == WEIGHTS_INDEX_NAME:
        weight_map = _read_index(weights[0])
        for shard in weights[1:]:
            shapes = _tensor_shapes(shard)
            listed = {name for name, file in weight_map.items() if file == shard.name}
            if set(shapes) != listed:
                raise ValueError(
                    f"{shard} does not hold the tensors {weights[0].name} assigns to it ({len(shapes)} tensors, "
                    f"{len(listed)} listed): the shards and their index come from different saves. Save the model again."
                )
            saved.update(shapes)
    else:
        saved = _tensor_shapes(weights[0])

    architecture = (config.architectures or [None])[0]
    model_class = getattr(
        modeling_lowrank,
        architecture if architecture in AUTO_CLASSES.values() else AUTO_CLASSES["AutoModelForCausalLM"],
    )
    with torch.device("meta"):
        model = model_class(config)
    details = weights_misfit(saved, model, saved_as="file", model_as="config")
    if details:
        raise ValueError(
            f"The weights in {weights[0].parent} do not load under its own config.json ({model_class.__name__}): "
            f"{details}. The config was edited or the weights come from another model; save the model again with "
            "`save_pretrained`, which writes both from one model."
        )


def is_model_file(path_in_repo: str) -> bool:
    """Whether a file of a repo belongs to a model (weights, indexes, config, tokenizer, code, records, plots)."""
    name = path_in_repo.rsplit("/", 1)[-1]
    return (
        name.removesuffix(".index.json").endswith(MODEL_WEIGHT_SUFFIXES)
        or name in MODEL_FILE_NAMES
        or ("/" not in path_in_repo and name.endswith(MODEL_TOP_LEVEL_SUFFIXES))
    )


def stale_model_files(remote_files: Iterable[str], upload: Iterable[str]) -> list[str]:
    """The model files of ``remote_files`` that the ``upload`` does not replace: what an earlier model left."""
    replaced = set(upload)
    return sorted(path for path in remote_files if is_model_file(path) and path not in replaced)


def collect_upload(
    model_dir, repo_id: str | None = None, revision: str | None = None, *, license: str = "apache-2.0", **card_data
) -> dict[str, Path | bytes]:
    """Every file a push uploads, as ``{path in repo: local file or content}``, sorted by path.

    README.md is the model card rendered (and validated) by `render_model_card` with ``repo_id``, ``revision``,
    ``license`` and ``card_data``. Only the top level of ``model_dir`` is read: training checkpoints in
    subfolders are never uploaded.

    Raises:
        ValueError: no such folder, a final save that did not finish or does not verify (`check_final_save`), no
            safetensors weights (or only pickled ones) or extra ones (`model_weight_files`), weights that do not load
            under the folder's config (`check_weights_load`), not a hf-lowrank checkpoint.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"Model folder {model_dir} does not exist; pass the folder written by `save_pretrained`.")
    if not _LICENSE.fullmatch(license or ""):
        raise ValueError(f"--license {license!r} is not a Hub license id (e.g. apache-2.0, mit, other).")
    check_revision(revision)
    check_final_save(model_dir)
    top_level = _regular_files(model_dir)
    weights = model_weight_files(model_dir, top_level)
    pickled = [p.name for p in top_level if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        warnings.warn(f"Not uploading {', '.join(pickled)}: only safetensors weights are published.", stacklevel=2)

    check_weights_load(weights, load_lowrank_config(model_dir))  # also refuses a folder without a hf-lowrank config
    files: dict[str, Path | bytes] = {p.name: p for p in weights}
    config_dict = json.loads((model_dir / "config.json").read_text())
    check_auto_map(config_dict, model_dir / "config.json")
    if config_dict.get("auto_map"):
        files["config.json"] = model_dir / "config.json"
    else:  # without auto_map, `trust_remote_code=True` cannot find the model code (R8)
        warnings.warn("config.json has no `auto_map`; adding it to the uploaded copy.", stacklevel=2)
        files["config.json"] = (
            json.dumps({**config_dict, "auto_map": AUTO_MAP}, indent=2, sort_keys=True) + "\n"
        ).encode()
    for name in CODE_FILES:
        if (model_dir / name).is_file():
            files[name] = model_dir / name
        else:
            warnings.warn(f"{model_dir} has no {name}; uploading the one of hf-lowrank {__version__}.", stacklevel=2)
            files[name] = PACKAGE_DIR / name
    optional = (
        "generation_config.json",
        *TOKENIZER_FILES,
        TRAINING_SUMMARY_NAME,
        EVAL_RESULTS_NAME,
        *plot_files(model_dir),
    )
    files.update({name: model_dir / name for name in optional if (model_dir / name).is_file()})

    card = render_model_card(model_dir, repo_id, revision, license=license, **card_data)
    files["README.md"] = str(card).encode()
    return dict(sorted(files.items()))


def write_folder(files: dict[str, Path | bytes], folder) -> Path:
    """Write ``files`` (as returned by `collect_upload`) into ``folder``, which must be new or empty."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"Dry-run folder {folder} is not empty; pass a new or empty folder.")
    write_folder_atomic(folder, files)
    return folder


def default_commit_message(model_dir) -> str:
    count = count_parameters(load_lowrank_config(Path(model_dir)))
    return (
        f"Upload low-rank LLaMA ({count.total / 1e6:.2f}M parameters, {count.compression:.2f}x dense) "
        f"with hf-lowrank {__version__}"
    )


# ---------------------------------------------------------------------------------------------- the network (R30, R32)
@contextmanager
def bounded_requests(timeout: float) -> Iterator[dict]:
    """Within the block, every request `huggingface_hub` sends waits at most ``timeout`` seconds for each step
    (connect, send, each read of the answer), and the last request and answer are recorded in the yielded dict
    (``"request"``: "METHOD URL", ``"response"``) to explain a failure.

    huggingface_hub sends every request through the one client `get_session` returns, built by the factory that
    `set_client_factory` installs; its API calls (``create_commit``, ``preupload``, ...) take no timeout, and some
    pass ``timeout=None`` explicitly, which overrides a client's default. So the factory in use (the library's, or
    one the user installed) is wrapped with a request hook that caps the timeout each request carries, then put back.
    The factory is process-wide: requests other threads send meanwhile get the cap too.
    """
    previous = hub_http._GLOBAL_CLIENT_FACTORY  # no public getter; restored as it was after the block
    seen: dict = {}

    def cap_timeout(request) -> None:
        limits = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {phase: min(limits.get(phase) or timeout, timeout) for phase in _TIMEOUT_PHASES}
        seen["request"] = f"{request.method} {request.url}"

    def record_answer(response) -> None:
        seen["response"] = response

    def factory():
        client = previous()
        hooks = client.event_hooks
        client.event_hooks = {
            "request": [*hooks["request"], cap_timeout],
            "response": [*hooks["response"], record_answer],
        }
        return client

    set_client_factory(factory)
    try:
        yield seen
    finally:
        set_client_factory(previous)


def _hub_fault(error: Exception, seen: dict, timeout: float) -> str:
    """What went wrong with the Hub, in words a user can act on."""
    if isinstance(error, _HTTP_LIBRARY.TimeoutException):
        return (
            f"no answer to {seen.get('request', 'a request')} within {timeout:g} s (--timeout): the Hub is unreachable "
            f"or stalled ({type(error).__name__})"
        )
    if isinstance(error, json.JSONDecodeError) and "response" in seen:
        response = seen["response"]
        kind = response.headers.get("content-type", "no content type")
        return (
            f"{response.request.method} {response.request.url} was answered with HTTP {response.status_code} ({kind}), "
            "not the Hub API's JSON: a proxy, a captive portal or a failing server answered in the Hub's place"
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"the Hub answered HTTP {error.response.status_code}: {error}"
    return str(error)


def push_to_hub(
    model_dir,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir=None,
    token: str | None = None,
    *,
    license: str = "apache-2.0",
    keep_remote_files: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    **card_data,
) -> CommitInfo | Path:
    """Publish the checkpoint in ``model_dir`` to ``repo_id`` as one commit.

    Args:
        model_dir: folder written by ``save_pretrained`` (plus, optionally, tokenizer files, ``training_summary.json``,
            ``eval_results.json`` and ``*.png`` plots).
        repo_id: ``ORG/NAME``; created if missing (``private`` applies only then).
        revision: branch to commit to (default ``main``); created from ``main`` if missing. The card's usage
            snippets pin it.
        commit_message: defaults to a summary with the parameter count.
        dry_run_dir: write the exact files that would be uploaded into this (new or empty) folder, upload nothing
            and return the folder.
        token: a Hub token with write access; defaults to ``HF_TOKEN`` or the token saved by ``hf auth login``.
        license, **card_data: passed to `render_model_card`.
        keep_remote_files: only add files. By default the commit also deletes the files of an earlier model the
            branch holds and the upload does not replace (`stale_model_files`), so the repo holds one model.
        timeout: seconds each request may wait on the Hub, per step (connect, send, each read of the answer).
            huggingface_hub retries the file listing, file uploads and their preparation at most 5 times (on
            timeouts and 5xx answers); repo creation, the head lookup and the commit itself are sent once.

    Returns:
        The `CommitInfo` of the commit (``.oid`` is its sha), or the dry-run folder.

    Raises:
        ValueError: bad ``repo_id``, ``timeout``, folder, weights or card; no token; offline mode.
        PushError: the Hub refused, failed, stalled or answered something else than its API; the branch holds what
            it held before, or the whole new commit.
    """
    _check_repo_id(repo_id)
    check_revision(revision)
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--timeout {timeout!r} must be a positive number of seconds.")
    files = collect_upload(model_dir, repo_id, revision, license=license, **card_data)
    if dry_run_dir is not None:
        return write_folder(files, dry_run_dir)

    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: set HF_TOKEN to a token with write access or run `hf auth login` "
            "(or use a dry run to check the upload without one)."
        )
    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push, or use a dry run.")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    branch = revision or "main"
    with bounded_requests(timeout) as seen:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            # The files at one commit, and the commit made on top of exactly that one (a branch that moves meanwhile
            # makes the Hub refuse it), so the deletions below are those of what the branch holds.
            head = api.model_info(repo_id, revision=branch).sha
            remote_files = api.list_repo_files(repo_id, revision=head)
        except (*_UPLOAD_ERRORS, json.JSONDecodeError) as error:
            raise PushError(
                f"Could not create or read {repo_id} on {api.endpoint}: {_hub_fault(error, seen, timeout)}"
            ) from error

        stale = stale_model_files(remote_files, files)
        if stale and keep_remote_files:
            warnings.warn(
                f"Keeping {len(stale)} files of an earlier model in {repo_id} (branch {branch!r}, --keep_remote_files): "
                f"{', '.join(stale)}. The repo holds them beside this model's files.",
                stacklevel=2,
            )
            stale = []
        operations = [
            CommitOperationAdd(
                path_in_repo=path, path_or_fileobj=content if isinstance(content, bytes) else str(content)
            )
            for path, content in files.items()
        ] + [CommitOperationDelete(path_in_repo=path) for path in stale]
        description = f"{len(files)} files: {', '.join(files)}"
        if stale:
            description += f"\n\nDeleted {len(stale)} files of the earlier model: {', '.join(stale)}"
        try:
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or default_commit_message(model_dir),
                commit_description=description,
                revision=branch,
                parent_commit=head,
            )
        except (*_UPLOAD_ERRORS, json.JSONDecodeError) as error:
            raise PushError(
                f"Upload of {model_dir} to {repo_id} (branch {branch!r}) failed: {_hub_fault(error, seen, timeout)}\n"
                f"All {len(operations)} changes travel in one commit, which the Hub applies whole or not at all: the "
                "branch holds either its previous content or every new file, never a mix (after a timeout, look at "
                "the repo's history to see which). Fix the cause and push again."
            ) from error
    if stale:
        logger.info(
            "The commit deleted %d files of the model %s held before: %s", len(stale), repo_id, ", ".join(stale)
        )
    return info


def main(argv: list[str] | None = None) -> int:
    """`hf-lowrank push`: publish a saved model to the Hugging Face Hub in one commit, with a generated card."""
    parser = CommandParser(
        prog="hf-lowrank push",
        description=main.__doc__,
        epilog="The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained")
    parser.add_argument("--repo_id", required=True, metavar="ORG/NAME", help="target model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit_message", metavar="MSG", help="commit title")
    parser.add_argument(
        "--dry_run", metavar="DIR", help="write the files that would be uploaded to DIR; upload nothing"
    )
    parser.add_argument("--license", default="apache-2.0", help="Hub license id of the weights (default apache-2.0)")
    parser.add_argument(
        "--keep_remote_files",
        action="store_true",
        help="only add files: keep the weights, tokenizer and config files of an earlier model in the repo "
        "(by default the same commit deletes them, so the repo holds this model alone)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest wait for the Hub in each step of a request (default {DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    result = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run_dir=args.dry_run,
        license=args.license,
        keep_remote_files=args.keep_remote_files,
        timeout=args.timeout,
    )
    if isinstance(result, Path):
        names = sorted(str(p.relative_to(result)) for p in result.rglob("*") if p.is_file())
        print(f"Dry run: wrote the {len(names)} files of the upload to {result} (nothing was uploaded):")
        print("\n".join(f"  {name}" for name in names))
        return 0
    print(f"Committed to {args.repo_id} (branch {args.revision or 'main'}): {result.commit_url}")
    print("Load exactly this commit with:")
    print(f'  AutoModelForCausalLM.from_pretrained("{args.repo_id}", trust_remote_code=True, revision="{result.oid}")')
    return 0


__all__ = [
    "PushError",
    "bounded_requests",
    "check_final_save",
    "check_weights_load",
    "collect_upload",
    "model_weight_files",
    "push_to_hub",
    "stale_model_files",
    "write_folder",
]
