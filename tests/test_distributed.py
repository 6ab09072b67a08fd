"""Multi-process training (R17, R18): launch checks, DDP through the real CLI, FSDP2 Spectron against the
unsharded optimizer, sharded checkpoints, and the bytes Spectron communicates.

The slow tests launch two gloo processes on CPU four times (the documented torchrun and accelerate commands, a
refused launch, and tests/dist_scripts/optimizer_parity.py), plus one single-process run: about two minutes.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers.training_args import ParallelMode

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.bench.traffic import pair_traffic, spectron_traffic, traffic_report
from hf_lowrank.training.distributed import check_launch, lowrank_placements

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "distributed.md"
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
LAUNCH_TIMEOUT = 300  # a hang (R17) fails the test instead of blocking the suite

# The single-node CPU commands of docs/distributed.md, run verbatim (from a scratch folder holding `configs/`).
TINY = (
    "--preset tiny --max_corpus_bytes 250000 --lr_scheduler_type constant --warmup_steps 0 "
    "--eval_strategy no --logging_steps 1 --save_steps 2"
)
TORCHRUN_CPU = (
    "torchrun --standalone --nproc_per_node 2 -m hf_lowrank.cli pretrain --use_cpu "
    f"{TINY} --per_device_train_batch_size 4 --max_steps 4 --output_dir runs/tiny-ddp"
)
ACCELERATE_CPU = (
    "accelerate launch --config_file configs/accelerate/ddp.yaml -m hf_lowrank.cli pretrain --use_cpu "
    f"{TINY} --per_device_train_batch_size 4 --max_steps 6 --output_dir runs/tiny-ddp"
)
SINGLE_PROCESS = (
    f"hf-lowrank pretrain --use_cpu {TINY} --per_device_train_batch_size 8 --max_steps 6 --output_dir runs/tiny-single"
)
TRAFFIC_REPORT = "python scripts/bench.py --traffic_report"


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's torchrun etc.
    env.update(extra)
    return env


def _run(command: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        shlex.split(command), cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )


def _digests(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def _losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


# ------------------------------------------------------------------------------------------------ launch checks


@pytest.fixture
def launched(monkeypatch):
    """A CPU-only machine on which a launcher started 2 processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _args(**overrides):
    """What TrainingArguments report under `torchrun --nproc_per_node 2` on CPUs (observed with transformers 5.24)."""
    values = dict(use_cpu=True, ddp_backend=None, world_size=2, parallel_mode=ParallelMode.DISTRIBUTED, fsdp=[])
    values.update(overrides)
    return SimpleNamespace(**values)


