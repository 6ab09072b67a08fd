"""The parsers of every `hf-lowrank` command: one flag style and one way to fail.

Flags are snake_case, as in transformers' `HfArgumentParser` and its example scripts (`--rank_ratio`,
`--output_dir`); the kebab-case spelling (`--rank-ratio`) is accepted too. A command line the parser cannot read
raises `UsageError`, a `ValueError`, which `hf_lowrank.cli.main` reports like every other bad input: one line
``hf-lowrank COMMAND: error: ...`` on stderr and exit status 2.
"""

import argparse
import sys

from transformers import HfArgumentParser


class UsageError(ValueError):
    """A command line the parser cannot read: an unknown flag, a missing or malformed value."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        # Replaces argparse's print-usage-and-sys.exit(2), so that `cli.main` reports every failure, usage or not,
        # in one format and code that calls a command's `main` gets an exception it can catch.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class CommandParser(_RaisingParser):
    """`argparse.ArgumentParser` for snake_case options that also reads `--x-y` (and `--x-y=v`) as `--x_y`."""

    def parse_known_args(self, args=None, namespace=None):
        # Every parse (parse_args, argument groups, mutually exclusive groups) goes through here.
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(snake_case_flags(args, self._option_string_actions), namespace)


class HfCommandParser(_RaisingParser, HfArgumentParser):
    """`HfArgumentParser` (which registers `--x-y` beside every `--x_y` itself) with `CommandParser`'s errors."""

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        # HfArgumentParser reports unknown flags as "Some specified arguments are not used ..."; say it as
        # argparse does for the other commands.
        *outputs, unknown = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return tuple(outputs)


def snake_case_flags(args: list[str], options) -> list[str]:
    """``args`` with every ``--x-y[=v]`` that names the option ``--x_y`` of ``options`` spelled ``--x_y[=v]``.
    Tokens after ``--`` and tokens that name no option are left as they are."""
    spelled = []
    for index, arg in enumerate(args):
        if arg == "--":
            return spelled + args[index:]
        flag, equals, value = arg.partition("=")
        if flag.startswith("--") and "-" in flag[2:] and flag not in options:
            snake = "--" + flag[2:].replace("-", "_")
            if snake in options:
                arg = snake + equals + value
        spelled.append(arg)
    return spelled


__all__ = ["CommandParser", "HfCommandParser", "UsageError", "snake_case_flags"]
