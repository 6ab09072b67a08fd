"""Model cards and Hub publishing (R8, R9), against a loopback fake of the Hub (tests/hub_server.py)."""

import json
import math
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, hf_hub_download
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoModelForCausalLM

import hf_lowrank
from hf_lowrank import LowRankLlamaForCausalLM, count_parameters, preset_config
from hf_lowrank.cards import REQUIRED_TAGS, TEMPLATE_PATH, render_model_card
from hf_lowrank.cli import main as cli_main
from hf_lowrank.hub import PushError, push_to_hub

sys.path.insert(0, str(Path(__file__).parent))
from blocked_package import BLOCK_HF_LOWRANK, run_without_package  # noqa: E402
from hub_server import online_hub  # noqa: E402

ROOT = Path(__file__).parents[1]
REPO = "org/name"
SUMMARY = {
    "preset": "tiny",
    "optimizer": "spectron",
    "learning_rate": 0.02,
    "adamw_learning_rate": 0.003,
    "max_steps": 1000,
    "train_tokens": 123_456_789,
    "block_size": 128,
    "global_batch_size": 64,
    "wall_time_s": 3723.4,
    "hardware": "1x NVIDIA H100",
    "dataset": "HuggingFaceFW/fineweb-edu",
    "seed": 0,
    "final_train_loss": 3.1234567,
}
EVAL = {"perplexity": 21.5, "loss": 3.068, "tokens": 1_000_000, "split": "validation", "max_length": 128, "stride": 64}
SAVED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "modeling_lowrank.py",
    "configuration_lowrank.py",
}
# Runs in a fresh interpreter where any import of hf_lowrank fails: loads a repo id from HF_HUB_CACHE, offline.
LOAD_WITHOUT_PACKAGE = (
    BLOCK_HF_LOWRANK
    + r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"module": type(model).__module__, "logits": logits.tolist()}))
"""
)
RECORDS = {"training_summary.json", "eval_results.json", "training_curves.png", "tokenizer.json"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and the folder `save_pretrained` wrote for it (read-only: tests copy it)."""
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny")).eval()
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return model, folder


