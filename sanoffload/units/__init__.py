"""systemd unit files shipped with sanoffload (installed by ``sanoffload install-units``).

* ``sanoffload-cleanup.service``: first server, at boot: ``agent cleanup --all``.
* ``sanoffload-lease.service`` + ``.timer``: first server, every minute: ``agent cleanup``.
* ``sanoffload-backup@.service`` + ``@.timer``: proxy, one instance per job, daily.
* ``sanoffload-proxy-cleanup.service``: proxy, at boot: ``proxy cleanup`` (what a killed
  backup left: node records, sessions, mounts).
* ``sanoffload-storage-cleanup.service``: storage node, at boot: ``storage cleanup --all``
  (duplicates and their exports a crash or reboot left).
* ``sanoffload-storage-lease.service`` + ``.timer``: storage node, every minute: ``storage
  cleanup`` (expired, failed and abandoned duplicates).

They are package data (``*.service``, ``*.timer``), read with importlib.resources
so they work from a wheel, an editable install or a zip alike.
"""

from __future__ import annotations

from importlib import resources

#: what a shipped unit file's name ends with
UNIT_SUFFIXES = (".service", ".timer")


def unit_files() -> dict[str, str]:
    """Every shipped unit file: name -> text, sorted by name."""
    found: dict[str, str] = {}
    for entry in resources.files(__name__).iterdir():
        if entry.is_file() and entry.name.endswith(UNIT_SUFFIXES):
            found[entry.name] = entry.read_text(encoding="utf-8")
    return dict(sorted(found.items()))
