"""One command-line convention (issue 13, item 4): every `hf-lowrank` command takes snake_case flags (kebab-case
accepted), and every failure is one line `hf-lowrank COMMAND: error: ...` with exit status 2 for input the user
can fix, 1 for a failure the package detected, and a traceback only for a bug."""

import errno
import os
import subprocess
import sys

import pytest

from hf_lowrank.cli import COMMANDS, main
from hf_lowrank.cli_support import CommandParser, UsageError, snake_case_flags


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", *args], capture_output=True, text=True, timeout=300
    )  # fmt: skip


def assert_one_error_line(stderr: str, command: str, fragment: str = "") -> None:
    assert stderr.startswith(f"hf-lowrank {command}: error: "), stderr[-3000:]
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr[-3000:]
    assert "Traceback" not in stderr and fragment in stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: hf-lowrank {command}")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_flag_is_one_line_and_status_2(command, capsys):
    assert main([command, "--no_such_flag"]) == 2
    error = capsys.readouterr().err
    assert_one_error_line(error, command, f"(see `hf-lowrank {command} --help`)")
    # argparse names a missing required argument before an unknown one
    assert "unrecognized arguments: --no_such_flag" in error or "the following arguments are required" in error


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    result = run_cli("pretrain", "--output_dir", str(tmp_path / "out"), "--preset", "nope")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "pretrain", "--preset must be one of")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["convert", "--from_dense", "{missing}", "{tmp}/out"], "Cannot load a model config"),
        (["evaluate", "{missing}", "--output", "{tmp}/eval.json"], "Cannot load the model"),
        (["push", "{missing}", "--repo_id", "org/name", "--dry_run", "{tmp}/dry"], "does not exist"),
        (["finetune", "--model_name_or_path", "{missing}", "--output_dir", "{tmp}/out"], "no such folder"),
        (["pretrain", "--output_dir", "{tmp}/out", "--rank_ratio", "1.5"], "`rank_ratio` must be in (0, 1)"),
        (["convert", "--to_dense", "--from_dense", "a", "b"], "not allowed with argument"),
        (["push", "{tmp}"], "the following arguments are required: --repo_id"),
        (["pretrain", "--max_steps", "many"], "invalid int value: 'many'"),
    ],
)
def test_a_bad_input_is_one_line_and_status_2(argv, fragment, tmp_path, capsys):
    argv = [arg.format(missing=tmp_path / "missing", tmp=tmp_path) for arg in argv]
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, argv[0], fragment)


def test_the_packages_own_failures_are_status_1_and_other_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    from hf_lowrank import hub

    def refuse(*args, **kwargs):
        raise hub.PushError("The Hub said no.\nNothing was uploaded.")

    monkeypatch.setattr(hub, "push_to_hub", refuse)
    assert main(["push", str(tmp_path), "--repo_id", "org/name"]) == 1
    assert_one_error_line(capsys.readouterr().err, "push", "The Hub said no. Nothing was uploaded.")

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(hub, "push_to_hub", bug)
    with pytest.raises(KeyError):
        main(["push", str(tmp_path), "--repo_id", "org/name"])


def test_kebab_and_snake_spellings_are_one_flag():
    from hf_lowrank.convert import build_parser

    parser = build_parser()
    snake = parser.parse_args(["--from_dense", "a", "b", "--rank_ratio", "0.5", "--eval_files", "x.txt"])
    kebab = parser.parse_args(["--from-dense", "a", "b", "--rank-ratio", "0.5", "--eval-files", "x.txt"])
    equals = parser.parse_args(["--from-dense", "a", "b", "--rank-ratio=0.5", "--eval-files=x.txt"])
    assert vars(snake) == vars(kebab) == vars(equals)
    assert snake.direction == "from_dense" and snake.rank_ratio == 0.5


def test_renamed_evaluate_flags_keep_their_old_spelling():
    from hf_lowrank.evaluation import build_parser

    new = build_parser().parse_args(["m", "--dataset_config_name", "c", "--tokenizer_name", "t"])
    old = build_parser().parse_args(["m", "--dataset-config", "c", "--tokenizer", "t"])
    assert vars(new) == vars(old) and new.dataset_config_name == "c" and new.tokenizer_name == "t"


def test_only_option_names_are_respelled():
    options = {"--rank_ratio": None, "--dry-run": None}
    argv = ["--rank-ratio", "--not-an-option", "--dry-run", "x-y", "--", "--rank-ratio"]
    expected = ["--rank_ratio", "--not-an-option", "--dry-run", "x-y", "--", "--rank-ratio"]
    assert snake_case_flags(argv, options) == expected
    with pytest.raises(UsageError, match="unrecognized arguments: --not-an-option"):
        CommandParser(prog="p").parse_args(["--not-an-option"])


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--weight_decay", "1e6"], "--learning_rate 0.02 x --weight_decay 1e+06 = 20000 >= 1"),
        (["--optimizer", "adamw", "--weight_decay", "400"], "--learning_rate 0.003 x --weight_decay 400"),
        (["--adamw_weight_decay", "500"], "--adamw_learning_rate 0.003 x --adamw_weight_decay 500"),
        (["--label_smoothing_factor", "1.5"], "--label_smoothing_factor must be in [0, 1), got 1.5"),
    ],
)
def test_pretrain_refuses_nonsense_settings_before_writing(tmp_path, capsys, flags, fragment):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--max_steps", "2", "--output_dir", str(out), *flags]) == 2
    assert_one_error_line(capsys.readouterr().err, "pretrain", fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "code, status, fragment",
    [
        (errno.EROFS, 1, "Read-only file system: /data/run (read-only file system: make room, or point"),
        (errno.ENOSPC, 1, "No space left on device while saving checkpoint-4; checkpoint-2 is intact"),
        (errno.ENAMETOOLONG, 2, "File name too long"),
    ],
)
def test_faults_of_the_world_are_one_line_and_status_1(monkeypatch, capsys, code, status, fragment):
    """A read-only or full disk is a fault of the world (exit 1), a name too long is bad input (exit 2); each was a
    traceback (the full-disk message, though written for users, came out as a chained traceback)."""
    import hf_lowrank.presets

    def fail(argv):
        if code == errno.ENOSPC:  # how the trainer reports a full disk during a save
            raise OSError(code, "No space left on device while saving checkpoint-4; checkpoint-2 is intact")
        raise OSError(code, os.strerror(code), "/data/run")

    monkeypatch.setattr(hf_lowrank.presets, "main", fail)
    assert main(["presets"]) == status
    error = capsys.readouterr().err
    assert_one_error_line(error, "presets", fragment)


def test_a_folder_name_too_long_is_one_line_and_status_2(tmp_path, capsys):
    """A real 300-character --output_dir (the OS refuses names over 255 bytes): bad input, not a traceback."""
    out = tmp_path / ("r" * 300)
    assert main(["pretrain", "--preset", "tiny", "--max_steps", "1", "--output_dir", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "pretrain", "File name too long")
