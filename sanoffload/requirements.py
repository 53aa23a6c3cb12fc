"""What a tool wrapper needs on a host, declared beside the code that needs it.

Each wrapper module in ``sanoffload/tools/`` has a module-level ``REQUIRES``,
a tuple of :class:`Requirement`: the executables it runs through the runner,
the kernel features and Python modules it uses, and the host roles whose code
calls it. ``sanoffload doctor`` builds its checks from these declarations
(:func:`sanoffload.doctor.requirements_for`), so it cannot ask for a tool the
code never runs, nor miss one it does (tests/unit/test_doctor.py checks every
argv the package builds against them).

This module imports nothing of sanoffload's but the role names: every wrapper
imports it, and doctor must load even where a wrapper's own dependency is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the host roles ``sanoffload doctor --role`` knows
ROLES: tuple[str, ...] = ("agent", "proxy", "store", "storage")

#: kernel and system features doctor can probe (names of its checks)
KERNEL_FEATURES: tuple[str, ...] = ("device-mapper", "configfs", "LIO", "iscsi_target_mod",
                                    "SCSI", "iscsi_tcp", "iscsid", "udev")


@dataclass(frozen=True)
class Requirement:
    """One need of a wrapper: one doctor check per executable group, feature and module."""

    #: the doctor check for the executables (e.g. "lvm", "fsfreeze")
    name: str
    #: what the check looks for, for the table ("LVM tools (lvs, lvcreate, ...)")
    what: str
    #: roles whose code calls the wrapper
    roles: tuple[str, ...]
    #: one line: what fails without it
    fails_without: str
    executables: tuple[str, ...] = ()
    #: names from :data:`KERNEL_FEATURES`
    kernel: tuple[str, ...] = ()
    #: importable Python modules
    python: tuple[str, ...] = ()
    #: roles that work (with less) without it: a warning there, not a failure
    optional_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a typo here would silently drop a check from doctor
        unknown = [r for r in (*self.roles, *self.optional_for) if r not in ROLES]
        unknown += [k for k in self.kernel if k not in KERNEL_FEATURES]
        if unknown:
            raise ValueError(f"requirement {self.name}: unknown role or feature "
                             f"{', '.join(unknown)}")
        if "\n" in self.fails_without:
            raise ValueError(f"requirement {self.name}: fails_without must be one line")
