"""The world a run trains in, recorded in every checkpoint and compared at resume (R29).

Three parts, each a plain JSON value:

* ``data``: the data arguments (source, files as given, text column, sampling, split, block size, corpus cap, data
  seed) and the identity of every local data file: its path, size and a sha256 of its contents. A file up to
  `FULL_HASH_BYTES` is hashed whole; a larger one by `SAMPLES` evenly spaced chunks of `SAMPLE_BYTES` plus its size
  (``"sampled": true``), so a multi-GB corpus costs a fraction of a second while any change of size, and almost any
  edit, still shows. A Hub dataset is identified by its name and configuration only (its files are not read);
* ``tokenizer``: a sha256 of the tokenizer's full serialization (vocabulary, merges, normalizer, pre-tokenizer,
  added tokens);
* ``model``: the model definition, the config's fields except those that do not change what the weights mean
  (`RUNTIME_CONFIG_KEYS`).

A resume names every difference. A different tokenizer or model definition changes what the weights mean (ids of
another vocabulary, another architecture), so it is refused unless explicitly allowed; changed data is warned.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FULL_HASH_BYTES = 16 * 2**20
SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10
# Config fields that describe how a model runs or was saved, not what its weights mean; and the special token ids,
# which the Trainer aligns with the tokenizer at the start of training (after the comparison at resume) and which
# the tokenizer's fingerprint covers.
RUNTIME_CONFIG_KEYS = frozenset(
    {
        "transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype", "use_cache",
        "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation_autoset",
        "_attn_implementation", "_attn_implementation_internal", "bos_token_id", "eos_token_id", "pad_token_id",
    }
)  # fmt: skip
# Data arguments recorded and compared (changing them changes the batches a resumed run sees).
DATA_ARGUMENTS = (
    "dataset_name", "dataset_config_name", "train_files", "validation_files", "text_column", "text_sample_by",
    "streaming", "validation_split_percentage", "max_corpus_bytes", "tokenizer_name", "tokenizer_vocab_size",
)  # fmt: skip


def file_identity(path: str | os.PathLike) -> dict:
    """``{"path", "size", "sha256", "sampled"}`` of one data file (see the module docstring for the sampling)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            for i in range(SAMPLES):
                handle.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return {"path": str(path.resolve()), "size": size, "sha256": digest.hexdigest(), "sampled": size > FULL_HASH_BYTES}


def data_files(data_args) -> list[Path]:
    """The local files the data arguments read: the training and validation files, the files of a
    ``save_to_disk`` folder, or the built-in corpus; none for a Hub dataset."""
    from .data import default_corpus_files, is_saved_dataset, resolve_data_files

    if data_args.train_files:
        files = resolve_data_files(data_args.train_files, "train_files")
        if data_args.validation_files:
            files += resolve_data_files(data_args.validation_files, "validation_files")
        return [Path(f) for f in files]
    if data_args.dataset_name is not None:
        if is_saved_dataset(data_args.dataset_name):
            folder = Path(os.path.expanduser(data_args.dataset_name))
            return sorted(p for p in folder.rglob("*") if p.is_file())
        return []
    return list(default_corpus_files())


def data_world(data_args, block_size: int, data_seed: int | None) -> dict:
    arguments = {name: getattr(data_args, name) for name in DATA_ARGUMENTS}
    arguments.update(block_size=block_size, data_seed=data_seed)
    return _as_json({"arguments": arguments, "files": [file_identity(path) for path in data_files(data_args)]})


def tokenizer_world(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def model_world(config) -> dict:
    return _as_json({key: value for key, value in config.to_dict().items() if key not in RUNTIME_CONFIG_KEYS})


def _as_json(value):
    """``value`` as it reads back from the checkpoint's JSON (int keys become strings), so a comparison with a
    recorded world sees only real differences."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """``(refused, warned)``: one line per difference between the ``saved`` world and the ``current`` one. Parts
    missing on either side (an older checkpoint, a run without data records) are not compared."""
    refused, warned = [], []
    if saved.get("tokenizer") and current.get("tokenizer") and saved["tokenizer"] != current["tokenizer"]:
        refused.append(
            "the tokenizer differs from the one the checkpoint was trained with (another vocabulary or merges: "
            "the embeddings would be read with other ids)"
        )
    if saved.get("model") and current.get("model"):
        keys = sorted(saved["model"].keys() | current["model"].keys())
        changed = [k for k in keys if saved["model"].get(k) != current["model"].get(k)]
        refused += [
            f"the model definition's {k} is {current['model'].get(k)!r} (the checkpoint's: {saved['model'].get(k)!r})"
            for k in changed
        ]
    if saved.get("data") and current.get("data"):
        old, new = saved["data"]["arguments"], current["data"]["arguments"]
        warned += [
            f"--{k} is {new.get(k)!r} (the checkpoint's: {old.get(k)!r})"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)
        ]
        old_files = {f["path"]: f for f in saved["data"]["files"]}
        new_files = {f["path"]: f for f in current["data"]["files"]}
        added, removed = sorted(new_files.keys() - old_files.keys()), sorted(old_files.keys() - new_files.keys())
        edited = sorted(p for p in old_files.keys() & new_files.keys() if old_files[p] != new_files[p])
        if added or removed:
            warned.append(
                f"the data files differ ({len(added)} new, e.g. {added[:2]}; {len(removed)} gone, e.g. {removed[:2]})"
            )
        if edited:
            warned.append(f"the contents of {len(edited)} data file(s) changed since the checkpoint, e.g. {edited[:3]}")
    return refused, warned
