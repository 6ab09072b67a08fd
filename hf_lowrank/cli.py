"""`hf-lowrank` command line: a thin dispatcher; each subcommand lives in the module that does the work.

Errors are reported here, once, for every command: a subcommand's `main` raises, and `main` below turns the
exception into one line ``hf-lowrank COMMAND: error: ...`` and an exit status (see `EPILOG`).
"""

import argparse
import errno
import importlib
import logging
import sys

# name -> (module:function taking argv, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("hf_lowrank.training.pretrain:main", "pretrain a factorized model (Spectron) through the HF Trainer"),
    "finetune": ("hf_lowrank.finetune:main", "LoRA fine-tuning (PEFT) of a factorized model through the Trainer"),
    "evaluate": ("hf_lowrank.evaluation:main", "sliding-window perplexity of MODEL_DIR; writes eval_results.json"),
    "convert": ("hf_lowrank.convert:main", "convert Llama <-> low-rank (--from_dense | --to_dense SRC DST)"),
    "push": ("hf_lowrank.hub:main", "publish MODEL_DIR to the Hub in one commit with a generated model card"),
    "presets": ("hf_lowrank.presets:main", "list the model presets with factorized vs dense parameter counts"),
    "bench": ("hf_lowrank.bench.runner:main", "benchmark factorized vs dense: throughput, memory, generation"),
    "gpu-check": ("hf_lowrank.bench.gpu:main", "the benchmark in bf16 plus a short stability check on one GPU"),
    "stability-study": ("hf_lowrank.experiments.sweep:main", "the paper's ablation over learning rates (resumable)"),
    "scaling-study": ("hf_lowrank.experiments.scaling:main", "dense vs Spectron over sizes and FLOP budgets, fitted"),
    "instability-hunt": ("hf_lowrank.experiments.instability:main", "naive low-rank vs Spectron where training breaks"),
}

DESCRIPTION = "Native low-rank LLM pretraining with Spectron, on the Hugging Face stack."
EPILOG = """\
Flags are snake_case (--rank_ratio, --output_dir); the kebab-case spelling (--rank-ratio) works too.
Run `hf-lowrank COMMAND --help` for the options of a command.

exit status:
  0    success
  1    the work failed in a way the package detected or the world failed it (e.g. the Hub refused an upload, a
       training run diverged, the output folder is in use, a read-only or full disk); one line
       `hf-lowrank COMMAND: error: ...` on stderr
  2    a bad argument or input (unknown flag, missing folder, value out of range); the same one line
  143  `pretrain` stopped by SIGTERM after saving a checkpoint; the same command resumes it
Any other failure is a bug in hf-lowrank and prints a traceback."""

# Input a user can fix: exit status 2. ValueError covers the parsers' UsageError (hf_lowrank/cli_support.py).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
INPUT_ERROR_STATUS = 2
# This package's own errors for work that failed (PushError, TrainingDivergedError, ...): exit status 1.
FAILURE_STATUS = 1
# Faults of the world a command cannot fix (R32): exit status 1 with the cause, one line.
WORLD_ERRNOS = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="hf-lowrank",
        usage="hf-lowrank COMMAND [options]",
        description=f"{DESCRIPTION}\n\ncommands:\n{listing}",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def configure_logging() -> None:
    """This package's progress messages at INFO, other libraries' at WARNING (transformers keeps its own setting)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hf_lowrank").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    command, *args = argv
    if command not in COMMANDS:
        return _report(
            "hf-lowrank", f"unknown command {command!r}; choose from {', '.join(COMMANDS)}.", INPUT_ERROR_STATUS
        )
    configure_logging()
    module_name, function_name = COMMANDS[command][0].split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(args) or 0)
    except INPUT_ERRORS as error:
        return _report(f"hf-lowrank {command}", error, INPUT_ERROR_STATUS)
    except OSError as error:
        if error.errno in WORLD_ERRNOS:
            return _report(f"hf-lowrank {command}", _world_fault(error), FAILURE_STATUS)
        if error.errno == errno.ENAMETOOLONG:  # a path the user gave: bad input
            return _report(f"hf-lowrank {command}", error, INPUT_ERROR_STATUS)
        if type(error).__module__.startswith("hf_lowrank"):
            return _report(f"hf-lowrank {command}", error, FAILURE_STATUS)
        raise
    except Exception as error:
        # Decided by module, so that this file imports none of the (heavy) modules that define these errors.
        if type(error).__module__.startswith("hf_lowrank"):
            return _report(f"hf-lowrank {command}", error, FAILURE_STATUS)
        raise


def _world_fault(error: OSError) -> str:
    """The cause and the path of a read-only or full disk: the package's own message where it wrote one (a full disk
    during a save names the intact checkpoint), else the OS's."""
    detail = " ".join(str(error.strerror or error).split())
    where = f": {error.filename}" if error.filename else ""
    return f"{detail}{where} ({WORLD_ERRNOS[error.errno]}: make room, or point the command at a writable disk)"


def _report(prog: str, error, status: int) -> int:
    message = " ".join(str(error).split()) or type(error).__name__  # one line, however the message was wrapped
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
