"""The ``cskd`` commands, one module each: ``add_parser(subparsers)`` and ``run(args) -> exit code``.

Command modules import only light, always-installed modules at module level (the standard
library, numpy, :mod:`cskd.errors`, :mod:`cskd.files`, :mod:`cskd.runtime`); each ``run`` imports
what its command needs from the optional extras (torch, FastAPI), so ``cskd --help`` is instant
and the serving image (no torch) can run ``cskd serve`` and ``cskd predict``.
"""
