"""`hf-lowrank` command line: a thin dispatcher; each subcommand lives in the module that does the work."""

import argparse
import importlib
import sys

# name -> (module:function taking argv, one-line help). Modules are imported only when their command runs,
# so `hf-lowrank --help` stays fast and works without the training extras.
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("hf_lowrank.presets:main", "list the model presets with factorized vs dense parameter counts"),
    "push": ("hf_lowrank.hub:main", "publish MODEL_DIR to the Hub in one commit with a generated model card"),
    "convert": ("hf_lowrank.convert:main", "convert Llama <-> low-rank (--from-dense | --to-dense SRC DST)"),
    "evaluate": ("hf_lowrank.evaluation:main", "sliding-window perplexity of MODEL_DIR; writes eval_results.json"),
    "finetune": ("hf_lowrank.finetune:main", "LoRA fine-tuning (PEFT) of a factorized model through the Trainer"),
    "pretrain": ("hf_lowrank.training.pretrain:main", "pretrain a factorized model (Spectron) through the HF Trainer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="hf-lowrank",
        description="Native low-rank LLM pretraining with Spectron, on the Hugging Face stack.",
        epilog="Run `hf-lowrank COMMAND --help` for the options of a command.",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        metavar="COMMAND",
        help="; ".join(f"{name}: {text}" for name, (_, text) in sorted(COMMANDS.items())),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    target, _ = COMMANDS[args.command]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
