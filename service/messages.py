"""Client input quoted in error messages, bounded: a 10,000-character model id or a 4,001-digit n is
shown by its first characters, never echoed whole (and never formatted past Python's int-to-str limit)."""

from __future__ import annotations

MAX_SHOWN = 60  # characters of one quoted value
MAX_DETAIL = 1000  # characters of a whole error message


def clipped(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its start and how many characters were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, at most about ``limit`` characters; huge integers by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of {len(str(value)) if value.bit_length() < 14_000 else 'over 4,000'} digits>"
    try:
        text = repr(value)
    except ValueError:  # an integer inside it is past the int-to-str limit
        return f"<a {type(value).__name__} too large to show>"
    return clipped(text, limit)
