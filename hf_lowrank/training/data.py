"""Data pipeline: raw corpus -> tokenizer -> fixed-length blocks for causal-LM pretraining.

Where the text comes from, in order of precedence:

1. ``--dataset_name`` (+ ``--dataset_config_name``): any `datasets` corpus on the Hub (needs a network).
   A local folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` is read with
   ``datasets.load_from_disk``.
2. ``--train_files`` (+ ``--validation_files``): local ``.txt`` (one document per file by default),
   ``.json``/``.jsonl``, ``.parquet``, ``.csv`` or ``.arrow`` files (one document per record or row, text in
   ``--text_column``), each read by its `datasets` builder; globs allowed.
3. Neither: the built-in corpus, the ``.py`` source of the running interpreter's standard library, which
   exists offline on every machine (see :func:`load_default_corpus`).

Every document is tokenized without special tokens, followed by eos, and the stream of tokens is cut into
blocks of ``block_size``; each block has ``input_ids`` and an identical ``labels`` (the model shifts them),
so ``default_data_collator`` and ``DataCollatorForLanguageModeling(mlm=False)`` both work.

Bad data fails here, before training, with a message that says what to change (RELIABILITY R16).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import math
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, Sequence, Value, load_dataset
from datasets.fingerprint import Hasher

from .arguments import DEFAULT_MAX_CORPUS_BYTES, DataArguments
from .tokenizer import check_vocab, load_or_train_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..configuration_lowrank import LowRankLlamaConfig

logger = logging.getLogger(__name__)

# Directories of the standard library that are not library source: test suites and installed packages.
EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
TEXT_EXTENSIONS = (".txt", ".text")
JSON_EXTENSIONS = (".json", ".jsonl")
# Every local file format and the `datasets` builder that reads it (one document per record or row).
DATA_FILE_BUILDERS = {
    **dict.fromkeys(TEXT_EXTENSIONS, "text"),
    **dict.fromkeys(JSON_EXTENSIONS, "json"),
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
TEXT_BUILDERS = ("text", "json", "csv")  # formats whose files must be UTF-8 text (parquet and arrow are binary)
SPLIT_SEED = 42  # for carving a validation split out of a training split that has none
STREAM_GROUP_DOCS = 1000  # documents packed together in streaming mode; each group's last partial block is dropped
# How a run's records (`eval_results.json`, `training_summary.json`), and so its model card, name data that has no
# Hub id: `hf-lowrank pretrain` and `hf-lowrank evaluate` both write these, so the card reads the same either way.
BUILTIN_DATASET = "python-stdlib (built-in corpus)"
LOCAL_FILES_DATASET = "local files"


# ---------------------------------------------------------------------------------------- built-in corpus
def stable_hash(key: str) -> int:
    """A hash of ``key`` that is the same on every machine and run (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library at ``root`` (default: this interpreter's), test packages and
    installed packages excluded, sorted by path relative to ``root``."""
    root = Path(root) if root is not None else default_corpus_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS)
        files.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def split_default_corpus(
    files: list[Path], root: Path, max_bytes: int | None, validation_percentage: int
) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, validation) file lists.

    A file is in validation when a stable hash of its relative path falls in the first
    ``validation_percentage`` of 100 buckets, so the same files are held out on every machine. With
    ``max_bytes``, each side gets its share of the budget (validation ``validation_percentage`` %) and takes
    files in the order of another stable hash, skipping any that would overflow its share.
    """
    budget = max_bytes if max_bytes is not None and max_bytes > 0 else None
    sides: dict[str, list[tuple[int, Path, int]]] = {"train": [], "validation": []}
    for path in files:
        relative = path.relative_to(root).as_posix()
        side = "validation" if stable_hash("split:" + relative) % 100 < validation_percentage else "train"
        sides[side].append((stable_hash("order:" + relative), path, path.stat().st_size))
    chosen = {}
    for side, entries in sides.items():
        share = None
        if budget is not None:
            fraction = validation_percentage / 100 if side == "validation" else 1 - validation_percentage / 100
            share = int(budget * fraction)
        used, picked = 0, []
        for _, path, size in sorted(entries, key=lambda entry: entry[0]):
            if share is not None and used + size > share:
                continue
            picked.append(path)
            used += size
        chosen[side] = picked
    return chosen["train"], chosen["validation"]


def load_default_corpus(
    max_bytes: int | None = DEFAULT_MAX_CORPUS_BYTES,
    validation_percentage: int = 5,
    text_column: str = "text",
    root: str | os.PathLike | None = None,
) -> DatasetDict:
    """The built-in corpus: one document per standard-library ``.py`` file, columns ``text_column`` and ``path``.

    Returns ``train`` and (unless ``validation_percentage`` is 0) ``validation``; see
    :func:`split_default_corpus` for how files are chosen. Empty files (``__init__.py``) are skipped.
    """
    root = Path(root) if root is not None else default_corpus_root()
    files = default_corpus_files(root)
    if not files:
        raise ValueError(
            f"No .py files found under the standard library at {root} (this Python may ship bytecode only); "
            "name a corpus with `dataset_name` or `train_files`."
        )
    train, validation = split_default_corpus(files, root, max_bytes, validation_percentage)
    for split, paths in (("train", train), ("validation", validation if validation_percentage > 0 else [None])):
        if not paths:
            raise ValueError(
                f"`max_corpus_bytes`={max_bytes} leaves no standard-library file for the {split} split "
                f"({validation_percentage}% of the budget goes to validation); raise `max_corpus_bytes`."
            )

    def as_dataset(paths: list[Path]) -> Dataset:
        texts, relatives = [], []
        for path in paths:
            text = path.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                texts.append(text)
                relatives.append(path.relative_to(root).as_posix())
        return Dataset.from_dict({text_column: texts, "path": relatives})

    splits = {"train": as_dataset(train)}
    if validation_percentage > 0:
        splits["validation"] = as_dataset(validation)
    return DatasetDict(splits)


# ---------------------------------------------------------------------------------------- local and Hub data
def resolve_data_files(patterns: list[str], what: str = "train_files") -> list[str]:
    """Expand ``patterns`` (paths or globs) into files; a pattern matching nothing is an error naming it."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"`{what}`: the pattern {pattern!r} matches no file.")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise ValueError(
                f"`{what}`: {pattern!r} is a directory; give files or a glob such as '{pattern.rstrip('/')}/*.txt'."
            )
        elif not os.path.isfile(os.path.expanduser(pattern)):
            raise FileNotFoundError(f"`{what}`: no such file {pattern!r}.")
        else:
            files.append(os.path.expanduser(pattern))
    return files


def builder_for(files: list[str]) -> str:
    """The `datasets` builder that reads ``files`` (`DATA_FILE_BUILDERS`); one format only."""
    kinds = {}
    for path in files:
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"Unsupported data file {path!r}: the extension must be one of {list(DATA_FILE_BUILDERS)} (rename "
                "plain-text files to .txt; for a folder written by save_to_disk use --dataset_name FOLDER)."
            )
        kinds.setdefault(DATA_FILE_BUILDERS[extension], path)
    if len(kinds) > 1:
        first, second = list(kinds.items())[:2]
        raise ValueError(
            f"Data files mix formats ({first[0]}: {first[1]!r}, {second[0]}: {second[1]!r}); use one format for all "
            "files."
        )
    return next(iter(kinds))


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    folder = Path(os.path.expanduser(path))
    return folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file())


def _load_saved_dataset(path: str) -> DatasetDict:
    """A ``save_to_disk`` folder as ``train`` (+ ``validation``), through `datasets.load_from_disk`; a saved
    ``Dataset`` is the training split. Map-style: a missing validation split is carved out before any streaming."""
    from datasets import load_from_disk

    saved = load_from_disk(os.path.expanduser(path))
    if isinstance(saved, Dataset):
        saved = DatasetDict({"train": saved})
    if "train" not in saved:
        raise ValueError(f"The saved dataset {path!r} has no 'train' split (its splits are {list(saved)}).")
    return DatasetDict({split: saved[split] for split in ("train", "validation") if split in saved})


def _is_blank_file(path: str, chunk_bytes: int = 1 << 20) -> bool:
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            if chunk.strip():
                return False
    return True


def _column_names(dataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a stream whose features are unknown until read
    return list(first) if first is not None else []


def _check_text_column(raw, text_column: str, source: str) -> None:
    for split, dataset in raw.items():
        columns = _column_names(dataset)
        if text_column not in columns:
            raise ValueError(
                f"The {split!r} split of {source} has no column {text_column!r}; its columns are {columns}. "
                "Set `text_column` to the one holding the text."
            )
        feature = (dataset.features or {}).get(text_column)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(
                f"The column {text_column!r} of the {split!r} split of {source} holds {feature!r}, not text. Set "
                "`text_column` to a column of strings, or store the text as strings in the data."
            )


def _not_utf8(path: str, chunk_bytes: int = 1 << 20) -> str | None:
    """Why ``path`` is not UTF-8 text (the first bad byte and its offset), or None when it is."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return f"byte 0x{error.object[error.start]:02x} at offset {offset + error.start} is not UTF-8"
            if not chunk:
                return None
            offset += len(chunk)


def _raise_for_bad_file(files: list[str], error: Exception | None) -> None:
    """Raise an error naming the first of ``files`` that is not UTF-8 text (a Latin-1 or binary file), chained to
    ``error`` (`load_dataset`'s, when it failed on them), if there is one; otherwise return (and the caller
    re-raises ``error``)."""
    for path in files:
        reason = _not_utf8(path)
        if reason is not None:
            raise ValueError(
                f"The data file {path} is not UTF-8 text ({reason}): a binary file, or text in another encoding. "
                "Convert it (e.g. `iconv -f latin1 -t utf-8`) or leave it out of the data arguments."
            ) from error


def _check_has_text(dataset, text_column: str, what: str) -> None:
    """Fail when every document is empty or whitespace (reads only up to the first non-blank document)."""
    for batch in dataset.select_columns([text_column]).iter(batch_size=1000):
        if any(text and not text.isspace() for text in batch[text_column]):
            return
    raise ValueError(f"The {what} is empty: every document is empty or whitespace. Point the data arguments at text.")


def _carve_validation(raw, percentage: int):
    """Add a ``validation`` split of ``percentage`` % of ``train`` (map-style: seeded shuffle; streaming: the
    first documents, which needs the dataset's size)."""
    train = raw["train"]
    if isinstance(train, IterableDataset):
        splits = train.info.splits
        n_train = splits["train"].num_examples if splits and "train" in splits else None
        if not n_train:
            raise ValueError(
                "This streamed dataset has no validation split and its size is unknown, so none can be carved "
                "out; pass `validation_files`, use a dataset with a validation split, turn off `streaming`, or "
                "set `validation_split_percentage` to 0."
            )
        n_validation = max(1, math.ceil(n_train * percentage / 100))
        return IterableDatasetDict({"train": train.skip(n_validation), "validation": train.take(n_validation)})
    if train.num_rows < 2:
        raise ValueError(
            f"The training data has {train.num_rows} document(s), too few to hold out "
            f"{percentage}% for validation (a .txt file is one document unless `text_sample_by` says otherwise); "
            "pass `validation_files`, add files, set `text_sample_by` to 'paragraph' or 'line', or set "
            "`validation_split_percentage` to 0."
        )
    split = train.train_test_split(test_size=percentage / 100, seed=SPLIT_SEED)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


def load_raw_datasets(args: DataArguments) -> DatasetDict | IterableDatasetDict:
    """Raw text as ``train`` and (unless ``validation_split_percentage`` is 0 and none is given) ``validation``."""
    if args.dataset_name is None and not args.train_files:
        raw = load_default_corpus(args.max_corpus_bytes, args.validation_split_percentage, args.text_column)
        source = "the built-in standard-library corpus"
        if args.streaming:
            raw = IterableDatasetDict({split: dataset.to_iterable_dataset() for split, dataset in raw.items()})
    else:
        if args.max_corpus_bytes != DEFAULT_MAX_CORPUS_BYTES:
            logger.warning("`max_corpus_bytes` applies to the built-in corpus only; it is ignored for this data.")
        saved = args.dataset_name is not None and is_saved_dataset(args.dataset_name)
        if saved:
            source = f"the saved dataset {args.dataset_name!r}"
            raw = _load_saved_dataset(args.dataset_name)
        elif args.dataset_name is not None:
            source = f"dataset {args.dataset_name!r}"
            raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
            if "train" not in raw:
                raise ValueError(f"{source} has no 'train' split (its splits are {list(raw)}).")
            raw = type(raw)({split: raw[split] for split in ("train", "validation") if split in raw})
        else:
            data_files = {"train": resolve_data_files(args.train_files, "train_files")}
            if args.validation_files:
                data_files["validation"] = resolve_data_files(args.validation_files, "validation_files")
            all_files = [path for paths in data_files.values() for path in paths]
            builder = builder_for(all_files)
            for split, paths in data_files.items():
                if all(_is_blank_file(path) for path in paths):
                    raise ValueError(
                        f"The {split} files are all empty or whitespace: {paths}. Point the data arguments at text."
                    )
            source = f"the files {all_files[:3]}{' ...' if len(all_files) > 3 else ''}"
            options = {
                "text": {"sample_by": args.text_sample_by, "keep_linebreaks": True},
                # pandas would read an empty cell, "NA" or "null" as NaN (a float): a document lost, or a column of
                # texts turned into numbers. A corpus keeps every cell as the string it is.
                "csv": {"na_filter": False},
            }.get(builder, {})
            text_files = all_files if builder in TEXT_BUILDERS else []
            if args.streaming:  # a stream reads a file only when training reaches it: check them all before step 0
                _raise_for_bad_file(text_files, None)
            try:
                raw = load_dataset(builder, data_files=data_files, streaming=args.streaming, **options)
            except Exception as error:  # noqa: BLE001 - `datasets` wraps the decoder's error; re-raised with the file
                _raise_for_bad_file(text_files, error)
                raise
        _check_text_column(raw, args.text_column, source)
        if "validation" not in raw and args.validation_split_percentage > 0:
            raw = _carve_validation(raw, args.validation_split_percentage)
        if saved and args.streaming:  # read from disk as a stream, like any other streamed source
            raw = IterableDatasetDict({split: dataset.to_iterable_dataset() for split, dataset in raw.items()})
    _check_has_text(raw["train"], args.text_column, f"training split of {source}")
    if "validation" in raw:
        _check_has_text(raw["validation"], args.text_column, f"validation split of {source}")
    return raw


# ---------------------------------------------------------------------------------------- tokenize and pack
def _tokenize_documents(batch, tokenizer, text_column: str):
    """Each non-blank document -> its token ids followed by eos."""
    texts = [text for text in batch[text_column] if text and not text.isspace()]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [document + [tokenizer.eos_token_id] for document in ids]}


def _pack_blocks(batch, indices, documents, offsets: np.ndarray, block_size: int, n_blocks: int):
    """The blocks that start inside this batch of documents, reading ahead in ``documents`` as needed.

    Block k covers tokens [k * block_size, (k + 1) * block_size) of the whole concatenated stream, whatever
    the batching or the number of processes, so the result is the same with any ``num_proc``.
    """
    first, stop = indices[0], indices[-1] + 1
    k0 = -(-int(offsets[first]) // block_size)
    k1 = min(-(-int(offsets[stop]) // block_size), n_blocks)
    if k1 <= k0:
        empty = np.zeros((0, block_size), dtype=np.int64)
        return {"input_ids": empty, "labels": empty}
    start, end = k0 * block_size, k1 * block_size
    d0 = int(np.searchsorted(offsets, start, side="right")) - 1  # document holding token `start`
    d1 = int(np.searchsorted(offsets, end, side="left"))  # documents [d0, d1) hold tokens [start, end)
    column = documents.fast_slice(d0, d1 - d0).column("input_ids").combine_chunks()
    tokens = column.flatten().to_numpy()[start - offsets[d0] : end - offsets[d0]]
    blocks = tokens.astype(np.int64).reshape(k1 - k0, block_size)  # (blocks, block_size)
    return {"input_ids": blocks, "labels": blocks.copy()}


def _group_stream(batch, block_size: int):
    """Streaming packing: concatenate this group of documents and cut it; the group's last partial block is
    dropped (a stream cannot be indexed ahead)."""
    flat = [token for document in batch["input_ids"] for token in document]
    blocks = [flat[i : i + block_size] for i in range(0, len(flat) - block_size + 1, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def _too_short(split: str, n_tokens: int, block_size: int) -> ValueError:
    return ValueError(
        f"The {split} split has {n_tokens} tokens (eos between documents included), fewer than one block of "
        f"block_size={block_size}. Lower `block_size`, add data (raise `max_corpus_bytes` for the built-in "
        "corpus), or for validation raise `validation_split_percentage`."
    )


def _pack_split(dataset: Dataset, split: str, tokenizer, block_size: int, text_column: str, num_proc, use_cache):
    documents = dataset.map(
        _tokenize_documents,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column},
        load_from_cache_file=use_cache,
        desc=f"Tokenizing {split}",
    )
    lengths = pc.list_value_length(documents.data.column("input_ids")).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # (documents + 1,)
    n_blocks = int(offsets[-1]) // block_size
    if n_blocks == 0:
        raise _too_short(split, int(offsets[-1]), block_size)
    block_features = Features({"input_ids": Sequence(Value("int64")), "labels": Sequence(Value("int64"))})
    return documents.map(
        _pack_blocks,
        batched=True,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=["input_ids"],
        features=block_features,
        fn_kwargs={"documents": documents.data, "offsets": offsets, "block_size": block_size, "n_blocks": n_blocks},
        # The blocks depend only on the tokenized documents and block_size; hashing them by content is slow.
        new_fingerprint=Hasher.hash(["pack_blocks", documents._fingerprint, block_size]),
        load_from_cache_file=use_cache,
        desc=f"Packing {split} into blocks of {block_size}",
    )


def tokenize_and_pack(
    raw: DatasetDict | IterableDatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_proc: int | None = None,
    text_column: str = "text",
    load_from_cache_file: bool = True,
) -> DatasetDict | IterableDatasetDict:
    """Blocks of exactly ``block_size`` tokens with columns ``input_ids`` and ``labels`` (identical).

    Documents are tokenized without special tokens, each followed by eos, and concatenated; map-style data
    is then cut into consecutive blocks, dropping only the final partial block, identically for any
    ``num_proc``. Streaming data is cut per group of documents (the last partial block of each group is
    dropped). A split too short for one block is an error.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token, which packing puts between documents.")
    if block_size <= 0:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size}.")
    if isinstance(raw, IterableDatasetDict):
        if num_proc is not None:
            logger.warning("`preprocessing_num_workers` is ignored in streaming mode (tokenization is lazy).")
        packed = IterableDatasetDict()
        for split, dataset in raw.items():
            documents = dataset.map(
                _tokenize_documents,
                batched=True,
                remove_columns=_column_names(dataset),
                fn_kwargs={"tokenizer": tokenizer, "text_column": text_column},
            )
            blocks = documents.map(
                _group_stream, batched=True, batch_size=STREAM_GROUP_DOCS, fn_kwargs={"block_size": block_size}
            )
            if next(iter(blocks), None) is None:
                n_tokens = sum(len(row["input_ids"]) for row in documents)
                raise _too_short(split, n_tokens, block_size)
            packed[split] = blocks
        return packed
    return DatasetDict(
        {
            split: _pack_split(dataset, split, tokenizer, block_size, text_column, num_proc, load_from_cache_file)
            for split, dataset in raw.items()
        }
    )


# ---------------------------------------------------------------------------------------- entry point
def resolve_block_size(args: DataArguments, config: LowRankLlamaConfig) -> int:
    """``args.block_size``, or the model's ``max_position_embeddings`` when unset; never longer than that."""
    if args.block_size is None:
        return config.max_position_embeddings
    if args.block_size > config.max_position_embeddings:
        raise ValueError(
            f"`block_size` ({args.block_size}) exceeds the model's `max_position_embeddings` "
            f"({config.max_position_embeddings}); lower `block_size` or raise `max_position_embeddings`."
        )
    return args.block_size


def build_datasets(
    args: DataArguments,
    output_dir: str | os.PathLike | None,
    block_size: int,
    *,
    config: LowRankLlamaConfig | None = None,
):
    """``(tokenizer, train_dataset, eval_dataset)`` for the pretraining command.

    Loads the raw text, loads or trains the tokenizer (a trained one is saved in ``output_dir``), checks it
    against ``config``'s vocabulary when given, and packs both splits into blocks of ``block_size``.
    ``eval_dataset`` is ``None`` when there is no validation split. Under several processes, call it inside
    ``TrainingArguments.main_process_first()``, so that the main process trains the tokenizer and fills
    the cache and the others reuse them.
    """
    raw = load_raw_datasets(args)
    if args.tokenizer_vocab_size is None:
        args.tokenizer_vocab_size = config.vocab_size if config is not None else 4096
    tokenizer = load_or_train_tokenizer(args, raw["train"], output_dir)
    if config is not None:
        check_vocab(tokenizer, config)
    packed = tokenize_and_pack(
        raw,
        tokenizer,
        block_size,
        num_proc=args.preprocessing_num_workers,
        text_column=args.text_column,
        load_from_cache_file=not args.overwrite_cache,
    )
    return tokenizer, packed["train"], packed.get("validation")


def unigram_cross_entropy(train_dataset, eval_dataset, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's unigram distribution
    (add-one smoothed): the loss a model that ignores context would reach."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for block in train_dataset.with_format("torch")["input_ids"]:
        counts += torch.bincount(block.flatten(), minlength=vocab_size)[:vocab_size].double()
    log_probs = (counts / counts.sum()).log()
    total, n = 0.0, 0
    for block in eval_dataset.with_format("torch")["input_ids"]:
        ids = block.flatten()[1:]  # the first token of a block is never predicted
        total -= log_probs[ids].sum().item()
        n += ids.numel()
    return total / max(n, 1)


__all__ = [
    "DEFAULT_MAX_CORPUS_BYTES",
    "DataArguments",
    "build_datasets",
    "default_corpus_files",
    "load_default_corpus",
    "load_raw_datasets",
    "resolve_block_size",
    "resolve_data_files",
    "split_default_corpus",
    "stable_hash",
    "tokenize_and_pack",
    "unigram_cross_entropy",
]
