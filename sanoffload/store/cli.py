"""``sanoffload store ...``: the backup server's operator commands.

Everything printed that a manifest, an archive or a peer supplied (paths,
warnings, reasons) goes through :func:`~sanoffload.text.printable`: a newline
cannot forge a row, an escape sequence cannot reach the terminal. JSON output
is escaped by the encoder.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from ..cli import App, pass_app
from ..errors import CompletedWithWarnings, IntegrityError, UsageError
from ..text import printable
from ..tools import tar
from .prune import Policy, prune as prune_repo
from .repo import Backup, BackupId, Repository
from .restore import restore as restore_backup, stream_out


def _repo(ctx: click.Context, app: App) -> Repository:
    """The repository --repo names: a directory here, or an s3:// URL (store.open)."""
    from .open import open_store

    if not ctx.meta.get("store_repo"):
        raise UsageError("no repository: give --repo DIR|s3://BUCKET/PREFIX (or set "
                         "SANOFFLOAD_REPO)")
    return open_store(ctx.meta["store_repo"], app.get_runner(), what="--repo")


def _size(n: object) -> str:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return "?"  # a remote store's listing is checked here, not trusted
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group("store")
@click.option("--repo", "repo_dir", envvar="SANOFFLOAD_REPO", default=None,
              metavar="DIR|s3://BUCKET/PREFIX",
              help="The repository: a directory, or S3 object storage through a profile of "
                   "/etc/sanoffload/s3.toml (s3://BUCKET/PREFIX?profile=NAME) (or "
                   "SANOFFLOAD_REPO).")
@click.pass_context
def store(ctx: click.Context, repo_dir: str | None) -> None:
    """Backup server: list, verify, prune and restore the backups in a repository.

    \b
    Backups are named HOST/SLUG/TIMESTAMP, e.g. fs1/srv-data-3f2a9c1e/20261126T102933Z.
    Examples:
      sanoffload store --repo /srv/backup list
      sanoffload store --repo /srv/backup verify fs1/srv-data-3f2a9c1e/20261126T102933Z
      sanoffload store --repo /srv/backup prune --keep-last 3 --keep-daily 7 --dry-run
      sanoffload store --repo /srv/backup restore fs1/srv-data-3f2a9c1e/20261126T102933Z /restore
      sanoffload store --repo /srv/backup restore fs1/srv-thin-1b2c3d4e/20261126T102933Z \
          --image /dev/vg0/restored
      sanoffload store --repo /srv/backup gc --grace 24h --dry-run
      sanoffload store --repo 's3://backups/site-a?profile=maint' list
      sanoffload store init-s3 s3://backups/site-a --profile maint --proxy-user px1
    """
    ctx.meta["store_repo"] = repo_dir


@store.command("list")
@click.option("--host", default=None, help="Only this host's backups.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array: per backup its id and every manifest field.")
@pass_app
@click.pass_context
def list_(ctx: click.Context, app: App, host: str | None, as_json: bool) -> None:
    """List the complete backups (a backup still being received is never shown).

    A backup whose manifest cannot be read is listed as BROKEN with the reason
    (in JSON: {"id", "broken"}); a backup with warnings says how many.

    \b
    Example:
      sanoffload store --repo /srv/backups list --host fs1 --json
    """
    entries = [b.to_dict() for b in _repo(ctx, app).catalog(host=host)]
    if as_json:
        _echo_json(entries)
        return
    click.echo(format_backups(entries))


def _status(value: Any) -> str:
    status = value.get("status") if isinstance(value, dict) else None
    return printable(status) if isinstance(status, str) else "-"


