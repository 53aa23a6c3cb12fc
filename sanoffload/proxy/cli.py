"""The proxy's commands: ``sanoffload backup``, ``list``, ``verify``, ``restore``, ``prune``,
``proxy cleanup``.

``--store`` is ``HOST:/PATH`` (a backup server, over ssh to its forced
``store serve`` command), a local ``/PATH`` (a repository on this host), or
``s3://BUCKET/PREFIX[?profile=NAME]`` (S3 object storage, opened in this process
through :mod:`sanoffload.store.open` with a profile of ``/etc/sanoffload/s3.toml``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import click

from ..channel.client import DEFAULT_CONNECTION_S
from ..cli import App, pass_app
from ..errors import CompletedWithWarnings, IntegrityError, RefusedError, UsageError
from ..kinds import DuplicateKind, VerifyMode
from ..store.cli import format_backups
from ..text import printable
from .offhost import Location, Progress, parse_location, store_connector

STORE_HELP = ("The repository: HOST:/PATH (a backup server, over ssh), a local /PATH, or "
              "s3://BUCKET/PREFIX[?profile=NAME] (a profile of /etc/sanoffload/s3.toml).")


def _ssh_options(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        if "\n" in v or "\0" in v:
            raise UsageError(f"invalid ssh option {v!r}")
        out += ["-o", v]
    return tuple(out)


def _store_client(app: App, loc: Location, ssh: tuple[str, ...]) -> Any:
    from .peers import StoreClient

    return StoreClient(store_connector(app.get_runner(), loc, ssh), name=loc.host or loc.path)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _escaped(value: Any) -> Any:
    """``value`` with every string in it made printable (a store's rows are not ours)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _printable_rows(backups: list[Any]) -> list[dict[str, Any]]:
    """The store's rows for the table: strings escaped, counts that are not counts dropped."""
    rows: list[dict[str, Any]] = []
    for b in backups:
        row = _escaped(b) if isinstance(b, dict) else {"id": printable(repr(b))}
        for key in ("archive_bytes", "member_count"):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                row[key] = None
        for key in ("verification", "compared"):
            if row.get(key) is not None and not isinstance(row[key], dict):
                row[key] = {"status": printable(str(row[key]))}
        row.setdefault("id", "?")
        rows.append(row)
    return rows


@click.command()
@click.argument("source", required=False, metavar="HOST:/PATH")
@click.option("--store", "store_loc", default=None, metavar="STORE", help=STORE_HELP)
@click.option("--with", "also", multiple=True, metavar="/PATH",
              help="Another path on the same first server, frozen in the same window and "
                   "stored in the same archive under its path (a consistency group; "
                   "repeatable).")
@click.option("--job", default=None,
              help="Take SOURCE, --store and options from /etc/sanoffload/jobs/JOB.toml.")
@click.option("--kind", default=None,
              help=f"Duplicate kind: {', '.join(DuplicateKind.values())} "
                   "(default: the agent chooses from the volume).")
@click.option("--verify", "verify_mode", is_flag=False, flag_value=VerifyMode.FULL.value,
              default=None, type=click.Choice(VerifyMode.values()),
              help="stream (default): checked while it flows, nothing read twice; full (also "
                   "the flag alone): then tar --diff of the stored archive against the "
                   "duplicate, which reads both again; none.")
@click.option("--no-verify", is_flag=True, help="The same as --verify none.")
@click.option("--image", is_flag=True, default=None,
              help="Store the volume's blocks (4 MiB chunks, each stored once) instead of an "
                   "archive: after the first, a thin volume's backups read only what changed. "
                   "One path (no --with). Default: the job's mode, else tar.")
@click.option("--level", type=click.IntRange(1, 19), default=None,
              help="zstd level (default 3, or the job's); zstd uses every core (-T0).")
@click.option("--incremental", is_flag=True, default=None,
              help="tar --listed-incremental: only what changed since the last level (its "
                   "state file comes from the store); a restore applies the chain. Default: "
                   "the job's incremental, else a full archive.")
@click.option("--full-every", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="With --incremental: a new level 0 after N levels (default 7, or the "
                   "job's full_every).")
@click.option("--progress/--no-progress", default=None,
              help="Show progress on stderr (default: when stderr is a terminal).")
@click.option("--ssh-option", "ssh_opts", multiple=True, metavar="OPT",
              help="Extra ssh -o option, e.g. Port=2222 (repeatable).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON (backup_id, sizes, freeze window, verification).")
@pass_app
def backup(app: App, source: str | None, store_loc: str | None, also: tuple[str, ...],
           job: str | None,
           kind: str | None, verify_mode: str | None, no_verify: bool, image: bool | None,
           level: int | None, incremental: bool | None, full_every: int | None,
           progress: bool | None, ssh_opts: tuple[str, ...], as_json: bool) -> None:
    """Back up HOST:/PATH off-host, from this proxy, into STORE.

    The first server freezes the filesystem only to duplicate the volume and
    exports the duplicate to this proxy alone; this proxy reads it and sends
    the archive to the store, then everything is released.

    Exits 14 (after storing and releasing) when the first server reported
    warnings, e.g. a failed post-thaw hook; they are in the manifest and in
    --json's "warnings".

    \b
    Examples:
      sanoffload backup fs1:/srv/data --store bk1:/srv/backups
      sanoffload backup fs1:/srv/data --store bk1:/srv/backups --json --no-progress
      sanoffload backup --job data          # /etc/sanoffload/jobs/data.toml
      sanoffload backup fs1:/srv/san/db --with /srv/san/log --store bk1:/srv/backups
      sanoffload backup fs1:/srv/thin --image --store bk1:/srv/backups
      sanoffload backup fs1:/srv/data --incremental --full-every 6 --store bk1:/srv/backups
      sanoffload backup fs1:/srv/data --store 's3://backups/site-a?profile=px1'
    """
    from .offhost import run_offhost_backup

    # checked before anything else: the same one-line exit 2 as the agent's --kind
    dup_kind = None if kind is None else DuplicateKind.parse(kind, where="--kind")
    if no_verify and verify_mode is not None:
        raise UsageError("give --verify MODE or --no-verify, not both")
    verify = (VerifyMode.NONE if no_verify else
              None if verify_mode is None else VerifyMode.parse(verify_mode, where="--verify"))
    ssh = _ssh_options(ssh_opts)
    timeout = DEFAULT_CONNECTION_S
    if job is not None:
        if source or store_loc:
            raise UsageError("--job takes its source and store from the job file")
        if also:
            raise UsageError("--job takes its source's group (with = [...]) from the job file")
        from .jobs import BackupMode, load_job

        j = load_job(job)
        image = (j.mode is BackupMode.IMAGE) if image is None else image
        source_loc = Location(j.source_host, j.source_path)
        target = Location(j.store_host, j.store_path)
        dup_kind = dup_kind or j.kind
        verify = j.verify if verify is None else verify
        level = j.level if level is None else level
        incremental = j.incremental if incremental is None else incremental
        if incremental and full_every is None:
            full_every = j.full_every
        ssh = tuple(j.ssh_options) + ssh
        timeout = j.timeout_s
        also = j.also
    else:
        if not source or not store_loc:
            raise UsageError("give HOST:/PATH and --store STORE (or --job NAME)")
        source_loc = parse_location(source, "HOST:/PATH")
        target = parse_location(store_loc, "--store")
    if full_every is not None and not incremental:
        raise UsageError("--full-every needs --incremental")
    show = sys.stderr.isatty() if progress is None else progress
    extra: dict[str, Any] = {}
    if incremental:
        extra = {"incremental": True}
        if full_every is not None:
            extra["full_every"] = full_every
    summary = run_offhost_backup(app.get_runner(), source_loc, target,
                                 verify=verify or VerifyMode.STREAM, kind=dup_kind, level=level,
                                 ssh_options=ssh, also=also, image=bool(image),
                                 timeout=timeout, progress=Progress() if show else None,
                                 **extra)
    warnings = list(summary.get("warnings") or [])
    if as_json:
        _echo_json(summary)
    elif summary.get("kind") == "image":
        click.echo(_image_line(summary, warnings))
    else:
        verified = {True: "compared with the duplicate: identical",
                    None: "not compared"}.get(summary["verified"], "DIFFERS")
        if summary.get("verify") == VerifyMode.STREAM.value:
            verified = "checked in flight (checksums end to end, decoded by the store)"
        said = f"; {len(warnings)} warning(s)" if warnings else ""
        if summary.get("tar_level") is not None:
            said += f"; incremental level {printable(str(summary['tar_level']))}"
        if summary.get("members"):
            said += "; group of " + ", ".join(printable(str(p)) for p in summary["members"])
        click.echo(f"backup {printable(str(summary['backup_id']))}: {summary['archive_bytes']} "
                   f"bytes in {summary['stream_seconds']:.1f} s "
                   f"({summary['throughput_mib_s']:.1f} MiB/s), "
                   f"{printable(str(summary['duplicate_kind']))} frozen "
                   f"{summary['freeze_window_ms']} ms by {printable(str(summary['frozen_by']))}"
                   f"; {verified}{said}")
    if warnings:
        # stored and released by now: the exit code tells a scheduler to look
        raise CompletedWithWarnings(
            f"backup {printable(str(summary['backup_id']))} is stored, with "
            f"{len(warnings)} warning(s) from {source_loc.host}: "
            + " | ".join(printable(w) for w in warnings), warnings)


def _image_line(summary: dict[str, Any], warnings: list[str]) -> str:
    how = ("incremental from " + printable(str(summary["base"])) if summary.get("incremental")
           else "full read (" + printable(str(summary.get("full_reason"))) + ")")
    compared = summary.get("compared_chunks")
    verified = ("not compared" if compared is None
                else f"{compared} chunk(s) read again and compared with the duplicate")
    said = f"; {len(warnings)} warning(s)" if warnings else ""
    return (f"image backup {printable(str(summary['backup_id']))}: read "
            f"{summary['read_bytes']} bytes ({summary['chunks_read']} of {summary['chunks']} "
            f"chunks, {summary['changed_chunks']} changed), stored {summary['new_bytes']} "
            f"bytes in {summary['new_chunks']} new chunk(s), {summary['stream_seconds']:.1f} s "
            f"({summary['throughput_mib_s']:.1f} MiB/s); {how}; "
            f"{printable(str(summary['duplicate_kind']))} frozen "
            f"{summary['freeze_window_ms']} ms by {printable(str(summary['frozen_by']))}; "
            f"{verified}{said}")


@click.command("list")
@click.option("--store", "store_loc", required=True, metavar="STORE", help=STORE_HELP)
@click.option("--host", default=None, help="Only this first server's backups.")
@click.option("--ssh-option", "ssh_opts", multiple=True, metavar="OPT")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of manifests with ids.")
@pass_app
def list_(app: App, store_loc: str, host: str | None, ssh_opts: tuple[str, ...],
          as_json: bool) -> None:
    """List the backups in STORE.

    \b
    Example:
      sanoffload list --store bk1:/srv/backups --host fs1
    """
    with _store_client(app, parse_location(store_loc, "--store"), _ssh_options(ssh_opts)) as store:
        backups = store.list(host)
    if as_json:
        _echo_json(backups)
    else:
        click.echo(format_backups(_printable_rows(backups)))


@click.command()
@click.argument("backup_ids", nargs=-1, required=True, metavar="BACKUP_ID...")
@click.option("--store", "store_loc", required=True, metavar="STORE", help=STORE_HELP)
@click.option("--ssh-option", "ssh_opts", multiple=True, metavar="OPT")
@pass_app
def verify(app: App, backup_ids: tuple[str, ...], store_loc: str,
           ssh_opts: tuple[str, ...]) -> None:
    """Have STORE re-hash and test-read backups; exits 12 if one fails.

    \b
    Example:
      sanoffload verify --store bk1:/srv/backups fs1/srv-data-3f2a9c1e/20261126T102933Z
    """
    failed: list[str] = []
    with _store_client(app, parse_location(store_loc, "--store"), _ssh_options(ssh_opts)) as store:
        for bid in backup_ids:
            try:
                store.verify(bid)
                click.echo(f"ok {printable(bid)}")
            except IntegrityError as exc:
                click.echo(f"FAILED {printable(bid)}: {printable(exc.message)}")
                failed.append(bid)
    if failed:
        raise IntegrityError(f"{len(failed)} of {len(backup_ids)} backup(s) failed verification")


@click.command()
@click.argument("backup_id")
@click.argument("target", type=click.Path(), required=False)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--store", "store_loc", required=True, metavar="STORE", help=STORE_HELP)
@click.option("--image", "image_target", default=None, metavar="DEVICE|FILE",
              help="An image backup: write the volume to DEVICE (unmounted, big enough) or to "
                   "a new sparse FILE.")
@click.option("--force", is_flag=True, help="Restore into a non-empty TARGET, replacing files.")
@click.option("--devices", is_flag=True,
              help="Also restore device nodes (left out by default: an archive is not trusted "
                   "to make /dev entries).")
@click.option("--setid", is_flag=True,
              help="Keep set-user-ID and set-group-ID bits (dropped by default).")
@click.option("--ssh-option", "ssh_opts", multiple=True, metavar="OPT")
@pass_app
def restore(app: App, backup_id: str, target: str | None, paths: tuple[str, ...],
            store_loc: str, image_target: str | None, force: bool, devices: bool, setid: bool,
            ssh_opts: tuple[str, ...]) -> None:
    """Restore BACKUP_ID from STORE into TARGET on this host (whole, or only PATHS).

    The archive is fetched (sha256 checked), every member name is checked,
    and only then is anything written. The first server is never needed.
    Device nodes and set-id bits are restored only with --devices / --setid.

    \b
    Examples:
      sanoffload restore --store bk1:/srv/backups fs1/srv-data-3f2a9c1e/20261126T102933Z /restore
      sanoffload restore --store bk1:/srv/backups ID /restore etc/app.conf
      sanoffload restore --store /srv/backups ID --image /dev/vg0/data-restored
    """
    from ..store.open import open_store
    from ..store.repo import BackupId, Repository
    from ..store.restore import restore as restore_local

    loc = parse_location(store_loc, "--store")
    runner = app.get_runner()
    bid = BackupId.parse(backup_id)
    if image_target is not None:
        if target is not None or paths:
            raise UsageError("restore --image writes the whole volume: name no TARGET or PATHS")
        if loc.host is not None:
            raise UsageError("restore --image reads the repository's chunks directly: run it on "
                             "the backup server (--store /PATH) or with --store s3://…, or "
                             "`sanoffload store restore ID --image ...` there")
        from ..store.image import restore_image
        img = restore_image(open_store(loc.path, runner, what="--store"), bid, image_target,
                            force=force)
        click.echo(f"restored image {printable(str(img.backup))} to {printable(str(img.target))}"
                   f" ({img.size} bytes, {img.chunks} chunks)")
        return
    if target is None:
        raise UsageError("name the TARGET directory to restore into (or --image DEVICE|FILE)")
    selected = [os.fsencode(p) for p in paths]
    if loc.host is None:
        done = restore_local(open_store(loc.path, runner, what="--store"), bid, target,
                             selected, force=force, devices=devices, setid=setid)
    else:
        # fetched into a private repository beside the target: checked like any stored backup
        parent = os.path.dirname(os.path.abspath(target)) or "/"
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{target}: cannot prepare the restore: {exc}") from None
        with tempfile.TemporaryDirectory(prefix=".sanoffload-fetch-", dir=parent) as tmp:
            local = Repository(tmp, runner)
            with _store_client(app, loc, _ssh_options(ssh_opts)) as store:
                # straight into a writer of the local repository: hashed and test-read
                # on the way in like any stored backup, written once
                w = local.writer(bid.host, "/", slug=bid.slug, timestamp=bid.timestamp)
                with w:
                    manifest = store.get(str(bid), w)
                    w.path = str(manifest["path"])
                    w.commit({k: manifest.get(k) for k in (
                        "frozen_at", "duplicate_kind", "freeze_window_ms", "frozen_by",
                        "session_id", "sha256", "archive_bytes")})
            done = restore_local(local, bid, target, selected, force=force, devices=devices,
                                 setid=setid)
    click.echo(f"restored {printable(str(done.backup))} into {printable(str(done.target))} "
               f"({done.members} members checked)")


@click.command()
@click.option("--store", "store_loc", required=True, metavar="/PATH|s3://BUCKET/PREFIX",
              help="A repository on this host, or on S3 with a maint profile (prune never "
                   "runs through a backup server's store).")
@click.option("--keep-last", type=click.IntRange(min=0), default=0, help="The N newest.")
@click.option("--keep-daily", type=click.IntRange(min=0), default=0)
@click.option("--keep-weekly", type=click.IntRange(min=0), default=0)
@click.option("--keep-monthly", type=click.IntRange(min=0), default=0)
@click.option("--keep-yearly", type=click.IntRange(min=0), default=0)
@click.option("--host", default=None, help="Only this host's backups.")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prune(ctx: click.Context, /, store_loc: str, **options: Any) -> None:
    """Prune a repository on this host or on S3 (as 'sanoffload store --repo … prune').

    A proxy can add and read backups but never delete them, so a stolen proxy
    key cannot erase the history: prune runs on the backup server itself, or,
    for S3, with a profile of role "maint" (a proxy profile is refused, exit 10).

    \b
    Examples:
      sanoffload prune --store /srv/backups --keep-daily 7 --keep-weekly 4 --dry-run
      sanoffload prune --store 's3://backups/site-a?profile=maint' --keep-daily 7
    """
    from ..store import cli as store_cli

    loc = parse_location(store_loc, "--store")
    if loc.host is not None:
        raise RefusedError(f"prune runs on the backup server, not over the network: "
                           f"ssh {loc.host} sanoffload prune --store {loc.path} …")
    ctx.meta["store_repo"] = loc.path
    ctx.invoke(store_cli.prune, **options)


@click.group()
def proxy() -> None:
    """Housekeeping on the backup proxy.

    \b
    Example:
      sanoffload proxy cleanup
    """


@proxy.command("cleanup")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array: per attachment its session_id, action and detail.")
@pass_app
def cleanup_cmd(app: App, as_json: bool) -> None:
    """Undo what a killed backup left on this proxy: mount, iSCSI session, node record.

    Works from the proxy's journal (/var/lib/sanoffload/proxy): only what a
    sanoffload backup recorded is touched, and an attachment whose backup
    is still running is skipped. Run at boot by sanoffload-proxy-cleanup.service.
    Exits 13 if something could not be removed (it stays recorded for the next run).

    \b
    Example:
      sanoffload proxy cleanup
    """
    from .cleanup import Outcome, cleanup

    seen: list[Outcome] = []

    def show(outcome: Outcome) -> None:
        seen.append(outcome)
        if not as_json:  # one line as each is done: a later failure still shows what was
            click.echo(str(outcome))

    try:
        cleanup(app.get_runner(), on_outcome=show)
    finally:
        if as_json:
            _echo_json([{"session_id": o.session_id, "action": o.action, "detail": o.detail}
                        for o in seen])
    if not seen and not as_json:
        click.echo("nothing to clean up")
