"""The first server's agent: prepare, status, release, and the cleanup pass.

``prepare`` resolves the backup object, quiesces and duplicates it, exposes
the duplicate to the requesting proxy alone and answers what the proxy needs
(claims 1, 4, 5, 7, 8). Each step writes its intent to the journal before it
acts and registers its undo on an ExitStack the moment the resource exists;
on any failure the stack unwinds (going on past errors) and nothing is left
frozen, exported or duplicated.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import secrets
import socket
import string
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from ..channel.messages import MAX_MEMBERS, Member, PrepareAnswer
from ..errors import AuthError, CleanupError, ConfigError, RefusedError, ResourceError
from ..kinds import DuplicateKind, WhoFreezes
from ..runner import Runner
from ..tools import fsfreeze, lio, lvm
from ..undo import UndoStack
from .bases import ImagePrepared, ThinBases
from .config import Client, Config
from .controller import Accounted, Duplicate, LocalController, StorageController
from .guard import FreezeGuard
from .journal import RESOURCE_KINDS, STORAGE_DUPLICATE, Journal, Resource, SessionRecord
from .quiesce import GuardFactory, quiesce_and_duplicate
from .remote import RemoteController, RemoteFactory
from .resolve import BackupObject, resolve

log = logging.getLogger(__name__)

_SECRET_ALPHABET = string.ascii_letters + string.digits
#: CHAP secrets between 12 and 16 characters work with every initiator we know
CHAP_SECRET_LEN = 16
#: the journal's resource kind of a duplicate is its DuplicateKind's value
DUPLICATE_KINDS: tuple[str, ...] = DuplicateKind.values()
#: the order a release undoes a session's resources in
RELEASE_ORDER = {k: i for i, k in enumerate(RESOURCE_KINDS)}


def new_session_id(host: str) -> str:
    """``HOST-8HEX``: ASCII lowercase, usable in LV names, IQNs and file names."""
    safe = "".join(c for c in host.lower() if c in string.ascii_lowercase + string.digits + "-")
    safe = safe.strip("-")[:24] or "host"
    return f"{safe}-{secrets.token_hex(4)}"


#: prepare's answer is the channel's typed message, shared with the proxy that reads it
Prepared = PrepareAnswer


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid)


class Agent:
    """The agent's operations on this host."""

    def __init__(self, runner: Runner, config: Config, *,
                 controller: StorageController | None = None, host: str | None = None,
                 clock: Callable[[], float] = time.time,
                 resolver: Callable[..., BackupObject] = resolve,
                 remotes: RemoteFactory | None = None,
                 guard_factory: GuardFactory = FreezeGuard) -> None:
        self.runner = runner
        self.resolve = resolver
        self.config = config
        self.controller = controller or LocalController(runner, config)
        self._remote_factory = remotes or functools.partial(RemoteController.over_ssh, runner)
        self._remotes: dict[str, RemoteController] = {}
        self.guard_factory = guard_factory
        self.journal = Journal(config.state_dir)
        self.bases = ThinBases(runner, config)
        self.host = host or socket.gethostname().split(".")[0]
        self.clock = clock
        self._held = False

    # -- controllers ---------------------------------------------------------
    def remote(self, node: str) -> RemoteController:
        """The controller of storage node ``node`` (one connection, kept until :meth:`close`)."""
        found = self._remotes.get(node)
        if found is None:
            ref = self.config.storage_nodes.get(node)
            if ref is None:
                raise ConfigError(f"storage node {node!r} is not in {self.config.path}",
                                  hint="a session made there is released once the node is "
                                       "named again, or by 'sanoffload storage cleanup' on it")
            found = self._remotes[node] = self._remote_factory(ref)
        return found

    def _ctl(self, node: str) -> StorageController:
        """The controller that made a journaled resource ("" is this host's)."""
        return self.remote(node) if node else self.controller

    def _node_for(self, obj: BackupObject) -> str:
        """"" for an LV of this host; the storage node's name for a LUN (RefusedError if none
        serves it)."""
        if obj.san is None:
            return ""
        ref = self.config.storage_node_for(obj.san.identifier)
        if ref is None:
            raise RefusedError(
                f"{obj.requested_path}: {obj.mount.target} is on {obj.san.device}, a SAN disk "
                f"(identifier {obj.san.identifier}) that no storage node in {self.config.path} "
                "serves", hint="add a [storage_nodes.NAME] table (see the README, SAN mode)")
        return ref.name

    def close(self) -> None:
        """Hang up on the storage nodes (what they made and never exposed goes with it)."""
        for remote in self._remotes.values():
            remote.close()
        self._remotes.clear()

    # -- prepare -----------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """One agent process at a time changes state: prepare, release and cleanup.

        Without it, a cleanup pass could take a concurrent prepare's fresh LV
        for an orphan between reading the journal and listing the LVs.
        """
        if self._held:
            yield
            return
        path = Path(self.config.state_dir)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path / "agent.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._held = True
            try:
                yield
            finally:
                self._held = False
                fcntl.flock(f, fcntl.LOCK_UN)

    def prepare(self, path: str, initiator: str, *, kind: DuplicateKind | None = None,
                client: str | None = None, also: Sequence[str] = (),
                image: bool = False) -> Prepared:
        """Answer a proxy's request.

        ``image``: the proxy reads the volume's blocks (an image backup): for a thin
        snapshot with a trusted base the answer carries the delta since it, and the
        release that says ``committed`` keeps the snapshot as the next base
        (:mod:`sanoffload.agent.bases`).

        ``also`` names more paths frozen in the same window (a consistency
        group): one volume each, all on this host's LVs or all on one storage
        node's LUNs, exported as LUNs of one target.

        The request is checked first (read-only: a refusal changes nothing);
        then sessions whose lease expired or that failed are released (leases
        are enforced at the latest here), then the new session is made.
        """
        owner = self.config.client_for_initiator(initiator)
        if client is not None and owner.name != client:
            # a proxy authenticated as one client must not borrow another's initiator
            raise AuthError(f"initiator {initiator!r} belongs to client {owner.name!r}, "
                            f"not to {client!r}")
        if len(also) + 1 > MAX_MEMBERS:
            raise RefusedError(f"a consistency group has at most {MAX_MEMBERS} paths, "
                               f"not {len(also) + 1}")
        objs = [self.resolve(self.runner, p, owner.roots, duplicate_kind=kind)
                for p in (path, *also)]
        nodes = {self._node_for(obj) for obj in objs}
        if len(nodes) > 1:
            raise RefusedError(f"{path}: the paths of a consistency group are on "
                               f"{' and '.join(sorted(n or 'this host' for n in nodes))}: "
                               "one freeze window, one storage, one target",
                               hint="group paths of one storage only")
        node = nodes.pop()
        if node and owner.san_port is None:
            raise RefusedError(f"{path}: on a storage node's LUN, and client {owner.name} has "
                               "no san_port", hint=f"set clients.{owner.name}.san_port")
        if len(objs) > 1:
            _check_group(objs, self._ctl(node))
        with self.locked():
            self._cleanup_locked(all_sessions=False, orphans=False)
            return self._prepare(owner, objs, node, initiator, image=image)

    def owner(self, session_id: str) -> str | None:
        """The client a session was prepared for (None: no such session)."""
        rec = self.journal.load(session_id)
        return rec.client if rec is not None else None

    def _prepare(self, client: Client, objs: list[BackupObject], node: str,
                 initiator: str, *, image: bool = False) -> Prepared:
        active = [r for r in self.journal if r.client == client.name]
        if len(active) >= client.max_sessions:
            raise ResourceError(f"client {client.name} already has {len(active)} session(s) "
                                f"(max_sessions = {client.max_sessions})",
                                hint="release one, or raise max_sessions in the agent config")
        obj = objs[0]
        group = len(objs) > 1
        sid = new_session_id(self.host)
        now = self.clock()
        rec = SessionRecord(session_id=sid, client=client.name, initiator=initiator,
                            path=obj.real_path, created=now,
                            lease_expires=now + self.config.lease_s,
                            info={"mountpoint": obj.mount.target, "fstype": obj.mount.fstype,
                                  "origin": obj.volume,
                                  "kind": obj.duplicate_kind.value if obj.duplicate_kind
                                  else "", "pid": os.getpid()})
        if node:
            rec.info["node"] = node
        if group:
            rec.info["members"] = [o.real_path for o in objs]
        ctl = self._ctl(node)
        self.journal.save(rec)
        with UndoStack() as undo:
            # anything below that fails unwinds what was made, then settles the record
            undo.push("session record", self._finish_failed, rec)
            # each member's own name: a storage node keys its records by them
            names = [member_session_id(sid, i) for i in range(len(objs))]
            dup_ress = []
            whos = set()
            for member, msid in zip(objs, names, strict=True):
                dup_name = f"{lvm.NAME_PREFIX}{msid}"
                # the undo is registered with the intent: it is idempotent, and for an intended
                # duplicate it also removes what a failed lvcreate half made
                if member.lv is not None and member.duplicate_kind is not None:
                    whos.add(ctl.who_freezes(member.duplicate_kind))
                    res = self.journal.intend(rec, member.duplicate_kind.value,
                                              vg=member.lv.vg, name=dup_name,
                                              origin=member.lv.name)
                else:
                    whos.add(ctl.who_freezes(member.duplicate_kind or DuplicateKind.SNAPSHOT))
                    res = self.journal.intend(rec, STORAGE_DUPLICATE, node=node, vg="",
                                              name=dup_name, origin="", made_kind="",
                                              lun=member.volume)
                undo.push(f"duplicate {dup_name} of {member.volume}", self._undo, rec, res)
                dup_ress.append(res)
            who = whos.pop()
            # journaled for a crash only: once quiesce returns or raises, it has thawed
            frozen = [self.journal.intend(rec, "frozen", mountpoint=m.mount.target)
                      for m in objs]

            # lookups before the freeze: the frozen window holds one command per member
            plans = [ctl.plan_duplicate(m, f"{lvm.NAME_PREFIX}{msid}")
                     for m, msid in zip(objs, names, strict=True)]
            frozen_at = time.time()

            def make_all() -> list[Duplicate]:
                return [plan.make() for plan in plans]

            def discard(made: list[Duplicate]) -> None:
                for plan, dup in zip(plans, made, strict=False):
                    ctl.discard(plan.complete(dup))

            try:
                q = quiesce_and_duplicate(
                    self.runner, [m.mount.target for m in objs] if group else obj.mount.target,
                    make_all, hooks=self.config.hooks.to_hooks(),
                    deadline_s=self.config.freeze_deadline_s, who_freezes=who,
                    state_dir=self.config.run_dir, path=obj.real_path,
                    discard=discard, guard_factory=self.guard_factory)
            finally:
                for res in frozen:
                    self.journal.forget(rec, res)
            dups = [plan.complete(made) for plan, made in zip(plans, q.result, strict=True)]
            # the split image of a raid1 keeps LVM's name (LV_rimage_N), and a storage node
            # may place the copy elsewhere: journal where it is
            for res, dup in zip(dup_ress, dups, strict=True):
                self.journal.done(rec, res, vg=dup.vg, name=dup.name, origin=dup.origin,
                                  **({"made_kind": dup.kind.value} if node else {}))
            # after the thaw: thin_delta never runs while the filesystem is frozen
            img = self._image(obj, dups[0], group=group, node=node) if image else \
                ImagePrepared()
            if img.keep is not None:
                rec.info["image"] = img.keep
                self.journal.save(rec)

            chap_secret = "".join(secrets.choice(_SECRET_ALPHABET)
                                  for _ in range(CHAP_SECRET_LEN))
            self.runner.add_secret(chap_secret)
            target_iqn = lio.target_iqn_for(sid)
            where = {"node": node} if node else {}
            exports: list[tuple[lio.ExportSpec, lio.Export]] = []
            # one target: every member is a LUN of it, behind one login and one CHAP pair
            for lun, (dup, msid) in enumerate(zip(dups, names, strict=True)):
                serial = lio.new_serial()
                spec = lio.ExportSpec(
                    session_id=msid, device=dup.device, target_iqn=target_iqn,
                    initiator_iqn=initiator, portal_ip=self.config.portal.address,
                    portal_port=self.config.portal.port, chap_user=f"sanoffload-{sid}",
                    chap_secret=chap_secret, serial=serial, lun=lun,
                    port=(client.san_port or "") if node else "")
                bs_res = self.journal.intend(rec, "lio-backstore", name=spec.backstore,
                                             serial=serial, **where)
                undo.push(f"backstore {spec.backstore}", self._undo, rec, bs_res)
                tgt_res = self.journal.intend(rec, "lio-target", iqn=spec.target_iqn,
                                              backstore=spec.backstore, **where)
                undo.push(f"target {spec.target_iqn} lun {lun}", self._undo, rec, tgt_res)
                exports.append((spec, ctl.expose(dup, spec)))
                self.journal.done(rec, bs_res)
                self.journal.done(rec, tgt_res)
            spec, export = exports[0]
            rec.state = "ready"
            # holding hooks that failed after the thaw, then post-thaw hooks: exit 14 at the proxy
            warnings = q.warnings + img.warnings
            rec.info.update({"window_ms": q.window_ms, "frozen_by": q.frozen_by.value,
                             "identifier": export.identifier, "warnings": warnings,
                             "held": [h.hook for h in q.held]})
            self.journal.save(rec)
            undo.commit()
        log.info("session %s ready: %s frozen %.1f ms by %s, exported as %s%s", sid,
                 ", ".join(m.mount.target for m in objs), q.window_ms, q.frozen_by,
                 ", ".join(e.identifier for _s, e in exports),
                 f" by storage node {node} at {export.portal_ip}" if node else "")
        members = [Member(path=m.real_path, path_in_fs=m.path_in_fs, fstype=m.mount.fstype,
                          object_kind=m.kind, duplicate_kind=dup.kind, lun=e.lun,
                          identifier=e.identifier, unit_serial=e.serial)
                   for m, dup, (_s, e) in zip(objs, dups, exports, strict=True)] if group else []
        return Prepared(
            session_id=sid, target_iqn=export.target_iqn,
            portals=[f"{export.portal_ip}:{export.portal_port}"], lun=export.lun,
            identifier=export.identifier, unit_serial=export.serial, chap_user=spec.chap_user,
            chap_secret=chap_secret, fstype=obj.mount.fstype, path_in_fs=obj.path_in_fs,
            object_kind=obj.kind, duplicate_kind=dups[0].kind, frozen_at=frozen_at,
            freeze_window_ms=round(q.window_ms, 1), frozen_by=q.frozen_by,
            lease_expires=rec.lease_expires, warnings=warnings, held=list(q.held),
            members=members, delta=img.delta)

    def _image(self, obj: BackupObject, dup: Duplicate, *, group: bool,
               node: str) -> ImagePrepared:
        """An image backup's delta and base keeping: a thin snapshot of this host only."""
        if group or node or obj.lv is None or dup.kind is not DuplicateKind.THIN_SNAPSHOT:
            # not thin (or a storage node's, or a group's): the proxy reads it all
            log.info("image backup of %s: a %s%s: full read, no base kept", obj.real_path,
                     dup.kind, " of a group" if group else
                     (f" on storage node {node}" if node else ""))
            return ImagePrepared()
        return self.bases.prepare(obj.lv, dup.name)

    def _finish_failed(self, rec: SessionRecord) -> None:
        # runs last on the failure path: all undos before it succeeded or were reported
        if not rec.resources:
            self.journal.remove(rec.session_id)
        else:
            rec.state = "failed"
            self.journal.save(rec)

    # -- undo one resource ---------------------------------------------------
    def _undo(self, rec: SessionRecord, res: Resource) -> None:
        f = res.fields
        ctl = self._ctl(str(f.get("node") or ""))
        if res.kind == "lio-target":
            ctl.unexpose(f["iqn"], f.get("backstore", ""))
        elif res.kind == "lio-backstore":
            ctl.unexpose("", f["name"])
        elif res.kind == "frozen":
            fsfreeze.unfreeze(self.runner, f["mountpoint"])
        elif res.kind in DUPLICATE_KINDS or res.kind == STORAGE_DUPLICATE:
            dup = _journaled_duplicate(res)
            if res.state == "intended":
                ctl.discard_partial(dup)
            ctl.discard(dup)
        self.journal.forget(rec, res)

    # -- status / release ----------------------------------------------------
    def status(self, session_id: str) -> dict[str, Any]:
        """The session's state; JournalError (exit 13), naming the file, if its record is
        unreadable."""
        rec = self.journal.load(session_id)
        if rec is None:
            return {"session_id": session_id, "status": "unknown"}
        dup_ress = [r for r in rec.resources
                    if r.kind in DUPLICATE_KINDS or r.kind == STORAGE_DUPLICATE]
        status = "healthy"
        if rec.state != "ready":
            status = rec.state
        elif self.clock() >= rec.lease_expires:
            status = "expired"
        else:
            # a group is as healthy as its worst member
            for res in dup_ress:
                health = self._ctl(str(res.fields.get("node") or "")).health(
                    _journaled_duplicate(res))
                if health != "healthy":
                    status = health
                    break
        return {"session_id": session_id, "status": status, "state": rec.state,
                "lease_expires": rec.lease_expires, "path": rec.path, **rec.info}

    def release(self, session_id: str, *, committed: str | None = None) -> list[str]:
        with self.locked():
            return self._release(session_id, committed=committed)

    def _release(self, session_id: str, *, committed: str | None = None) -> list[str]:
        """Undo everything the session holds, newest first. Idempotent.

        ``committed``: the store committed the image backup read from this session's
        thin snapshot under that id, which becomes the volume's base (tick/tock:
        without it, or if keeping it fails, the snapshot goes and the old base stays).

        Goes on past errors and raises CleanupError listing all of them; the
        record stays in the journal then, so a later cleanup tries again.
        """
        rec = self.journal.load(session_id)
        if rec is None:
            return []
        rec.state = "releasing"
        self.journal.save(rec)
        errors: list[BaseException] = []
        done: list[str] = []
        keep = rec.info.get("image") if committed else None
        for res in sorted(rec.resources, key=lambda r: RELEASE_ORDER[r.kind]):
            try:
                if (isinstance(keep, dict) and res.kind == DuplicateKind.THIN_SNAPSHOT.value
                        and res.fields.get("name") == keep.get("name")):
                    kept = self._keep_base(rec, res, keep, str(committed))
                    if kept is not None:
                        done.append(kept)
                        continue
                self._undo(rec, res)
                done.append(f"{res.kind} {res.fields}")
            except Exception as exc:  # rtslib and OSErrors too: the others must still run
                errors.append(exc)
        if errors:
            rec.state = "failed"
            self.journal.save(rec)
            raise CleanupError(errors, context=f"release of {session_id}")
        self.journal.remove(session_id)
        log.info("session %s released", session_id)
        return done

    def _keep_base(self, rec: SessionRecord, res: Resource, keep: dict[str, Any],
                   committed: str) -> str | None:
        """The session's snapshot made the base; None if it was not (then it is discarded,
        and the old base stays)."""
        try:
            kept = self.bases.commit(keep, committed)
        except Exception as exc:  # any failure: tock, not tick
            log.warning("session %s: the snapshot of %s is not kept as a base (%s); the old "
                        "base stays", rec.session_id, rec.path, exc)
            return None
        self.journal.forget(rec, res)
        return kept

    def base_rows(self) -> list[dict[str, Any]]:
        """The thin bases kept for image backups (``agent status``)."""
        return self.bases.status()

    def sessions(self) -> list[dict[str, Any]]:
        """Every session's status; an unreadable record is a row ``status: unreadable``."""
        rows = [self.status(r.session_id) for r in self.journal]
        rows += [{"session_id": Path(path).stem, "status": "unreadable", "record": path}
                 for exc in self.journal.broken() for path in exc.paths]
        return sorted(rows, key=lambda r: str(r["session_id"]))

    # -- cleanup -------------------------------------------------------------
    def cleanup(self, *, all_sessions: bool = False) -> dict[str, Any]:
        with self.locked():
            return self._cleanup_locked(all_sessions=all_sessions)

    def _cleanup_locked(self, *, all_sessions: bool = False,
                        orphans: bool = True) -> dict[str, Any]:
        """Remove what crashes left: journaled sessions not ready or expired, and marked orphans.

        At agent start-up nothing should survive (``all_sessions``); run later,
        only failed, half-prepared and expired sessions are released.

        An unreadable journal record stops the sweep before anything is removed
        (JournalError naming the file): its session's objects would look like
        orphans. prepare's pass (``orphans=False``) releases only what readable
        records name, so it goes on.
        """
        if orphans:
            self.journal.check("agent cleanup")
            bad = self.bases.journal.broken()
            if bad:
                # its base would look like a leftover: nothing is removed until it is read
                raise bad[0]
        released, errors = [], []
        now = self.clock()
        for rec in list(self.journal):
            if rec.state == "preparing" and _alive(rec.info.get("pid")) and not all_sessions:
                continue  # another agent process is preparing it right now
            if all_sessions or rec.state != "ready" or now >= rec.lease_expires:
                try:
                    self._release(rec.session_id)
                    released.append(rec.session_id)
                except Exception as exc:  # one stuck session must not stop the pass
                    errors.append(exc)
        bases: list[str] = []
        if orphans:
            try:
                bases = self.bases.tidy()
            except Exception as exc:  # the sessions and orphans are still swept
                errors.append(exc)
        found = self._orphans() if orphans else []
        for _what, undo in found:
            try:
                undo()
            except Exception as exc:
                errors.append(exc)
        swept: list[str] = []
        for node in self.config.storage_nodes if orphans else ():
            # what a crash left there the node finds (its journal, its marks), not we
            try:
                swept += [f"{node}: {r}" for r in self.remote(node).sweep()]
            except Exception as exc:
                errors.append(exc)
        report: dict[str, Any] = {"released": released,
                                  "orphans_removed": [w for w, _ in found] + swept}
        if bases:  # only when one was dropped or rolled back: the report it always was
            report["bases"] = bases
        if errors:
            raise CleanupError(errors, context="agent cleanup")
        return report

    def _orphans(self) -> list[tuple[str, Callable[[], Any]]]:
        """Our objects no journal record accounts for, as the controller finds them."""
        # a storage node's objects are its own to sweep: only this host's are accounted here
        recs = [rec for rec in self.journal if not rec.info.get("node")]
        accounted = Accounted(
            # a thin base is never an orphan: its own journal accounts for it
            duplicates=frozenset((str(r.fields.get("vg")), str(r.fields.get("name")))
                                 for rec in recs for r in rec.resources
                                 if r.kind in DUPLICATE_KINDS) | self.bases.names(),
            targets=frozenset(str(r.fields.get("iqn")) for rec in recs for r in rec.resources
                              if r.kind == "lio-target"),
            backstores=frozenset(str(r.fields.get("name")) for rec in recs
                                 for r in rec.resources if r.kind == "lio-backstore"))
        ctl = self.controller
        return [(str(o), functools.partial(ctl.remove_orphan, o))
                for o in ctl.orphans(accounted)]


