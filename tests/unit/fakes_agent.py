"""Test doubles for the agent's session tests (tests/unit/test_agent_session.py).

* :class:`FakeController`: an in-memory stand-in for the
  :class:`~sanoffload.agent.controller.StorageController` protocol. It records
  every call, snapshots the journal files on disk at the moment of each call
  (so a test can check that an intent was written *before* the controller
  acted), keeps the duplicates and exports it "made" so a test can see what is
  left, and can be told to fail in duplicate/expose/unexpose/discard/health.
  ``who_freezes`` answers ``"lvm"``: quiesce then arms no guard and runs no
  fsfreeze, only ``sync -f``.
* :class:`FakeResolver`: answers the agent's resolve step with a
  :class:`~sanoffload.agent.resolve.BackupObject` built from the recorded
  ``lvs`` and ``findmnt`` outputs of the lab's fs1.
* :class:`Clock`: an injectable, settable clock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sanoffload.agent.controller import Accounted, Duplicate, Health, Immediate, Orphan
from sanoffload.agent.resolve import BackupObject
from sanoffload.kinds import DuplicateKind, ObjectKind, WhoFreezes
from sanoffload.tools import lio
from sanoffload.tools.findmnt import Mount
from sanoffload.tools.lvm import LogicalVolume
from tests.unit.recorded import load


def recorded_lv(name: str, vg: str = "datavg") -> LogicalVolume:
    """The row for ``vg/name`` of the recorded ``lvs --all`` (lvs_all.out)."""
    data = json.loads(load("lvs_all")[0])
    for section in data["report"]:
        for row in section.get("lv", []):
            lv = LogicalVolume.from_report(row)
            if lv.vg == vg and lv.name == name:
                return lv
    raise KeyError(f"{vg}/{name} is not in lvs_all.out")


def recorded_mount(name: str = "findmnt_lin") -> Mount:
    """The filesystem of the recorded ``findmnt --json --target`` output ``name``."""
    data = json.loads(load(name)[0])
    return Mount.from_report(data["filesystems"][-1])


class Clock:
    """An injectable clock: ``clock()`` is ``clock.now``."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Resolves every path to the recorded ``datavg/lin`` mounted at ``/srv/lin`` (ext4)."""

    def __init__(self, lv: LogicalVolume | None = None, mount: Mount | None = None) -> None:
        self.lv = lv or recorded_lv("lin")
        self.mount = mount or recorded_mount("findmnt_lin")
        self.calls: list[tuple[str, tuple[str, ...], str | None]] = []

    def __call__(self, runner: Any, path: str, allowed_roots: Sequence[str], *,
                 duplicate_kind: str | None = None) -> BackupObject:
        self.calls.append((path, tuple(allowed_roots), duplicate_kind))
        rel = os.path.relpath(path, self.mount.target)
        return BackupObject(requested_path=path, real_path=path, kind=ObjectKind.DIRECTORY,
                            mount=self.mount, lv=self.lv, path_in_fs=rel,
                            duplicate_kind=DuplicateKind.parse(duplicate_kind or "snapshot"),
                            root="/srv")


class FakeController:
    """In-memory test double of the StorageController protocol (no LVM, no LIO).

    ``fail[method] = exc`` makes every later call of ``method`` raise ``exc``
    (before it changes anything). ``calls`` lists ``(method, *args)``;
    ``journal_seen[method]`` lists, per call, the session records that were on
    disk at that moment (as dicts).
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.sessions_dir = Path(state_dir) / "sessions"
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, BaseException] = {}
        self.health_answer: Health = "healthy"
        self.journal_seen: dict[str, list[list[dict[str, Any]]]] = {}
        #: what exists "on the storage" now
        self.duplicates: dict[tuple[str, str], Duplicate] = {}
        self.targets: set[str] = set()
        self.backstores: set[str] = set()

    # -- bookkeeping --------------------------------------------------------
    def _journal_now(self) -> list[dict[str, Any]]:
        if not self.sessions_dir.is_dir():
            return []
        seen = []
        for p in sorted(self.sessions_dir.glob("*.json")):
            try:
                seen.append(json.loads(p.read_text()))
            except ValueError:
                continue  # a test's deliberately corrupt record
        return seen

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        self.journal_seen.setdefault(method, []).append(self._journal_now())
        exc = self.fail.get(method)
        if exc is not None:
            raise exc

    def methods(self) -> list[str]:
        return [c[0] for c in self.calls]

    @property
    def empty(self) -> bool:
        """Nothing this controller made is left."""
        return not (self.duplicates or self.targets or self.backstores)

    # -- the protocol -------------------------------------------------------
    def who_freezes(self, kind: DuplicateKind) -> WhoFreezes:
        self.calls.append(("who_freezes", kind))
        return WhoFreezes.LVM

    def plan_duplicate(self, obj: BackupObject, name: str) -> Immediate:
        return Immediate(lambda: self.duplicate(obj, name))

    def duplicate(self, obj: BackupObject, name: str) -> Duplicate:
        self._enter("duplicate", obj, name)
        assert obj.lv is not None and obj.duplicate_kind is not None
        dup = Duplicate(obj.duplicate_kind, obj.lv.vg, name, obj.lv.name)
        self.duplicates[(dup.vg, dup.name)] = dup
        return dup

    def discard(self, dup: Duplicate) -> None:
        self._enter("discard", dup)
        self.duplicates.pop((dup.vg, dup.name), None)

    def expose(self, dup: Duplicate, spec: lio.ExportSpec) -> lio.Export:
        self._enter("expose", dup, spec)
        self.backstores.add(spec.backstore)
        self.targets.add(spec.target_iqn)
        return lio.Export(spec.target_iqn, spec.portal_ip, spec.portal_port, spec.lun,
                          spec.serial, lio.naa_from_serial(spec.serial), spec.backstore)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        self._enter("identify", target_iqn, lun)
        raise NotImplementedError("the agent's session code does not identify")

    def unexpose(self, target_iqn: str, backstore: str) -> list[str]:
        self._enter("unexpose", target_iqn, backstore)
        removed = []
        if target_iqn in self.targets:
            self.targets.discard(target_iqn)
            removed.append(f"target {target_iqn}")
        if backstore in self.backstores:
            self.backstores.discard(backstore)
            removed.append(f"backstore {backstore}")
        return removed

    def health(self, dup: Duplicate) -> Health:
        self._enter("health", dup)
        return self.health_answer

    def discard_partial(self, dup: Duplicate) -> list[str]:
        self._enter("discard_partial", dup)
        return []

    def orphans(self, accounted: Accounted) -> list[Orphan]:
        self._enter("orphans", accounted)
        found = [Orphan("lv", d.name, vg=d.vg, origin=d.origin)
                 for d in self.duplicates.values() if (d.vg, d.name) not in accounted.duplicates]
        found += [Orphan("lio-target", t) for t in sorted(self.targets - accounted.targets)]
        found += [Orphan("lio-backstore", b)
                  for b in sorted(self.backstores - accounted.backstores)]
        return found

    def remove_orphan(self, orphan: Orphan) -> list[str]:
        self._enter("remove_orphan", orphan)
        if orphan.kind == "lv":
            self.duplicates.pop((orphan.vg, orphan.name), None)
            return [str(orphan)]
        if orphan.kind == "lio-target":
            return self.unexpose(orphan.name, "")
        return self.unexpose("", orphan.name)