def model_folder(saved, tmp_path, records: bool = False, **summary_overrides) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved[1], folder)
    if records:
        (folder / "training_summary.json").write_text(json.dumps({**SUMMARY, **summary_overrides}))
        (folder / "eval_results.json").write_text(json.dumps(EVAL))
        (folder / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a plot")
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, with the client pointed at it, online, with a token; stopped at teardown."""
    with online_hub(monkeypatch) as server:
        yield server


# ---------------------------------------------------------------------------------------------- cards
def test_card_of_a_bare_save_pretrained_folder(saved):
    card = render_model_card(saved[1], REPO)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert set(REQUIRED_TAGS) <= set(data["tags"])
    assert "model-index" not in data and "datasets" not in data and "model_name" not in data
    assert "No training summary" in card.text and "No evaluation results" in card.text
    assert "![" not in card.text
    assert ModelCard(str(card)).data.to_dict() == data  # what README.md holds parses back to the same metadata


def test_card_with_training_and_eval_records(saved, tmp_path):
    folder = model_folder(saved, tmp_path, records=True)
    card = render_model_card(folder, REPO, license="mit", language="en", tags=["fineweb"])
    data = ModelCard(str(card)).data.to_dict()
    assert data["license"] == "mit" and data["language"] == "en"
    assert data["tags"][: len(REQUIRED_TAGS)] == list(REQUIRED_TAGS) and "fineweb" in data["tags"]
    assert data["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "name"
    metrics = {r.metric_type: r for r in results}
    assert metrics["perplexity"].metric_value == 21.5 and metrics["loss"].metric_value == 3.068
    assert metrics["perplexity"].dataset_type == "HuggingFaceFW/fineweb-edu"
    assert metrics["perplexity"].dataset_split == "validation"
    assert metrics["perplexity"].metric_args == {"max_length": 128, "stride": 64, "tokens": 1_000_000}
    for text in ("123,456,789", "`spectron`", "| 0.02 |", "| 0.003 |", "1:02:03", "1x NVIDIA H100", "3.1235", "21.500"):
        assert text in card.text, text
    assert "](training_curves.png)" in card.text
    assert 'AutoTokenizer.from_pretrained("org/name", revision="main")' in card.text


def test_local_paths_are_not_published(saved, tmp_path):
    folder = model_folder(saved, tmp_path, records=True, dataset="/home/someone/corpora/train.txt")
    evaluation = {**EVAL, "dataset": "python-stdlib (built-in corpus)", "model": "/home/someone/out", "windows": 12}
    (folder / "eval_results.json").write_text(json.dumps(evaluation))
    card = render_model_card(folder, REPO)
    assert "/home/someone" not in str(card) and "local corpus `train.txt`" in card.text
    assert "`python-stdlib (built-in corpus)`" in card.text and "| Windows | 12 |" in card.text
    assert "datasets" not in card.data.to_dict()
    result = model_index_to_eval_results(card.data.to_dict()["model-index"])[1][0]
    assert (result.dataset_type, result.dataset_name) == ("custom", "python-stdlib (built-in corpus)")


def test_architecture_table_matches_count_parameters(tmp_path):
    config = preset_config(
        "tiny",
        lowrank_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        rank_overrides={"down_proj": 8},
        attention_bias=True,
    )
    LowRankLlamaForCausalLM(config).save_pretrained(tmp_path)
    card = render_model_card(tmp_path, REPO)
    count = count_parameters(config)
    rows = re.findall(r"^\| `(\w+_proj)` \| (\d+) → (\d+) \| (\w+) \| ([\d,]+) \| ([\d,]+) \|", card.text, re.M)
    assert [row[0] for row in rows] == list(config.projection_shapes())
    per_layer = sum(int(row[4].replace(",", "")) for row in rows)
    dense_per_layer = sum(int(row[5].replace(",", "")) for row in rows)
    assert per_layer * config.num_hidden_layers == count.projections
    assert dense_per_layer * config.num_hidden_layers == count.dense_projections
    ranks = {row[0]: row[3] for row in rows}
    assert (
        ranks["o_proj"] == "dense" and ranks["down_proj"] == "8" and ranks["q_proj"] == str(config.rank_for("q_proj"))
    )
    assert f"| **Total** | **{count.total:,}** | **{count.dense_total:,}** |" in card.text
    assert f"{count.compression:.3f}× the dense counterpart" in card.text


def test_usage_snippets_pin_the_revision(saved, tmp_path):
    card = render_model_card(saved[1], REPO, revision="exp")
    assert 'from_pretrained("org/name", revision="exp")' in card.text
    assert 'from_pretrained("org/name", trust_remote_code=True, revision="exp")' in card.text
    assert "import hf_lowrank" in card.text and "names a branch" in card.text
    sha = "0123456789abcdef0123456789abcdef01234567"
    pinned = render_model_card(saved[1], REPO, revision=sha)
    assert f'trust_remote_code=True, revision="{sha}")' in pinned.text and "names a branch" not in pinned.text
    unpinned = tmp_path / "unpinned.md"
    unpinned.write_text(TEMPLATE_PATH.read_text().replace(', revision="{{ revision }}"', ""))
    with pytest.raises(ValueError, match=r"does not pin a `revision`"):
        render_model_card(saved[1], REPO, template_path=unpinned)


def test_invalid_metadata_is_refused_with_every_problem_listed(saved, tmp_path):
    folder = model_folder(saved, tmp_path)
    (folder / "eval_results.json").write_text(json.dumps({"perplexity": math.nan, "loss": "low"}))
    with pytest.raises(ValueError) as error:
        render_model_card(folder, REPO, license=None, library_name="pytorch")
    message = str(error.value)
    for problem in ("`license` is missing", "`library_name` is 'pytorch'", "`perplexity` is nan", "`loss` is 'low'"):
        assert problem in message, message
    (folder / "eval_results.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval_results.json is not valid JSON"):
        render_model_card(folder, REPO)


# ---------------------------------------------------------------------------------------------- dry run, errors
def test_dry_run_writes_exactly_the_upload_and_nothing_else(saved, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token and no network (offline mode is on)
    folder = model_folder(saved, tmp_path, records=True)
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickle")
    out = tmp_path / "dry"
    with pytest.warns(UserWarning, match="Not uploading training_args.bin"):
        assert cli_main(["push", str(folder), "--repo-id", REPO, "--dry-run", str(out), "--license", "mit"]) == 0
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == SAVED | RECORDS | {"README.md"}
    for name in written - {"README.md"}:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    readme = ModelCard.load(out / "README.md")
    assert readme.data.license == "mit"
    assert str(readme) == str(render_model_card(folder, REPO, license="mit"))


def test_missing_model_code_is_taken_from_the_package(saved, tmp_path):
    folder = model_folder(saved, tmp_path)
    (folder / "modeling_lowrank.py").unlink()
    with pytest.warns(UserWarning, match="no modeling_lowrank.py"):
        out = push_to_hub(folder, REPO, dry_run_dir=tmp_path / "dry")
    package = Path(hf_lowrank.__file__).parent
    assert (out / "modeling_lowrank.py").read_bytes() == (package / "modeling_lowrank.py").read_bytes()


def test_clear_errors(saved, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        push_to_hub(tmp_path / "nowhere", REPO, dry_run_dir=tmp_path / "dry")
    pickled = tmp_path / "pickled"
    shutil.copytree(saved[1], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model.bin\) and no \*.safetensors"):
        push_to_hub(pickled, REPO, dry_run_dir=tmp_path / "dry")
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        push_to_hub(pickled, REPO, dry_run_dir=tmp_path / "dry")
    with pytest.raises(ValueError, match="ORG/NAME"):
        push_to_hub(saved[1], "name-without-org", dry_run_dir=tmp_path / "dry")

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert cli_main(["push", str(saved[1]), "--repo_id", REPO]) == 2  # a setting the user can fix
    assert capsys.readouterr().err.startswith("hf-lowrank push: error: No Hugging Face token: set HF_TOKEN")


def test_script_is_the_cli(saved, tmp_path, monkeypatch):
    out = tmp_path / "dry"
    monkeypatch.setattr(sys, "argv", ["push_to_hub.py", str(saved[1]), "--repo-id", REPO, "--dry-run", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"), run_name="__main__")
    assert exit_.value.code == 0 and {p.name for p in out.iterdir()} == SAVED | {"README.md"}


# ---------------------------------------------------------------------------------------------- pushing (R9)
def test_push_is_one_commit_carrying_every_file(saved, tmp_path, hub):
    folder = model_folder(saved, tmp_path, records=True)
    expected = push_to_hub(folder, REPO, dry_run_dir=tmp_path / "dry")
    info = push_to_hub(folder, REPO, private=True, commit_message="first upload")

    initial, commit = hub.commits(REPO)
    assert info.oid == commit.oid == hub.head(REPO) and commit.parent == initial.oid
    assert commit.title == "first upload" and hub.repos[REPO].private
    assert sorted(commit.changed) == sorted(SAVED | RECORDS | {"README.md"})
    assert [request for request in hub.requests if "/commit/" in request[1]] == [
        ("POST", f"/api/models/{REPO}/commit/main")
    ]
    for name, data in hub.files(REPO).items():
        if name != ".gitattributes":
            assert data == (expected / name).read_bytes(), name
    readme = hf_hub_download(REPO, "README.md", cache_dir=tmp_path / "download", endpoint=hub.url)
    assert Path(readme).read_bytes() == (expected / "README.md").read_bytes()

    # A branch push creates the branch from main, pins it in the card, and leaves main alone.
    branch_info = push_to_hub(folder, REPO, revision="exp")
    assert hub.head(REPO, "exp") == branch_info.oid and hub.head(REPO) == info.oid
    assert b'trust_remote_code=True, revision="exp"' in hub.files(REPO, "exp")["README.md"]


def test_failed_upload_leaves_main_unchanged(saved, tmp_path, hub):
    folder = model_folder(saved, tmp_path, records=True)
    hub.fail_commits = True
    with pytest.raises(PushError, match="whole or not at all"):
        push_to_hub(folder, REPO)
    assert [c.title for c in hub.commits(REPO)] == ["initial commit"]
    assert set(hub.files(REPO)) == {".gitattributes"}

    hub.fail_commits = False
    first = push_to_hub(folder, REPO)
    before = hub.files(REPO)
    (folder / "eval_results.json").write_text(json.dumps({**EVAL, "perplexity": 19.0}))  # something to commit
    hub.fail_commits = True
    with pytest.raises(PushError, match=r"branch 'main'.*500"):
        push_to_hub(folder, REPO)
    assert hub.head(REPO) == first.oid and hub.files(REPO) == before
    assert len(hub.commits(REPO)) == 2


@pytest.mark.slow
def test_pushed_repo_loads_by_repo_id_from_the_hub_cache(saved, tmp_path, hub, monkeypatch):
    model, folder = saved
    push_to_hub(folder, REPO)
    cache = tmp_path / "hub-cache"
    hub.write_cache(REPO, cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits

    # hf_lowrank is imported here: its registered classes load the repo, no remote code runs (R8).
    loaded = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=cache, trust_remote_code=True).eval()
    assert type(loaded) is LowRankLlamaForCausalLM
    assert torch.equal(loaded(ids).logits, expected)

    # Where hf_lowrank cannot be imported, the code pushed to the repo runs as remote code and gives the same logits.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(tmp_path / "mod")}
    payload = run_without_package(
        LOAD_WITHOUT_PACKAGE, REPO, json.dumps(ids.tolist()), cwd=tmp_path, timeout=120, env=env
    )
    assert payload["module"].startswith("transformers_modules"), payload["module"]
    assert torch.equal(torch.tensor(payload["logits"]), expected)


def test_model_cards_main_is_the_rendered_card_of_a_trained_model():
    """model_cards/main.md is `push`'s card of the README's main job (scripts/make_model_card.sh), not a template."""
    card = ModelCard.load(ROOT / "model_cards" / "main.md")
    assert set(REQUIRED_TAGS) <= set(card.data.tags) and "{{" not in card.content
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)
    assert "| Optimizer | `spectron` |" in card.text and "| Preset | `small` |" in card.text
