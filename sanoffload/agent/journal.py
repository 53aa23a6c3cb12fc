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
from typing import Any

from ..durable import replace_json
from ..errors import JournalError, UsageError
from ..kinds import DuplicateKind
from ..text import printable

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


class Journal:
    """Session records under ``<state_dir>/sessions/``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "sessions"

    def _path(self, session_id: str) -> Path:
        if not SESSION_ID_RE.fullmatch(session_id):
            raise UsageError(f"invalid session id {session_id!r}")
        return self.dir / f"{session_id}.json"

    def save(self, record: SessionRecord) -> None:
        """Atomically replace the record on disk."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_json(self._path(record.session_id), record.to_dict())

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

    def load(self, session_id: str) -> SessionRecord | None:
        """The session's record; None if there is none; JournalError if it cannot be read."""
        path = self._path(session_id)
        if not path.exists():
            return None
        return self._read(path)

    def _read(self, path: Path) -> SessionRecord:
        try:
            rec = SessionRecord.from_dict(json.loads(path.read_bytes()))
            if f"{rec.session_id}.json" != path.name:
                raise ValueError(f"it holds session {rec.session_id!r}")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, RecursionError, UsageError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, RecursionError):
                why = "nested too deeply"
            raise JournalError(
                f"journal record {path} is unreadable ({printable(why)[:200]})",
                paths=[str(path)],
                hint="inspect it; once the objects it names are gone, move it out of "
                     f"{self.dir}") from None
        return rec

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []

    def __iter__(self) -> Iterator[SessionRecord]:
        """The readable records (see :meth:`check` and :meth:`broken` for the others)."""
        for p in self._files():
            try:
                yield self._read(p)
            except FileNotFoundError:
                continue  # released meanwhile
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

    def check(self, doing: str) -> None:
        """Raise JournalError naming every unreadable record: ``doing`` stops, untouched."""
        bad = self.broken()
        if bad:
            paths = [p for exc in bad for p in exc.paths]
            raise JournalError(f"{doing}: nothing was done: "
                               + "; ".join(exc.message for exc in bad),
                               paths=paths, hint=bad[0].hint)

    def remove(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)


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


class BaseJournal:
    """Base records under ``<state_dir>/bases/``, one per origin volume (by its LV UUID)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "bases"

    def _path(self, origin_uuid: str) -> Path:
        if not LV_UUID_RE.fullmatch(origin_uuid):
            raise UsageError(f"invalid LV UUID {origin_uuid!r}")
        return self.dir / f"{origin_uuid}.json"

    def save(self, record: BaseRecord) -> None:
        """Atomically replace the volume's record."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_json(self._path(record.origin_uuid), record.to_dict())

    def load(self, origin_uuid: str) -> BaseRecord | None:
        """The volume's base record; None if none; JournalError if it cannot be read."""
        path = self._path(origin_uuid)
        if not path.exists():
            return None
        return self._read(path)

    def remove(self, origin_uuid: str) -> None:
        self._path(origin_uuid).unlink(missing_ok=True)

    def _read(self, path: Path) -> BaseRecord:
        try:
            rec = BaseRecord.from_dict(json.loads(path.read_bytes()))
            if f"{rec.origin_uuid}.json" != path.name:
                raise ValueError(f"it holds the base of {rec.origin_uuid!r}")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, RecursionError, UsageError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise JournalError(
                f"base record {path} is unreadable ({printable(why)[:200]})",
                paths=[str(path)],
                hint="inspect it; moving it out of the way makes the next image backup of "
                     "its volume a full read (its base LV, tagged sanoffload-base, stays "
                     "until removed by hand)") from None
        return rec

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []

    def __iter__(self) -> Iterator[BaseRecord]:
        for p in self._files():
            try:
                yield self._read(p)
            except (FileNotFoundError, JournalError):
                continue  # gone meanwhile, or named by broken()

    def broken(self) -> list[JournalError]:
        bad = []
        for p in self._files():
            try:
                self._read(p)
            except FileNotFoundError:
                continue
            except JournalError as exc:
                bad.append(exc)
        return bad
