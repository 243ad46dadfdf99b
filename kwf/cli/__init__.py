"""The ``kwf`` command.

Each top-level command is a ``register(commands)`` function in ``COMMANDS`` that adds its
subparser and sets ``handler`` to a small function taking the parsed arguments and returning the
exit code; add a command by appending its register function. Handlers print what a person needs
to read (progress, results) on stdout; the library's structured logs go to stderr with ``-v``.

Exit codes (``kwf.cli._kafka``; the README's table): 0 done; 1 Kafka or the store unusable;
2 bad usage or input (nothing sent); 3 the local broker is not running (``kwf kafka status``);
4 no such thread or dead letter; 5 the engine dead-lettered the record just sent; 6 the thread
failed or was cancelled (``result``); 7 still running after ``--wait``; 8 replay diverged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import structlog

from kwf.cli._kafka import NOT_RUNNING, CliError
from kwf.cli._store import StoreError
from kwf.cli.demo import register_demo
from kwf.cli.dlq import register_dlq
from kwf.cli.history import register_history
from kwf.cli.kafka import register_kafka, register_topics
from kwf.cli.ops import register_ops
from kwf.cli.threads import register_threads
from kwf.cli.up import register_run, register_up
from kwf.cli.verify import register_verify
from kwf.config import KafkaSettingsError
from kwf.engine.admin import KafkaSetupError

Handler = Callable[[argparse.Namespace], int]

__all__ = ["NOT_RUNNING", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``kwf`` command line; returns the exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if os.getcwd() not in sys.path:  # KWF_WORKFLOWS modules are found here, as the engine
        sys.path.insert(0, os.getcwd())  # (python -m bytewax.run) finds them
    try:
        code: int = args.handler(args)
        return code
    except (KafkaSetupError, KafkaSettingsError, StoreError) as exc:
        print(f"kwf: error: {exc}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"kwf {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kwf", description="Workflow-as-code on Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true", help="structured logs on stderr")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True,
                                     dest="command")
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
    register_up, register_run, register_threads, register_ops, register_history, register_dlq,
    register_kafka, register_topics, register_demo,
    register_verify]
"""Top-level commands, in help order; `up` and `demo` register here too."""


