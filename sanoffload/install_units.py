"""``sanoffload install-units``: copy the shipped systemd units into place.

A plain file copy: it never runs systemctl (enabling timers is the
administrator's decision, and the README documents the step).  Every file is
checked before any is written, so a refusal changes nothing; each file is
written atomically (a temporary file in the same directory, then rename).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import click

from .errors import UsageError
from .units import unit_files

DEFAULT_DEST = "/etc/systemd/system"
UNIT_MODE = 0o644

#: role -> the unit files it installs
ROLE_UNITS: dict[str, tuple[str, ...]] = {
    "agent": ("sanoffload-cleanup.service", "sanoffload-lease.service",
              "sanoffload-lease.timer"),
    "proxy": ("sanoffload-backup@.service", "sanoffload-backup@.timer",
              "sanoffload-proxy-cleanup.service"),
    "storage": ("sanoffload-storage-cleanup.service", "sanoffload-storage-lease.service",
                "sanoffload-storage-lease.timer"),
}
ROLES = (*ROLE_UNITS, "all")

#: role -> where and how to enable what was installed
NEXT_STEPS: dict[str, str] = {
    "agent": "next, on the first server: systemctl daemon-reload && "
             "systemctl enable --now sanoffload-cleanup.service sanoffload-lease.timer",
    "proxy": "next, on the proxy: systemctl daemon-reload && "
             "systemctl enable sanoffload-proxy-cleanup.service && "
             "systemctl enable --now sanoffload-backup@JOB.timer "
             "(one per /etc/sanoffload/jobs/JOB.toml)",
    "storage": "next, on the storage node: systemctl daemon-reload && "
               "systemctl enable --now sanoffload-storage-cleanup.service "
               "sanoffload-storage-lease.timer",
}


@dataclass(frozen=True)
class Step:
    """What to do with one unit file: ``write`` (new), ``replace`` or ``unchanged``."""

    name: str
    path: str
    action: str
    text: str


def units_for(role: str) -> dict[str, str]:
    """The unit files ``role`` installs (``all``: every one): name -> text."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    shipped = unit_files()
    roles = tuple(ROLE_UNITS) if role == "all" else (role,)
    names = [n for r in roles for n in ROLE_UNITS[r]]
    missing = [n for n in names if n not in shipped]
    if missing:
        # a broken installation (package data left out), not the user's mistake
        raise UsageError(f"unit file(s) missing from the sanoffload package: "
                         f"{', '.join(missing)}", hint="reinstall sanoffload")
    return {n: shipped[n] for n in names}


def _existing(path: str) -> bytes | str | None:
    """The file's bytes, None when absent, or why it is no plain file (a str)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot inspect: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        # a link to /dev/null is how systemctl masks a unit
        masked = " (the unit is masked)" if target == os.devnull else ""
        return f"is a symlink to {target}{masked}"
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: exists and is not a regular file; remove it first")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


def plan(units: Mapping[str, str], dest: str, *, force: bool = False) -> list[Step]:
    """Decide every file's action; without ``force`` refuse (naming them all) any that differ."""
    if not os.path.isdir(dest):
        # a typo must not create a directory systemd never reads
        raise UsageError(f"{dest}: no such directory")
    steps: list[Step] = []
    differing: list[str] = []
    for name, text in units.items():
        path = os.path.join(dest, name)
        current = _existing(path)
        if current is None:
            steps.append(Step(name, path, "write", text))
        elif current == text.encode("utf-8"):
            steps.append(Step(name, path, "unchanged", text))
        else:
            differing.append(f"{path} ({current})" if isinstance(current, str) else path)
            steps.append(Step(name, path, "replace", text))
    if differing and not force:
        raise UsageError(f"refusing to replace {len(differing)} unit file(s) that differ "
                         f"from sanoffload's: {', '.join(differing)}; nothing was written",
                         hint="compare them, then rerun with --force to replace them")
    return steps


def write_atomic(path: str, text: str, mode: int = UNIT_MODE) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new, never half."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            # mkstemp makes 0600; units are world-readable like the rest of /etc/systemd
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # the rename itself must survive a crash too
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def apply(step: Step) -> None:
    """Carry out ``step`` (nothing for ``unchanged``)."""
    if step.action == "unchanged":
        return
    try:
        write_atomic(step.path, step.text)
    except OSError as exc:
        hint = "run as root" if isinstance(exc, PermissionError) else None
        raise UsageError(f"{step.path}: cannot write: {exc.strerror or exc}",
                         hint=hint) from None


def describe(step: Step, dry_run: bool) -> str:
    """The line printed for ``step``."""
    if step.action == "unchanged":
        return f"unchanged    {step.path}"
    verb = "would write" if dry_run else "written"
    extra = " (replaces a different file)" if step.action == "replace" else ""
    return f"{verb:<12} {step.path}{extra}"


@click.command("install-units")
@click.option("--dest", default=DEFAULT_DEST, show_default=True,
              type=click.Path(file_okay=False), help="Directory to write the unit files to.")
@click.option("--role", type=click.Choice(ROLES), default="all", show_default=True,
              help="agent: boot cleanup and lease timer (first server); "
                   "proxy: the per-job backup service and timer, boot-time cleanup; "
                   "storage: boot-time cleanup (storage node, SAN mode).")
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.option("--force", is_flag=True,
              help="Replace unit files that differ from sanoffload's (else refused).")
def install_units(dest: str, role: str, dry_run: bool, force: bool) -> None:
    """Install sanoffload's systemd units (it does not run systemctl).

    Files identical to sanoffload's are left alone; a different one is
    refused, and then nothing is written, unless --force is given.

    \b
    Examples:
      sanoffload install-units --role agent      # on the first server
      sanoffload install-units --role proxy      # on the backup proxy
      sanoffload install-units --role storage    # on a storage node (SAN mode)
      sanoffload install-units --dry-run --dest /tmp/units
    """
    steps = plan(units_for(role), dest, force=force)
    for step in steps:
        if not dry_run:
            apply(step)
        # one line as each file is done, so a failure later still shows what was written
        click.echo(describe(step, dry_run))
    for r in (tuple(ROLE_UNITS) if role == "all" else (role,)):
        click.echo(NEXT_STEPS[r])
