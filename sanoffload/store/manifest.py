"""The manifest: one JSON document beside each stored archive, saying what it holds.

``<repo>/<host>/<slug>/<timestamp>.json``::

    {"format": 1, "host": "fs1", "path": "/srv/data", "slug": "srv-data-3f2a9c1e",
     "timestamp": "20261126T102933Z", "archive_bytes": 1048576, "sha256": "…",
     "compression": "zstd", "archive_format": "gnu-tar-posix",
     "duplicate_kind": "snapshot", "frozen_at": "2026-11-26T10:29:33.120Z",
     "freeze_window_ms": 41.7, "frozen_by": "fsfreeze", "session_id": "fs1-1a2b3c4d",
     "source_bytes": 5242880, "file_count": 120, "member_count": 131,
     "stored_at": "2026-11-26T10:31:02Z", "sanoffload_version": "0.1.0",
     "client": "px1", "warnings": ["post-thaw hook db failed: exit 3"],
     "verification": {"status": "ok", "checked_at": "2026-11-26T10:31:02Z", "detail": ""}}

``archive_bytes``, ``sha256``, ``member_count`` (archive members as ``tar
--list`` counts them), ``stored_at``, ``client`` (who put it: the forced
command's ``--client``, what the quota charges) and ``verification`` are the
store's own findings; the sender's fields (:data:`SENDER_FIELDS`) are checked
for type and range because they come from the network, and bounded
(:data:`MAX_SOURCE_BYTES`, :data:`MAX_FILE_COUNT`, :data:`MAX_FREEZE_WINDOW_MS`,
the warnings' limits) so no value a sender gives can stretch a time limit or a
reply without bound. ``warnings`` are the sender's "succeeded, but look" notes
(a post-thaw hook failed): at most :data:`MAX_WARNINGS`, each at most
:data:`MAX_WARNING_CHARS` characters, :data:`MAX_WARNINGS_JSON` bytes in all;
a sender's strings may hold no control characters (a stored manifest's are
shown escaped). ``held`` holds what each holding hook printed after READY
(PostgreSQL's ``backup_label``: what a restore of the database needs), as
``[{"hook": PATH, "output": TEXT}]``, present only when there is some; it is
checked as the proxy checks it (:func:`~sanoffload.channel.messages.check_held`:
at most 8, each at most 64 KiB, no control character but newline and tab), and
the warnings and ``held`` together are at most :data:`MAX_NOTES_JSON` bytes of
JSON, so a manifest stays under :data:`MAX_BYTES`. ``members`` is stored only
for a consistency group (one backup of several paths frozen in one window,
each under its path without the leading / in the archive): ``[{"path",
"identifier", "duplicate_kind", "fstype", "object_kind"}]``, the manifest's
``path`` first, at most :data:`MAX_MEMBERS` (2 or more), exactly those keys,
each value checked (:class:`GroupMember`).

An image backup (issue 13) says ``"kind": "image"`` (absent: ``"tar"``, every
older manifest) and has no ``sha256``, ``archive_bytes``, ``member_count``,
``compression`` or ``archive_format``; it has ``image`` instead
(:class:`ImageInfo`): ``{"size", "chunk_size", "map_sha256", "map_bytes",
"chunks" (distinct ids its map references), "new_chunks", "new_bytes" (stored
bytes the backup added: what the quota charges), "read_bytes" (what the proxy
read from the device), "base" (the backup id whose map it extended, or null),
"fstype"}``, every value checked as hostile input (the geometry as the map's,
``map_bytes`` exactly what the geometry needs, the counts within what the map can
hold). Its chunk map is ``<timestamp>.map`` beside it. Keys this version does not
know are kept in ``extra`` so a manifest round-trips unchanged; their nesting
is bounded (:data:`MAX_DEPTH`) so writing them back out cannot exhaust the
stack.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from .. import __version__
from ..channel.messages import (
    MAX_MEMBERS,
    HeldOutput,
    check_held,
    check_identifier,
    check_member_path,
    held_json_size,
    member_holding_another,
)
from ..errors import IntegrityError, UsageError
from ..kinds import Choice, DuplicateKind, ObjectKind, WhoFreezes
from ..text import has_control
from ..tools.tar import MAX_SNAPSHOT_BYTES
from .imagemap import DIGEST_BYTES, HEADER as MAP_HEADER, check_geometry

FORMAT = 1
COMPRESSION = "zstd"
ARCHIVE_FORMAT = "gnu-tar-posix"
#: the largest manifest the store reads (a few hundred bytes, plus the warnings)
MAX_BYTES = 512 * 1024
#: how deep unknown keys' values may nest
MAX_DEPTH = 32
#: the sender's notes: how many, how long each, how big in all (as JSON, non-ASCII escaped)
MAX_WARNINGS = 100
MAX_WARNING_CHARS = 4096
MAX_WARNINGS_JSON = 400 * 1024
#: the warnings and the holding hooks' outputs together, as JSON: a manifest stays under
#: MAX_BYTES, and a list reply under its page
MAX_NOTES_JSON = 400 * 1024
#: bounds on the sender's counts: 1 PiB of source, 2**40 files, a day-long freeze
MAX_SOURCE_BYTES = 1 << 50
MAX_FILE_COUNT = 1 << 40
MAX_FREEZE_WINDOW_MS = 86_400_000.0

VERIFIED_OK, VERIFY_FAILED, NOT_VERIFIED = "ok", "failed", "not-verified"
_STATUSES = (VERIFIED_OK, VERIFY_FAILED, NOT_VERIFIED)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

#: what a sender (the proxy) may say about a backup, and the check each value gets
SENDER_FIELDS: tuple[str, ...] = ("duplicate_kind", "frozen_at", "freeze_window_ms", "frozen_by",
                                  "session_id", "source_bytes", "file_count", "sha256",
                                  "archive_bytes", "warnings", "held", "members",
                                  "tar_level", "parent", "chain", "snapshot_sha256",
                                  "snapshot_bytes")
#: an incremental tar backup's fields (issue 13): all absent for a full backup
INCREMENTAL_KEYS = ("tar_level", "parent", "chain", "snapshot_sha256", "snapshot_bytes")
#: the longest chain a manifest may claim (a job's full_every is far below)
MAX_TAR_LEVEL = 1000
#: a group member's keys, all required, no others
MEMBER_KEYS = frozenset({"path", "identifier", "duplicate_kind", "fstype", "object_kind"})
_FSTYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
KIND_TAR, KIND_IMAGE = "tar", "image"
#: a backup id as a manifest names another (repo.BackupId checks it again where it is used)
_BACKUP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}/"
                           r"[0-9]{8}T[0-9]{6}Z")
#: an image manifest's keys: the sender states these (read_bytes, base, fstype) ...
IMAGE_SENDER_KEYS = ("read_bytes", "base", "fstype")
#: ... the store computes the rest from the map and the chunks it stored
IMAGE_KEYS = ("size", "chunk_size", "map_sha256", "map_bytes", "chunks", "new_chunks",
              "new_bytes", *IMAGE_SENDER_KEYS)
#: fields of a tar manifest an image manifest does not have
_TAR_ONLY = ("sha256", "archive_bytes", "member_count", "compression", "archive_format")


def utc_iso(when: datetime, *, millis: bool = False) -> str:
    """``2026-11-26T10:29:33Z`` (``.120Z`` with ``millis``), always UTC."""
    text = when.astimezone(UTC).isoformat(timespec="milliseconds" if millis
                                                    else "seconds")
    return text.replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time with a zone (``Z`` or ``+hh:mm``), as an aware UTC datetime."""
    if not isinstance(text, str) or len(text) > 40:
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if when.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    try:
        return when.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-01:00 is past the last instant Python knows
        raise ValueError(f"time out of range: {text!r}") from None


