"""Client text the server turns into numbers and objects: every failure is one exception the routes
answer 4xx, never a 500.

Python's ``int()`` refuses strings of over 4,300 digits with a plain ``ValueError`` (CVE-2020-10735's
limit), and ``json.loads`` raises it from inside a document holding such a number: both are caught
here, where the text arrives, rather than trusted to each caller's ``except``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

MAX_DIGITS = 18  # any count, length or size the server accepts fits in 18 digits (< 2**63)


class MalformedInput(ValueError):
    """The client's text is not what it claims to be; the message says what and why."""


def parse_count(text: str) -> Optional[int]:
    """A non-negative decimal integer of at most 18 digits, else None (no exception, whatever the text)."""
    text = text.strip()
    if not text or len(text) > MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def load_json(data: bytes | str) -> Any:
    """``json.loads`` whose every failure (syntax, encoding, depth, over-long numbers) is :class:`MalformedInput`."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError and the digit limit are ValueErrors
        raise MalformedInput(str(exc)) from None
