"""``python -m kernel <command>``: one sub-command per module.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`kernel.errors.KernelError` raised anywhere ends the command with one clear message (exit 2),
never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kernel.errors import KernelError

# command name -> module implementing it (imported lazily when the command runs or its help is shown)
COMMANDS: dict[str, str] = {
    "demo-weights": "kernel.models.demo",
    "profile": "kernel.profile",
    "predict": "kernel.predict",
    "dry-run": "kernel.dryrun",
    "extract": "kernel.extract",
    "bundle": "kernel.bundle",
    "postprocess": "kernel.postprocess.cli",
    "prepare": "kernel.prepare",
    "rehearse": "kernel.rehearse",
    "validate": "kernel.validate",
}


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kernel",
        description="Offline Kaggle kernel of the 2021 Google Landmark Recognition/Retrieval winning solution.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            # cheap placeholder entry so `--help` lists every command without importing all of them
            sub.add_parser(name, add_help=False)
            continue
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None:
        parser = argparse.ArgumentParser(prog="python -m kernel")
        parser.add_argument("-v", "--verbose", action="store_true")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
        for name, modname in COMMANDS.items():
            sub.add_parser(name, help=importlib.import_module(modname).HELP)
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    args = build_parser(only=command).parse_args(argv)
    return run_command(_load(command).run, args, verbose=args.verbose)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(fn, args, verbose: bool = False, quiet: bool = False) -> int:
    """Every entry point's error boundary: logging set up, KernelError -> one ``error:`` line, exit 2."""
    setup_logging(verbose, quiet)
    try:
        return int(fn(args) or 0)
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