def to_utc(value: datetime | str | float | int) -> datetime:
    """A freeze time given as an aware datetime, an ISO string or epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("a time, not a boolean")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: give it a zone")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"time out of range: {value!r}") from None
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < 2**33:
            raise ValueError(f"epoch seconds out of range: {value!r}")
        return datetime.fromtimestamp(value, UTC)
    return parse_iso(value)


@dataclass(frozen=True)
class Verification:
    """The last test of the archive: sha256, ``zstd -t`` and ``tar --list`` to the end."""

    status: str
    checked_at: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"unknown verification status {self.status!r}")
        parse_iso(self.checked_at)
        if not isinstance(self.detail, str):
            raise ValueError("verification detail must be a string")

    @property
    def ok(self) -> bool:
        return self.status == VERIFIED_OK

    @classmethod
    def now(cls, status: str, detail: str = "") -> Verification:
        return cls(status, utc_iso(datetime.now(UTC)), detail[:500])


@dataclass(frozen=True)
class GroupMember:
    """One path of a consistency group's backup: where it came from (no LUN, no secret)."""

    path: str
    identifier: str
    duplicate_kind: str
    fstype: str
    object_kind: str

    @property
    def archive_name(self) -> str:
        """Its top directory in the archive: the path without the leading /."""
        return self.path.lstrip("/")

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "identifier": self.identifier,
                "duplicate_kind": self.duplicate_kind, "fstype": self.fstype,
                "object_kind": self.object_kind}

    @classmethod
    def check(cls, raw: Any, where: str) -> GroupMember:
        """``raw`` (a manifest's or a sender's member) checked; ValueError naming ``where``."""
        if isinstance(raw, GroupMember):
            raw = raw.to_dict()
        if not isinstance(raw, Mapping) or set(raw) != MEMBER_KEYS:
            keys = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise ValueError(f"{where}: want exactly {{{', '.join(sorted(MEMBER_KEYS))}}}, "
                             f"not {str(keys)[:200]}")
        try:
            path = check_member_path(raw["path"])
        except ValueError as exc:
            raise ValueError(f"{where}.path: {exc}") from None
        ident = raw["identifier"]
        try:
            if not isinstance(ident, str) or len(ident) > 80:
                raise ValueError
            ident = check_identifier(ident)
        except ValueError:
            raise ValueError(f"{where}.identifier: want naa. + hex digits: "
                             f"{str(ident)[:100]!r}") from None
        fstype = raw["fstype"]
        if not isinstance(fstype, str) or not _FSTYPE_RE.fullmatch(fstype):
            raise ValueError(f"{where}.fstype: want a filesystem type: {str(fstype)[:100]!r}")
        return cls(path=path, identifier=ident,
                   duplicate_kind=_member(DuplicateKind, f"{where}.duplicate_kind",
                                          raw["duplicate_kind"]).value,
                   fstype=fstype,
                   object_kind=_member(ObjectKind, f"{where}.object_kind",
                                       raw["object_kind"]).value)


