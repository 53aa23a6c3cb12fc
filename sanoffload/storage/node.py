"""The storage node's operations for its clients: duplicate a LUN, expose it, identify, release.

The node is the agent's machinery pointed at LUNs: the duplicate is made by
:class:`~sanoffload.agent.controller.LocalController` (the same LVM plans, the
same LIO exporter) and every object is journaled, released and swept by an
:class:`~sanoffload.agent.session.Agent` over this node's own journal
(``state_dir/sessions``). What the node adds is ownership between clients:

* a duplicate is one journal record, keyed by the session its name carries
  (``sanoffload-SID``), written with the client's name before anything is made;
* every later op finds its object *in the journal* and refuses it when another
  client's record holds it (AuthError) or no record does and the name lacks
  sanoffload's mark (RefusedError). A marked name no record holds is already
  gone: releasing it again is not an error and touches nothing;
* the record names the connection holding it (``pid``, ``conn``): a client's
  ``cleanup`` releases only records no live connection holds.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

from ..agent import config as agent_config
from ..agent.controller import Duplicate, Health, LocalController
from ..agent.journal import Resource, SessionRecord
from ..agent.resolve import check_lv, choose_kind
from ..agent.session import DUPLICATE_KINDS, Agent, group_session_id
from ..errors import AuthError, RefusedError, ResourceError, UsageError
from ..iqn import valid_iqn
from ..kinds import DuplicateKind
from ..runner import Runner
from ..text import printable
from ..tools import lio, lvm
from ..undo import UndoStack
from .config import StorageClient, StorageConfig
from .luns import LunMap

log = logging.getLogger(__name__)

#: a duplicate's name as the agent makes it: the mark, then its session id
_SESSION = r"[a-z0-9][a-z0-9-]{0,40}-[0-9a-f]{8}"
DUPLICATE_NAME_RE = re.compile(re.escape(lvm.NAME_PREFIX) + f"(?P<sid>{_SESSION})")
#: CHAP as LIO stores it in configfs: no whitespace or quotes that could end the attribute
_CHAP_USER_RE = re.compile(r"[A-Za-z0-9._:@-]{1,255}")
_CHAP_SECRET_RE = re.compile(r"[A-Za-z0-9._~+/=:@-]{12,255}")
MAX_LUN = 255

#: the connections this process serves now (a record held by one is in use)
LIVE_CONNECTIONS: set[str] = set()


def _shown(value: object) -> str:
    text = printable(str(value))
    return text if len(text) <= 80 else text[:80] + "…"


def session_of(name: str) -> str:
    """The session id a duplicate's name carries; RefusedError for a name without the mark."""
    match = DUPLICATE_NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise RefusedError(f"{_shown(name)!r} is not a sanoffload duplicate's name "
                           f"({lvm.NAME_PREFIX}SESSION): this node touches nothing else")
    return match.group("sid")


@dataclass(frozen=True)
class WireDuplicate:
    """A duplicate as a client names it (the ``duplicate`` object of the wire)."""

    kind: DuplicateKind
    vg: str
    name: str
    origin: str

    @classmethod
    def parse(cls, value: Any, op: str) -> WireDuplicate:
        """Checked once here: exactly kind, vg, name, origin, all strings (ProtocolError-like
        UsageError otherwise); the kind a member."""
        keys = {"kind", "vg", "name", "origin"}
        if not isinstance(value, dict) or set(value) != keys or \
                not all(isinstance(v, str) for v in value.values()):
            raise UsageError(f"{op}: 'duplicate' must be an object of strings "
                             f"{{kind, vg, name, origin}}, not {_shown(value)}")
        if not value["name"]:
            raise UsageError(f"{op}: the duplicate has no name")
        return cls(DuplicateKind.parse(value["kind"], where=op), value["vg"], value["name"],
                   value["origin"])


@dataclass(frozen=True)
class Held:
    """The journal entry of a duplicate and what it is."""

    record: SessionRecord
    resource: Resource

    @property
    def duplicate(self) -> Duplicate:
        f = self.resource.fields
        return Duplicate(DuplicateKind(self.resource.kind), str(f["vg"]), str(f["name"]),
                         str(f["origin"]))


