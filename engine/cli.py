"""The `moefleet` command line: a registry of subcommands, each in its own module.

A subcommand module exposes `add_parser(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
Modules are imported only to build the parser, so keep heavy imports (torch, the engine) inside `run`.
A command reports a user mistake by raising `CommandError(message, hint)`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommands, in the order `moefleet --help` lists them. To add one, append its module here.
COMMAND_MODULES: list[str] = [
    "moefleet.engine.entrypoints.serve",  # moefleet serve
    "moefleet.engine.tiny_model_command",  # moefleet make-tiny-model
    "moefleet.operator.cli",  # moefleet operator
    "moefleet.engine.bench.command",  # moefleet bench
    "moefleet.engine.gateway.command",  # moefleet gateway
    "moefleet.engine.local_fleet",  # moefleet local
    "moefleet.engine.loadtest.command",  # moefleet loadtest
]

USAGE_ERROR = 2
# `--moe-backend` of serve and bench (= distributed.backends.CLI_CHOICES; spelled out here: no torch import)
MOE_BACKEND_CHOICES = ("auto", "deepep", "nvlink", "symm", "a2a")


class CommandError(Exception):
    """A mistake the user can fix: printed as `moefleet <cmd>: error: <message>` plus a hint, exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefleet", description="Serve Mixture-of-Experts LLMs (DP attention + expert parallel MoE)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        module = importlib.import_module(name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moefleet` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CommandError as error:
        print(f"moefleet {args.command}: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
