"""LIO, the kernel's iSCSI target, driven through rtslib-fb objects.

sanoffload never parses targetcli output; it builds configfs objects with
rtslib-fb. What one export builds, as an operator sees it in ``targetcli ls``::

    /backstores/block/sanoffload-SID      read-only, on the duplicate, unit serial UUID
    /iscsi/iqn.2026-11.org.sanoffload:HOST.SID/tpg1
        portals/ADDRESS:3260
        luns/lun0                         -> the backstore
        acls/PROXY-INITIATOR-IQN          CHAP user/secret; mapped_lun0 write-protected

Everything carries sanoffload's mark, so a cleanup pass can find what a
crash left behind. LIO objects cannot be tagged, so the mark is the name, and
:meth:`LioExporter.ours` takes only what no one else would make: a target named
``TARGET_IQN_PREFIX`` + a session id (a naming authority of ours), and a
read-only block backstore named ``sanoffload-`` + a session id that serves no
LUN of anyone else's target (deleting a backstore deletes its LUNs).

Every rtslib-fb exception (``RTSLibError``, ``RTSLibNotInCFSError``) and every
OSError from configfs becomes a :class:`~sanoffload.errors.LioError` (exit 5)
in one place, :meth:`LioExporter._lio`, so none reaches the proxy as "a bug".

The identifier the proxy's udev shows (``/sys/block/sdX/device/wwid``,
``/dev/disk/by-id/wwn-0x…``) is LIO's NAA designator, which LIO derives from
the unit serial: ``naa.`` + ``6`` + IEEE company id ``001405`` + the first 25
hex digits of the serial. rtslib's ``wwn`` attribute is that serial, not the
identifier. :meth:`LioExporter.identify` asks LIO, through the target port
group, what the LUN presents, and checks it against the derivation.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from ..errors import LioError, MissingDependencyError, ResourceError
from ..iqn import valid_iqn
from ..requirements import Requirement

log = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = (
    Requirement("rtslib_fb", "Python module rtslib_fb (drives LIO)", roles=("agent", "storage"),
                fails_without="the duplicate cannot be exported as an iSCSI target",
                python=("rtslib_fb",), kernel=("configfs", "LIO", "iscsi_target_mod", "SCSI")),
)

TARGET_IQN_PREFIX = "iqn.2026-11.org.sanoffload:"
BACKSTORE_PREFIX = "sanoffload-"
LIO_IEEE_COMPANY_ID = "001405"
#: a session id as the agent makes them (``HOST-8HEX``, see agent.session.new_session_id)
_SESSION_RE = r"[a-z0-9][a-z0-9-]{0,40}-[0-9a-f]{8}"
_OUR_TARGET_RE = re.compile(re.escape(TARGET_IQN_PREFIX) + _SESSION_RE)
_OUR_BACKSTORE_RE = re.compile(re.escape(BACKSTORE_PREFIX) + _SESSION_RE)


def naa_from_serial(serial: str) -> str:
    """The NAA identifier LIO presents for a unit serial (VPD page 0x83)."""
    digits = re.sub(r"[^0-9a-f]", "", serial.lower())
    if len(digits) < 25:
        raise ValueError(f"unit serial {serial!r} has fewer than 25 hex digits")
    return f"naa.6{LIO_IEEE_COMPANY_ID}{digits[:25]}"


def new_serial() -> str:
    """A fresh unit serial; the caller journals it before the export exists."""
    return str(uuid.uuid4())


def target_iqn_for(session_id: str) -> str:
    """The per-session target name, under sanoffload's prefix (the id names the host)."""
    name = f"{TARGET_IQN_PREFIX}{session_id.lower()}"
    if not valid_iqn(name):
        raise ValueError(f"cannot build a valid IQN from session {session_id!r}")
    return name


def backstore_name_for(session_id: str) -> str:
    return f"{BACKSTORE_PREFIX}{session_id}"


@dataclass(frozen=True)
class ExportSpec:
    """What to export, to whom. ``serial`` is chosen (and journaled) by the caller."""

    session_id: str
    device: str
    target_iqn: str
    initiator_iqn: str
    portal_ip: str
    chap_user: str
    chap_secret: str
    serial: str
    portal_port: int = 3260
    lun: int = 0
    #: SAN mode: the storage node's port ID to expose on (its portal, not ours)
    port: str = ""

    @property
    def backstore(self) -> str:
        return backstore_name_for(self.session_id)


