"""The proxy's backup jobs: ``/etc/sanoffload/jobs/NAME.toml``, one file per job.

Example (every key; only ``source`` and ``store`` are required)::

    source = "fs1:/srv/data"          # HOST:/PATH on the first server (HOST may be user@host)
    store = "bk1:/srv/backups"        # HOST:/PATH of the repository, a local /PATH, or
                                      #   "s3://BUCKET/PREFIX?profile=NAME" (S3, a profile
                                      #   of /etc/sanoffload/s3.toml)
    verify = "stream"                 # stream (checked in flight, the default) | full
                                      #   (also tar --diff against the duplicate) | none;
                                      #   true/false of older files mean full/none
    level = 3                         # zstd level, 1-19 (default 3; -T0 uses every core)
    kind = "snapshot"                 # duplicate kind: snapshot | thin-snapshot |
                                      #   raid1-split | mirror-split (default: the agent chooses)
    ssh_options = ["-o", "Port=2222"] # extra ssh arguments, options only
    timeout_s = 43200                 # the whole backup's limit
    with = ["/srv/log"]               # a consistency group: more paths on the same first
                                      #   server, frozen in the same window, one archive
    mode = "tar"                      # tar (an archive of the files, the default) | image
                                      #   (the volume's blocks in chunks; incremental on
                                      #   thin volumes; one path only, no "with")
    incremental = false               # tar only: tar --listed-incremental levels, each
                                      #   against the last; restore applies the chain
    full_every = 7                    # with incremental: a new level 0 after this many
                                      #   incremental levels (1-1000, default 7)

NAME becomes a file name and a systemd instance name
(``sanoffload-backup@NAME.timer``), so it is letters, digits, ``_``, ``.``,
``-``.  A source always names a host: a backup is never taken on the host
that holds the data.  Every problem is a :class:`ConfigError` naming the file,
the key and the reason; unknown keys are refused (a typo must not silently
fall back to a default).

``sanoffload-backup@.service`` stops a run after 13 hours (``TimeoutStartSec``);
a job with a longer ``timeout_s`` needs that raised too (``systemctl edit``).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..channel.messages import MAX_MEMBERS
from ..configfile import parse_toml, read_text, valid_name
from ..errors import ConfigError, UsageError
from ..kinds import (
    BackupMode as BackupMode,  # re-exported: the CLI and job callers import it here
    DuplicateKind,
    VerifyMode,
)
from ..store.s3config import is_s3_url, parse_url

JOBS_DIR = "/etc/sanoffload/jobs"
JOB_SUFFIX = ".toml"
#: within the unit's TimeoutStartSec (13h), so the backup's own deadline cleans up first
DEFAULT_TIMEOUT_S = 12 * 3600.0

_KEYS = {"source", "store", "verify", "level", "kind", "ssh_options", "timeout_s", "with",
         "mode", "incremental", "full_every"}
#: a new level 0 after this many incremental levels, unless the job says otherwise
DEFAULT_FULL_EVERY = 7
#: the most incremental levels above a level 0 (the store refuses longer chains)
MAX_FULL_EVERY = 1000
#: the most paths one consistency group may name (the agent's answer lists at most these)
MAX_GROUP_PATHS = MAX_MEMBERS

# HOST:PATH. The host never starts with '-' (ssh would read it as an option);
# an IPv6 address is written in brackets, as scp does.
_USER = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}"
_HOSTNAME = r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
_LOCATION_RE = re.compile(rf"(?:(?P<user>{_USER})@)?(?P<host>{_HOSTNAME}|{_IPV6}):(?P<path>.*)",
                          re.DOTALL)
_CONTROL = ("\0", "\n", "\r")

# ssh options a job may add: those taking a value, and plain flags. Anything that
# changes what ssh does (-N, -f, -W, -O, -L/-R/-D forwards, -t...) is left out.
_SSH_VALUE_OPTIONS = ("-o", "-p", "-i", "-F", "-J", "-l", "-c", "-m", "-b", "-B", "-E")
_SSH_FLAGS = ("-4", "-6", "-C", "-q", "-v", "-vv", "-vvv")
_SSH_CONFIG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:=|\s+)\S")


@dataclass(frozen=True)
class Job:
    """One backup job: what to back up from where, and where to store it."""

    name: str
    source_host: str
    source_path: str
    #: None: a repository on the proxy itself, or on S3 (``store_path`` is the s3:// URL)
    store_host: str | None
    store_path: str
    verify: VerifyMode = VerifyMode.STREAM
    level: int | None = None
    #: None: the agent chooses from the volume
    kind: DuplicateKind | None = None
    ssh_options: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: a consistency group's other paths on the source's host (empty: one path)
    also: tuple[str, ...] = ()
    mode: BackupMode = BackupMode.TAR
    #: tar --listed-incremental levels (tar mode only)
    incremental: bool = False
    #: with ``incremental``: a new level 0 after this many levels
    full_every: int = DEFAULT_FULL_EVERY

    @property
    def source(self) -> str:
        return f"{_host_text(self.source_host)}:{self.source_path}"

    @property
    def store(self) -> str:
        if self.store_host is None:
            return self.store_path
        return f"{_host_text(self.store_host)}:{self.store_path}"


def _host_text(host: str) -> str:
    # back to HOST:PATH form: an IPv6 address needs its brackets again
    user, at, name = host.rpartition("@")
    return f"{user}{at}[{name}]" if ":" in name else host


def parse_location(text: str, what: str, *, require_host: bool = False,
                   error: type[UsageError] = UsageError) -> tuple[str | None, str]:
    """Split ``HOST:/PATH`` (or a bare ``/PATH``, host None) into ``(host, path)``.

    The host is ready for ssh: ``user@`` kept, an IPv6 address's brackets
    removed. ``what`` starts every error message (e.g. ``"--source"`` or
    ``"FILE: source"``); errors are ``error`` (a :class:`UsageError` by default).
    """
    if not isinstance(text, str) or not text:
        raise error(f"{what}: must be HOST:/PATH{'' if require_host else ' or /PATH'}, "
                    f"not {text!r}")
    if any(c in text for c in _CONTROL):
        raise error(f"{what}: must not contain NUL or line breaks: {text!r}")
    host: str | None
    if text.startswith("/"):
        host, path = None, text
    else:
        m = _LOCATION_RE.fullmatch(text)
        if m is None:
            head = text.partition(":")[0] if ":" in text else ""
            if ":" in text and not head:
                reason = "the host before ':' is empty"
            elif ":" in text:
                reason = f"{head!r} is not a host name, [IPv6] address or user@host"
            else:
                reason = "no HOST: and not an absolute path"
            raise error(f"{what}: {reason}: {text!r}")
        name = m["host"].strip("[]")
        host = f"{m['user']}@{name}" if m["user"] else name
        path = m["path"]
        if not path.startswith("/"):
            raise error(f"{what}: the path after ':' must be absolute: {text!r}")
    if ".." in path.split("/"):
        raise error(f"{what}: must not contain '..': {text!r}")
    if require_host and host is None:
        raise error(f"{what}: needs a host (HOST:/PATH): a backup is always taken from "
                    f"another machine: {text!r}")
    return host, posixpath.normpath(path)


def group_paths(source: str, also: Any, what: str,
                error: type[UsageError] = UsageError) -> tuple[str, ...]:
    """A consistency group's other paths, checked like the source's; ``error`` if one is bad.

    Each an absolute ``/PATH`` on the source's host (no ``..``, no NUL or line
    break; normalised), not ``/``, distinct, none the source and none inside
    another (each becomes a top directory of one archive); at most
    :data:`MAX_GROUP_PATHS` paths with the source.
    """
    if not isinstance(also, (list, tuple)):
        raise error(f"{what}: must be a list of /PATH, not {also!r}")
    out: list[str] = []
    for i, given in enumerate(also):
        here = f"{what}[{i}]" if isinstance(also, list) else what
        host, path = parse_location(given, here, error=error)
        if host is not None:
            raise error(f"{here}: a path on the source's host (/PATH), not {given!r}")
        if path == "/":
            raise error(f"{here}: not the root directory")
        out.append(path)
    paths = [source, *out]
    if len(paths) > MAX_GROUP_PATHS:
        raise error(f"{what}: a consistency group has at most {MAX_GROUP_PATHS} paths, "
                    f"not {len(paths)}")
    if len(set(paths)) != len(paths):
        raise error(f"{what}: a path is named twice: {', '.join(paths)}")
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a.rstrip("/") + "/"):
                raise error(f"{what}: {b} is inside {a}: back up {a} alone")
    return tuple(out)


def valid_job_name(name: str) -> bool:
    """True when ``name`` can be a job file name and a systemd instance name."""
    return valid_name(name) and ".." not in name


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not valid_job_name(name):
        raise UsageError(f"bad job name {name!r}: 1-64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit, no '..'")


class Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {reason}")

    def location(self, data: Mapping[str, Any], key: str,
                 require_host: bool, s3: bool = False) -> tuple[str | None, str]:
        if key not in data:
            form = "HOST:/PATH" if require_host else "HOST:/PATH or /PATH"
            raise self.error(key, f"required ({form}{', or s3://BUCKET/PREFIX' if s3 else ''})")
        value = data[key]
        if s3 and isinstance(value, str) and is_s3_url(value):
            try:
                parse_url(value)
            except UsageError as exc:
                raise self.error(key, exc.message) from None
            return None, value
        return parse_location(value, f"{self.source}: {key}", require_host=require_host,
                              error=ConfigError)

    def level(self, value: Any, key: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 19:
            raise self.error(key, f"must be a zstd level from 1 to 19, not {value!r}")
        return value

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def full_every(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 1 <= value <= MAX_FULL_EVERY:
            raise self.error(key, f"must be a whole number of levels from 1 to "
                                  f"{MAX_FULL_EVERY}, not {value!r}")
        return value

    def verify_mode(self, value: Any, key: str) -> VerifyMode:
        try:
            return VerifyMode.of(value)
        except UsageError as exc:
            raise self.error(key, exc.message) from None

    def mode(self, value: Any, key: str) -> BackupMode:
        try:
            return BackupMode.parse(value)
        except UsageError as exc:
            raise self.error(key, exc.message) from None

    def kind(self, value: Any, key: str) -> DuplicateKind:
        try:
            return DuplicateKind.parse(value)
        except UsageError as exc:
            # the one parse's message, with the file and key in front, as every job error
            raise self.error(key, exc.message) from None

    def seconds(self, value: Any, key: str) -> float:
        # bool is an int in Python; "true" for a number is a mistake
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number of seconds, not {value!r}")
        if not 0 < value < float("inf"):
            raise self.error(key, f"must be greater than 0, not {value}")
        return float(value)

    def ssh_options(self, value: Any, key: str) -> tuple[str, ...]:
        """Options only: a stray word would become ssh's destination host."""
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of strings, not {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{key}[{i}]", f"must be a non-empty string, not {item!r}")
            if any(c in item for c in _CONTROL):
                raise self.error(f"{key}[{i}]", f"must not contain NUL or line breaks: {item!r}")
        i = 0
        while i < len(value):
            item = value[i]
            here = f"{key}[{i}]"
            if item in _SSH_VALUE_OPTIONS:
                if i + 1 >= len(value):
                    raise self.error(here, f"{item} needs a value after it")
                self._ssh_value(item, value[i + 1], f"{key}[{i + 1}]")
                i += 2
                continue
            if item in _SSH_FLAGS:
                i += 1
                continue
            joined = next((o for o in _SSH_VALUE_OPTIONS if item.startswith(o)), None)
            if joined is not None:
                # -oKey=Value, -p2222: option and value in one word
                self._ssh_value(joined, item[len(joined):], here)
                i += 1
                continue
            allowed = ", ".join((*_SSH_VALUE_OPTIONS, *_SSH_FLAGS))
            if item.startswith("-"):
                raise self.error(here, f"ssh option {item!r} is not allowed here "
                                       f"(allowed: {allowed}, each flag on its own)")
            raise self.error(here, f"{item!r} is not an ssh option (ssh would take it "
                                   f"for the host); write options as [\"-o\", \"Key=Value\"]")
        return tuple(value)

    def _ssh_value(self, option: str, val: str, key: str) -> None:
        if option == "-o" and not _SSH_CONFIG_RE.match(val):
            raise self.error(key, f"-o takes Key=Value (an ssh_config setting), not {val!r}")


def from_dict(name: str, data: Mapping[str, Any], source: str = "<job>") -> Job:
    """Validate parsed TOML ``data`` of job ``name``; ``source`` names the file in errors."""
    _check_name(name)
    c = Checker(source)
    for key in data:
        if key not in _KEYS:
            raise c.error(key, f"unknown key (known: {', '.join(sorted(_KEYS))})")
    source_host, source_path = c.location(data, "source", require_host=True)
    assert source_host is not None  # require_host
    store_host, store_path = c.location(data, "store", require_host=False, s3=True)
    kind = data.get("kind")
    mode = c.mode(data.get("mode", BackupMode.TAR.value), "mode")
    if mode is BackupMode.IMAGE and data.get("with"):
        raise c.error("with", "an image backup reads one volume: a consistency group is "
                              "backed up with mode = \"tar\"")
    incremental = c.flag(data.get("incremental", False), "incremental")
    if incremental and mode is BackupMode.IMAGE:
        raise c.error("incremental", "is for mode = \"tar\": an image backup of a thin "
                                     "volume is incremental by itself")
    if "full_every" in data and not incremental:
        raise c.error("full_every", "needs incremental = true")
    return Job(
        name=name, source_host=source_host, source_path=source_path,
        store_host=store_host, store_path=store_path,
        verify=c.verify_mode(data.get("verify", VerifyMode.STREAM), "verify"),
        level=c.level(data.get("level"), "level"),
        kind=None if kind is None else c.kind(kind, "kind"),
        ssh_options=c.ssh_options(data.get("ssh_options", []), "ssh_options"),
        timeout_s=c.seconds(data.get("timeout_s", DEFAULT_TIMEOUT_S), "timeout_s"),
        also=group_paths(source_path, data.get("with", []), f"{source}: with",
                         error=ConfigError),
        mode=mode, incremental=incremental,
        full_every=c.full_every(data.get("full_every", DEFAULT_FULL_EVERY), "full_every"))


def parse(name: str, text: str, source: str = "<string>") -> Job:
    """Parse and validate the TOML ``text`` of job ``name``."""
    return from_dict(name, parse_toml(text, source), source)


def job_path(name: str, jobs_dir: str | os.PathLike[str] = JOBS_DIR) -> str:
    """Where job ``name``'s file lives (the name is checked first)."""
    _check_name(name)
    return os.path.join(os.fspath(jobs_dir), name + JOB_SUFFIX)


def load_job(name: str, jobs_dir: str | os.PathLike[str] = JOBS_DIR) -> Job:
    """Read, check and parse job ``name`` from ``jobs_dir``."""
    path = job_path(name, jobs_dir)
    # the shared reader checks type, owner and mode: ssh_options can run commands
    # (ProxyCommand) as the root-run backup service, so only root may write a job
    text = read_text(path, missing=_no_such_job(name, path, jobs_dir))
    assert text is not None
    return parse(name, text, path)


def _no_such_job(name: str, path: str, jobs_dir: str | os.PathLike[str]) -> ConfigError:
    known = list_jobs(jobs_dir)
    if name.endswith(JOB_SUFFIX) and name[:-len(JOB_SUFFIX)] in known:
        hint = f"name the job without {JOB_SUFFIX}: {name[:-len(JOB_SUFFIX)]}"
    elif known:
        hint = f"jobs there: {', '.join(known)}"
    else:
        hint = f"create {path} (see the README)"
    return ConfigError(f"no such job {name} ({path})", hint=hint)


def list_jobs(jobs_dir: str | os.PathLike[str] = JOBS_DIR) -> list[str]:
    """The names of the jobs in ``jobs_dir`` (sorted; none when it does not exist)."""
    try:
        entries = os.listdir(jobs_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError(f"{os.fspath(jobs_dir)}: cannot list: {exc.strerror or exc}") from None
    names = []
    for entry in entries:
        stem = entry[:-len(JOB_SUFFIX)] if entry.endswith(JOB_SUFFIX) else None
        if stem and valid_job_name(stem) and os.path.isfile(os.path.join(jobs_dir, entry)):
            names.append(stem)
    return sorted(names)
