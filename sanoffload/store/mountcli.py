"""``sanoffload mount ID DIR`` and ``sanoffload umount DIR``: single files from an image backup.

Registered in :data:`sanoffload.cli.LAZY_COMMANDS`; errors are the package's
own (the top-level CLI prints them and exits with their code).
"""

from __future__ import annotations

import click

from ..cli import App, pass_app
from ..errors import UsageError
from ..text import printable
from .mount import MOUNTS_ROOT, mount_image, umount_image
from .repo import Repository


@click.command("mount")
@click.argument("backup_id")
@click.argument("target", type=click.Path())
@click.option("--repo", "repo_dir", envvar="SANOFFLOAD_REPO", default=None, metavar="DIR",
              help="The repository directory (or SANOFFLOAD_REPO).")
@pass_app
def mount(app: App, backup_id: str, target: str, repo_dir: str | None) -> None:
    """Mount image backup BACKUP_ID's filesystem read-only at TARGET (an empty directory).

    Every read is checked against the chunks' sha256 (a damaged chunk reads as an
    I/O error, never as other bytes). Undo with 'sanoffload umount TARGET'.

    \b
    Example:
      sanoffload mount --repo /srv/backup fs1/srv-thin-3f2a9c1e/20261201T101010Z /mnt/old
      cp /mnt/old/etc/app.conf /tmp/ && sanoffload umount /mnt/old
    """
    if not repo_dir:
        raise UsageError("no repository: give --repo DIR (or set SANOFFLOAD_REPO)")
    runner = app.get_runner()
    state = mount_image(Repository(repo_dir, runner), backup_id, target, runner=runner)
    click.echo(f"mounted {printable(state.backup)} ({state.fstype}, read-only) at "
               f"{printable(state.target)}; undo with: sanoffload umount "
               f"{printable(state.target)}")


@click.command("umount")
@click.argument("target", type=click.Path())
@pass_app
def umount(app: App, target: str) -> None:
    """Unmount an image backup mounted by 'sanoffload mount' at TARGET, and undo the rest
    (loop device, FUSE file, its server), going on past errors.

    \b
    Example:
      sanoffload umount /mnt/old
    """
    state = umount_image(target, runner=app.get_runner(), root=MOUNTS_ROOT)
    click.echo(f"unmounted {printable(state.backup)} from {printable(state.target)}")