@dataclass(frozen=True)
class Export:
    """What the proxy needs to reach the LUN (the CHAP secret is handed over separately)."""

    target_iqn: str
    portal_ip: str
    portal_port: int
    lun: int
    serial: str
    identifier: str
    backstore: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_configfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # older kernels have no company_id attribute
        return None


def identifier_of(so: Any) -> str:
    """The identifier LIO presents for storage object ``so`` (its VPD page 0x83 NAA
    designator): LIO's own company id and the serial's hex digits, as the initiator sees it."""
    company = _read_configfs(f"{so.path}/wwn/company_id")
    if company:
        company = company.strip().lower().removeprefix("0x").rjust(6, "0")
        digits = re.sub(r"[^0-9a-f]", "", str(so.wwn).lower())
        return f"naa.6{company}{digits[:25]}"
    return naa_from_serial(str(so.wwn))


class LioExporter:
    """Export, identify and unexport duplicates through LIO (one instance per process)."""

    def __init__(self, rtslib: ModuleType | None = None) -> None:
        if rtslib is None:
            try:
                # by name: rtslib-fb has no types, so a plain import would make the module Any
                rtslib = importlib.import_module("rtslib_fb")
            except ImportError as exc:
                raise MissingDependencyError(
                    "rtslib-fb is not installed: cannot drive LIO",
                    hint="apt install python3-rtslib-fb (or pip install rtslib-fb)") from exc
        self.rts: ModuleType = rtslib

    # -- lookups ---------------------------------------------------------------
    def _root(self) -> Any:
        try:
            with warnings.catch_warnings():
                # "Cannot set dbroot ...": harmless once target_core_mod is loaded at boot
                warnings.simplefilter("ignore", UserWarning)
                return self.rts.RTSRoot()
        except Exception as exc:  # rtslib raises RTSLibError or OSError without configfs/LIO
            raise MissingDependencyError(f"LIO is not available: {exc}",
                                         hint="sanoffload doctor --role agent") from exc

    def _find_target(self, root: Any, iqn: str) -> Any | None:
        return next((t for t in root.targets if t.wwn == iqn), None)

    def _find_backstore(self, root: Any, name: str) -> Any | None:
        return next((so for so in root.storage_objects if so.name == name), None)

    @contextlib.contextmanager
    def _lio(self, what: str) -> Iterator[None]:
        """rtslib's and configfs's exceptions, as our own error naming what was being done."""
        caught: tuple[type[BaseException], ...] = (OSError,)
        rts_error = getattr(self.rts, "RTSLibError", None)  # RTSLibNotInCFSError is one too
        if isinstance(rts_error, type) and issubclass(rts_error, Exception):
            caught += (rts_error,)
        try:
            yield
        except caught as exc:
            raise LioError(f"LIO: {what}: {type(exc).__name__}: {exc}") from exc

    def ours(self) -> dict[str, list[str]]:
        """sanoffload's objects in LIO, by their marks (see the module's docstring)."""
        root = self._root()
        with self._lio("listing objects"):
            targets = [t.wwn for t in root.targets if _OUR_TARGET_RE.fullmatch(t.wwn)]
            backstores = [so.name for so in root.storage_objects if self._is_ours(so, targets)]
        return {"targets": targets, "backstores": backstores}

    @staticmethod
    def _is_ours(so: Any, our_targets: list[str]) -> bool:
        if not _OUR_BACKSTORE_RE.fullmatch(so.name) or so.plugin != "block":
            return False
        if not so.readonly:
            return False  # ours are always read-only: a writable one is someone else's
        # so.delete() takes the LUNs it serves with it: never another target's
        return all(lun.parent_tpg.parent_target.wwn in our_targets for lun in so.attached_luns)

    # -- export ----------------------------------------------------------------
    def export(self, spec: ExportSpec) -> Export:
        """Build (or find, if it exists) the export described by ``spec``.

        Idempotent: an existing backstore of the same name must sit on the same
        device with the same serial, else ResourceError (a conflicting object).
        """
        if not valid_iqn(spec.initiator_iqn):
            raise ValueError(f"invalid initiator IQN {spec.initiator_iqn!r}")
        with self._lio(f"exporting {spec.device} as {spec.target_iqn}"):
            return self._export(spec)

    def _export(self, spec: ExportSpec) -> Export:
        r = self.rts
        root = self._root()
        so = self._find_backstore(root, spec.backstore)
        if so is None:
            so = r.BlockStorageObject(spec.backstore, dev=spec.device, wwn=spec.serial,
                                      readonly=True)
        elif so.udev_path != spec.device or so.wwn != spec.serial:
            raise ResourceError(f"LIO backstore {spec.backstore} exists on {so.udev_path} "
                                f"(serial {so.wwn}), not on {spec.device}")
        tgt = r.Target(r.FabricModule("iscsi"), spec.target_iqn)
        tpg = r.TPG(tgt, 1)
        # only the ACL below may log in, and only with the session's CHAP secret
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("demo_mode_write_protect", "1")
        tpg.set_attribute("authentication", "1")
        r.NetworkPortal(tpg, spec.portal_ip, spec.portal_port)
        lun = next((ln for ln in tpg.luns if ln.lun == spec.lun), None)
        if lun is None:
            lun = r.LUN(tpg, spec.lun, so)
        acl = r.NodeACL(tpg, spec.initiator_iqn)
        acl.chap_userid = spec.chap_user
        acl.chap_password = spec.chap_secret
        if not any(m.mapped_lun == spec.lun for m in acl.mapped_luns):
            r.MappedLUN(acl, spec.lun, lun, write_protect=True)
        tpg.enable = True
        identifier = self.identify(spec.target_iqn, spec.lun)
        log.info("exported %s as %s lun %d (%s) to %s", spec.device, spec.target_iqn,
                 spec.lun, identifier, spec.initiator_iqn)
        return Export(spec.target_iqn, spec.portal_ip, spec.portal_port, spec.lun, spec.serial,
                      identifier, spec.backstore)

    def identify(self, target_iqn: str, lun: int = 0) -> str:
        """Ask LIO which identifier the LUN presents through the target's port group.

        Reads the storage object behind the TPG's LUN and its VPD unit serial
        from configfs, and returns the NAA designator the initiator will see.
        """
        with self._lio(f"identifying {target_iqn} lun {lun}"):
            return self._identify(target_iqn, lun)

    def _identify(self, target_iqn: str, lun: int) -> str:
        root = self._root()
        tgt = self._find_target(root, target_iqn)
        if tgt is None:
            raise LioError(f"LIO has no target {target_iqn}")
        tpg = next(iter(tgt.tpgs), None)
        entry = next((ln for ln in tpg.luns if ln.lun == lun), None) if tpg else None
        if entry is None:
            raise LioError(f"LIO target {target_iqn} has no LUN {lun}")
        return identifier_of(entry.storage_object)

    def block_backstores(self) -> list[tuple[str, Any]]:
        """``(identifier, storage object)`` of every block backstore LIO has (a storage node
        finds the LV behind a LUN by it); a serial LIO derives no identifier from is skipped."""
        with self._lio("listing backstores"):
            found = []
            for so in self._root().storage_objects:
                if so.plugin != "block":
                    continue
                try:
                    found.append((identifier_of(so), so))
                except ValueError:
                    continue
            return found

    # -- unexport --------------------------------------------------------------
    def unexport(self, target_iqn: str, backstore: str) -> list[str]:
        """Remove the target (with its LUNs, ACLs, portals) and the backstore.

        Idempotent: what is already gone is not an error. Returns what it removed.
        """
        with self._lio(f"removing {target_iqn or 'no target'} and "
                       f"{backstore or 'no backstore'}"):
            return self._unexport(target_iqn, backstore)

    def _unexport(self, target_iqn: str, backstore: str) -> list[str]:
        removed: list[str] = []
        root = self._root()
        tgt = self._find_target(root, target_iqn)
        if tgt is not None:
            tgt.delete()
            removed.append(f"target {target_iqn}")
        so = self._find_backstore(root, backstore)
        if so is not None:
            so.delete()
            removed.append(f"backstore {backstore}")
        return removed