def format_backups(backups: Sequence[object]) -> str:
    """The catalog as a table (from manifests as dicts: local or from a remote store).

    Every cell is made printable; a broken backup shows BROKEN and why, a
    backup with warnings "[warnings: N]" after its path.
    """
    if not backups:
        return "no backups"
    rows = [("ID", "KIND", "SIZE", "MEMBERS", "VERIFIED", "COMPARED", "PATH")]
    for b in backups:
        if not isinstance(b, dict):
            continue
        ident = printable(str(b.get("id", "?")))
        if b.get("broken") is not None:
            rows.append((ident, "-", "-", "-", "BROKEN", "-",
                         f"(manifest: {printable(str(b['broken']))})"))
            continue
        members = b.get("member_count")
        where = printable(str(b.get("path", "")))
        warnings = b.get("warnings")
        if isinstance(warnings, list) and warnings:
            where += f"  [warnings: {len(warnings)}]"
        kind, size = "tar", b.get("archive_bytes")
        if b.get("kind") == "image":
            # what the image backup added to the repository, of the volume's size
            given = b.get("image")
            image: dict[str, Any] = given if isinstance(given, dict) else {}
            kind, size = "image", image.get("new_bytes")
            where += f"  [image of {_size(image.get('size'))}]"
        elif b.get("kind") is not None:
            kind = "?"
        elif b.get("tar_level") is not None:
            # an incremental level: restoring it applies its chain from level 0
            level = b.get("tar_level")
            kind = f"tar L{level}" if isinstance(level, int) and not isinstance(level, bool) \
                else "tar L?"
        rows.append((ident, kind, _size(size),
                     printable(str(members)) if members is not None else "-",
                     _status(b.get("verification")), _status(b.get("compared")), where))
    return _table(rows)


@store.command()
@click.argument("backup_ids", nargs=-1, metavar="[BACKUP_ID]...")
@click.option("--all", "all_", is_flag=True, help="Verify every backup in the repository.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array: per backup its id, ok and detail.")
@pass_app
@click.pass_context
def verify(ctx: click.Context, app: App, backup_ids: tuple[str, ...], all_: bool,
           as_json: bool) -> None:
    """Re-hash each backup and test-read it to the end (zstd -t, tar --list); for an image
    backup, re-check its chunk map and re-hash every chunk it names.

    Records the outcome in the manifest; exits 12 if any backup fails.

    \b
    Examples:
      sanoffload store --repo /srv/backups verify fs1/srv-data-3f2a9c1e/20261126T102933Z
      sanoffload store --repo /srv/backups verify --all --json
    """
    repo = _repo(ctx, app)
    if all_ == bool(backup_ids):
        raise UsageError("name the backups to verify, or give --all")
    # --all includes the backups whose manifest is broken: each is reported failed
    ids: list[BackupId | str] = list(repo.ids()) if all_ else list(backup_ids)
    results: list[dict[str, Any]] = []
    failures: list[IntegrityError] = []
    for bid in ids:
        try:
            backup: Backup = repo.verify(bid)
        except IntegrityError as exc:
            failures.append(exc)
            results.append({"id": str(bid), "ok": False, "detail": exc.message})
            if not as_json:
                click.echo(f"FAILED {printable(str(bid))}: {printable(exc.message)}")
            continue
        results.append({"id": str(backup.id), "ok": True, "detail": ""})
        if not as_json:
            click.echo(f"ok {backup.id}")
    if as_json:
        _echo_json(results)
    if failures:
        first = failures[0].message
        raise IntegrityError(first if len(ids) == 1 else
                             f"{len(failures)} of {len(ids)} backups failed verification "
                             f"(first: {first})")


@store.command()
@click.option("--keep-last", type=click.IntRange(min=0), default=0, help="The N newest.")
@click.option("--keep-daily", type=click.IntRange(min=0), default=0,
              help="The newest of each of the last N days that have a backup.")
@click.option("--keep-weekly", type=click.IntRange(min=0), default=0,
              help="The newest of each of the last N ISO weeks that have a backup.")
@click.option("--keep-monthly", type=click.IntRange(min=0), default=0,
              help="The newest of each of the last N months that have a backup.")
@click.option("--keep-yearly", type=click.IntRange(min=0), default=0,
              help="The newest of each of the last N years that have a backup.")
