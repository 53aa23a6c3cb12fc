"""The values with a fixed set of members, one enum each, checked once at the edge.

A duplicate kind, who freezes, an object kind and a backup mode arrive as text (the agent's
config, the command line, the control channel, a job file, a manifest) and are
turned into a member by ``parse`` where they arrive; past that edge the code
holds members. A value that is not a member is always the same error:
:class:`~sanoffload.errors.UsageError` (exit 2) listing the valid values.

The members are ``str`` (StrEnum): on the wire, in JSON and in the journal
they are the same strings as before, so peers of an older version and
existing records read the same.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Self

from .errors import UsageError
from .text import printable

#: how much of a bad value an error message repeats (it came from elsewhere)
_SHOWN = 60


class Choice(StrEnum):
    """Base of sanoffload's enums: ``parse`` text into a member, ``values`` for help texts."""

    @classmethod
    def label(cls) -> str:
        """What a member is called in messages: the class name's words ("duplicate kind")."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", cls.__name__).lower()

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, text: Any, *, where: str = "") -> Self:
        """The member whose value is ``text``; UsageError (exit 2) naming the valid values.

        ``where`` (a config key, an option, an op) prefixes the message.
        """
        if isinstance(text, cls):
            return text
        if isinstance(text, str):
            try:
                return cls(text)
            except ValueError:
                pass
        shown = printable(repr(text))
        if len(shown) > _SHOWN:
            shown = shown[:_SHOWN] + "…"
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}unknown {cls.label()} {shown} "
                         f"(one of: {', '.join(cls.values())})")


class DuplicateKind(Choice):
    """How the duplicate of a volume is made."""

    SNAPSHOT = "snapshot"
    THIN_SNAPSHOT = "thin-snapshot"
    RAID1_SPLIT = "raid1-split"
    MIRROR_SPLIT = "mirror-split"

    @property
    def is_snapshot(self) -> bool:
        """Copy-on-write (classic or thin), as opposed to a split-off mirror image."""
        return self in (DuplicateKind.SNAPSHOT, DuplicateKind.THIN_SNAPSHOT)


class FreezeMode(Choice):
    """The agent config's ``freeze``: who should inhibit writes while the duplicate is made."""

    #: fsfreeze where the kernel nests it with LVM's suspend (>= 6.6), else LVM's suspend
    AUTO = "auto"
    FSFREEZE = "fsfreeze"
    LVM = "lvm"


class WhoFreezes(Choice):
    """Who actually inhibits writes for one duplicate (a FreezeMode with ``auto`` decided)."""

    FSFREEZE = "fsfreeze"
    LVM = "lvm"

    @classmethod
    def label(cls) -> str:
        return "freezer"


class BackupMode(Choice):
    """What a backup stores: an archive of the files, or the volume's blocks."""

    TAR = "tar"
    IMAGE = "image"


class ObjectKind(Choice):
    """What a backup object is."""

    DIRECTORY = "directory"
    FILE = "file"


class VerifyMode(Choice):
    """How a backup makes sure the stored archive is what tar read from the duplicate.

    * ``stream`` (the default): checked while it flows, nothing read twice.
      zstd's frame checksum covers what tar wrote, the proxy's sha256 covers
      what it sent; the store decodes every byte it receives (checksums
      included) and matches the sha256 before it publishes.
    * ``full``: ``stream``, then ``tar --diff`` of the stored archive against
      the still-attached duplicate: the archive comes back over the network and
      the duplicate is read a second time (the old default; about twice the time).
    * ``none``: only the store's own checks on receipt.
    """

    STREAM = "stream"
    FULL = "full"
    NONE = "none"

    @classmethod
    def of(cls, value: Any, *, where: str = "") -> VerifyMode:
        """A mode from a mode, its name, or the boolean of older job files and callers
        (true meant the comparison with the duplicate: ``full``; false: ``none``)."""
        if isinstance(value, bool):
            return cls.FULL if value else cls.NONE
        return cls.parse(value, where=where)
