"""Query parameters of the record API, parsed strictly at the edge.

Numbers are ASCII digits only (``str.isdigit`` also accepts "²" and ``int`` refuses 5,000 digits),
within the range the store can hold; text is bounded and free of control characters (PostgreSQL
refuses NUL in text). Anything else is the caller's mistake: :class:`BadParameter`, answered 400.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_TEXT = 1024
MAX_SEQ = 2**63 - 1  # the store's sequence numbers are 64-bit integers
_DIGITS = re.compile(r"[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REASON_CODE = re.compile(r"[a-z][a-z-]{0,63}")


class BadParameter(ValueError):
    """A query parameter the API cannot use; the message names it and says what it must be."""


def whole_number(args: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise BadParameter(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def text(args: Mapping[str, str], name: str) -> str | None:
    raw = args.get(name)
    if raw is None:
        return None
    if len(raw) > MAX_TEXT or _CONTROL.search(raw):
        raise BadParameter(f"{name} must be at most {MAX_TEXT} characters, without control characters")
    return raw


def boolean(args: Mapping[str, str], name: str) -> bool | None:
    raw = args.get(name)
    if raw is None:
        return None
    if raw.lower() not in ("true", "false"):
        raise BadParameter(f"{name} must be true or false")
    return raw.lower() == "true"


def reason_code(args: Mapping[str, str], name: str) -> str | None:
    raw = args.get(name)
    if raw is None:
        return None
    if not _REASON_CODE.fullmatch(raw):  # also keeps LIKE wildcards out of the store's query
        raise BadParameter(f"{name} must be a reason code such as not-promoted or break-glass")
    return raw
