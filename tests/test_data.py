"""Data pipeline: built-in corpus, tokenizer, packing, local files, streaming, and the R16 errors."""

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from hf_lowrank import preset_config
from hf_lowrank.training.data import (
    EXCLUDED_STDLIB_DIRS,
    DataArguments,
    build_datasets,
    default_corpus_files,
    default_corpus_root,
    load_default_corpus,
    load_raw_datasets,
    resolve_block_size,
    stable_hash,
    tokenize_and_pack,
)
from hf_lowrank.training.tokenizer import EOS_TOKEN, PAD_TOKEN, check_vocab, train_bpe_tokenizer

SMALL_CAP = 300_000
SNIPPET = 'def f(x):\n\tréponse = "naïve — ∑ 🐍"\r\n    return x  \n\n\n  # trailing\u00a0nbsp\u200b\n'


@pytest.fixture(scope="module")
def corpus():
    return load_default_corpus(max_bytes=SMALL_CAP, validation_percentage=5)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    """A BPE of the built-in corpus, vocabulary 512 (trained once per session, in conftest)."""
    return tiny_tokenizer


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def documents(n: int = 40) -> list[str]:
    return [f"# document {i}\n" + f"def f(x):\n    return x * {i}\n" * (1 + i % 7) for i in range(n)]


# ------------------------------------------------------------------------------------------ built-in corpus
def test_default_corpus_files_are_library_source():
    root = default_corpus_root()
    files = default_corpus_files()
    assert len(files) > 100
    assert all(path.suffix == ".py" and path.is_file() for path in files)
    assert not any(EXCLUDED_STDLIB_DIRS & set(path.relative_to(root).parts[:-1]) for path in files)
    assert any(path.name == "os.py" for path in files)


def test_stable_hash_is_not_salted():
    # Fixed values (blake2b, not the per-process salted `hash`): the split is the same in every process and machine.
    assert stable_hash("os.py") == 0xF19DB6A54FEDE009
    assert stable_hash("split:os.py") == 0xE00E808EAE96F1B5


def test_default_corpus_split_is_deterministic_disjoint_and_capped(corpus):
    again = load_default_corpus(max_bytes=SMALL_CAP, validation_percentage=5)
    assert list(corpus["train"]["path"]) == list(again["train"]["path"])
    assert list(corpus["validation"]["path"]) == list(again["validation"]["path"])
    train, validation = set(corpus["train"]["path"]), set(corpus["validation"]["path"])
    assert train and validation and not train & validation
    root = default_corpus_root()
    total = sum((root / path).stat().st_size for path in train | validation)
    assert 0.5 * SMALL_CAP < total <= SMALL_CAP
    assert not any("test" in Path(path).parts[:-1] for path in train | validation)
    # Validation membership is by hash of the path alone: a bigger budget keeps files in the same split.
    bigger = load_default_corpus(max_bytes=2 * SMALL_CAP, validation_percentage=5)
    assert not set(bigger["train"]["path"]) & validation
    assert not set(bigger["validation"]["path"]) & train


def test_default_corpus_cap_too_small_is_an_error():
    with pytest.raises(ValueError, match="raise `max_corpus_bytes`"):
        load_default_corpus(max_bytes=100, validation_percentage=5)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_and_loads_with_auto(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) <= 512
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, loaded):
        ids = tok(SNIPPET, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == SNIPPET
        assert EOS_TOKEN not in tok.decode(ids)
    assert loaded(SNIPPET)["input_ids"] == tokenizer(SNIPPET)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, preset_config("tiny"))  # vocab 512
    with pytest.raises(ValueError, match=f"Set `vocab_size` to at least {len(tokenizer)}"):
        check_vocab(tokenizer, preset_config("tiny", vocab_size=300))


