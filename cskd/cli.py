"""The ``cskd`` command line: one parser assembled from the command modules in :mod:`cskd.commands`."""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from cskd import __version__
from cskd.commands import bench, cache_teacher, evaluate, export, gpu_check, plan, predict, serve, train
from cskd.errors import CSKDError

COMMANDS = (train, cache_teacher, evaluate, export, predict, serve, bench, plan, gpu_check)


# Commands whose KEY=VALUE overrides (a list of positionals) may stand before, between and after their
# options: argparse's plain parsing ends the list at the first option and refuses what follows.
INTERMIXED = ("train", "cache-teacher", "plan", "serve")


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser, by name."""
    parser = argparse.ArgumentParser(
        prog="cskd",
        description="Distil a fast ViT from a CNN teacher (CSKD), then evaluate, export, serve and benchmark it.",
        epilog="run `cskd COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"cskd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser, sub.choices


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line as parsed arguments: `cskd train a=1 --no-progress b=2` as `cskd train
    --no-progress a=1 b=2` (see :data:`INTERMIXED`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _build()
    args, _ = parser.parse_known_args(argv)  # which command (--help and --version end here)
    if args.command not in INTERMIXED:
        return parser.parse_args(argv)
    own = commands[args.command].parse_intermixed_args(argv[argv.index(args.command) + 1:])
    own.command = args.command
    return own


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except CSKDError as exc:
        print(f"cskd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cskd {args.command}: interrupted; a run continues with `cskd train --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