def member_session_id(sid: str, index: int) -> str:
    """The id member ``index`` of a group's names its objects by: the session's own for the
    first, ``HOST-gN-HEX`` for the others (still a session id to a storage node)."""
    if index == 0:
        return sid
    host, _, tail = sid.rpartition("-")
    return f"{host}-g{index}-{tail}"


_MEMBER_RE = re.compile(r"(?P<host>[a-z0-9][a-z0-9-]*)-g[1-9][0-9]?-(?P<tail>[0-9a-f]{8})")


def group_session_id(sid: str) -> str | None:
    """The group's own session id for a member's (:func:`member_session_id` undone); None
    for an id that names no member N > 0."""
    match = _MEMBER_RE.fullmatch(sid)
    return None if match is None else f"{match.group('host')}-{match.group('tail')}"


def _check_group(objs: list[BackupObject], ctl: StorageController) -> None:
    """One volume per member, no member inside another, and one instant for all (fsfreeze)."""
    for i, a in enumerate(objs):
        for b in objs[:i]:
            if a.mount.devno == b.mount.devno:
                raise RefusedError(f"{a.requested_path} and {b.requested_path} are on one "
                                   f"filesystem ({a.mount.target}): a group has one path per "
                                   "volume", hint="back up their common directory instead")
            if os.path.commonpath([a.real_path, b.real_path]) in (a.real_path, b.real_path):
                raise RefusedError(f"{a.requested_path} and {b.requested_path}: one holds the "
                                   "other; a group's paths are disjoint")
        kind = a.duplicate_kind or DuplicateKind.SNAPSHOT
        if ctl.who_freezes(kind) is not WhoFreezes.FSFREEZE:
            raise RefusedError(
                f"{a.requested_path}: its {kind} would be frozen by LVM's own suspend on this "
                "kernel (Linux < 6.6), one volume at a time: a group needs one instant",
                hint="use thin volumes or a raid1/mirror split, Linux >= 6.6, or SAN mode")


def _journaled_duplicate(res: Resource) -> Duplicate:
    """The duplicate a journal resource names. A storage node's, asked for and never
    answered, has no kind or VG yet: the node finds it by name, whatever kind is sent."""
    f = res.fields
    kind = res.kind if res.kind in DUPLICATE_KINDS else \
        (f.get("made_kind") or DuplicateKind.SNAPSHOT)
    return Duplicate(DuplicateKind.parse(kind), str(f.get("vg") or ""), str(f["name"]),
                     str(f.get("origin") or ""))
