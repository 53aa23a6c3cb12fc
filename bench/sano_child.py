"""One sanoffload backup of a local tree into a local repository, through the real proxy code.

Run by ``bench/run`` as a child process (so its CPU is the child's rusage,
tar's and zstd's included). What runs is ``proxy.offhost.run_offhost_backup``
as ``sanoffload backup`` runs it, with three stand-ins that a local benchmark
cannot avoid:

* the agent is the real ``AgentService`` over a small in-process agent that
  answers ``prepare`` with a made-up export (no freeze, no duplicate);
* the attach step returns the local tree as the "mounted duplicate" (no iSCSI,
  no mount): everything from ``tar | zstd`` on is the real ``stream_duplicate``;
* the store is a local path, as ``--store /path`` gives it (``offhost.local_store``):
  the real ``StoreService`` over a ``Repository`` in this process, the put's bytes
  going straight into its writer.

``--compare`` is ``--verify full`` (tar --diff of the stored archive against
the tree, then the verify request); without it ``--verify stream``, the
CLI's default. ``--no-store-check`` makes the store skip its decode on
receipt (the writer gets ``check_on_receipt=False`` and commits with
``verify=False``): what is left is the proxy's share of the work, since on a
real site that decode runs on the backup server, not on the proxy.

Phase timers wrap (never replace) the store's commit, the wait for the
receipt check's end inside it, the fallback test-read, the compare and the
verify request, so the caller sees where the seconds go.
The last line on stdout is a JSON object.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sanoffload.agent.service import AgentService  # noqa: E402
from sanoffload.channel.client import in_process_connector  # noqa: E402
from sanoffload.channel.server import serve  # noqa: E402
from sanoffload.kinds import VerifyMode  # noqa: E402
from sanoffload.proxy import offhost, peers  # noqa: E402
from sanoffload.proxy.attach import Attached  # noqa: E402
from sanoffload.runner import CommandRunner  # noqa: E402
from sanoffload.store import repo as repo_mod  # noqa: E402
from sanoffload.tools import tar as tar_mod  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_lock = threading.Lock()
_in_commit: contextvars.ContextVar[bool] = contextvars.ContextVar("in_commit", default=False)


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so its wall time adds up under ``label``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            with _lock:
                PHASES[label] += time.perf_counter() - t0
                CALLS[label] += 1

    setattr(owner, name, wrapper)


class _Config:
    grace_s = 0.0

    def client(self, name: str) -> object:
        return name


class _Answer:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.session_id = str(data["session_id"])

    def to_wire(self) -> dict[str, Any]:
        return dict(self.data)


class BenchAgent:
    """Answers prepare with an export that is never used (attach is the local tree)."""

    def __init__(self, host: str, frozen_at: float) -> None:
        self.host = host
        self.frozen_at = frozen_at
        self.config = _Config()

    def prepare(self, path: str, initiator: str, *, kind: Any = None,
                client: str | None = None) -> _Answer:
        sid = f"{self.host}-0a1b2c3d"
        return _Answer({
            "session_id": sid, "identifier": "naa.60014050a1b2c3d4",
            "target_iqn": f"iqn.2026-11.org.sanoffload:{sid}", "portals": ["192.0.2.10:3260"],
            "lun": 0, "unit_serial": "0a1b2c3d", "chap_user": "bench", "chap_secret": "bench",
            "fstype": "ext4", "path_in_fs": "data", "object_kind": "directory",
            "duplicate_kind": "thin-snapshot", "freeze_window_ms": 1.0,
            "frozen_by": "fsfreeze", "lease_expires": self.frozen_at + 86400,
            "frozen_at": self.frozen_at})

    def owner(self, session_id: str) -> str | None:
        return None

    def status(self, session_id: str) -> dict[str, Any]:
        return {"session_id": session_id, "status": "healthy"}

    def release(self, session_id: str) -> list[str]:
        return []


def no_store_check() -> None:
    """The store skips its decode on receipt: every writer is made with
    ``check_on_receipt=False`` and commits with ``verify=False`` (this process only)."""
    make = repo_mod.Repository.writer

    @functools.wraps(make)
    def writer(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["check_on_receipt"] = False
        return make(self, *args, **kwargs)

    commit = repo_mod.BackupWriter.commit

    @functools.wraps(commit)
    def commit_unchecked(self: Any, fields: Any = None, *, verify: bool = True) -> Any:
        return commit(self, fields, verify=False)

    repo_mod.Repository.writer = writer  # type: ignore[method-assign]
    repo_mod.BackupWriter.commit = commit_unchecked  # type: ignore[method-assign]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--host", default="bench")
    ap.add_argument("--frozen-at", type=float, default=time.time())
    ap.add_argument("--compare", action="store_true",
                    help="--verify full: tar --diff against the tree (else the default, stream)")
    ap.add_argument("--no-store-check", action="store_true",
                    help="the store skips its decode on receipt (the proxy's share alone)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    if args.no_store_check:
        if args.compare:
            ap.error("--no-store-check goes with --verify stream only")
        no_store_check()
    timed(repo_mod.BackupWriter, "commit", "store_commit")
    # the wait for the receipt check's end inside the commit (Repository.verify's
    # read_check uses the same class: its finish is part of the verify request)
    finish = tar_mod.StreamCount.finish

    @functools.wraps(finish)
    def timed_finish(self: Any) -> int:
        t0 = time.perf_counter()
        try:
            return finish(self)
        finally:
            label = "store_check_finish" if _in_commit.get() else "verify_check_finish"
            with _lock:
                PHASES[label] += time.perf_counter() - t0
                CALLS[label] += 1

    tar_mod.StreamCount.finish = timed_finish  # type: ignore[method-assign]
    commit = repo_mod.BackupWriter.commit

    @functools.wraps(commit)
    def commit_marked(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _in_commit.set(True)
        try:
            return commit(self, *args, **kwargs)
        finally:
            _in_commit.reset(token)

    repo_mod.BackupWriter.commit = commit_marked  # type: ignore[method-assign]
    timed(repo_mod.Repository, "test_read", "store_test_read")
    timed(repo_mod.Repository, "verify", "store_verify")
    timed(offhost, "compare_stored_archive", "compare")
    timed(peers.StoreClient, "verify", "verify_request")

    tree = os.path.abspath(args.tree)
    runner = CommandRunner()
    agent = BenchAgent(args.host, args.frozen_at)
    agent_conn = in_process_connector(lambda ch: serve(AgentService(agent, "bench"), ch),  # type: ignore[arg-type]
                                      peer=args.host)
    store = offhost.Location(None, os.path.abspath(args.repo))

    def attach(runner: Any, answer: Any, undo: Any) -> Attached:
        return Attached("/dev/null", os.path.dirname(tree), tree)

    t0 = time.perf_counter()
    summary = offhost.run_offhost_backup(
        runner, offhost.Location(args.host, "/srv/data"), store,
        verify=VerifyMode.FULL if args.compare else VerifyMode.STREAM,
        initiator="iqn.2026-11.org.sanoffload.bench:local", timeout=3600,
        agent_conn=agent_conn,
        attach_fn=attach)
    wall = time.perf_counter() - t0
    out = {"wall_in_process": round(wall, 4), "phases": {k: round(v, 4) for k, v in PHASES.items()},
           "calls": dict(CALLS),
           "archive_bytes": summary["archive_bytes"], "stream_seconds": summary["stream_seconds"],
           "total_seconds": summary["total_seconds"], "member_count": summary["member_count"],
           "backup_id": summary["backup_id"], "verified": summary["verified"],
           "verify": summary["verify"], "store_check": not args.no_store_check,
           "verification": summary["verification"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
