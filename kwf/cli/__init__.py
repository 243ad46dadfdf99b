"""The ``kwf`` command.

Each top-level command is a ``register(commands)`` function in ``COMMANDS`` that adds its
subparser and sets ``handler`` to a small function taking the parsed arguments and returning the
exit code; add a command by appending its register function. Handlers print what a person needs
to read (progress, results) on stdout; the library's structured logs go to stderr with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import structlog

from kwf.cli.demo import register_demo
from kwf.cli.kafka import NOT_RUNNING, register_kafka, register_topics
from kwf.cli.ops import register_ops
from kwf.cli.up import register_run, register_up
from kwf.cli.verify import register_verify
from kwf.engine.admin import KafkaSetupError

Handler = Callable[[argparse.Namespace], int]

__all__ = ["NOT_RUNNING", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``kwf`` command line; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        code: int = args.handler(args)
        return code
    except KafkaSetupError as exc:
        print(f"kwf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kwf", description="Workflow-as-code on Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true", help="structured logs on stderr")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(commands)
    return parser


def _configure_logging(verbose: bool) -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.INFO if verbose else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    register_up, register_run, register_ops, register_kafka, register_topics, register_demo,
    register_verify]
"""Top-level commands, in help order; `up` and `demo` register here too."""


