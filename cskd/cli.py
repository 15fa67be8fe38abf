"""The ``cskd`` command line: one parser assembled from the command modules in :mod:`cskd.commands`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from cskd import __version__
from cskd.commands import bench, cache_teacher, evaluate, export, gpu_check, predict, serve, train
from cskd.errors import CSKDError

COMMANDS = (train, cache_teacher, evaluate, export, predict, serve, bench, gpu_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cskd",
        description="Distil a fast ViT from a CNN teacher (CSKD), then evaluate, export, serve and benchmark it.",
        epilog="run `cskd COMMAND --help` for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"cskd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
