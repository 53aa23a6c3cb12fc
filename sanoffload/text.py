"""Text from elsewhere, made safe to print: one line, no terminal control sequences.

Names and messages that come from a peer, an archive, a manifest or a config
file may hold newlines (a forged row in a listing) or escape sequences (a
retitled terminal, a hidden line). Everything sanoffload prints that it did not
write itself goes through :func:`printable`.
"""

from __future__ import annotations

import unicodedata

#: the Unicode categories that never print: controls, formats (bidi overrides), separators
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def has_control(text: str) -> bool:
    """True if ``text`` holds a character :func:`printable` would escape."""
    return any(unicodedata.category(c) in _UNPRINTABLE for c in text)


def printable(text: str | bytes) -> str:
    r"""``text`` as one printable line: ``"a\nb"`` -> ``a\nb``, ``b"\xff"`` -> ``\xff``.

    Bytes are decoded as UTF-8 with undecodable bytes shown as ``\xNN``; every
    control, format or line-separator character becomes its Python escape.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNPRINTABLE else c
                   for c in text)
