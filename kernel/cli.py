"""``python -m kernel <command>``: one sub-command per module.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`kernel.errors.KernelError` raised anywhere ends the command with one clear message (exit 2),
never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from kernel.errors import KernelError

# command name -> module implementing it (imported lazily when the command runs or its help is shown)
COMMANDS: dict[str, str] = {
    "demo-weights": "kernel.demo.weights",
    "profile": "kernel.profile",
    "predict": "kernel.predict",
    "dry-run": "kernel.demo.dryrun",
    "extract": "kernel.extract",
    "bundle": "kernel.bundle",
    "postprocess": "kernel.postprocess.cli",
    "prepare": "kernel.prepare",
    "rehearse": "kernel.rehearse",
    "rerun": "kernel.rerun",
    "validate": "kernel.validate",
}


# commands that load checkpoints (they take --trust-checkpoint)
CHECKPOINT_COMMANDS = ("profile", "predict", "extract", "bundle")


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
        if name in CHECKPOINT_COMMANDS:
            add_trust_argument(p)
    return parser


def add_trust_argument(p) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints that hold more than tensors with full unpickling, which can run code "
                   "(default: only when the manifest pins the file's sha256; logged)")


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


def os_error_text(exc: OSError) -> str:
    """One line for an OS error: the file(s) it names and the system's reason."""
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = " -> ".join(n.encode("utf-8", "backslashreplace").decode("utf-8") for n in names)
    return f"{where}: {reason}" if where else reason


def run_command(fn, args, verbose: bool = False, quiet: bool = False) -> int:
    """Every entry point's error boundary: logging set up, KernelError -> one ``error:`` line, exit 2."""
    setup_logging(verbose, quiet)
    try:
        from kernel.models.checkpoint import trust_all_checkpoints

        trust_all_checkpoints(bool(getattr(args, "trust_checkpoint", False)))  # for this command only
        return int(fn(args) or 0)
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (read-only, full disk, not a folder, undecodable name)
        print(f"error: {os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------------------
# Output paths: one set of rules for every command with an ``--out`` (nothing of the user's is ever overwritten)
# ---------------------------------------------------------------------------------------------------------------

def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise KernelError(f"{option} {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise KernelError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KernelError(f"{option} {path}: folder {parent} is not writable (read-only file system or permissions)")


def _resolved_inputs(inputs):
    """The run's inputs that were given (not None, not empty), resolved."""
    return [_resolved(i) for i in inputs if i is not None and os.fspath(i)]


def output_file(out, option: str = "--out", inputs=(), side_files=()) -> Path:
    """Check a file path a command is about to (re)write; returns it as a :class:`Path`.

    Refused with a :class:`KernelError` naming the option: an empty path; an existing folder, device, pipe or
    symbolic link (only a regular file is ever replaced); a path under a file; a folder that cannot be written;
    and a path that is one of the run's ``inputs`` (files) or an existing file inside an input folder. The same
    rules hold for ``side_files`` the command writes beside it (e.g. ``<out>.log.json``).
    """
    if out is None or not os.fspath(out).strip():
        raise KernelError(f"{option}: empty path")
    path = _resolved(out)
    for target in (path, *(_resolved(s) for s in side_files)):
        label = option if target == path else f"{option} {path} (writes {target.name} beside it)"
        if target.is_symlink():
            raise KernelError(f"{label}: {target} is a symbolic link; name a regular file")
        if target.exists() and target.is_dir():
            raise KernelError(f"{label}: {target} is a folder; name the file to write")
        if target.exists() and not target.is_file():
            raise KernelError(f"{label}: {target} exists and is not a regular file (device, pipe or socket)")
        for src in _resolved_inputs(inputs):
            if target == src or (src.exists() and target.exists() and os.path.samefile(target, src)):
                raise KernelError(f"{label}: {target} is an input of this run; write elsewhere")
            if src.is_dir() and target.exists() and _inside(target, src):
                raise KernelError(f"{label}: {target} is a file inside the input folder {src}; write elsewhere")
        _check_parent(target, option)
    return Path(out)


def output_dir(out, option: str = "--out", inputs=()) -> Path:
    """Check a folder a command fills: not empty text, not an existing non-folder, writable, and neither
    inside nor around any of the run's ``inputs`` (a build inside the package it ships, or around its weights,
    would pack itself). Returns it as a :class:`Path`. Whether an existing folder may be written into is the
    caller's rule (:func:`claim_dir`)."""
    if out is None or not os.fspath(out).strip():
        raise KernelError(f"{option}: empty path")
    path = _resolved(out)
    if path.exists() and not path.is_dir():
        raise KernelError(f"{option} {path}: exists and is not a folder")
    for src in _resolved_inputs(inputs):
        out_in_input = src.is_dir() and _inside(path, src)
        input_in_out = src.exists() and path.exists() and _inside(src, path)
        if out_in_input or input_in_out:
            raise KernelError(f"{option} {path}: overlaps the input {src}; use a folder outside the inputs")
    _check_parent(path / "x", option) if path.is_dir() else _check_parent(path, option)
    return Path(out)


def claim_dir(out, marker: str, owned=(), option: str = "--out") -> Path:
    """Make ``out`` a folder this command may write into: created when new, claimed when empty, or reused
    when it holds ``marker`` (written by an earlier run of the same command): then only the ``owned`` entries
    (what the command writes) are removed, everything else stays. Any other existing folder is refused:
    a command never deletes or overwrites what it did not create."""
    path = output_dir(out, option)
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise KernelError(f"{option} {path}: folder is not empty and was not made by this command "
                              f"(no {marker}); name a new or empty folder")
        for name in owned:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(json.dumps({"made_by": marker, "owned": list(owned)}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Numeric options: argparse types (a bad value ends in argparse's one error line, exit 2)
# ---------------------------------------------------------------------------------------------------------------

def number(kind=float, minimum=None, maximum=None, exclusive_min: bool = False):
    """An argparse ``type``: a finite ``kind`` (float or int) within ``[minimum, maximum]`` (``minimum``
    excluded when ``exclusive_min``)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        low_bad = minimum is not None and (value <= minimum if exclusive_min else value < minimum)
        if low_bad:
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive_min else '>='} {minimum}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
