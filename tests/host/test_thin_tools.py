"""sanoffload.tools.thin against the real thin_restore and thin_delta (no device-mapper needed).

Pool metadata is built in a file from hand-written XML (tests/fixtures/thin/
restore-pair.xml: thin device 1 the base, 2 a snapshot of it sharing some
blocks, with blocks changed, added and discarded), and the real thin_delta is
run on that file through the wrapper: no metadata snapshot, since a file has
none. Needs thin-provisioning-tools.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sanoffload.errors import CommandError
from sanoffload.runner import DEFAULT_PATH, Runner
from sanoffload.tools import thin
from sanoffload.tools.thin import Delta, Range

pytestmark = pytest.mark.host

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "thin"
BLOCK = 64 * 1024
VOLUME = 1024 * BLOCK


def blocks(*pairs: tuple[int, int]) -> list[Range]:
    return [Range(b * BLOCK, n * BLOCK) for b, n in pairs]


@pytest.fixture
def metadata(host_runner: Runner, tmp_path: Path) -> Path:
    """A metadata file holding restore-pair.xml."""
    for tool in ("thin_restore", "thin_delta"):
        assert shutil.which(tool, path=DEFAULT_PATH), \
            f"{tool} missing: apt-get install thin-provisioning-tools"
    meta = tmp_path / "meta"
    with open(meta, "wb") as f:
        f.truncate(8 * 1024 * 1024)  # thin_restore writes into an existing file
    host_runner.run(["thin_restore", "-i", str(FIXTURES / "restore-pair.xml"), "-o", str(meta)])
    return meta


def test_real_thin_delta_gives_what_the_metadata_implies(host_runner: Runner,
                                                        metadata: Path) -> None:
    delta = thin.thin_delta(host_runner, str(metadata), 1, 2, use_metadata_snap=False,
                            volume_bytes=VOLUME)
    assert delta == Delta(BLOCK, changed=blocks((60, 10), (95, 9), (700, 5)),
                          discarded=blocks((256, 128), (400, 10), (1023, 1)))
    assert thin.changed_chunks(delta, VOLUME) == [0, 1, 6, 10, 11, 15]
    assert thin.discarded_chunks(delta, VOLUME) == [4, 5]


def test_reversed_delta(host_runner: Runner, metadata: Path) -> None:
    delta = thin.thin_delta(host_runner, str(metadata), 2, 1, use_metadata_snap=False)
    assert delta.changed == blocks((60, 10), (95, 5), (256, 128), (400, 10), (1023, 1))
    assert delta.discarded == blocks((100, 4), (700, 5))


@pytest.mark.parametrize(("name", "extra"), [("delta-pair.xml", []),
                                             ("delta-pair-verbose.xml", ["--verbose"]),
                                             ("delta-pair-reversed.xml", [])])
def test_recorded_fixtures_are_what_the_tool_prints(host_runner: Runner, metadata: Path,
                                                    name: str, extra: list[str]) -> None:
    # the unit tests parse these recordings: they must stay the real tool's output
    ids = ["2", "1"] if "reversed" in name else ["1", "2"]
    out = host_runner.run(["thin_delta", *extra, "--snap1", ids[0], "--snap2", ids[1],
                           str(metadata)]).stdout
    assert out == (FIXTURES / name).read_text()


def test_metadata_snap_on_a_file_without_one_fails_with_the_tools_message(
        host_runner: Runner, metadata: Path) -> None:
    with pytest.raises(CommandError, match="no current metadata snap"):
        thin.thin_delta(host_runner, str(metadata), 1, 2)


def test_unknown_device_fails_with_the_tools_message(host_runner: Runner,
                                                     metadata: Path) -> None:
    with pytest.raises(CommandError, match=r"Unable to find mapping tree for snap2 \(7\)"):
        thin.thin_delta(host_runner, str(metadata), 1, 7, use_metadata_snap=False)