def check_members(raw: Any) -> tuple[GroupMember, ...]:
    """A group's ``members`` checked (2 to MAX_MEMBERS, distinct, none inside another)."""
    if isinstance(raw, tuple):  # a manifest's own, already made
        raw = list(raw)
    if not isinstance(raw, list):
        raise ValueError(f"manifest: members: want a list, not {type(raw).__name__}")
    if not raw:
        return ()
    if not 2 <= len(raw) <= MAX_MEMBERS:
        raise ValueError(f"manifest: members: want 2 to {MAX_MEMBERS}, not {len(raw)}")
    out = tuple(GroupMember.check(m, f"manifest: members[{i}]") for i, m in enumerate(raw))
    names = [m.archive_name for m in out]
    if len(set(names)) != len(names):
        raise ValueError("manifest: members: a path is named twice")
    held = member_holding_another(names)
    if held is not None:
        raise ValueError(f"manifest: members: {held!r} contains another member")
    return out


@dataclass(frozen=True)
class ImageInfo:
    """What an image backup holds (the ``image`` of its manifest; see the module docstring)."""

    size: int
    chunk_size: int
    map_sha256: str
    map_bytes: int
    chunks: int
    new_chunks: int = 0
    new_bytes: int = 0
    read_bytes: int | None = None
    base: str | None = None
    fstype: str | None = None

    def __post_init__(self) -> None:
        try:
            check_geometry(self.size, self.chunk_size)
        except IntegrityError as exc:
            raise ValueError(f"manifest: image: {exc.message}") from None
        count = -(-self.size // self.chunk_size)
        if not isinstance(self.map_sha256, str) or not _SHA256_RE.fullmatch(self.map_sha256):
            raise ValueError("manifest: image.map_sha256 must be 64 lowercase hex digits")
        for name in ("map_bytes", "chunks", "new_chunks", "new_bytes"):
            _check_count(f"image.{name}", getattr(self, name), optional=False)
        _check_count("image.read_bytes", self.read_bytes)
        if self.map_bytes != MAP_HEADER.size + count * DIGEST_BYTES:
            raise ValueError(f"manifest: image.map_bytes {self.map_bytes}: a map of "
                             f"{self.size} bytes in {self.chunk_size}-byte chunks is "
                             f"{MAP_HEADER.size + count * DIGEST_BYTES}")
        if self.chunks > count or self.new_chunks > self.chunks:
            raise ValueError(f"manifest: image: {self.chunks} chunks ({self.new_chunks} new) "
                             f"in a map of {count} entries")
        # a stored chunk is at most its plain size plus a header: anything more is a lie
        if self.new_bytes > self.new_chunks * (self.chunk_size + 64):
            raise ValueError(f"manifest: image.new_bytes {self.new_bytes} for "
                             f"{self.new_chunks} new chunks")
        if self.base is not None and (not isinstance(self.base, str)
                                      or not _BACKUP_ID_RE.fullmatch(self.base)
                                      or ".." in self.base):
            raise ValueError(f"manifest: image.base must be a backup id or null: "
                             f"{str(self.base)[:120]!r}")
        if self.fstype is not None and (not isinstance(self.fstype, str)
                                        or not _FSTYPE_RE.fullmatch(self.fstype)):
            raise ValueError(f"manifest: image.fstype: want a filesystem type: "
                             f"{str(self.fstype)[:100]!r}")

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IMAGE_KEYS}

    @classmethod
    def from_dict(cls, raw: Any) -> ImageInfo:
        """An ``image`` read from a manifest: exactly :data:`IMAGE_KEYS`; ValueError if not."""
        if isinstance(raw, ImageInfo):
            return raw
        if not isinstance(raw, Mapping) or set(raw) != set(IMAGE_KEYS):
            keys = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
            raise ValueError(f"manifest: image: want exactly {{{', '.join(IMAGE_KEYS)}}}, "
                             f"not {str(keys)[:200]}")
        return cls(**{k: raw[k] for k in IMAGE_KEYS})