def agent_view(config: StorageConfig) -> agent_config.Config:
    """The agent config LocalController and Agent read: policies, state_dir, leases.

    They never read its portal or clients here (no prepare runs on a node); the
    first port stands in for the portal the dataclass requires.
    """
    first = next(iter(config.ports.values()))
    return agent_config.Config(
        path=config.path, portal=agent_config.Portal(first.address, first.port), clients={},
        state_dir=config.state_dir, lease_s=config.lease_s, grace_s=config.grace_s,
        snapshot=config.snapshot, thin=config.thin)


class StorageNode:
    """This node's duplicates and exports, per client."""

    def __init__(self, runner: Runner, config: StorageConfig, *,
                 exporter: lio.LioExporter | None = None,
                 stat_fn: Callable[[str], os.stat_result] = os.stat,
                 host: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.runner = runner
        self.config = config
        view = agent_view(config)
        self.controller = LocalController(runner, view, exporter)
        self.agent = Agent(runner, view, controller=self.controller, host=host, clock=clock)
        self.journal = self.agent.journal
        self.host = self.agent.host
        self.clock = clock
        self._stat = stat_fn

    @property
    def luns(self) -> LunMap:
        # the exporter is made on first use: without rtslib, ping and cleanup still answer
        return LunMap(self.runner, self.controller.exporter, stat_fn=self._stat)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # the agent's lock: a cleanup sweep must not take a duplicate made meanwhile for
        # an orphan (Agent._locked, see the module docstring of agent.session)
        with self.agent.locked():
            yield

    # -- connections -----------------------------------------------------------
    @staticmethod
    def connect() -> str:
        """A token for a new connection; records it makes are held while it is live."""
        token = secrets.token_hex(8)
        LIVE_CONNECTIONS.add(token)
        return token

    @staticmethod
    def disconnect(token: str) -> None:
        LIVE_CONNECTIONS.discard(token)

    @staticmethod
    def held(rec: SessionRecord) -> bool:
        """A live connection (of this process, or another serve process) holds ``rec``."""
        pid = rec.info.get("pid")
        if pid == os.getpid():
            return rec.info.get("conn") in LIVE_CONNECTIONS
        return isinstance(pid, int) and not isinstance(pid, bool) and psutil.pid_exists(pid)

    # -- lookups -------------------------------------------------------------
    def _find(self, dup: WireDuplicate) -> Held | None:
        """The journal entry naming ``dup`` (by its name: given, or made; and its VG if given)."""
        for rec in self.journal:
            for res in rec.resources:
                if res.kind not in DUPLICATE_KINDS:
                    continue
                f = res.fields
                if dup.name in (f.get("name"), f.get("requested")) and \
                        (not dup.vg or dup.vg == f.get("vg")):
                    return Held(rec, res)
        return None

    def _own(self, client: str, dup: WireDuplicate, op: str) -> Held | None:
        """This client's entry for ``dup``; None for a marked name no record holds."""
        held = self._find(dup)
        if held is None:
            session_of(dup.name)  # RefusedError: unmarked and not ours to know
            return None
        if held.record.client != client:
            raise AuthError(f"{op}: duplicate {_shown(dup.name)} belongs to another client")
        # a request cut off before its reply names the duplicate with no VG and no kind the
        # client could know: the name alone finds it then
        if dup.vg and held.resource.kind != dup.kind.value:
            raise RefusedError(f"{op}: duplicate {_shown(dup.name)} is a {held.resource.kind}, "
                               f"not a {dup.kind.value}")
        return held

    def _export_owner(self, kind: str, key: str, name: str) -> SessionRecord | None:
        for rec in self.journal:
            if any(r.kind == kind and r.fields.get(key) == name for r in rec.resources):
                return rec
        return None

    # -- duplicate -------------------------------------------------------------
    def duplicate(self, client: str, lun_id: str, kind: DuplicateKind | None, name: str,
                  conn: str = "") -> tuple[Duplicate, float]:
        """Duplicate LUN ``lun_id`` as ``name``; returns it and how long the one LVM command
        that makes it took (ms): the first server is frozen for this whole request."""
        cl = self.config.client(client)
        sid = session_of(name)
        lun = self.luns.resolve(lun_id, cl)
        check_lv(lun_id, lun.lv)
        chosen = choose_kind(lun_id, lun.lv, kind)
        with self._locked():
            existing = self.journal.load(sid)
            if existing is not None:
                if existing.client != client:
                    raise AuthError(f"duplicate {name} belongs to another client")
                raise ResourceError(f"duplicate {name} exists already",
                                    hint="discard it first, or name a new session")
            self._check_slots(cl)
            now = self.clock()
            rec = SessionRecord(session_id=sid, client=client, initiator="", path=lun_id,
                                created=now, lease_expires=now + self.config.lease_s,
                                info={"lun": lun_id, "origin": lun.lv.full_name,
                                      "kind": chosen.value, "pid": os.getpid(), "conn": conn})
            self.journal.save(rec)
            with UndoStack() as undo:
                # release undoes what the record names: an intended duplicate's debris too
                undo.push(f"duplicate {name}", self.agent.release, sid)
                res = self.journal.intend(rec, chosen.value, vg=lun.lv.vg, name=name,
                                          origin=lun.lv.name, requested=name)
                plan = self.controller.plan_lv_duplicate(lun.lv, chosen, name)
                started = time.monotonic()
                made = plan.make()
                took_ms = (time.monotonic() - started) * 1000
                dup = plan.complete(made)
                self.journal.done(rec, res, vg=dup.vg, name=dup.name)
                rec.state = "ready"
                rec.info["took_ms"] = round(took_ms, 1)
                self.journal.save(rec)
                undo.commit()
        log.info("client %s: LUN %s (%s) duplicated as %s/%s (%s, %.1f ms)", client, lun_id,
                 lun.lv.full_name, dup.vg, dup.name, dup.kind, took_ms)
        return dup, took_ms

    def _check_slots(self, cl: StorageClient) -> None:
        active = [r for r in self.journal if r.client == cl.name]
        if len(active) >= cl.max_sessions:
            raise ResourceError(f"client {cl.name} already holds {len(active)} duplicate(s) "
                                f"(max_sessions = {cl.max_sessions})",
                                hint="discard one, or raise max_sessions in storage.toml")

    # -- expose ----------------------------------------------------------------
    def expose(self, client: str, dup: WireDuplicate, *, initiator: str, port: str,
               target_iqn: str, backstore: str, serial: str, userid: str, password: str,
               lun: int) -> lio.Export:
        """Export the duplicate read-only on port ``port`` to ``initiator`` alone, with CHAP."""
        cl = self.config.client(client)
        held = self._own(client, dup, "expose")
        if held is None:
            raise RefusedError(f"expose: no duplicate {_shown(dup.name)} on this node")
        if held.resource.state != "created":
            raise RefusedError(f"expose: duplicate {_shown(dup.name)} was never completed")
        rec = held.record
        if not _CHAP_SECRET_RE.fullmatch(password):
            raise UsageError("expose: password must be 12-255 of A-Z a-z 0-9 . _ ~ + / = : @ -")
        # masked from here on, in every log line, result and error (checked first: a
        # one-letter "secret" would mask that letter everywhere)
        self.runner.add_secret(password)
        if initiator not in cl.proxies:
            raise AuthError(f"expose: initiator {_shown(initiator)} is not one client "
                            f"{client} may expose to", hint=f"clients.{client}.proxies")
        found = self.config.ports.get(port)
        if found is None:
            raise RefusedError(f"no port {_shown(port)} on this storage node "
                               f"(ports: {', '.join(sorted(self.config.ports))})")
        if target_iqn not in self._targets_for(client, rec.session_id) or \
                backstore != lio.backstore_name_for(rec.session_id):
            raise RefusedError(
                f"expose: target {_shown(target_iqn)} and backstore {_shown(backstore)} are "
                f"not this duplicate's ({lio.target_iqn_for(rec.session_id)}, "
                f"{lio.backstore_name_for(rec.session_id)})")
        if not valid_iqn(initiator):
            raise UsageError(f"expose: {_shown(initiator)} is not an iSCSI name")
        if isinstance(lun, bool) or not 0 <= lun <= MAX_LUN:
            raise UsageError(f"expose: lun must be between 0 and {MAX_LUN}, not {_shown(lun)}")
        if not _CHAP_USER_RE.fullmatch(userid):
            raise UsageError("expose: userid must be 1-255 of A-Z a-z 0-9 . _ : @ -")
        try:
            serial = str(uuid.UUID(serial))
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"expose: serial {_shown(serial)} is not a UUID") from None
        if any(r.kind in ("lio-target", "lio-backstore") for r in rec.resources):
            raise ResourceError(f"expose: duplicate {_shown(dup.name)} is exposed already",
                                hint="unexpose it first")
        identifier = lio.naa_from_serial(serial)
        if identifier in self.luns.identifiers_in_use():
            # the duplicate would present another disk's identity (a production LUN's)
            raise RefusedError(f"expose: serial {serial} gives identifier {identifier}, which "
                               "a backstore of this node already presents")
        spec = lio.ExportSpec(session_id=rec.session_id, device=held.duplicate.device,
                              target_iqn=target_iqn, initiator_iqn=initiator,
                              portal_ip=found.address, portal_port=found.port,
                              chap_user=userid, chap_secret=password, serial=serial, lun=lun)
        with self._locked():
            bs_res = self.journal.intend(rec, "lio-backstore", name=spec.backstore,
                                         serial=serial)
            tgt_res = self.journal.intend(rec, "lio-target", iqn=spec.target_iqn,
                                          backstore=spec.backstore, initiator=initiator,
                                          port=port, lun=lun)
            with UndoStack() as undo:
                undo.push(f"export {target_iqn}", self._unexport, rec, [tgt_res, bs_res])
                export = self.controller.expose(held.duplicate, spec)
                self.journal.done(rec, bs_res)
                self.journal.done(rec, tgt_res)
                rec.initiator = initiator
                self.journal.save(rec)
                undo.commit()
        log.info("client %s: %s exposed as %s lun %d (%s) on port %s to %s", client,
                 held.duplicate.name, export.target_iqn, export.lun, export.identifier, port,
                 initiator)
        return export

    def _targets_for(self, client: str, sid: str) -> set[str]:
        """The targets a duplicate may be exposed in: its own session's, and for a member of
        a consistency group (``HOST-gN-HEX``), the group's (``HOST-HEX``) when that
        duplicate is this client's too (every member is a LUN of one target)."""
        targets = {lio.target_iqn_for(sid)}
        group = group_session_id(sid)
        if group is not None:
            rec = self.journal.load(group)
            if rec is not None and rec.client == client:
                targets.add(lio.target_iqn_for(group))
        return targets

    def _unexport(self, rec: SessionRecord, resources: list[Resource]) -> list[str]:
        iqn = next((str(r.fields["iqn"]) for r in resources if r.kind == "lio-target"), "")
        bs = next((str(r.fields["name"]) for r in resources if r.kind == "lio-backstore"), "")
        removed = self.controller.unexpose(iqn, bs)
        for res in resources:
            self.journal.forget(rec, res)
        return removed

    # -- identify / health ------------------------------------------------------
    def identify(self, client: str, target_iqn: str, lun: int) -> str:
        rec = self._export_owner("lio-target", "iqn", target_iqn)
        if rec is None:
            raise RefusedError(f"identify: no export {_shown(target_iqn)} on this node")
        if rec.client != client:
            raise AuthError(f"identify: export {_shown(target_iqn)} belongs to another client")
        return self.controller.identify(target_iqn, lun)

    def health(self, client: str, dup: WireDuplicate) -> Health:
        held = self._own(client, dup, "health")
        if held is None:
            return "missing"
        return self.controller.health(held.duplicate)

    # -- release -------------------------------------------------------------
    def unexpose(self, client: str, target_iqn: str, backstore: str) -> list[str]:
        """Remove this client's target and/or backstore (either may be ""). Idempotent."""
        with self._locked():
            picked: dict[str, tuple[SessionRecord, list[Resource]]] = {}
            for kind, key, name in (("lio-target", "iqn", target_iqn),
                                    ("lio-backstore", "name", backstore)):
                if not name:
                    continue
                rec = self._export_owner(kind, key, name)
                if rec is None:
                    if not name.startswith((lio.TARGET_IQN_PREFIX, lio.BACKSTORE_PREFIX)):
                        raise RefusedError(f"unexpose: {_shown(name)} is not sanoffload's: "
                                           "this node touches nothing else")
                    continue  # marked, journaled by no one: already gone
                if rec.client != client:
                    raise AuthError(f"unexpose: {_shown(name)} belongs to another client")
                entry = picked.setdefault(rec.session_id, (rec, []))
                entry[1].extend(r for r in rec.resources
                                if r.kind == kind and r.fields.get(key) == name)
            removed: list[str] = []
            for rec, resources in picked.values():
                removed += self._unexport(rec, resources)
                if not rec.resources:
                    self.journal.remove(rec.session_id)
            return removed

    def discard(self, client: str, dup: WireDuplicate) -> list[str]:
        """Drop the duplicate, and its export first if it still has one. Idempotent."""
        with self._locked():
            held = self._own(client, dup, "discard")
            if held is None:
                return []
            return self.agent.release(held.record.session_id)

    def discard_partial(self, client: str, dup: WireDuplicate) -> list[str]:
        """What an interrupted duplicate may have half made (only while it is intended)."""
        with self._locked():
            held = self._own(client, dup, "discard_partial")
            if held is None or held.resource.state != "intended":
                return []
            return self.controller.discard_partial(held.duplicate)

    def release(self, session_id: str) -> list[str]:
        """Everything the record holds (the connection that made it ended)."""
        return self.agent.release(session_id)

    def owner(self, session_id: str) -> str | None:
        return self.agent.owner(session_id)

    def exposed(self, session_id: str) -> bool:
        """The duplicate is exported: the client's own journal holds it now (a client that
        ends its connection after expose, as a one-shot ``agent prepare`` does, keeps it)."""
        rec = self.journal.load(session_id)
        return rec is not None and any(r.kind == "lio-target" and r.state == "created"
                                       for r in rec.resources)

    # -- cleanup ---------------------------------------------------------------
    def cleanup_client(self, client: str) -> list[str]:
        """What this client's ended connections left: records no live connection holds and
        that were never exposed, and its expired or failed ones."""
        self.config.client(client)
        removed: list[str] = []
        with self._locked():
            now = self.clock()
            for rec in list(self.journal):
                if rec.client != client:
                    continue
                if rec.state == "ready" and now < rec.lease_expires and \
                        (self.held(rec) or self.exposed(rec.session_id)):
                    continue  # in use: by its connection, or exposed (the client's to release)
                if self.held(rec) and rec.state == "preparing":
                    continue  # its connection is making it right now
                removed += self.agent.release(rec.session_id)
        return removed

    def cleanup(self, *, all_sessions: bool = False) -> dict[str, Any]:
        """The node-wide sweep (``storage cleanup``): records whose connection is gone and that
        were never exposed (an exposed one is its client's to release, until its lease ends),
        then the agent's pass (failed and expired records, marked objects no record accounts
        for). ``all_sessions``: everything (at boot: no proxy still holds a LUN of ours)."""
        self.journal.check("storage cleanup")
        released: list[str] = []
        with self._locked():
            now = self.clock()
            for rec in list(self.journal):
                if all_sessions or self.held(rec):
                    continue  # --all: the agent's pass below takes every record
                if rec.state == "ready" and now < rec.lease_expires and \
                        self.exposed(rec.session_id):
                    continue
                self.agent.release(rec.session_id)
                released.append(rec.session_id)
            report = self.agent.cleanup(all_sessions=all_sessions)
        report["released"] = released + list(report["released"])
        return report