# ------------------------------------------------------------------------------------------ packing
def test_packing_is_exact_and_independent_of_num_proc(tokenizer):
    texts = documents()
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts + ["   \n"]})})
    block = 16
    packed = tokenize_and_pack(raw, tokenizer, block)["train"].to_dict()
    eos = tokenizer.eos_token_id
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]]
    assert len(packed["input_ids"]) == len(stream) // block
    assert all(len(row) == block for row in packed["input_ids"])
    assert packed["labels"] == packed["input_ids"]
    assert [t for row in packed["input_ids"] for t in row] == stream[: len(packed["input_ids"]) * block]
    parallel = tokenize_and_pack(raw, tokenizer, block, num_proc=2)["train"]
    assert parallel.to_dict() == packed


def test_blocks_feed_the_standard_collators(tokenizer):
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    raw = DatasetDict({"train": Dataset.from_dict({"text": documents(10)})})
    packed = tokenize_and_pack(raw, tokenizer, 8)["train"]
    rows = [packed[i] for i in range(4)]
    batch = default_data_collator(rows)
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype.is_floating_point is False
    assert (batch["labels"] == batch["input_ids"]).all()
    lm_batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": r["input_ids"]} for r in rows])
    assert (lm_batch["labels"] == lm_batch["input_ids"]).all()  # eos is not pad, so nothing is masked


# ------------------------------------------------------------------------------------------ local files
def test_text_files_one_document_per_file(tmp_path):
    texts = documents(6)
    for i, text in enumerate(texts):
        write(tmp_path / f"doc{i}.txt", text)
    raw = load_raw_datasets(DataArguments(train_files=[str(tmp_path / "*.txt")], validation_split_percentage=20))
    assert raw["train"].num_rows + raw["validation"].num_rows == 6
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(texts)


def test_json_and_jsonl_files(tmp_path, tokenizer):
    texts = documents(8)
    train = write(tmp_path / "train.jsonl", "\n".join(json.dumps({"content": t, "id": i}) for i, t in enumerate(texts)))
    validation = write(tmp_path / "valid.json", json.dumps([{"content": t} for t in texts[:3]]))
    args = DataArguments(train_files=[train], validation_files=[validation], text_column="content", block_size=8)
    raw = load_raw_datasets(args)
    assert list(raw["train"]["content"]) == texts and raw["validation"].num_rows == 3
    packed = tokenize_and_pack(raw, tokenizer, 8, text_column="content")
    assert set(packed["train"].column_names) == {"input_ids", "labels"}


def test_streaming_yields_blocks(tmp_path):
    train = [write(tmp_path / f"t{i}.txt", text) for i, text in enumerate(documents(12))]
    validation = write(tmp_path / "v.txt", documents(3)[2])
    args = DataArguments(train_files=train, validation_files=[validation], streaming=True, tokenizer_vocab_size=300)
    tokenizer, train_blocks, eval_blocks = build_datasets(args, tmp_path / "out", block_size=8)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    rows = list(train_blocks)
    assert rows and all(len(row["input_ids"]) == 8 and row["labels"] == row["input_ids"] for row in rows)
    assert next(iter(eval_blocks))["input_ids"]


