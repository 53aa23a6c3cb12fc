"""``sanoffload key ...``: make, copy and inspect a repository's key file.

Registered in :data:`sanoffload.cli.LAZY_COMMANDS`; errors are the package's
own (the top-level CLI prints them and exits with their code: 15 for a wrong
passphrase or a key of another repository). No command prints a secret, and
none takes a passphrase on the command line (every user can read argv in
/proc): ``--passphrase-file FILE``, ``SANOFFLOAD_PASSPHRASE``, or the terminal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import click

from ..text import printable
from .keys import (
    KDF_NONE,
    NEW_PASSPHRASE_ENV,
    PASSPHRASE_ENV,
    RepoKeys,
    create_key_file,
    export_key,
    get_passphrase,
    import_key,
    key_file_info,
    load_key_file,
    read_passphrase_file,
    write_raw_key_file,
)

_PASSPHRASE_FILE = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False), default=None,
    help=f"Read the passphrase from this file (mode 0600; else {PASSPHRASE_ENV}, else the "
         "terminal).")
_NEW_PASSPHRASE_FILE = click.option(
    "--new-passphrase-file", type=click.Path(dir_okay=False), default=None,
    help=f"The written file's passphrase from this file (else {NEW_PASSPHRASE_ENV}, else the "
         "source's passphrase).")
_CHANGE = click.option("--change-passphrase", is_flag=True,
                       help="Ask for a new passphrase for the written file at the terminal.")


def _source_passphrase(passphrase_file: str | None) -> Callable[[], str]:
    # asked only if the file turns out to be passphrase-protected
    return lambda: get_passphrase(passphrase_file)


def _new_passphrase(new_file: str | None, change: bool, source_is_raw: bool,
                    old: Callable[[], str]) -> str:
    if new_file is not None:
        return read_passphrase_file(new_file)
    if os.environ.get(NEW_PASSPHRASE_ENV):
        return os.environ[NEW_PASSPHRASE_ENV]
    if change or source_is_raw:
        return get_passphrase(None, env_var=NEW_PASSPHRASE_ENV, confirm=True,
                              prompt="New passphrase: ", option="--new-passphrase-file",
                              environ={})
    return old()


@click.group("key")
def key() -> None:
    """Repository keys: the secrets that encrypt and name a repository's objects.

    Keep a copy of the key file (and its passphrase) away from the repository:
    without it no backup in the repository can be read, by anyone.

    \b
    Examples:
      sanoffload key init /etc/sanoffload/repo.key
      sanoffload key export /etc/sanoffload/repo.key /media/usb/repo.key
      sanoffload key import --raw /media/usb/repo.key /etc/sanoffload/repo.key   # unattended
      sanoffload key show /etc/sanoffload/repo.key
    """


@key.command("init")
@click.argument("keyfile", type=click.Path(dir_okay=False))
@_PASSPHRASE_FILE
@click.option("--raw", is_flag=True,
              help="Write the keys unwrapped (no passphrase), for an unattended proxy: the file "
                   "alone is the key, guard it like one.")
def init(keyfile: str, passphrase_file: str | None, raw: bool) -> None:
    """Make new random keys for a new repository in KEYFILE (mode 0600; never replaced).

    \b
    Example:
      sanoffload key init --passphrase-file /root/.repo-pass /etc/sanoffload/repo.key
    """
    if raw:
        keys = RepoKeys.generate()
        write_raw_key_file(keyfile, keys)
    else:
        keys = create_key_file(keyfile, get_passphrase(passphrase_file, confirm=True))
    click.echo(f"created key file {printable(keyfile)} for repository {keys.repo_id_hex}; keep "
               "a copy elsewhere: sanoffload key export KEYFILE DEST")


def _asked_once(passphrase_file: str | None) -> Callable[[], str]:
    """The source key file's passphrase, asked for (or read) at most once: it may be needed
    to open the source and again as the copy's passphrase."""
    asked: list[str] = []

    def get() -> str:
        if not asked:
            asked.append(get_passphrase(passphrase_file))
        return asked[0]

    return get


