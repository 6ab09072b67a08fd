"""Publishing a checkpoint to the Hugging Face Hub.

One push is one commit carrying every file (R9): weights (safetensors only, R7), config, the model code that makes
the repo loadable with ``trust_remote_code=True`` without this package (R8), tokenizer files, the rendered model
card, plots and the training/evaluation records. The Hub applies a commit whole or not at all, so a failed push
leaves the branch as it was.
"""

import json
import os
import re
import warnings
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .cards import (
    load_lowrank_config,
    plot_files,
    render_model_card,
)
from .cli_support import CommandParser
from .configuration_lowrank import count_parameters
from .files import EVAL_RESULTS_NAME, TOKENIZER_FILES, TRAINING_SUMMARY_NAME, write_folder_atomic
from .modeling_lowrank import AUTO_CLASSES

PACKAGE_DIR = Path(__file__).parent
CODE_FILES = ("configuration_lowrank.py", "modeling_lowrank.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What `save_pretrained` writes once the classes are registered for the Auto classes (see hf_lowrank/__init__.py).
AUTO_MAP = {
    "AutoConfig": "configuration_lowrank.LowRankLlamaConfig",
    **{auto: f"modeling_lowrank.{name}" for auto, name in AUTO_CLASSES.items()},
}
# A git branch or tag name as the Hub accepts it, or a commit sha: it is pasted into the card's usage snippets.
_REVISION = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
# HfHubHTTPError derives from the HTTP client's base error (and OSError); catching its bases also catches
# connection errors and unreadable files, which fail the upload the same way.
_UPLOAD_ERRORS = (HfHubHTTPError, *HfHubHTTPError.__bases__)


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


def collect_upload(
    model_dir, repo_id: str | None = None, revision: str | None = None, *, license: str = "apache-2.0", **card_data
) -> dict[str, Path | bytes]:
    """Every file a push uploads, as ``{path in repo: local file or content}``, sorted by path.

    README.md is the model card rendered (and validated) by `render_model_card` with ``repo_id``, ``revision``,
    ``license`` and ``card_data``. Only the top level of ``model_dir`` is read: training checkpoints in
    subfolders are never uploaded.

    Raises:
        ValueError: no such folder, no safetensors weights (or only pickled ones), not a hf-lowrank checkpoint.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"Model folder {model_dir} does not exist; pass the folder written by `save_pretrained`.")
    if not _LICENSE.fullmatch(license or ""):
        raise ValueError(f"--license {license!r} is not a Hub license id (e.g. apache-2.0, mit, other).")
    check_revision(revision)
    top_level = _regular_files(model_dir)
    weights = [p for p in top_level if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickled = [p.name for p in top_level if p.suffix in PICKLE_SUFFIXES]
    if not any(p.suffix == ".safetensors" for p in weights):
        if pickled:
            raise ValueError(
                f"{model_dir} holds pickled weights ({', '.join(pickled)}) and no *.safetensors. Pickle files can run "
                "code when loaded, so they are never published: load the model and save it again with "
                "`model.save_pretrained(folder)`, which writes safetensors."
            )
        raise ValueError(f"{model_dir} holds no weights (*.safetensors); pass the folder written by `save_pretrained`.")
    if pickled:
        warnings.warn(f"Not uploading {', '.join(pickled)}: only safetensors weights are published.", stacklevel=2)

    load_lowrank_config(model_dir)  # refuses a folder without a hf-lowrank config.json
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

    Returns:
        The `CommitInfo` of the commit (``.oid`` is its sha), or the dry-run folder.

    Raises:
        ValueError: bad ``repo_id``, folder, weights or card; no token; offline mode.
        PushError: the Hub refused or failed the upload; the branch holds what it held before.
    """
    _check_repo_id(repo_id)
    check_revision(revision)
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
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    except _UPLOAD_ERRORS as error:
        raise PushError(f"Could not create or reach {repo_id} on {api.endpoint}: {error}") from error

    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for path, content in files.items()
    ]
    try:
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or default_commit_message(model_dir),
            commit_description=f"{len(files)} files: {', '.join(files)}",
            revision=branch,
        )
    except _UPLOAD_ERRORS as error:
        raise PushError(
            f"Upload of {model_dir} to {repo_id} (branch {branch!r}) failed: {error}\n"
            f"All {len(files)} files travel in one commit, which the Hub applies whole or not at all: the branch "
            "holds either its previous content or every new file, never a mix. Fix the cause and push again."
        ) from error


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
    args = parser.parse_args(argv)
    result = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dry_run_dir=args.dry_run,
        license=args.license,
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


__all__ = ["PushError", "collect_upload", "push_to_hub", "write_folder"]
