"""Typed messages between roles: one class per answer, shared by both ends of the channel.

The agent builds a :class:`PrepareAnswer` and sends :meth:`PrepareAnswer.to_wire`;
the proxy reads the reply with :meth:`PrepareAnswer.from_wire`, which checks
every field as hostile input (a compromised or confused agent must not steer
iscsiadm, mount or the proxy's terminal) and raises
:class:`~sanoffload.errors.ProtocolError` (exit 11) for anything malformed, an
unknown enum value included. Past that edge the proxy holds attributes, never
a dict it "knows".

The wire form is the JSON object agents have always sent (keys and string
values unchanged, tests/unit/test_messages.py pins it), so a proxy and an
agent of different versions still understand each other::

    {"session_id": "fs1-1a2b3c4d",
     "target_iqn": "iqn.2003-01.org.linux-iscsi.sanoffload:fs1-1a2b3c4d",
     "portals": ["10.77.0.11:3260"], "lun": 0, "identifier": "naa.6001405…",
     "unit_serial": "…", "chap_user": "sanoffload-fs1-1a2b3c4d", "chap_secret": "…",
     "fstype": "ext4", "path_in_fs": "data", "object_kind": "directory",
     "duplicate_kind": "snapshot", "freeze_window_ms": 41.7, "frozen_by": "fsfreeze",
     "lease_expires": 1764152373.2, "frozen_at": 1764151773.1, "warnings": []}

``object_kind``, ``frozen_at`` and ``warnings`` came later: absent, they read
as None, 0.0 and []. Keys this version does not know are ignored.

``held`` (holding hooks' outputs, e.g. PostgreSQL's ``backup_label``) is sent
only when there are some: ``[{"hook": "/etc/sanoffload/hooks/pg-hold",
"output": "START WAL LOCATION: …\\n…"}]``. Unlike a warning, an output is
multi-line text that a restore needs byte for byte, so it is checked, not
rewritten: at most :data:`MAX_HELD` entries, each output at most
:data:`MAX_HELD_OUTPUT` bytes, :data:`MAX_HELD_JSON` bytes of JSON in all, and
no control character but newline and tab (the agent escapes the others with
:func:`~sanoffload.text.printable` before it sends; one arriving raw is a
forgery, refused).

``members`` is sent only for a consistency group (one request naming several
paths, frozen in one window): every member, the request's first path first,
each ``{"path": "/srv/san/db", "path_in_fs": "db", "fstype": "ext4",
"object_kind": "directory", "duplicate_kind": "snapshot", "lun": 0,
"identifier": "naa.…", "unit_serial": "…"}``, all LUNs of the one target
(one login, one CHAP pair). The top-level fields say the same of member 0.
Paths are absolute, normalised and distinct; LUNs and identifiers distinct; at
most :data:`MAX_MEMBERS`.

``delta`` is sent only for an image backup of a thin volume whose base the agent
trusts (see :class:`Delta`): ``{"base": "fs1/srv-thin-1a2b3c4d/20261126T102933Z",
"volume_bytes": 536870912, "chunk_bytes": 4194304, "changed": [[0, 8388608], ...],
"discarded": [[67108864, 4194304]]}``, at most :data:`MAX_DELTA_RANGES` ranges in all.
Absent, the proxy reads the whole volume.

This module imports only leaf modules (errors, kinds, text, iqn, the iscsiadm
wrapper's name checks): both the agent and the proxy import it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..errors import ProtocolError, UsageError
from ..iqn import IQN_MAX_LEN, valid_iqn
from ..kinds import Choice, DuplicateKind, ObjectKind, WhoFreezes
from ..text import has_control, printable
from ..tools import iscsiadm

#: a session id names an LV, a target, a journal file and the proxy's mount point
SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: CHAP user, unit serial, filesystem type: short words that go on command lines
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,254}")
#: a disk identifier as the agent sends it: NAA, 16 or 32 hex digits
_NAA_RE = re.compile(r"naa\.[0-9a-f]{16}(?:[0-9a-f]{16})?")
#: iscsiadm takes at most 256 bytes of CHAP secret; printable ASCII without spaces
_SECRET_RE = re.compile(r"[!-~]{1,255}")
MAX_PORTALS = 16
MAX_LUN = 16383  # LIO's highest LUN
MAX_PATH_CHARS = 4096
#: a freeze longer than a day is not a freeze (the store's manifest has the same bound)
MAX_FREEZE_WINDOW_MS = 86_400_000.0
#: epoch seconds up to the year 9999
MAX_EPOCH_S = 253_402_300_799.0
#: bounds on what the agent's warnings may put into a manifest and onto a terminal
MAX_WARNINGS = 32
MAX_WARNING_CHARS = 1000
#: holding hooks' outputs: how many, how long each (UTF-8 bytes), all of them as JSON (the
#: ASCII-escaped form the channel sends): with the warnings they fit one channel line and
#: the store's manifest bound
MAX_HELD = 8
MAX_HELD_OUTPUT = 64 * 1024
MAX_HELD_JSON = 192 * 1024
MAX_HELD_HOOK_CHARS = 4096
#: the control characters an output may hold as they are
HELD_KEEPS = "\n\t"
#: how much of a bad value an error message repeats
_SHOWN = 60

E = TypeVar("E", bound=Choice)


def is_session_id(value: str) -> bool:
    """True for a session id: a plain name, never '/', '.' or '..' (it names files)."""
    return bool(SESSION_ID_RE.fullmatch(value)) and value not in (".", "..")


def check_session_id(value: str) -> str:
    """``value`` if it is a plain name (no '/', no '..'); ValueError otherwise."""
    if not is_session_id(value):
        raise ValueError(f"invalid session id: {printable(repr(value))[:_SHOWN]}")
    return value


def normalize_wwid(value: str | bytes | None) -> str | None:
    """One spelling for a disk identifier: ``naa.`` + lowercase hex.

    ``0x6001405…`` (udev's ID_WWN_WITH_EXTENSION) becomes ``naa.6001405…``;
    ``naa.…`` (sysfs ``device/wwid``, the agent) is lowercased and stripped of
    the newline and padding sysfs adds. None or empty gives None.
    """
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip().lower()
    if not text:
        return None
    hexpart = text[2:]
    if text.startswith("0x") and len(hexpart) in (16, 32) and all(
            c in "0123456789abcdef" for c in hexpart):
        return "naa." + hexpart
    return text


def device_wwids(device: Any) -> set[str]:
    """Every identifier udev and sysfs give ``device`` (a pyudev Device; normalised): the
    agent names its SAN disk by it, the proxy finds the duplicate by it."""
    found: set[str] = set()
    props = getattr(device, "properties", None)
    if props is not None:
        norm = normalize_wwid(props.get("ID_WWN_WITH_EXTENSION"))
        if norm:
            found.add(norm)
    attrs = getattr(device, "attributes", None)
    if attrs is not None:
        try:
            norm = normalize_wwid(attrs.get("device/wwid"))
        except OSError:  # the disk went away while we read it
            norm = None
        if norm:
            found.add(norm)
    return found


def check_identifier(identifier: str) -> str:
    """The identifier, normalised, if it is a NAA designator (16 or 32 hex digits)."""
    norm = normalize_wwid(identifier)
    if norm is None or not _NAA_RE.fullmatch(norm):
        raise ValueError(f"invalid disk identifier (want naa. + 32 hex digits): "
                         f"{printable(repr(identifier))[:_SHOWN]}")
    return norm


def _shown(value: Any) -> str:
    text = printable(repr(value))
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_WARNING_CHARS else text[:MAX_WARNING_CHARS - 3] + "..."


@dataclass(frozen=True)
class HeldOutput:
    """What one holding hook printed after READY (its ``backup_label``...), stored with the backup.

    ``hook`` is the hook's path as configured; ``output`` is text whose only
    control characters are newline and tab.
    """

    hook: str
    output: str

    def to_wire(self) -> dict[str, str]:
        return {"hook": self.hook, "output": self.output}


def held_has_control(text: str) -> bool:
    """True if ``text`` holds a control character other than newline and tab."""
    return has_control(text.translate({ord(c): None for c in HELD_KEEPS}))


def held_json_size(held: list[HeldOutput] | tuple[HeldOutput, ...]) -> int:
    """Bytes of ``held`` as the channel and the manifest write it (JSON, non-ASCII escaped)."""
    return len(json.dumps([h.to_wire() for h in held]))


def check_held(raw: Any) -> tuple[HeldOutput, ...]:
    """``raw`` (a wire or manifest ``held`` list) checked; ValueError naming what is wrong.

    One check for the proxy (:meth:`PrepareAnswer.from_wire`) and the store's
    manifest, so both refuse the same things.
    """
    if isinstance(raw, tuple):  # a manifest's own, already made
        raw = list(raw)
    if not isinstance(raw, list):
        raise ValueError(f"want a list of {{hook, output}}, not {_shown(raw)}")
    if len(raw) > MAX_HELD:
        raise ValueError(f"at most {MAX_HELD} holding hooks' outputs, not {len(raw)}")
    out: list[HeldOutput] = []
    for i, given in enumerate(raw):
        item = given.to_wire() if isinstance(given, HeldOutput) else given
        if not isinstance(item, Mapping) or set(item) != {"hook", "output"}:
            raise ValueError(f"[{i}]: want {{hook, output}}, not {_shown(item)}")
        hook, output = item["hook"], item["output"]
        if not isinstance(hook, str) or not hook or len(hook) > MAX_HELD_HOOK_CHARS:
            raise ValueError(f"[{i}].hook: want a hook's path, not {_shown(hook)}")
        if has_control(hook):
            raise ValueError(f"[{i}].hook: holds a control character: {_shown(hook)}")
        if not isinstance(output, str):
            raise ValueError(f"[{i}].output: want a string, not {_shown(output)}")
        # the control check first: it also catches lone surrogates, which cannot be encoded
        if held_has_control(output):
            raise ValueError(f"[{i}].output: holds a control character other than newline "
                             "and tab")
        if len(output.encode("utf-8")) > MAX_HELD_OUTPUT:
            raise ValueError(f"[{i}].output: longer than {MAX_HELD_OUTPUT} bytes")
        out.append(HeldOutput(hook, output))
    if held_json_size(out) > MAX_HELD_JSON:
        raise ValueError(f"more than {MAX_HELD_JSON} bytes of JSON in all")
    return tuple(out)


class _Reader:
    """Reads one wire object; every complaint is a ProtocolError naming the key."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        self.data = data
        self.what = what

    def error(self, key: str, reason: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {key}: {reason}")

    def text(self, key: str, pattern: re.Pattern[str] | None = None, *,
             max_len: int = 255) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"want a non-empty string, not {_shown(value)}")
        if len(value) > max_len:
            raise self.error(key, f"longer than {max_len} characters")
        if has_control(value):
            raise self.error(key, f"holds a control character: {_shown(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(key, f"malformed: {_shown(value)}")
        return value

    def checked(self, key: str, check: Any, *, max_len: int = 255) -> str:
        """``check(text)`` (one of the name checks, raising ValueError) on a bounded string."""
        value = self.text(key, max_len=max_len)
        try:
            return str(check(value))
        except ValueError:
            raise self.error(key, f"malformed: {_shown(value)}") from None

    def number(self, key: str, low: float, high: float, *, default: float | None = None,
               integer: bool = False) -> float:
        value = self.data.get(key, default)
        # bool is an int in Python; true for a number is a forgery or a bug
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            want = "an integer" if integer else "a number"
            raise self.error(key, f"want {want}, not {_shown(value)}")
        if not (math.isfinite(value) and low <= value <= high):
            raise self.error(key, f"must be between {low:g} and {high:g}, not {_shown(value)}")
        return float(value) if not integer else value

    def choice(self, key: str, enum: type[E], *, optional: bool = False) -> E | None:
        value = self.data.get(key)
        if value is None and optional:
            return None
        try:
            return enum.parse(value)
        except UsageError:
            # from a peer it is a protocol error (exit 11), not the user's bad argument
            raise self.error(key, f"unknown {enum.label()} {_shown(value)} "
                                  f"(one of: {', '.join(enum.values())})") from None


#: the most volumes one consistency group may freeze together
MAX_MEMBERS = 8


def check_member_path(path: Any) -> str:
    """A group member's path: absolute, normalised, not / (ValueError otherwise); the agent's
    answer and the store's manifest take the same."""
    if (not isinstance(path, str) or not path.startswith("/") or path == "/"
            or len(path) > MAX_PATH_CHARS or has_control(path)
            or os.path.normpath(path) != path or ".." in path.split("/")):
        raise ValueError(f"want an absolute, normalised path, not {_shown(path)}")
    return path


def member_holding_another(names: list[str]) -> str | None:
    """The first of a group's archive names that is another's, or holds another in the
    archive (``srv/a`` holds ``srv/a/b``); None when they are disjoint."""
    for i, a in enumerate(names):
        if a in names[:i] or any(b != a and b.startswith(a + "/") for b in names):
            return a
    return None


@dataclass(frozen=True)
class Member:
    """One volume of a consistency group: where its duplicate is and what to read from it."""

    path: str
    path_in_fs: str
    fstype: str
    object_kind: ObjectKind
    duplicate_kind: DuplicateKind
    lun: int
    identifier: str
    unit_serial: str

    @property
    def archive_name(self) -> str:
        """The member's top directory in a group's archive: its path without the leading /."""
        return self.path.lstrip("/")

    def to_wire(self) -> dict[str, Any]:
        return {**self.__dict__, "object_kind": self.object_kind.value,
                "duplicate_kind": self.duplicate_kind.value}

    @classmethod
    def from_wire(cls, data: Any, what: str) -> Member:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what}: not an object")
        r = _Reader(data, what)
        try:
            path = check_member_path(data.get("path"))
        except ValueError as exc:
            raise r.error("path", str(exc)) from None
        return cls(path=path, path_in_fs=_path(data.get("path_in_fs"), r),
                   fstype=r.text("fstype", _WORD_RE, max_len=32),
                   object_kind=_required(r.choice("object_kind", ObjectKind)),
                   duplicate_kind=_required(r.choice("duplicate_kind", DuplicateKind)),
                   lun=int(r.number("lun", 0, MAX_LUN, integer=True)),
                   identifier=r.checked("identifier", check_identifier, max_len=80),
                   unit_serial=r.text("unit_serial", _WORD_RE))


@dataclass(frozen=True)
class PrepareAnswer:
    """The agent's answer to ``prepare``: what the proxy needs to back up the object."""

    session_id: str
    target_iqn: str
    portals: list[str]
    lun: int
    identifier: str
    unit_serial: str
    chap_user: str
    chap_secret: str = field(repr=False)
    fstype: str
    path_in_fs: str
    #: None only from an agent older than the field: the proxy accepts either kind then
    object_kind: ObjectKind | None
    duplicate_kind: DuplicateKind
    freeze_window_ms: float
    frozen_by: WhoFreezes
    lease_expires: float
    #: wall-clock time (epoch seconds) of the freeze: what the backup is named by; 0 unknown
    frozen_at: float = 0.0
    #: one printable, bounded line per post-thaw hook that failed; empty when all went well
    warnings: list[str] = field(default_factory=list)
    #: what each holding hook printed after READY, in the order the hooks ran
    held: list[HeldOutput] = field(default_factory=list)
    #: a consistency group's volumes, member 0 first (empty: one path was asked for)
    members: list[Member] = field(default_factory=list)
    #: image backups of a thin volume with a trusted base: what changed since it (None: the
    #: proxy reads the whole volume)
    delta: Delta | None = None

    @property
    def portal(self) -> str:
        """The portal the proxy logs in to (the first the agent names)."""
        return self.portals[0]

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent over the channel: the enums as their plain string values."""
        wire = {**self.__dict__, "portals": list(self.portals), "warnings": list(self.warnings),
                "duplicate_kind": self.duplicate_kind.value, "frozen_by": self.frozen_by.value}
        if self.object_kind is None:
            del wire["object_kind"]
        else:
            wire["object_kind"] = self.object_kind.value
        # only when there is some: an answer without holding hooks is the JSON it always was
        if self.held:
            wire["held"] = [h.to_wire() for h in self.held]
        else:
            del wire["held"]
        if self.members:
            wire["members"] = [m.to_wire() for m in self.members]
        else:
            del wire["members"]
        # only when there is one: a tar backup's answer is the JSON it always was
        if self.delta is not None:
            wire["delta"] = self.delta.to_wire()
        else:
            del wire["delta"]
        return wire

    #: the name the agent's callers have used
    to_dict = to_wire

    @classmethod
    def from_wire(cls, data: Any, *, what: str = "the agent's answer") -> PrepareAnswer:
        """Check a received answer field by field; ProtocolError (exit 11) for anything wrong.

        Warnings are not refused but escaped (:func:`~sanoffload.text.printable`)
        and bounded: they hold hook output, and the manifest, the JSON summary
        and the terminal all get the same text.
        """
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what} is not an object")
        r = _Reader(data, what)
        portals = data.get("portals")
        if portals is None and "portal" in data:
            portals = [data["portal"]]  # one portal, as some agents said it
        if not isinstance(portals, list) or not 1 <= len(portals) <= MAX_PORTALS:
            raise r.error("portals", f"want a list of 1 to {MAX_PORTALS} IP:PORT, "
                                     f"not {_shown(portals)}")
        checked_portals = [_Reader({"portals": p}, what).checked("portals", iscsiadm.check_portal)
                           for p in portals]
        return cls(
            session_id=r.checked("session_id", check_session_id),
            target_iqn=r.checked("target_iqn", _check_target, max_len=IQN_MAX_LEN),
            portals=checked_portals,
            lun=int(r.number("lun", 0, MAX_LUN, default=0, integer=True)),
            identifier=r.checked("identifier", check_identifier, max_len=80),
            unit_serial=r.text("unit_serial", _WORD_RE),
            chap_user=r.text("chap_user", _WORD_RE),
            chap_secret=r.text("chap_secret", _SECRET_RE),
            fstype=r.text("fstype", _WORD_RE, max_len=32),
            path_in_fs=_path(data.get("path_in_fs"), r),
            object_kind=r.choice("object_kind", ObjectKind, optional=True),
            duplicate_kind=_required(r.choice("duplicate_kind", DuplicateKind)),
            freeze_window_ms=float(r.number("freeze_window_ms", 0, MAX_FREEZE_WINDOW_MS)),
            frozen_by=_required(r.choice("frozen_by", WhoFreezes)),
            lease_expires=float(r.number("lease_expires", 0, MAX_EPOCH_S)),
            frozen_at=float(r.number("frozen_at", 0, MAX_EPOCH_S, default=0.0)),
            warnings=_warnings(data.get("warnings"), r),
            held=_held(data.get("held"), r),
            members=_members(data, r),
            delta=_delta(data.get("delta"), what))


def _required(value: E | None) -> E:
    assert value is not None  # choice() without optional never returns None
    return value


def _check_target(value: str) -> str:
    iscsiadm.check_target(value)
    if value.startswith("iqn.") and not valid_iqn(value):
        raise ValueError(value)
    return value


def _path(value: Any, r: _Reader) -> str:
    """The object's path inside the filesystem: a path may hold odd characters, but not
    NUL or line breaks (no job or command line can name such a path either)."""
    if not isinstance(value, str) or not value:
        raise r.error("path_in_fs", f"want a non-empty string, not {_shown(value)}")
    if len(value) > MAX_PATH_CHARS:
        raise r.error("path_in_fs", f"longer than {MAX_PATH_CHARS} characters")
    if any(c in value for c in "\0\n\r"):
        raise r.error("path_in_fs", f"holds NUL or a line break: {_shown(value)}")
    return value


def _members(data: Mapping[str, Any], r: _Reader) -> list[Member]:
    raw = data.get("members")
    if raw is None:
        return []
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_MEMBERS:
        raise r.error("members", f"want a list of 2 to {MAX_MEMBERS} members, "
                                 f"not {_shown(raw)}")
    members = [Member.from_wire(m, f"{r.what}: members[{i}]") for i, m in enumerate(raw)]
    for key in ("path", "lun", "identifier", "unit_serial"):
        values = [getattr(m, key) for m in members]
        if len(set(values)) != len(values):
            raise r.error("members", f"two members have the same {key}")
    # one member's directory would hold another's in the archive
    held = member_holding_another([m.archive_name for m in members])
    if held is not None:
        raise r.error("members", f"member {_shown(held)} contains another member")
    first = members[0]
    if (first.lun, first.identifier, first.path_in_fs) != (
            data.get("lun", 0), check_identifier(str(data.get("identifier"))),
            data.get("path_in_fs")):
        raise r.error("members", "members[0] is not the member the answer describes")
    return members


def _delta(raw: Any, what: str) -> Delta | None:
    if raw is None:
        return None  # no base, not a thin volume, an older agent: the proxy reads it all
    return Delta.from_wire(raw, what=f"{what}: delta")


def _held(raw: Any, r: _Reader) -> list[HeldOutput]:
    if raw is None:
        return []  # an agent older than holding hooks
    try:
        return list(check_held(raw))
    except ValueError as exc:
        raise r.error("held", str(exc)) from None


def _warnings(raw: Any, r: _Reader) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
        raise r.error("warnings", "want a list of strings")
    out = [_clip(printable(w)) for w in raw[:MAX_WARNINGS]]
    if len(raw) > MAX_WARNINGS:
        out.append(f"... and {len(raw) - MAX_WARNINGS} more warning(s) (see the agent's log)")
    return out


#: the most ranges a delta carries: the agent coalesces neighbours until it fits one line
MAX_DELTA_RANGES = 16384
#: a volume past 2**62 bytes (4 EiB) is no volume: a forged size, or an overflow
MAX_VOLUME_BYTES = 1 << 62
#: the chunk sizes a delta may be aligned to: powers of two from 64 KiB (a thin pool's
#: smallest data block) to 1 GiB (its largest)
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 1 << 30

#: ``HOST/SLUG/STAMP``, as the store names a backup (store/repo.py: BackupId); the parts'
#: rules are the store's, restated here because this module imports only leaf modules
_BACKUP_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_BACKUP_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_BACKUP_STAMP_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
MAX_BACKUP_ID_CHARS = 63 + 1 + 100 + 1 + 16


def check_backup_id(value: Any) -> str:
    """``value`` if it has a backup id's shape (``fs1/srv-data-3f2a9c1e/20261126T102933Z``);
    ValueError otherwise. The agent keeps a base under this name and answers it back."""
    parts = value.split("/") if isinstance(value, str) and len(value) <= MAX_BACKUP_ID_CHARS \
        else []
    if len(parts) != 3:
        raise ValueError(f"want a backup id HOST/SLUG/STAMP, not {_shown(value)}")
    host, slug, stamp = parts
    for part, pattern in ((host, _BACKUP_HOST_RE), (slug, _BACKUP_SLUG_RE)):
        # the store refuses these as names too: a '..' or a trailing '.' is never a backup's
        if not pattern.fullmatch(part) or ".." in part or part.endswith("."):
            raise ValueError(f"want a backup id HOST/SLUG/STAMP, not {_shown(value)}")
    try:
        # strptime: 20260231T000000Z has the shape and names no instant
        real = bool(_BACKUP_STAMP_RE.fullmatch(stamp)) and bool(
            datetime.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        real = False
    if not real:
        raise ValueError(f"want a backup id HOST/SLUG/STAMP (STAMP like 20261126T102933Z), "
                         f"not {_shown(value)}")
    return f"{host}/{slug}/{stamp}"


def _check_ranges(name: str, ranges: Any, volume_bytes: int,
                  chunk_bytes: int) -> tuple[tuple[int, int], ...]:
    """``ranges`` as a tuple of ``(offset, length)``: chunk-aligned, sorted, disjoint, inside
    the volume; ValueError naming the first that is not."""
    if not isinstance(ranges, (list, tuple)):
        raise ValueError(f"{name}: want a list of [offset, length], not {_shown(ranges)}")
    if len(ranges) > MAX_DELTA_RANGES:
        raise ValueError(f"{name}: more than {MAX_DELTA_RANGES} ranges")
    out: list[tuple[int, int]] = []
    end_before = 0
    for i, item in enumerate(ranges):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in item):
            raise ValueError(f"{name}[{i}]: want [offset, length] in bytes, not {_shown(item)}")
        offset, length = item
        end = offset + length
        if offset < 0 or length <= 0 or end > volume_bytes:
            raise ValueError(f"{name}[{i}]: {offset}+{length} is not a range inside the "
                             f"volume's {volume_bytes} bytes")
        if offset % chunk_bytes or (end % chunk_bytes and end != volume_bytes):
            raise ValueError(f"{name}[{i}]: {offset}+{length} is not aligned to "
                             f"{chunk_bytes}-byte chunks")
        if offset < end_before:
            raise ValueError(f"{name}[{i}]: at {offset}, overlaps or precedes the range "
                             f"before (which ends at {end_before})")
        end_before = end
        out.append((offset, length))
    return tuple(out)


@dataclass(frozen=True)
class Delta:
    """What changed on the volume since the base backup (issue 13, block level, thin volumes).

    ``changed`` and ``discarded`` are ``(offset, length)`` byte ranges of the volume,
    each starting on a multiple of ``chunk_bytes`` and ending on one (or at
    ``volume_bytes``), sorted, disjoint from each other and within the volume.
    ``changed``: pieces to read (thin_delta's ``different`` and ``right_only``, and any
    chunk only partly discarded). ``discarded``: whole chunks unmapped in the new
    snapshot and not changed (thin_delta's ``left_only``): all zeros, nothing to read.
    Everything else equals ``base`` (the backup id the base snapshot was committed as).
    """

    base: str
    volume_bytes: int
    chunk_bytes: int
    changed: tuple[tuple[int, int], ...]
    discarded: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        # every Delta is a valid one: the agent's own is checked by the rules the proxy applies
        check_backup_id(self.base)
        for name in ("volume_bytes", "chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: want an integer, not {_shown(value)}")
        if not 0 < self.volume_bytes <= MAX_VOLUME_BYTES:
            raise ValueError(f"volume_bytes: must be between 1 and {MAX_VOLUME_BYTES}, "
                             f"not {self.volume_bytes}")
        if (not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES
                or self.chunk_bytes & (self.chunk_bytes - 1)):
            raise ValueError(f"chunk_bytes: must be a power of two from {MIN_CHUNK_BYTES} to "
                             f"{MAX_CHUNK_BYTES}, not {self.chunk_bytes}")
        changed = _check_ranges("changed", self.changed, self.volume_bytes, self.chunk_bytes)
        discarded = _check_ranges("discarded", self.discarded, self.volume_bytes,
                                  self.chunk_bytes)
        if len(changed) + len(discarded) > MAX_DELTA_RANGES:
            raise ValueError(f"more than {MAX_DELTA_RANGES} ranges in all "
                             f"({len(changed)} changed, {len(discarded)} discarded)")
        # a chunk both to read and known to be zeros: one of the two is a lie
        merged = sorted(changed + discarded)
        for (a_off, a_len), (b_off, _b_len) in itertools.pairwise(merged):
            if b_off < a_off + a_len:
                raise ValueError(f"changed and discarded overlap at byte {b_off}")
        object.__setattr__(self, "changed", changed)
        object.__setattr__(self, "discarded", discarded)

    @property
    def ranges(self) -> int:
        """How many ranges the delta carries (at most :data:`MAX_DELTA_RANGES`)."""
        return len(self.changed) + len(self.discarded)

    @property
    def changed_bytes(self) -> int:
        """What the proxy reads: the changed ranges' total length."""
        return sum(length for _offset, length in self.changed)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object in the agent's answer: ranges as ``[offset, length]`` lists."""
        return {"base": self.base, "volume_bytes": self.volume_bytes,
                "chunk_bytes": self.chunk_bytes,
                "changed": [list(r) for r in self.changed],
                "discarded": [list(r) for r in self.discarded]}

    @classmethod
    def from_wire(cls, data: Any, *, what: str = "the agent's delta") -> Delta:
        """Check a received delta; ProtocolError (exit 11) naming what is wrong.

        A compromised agent steers what the proxy reads and what it takes from the base:
        every range must be aligned, sorted, disjoint and inside the volume.
        """
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what} is not an object")
        unknown = sorted(set(data) - {"base", "volume_bytes", "chunk_bytes", "changed",
                                      "discarded"})
        if unknown:
            raise ProtocolError(f"{what}: unknown keys {_shown(unknown)}")
        r = _Reader(data, what)
        base = r.checked("base", check_backup_id, max_len=MAX_BACKUP_ID_CHARS)
        volume_bytes = int(r.number("volume_bytes", 1, MAX_VOLUME_BYTES, integer=True))
        chunk_bytes = int(r.number("chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES,
                                   integer=True))
        try:
            # the ranges' checks are Delta's own (__post_init__), whatever arrived
            return cls(base=base, volume_bytes=volume_bytes, chunk_bytes=chunk_bytes,
                       changed=data.get("changed"),  # type: ignore[arg-type]
                       discarded=data.get("discarded"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ProtocolError(f"{what}: {exc}") from None

