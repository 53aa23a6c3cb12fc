"""Reading a configuration file: one place for the checks and errors every config reader gives.

agent.toml, store.toml and the proxy's job files all decide what root does
(hooks it runs, roots it freezes, repositories it writes, ssh options), so
each is read the same way::

    open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
    fstat(fd): a regular file, owned by a trusted uid, not group/world-writable,
               at most MAX_CONFIG_BYTES
    read from that same fd

The checks look at the file that was opened, not at the name (which could be
swapped between a stat and an open). O_NONBLOCK: opening a FIFO put there by
mistake (or malice) would otherwise block ``store serve`` in open() for ever;
O_NOFOLLOW: a symlink could point anywhere, a user's file included.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from collections.abc import Collection
from typing import Any

from .errors import ConfigError

#: client and job names: they become file names, systemd instance names and log words
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"

#: a config is a few kilobytes; anything this big is a mistake (or /dev/zero's cousin)
MAX_CONFIG_BYTES = 1 << 20


def trusted_owners() -> frozenset[int]:
    """Who may own a config file: root, and the effective uid running sanoffload.

    In production that is root alone (sanoffload runs as root); a test or a
    user running sanoffload unprivileged can already change its own files, so
    trusting them adds no power.
    """
    return frozenset({0, os.geteuid()})


def read_text(path: str | os.PathLike[str], *,
              missing: ConfigError | None = None,
              owners: Collection[int] | None = None) -> str | None:
    """The UTF-8 text of ``path``; ConfigError (exit 2) naming the file and the problem.

    A file that does not exist raises ``missing`` (None: returns None, for
    optional files). ``owners``: the uids the file may belong to
    (:func:`trusted_owners` by default).
    """
    found = read_text_mode(path, missing=missing, owners=owners)
    return None if found is None else found[0]


def read_text_mode(path: str | os.PathLike[str], *,
                   missing: ConfigError | None = None,
                   owners: Collection[int] | None = None,
                   private: bool = False,
                   limit: int = MAX_CONFIG_BYTES) -> tuple[str, int] | None:
    """:func:`read_text`, with the file's mode taken from the very descriptor read.

    ``private``: also refuse a file that group or others may read (it holds a
    secret). ``limit``: the most bytes accepted (at most :data:`MAX_CONFIG_BYTES`).
    """
    name = os.fspath(path)
    allowed = trusted_owners() if owners is None else frozenset(owners)
    limit = min(limit, MAX_CONFIG_BYTES)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing is None:
            return None
        raise missing from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW and the last component is a symlink
            raise ConfigError(f"{name}: is a symbolic link; name the file itself",
                              hint=f"use {os.path.realpath(name)}") from None
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        _check(name, st, allowed, limit)
        if private and stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"{name}: holds a secret and is readable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o})",
                              hint=f"chmod 600 {name}")
        raw = _read(fd, name, limit)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8"), st.st_mode
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8: {exc}") from None


def _check(name: str, st: os.stat_result, owners: frozenset[int],
           limit: int = MAX_CONFIG_BYTES) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{name}: cannot read: not a regular file ({_kind(st.st_mode)})")
    if st.st_uid not in owners:
        others = ", ".join(map(str, sorted(owners - {0})))
        who = "root" if owners <= {0} else f"root or uid {others}"
        raise ConfigError(f"{name}: owned by uid {st.st_uid}, must be owned by {who}",
                          hint=f"chown root: {name}")
    if st.st_mode & 0o022:
        raise ConfigError(f"{name}: group- or world-writable (mode "
                          f"{stat.S_IMODE(st.st_mode):04o})", hint=f"chmod go-w {name}")
    if st.st_size > limit:
        raise ConfigError(f"{name}: larger than {limit} bytes ({st.st_size}): "
                          "not a configuration file")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), f"mode {mode:o}")


def _read(fd: int, name: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    # bounded even if the file grows after the fstat
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ConfigError(f"{name}: larger than {limit} bytes: "
                              "not a configuration file")
        chunks.append(chunk)


def valid_name(name: object) -> bool:
    """True for a client or job name (:data:`NAME_RULE`).

    fullmatch, not match with "$": "$" also matches before a trailing newline.
    """
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """``text`` as a TOML table; ConfigError (exit 2) naming ``source`` when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