@dataclass(frozen=True)
class Manifest:
    """What one stored backup holds (see the module docstring for the JSON)."""

    host: str
    path: str
    slug: str
    timestamp: str
    #: a tar backup's archive size and sha256 (an image backup has neither: 0 and "")
    archive_bytes: int = 0
    sha256: str = ""
    duplicate_kind: str | None = None
    frozen_at: str | None = None
    freeze_window_ms: float | None = None
    frozen_by: str | None = None
    session_id: str | None = None
    source_bytes: int | None = None
    file_count: int | None = None
    member_count: int | None = None
    stored_at: str = ""
    sanoffload_version: str = __version__
    verification: Verification | None = None
    #: the proxy's comparison of the stored archive with the duplicate it came from
    compared: Verification | None = None
    compression: str = COMPRESSION
    archive_format: str = ARCHIVE_FORMAT
    format: int = FORMAT
    #: the client that put it (None: stored before the store recorded it, or locally)
    client: str | None = None
    #: the sender's "succeeded, but look" notes (a post-thaw hook failed)
    warnings: tuple[str, ...] = ()
    #: what each holding hook printed after READY (backup_label...), in the order they ran
    held: tuple[HeldOutput, ...] = ()
    #: a consistency group's paths, this manifest's ``path`` first (empty: one path)
    members: tuple[GroupMember, ...] = ()
    #: "tar" (an archive) or "image" (a chunk map beside the manifest)
    kind: str = KIND_TAR
    #: an image backup's geometry, map and counts (None for tar)
    image: ImageInfo | None = None
    #: an incremental tar backup: its place in the chain (0: a full level), the backup it
    #: extends and the chain's level 0 (both None for level 0), and its state file
    tar_level: int | None = None
    parent: str | None = None
    chain: str | None = None
    snapshot_sha256: str | None = None
    snapshot_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("host", "path", "slug", "timestamp", "sanoffload_version", "compression",
                     "archive_format"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"manifest: {name} must be a non-empty string")
        if not self.path.startswith("/") or "\0" in self.path or len(self.path) > 4096:
            raise ValueError(f"manifest: path must be absolute: {self.path!r}")
        if self.kind == KIND_IMAGE:
            object.__setattr__(self, "image", ImageInfo.from_dict(self.image))
            if self.sha256 or self.archive_bytes or self.member_count is not None or \
                    self.members:
                raise ValueError("manifest: an image backup has no sha256, archive_bytes, "
                                 "member_count or members")
        elif self.kind != KIND_TAR:
            raise ValueError(f"manifest: kind must be {KIND_TAR!r} or {KIND_IMAGE!r}: "
                             f"{str(self.kind)[:40]!r}")
        elif self.image is not None:
            raise ValueError("manifest: a tar backup has no image")
        elif not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError(f"manifest: sha256 must be 64 lowercase hex digits: {self.sha256!r}")
        _check_count("archive_bytes", self.archive_bytes, optional=False)
        for name in ("source_bytes", "file_count", "member_count"):
            _check_count(name, getattr(self, name))
        _check_count("format", self.format, optional=False)
        if self.format > FORMAT:
            raise ValueError(f"manifest format {self.format} is newer than this sanoffload "
                             f"reads ({FORMAT})")
        for name in ("session_id", "client"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _WORD_RE.fullmatch(value)):
                raise ValueError(f"manifest: {name} must be a short word: {value!r}")
        for name, enum in (("duplicate_kind", DuplicateKind), ("frozen_by", WhoFreezes)):
            # kept as the plain string (the JSON is unchanged), checked by the one parse
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _member(enum, name, value).value)
        if self.frozen_at is not None:
            parse_iso(self.frozen_at)
        if self.stored_at:
            parse_iso(self.stored_at)
        if self.freeze_window_ms is not None:
            ms = self.freeze_window_ms
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (
                    math.isfinite(ms) and ms >= 0):
                raise ValueError(f"manifest: freeze_window_ms must be >= 0: {ms!r}")
        for name in ("verification", "compared"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Verification):
                raise ValueError(f"manifest: {name} must be a Verification")
        # a list from JSON becomes the tuple a frozen manifest holds
        object.__setattr__(self, "warnings", _check_warnings(self.warnings))
        # a list of {hook, output} from JSON becomes the tuple of HeldOutput a manifest holds
        try:
            object.__setattr__(self, "held", check_held(self.held))
        except ValueError as exc:
            raise ValueError(f"manifest: held: {exc}") from None
        if self.held and (len(json.dumps(list(self.warnings))) + held_json_size(self.held)
                          > MAX_NOTES_JSON):
            raise ValueError(f"manifest: warnings and held: more than {MAX_NOTES_JSON} bytes "
                             "of JSON together")
        object.__setattr__(self, "members", check_members(self.members))
        check_incremental(self.tar_level, self.parent, self.chain, self.snapshot_sha256,
                          self.snapshot_bytes, own=self.backup_id)
        if self.tar_level is not None and self.kind != KIND_TAR:
            raise ValueError("manifest: an image backup has no tar_level")
        if self.members and self.members[0].path != self.path:
            raise ValueError(f"manifest: members[0] is {self.members[0].path!r}, not the "
                             f"backup's path {self.path!r}")
        if not isinstance(self.extra, dict):
            raise ValueError("manifest: extra must be a mapping")
        if _depth(self.extra) > MAX_DEPTH:
            raise ValueError(f"manifest: unknown keys nest deeper than {MAX_DEPTH} levels")

    @property
    def backup_id(self) -> str:
        return f"{self.host}/{self.slug}/{self.timestamp}"

    @property
    def is_image(self) -> bool:
        return self.kind == KIND_IMAGE

    @property
    def is_incremental(self) -> bool:
        """A tar backup of a ``--listed-incremental`` chain (it carries a state file)."""
        return self.tar_level is not None

    @property
    def chain_id(self) -> str | None:
        """The id of this backup's level 0 (its own for a level 0; None: not incremental)."""
        if self.tar_level is None:
            return None
        return self.chain or self.backup_id

    @property
    def stored_bytes(self) -> int:
        """The bytes this backup added to the repository (what a quota charges)."""
        return self.image.new_bytes if self.image is not None else self.archive_bytes

    def with_verification(self, verification: Verification) -> Manifest:
        return replace(self, verification=verification)

    def with_compared(self, compared: Verification) -> Manifest:
        return replace(self, compared=compared)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["warnings"] = list(self.warnings)
        # only when there is some: a manifest without holding hooks reads back as it was
        if self.held:
            data["held"] = [h.to_wire() for h in self.held]
        else:
            del data["held"]
        # only for a group: a single path's manifest reads back as it was
        if self.members:
            data["members"] = [m.to_dict() for m in self.members]
        else:
            del data["members"]
        for name in INCREMENTAL_KEYS:
            if data[name] is None:
                del data[name]  # a full backup's manifest reads back as it always was
        if self.image is not None:
            data["image"] = self.image.to_dict()
            for name in _TAR_ONLY:
                del data[name]
        else:
            # a tar manifest reads back as it always was: no kind, no image
            del data["kind"], data["image"]
        return {**extra, **data}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise ValueError("manifest: not a JSON object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("kind") == KIND_IMAGE and set(kwargs) & set(_TAR_ONLY):
            raise ValueError(f"manifest: an image backup has none of {', '.join(_TAR_ONLY)}")
        if kwargs.get("kind", KIND_TAR) == KIND_TAR:
            for name in ("archive_bytes", "sha256"):
                if name not in kwargs:
                    raise ValueError(f"manifest: missing {name!r}")
        extra = {k: v for k, v in data.items() if k not in known}
        for name in ("verification", "compared"):
            ver = kwargs.get(name)
            if ver is None:
                continue
            if not isinstance(ver, Mapping) or set(ver) - {"status", "checked_at", "detail"}:
                raise ValueError(f"manifest: {name} must be {{status, checked_at, detail}}")
            try:
                kwargs[name] = Verification(**ver)
            except TypeError as exc:
                raise ValueError(f"manifest: {name}: {exc}") from None
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # a required key is missing
            raise ValueError(f"manifest: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        """Parse and check a manifest; ValueError (never another exception) if it is bad."""
        if len(raw) > MAX_BYTES:
            raise ValueError(f"manifest larger than {MAX_BYTES} bytes")
        try:
            data = json.loads(raw)
        except RecursionError:  # 30,000 nested brackets
            raise ValueError("manifest: JSON nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"manifest: not JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, OverflowError, RecursionError) as exc:
            raise ValueError(f"manifest: {type(exc).__name__}: {exc}") from None


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (iteratively: no recursion to exhaust)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def _check_warnings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ValueError("warnings: must be a list of strings")
    if len(value) > MAX_WARNINGS:
        raise ValueError(f"warnings: at most {MAX_WARNINGS}, not {len(value)}")
    if any(len(w) > MAX_WARNING_CHARS for w in value):
        raise ValueError(f"warnings: each at most {MAX_WARNING_CHARS} characters")
    # ASCII-escaped JSON is what the channel sends: the bound keeps a list reply in its line
    if len(json.dumps(list(value))) > MAX_WARNINGS_JSON:
        raise ValueError(f"warnings: more than {MAX_WARNINGS_JSON} bytes of JSON in all")
    return tuple(value)


def _member(enum: type[Choice], name: str, value: Any) -> Choice:
    """``enum.parse(value)``, its UsageError turned into the ValueError a bad manifest gives."""
    try:
        return enum.parse(value)
    except UsageError as exc:
        raise ValueError(f"manifest: {name}: {exc.message}") from None


def _check_count(name: str, value: Any, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**63:
        raise ValueError(f"manifest: {name} must be a non-negative integer: {value!r}")


def sender_fields(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check what a sender says about its backup; return the fields normalised.

    ``frozen_at`` may be an aware datetime, an ISO string or epoch seconds and
    comes back as ISO UTC with milliseconds. ``sha256`` and ``archive_bytes``
    are the sender's own count of the stream: the store compares them with what
    it received. Raises ValueError for an unknown key or a bad value.
    """
    out: dict[str, Any] = {}
    for key, given in (values or {}).items():
        value = given  # normalised below
        if key not in SENDER_FIELDS:
            raise ValueError(f"unknown manifest field {key!r} "
                             f"(known: {', '.join(SENDER_FIELDS)})")
        if value is None:
            continue
        if key == "frozen_at":
            value = utc_iso(to_utc(value), millis=True)
        elif key == "sha256":
            if not isinstance(value, str) or not _SHA256_RE.fullmatch(value.lower()):
                raise ValueError(f"sha256 must be 64 hex digits: {value!r}")
            value = value.lower()
        elif key == "warnings":
            value = list(_check_warnings(value))
            if any(has_control(w) for w in value):
                raise ValueError("warnings: a warning holds a control character or escape "
                                 "sequence (send it through sanoffload.text.printable)")
        elif key == "held":
            # check_held refuses control characters (newline and tab aside) and bounds it
            try:
                value = [h.to_wire() for h in check_held(value)]
            except ValueError as exc:
                raise ValueError(f"held: {exc}") from None
        elif key == "members":
            value = [m.to_dict() for m in check_members(value)]
        elif key in _SENDER_MAXIMA and _is_number(value) and value > _SENDER_MAXIMA[key]:
            raise ValueError(f"{key} must be at most {_SENDER_MAXIMA[key]}: {value!r}")
        out[key] = value
    # the chain's ids are checked against the backup's own once the store names it
    check_incremental(*(out.get(k) for k in INCREMENTAL_KEYS), own=None, sent=True)
    # the same checks a stored manifest gets, on a stand-in for the rest
    probe = {k: v for k, v in out.items()
             if k not in ("sha256", "archive_bytes", *INCREMENTAL_KEYS)}
    # a group's first member is the backup's path: the stand-in takes it
    path = out["members"][0]["path"] if out.get("members") else "/"
    Manifest(host="h", path=path, slug="s", timestamp="t",
             archive_bytes=out.get("archive_bytes", 0), sha256="0" * 64, **probe)
    return out


#: the largest value a sender may give for each count (a type error is the Manifest's to report)
_SENDER_MAXIMA: dict[str, float] = {"source_bytes": MAX_SOURCE_BYTES,
                                    "file_count": MAX_FILE_COUNT,
                                    "freeze_window_ms": MAX_FREEZE_WINDOW_MS}


def _split_id(value: Any, name: str) -> tuple[str, str]:
    """``(HOST/SLUG, TIMESTAMP)`` of a backup id a manifest names; ValueError if it is none."""
    if not isinstance(value, str) or not _BACKUP_ID_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"manifest: {name} must be a backup id: {str(value)[:120]!r}")
    where, _, stamp = value.rpartition("/")
    return where, stamp


def check_incremental(level: Any, parent: Any, chain: Any, snapshot_sha256: Any,
                      snapshot_bytes: Any, *, own: str | None, sent: bool = False) -> None:
    """Check an incremental backup's fields (all None: a full backup); ValueError if bad.

    ``own``: the backup's id (None: not known yet, the relations are checked later):
    ``parent`` and ``chain`` must then be earlier backups of the same host and path,
    the chain's level 0 no later than the parent, and level 1's parent its level 0.
    ``sent``: a sender's fields, whose state file (``snapshot_*``) may follow later.
    """
    if level is None:
        if any(v is not None for v in (parent, chain, snapshot_sha256, snapshot_bytes)):
            raise ValueError("manifest: parent, chain and snapshot_* need a tar_level")
        return
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_TAR_LEVEL:
        raise ValueError(f"manifest: tar_level must be 0 to {MAX_TAR_LEVEL}: {str(level)[:40]!r}")
    if not (sent and snapshot_sha256 is None and snapshot_bytes is None):
        # a sender's may come later: the store fills them in from the state file it receives
        if not isinstance(snapshot_sha256, str) or not _SHA256_RE.fullmatch(snapshot_sha256):
            raise ValueError("manifest: snapshot_sha256 must be 64 lowercase hex digits")
        if (isinstance(snapshot_bytes, bool) or not isinstance(snapshot_bytes, int)
                or not 0 < snapshot_bytes <= MAX_SNAPSHOT_BYTES):
            raise ValueError(f"manifest: snapshot_bytes must be 1 to {MAX_SNAPSHOT_BYTES}: "
                             f"{str(snapshot_bytes)[:40]!r}")
    if level == 0:
        if parent is not None:
            raise ValueError("manifest: a level 0 has no parent")
        if chain is not None and (own is None or chain != own):
            _split_id(chain, "chain")
            if own is not None:
                raise ValueError("manifest: a level 0 is its own chain")
        return
    p_where, p_stamp = _split_id(parent, "parent")
    c_where, c_stamp = _split_id(chain, "chain")
    if p_where != c_where or c_stamp > p_stamp or (level == 1 and chain != parent):
        raise ValueError("manifest: parent and chain are not one chain of one path")
    if own is not None:
        o_where, _, o_stamp = own.rpartition("/")
        if p_where != o_where or not p_stamp < o_stamp:
            raise ValueError(f"manifest: parent {parent} is not an earlier backup of the "
                             "same host and path")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def image_sender_fields(values: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check what a sender says about an image backup: ``(fields, image)``.

    ``fields`` are the usual sender fields (:func:`sender_fields`) but for the
    tar-only ``sha256``, ``archive_bytes`` and ``members``; ``image`` holds the
    sender's :data:`IMAGE_SENDER_KEYS`, given under ``"image"`` or at the top
    level. The keys the store computes (size, chunk_size, map_sha256, ...) may be
    stated under ``"image"`` too: the store checks they match what it computed.
    Raises ValueError for an unknown key or a bad value.
    """
    rest = dict(values or {})
    stated = rest.pop("image", None) or {}
    if not isinstance(stated, Mapping):
        raise ValueError("image: must be an object")
    unknown = sorted(str(k) for k in set(stated) - set(IMAGE_KEYS))
    if unknown:
        raise ValueError(f"image: unknown key(s) {', '.join(unknown)[:200]} "
                         f"(known: {', '.join(IMAGE_KEYS)})")
    image = dict(stated)
    for key in IMAGE_SENDER_KEYS:
        if key in rest:
            value = rest.pop(key)
            if key in image and image[key] != value:
                raise ValueError(f"{key}: given twice, differently")
            image[key] = value
    for key in ("sha256", "archive_bytes", "members"):
        if rest.get(key) is not None:
            raise ValueError(f"{key}: an image backup has none")
    fields = sender_fields(rest)
    # the sender's keys get the manifest's checks now, on a stand-in for the store's part
    ImageInfo(size=1, chunk_size=1 << 22, map_sha256="0" * 64,
              map_bytes=MAP_HEADER.size + DIGEST_BYTES, chunks=0,
              read_bytes=image.get("read_bytes"), base=image.get("base"),
              fstype=image.get("fstype"))
    return fields, image


# -- verification records (an object store's verify never rewrites the manifest) ---------------
RECORD_FORMAT = "sanoffload-verification"
RECORD_VERSION = 1
#: what a record may carry: the store's last verification, or the proxy's comparison
RECORD_FIELDS = ("verification", "compared")


def verification_record(backup_id: str, name: str, result: Verification) -> bytes:
    """The JSON of one verification record of backup ``backup_id``: ``name`` (verification
    or compared) is ``result``."""
    if name not in RECORD_FIELDS:
        raise ValueError(f"not a verification record field: {name!r}")
    return (json.dumps({"format": RECORD_FORMAT, "version": RECORD_VERSION,
                        "backup": backup_id, name: asdict(result)},
                       indent=1, sort_keys=True) + "\n").encode()


def parse_verification_record(raw: bytes, backup_id: str) -> tuple[str, Verification]:
    """``(field, result)`` of a record, checked as hostile input: a small JSON object of
    exactly the known keys, for ``backup_id`` (a record of another backup copied beside this
    one is refused), one field, a valid :class:`Verification`; ValueError otherwise."""
    if len(raw) > 8192:
        raise ValueError("verification record larger than 8192 bytes")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("verification record: JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"verification record: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("verification record: not a JSON object")
    if data.get("format") != RECORD_FORMAT or data.get("version") != RECORD_VERSION:
        raise ValueError(f"verification record: not {RECORD_FORMAT} version {RECORD_VERSION}")
    if data.get("backup") != backup_id:
        raise ValueError("verification record: of another backup")
    named = [k for k in RECORD_FIELDS if k in data]
    if len(named) != 1 or set(data) != {"format", "version", "backup", named[0]}:
        raise ValueError("verification record: expected format, version, backup and one of "
                         f"{', '.join(RECORD_FIELDS)}")
    value = data[named[0]]
    if not isinstance(value, dict) or set(value) - {"status", "checked_at", "detail"}:
        raise ValueError("verification record: expected {status, checked_at, detail}")
    try:
        return named[0], Verification(**value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"verification record: {exc}") from None
