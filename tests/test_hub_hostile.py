"""Publishing never leaks (R27): links out of the model folder, foreign code references and unsafe strings are
refused before anything is written or uploaded."""

import json
import shutil

import pytest
import torch

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main as cli_main
from hf_lowrank.hub import collect_upload, push_to_hub


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved")
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    return copy


def test_a_link_to_a_file_outside_the_folder_is_never_uploaded(folder, tmp_path):
    secret = tmp_path / "token.txt"
    secret.write_text("hf_SECRET")
    (folder / "vocab.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"vocab.txt is a symbolic link to .*outside"):
        collect_upload(folder, "org/name")
    out = tmp_path / "dry"
    assert cli_main(["push", str(folder), "--repo-id", "org/name", "--dry-run", str(out)]) != 0
    assert not out.exists()  # refused before anything was written
    # A link that stays inside the folder is just another name for a file of the model: it is uploaded.
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "vocab.txt").symlink_to(folder / "tokenizer.json")
    assert "model.safetensors" in collect_upload(folder, "org/name")


@pytest.mark.parametrize(
    "reference",
    ["evil/repo--modeling_evil.Model", "modeling_evil.Model", "os.system", "modeling_lowrank.not a class"],
)
def test_an_auto_map_pointing_at_other_code_is_refused(folder, reference):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = reference
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not point at this model's own code"):
        collect_upload(folder, "org/name")


@pytest.mark.parametrize("revision", ['main"); import os; os.system("id', "a b", "../main", "-x", "feature/", "\nmain"])
def test_an_unsafe_revision_never_reaches_the_card(folder, tmp_path, revision):
    with pytest.raises(ValueError, match="not a valid branch name"):
        push_to_hub(folder, "org/name", revision=revision, dry_run_dir=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()
    files = collect_upload(folder, "org/name", revision="exp/v1.2")
    assert b'revision="exp/v1.2"' in files["README.md"]


def test_an_unsafe_license_is_refused(folder):
    with pytest.raises(ValueError, match="not a Hub license id"):
        collect_upload(folder, "org/name", license="mit\nmalicious: yes")
