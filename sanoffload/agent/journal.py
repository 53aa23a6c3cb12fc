"""The agent's state journal: one small JSON file per session.

A resource is written down *before* it is created (an intent), so after a
crash, a SIGKILL or a reboot the cleanup pass knows everything that may exist,
including what was half made. Files are replaced atomically (write, fsync,
rename, fsync the directory): a reader sees the old record or the new one,
never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

SESSION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")

#: the kinds of resource a session can hold, in the order release undoes them
RESOURCE_KINDS = ("lio-target", "lio-backstore", "frozen", "snapshot", "thin-snapshot",
                  "raid1-split", "mirror-split")


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
    def from_dict(cls, data: dict[str, Any]) -> SessionRecord:
        data = dict(data)
        data["resources"] = [Resource(**r) for r in data.get("resources", [])]
        return cls(**data)


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
        data = json.dumps(record.to_dict(), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(record.session_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
        try:
            data = json.loads(self._path(session_id).read_text())
        except FileNotFoundError:
            return None
        return SessionRecord.from_dict(data)

    def __iter__(self) -> Iterator[SessionRecord]:
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            try:
                yield SessionRecord.from_dict(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError):
                # kept on disk for the operator; broken() names it
                continue

    def broken(self) -> list[Path]:
        """Records that cannot be read (cleanup reports them instead of guessing)."""
        bad = []
        for p in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                SessionRecord.from_dict(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError):
                bad.append(p)
        return bad

    def remove(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)
