"""The agent's state journal: one small JSON file per session.

A resource is written down *before* it is created (an intent), so after a
crash, a SIGKILL or a reboot the cleanup pass knows everything that may exist,
including what was half made. Files are replaced atomically (write, fsync,
rename, fsync the directory): a reader sees the old record or the new one,
never a torn one.

A record that cannot be read anyway (a full disk, a hand edit, a bad sector)
is never guessed at: :meth:`Journal.load` raises
:class:`~sanoffload.errors.JournalError` naming the file, and
:meth:`Journal.check` does the same for the whole journal before cleanup, whose
orphan sweep would otherwise take that session's objects for leftovers.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from ..durable import replace_json
from ..errors import JournalError, UsageError
from ..kinds import DuplicateKind
from ..text import printable

R = TypeVar("R")

SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")

#: a duplicate a storage node made (SAN mode): its kind is the node's choice, a field
STORAGE_DUPLICATE = "storage-duplicate"
#: the kinds of resource a session can hold, in the order release undoes them; a
#: duplicate of this host is journaled under its DuplicateKind's value
RESOURCE_KINDS: tuple[str, ...] = ("lio-target", "lio-backstore", "frozen",
                                   *DuplicateKind.values(), STORAGE_DUPLICATE)


@dataclass
class Resource:
    kind: str
    fields: dict[str, Any]
    #: "intended" until the step that makes it returned; cleanup treats both alike
    state: str = "intended"

    def __post_init__(self) -> None:
        if self.kind not in RESOURCE_KINDS:
            raise ValueError(f"unknown resource kind {self.kind!r}")


@dataclass
class SessionRecord:
    session_id: str
    client: str
    initiator: str
    path: str
    created: float = field(default_factory=time.time)
    lease_expires: float = 0.0
    state: str = "preparing"  # preparing | ready | releasing | failed
    resources: list[Resource] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not SESSION_ID_RE.fullmatch(self.session_id):
            raise UsageError(f"invalid session id {self.session_id!r}")

    def find(self, kind: str) -> Resource | None:
        return next((r for r in self.resources if r.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SessionRecord:
        """A record from its JSON form; ValueError/TypeError/UsageError for anything else."""
        if not isinstance(data, dict):
            raise TypeError(f"a record is a JSON object, not {type(data).__name__}")
        data = dict(data)
        resources = data.get("resources", [])
        if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
            raise TypeError("resources must be a list of objects")
        data["resources"] = [Resource(**r) for r in resources]
        rec = cls(**data)
        _check_types(rec)
        return rec


def _check_types(rec: SessionRecord) -> None:
    # what status and cleanup compare and format: a wrong type there is a traceback later
    for name in ("session_id", "client", "initiator", "path", "state"):
        if not isinstance(getattr(rec, name), str):
            raise TypeError(f"{name} must be a string")
    for name in ("created", "lease_expires"):
        value = getattr(rec, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number")
    if not isinstance(rec.info, dict):
        raise TypeError("info must be an object")
    for res in rec.resources:
        if not isinstance(res.fields, dict) or not isinstance(res.state, str):
            raise TypeError(f"resource {res.kind}: fields must be an object, state a string")


class _Records(Generic[R]):
    """One JSON record per key in a 0700 directory under the state directory, each
    replaced atomically and read back as hostile (JournalError naming the file)."""

    #: the directory under the state directory, what a key is, what a record is, what a
    #: record holds (of its key), and the hint of an unreadable one (``{dir}``: the directory)
    subdir: ClassVar[str]
    key_re: ClassVar[re.Pattern[str]]
    key_name: ClassVar[str]
    record_name: ClassVar[str]
    holds: ClassVar[str]
    hint: ClassVar[str]

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / self.subdir

    def _key(self, record: R) -> str:
        raise NotImplementedError

    def _parse(self, data: Any) -> R:
        """A record from its JSON form; ValueError/TypeError/UsageError for anything else."""
        raise NotImplementedError

    def _path(self, key: str) -> Path:
        if not self.key_re.fullmatch(key):
            raise UsageError(f"invalid {self.key_name} {key!r}")
        return self.dir / f"{key}.json"

    def _save(self, record: R, data: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_json(self._path(self._key(record)), data)

    def load(self, key: str) -> R | None:
        """The key's record; None if there is none; JournalError if it cannot be read."""
        path = self._path(key)
        if not path.exists():
            return None
        return self._read(path)

    def remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _read(self, path: Path) -> R:
        try:
            rec = self._parse(json.loads(path.read_bytes()))
            if f"{self._key(rec)}.json" != path.name:
                raise ValueError(f"it holds {self.holds} {self._key(rec)!r}")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, RecursionError, UsageError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, RecursionError):
                why = "nested too deeply"
            raise JournalError(
                f"{self.record_name} {path} is unreadable ({printable(why)[:200]})",
                paths=[str(path)], hint=self.hint.format(dir=self.dir)) from None
        return rec

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []

    def __iter__(self) -> Iterator[R]:
        """The readable records (see :meth:`broken` for the others)."""
        for p in self._files():
            try:
                yield self._read(p)
            except FileNotFoundError:
                continue  # gone meanwhile
            except JournalError:
                continue  # kept on disk for the operator; broken() names it

    def broken(self) -> list[JournalError]:
        """The records that cannot be read, one error each (naming the file)."""
        bad = []
        for p in self._files():
            try:
                self._read(p)
            except FileNotFoundError:
                continue
            except JournalError as exc:
                bad.append(exc)
        return bad