def test_check_launch_accepts_cpu_ddp_and_single_process(launched, monkeypatch):
    check_launch(_args())
    check_launch(_args(ddp_backend="gloo"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_args(use_cpu=False, world_size=1, parallel_mode=ParallelMode.NOT_PARALLEL))


@pytest.mark.parametrize(
    "args",
    [
        # without use_cpu every process trains alone (the Trainer sees world_size 1) ...
        _args(use_cpu=False, world_size=1, parallel_mode=ParallelMode.NOT_PARALLEL),
        # ... and with --ddp_backend gloo gradients are never synchronized: the ranks drift apart
        _args(use_cpu=False, ddp_backend="gloo", parallel_mode=ParallelMode.NOT_PARALLEL),
    ],
)
def test_check_launch_refuses_cpu_launch_without_use_cpu(launched, args):
    with pytest.raises(ValueError, match="Add --use_cpu"):
        check_launch(args)


def test_check_launch_refuses_other_silent_misconfigurations(launched, monkeypatch):
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        check_launch(_args(ddp_backend="nccl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="would not synchronize"):  # e.g. a process group set up by hand
        check_launch(_args(use_cpu=False, world_size=1, parallel_mode=ParallelMode.NOT_PARALLEL))


def test_check_launch_warns_that_fsdp_runs_as_ddp_on_cpu(launched):
    with pytest.warns(UserWarning, match="FSDP through the Trainer needs GPUs"):
        check_launch(_args(fsdp=["full_shard"]))


# ------------------------------------------------------------------------------------------------ configs and docs


def test_accelerate_configs_mean_what_the_docs_say():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    def resolve(name):
        argv = ["--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "-m", "hf_lowrank.cli"]
        args, *_ = _validate_launch_command(launch_command_parser().parse_args(argv))
        return args

    ddp = resolve("ddp")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.cpu and ddp.num_processes == 2
    fsdp = resolve("fsdp2")
    env = prepare_multi_gpu_env(fsdp)
    assert fsdp.use_fsdp and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LowRankLlamaDecoderLayer"
    multi = resolve("multi_node")
    assert multi.multi_gpu and multi.num_machines == 2 and multi.num_processes == 16 and multi.main_process_ip


def test_docs_show_the_tested_commands_and_numbers():
    text = re.sub(r"\s*\\\n\s*", " ", DOCS.read_text())  # join continued shell lines
    for command in (TORCHRUN_CPU, ACCELERATE_CPU, SINGLE_PROCESS, TRAFFIC_REPORT):
        assert command in text, command
    assert traffic_report() in DOCS.read_text()


# ------------------------------------------------------------------------------------------------ placement, traffic


def test_factors_are_placed_along_their_long_dimension():
    from torch.distributed.tensor import Shard

    model = LowRankLlamaForCausalLM(preset_config("tiny", intermediate_size=171))  # odd: no even Shard(1)
    placements = lowrank_placements(model, shards=2)
    mlp = model.model.layers[0].mlp
    attention = model.model.layers[0].self_attn
    assert placements[id(attention.q_proj.up.weight)] == Shard(0)  # (out, r) by rows
    assert placements[id(attention.q_proj.down.weight)] == Shard(1)  # (r, in) by columns
    assert placements[id(mlp.up_proj.up.weight)] == Shard(0)  # 171 rows: FSDP2 shards dim 0 unevenly
    assert placements[id(mlp.down_proj.down.weight)] == Shard(0)  # 171 columns: FSDP2 cannot, default kept
    assert id(model.model.embed_tokens.weight) not in placements


def test_analytic_traffic():
    # r = 2, 5 Newton-Schulz Grams of r(r+1)/2 = 3 numbers, one r-vector + 2 scalars of power iteration, per factor
    assert pair_traffic(in_features=10, out_features=6, rank=2) == (2 * (5 * 3 + 4), 2 * (10 + 6))
    for name in ("130m", "1b"):
        estimate = spectron_traffic(preset_config(name))
        assert estimate.pairs == 7 * preset_config(name).num_hidden_layers
        assert 2 < estimate.ratio < 2.5  # rank ratio 0.25: a Gram is r², a factor (long)·r with long ≥ 4r


# ------------------------------------------------------------------------------------------------ launched: CLI


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """torchrun for 4 steps (checkpoints 2, 4), then accelerate launch resuming to step 6, then one process."""
    work = tmp_path_factory.mktemp("cli")
    (work / "configs").symlink_to(ROOT / "configs")
    observer = {"PYTHONPATH": str(SCRIPTS / "observer")}
    results = {}
    for name, command in (("torchrun", TORCHRUN_CPU), ("accelerate", ACCELERATE_CPU)):
        results[name] = _run(command, work, HF_LOWRANK_TEST_DIGEST_DIR=str(work / "digests" / name), **observer)
        assert results[name].returncode == 0, results[name].stderr[-4000:]
    results["single"] = _run(SINGLE_PROCESS, work)
    assert results["single"].returncode == 0, results["single"].stderr[-4000:]
    return work, results


@pytest.mark.slow
def test_torchrun_cli_ranks_agree_and_save(cli_runs):
    work, results = cli_runs
    log = results["torchrun"].stderr
    # tokenizer and data are prepared by the main process first, and reused by the other
    assert log.count("Training a byte-level BPE tokenizer") == 1 and log.count("Reusing the tokenizer") == 1
    first, second = _digests(work / "digests" / "torchrun")
    assert first == second and first["global_step"] == 4 and first["world_size"] == 2  # R18
    assert first["optimizer_tensors"] > 0
    assert (work / "runs" / "tiny-ddp" / "checkpoint-4" / "optimizer.pt").is_file()  # saving did not hang (R17)


@pytest.mark.slow
def test_accelerate_cli_resumes_with_ranks_agreeing(cli_runs):
    work, results = cli_runs
    assert "checkpoint-4" in results["accelerate"].stderr  # resumed, and neither saving nor loading hung (R17)
    first, second = _digests(work / "digests" / "accelerate")
    assert first == second and first["global_step"] == 6 and first["world_size"] == 2  # R18
    assert (work / "runs" / "tiny-ddp" / "checkpoint-6" / "optimizer.pt").is_file()
    summary = json.loads((work / "runs" / "tiny-ddp" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8


@pytest.mark.slow
def test_ddp_cli_matches_one_process_on_the_same_global_batch(cli_runs):
    """2 ranks × 4 sequences (trained 4 steps, resumed for 2) = 1 process × 8 sequences for 6 steps: the
    Trainer's sampler gives the ranks the two halves of the single-process batch, in order."""
    work, _ = cli_runs
    ddp, single = work / "runs" / "tiny-ddp", work / "runs" / "tiny-single"
    assert len(_losses(single)) == 6
    torch.testing.assert_close(_losses(ddp), _losses(single), rtol=1e-5, atol=1e-5)
    ddp_params, single_params = load_file(ddp / "model.safetensors"), load_file(single / "model.safetensors")
    worst = max((ddp_params[k] - single_params[k]).abs().max().item() for k in single_params)
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_cpu_launch_without_use_cpu_is_refused(tmp_path):
    result = _run(
        "torchrun --standalone --nproc_per_node 2 -m hf_lowrank.cli pretrain --ddp_backend gloo --preset tiny "
        "--output_dir runs/refused",
        tmp_path,
    )
    assert result.returncode != 0
    assert "Add --use_cpu" in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ launched: optimizer


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    report = tmp_path_factory.mktemp("parity") / "report.json"
    command = f"torchrun --standalone --nproc_per_node 2 {SCRIPTS / 'optimizer_parity.py'} {report}"
    result = _run(command, ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.mark.slow
def test_ddp_loop_matches_one_process_and_ranks_agree(parity):
    assert parity["world_size"] == 2
    assert parity["ddp_max_abs_diff"] <= 1e-5
    assert parity["ddp_params_agree"] and parity["ddp_optimizer_state_agrees"]  # R18


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["long", "default"])
def test_fsdp2_spectron_matches_unsharded(parity, kind):
    run = parity[kind]
    assert run["max_abs_diff"] <= 1e-5, run["max_abs_diff"]
    assert run["replicated_state_agrees"]  # v, sigma, step counts: equal on both ranks
    downs = {name: p for name, p in run["placements"].items() if name.endswith("down.weight")}
    ups = {name: p for name, p in run["placements"].items() if name.endswith("up.weight")}
    assert set(ups.values()) == {"S(0)"}
    if kind == "long":  # never a whole factor moved: only Grams and power-iteration sums
        assert set(downs.values()) == {"S(1)"}
        assert all(step["redistributed_bytes"] == 0 for step in run["traffic"])
    else:  # plain fully_shard splits down.weight along r: redistributed for each step, still correct
        assert set(downs.values()) == {"S(0)"}
        assert all(step["redistributed_bytes"] > 0 for step in run["traffic"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["long", "default"])
def test_sharded_checkpoint_resumes_exactly(parity, kind):
    assert parity[kind]["resume_max_abs_diff"] == 0.0  # params and optimizer state after the resumed steps


@pytest.mark.slow
def test_measured_traffic_matches_the_analytic_count(parity):
    expected = spectron_traffic(preset_config("tiny"))
    run = parity["long"]
    steady = run["traffic"][2]  # the 3rd step: warm-started power iteration, no rebalancing (rebalance_every=2)
    assert steady["all_reduce_bytes"] == expected.sharded_bytes
    assert run["factor_bytes"] == expected.gather_bytes
    assert parity["default"]["traffic"][2]["all_reduce_bytes"] == expected.sharded_bytes


@pytest.mark.slow
def test_a_hung_rank_fails_the_cpu_job_within_ddp_timeout(tmp_path):
    """R25: `--ddp_timeout` holds on gloo too (Transformers applies it only on its GPU branch)."""
    script = Path(__file__).parent / "dist_scripts" / "hung_rank.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path), "5"]  # fmt: skip
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    elapsed = time.time() - started
    assert result.returncode != 0
    assert "rank 0 gave up after" in result.stdout, result.stdout + result.stderr
    gave_up = float(result.stdout.split("gave up after ")[1].split(" s")[0])
    assert 4 <= gave_up < 30 and elapsed < 120
