"""``sanoffload restore --image``: the top-level restore of an image backup (backup server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanoffload import cli
from sanoffload.store.repo import Repository

from .test_store_image import local, put_image, volume

pytestmark = pytest.mark.unit


def test_restore_image_writes_the_volume(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    repo = Repository(tmp_path / "repo")
    data = volume(b"top-level")
    done = put_image(local(repo), data)
    out = tmp_path / "vol.img"
    assert cli.run(["restore", "--store", str(repo.root), done["id"], "--image", str(out)]) == 0
    assert out.read_bytes() == data


@pytest.mark.hostile("restore", "restore --image from a remote store, or with a TARGET too, or "
                                "neither TARGET nor --image",
                     "usage error (2) saying what to do; nothing written")
@pytest.mark.parametrize("argv", [
    ["--store", "bk1:/srv/backups", "fs1/srv-thin-1a2b3c4d/20261126T102933Z", "--image", "OUT"],
    ["--store", "REPO", "fs1/srv-thin-1a2b3c4d/20261126T102933Z", "/restore", "--image", "OUT"],
    ["--store", "REPO", "fs1/srv-thin-1a2b3c4d/20261126T102933Z"],
])
def test_restore_image_refusals(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "repo").mkdir()
    argv = [str(tmp_path / "repo") if a == "REPO" else str(tmp_path / "out") if a == "OUT"
            else a for a in argv]
    assert cli.run(["restore", *argv]) == 2
    assert not (tmp_path / "out").exists()
