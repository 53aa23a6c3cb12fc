"""Reading a configuration file: one place for the errors every config reader gives."""

from __future__ import annotations

import os

from .errors import ConfigError


def read_text(path: str | os.PathLike[str], *,
              missing: ConfigError | None = None) -> str | None:
    """The UTF-8 text of ``path``; ConfigError naming the file for anything unreadable.

    A file that does not exist raises ``missing`` (None: returns None, for
    optional files).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if missing is None:
            return None
        raise missing from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8: {exc}") from None
