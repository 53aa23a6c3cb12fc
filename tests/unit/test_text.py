"""printable(): one line, no control sequences, whatever the input."""

from __future__ import annotations

import pytest

from sanoffload.text import has_control, printable


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain /srv/data", "plain /srv/data"),
    ("a\nb", "a\\nb"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("x\u202ey", "x\\u202ey"),          # right-to-left override
    ("l1\u2028l2", "l1\\u2028l2"),      # line separator
    (b"\xff/ok", "\\xff/ok"),
    ("tab\there", "tab\\there"),
    ("é ü ß", "é ü ß"),
])
@pytest.mark.hostile("agent", "names and messages holding newlines, escape sequences, bidi "
                     "overrides or non-UTF-8 bytes", "printed escaped on one line")
def test_printable_escapes_controls(raw: str | bytes, shown: str) -> None:
    out = printable(raw)
    assert out == shown
    assert "\n" not in out and "\x1b" not in out and not has_control(out)


def test_has_control() -> None:
    assert has_control("a\rb") and has_control("\x00") and not has_control("ok é")