@click.option("--host", default=None, help="Only this host's backups.")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {policy, dry_run, keep: [{id, reasons}], remove: [id]}.")
@pass_app
@click.pass_context
def prune(ctx: click.Context, app: App, keep_last: int, keep_daily: int, keep_weekly: int,
          keep_monthly: int, keep_yearly: int, host: str | None, dry_run: bool,
          as_json: bool) -> None:
    """Remove the backups no --keep-* rule keeps, per object (the newest always stays).

    \b
    Example:
      sanoffload store --repo /srv/backup prune --keep-last 3 --keep-daily 7 --keep-weekly 4
    """
    from .open import require_delete_rights

    policy = Policy(last=keep_last, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly,
                    yearly=keep_yearly)
    repo = _repo(ctx, app)
    if not dry_run:
        require_delete_rights(repo, "prune")
    plan = prune_repo(repo, policy, host=host, dry_run=dry_run)
    if as_json:
        _echo_json(plan.to_dict())
        _refused(plan)
        return
    for backup, reasons in plan.keep:
        click.echo(f"keep   {backup.id} ({', '.join(reasons)})")
    verb = "would remove" if dry_run else "removed"
    held = {b.id for b, _ in (*plan.retained, *plan.not_removed)}
    for backup in plan.remove:
        if backup.id not in held:
            click.echo(f"{verb} {backup.id}")
    for broken in plan.broken:
        click.echo(f"broken {broken.id} (left alone: {printable(broken.reason)})")
    for backup, needed in plan.kept_for_chain:
        click.echo(f"kept   {backup.id} only because {needed} (kept) needs it: an "
                   "incremental level is restored with its whole chain")
    click.echo(f"{len(plan.keep)} kept, {len(plan.remove) - len(held)} {verb}"
               + (f", {len(plan.retained)} retained" if plan.retained else "")
               + (f", {len(plan.not_removed)} refused" if plan.not_removed else "")
               + (f", {len(plan.broken)} broken left alone" if plan.broken else "")
               + (f", {len(plan.kept_for_chain)} kept for a chain" if plan.kept_for_chain
                  else ""))
    for backup, until in plan.retained:
        click.echo(f"retained {backup.id} until {until} (Object Lock): a prune after that "
                   "date removes it")
    for backup, why in plan.not_removed:
        click.echo(f"NOT removed {backup.id}: {printable(why)}")
    if plan.images_removed:
        click.echo("image backups were removed: their chunks stay until "
                   "'sanoffload store gc' frees the unreferenced ones")
    _refused(plan)


def _refused(plan: Any) -> None:
    """A prune that could not remove all it chose: done, but the exit code says so."""
    if not plan.complete:
        raise CompletedWithWarnings(f"{len(plan.not_removed)} backup(s) chosen for removal "
                                    "are still there: the store refused or retains them",
                                    [f"{b.id}: {why}" for b, why in plan.not_removed])