@key.command("export")
@click.argument("keyfile", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
@_PASSPHRASE_FILE
@_NEW_PASSPHRASE_FILE
@_CHANGE
def export(keyfile: str, dest: str, passphrase_file: str | None,
           new_passphrase_file: str | None, change_passphrase: bool) -> None:
    """Write a passphrase-protected copy of KEYFILE's keys to DEST, to keep offline.

    DEST gets the same passphrase as KEYFILE unless told otherwise (a raw
    KEYFILE always needs a new one).

    \b
    Example:
      sanoffload key export /etc/sanoffload/repo.key /media/usb/repo.key --change-passphrase
    """
    source_is_raw = key_file_info(keyfile).kdf == KDF_NONE
    old = _asked_once(passphrase_file)
    keys = load_key_file(keyfile, old)
    export_key(keys, dest, _new_passphrase(new_passphrase_file, change_passphrase,
                                           source_is_raw, old))
    click.echo(f"exported the key of repository {keys.repo_id_hex} to {printable(dest)}")


@key.command("import")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
@_PASSPHRASE_FILE
@_NEW_PASSPHRASE_FILE
@_CHANGE
@click.option("--raw", is_flag=True,
              help="Install the keys unwrapped (no passphrase), for an unattended proxy.")
@click.option("--repo-id", default=None, metavar="ID",
              help="Refuse a key of any other repository (32 hex digits).")
def import_(src: str, dest: str, passphrase_file: str | None, new_passphrase_file: str | None,
            change_passphrase: bool, raw: bool, repo_id: str | None) -> None:
    """Install the key in SRC (an exported copy) at DEST on this host (mode 0600).

    \b
    Examples:
      sanoffload key import /media/usb/repo.key /etc/sanoffload/repo.key
      sanoffload key import --raw --passphrase-file /root/p /media/usb/repo.key \\
          /etc/sanoffload/repo.key
    """
    source_is_raw = key_file_info(src).kdf == KDF_NONE
    old = _asked_once(passphrase_file)
    new: str | None = None
    if not raw and (new_passphrase_file is not None or change_passphrase or source_is_raw
                    or os.environ.get(NEW_PASSPHRASE_ENV)):
        new = _new_passphrase(new_passphrase_file, change_passphrase, source_is_raw, old)
    keys = import_key(src, old, dest, new_passphrase=new, raw=raw, expected_repo_id=repo_id)
    how = "unwrapped (raw)" if raw else "passphrase-protected"
    click.echo(f"installed the key of repository {keys.repo_id_hex} at {printable(dest)} "
               f"({how})")


@key.command("show")
@click.argument("keyfile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object: path, repo_id, kdf (n, r, p), created.")
@click.option("--check", is_flag=True, help="Also check the passphrase (exit 15 if wrong).")
@_PASSPHRASE_FILE
def show(keyfile: str, as_json: bool, check: bool, passphrase_file: str | None) -> None:
    """Print what KEYFILE says about itself: repository id, kdf, creation time; never a secret.

    Without --check nothing is authenticated: the fields are as the file states them.

    \b
    Example:
      sanoffload key show --check /etc/sanoffload/repo.key
    """
    info = key_file_info(keyfile)
    if check:
        load_key_file(keyfile, _source_passphrase(passphrase_file))
    data = info.to_dict()
    data["checked"] = check
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    kdf = info.kdf if info.kdf == KDF_NONE else f"{info.kdf} n={info.n} r={info.r} p={info.p}"
    click.echo(f"key file    {printable(info.path)}\n"
               f"repository  {info.repo_id}\n"
               f"kdf         {kdf}{' (raw: no passphrase)' if info.kdf == KDF_NONE else ''}\n"
               f"created     {printable(info.created) or '-'}\n"
               f"checked     {'yes: the passphrase opens it' if check else 'no (--check)'}")