def test_build_datasets_default_corpus_and_data_arguments_cli(tiny_data):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--max_corpus_bytes", str(SMALL_CAP), "--tokenizer_vocab_size", "512", "--block_size", "64"]
    )
    assert (args.max_corpus_bytes, args.tokenizer_vocab_size, args.block_size) == (SMALL_CAP, 512, 64)
    config = preset_config("tiny")
    assert resolve_block_size(args, config) == 64
    _, train, evaluation = tiny_data  # build_datasets on the built-in corpus, block size 64 (conftest)
    assert len(train) > 100 and len(evaluation) > 0
    assert all(len(ids) == 64 for ids in train[:8]["input_ids"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        resolve_block_size(DataArguments(block_size=4096), config)


# ------------------------------------------------------------------------------------------ errors (R16)
def test_missing_files_and_globs_are_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_raw_datasets(DataArguments(train_files=[missing]))
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl"):
        load_raw_datasets(DataArguments(train_files=[str(tmp_path / "*.jsonl")]))
    with pytest.raises(ValueError, match="is a directory"):
        load_raw_datasets(DataArguments(train_files=[str(tmp_path)]))


def test_unknown_and_mixed_extensions(tmp_path):
    xml = write(tmp_path / "a.xml", "<text>hello</text>\n")
    with pytest.raises(ValueError, match=r"a\.xml.*extension must be one of .*'\.parquet', '\.csv', '\.arrow'"):
        load_raw_datasets(DataArguments(train_files=[xml]))
    txt, jsonl = write(tmp_path / "a.txt", "hi"), write(tmp_path / "b.jsonl", '{"text": "hi"}')
    with pytest.raises(ValueError, match=r"mix formats \(text: .*json: "):
        load_raw_datasets(DataArguments(train_files=[txt, jsonl]))


def test_empty_corpus(tmp_path):
    blank = [write(tmp_path / "a.txt", ""), write(tmp_path / "b.txt", "  \n\t\n")]
    with pytest.raises(ValueError, match="empty or whitespace"):
        load_raw_datasets(DataArguments(train_files=blank))
    records = write(tmp_path / "c.jsonl", '{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="empty or whitespace"):
        load_raw_datasets(DataArguments(train_files=[records], validation_split_percentage=0))


def test_missing_text_column_lists_columns(tmp_path):
    records = write(tmp_path / "a.jsonl", '{"body": "x", "id": 1}\n{"body": "y", "id": 2}\n')
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'id'\]"):
        load_raw_datasets(DataArguments(train_files=[records]))


def test_too_few_documents_to_carve_validation(tmp_path):
    one = write(tmp_path / "one.txt", "a single document")
    with pytest.raises(ValueError, match="validation_files"):
        load_raw_datasets(DataArguments(train_files=[one]))


def test_corpus_shorter_than_a_block(tokenizer, tmp_path):
    raw = DatasetDict(
        {"train": Dataset.from_dict({"text": documents(3)}), "validation": Dataset.from_dict({"text": ["x"]})}
    )
    with pytest.raises(ValueError, match=r"validation split has 2 tokens.*block_size=64.*Lower `block_size`"):
        tokenize_and_pack(raw, tokenizer, 64)
    with pytest.raises(ValueError, match=r"train split has \d+ tokens.*block_size=100000"):
        tokenize_and_pack(raw, tokenizer, 100_000)
    stream_args = DataArguments(
        train_files=[write(tmp_path / "t.txt", "tiny")], validation_files=[write(tmp_path / "v.txt", "tiny")]
    )
    stream_args.streaming = True
    with pytest.raises(ValueError, match="train split has"):
        tokenize_and_pack(load_raw_datasets(stream_args), tokenizer, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        DataArguments(dataset_name="x", train_files=["a.txt"])
    with pytest.raises(ValueError, match="validation_split_percentage"):
        DataArguments(validation_split_percentage=100)


# GPT-2's pre-tokenization regex (openai/gpt-2 encoder.py), which llama.cpp implements as its `gpt2` pre-tokenizer.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def test_the_built_in_tokenizer_pre_tokenizes_exactly_as_gpt2(tokenizer, tmp_path):
    """What registering the built-in tokenizer as llama.cpp's `gpt2` pre-tokenizer relies on (README, llama.cpp):
    the saved tokenizer.json declares GPT-2's byte-level pre-tokenizer, and it splits text exactly as GPT-2's regex
    does, on code, prose, digits, contractions, Unicode and whitespace runs."""
    import regex

    tokenizer.save_pretrained(tmp_path)
    declared = json.loads((tmp_path / "tokenizer.json").read_text())["pre_tokenizer"]
    assert declared["type"] == "ByteLevel" and declared["use_regex"] and not declared["add_prefix_space"]
    byte_encoder = dict(zip(range(256), bytes_to_unicode_chars()))
    texts = [
        "def f(x):\n    return x**2  # it's 3.14159, isn't it?\n\n\n\tdone",
        "They'll say we'd've gone; I'm sure you're right. 12345 apples, 6 pears!!",
        "naïve café – 東京 2024年 ∑x² — emoji 🙂🙂 and   trailing   ",
        "x=1;y=22;z=333\r\n  ",
    ]
    backend = tokenizer.backend_tokenizer.pre_tokenizer
    for text in texts:
        ours = [piece for piece, _ in backend.pre_tokenize_str(text)]
        gpt2 = ["".join(byte_encoder[b] for b in piece.encode()) for piece in regex.findall(GPT2_SPLIT, text)]
        assert ours == gpt2, text


def bytes_to_unicode_chars() -> list[str]:
    """GPT-2's byte-to-unicode table (the printable stand-ins of the 256 bytes), byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# ------------------------------------------------------------------------------- every `datasets` source
def _write_format(folder: Path, name: str, rows: list[dict], fmt: str) -> str:
    """``rows`` written by `datasets` itself as ``fmt``: parquet, csv, arrow, or a save_to_disk folder."""
    dataset = Dataset.from_list(rows)
    path = folder / (name if fmt.startswith("saved") else f"{name}.{fmt}")
    if fmt == "parquet":
        dataset.to_parquet(str(path))
    elif fmt == "csv":
        dataset.to_csv(str(path), index=False)
    elif fmt == "arrow":  # one Arrow stream file, as `datasets` caches a split
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, dataset.data.table.schema) as writer:
            writer.write_table(dataset.data.table)
    elif fmt == "saved_dataset":
        dataset.save_to_disk(str(path))
    elif fmt == "saved_dict":
        DatasetDict({"train": dataset, "validation": Dataset.from_list(rows[:3])}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow", "saved_dataset", "saved_dict"])
def test_parquet_csv_arrow_and_saved_datasets_are_read(tmp_path, tokenizer, fmt, streaming):
    texts = documents(20)
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    path = _write_format(tmp_path, "corpus", rows, fmt)
    if fmt.startswith("saved"):  # map-style on disk: a validation split is carved out even before streaming
        where = {"dataset_name": path, "validation_split_percentage": 10}
    else:  # a stream of files has no known size to carve from: the validation data is a file of its own
        where = {"train_files": [path], "validation_files": [_write_format(tmp_path, "valid", rows[:2], fmt)]}
    raw = load_raw_datasets(DataArguments(**where, streaming=streaming))
    seen = [row["text"] for split in ("train", "validation") for row in raw[split]]
    if fmt == "saved_dict":  # its own validation split
        assert [row["text"] for row in raw["train"]] == texts and len(list(raw["validation"])) == 3
    elif fmt == "saved_dataset":  # the whole corpus, split 90/10
        assert sorted(seen) == sorted(texts) and len(list(raw["validation"])) == 2
    else:
        assert [row["text"] for row in raw["train"]] == texts and len(list(raw["validation"])) == 2
    blocks = tokenize_and_pack(raw, tokenizer, 8)
    assert next(iter(blocks["train"]))["input_ids"]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow", "saved_dataset"])
def test_a_wrong_column_or_an_empty_source_is_named_before_training(tmp_path, fmt):
    path = _write_format(tmp_path, "corpus", [{"content": t} for t in documents(5)], fmt)
    where = {"dataset_name": path} if fmt.startswith("saved") else {"train_files": [path]}
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['content'\]"):
        load_raw_datasets(DataArguments(**where))
    empty = _write_format(tmp_path, "empty", [{"text": "  "}, {"text": ""}], fmt)
    where = {"dataset_name": empty} if fmt.startswith("saved") else {"train_files": [empty]}
    with pytest.raises(ValueError, match="is empty: every document is empty or whitespace"):
        load_raw_datasets(DataArguments(**where, validation_split_percentage=0))


def test_mixed_formats_are_refused_by_name(tmp_path):
    parquet = _write_format(tmp_path, "a", [{"text": "x"}], "parquet")
    text = write(tmp_path / "b.txt", "y")
    with pytest.raises(ValueError, match=r"mix formats \(parquet: .*a\.parquet.*text: .*b\.txt"):
        load_raw_datasets(DataArguments(train_files=[parquet, text]))