def _duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` as seconds; UsageError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    body, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not body.isdigit() or len(body) > 9:
        raise UsageError(f"--grace {text!r}: want a number and s, m, h or d (e.g. 24h)")
    return float(int(body) * units[unit])


@store.command()
@click.option("--grace", default="24h", show_default=True, metavar="DURATION",
              help="Keep unreferenced chunks younger than this (a running backup's new "
                   "chunks): longer than the longest backup. 90s, 30m, 24h, 7d.")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {dry_run, removed, freed_bytes, kept_referenced, kept_young, ...}.")
@pass_app
@click.pass_context
def gc(ctx: click.Context, app: App, grace: str, dry_run: bool, as_json: bool) -> None:
    """Remove the chunks no image backup references any more (after prune).

    Marks every chunk each image backup's map names and sweeps the others older
    than --grace, under the repository's lock. If any backup's manifest or map
    cannot be read whole, nothing is swept (exit 12, naming it).

    \b
    Example:
      sanoffload store --repo /srv/backup gc --grace 24h --dry-run
    """
    from .open import require_delete_rights
    from .prune import gc as gc_repo

    repo = _repo(ctx, app)
    if not dry_run:
        require_delete_rights(repo, "gc")
    report = gc_repo(repo, grace_s=_duration(grace), dry_run=dry_run)
    if as_json:
        _echo_json({"dry_run": report.dry_run, "removed": report.removed,
                    "freed_bytes": report.freed_bytes,
                    "kept_referenced": report.kept_referenced,
                    "kept_young": report.kept_young,
                    "partials_removed": report.partials_removed,
                    "partials_left": report.partials_left,
                    "candidates": report.candidates,
                    "kept_retained": report.kept_retained,
                    "refused": report.refused,
                    "uploads_aborted": report.uploads_aborted,
                    "orphans_removed": report.orphans_removed,
                    "junk": [{"path": j.path, "reason": j.reason} for j in report.junk]})
        return
    for junk in report.junk:
        click.echo(f"junk   {printable(junk.path)} (left alone: {printable(junk.reason)})")
    verb = "would free" if dry_run else "freed"
    click.echo(f"{len(report.removed)} chunk(s) {verb} ({_size(report.freed_bytes)}), "
               f"{report.kept_referenced} referenced, {report.kept_young} unreferenced but "
               f"younger than {printable(grace)}; {len(report.partials_removed)} dead "
               "partial(s) removed"
               + (f"; {report.candidates} candidate(s) recorded for a later run (an object "
                  "store: removed only after a second run past --grace)"
                  if report.candidates else ""))


@store.command("lock-extend")
@click.argument("backup_ids", nargs=-1, metavar="[ID]...")
@click.option("--days", type=click.IntRange(1, 36500), required=True,
              help="Hold each object until at least this many days from now.")
@click.option("--host", default=None, help="Only this host's backups (when no ID is given).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {held: [{id, objects, chunks, until}], failed: [reason]}.")
@pass_app
@click.pass_context
def lock_extend(ctx: click.Context, app: App, backup_ids: tuple[str, ...], days: int,
                host: str | None, as_json: bool) -> None:
    """Hold backups under S3 Object Lock for longer (maint role).

    Every object version of each backup, and every chunk an image backup's map
    names, is held until at least DAYS days from now, in the mode it is held in
    (else the bucket's default); a retention is never shortened. With no ID,
    every listed backup (broken ones are not listed: 'store list' names them). The bucket's
    default retention protects a backup for a fixed time after it is written:
    run this for the backups a long --keep-monthly keeps, so they stay
    immutable for as long as they are kept.

    \b
    Example:
      sanoffload store --repo 's3://backups/site-a?profile=maint' lock-extend --days 400 \\
          fs1/srv-data-3f2a9c1e/20261101T020000Z
    """
    import time

    from .open import require_delete_rights

    repo = _repo(ctx, app)
    require_delete_rights(repo, "lock-extend")
    if backup_ids and host:
        raise UsageError("give backup IDs or --host, not both")
    ids: list[BackupId | str] = list(backup_ids) or [b.id for b in repo.list(host=host)]
    until = time.time() + days * 86400
    done: list[Any] = []
    failures: list[str] = []
    for bid in ids:
        try:
            locked = repo.extend_retention(bid, until)
        except IntegrityError as exc:
            failures.append(f"{printable(str(bid))}: {printable(exc.message)}")
            continue
        done.append(locked)
        if not as_json:
            row = locked.to_dict()
            click.echo(f"held   {locked.id} until {row['until']} ({locked.objects} object "
                       f"versions{f', {locked.chunks} chunks' if locked.chunks else ''})")
    if as_json:
        _echo_json({"held": [d.to_dict() for d in done], "failed": failures})
    if failures:
        raise IntegrityError(f"{len(failures)} of {len(ids)} backups could not be held: "
                             + "; ".join(failures[:3]))


@store.command("copy")
@click.argument("destination", metavar="DST")
@click.argument("backup_ids", nargs=-1, metavar="[BACKUP_ID]...")
@click.option("--host", default=None, help="Only this host's backups.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON: copied, skipped, broken, chunks, bytes.")
@pass_app
@click.pass_context
def copy(ctx: click.Context, app: App, destination: str, backup_ids: tuple[str, ...],
         host: str | None, as_json: bool) -> None:
    """Copy backups from --repo to DST (a directory or an s3:// URL), every byte re-hashed.

    All backups (or the BACKUP_IDs, or --host's), oldest first; an incremental
    backup brings the chain it needs. A backup DST already holds is skipped; another
    backup under the same id in DST stops the copy before anything is written. A
    backup whose data does not match its manifest is not copied (exit 12). Backups
    whose manifest is broken are reported and left behind (exit 12 at the end).

    \b
    Examples:
      sanoffload store --repo /srv/backups copy s3://offsite/site1
      sanoffload store --repo /srv/backups copy /mnt/usb/backups --host fs1
    """
    from .copy import copy_backups
    from .open import open_store

    src = _repo(ctx, app)
    dst = open_store(destination, app.get_runner(), what="DST")
    report = copy_backups(src, dst, list(backup_ids) or None, host=host)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for bid in report.copied:
            click.echo(f"copied  {bid}")
        for bid in report.skipped:
            click.echo(f"skipped {bid} (already there)")
        for bid, why in report.broken:
            click.echo(f"BROKEN  {printable(str(bid))}: {printable(why)} (not copied)")
        click.echo(f"{len(report.copied)} copied, {len(report.skipped)} already there, "
                   f"{len(report.broken)} broken; {report.chunks} chunk(s), "
                   f"{_size(report.bytes)} written to {printable(dst.location)}")
    if report.broken:
        raise IntegrityError(f"{len(report.broken)} backup(s) of {src.location} are broken "
                             "and were not copied (first: "
                             f"{report.broken[0][0]}: {report.broken[0][1]})")


@store.command()
@click.argument("backup_id")
@click.argument("target", type=click.Path(), required=False)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--image", "image_target", default=None, metavar="DEVICE|FILE",
              help="Write an image backup's volume to a block device (unmounted, at least "
                   "as big) or a new file (zeros as holes).")
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
              help="With --image: chunks read at once.")
@click.option("--force", is_flag=True, help="Restore into a non-empty TARGET, replacing files "
              "(with --image: replace an existing FILE).")
@click.option("--devices", is_flag=True,
              help="Restore device nodes too (left out unless asked for: an archive from a "
                   "proxy's key could hold a world-writable disk device).")
@click.option("--setid", is_flag=True,
              help="Keep set-uid/set-gid bits (dropped unless asked for).")
@pass_app
@click.pass_context
def restore(ctx: click.Context, app: App, backup_id: str, target: str | None,
            paths: tuple[str, ...], image_target: str | None, jobs: int, force: bool,
            devices: bool, setid: bool) -> None:
    """Restore BACKUP_ID into TARGET, whole or only PATHS (relative to the backup's root).

    The archive's checksum and every member name are checked before anything
    is written. TARGET "-" writes the checked .tar.zst to stdout instead.

    \b
    Examples:
      sanoffload store --repo /srv/backup restore fs1/srv-data-3f2a9c1e/20261126T102933Z /restore
      sanoffload store --repo /srv/backup restore ID /restore etc/app.conf www
      sanoffload store --repo /srv/backup restore ID /restore --devices --setid
      sanoffload store --repo /srv/backup restore ID - | ssh fs2 'zstd -d | tar -x ...'
      sanoffload store --repo /srv/backup restore ID --image /dev/vg0/restored
      sanoffload store --repo /srv/backup restore ID --image /srv/images/vol.img
    """
    repo = _repo(ctx, app)
    if image_target is not None:
        if target is not None or paths or devices or setid:
            raise UsageError("restore --image takes no TARGET, PATHS, --devices or --setid")
        from .image import restore_image

        done_image = restore_image(repo, backup_id, image_target, jobs=jobs, force=force)
        what = "device" if done_image.device else "file"
        click.echo(f"restored {done_image.backup} to {what} {printable(str(done_image.target))}:"
                   f" {_size(done_image.size)}, {done_image.chunks} chunk(s) checked, "
                   f"{done_image.zero_chunks} zero")
        return
    if target is None:
        raise UsageError("give TARGET (a directory, or - for stdout), or --image DEVICE|FILE")
    if target == "-":
        if paths or force or devices or setid:
            raise UsageError("restore to stdout (-) takes no PATHS, --force, --devices or "
                             "--setid")
        # the bytes under the text stream (click.get_binary_stream goes in Click 9)
        stream_out(repo, backup_id, sys.stdout.buffer)
        return
    done = restore_backup(repo, backup_id, target, [os.fsencode(p) for p in paths], force=force,
                          devices=devices, setid=setid)
    what = f"{len(done.selected)} selected path(s)" if done.selected else "everything"
    if done.link_targets:
        what += (f" and {len(done.link_targets)} hard-linked file(s) they need: "
                 + ", ".join(f"'{printable(tar.show(n))}'" for n in done.link_targets))
    if done.chain:
        what += f", {len(done.chain)} levels applied from {done.chain[0]}"
    click.echo(f"restored {done.backup} into {printable(str(done.target))}: {what} "
               f"({done.members} members checked)")


@store.command("init-s3")
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.option("--profile", default=None, metavar="NAME",
              help="The maint profile of s3.toml (default: the URL's ?profile=, the file's "
                   "default, or its only profile).")
@click.option("--object-lock", "lock_mode", type=click.Choice(["governance", "compliance"]),
              default=None, help="Object Lock with a default retention on every object (only "
                                 "for a new bucket; needs --days).")
@click.option("--days", type=click.IntRange(1, 36500), default=None,
              help="With --object-lock: how long each object is retained.")
@click.option("--proxy-user", "proxy_users", multiple=True, metavar="UID",
              help="An RGW user (a proxy) that may put and read but never delete: the bucket "
                   "policy is set for these (repeatable; none: the policy is left alone).")
@click.option("--json", "as_json", is_flag=True, help="Print what was found and done as JSON.")
def init_s3(url: str, profile: str | None, lock_mode: str | None, days: int | None,
            proxy_users: tuple[str, ...], as_json: bool) -> None:
    """Create an S3 repository (maint role): bucket, versioning, lock, policy, config.

    Makes the bucket if it is missing (with Object Lock if asked: only possible
    then), turns versioning on, gives each --proxy-user put/get/list but no
    delete, retention, policy or lifecycle rights (and the maint user read
    access to what they upload), writes the repository's config (sealed with
    the profile's key_file unless the profile says encryption = "none") and
    reads it back. Running it again changes nothing that is right already.

    \b
    Examples:
      sanoffload key init --passphrase-file /root/.repo-pass /etc/sanoffload/repo.key
      sanoffload store init-s3 s3://backups/site-a --profile maint --proxy-user px1
      sanoffload store init-s3 s3://locked/site-a --profile maint --proxy-user px1 \\
          --object-lock governance --days 30
    """
    from .open import init_s3 as init

    if (lock_mode is None) != (days is None):
        raise UsageError("--object-lock MODE and --days N go together")
    report = init(url, profile=profile, proxy_users=proxy_users,
                  lock=None if lock_mode is None or days is None else (lock_mode, days))
    if as_json:
        _echo_json(report.to_dict())
        return
    lines = [f"bucket      {'created' if report.bucket_created else 'exists'}"
             + (", versioning turned on" if report.versioning_enabled else ", versioned"),
             "object lock " + (f"{report.lock[0]}, {report.lock[1]} day(s) default retention"
                               if report.lock else "not asked for"),
             "policy      " + (f"put/get, no delete for {', '.join(report.policy_users)}"
                               if report.policy_users else "left as it is (no --proxy-user)"),
             f"config      {'written' if report.config_written else 'already there'}, "
             + (f"encrypted (repository {report.repo_id})" if report.encrypted
                else "not encrypted") + ", read back"]
    click.echo(f"repository {printable(report.location)} ready\n  " + "\n  ".join(lines))


@store.command()
@click.option("--stdio", is_flag=True, required=True,
              help="Speak the control protocol on stdin/stdout (the only transport).")
@click.option("--client", "client", required=True,
              help="The client this connection belongs to (from the key's forced command).")
@click.option("--repo", "serve_repo", default=None, metavar="DIR",
              help="The repository (default: the client's in the config file).")
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="The store's config (default /etc/sanoffload/store.toml, if present).")
@pass_app
@click.pass_context
def serve(ctx: click.Context, app: App, stdio: bool, client: str, serve_repo: str | None,
          config_path: str | None) -> None:
    """Serve one proxy connection; run by sshd from a forced command.

    A client may add backups and read them; it can never delete or replace
    one (prune runs here, on the backup server).

    \b
    Example (root's authorized_keys on the backup server, one line):
      command="sanoffload store serve --stdio --repo /srv/backups --client px1",restrict ssh-ed25519 AAAA… root@px1
    """  # noqa: E501 (the authorized_keys line must be shown whole)
    from ..channel.server import refuse, serve as serve_channel, stdio_channel
    from ..errors import SanoffloadError
    from . import config as store_config
    from .service import StoreService

    channel = stdio_channel(peer=f"client {client}")
    try:
        found = store_config.client_for(
            client, path=config_path or store_config.DEFAULT_PATH,
            repo=serve_repo or ctx.meta.get("store_repo"))
        service = StoreService(Repository(found.repo, app.get_runner()), client,
                               quota_bytes=found.quota_bytes, hosts=found.hosts)
    except SanoffloadError as exc:
        ctx.exit(refuse(channel, exc))
    ctx.exit(serve_channel(service, channel))