class Journal(_Records[SessionRecord]):
    """Session records under ``<state_dir>/sessions/``."""

    subdir = "sessions"
    key_re = SESSION_ID_RE
    key_name = "session id"
    record_name = "journal record"
    holds = "session"
    hint = "inspect it; once the objects it names are gone, move it out of {dir}"

    def _key(self, record: SessionRecord) -> str:
        return record.session_id

    def _parse(self, data: Any) -> SessionRecord:
        return SessionRecord.from_dict(data)

    def save(self, record: SessionRecord) -> None:
        """Atomically replace the record on disk."""
        self._save(record, record.to_dict())

    def intend(self, record: SessionRecord, kind: str, **fields: Any) -> Resource:
        """Write down a resource before creating it; returns the entry to mark done."""
        res = Resource(kind, dict(fields))
        record.resources.append(res)
        self.save(record)
        return res

    def done(self, record: SessionRecord, res: Resource, **fields: Any) -> None:
        """The resource now exists (``fields`` adds what was learnt making it)."""
        res.state = "created"
        res.fields.update(fields)
        self.save(record)

    def forget(self, record: SessionRecord, res: Resource) -> None:
        """The resource is gone (undone)."""
        record.resources = [r for r in record.resources if r is not res]
        self.save(record)

    def check(self, doing: str) -> None:
        """Raise JournalError naming every unreadable record: ``doing`` stops, untouched."""
        bad = self.broken()
        if bad:
            paths = [p for exc in bad for p in exc.paths]
            raise JournalError(f"{doing}: nothing was done: "
                               + "; ".join(exc.message for exc in bad),
                               paths=paths, hint=bad[0].hint)


# --------------------------------------------------------------------------
# Thin bases (image backups): they outlive the session that made them
# --------------------------------------------------------------------------

#: an LVM UUID as lvs prints it (6-4-4-4-4-4-6 of [A-Za-z0-9]); names a base's record file
LV_UUID_RE = re.compile(r"[A-Za-z0-9]{6}(?:-[A-Za-z0-9]{4}){5}-[A-Za-z0-9]{6}")
#: a base record's state: "promoting" while the session's snapshot is being made the base
#: (the old base is still whole: a crash then rolls back), "kept" once it is the base
BASE_STATES = ("promoting", "kept")


@dataclass
class BaseRecord:
    """The thin base of one volume: the snapshot backup ``backup`` was read from.

    Trusted for the next thin_delta only while lvs still shows an LV ``vg/name`` with
    this ``uuid`` and ``thin_id``, whose origin is ``origin_lv`` (``origin_uuid``) in
    ``pool``, of ``size_bytes``.
    """

    origin_vg: str
    origin_lv: str
    origin_uuid: str
    pool: str
    name: str
    uuid: str
    thin_id: int
    size_bytes: int
    backup: str
    state: str = "kept"
    created: float = field(default_factory=time.time)
    #: the record of the base this one replaces (its ``previous`` null), until that base
    #: is removed: a promotion a crash interrupted rolls back to it
    previous: dict[str, Any] | None = None

    #: the journal's resource kind of a base (a session's are in RESOURCE_KINDS)
    kind = "thin-base"

    def __post_init__(self) -> None:
        if not LV_UUID_RE.fullmatch(str(self.origin_uuid)):
            raise UsageError(f"invalid origin LV UUID {self.origin_uuid!r}")
        if self.state not in BASE_STATES:
            raise ValueError(f"unknown base state {self.state!r}")

    @property
    def vg(self) -> str:
        return self.origin_vg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BaseRecord:
        """A record from its JSON form; ValueError/TypeError/UsageError for anything else."""
        if not isinstance(data, dict):
            raise TypeError(f"a base record is a JSON object, not {type(data).__name__}")
        rec = cls(**data)
        for name in ("origin_vg", "origin_lv", "origin_uuid", "pool", "name", "uuid",
                     "backup", "state"):
            if not isinstance(getattr(rec, name), str):
                raise TypeError(f"{name} must be a string")
        for name in ("thin_id", "size_bytes"):
            value = getattr(rec, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{name} must be a non-negative integer")
        if rec.previous is not None and not (
                isinstance(rec.previous, dict)
                and all(isinstance(rec.previous.get(k), str) for k in ("name", "uuid"))):
            raise TypeError("previous must be null or a base record")
        return rec


class BaseJournal(_Records[BaseRecord]):
    """Base records under ``<state_dir>/bases/``, one per origin volume (by its LV UUID)."""

    subdir = "bases"
    key_re = LV_UUID_RE
    key_name = "LV UUID"
    record_name = "base record"
    holds = "the base of"
    hint = ("inspect it; moving it out of the way makes the next image backup of its volume "
            "a full read (its base LV, tagged sanoffload-base, stays until removed by hand)")

    def _key(self, record: BaseRecord) -> str:
        return record.origin_uuid

    def _parse(self, data: Any) -> BaseRecord:
        return BaseRecord.from_dict(data)

    def save(self, record: BaseRecord) -> None:
        """Atomically replace the volume's record."""
        self._save(record, record.to_dict())
