"""Only whole models are published, and the repo then holds that model alone (R30); a Hub that stalls, answers HTML
or fails is one line and exit status 1, a folder that cannot be published one line and exit status 2 (R32).

Real files and real processes against the loopback Hub of tests/hub_server.py; nothing of huggingface_hub is mocked.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, get_session, set_client_factory
from huggingface_hub.utils import _http as hub_http

from hf_lowrank.cli import main as cli_main
from hf_lowrank.hub import PushError, push_to_hub
from hf_lowrank.training.checkpointing import write_manifest
from hf_lowrank.training.run_dir import COMPLETE_NAME, LOCK_NAME, RunLock

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402
from hub_server import STALL, online_hub  # noqa: E402

REPO = "org/name"
UPLOAD = {
    "README.md",
    "config.json",
    "configuration_lowrank.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_lowrank.py",
}
# What another model left in the repo: weights of every layout and format, its tokenizer, config and code.
EARLIER_MODEL = {
    "model-00001-of-00002.safetensors": b"old shard 1",
    "model-00002-of-00002.safetensors": b"old shard 2",
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "pytorch_model.bin": b"old pickle",
    "onnx/model.onnx": b"old onnx",
    "gguf/model-q4.gguf": b"old gguf",
    "tokenizer.json": b'{"model": "the earlier one"}',
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "config.json": b'{"model_type": "llama"}',
    "modeling_other.py": b"# another model's code",
    "training_curves.png": b"old plot",
}
# Files that are no model's: they stay.
NOT_A_MODEL = {"LICENSE": b"Apache-2.0", "notes/data.md": b"# how the data was collected"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    return copy


@pytest.fixture
def hub(monkeypatch):
    with online_hub(monkeypatch) as server:
        yield server


def push(*args) -> int:
    return cli_main(["push", *map(str, args)])


def assert_one_error_line(stderr: str, fragment: str) -> None:
    assert stderr.startswith("hf-lowrank push: error: "), stderr[-3000:]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert fragment in stderr, stderr[-3000:]


def make_run_folder(folder: Path, *, complete: bool, torn: bool) -> Path:
    """``folder`` as `hf-lowrank pretrain` leaves it: a lock file naming a dead holder, its records, and the marker
    only if the run finished; ``torn`` cuts model.safetensors in half, as a kill during the final save does."""
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "command": "hf-lowrank pretrain"}))
    (folder / "training_summary.json").write_text(json.dumps({"preset": "tiny", "max_steps": 10}))
    if torn:
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    if complete:
        (folder / COMPLETE_NAME).write_text(json.dumps({"global_step": 10, "max_steps": 10, "num_train_epochs": 3}))
    return folder


def seed_repo(hub, files: dict[str, bytes], branch: str = "main") -> None:
    api = HfApi(endpoint=hub.url, token="dummy")
    api.create_repo(REPO, exist_ok=True)
    if branch != "main":
        api.create_branch(REPO, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    api.create_commit(REPO, operations, commit_message="an earlier model", revision=branch)


# ---------------------------------------------------------------------------------------------- a verified final save
def test_a_run_killed_during_its_final_save_is_refused_in_a_real_process(folder, hub):
    make_run_folder(folder, complete=False, torn=True)
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "push", str(folder), "--repo_id", REPO],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_error_line(result.stderr, f"without {COMPLETE_NAME}")
    assert REPO not in hub.repos  # refused before any request


def test_a_finished_run_is_published_and_its_weights_still_verified(folder, hub, tmp_path, capsys):
    make_run_folder(folder, complete=True, torn=False)
    assert push(folder, "--repo_id", REPO, "--dry_run", tmp_path / "dry") == 0
    os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 1)  # torn afterwards
    capsys.readouterr()
    assert push(folder, "--repo_id", REPO) == 2
    assert_one_error_line(capsys.readouterr().err, "model.safetensors is torn or not a safetensors file")
    assert REPO not in hub.repos


def test_a_folder_a_live_run_is_writing_is_refused(folder, capsys):
    make_run_folder(folder, complete=True, torn=False)
    lock = RunLock(folder)
    lock.acquire()  # what a running `hf-lowrank pretrain` holds (a resumed run may rewrite the weights)
    try:
        assert push(folder, "--repo_id", REPO, "--dry_run", folder.parent / "dry") == 2
        assert_one_error_line(capsys.readouterr().err, "in use by a running `hf-lowrank pretrain`")
    finally:
        lock.release()
    assert push(folder, "--repo_id", REPO, "--dry_run", folder.parent / "dry") == 0


def test_a_checkpoint_folder_is_published_only_if_it_matches_its_manifest(saved, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-10"
    shutil.copytree(saved, checkpoint)
    write_manifest(checkpoint)
    assert push(checkpoint, "--repo_id", REPO, "--dry_run", tmp_path / "dry") == 0
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit of a weight flipped
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert push(checkpoint, "--repo_id", REPO, "--dry_run", tmp_path / "dry2") == 2
    assert_one_error_line(capsys.readouterr().err, "does not match its sha256")
    (checkpoint / "checkpoint_manifest.json").unlink()  # a save that never finished
    assert push(checkpoint, "--repo_id", REPO, "--dry_run", tmp_path / "dry3") == 2
    assert_one_error_line(capsys.readouterr().err, "is incomplete")


# ---------------------------------------------------------------------------------------------- weights that load
@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"rank_overrides": {"q_proj": 4}}, "differ in shape (e.g. model.layers.0.self_attn.q_proj.down.weight"),
        ({"num_hidden_layers": 3}, "model tensors missing (e.g. model.layers.2."),
        ({"num_hidden_layers": 1}, "tensors the model does not have (e.g. model.layers.1."),
        ({"lowrank_modules": []}, "tensors the model does not have"),
        ({"vocab_size": 640}, "differ in shape (e.g. model.embed_tokens.weight: file (512, 64), config (640, 64))"),
    ],
)
def test_weights_that_do_not_load_under_their_own_config_are_refused(folder, hub, edit, fragment, capsys):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    assert push(folder, "--repo_id", REPO) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "do not load under its own config.json (LowRankLlamaForCausalLM)")
    assert fragment in err
    assert REPO not in hub.repos


def test_tied_and_sharded_weights_are_checked_as_transformers_reads_them(tmp_path, capsys):
    tied = tmp_path / "tied"
    tiny_model("normal_init_tied").save_pretrained(tied)  # lm_head.weight is left out of the file: not missing
    assert push(tied, "--repo_id", REPO, "--dry_run", tmp_path / "dry-tied") == 0

    sharded = tmp_path / "sharded"
    tiny_model().save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert push(sharded, "--repo_id", REPO, "--dry_run", tmp_path / "dry-sharded") == 0
    assert {p.name for p in (tmp_path / "dry-sharded").iterdir()} >= {"model.safetensors.index.json", *shards}

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    moved = sorted(index["weight_map"])[-1]  # to a shard that does not hold it, as the index of another save would
    index["weight_map"][moved] = next(shard for shard in shards if shard != index["weight_map"][moved])
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert push(sharded, "--repo_id", REPO, "--dry_run", tmp_path / "dry-bad-index") == 2
    assert_one_error_line(capsys.readouterr().err, "the shards and their index come from different saves")

    (sharded / shards[-1]).unlink()
    assert push(sharded, "--repo_id", REPO, "--dry_run", tmp_path / "dry-missing") == 2
    assert_one_error_line(capsys.readouterr().err, f"names shards that are not in {sharded}: {shards[-1]}")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("model.safetensors.index.json", "holds both model.safetensors and model.safetensors.index.json"),
        ("model-00001-of-00002.safetensors", "holds model-00001-of-00002.safetensors beside the model's weights"),
    ],
)
def test_a_second_set_of_weights_in_the_folder_is_refused(folder, tmp_path, extra, fragment, capsys):
    shutil.copy(folder / "model.safetensors", folder / extra)
    assert push(folder, "--repo_id", REPO, "--dry_run", tmp_path / "dry") == 2
    assert_one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "dry").exists()


# ---------------------------------------------------------------------------------------------- one model in the repo
def test_a_push_replaces_an_earlier_model_in_one_commit(folder, hub, caplog):
    seed_repo(hub, {**EARLIER_MODEL, **NOT_A_MODEL})
    commits_before = len(hub.commits(REPO))
    with caplog.at_level(logging.INFO, logger="hf_lowrank.hub"):
        assert push(folder, "--repo_id", REPO) == 0

    assert len(hub.commits(REPO)) == commits_before + 1  # one commit carries the additions and the deletions (R9)
    assert set(hub.files(REPO)) == UPLOAD | set(NOT_A_MODEL) | {".gitattributes"}
    deleted = sorted(set(EARLIER_MODEL) - UPLOAD)
    commit = hub.commits(REPO)[-1]
    assert set(deleted) <= set(commit.changed) and "Deleted 11 files of the earlier model" in commit.description
    assert f"deleted {len(deleted)} files of the model {REPO} held before: {', '.join(deleted)}" in caplog.text
    assert hub.files(REPO)["config.json"] == (folder / "config.json").read_bytes()


def test_only_the_branch_pushed_to_is_cleaned(folder, hub):
    seed_repo(hub, {"pytorch_model.bin": b"main's old pickle"})
    seed_repo(hub, {"tokenizer.json": b"exp's old tokenizer", "tf_model.h5": b"exp's old keras"}, branch="exp")
    main_before = hub.files(REPO)
    assert push(folder, "--repo_id", REPO, "--revision", "exp") == 0
    assert hub.files(REPO) == main_before
    assert set(hub.files(REPO, "exp")) == UPLOAD | {".gitattributes"}


def test_keep_remote_files_only_adds_and_says_what_it_kept(folder, hub):
    seed_repo(hub, EARLIER_MODEL)
    with pytest.warns(UserWarning, match=r"Keeping 11 files of an earlier model .*pytorch_model.bin"):
        assert push(folder, "--repo_id", REPO, "--keep_remote_files") == 0
    assert set(hub.files(REPO)) == UPLOAD | set(EARLIER_MODEL) | {".gitattributes"}


# ---------------------------------------------------------------------------------------------- a failing world
def test_a_stalled_hub_fails_in_one_line_within_the_timeout_in_a_real_process(folder, hub):
    hub.faults["*"] = STALL  # accepts the connection, reads the request, never answers
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "push", str(folder), "--repo_id", REPO, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert_one_error_line(result.stderr, "no answer to POST http://127.0.0.1:")
    assert "/api/repos/create within 2 s (--timeout)" in result.stderr
    assert time.monotonic() - started < 120  # the interpreter's start and imports, then 2 s
    assert hub.requests.count(("POST", "/api/repos/create")) == 1  # asked once, not retried


def test_a_stalled_commit_fails_within_the_timeout_and_leaves_the_branch(folder, hub):
    seed_repo(hub, EARLIER_MODEL)
    before, head = hub.files(REPO), hub.head(REPO)
    hub.requests.clear()
    hub.faults["commit"] = STALL
    started = time.monotonic()
    with pytest.raises(PushError, match=r"(?s)no answer to POST .*/commit/main within 2 s.*whole or not at all"):
        push_to_hub(folder, REPO, timeout=2)
    assert time.monotonic() - started < 20  # the requests before the commit are answered at once
    assert hub.files(REPO) == before and hub.head(REPO) == head
    assert [r for r in hub.requests if "/commit/" in r[1]] == [("POST", f"/api/models/{REPO}/commit/main")]


@pytest.mark.parametrize(
    "endpoint, status, fragment",
    [
        ("create", 200, "POST {url}/api/repos/create was answered with HTTP 200 (text/html"),
        ("info", 200, "GET {url}/api/models/org/name/revision/main was answered with HTTP 200 (text/html"),
        ("validate-yaml", 502, "POST {url}/api/validate-yaml was answered with HTTP 502 (text/html"),
        ("commit", 200, "POST {url}/api/models/org/name/commit/main was answered with HTTP 200 (text/html"),
        ("commit", 503, "the Hub answered HTTP 503"),
        ("create", 500, "the Hub answered HTTP 500"),
    ],
)
def test_html_and_server_errors_are_hub_faults_with_the_servers_status(folder, hub, endpoint, status, fragment, capsys):
    hub.faults[endpoint] = status
    assert push(folder, "--repo_id", REPO, "--timeout", "5") == 1
    assert_one_error_line(capsys.readouterr().err, fragment.format(url=hub.url))


@pytest.mark.parametrize(
    "timeout, fragment",
    [
        ("0", "--timeout 0.0 must be a positive number of seconds"),
        ("-1", "--timeout -1.0 must be a positive number of seconds"),
        ("nan", "--timeout nan must be a positive number of seconds"),
        ("inf", "--timeout inf must be a positive number of seconds"),
        ("soon", "argument --timeout: invalid float value: 'soon'"),
    ],
)
def test_a_timeout_that_is_not_a_positive_number_is_bad_input(folder, timeout, fragment, capsys):
    assert push(folder, "--repo_id", REPO, "--timeout", timeout) == 2
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_the_timeout_wraps_the_users_client_factory_and_gives_it_back(folder, hub):
    """A client factory the user installed (for a proxy, say) still builds the client, with the timeout on top, and
    is in place again after the push. `bounded_requests` reads it from huggingface_hub's private
    `_GLOBAL_CLIENT_FACTORY` (there is no public getter): this pins that name and the behaviour around it."""
    original = hub_http._GLOBAL_CLIENT_FACTORY
    built = []

    def users_factory():
        built.append(1)
        return original()

    set_client_factory(users_factory)
    try:
        hub.faults["commit"] = STALL
        with pytest.raises(PushError, match="within 2 s"):
            push_to_hub(folder, REPO, timeout=2)
        assert built, "the push did not go through the user's client factory"
        assert hub_http._GLOBAL_CLIENT_FACTORY is users_factory
        assert all(hook.__name__ != "cap_timeout" for hook in get_session().event_hooks["request"])
    finally:
        set_client_factory(original)
