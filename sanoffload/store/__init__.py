"""The backup server side: a repository of ``tar | zstd`` archives with manifests.

* :mod:`.repo` — layout, name checks, :meth:`Repository.put` (atomic, streaming),
  listing, verification;
* :mod:`.manifest` — the JSON beside each archive;
* :mod:`.prune` — retention (keep last/daily/weekly/monthly/yearly);
* :mod:`.restore` — member checks and extraction, or the archive streamed out;
* :mod:`.chunks` — content-addressed chunks of image backups (put/get/verify/gc; issue 13,
  not wired in yet);
* :mod:`.cli` — ``sanoffload store …``.
"""

from .manifest import Manifest, Verification
from .prune import Policy, prune, select
from .repo import Backup, BackupId, BackupWriter, Broken, Quota, Repository, slug_for_path
from .restore import check_members, restore, stream_out

__all__ = ["Backup", "BackupId", "BackupWriter", "Broken", "Manifest", "Policy", "Quota",
           "Repository", "Verification", "check_members", "prune", "restore", "select",
           "slug_for_path", "stream_out"]
