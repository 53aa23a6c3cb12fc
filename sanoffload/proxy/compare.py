"""Compare a stored archive with the tree it was made of: ``tar --diff`` fed by the store.

::

    store get ID  ->  tar --diff -f - -C SOURCE      (on the proxy, the duplicate still mounted)

Run after the archive is stored and before the duplicate is released, so what
the store holds is checked against what it was read from, not only hashed.
"""

from __future__ import annotations

import subprocess
import threading
from typing import IO, Any, Protocol

from ..errors import CommandError, SanoffloadError
from ..pipeline import Stage
from ..runner import Runner
from ..tools import tar


class ArchiveSource(Protocol):
    """Where the stored archive is read from (the proxy's StoreClient)."""

    def get(self, backup_id: str, out: IO[bytes]) -> dict[str, Any]: ...


def compare_stored_archive(runner: Runner, store: ArchiveSource, backup_id: str,
                           source_dir: str, *, timeout: float) -> tuple[bool, str]:
    """Compare the stored archive with the tree it came from: ``tar --diff`` fed by ``get``.

    Returns ``(same, detail)``: detail holds the first differences tar names.
    """
    stages = [Stage(tar.compare_argv("-", source_dir), ok_codes={1: "differences"})]
    with runner.pipeline(stages, stdin=subprocess.PIPE, timeout=timeout) as pipe:
        assert pipe.stdin is not None
        lines: list[bytes] = []

        def drain() -> None:  # tar prints differences on stdout: never let it block
            try:
                for line in pipe.stdout:
                    if len(lines) < 20:
                        lines.append(line.rstrip(b"\n"))
            except (OSError, ValueError):
                pass  # the pipeline was killed under us: wait() says why

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        error: SanoffloadError | None = None
        try:
            store.get(backup_id, pipe.stdin)
        except CommandError as exc:  # tar stopped reading: its exit code tells why
            error = exc
        finally:
            try:
                pipe.stdin.close()
            except OSError:
                pass
        # the reader first: wait() closes stdout, which must not happen under it; tar's
        # exit (or the pipeline's deadline, which kills it) ends the reader's input
        reader.join()
        results = pipe.wait()
    rc = results[0].returncode
    detail = "; ".join(line.decode("utf-8", "replace") for line in lines)
    if rc == 0 and error is None:
        return True, ""
    if rc == 1 or lines:
        return False, detail[:500] or results[0].stderr.strip()[:500]
    raise error or CommandError(f"tar --diff failed: {results[0].stderr.strip()}")
