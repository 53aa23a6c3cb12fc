"""stream_duplicate: stream into the store, refuse an invalid duplicate, always detach."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from sanoffload.errors import CommandError, DuplicateInvalidError
from sanoffload.proxy.attach import Attached
from sanoffload.proxy.stream import stream_duplicate
from sanoffload.runner import CommandRunner
from sanoffload.store.repo import Repository
from sanoffload.testing import FakeRunner
from sanoffload.tools import tar, zstd
from sanoffload.undo import UndoStack

from .test_messages import sample_answer

pytestmark = pytest.mark.unit

ANSWER = sample_answer(session_id="fs1-0a1b2c3d", object_kind="directory", path_in_fs="tree")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "mnt" / "tree"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    (src / "sub" / "a.txt").write_text("hello\n")
    return src


def _archive(src: Path) -> bytes:
    # real tar and zstd, so the store's test-read on commit has a real archive to read
    t = subprocess.run(tar.create_argv(src), capture_output=True, check=True).stdout
    return subprocess.run(zstd.compress_argv(), input=t, capture_output=True, check=True).stdout


def _fake_attach(src: Path, events: list[str]) -> Any:
    def attach(runner: Any, answer: Any, undo: UndoStack) -> Attached:
        events.append("attached")
        undo.push("detach", events.append, "detached")
        return Attached("/dev/sdz", str(src.parent), str(src))
    return attach


def test_a_backup_is_streamed_stored_and_the_duplicate_detached(tmp_path: Path,
                                                                tree: Path) -> None:
    data = _archive(tree)
    runner = FakeRunner().on("tar", stdout=b"").on("zstd", stdout=data)
    repo = Repository(tmp_path / "repo", CommandRunner())
    events: list[str] = []
    with repo.writer("fs1", "/srv/data/tree") as w:
        summary = stream_duplicate(runner, ANSWER, w, still_valid=lambda: True,
                                         attach_fn=_fake_attach(tree, events))
    assert events == ["attached", "detached"]
    assert summary.bytes == len(data)
    assert runner.argvs()[0] == tar.create_argv(str(tree), ".")
    [backup] = repo.list()
    assert backup.manifest.sha256 is not None
    assert Path(repo.archive_path(backup.id)).read_bytes() == data


def test_an_invalid_duplicate_is_never_stored(tmp_path: Path, tree: Path) -> None:
    runner = FakeRunner().on("tar", stdout=b"").on("zstd", stdout=_archive(tree))
    repo = Repository(tmp_path / "repo", CommandRunner())
    events: list[str] = []
    with pytest.raises(DuplicateInvalidError, match="became invalid"):
        with repo.writer("fs1", "/srv/data/tree") as w:
            stream_duplicate(runner, ANSWER, w, still_valid=lambda: False,
                             attach_fn=_fake_attach(tree, events))
    assert events == ["attached", "detached"]
    assert repo.list() == []
    assert not list((tmp_path / "repo").rglob("*.partial"))


def test_a_failing_tar_stores_nothing(tmp_path: Path, tree: Path) -> None:
    runner = FakeRunner().on("tar", returncode=2, stderr="tar: ./x: Cannot open\n")
    runner.on("zstd", stdout=b"")
    repo = Repository(tmp_path / "repo", CommandRunner())
    events: list[str] = []
    with pytest.raises(CommandError, match="tar exited 2"):
        with repo.writer("fs1", "/srv/data/tree") as w:
            stream_duplicate(runner, ANSWER, w, still_valid=lambda: True,
                             attach_fn=_fake_attach(tree, events))
    assert events == ["attached", "detached"]
    assert repo.list() == []


def test_a_file_object_is_archived_from_its_parent(tmp_path: Path, tree: Path) -> None:
    f = tree / "sub" / "a.txt"
    runner = FakeRunner().on("tar", stdout=b"").on("zstd", stdout=_archive(tree))
    repo = Repository(tmp_path / "repo", CommandRunner())

    def attach(runner: Any, answer: Any, undo: UndoStack) -> Attached:
        return Attached("/dev/sdz", str(tree.parent), str(f))

    with repo.writer("fs1", "/srv/data/tree/sub/a.txt") as w:
        stream_duplicate(runner, sample_answer(object_kind="file"), w, still_valid=lambda: True,
                         attach_fn=attach)
    # the typed kind decides: the parent as the directory, the file as the one member
    assert runner.argvs()[0] == tar.create_argv(str(f.parent), "a.txt")
