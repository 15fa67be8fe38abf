"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a foreign checkpoint) raises
:class:`CSKDError` with one line that names the problem and the fix. The CLI prints that line
and exits non-zero; programming errors still raise their usual exceptions.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class CSKDError(Exception):
    """An error caused by user input, with a one-line message saying how to fix it."""

    exit_code = 2


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of ``value`` among ``choices``, or ''."""
    matches = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""
