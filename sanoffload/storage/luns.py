"""Which LV backs a LUN: from the identifier the first server sees to a logical volume here.

The first server names a disk by the identifier its udev reports
(``/sys/block/sdX/device/wwid``: ``naa.6001405…``); this node exports that
disk from a LIO block backstore whose unit serial the identifier is derived
from (see :mod:`sanoffload.tools.lio`). So the map goes, reading only::

    identifier --(LIO: every block backstore's identifier, from its serial)--> backstore
    backstore.udev_path --(stat: st_rdev, a block device)--> major:minor
    major:minor --(lvs --select lv_kernel_major/minor)--> the LV

never by a backstore's name or by guessing a path from the identifier: an
admin's names prove nothing, and ``/dev/VG/LV`` may be a symlink to anything.
A refusal (:class:`~sanoffload.errors.RefusedError`, exit 3) changes nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import RefusedError
from ..runner import Runner
from ..text import printable
from ..tools import lio, lvm
from ..tools.lvm import LogicalVolume
from .config import IDENTIFIER_RE, StorageClient


@dataclass(frozen=True)
class Lun:
    """A LUN this node exports, and the LV behind it."""

    identifier: str
    #: LIO's name of its backstore (for messages: it decides nothing)
    backstore: str
    #: the backstore's udev_path
    device: str
    lv: LogicalVolume


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # older kernels have no company_id attribute; a test's object no path
        return None


class LunMap:
    """Reads LIO's backstores and LVM to map identifiers to LVs (never changes anything)."""

    def __init__(self, runner: Runner, exporter: lio.LioExporter, *,
                 stat_fn: Callable[[str], os.stat_result] = os.stat) -> None:
        self.runner = runner
        self.exporter = exporter
        self.stat = stat_fn

    def _block_backstores(self) -> list[tuple[str, Any]]:
        """``(identifier, storage object)`` of every block backstore LIO has."""
        return self.exporter.block_backstores()

    def identifiers_in_use(self) -> set[str]:
        """Every identifier a block backstore here presents (a new export must not repeat one)."""
        return {ident for ident, _so in self._block_backstores()}

    def resolve(self, identifier: str, client: StorageClient) -> Lun:
        """The LUN ``identifier`` for ``client``; RefusedError (exit 3) says why not.

        The client's list is checked first: a client learns nothing about LUNs
        it may not duplicate, not even whether they exist.
        """
        shown = printable(identifier)[:80]
        if not IDENTIFIER_RE.fullmatch(identifier):
            raise RefusedError(f"{shown!r} is not a LUN identifier (naa. and 16 or 32 "
                               "lowercase hex digits)")
        if identifier not in client.luns:
            raise RefusedError(f"LUN {identifier} is not one client {client.name} may duplicate",
                               hint=f"list it in clients.{client.name}.luns of storage.toml")
        matches = [so for ident, so in self._block_backstores() if ident == identifier]
        if not matches:
            raise RefusedError(f"no block backstore of this node presents {identifier}")
        if len(matches) > 1:
            names = ", ".join(sorted(printable(str(so.name)) for so in matches))
            raise RefusedError(f"{identifier} is presented by several backstores ({names}): "
                               "which one the first server writes to is ambiguous")
        so = matches[0]
        name = printable(str(so.name))
        if str(so.name).startswith(lio.BACKSTORE_PREFIX):
            raise RefusedError(f"LUN {identifier} is backstore {name}, a duplicate of ours")
        device = str(so.udev_path)
        shown_dev = printable(device)
        try:
            st = self.stat(device)
        except OSError as exc:
            raise RefusedError(f"LUN {identifier}: its backstore {name} is on {shown_dev}, "
                               f"which cannot be examined: {exc.strerror or exc}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise RefusedError(f"LUN {identifier}: its backstore {name} is on {shown_dev}, "
                               "not a block device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        lv = lvm.find_lv_by_devno(self.runner, major, minor)
        if lv is None:
            raise RefusedError(f"LUN {identifier} is backed by {shown_dev} ({major}:{minor}), "
                               "not a logical volume: this node can only duplicate LVs")
        return Lun(identifier, str(so.name), device, lv)
