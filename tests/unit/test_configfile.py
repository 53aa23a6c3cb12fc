"""The one config reader: every config file (agent.toml, store.toml, jobs) gets the same checks.

A config file decides what root does (hooks, roots, repositories, ssh
options), so it must be a regular file only root (or whoever runs sanoffload)
can change, of a sane size, and reading it must never hang.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from sanoffload.agent import config as agent_config
from sanoffload.configfile import MAX_CONFIG_BYTES, read_text
from sanoffload.errors import ConfigError
from sanoffload.store import config as store_config

pytestmark = pytest.mark.unit

AGENT_TOML = """
[portal]
address = "10.77.0.11"
[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
roots = ["/srv"]
"""

#: how long a read may take before the test calls it a hang
HANG_S = 5.0


def _file(tmp_path: Path, text: str = AGENT_TOML, mode: int = 0o644) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def read_bounded(path: Path) -> ConfigError | str | None:
    """read_text(path) in a thread; the outcome, or fails the test if it does not return."""
    outcome: list[ConfigError | str | None] = []

    def run() -> None:
        try:
            outcome.append(read_text(path))
        except ConfigError as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        # let the stuck open() return (a writer appears), so the thread ends
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(HANG_S)
        pytest.fail(f"reading {path} hung for {HANG_S}s")
    assert outcome, "read_text raised something else than a ConfigError (see the thread's error)"
    return outcome[0]


def test_a_good_file_is_read(tmp_path: Path) -> None:
    assert read_text(_file(tmp_path)) == AGENT_TOML
    assert read_text(tmp_path / "missing.toml") is None
    missing = ConfigError("no agent.toml")
    with pytest.raises(ConfigError) as info:
        read_text(tmp_path / "missing.toml", missing=missing)
    assert info.value is missing


@pytest.mark.hostile("agent", "agent.toml (or store.toml) that is a FIFO",
                     "ConfigError (exit 2) naming it at once, no hang in open()")
def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.toml"
    os.mkfifo(fifo, 0o644)
    got = read_bounded(fifo)
    assert isinstance(got, ConfigError), got
    assert got.exit_code == 2 and str(fifo) in str(got) and "not a regular file" in str(got)


@pytest.mark.hostile("agent", "agent.toml (or store.toml) group- or world-writable",
                     "ConfigError (exit 2) naming the file and its mode")
@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620], ids=oct)
def test_a_group_or_world_writable_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = _file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=f"{path}: group- or world-writable "
                                          f"\\(mode {mode:04o}\\)") as info:
        read_text(path)
    assert info.value.exit_code == 2 and info.value.hint == f"chmod go-w {path}"


@pytest.mark.hostile("agent", "agent.toml (or store.toml) owned by another user",
                     "ConfigError (exit 2) naming the file and its owner")
def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path)
    other = 65534 if os.geteuid() != 65534 else 65533
    if os.geteuid() == 0:
        os.chown(path, other, -1)
        with pytest.raises(ConfigError, match=f"{path}: owned by uid {other}, must be "
                                              "owned by root"):
            read_text(path)
    # the trusted owners are explicit: the same file, read as if we were someone else
    st = path.stat()
    with pytest.raises(ConfigError, match="owned by uid"):
        read_text(path, owners={0, st.st_uid + 1})
    assert read_text(path, owners={st.st_uid}) == AGENT_TOML


@pytest.mark.hostile("agent", "agent.toml that is a symlink, a directory, a device, or "
                     "larger than 1 MiB", "ConfigError (exit 2) naming the file")
@pytest.mark.parametrize("kind", ["symlink", "directory", "device", "huge", "sparse-huge"])
def test_other_things_than_a_small_regular_file_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "agent.toml"
    if kind == "symlink":
        real = _file(tmp_path)
        path = tmp_path / "link.toml"
        path.symlink_to(real)
        words = "symbolic link"
    elif kind == "directory":
        path.mkdir()
        words = "not a regular file"
    elif kind == "device":
        path = Path("/dev/null")  # a character device: not a config, even if empty
        words = "not a regular file"
    elif kind == "huge":
        path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
        path.chmod(0o644)
        words = "larger than"
    else:
        with open(path, "wb") as f:
            f.truncate(1 << 40)
        path.chmod(0o644)
        words = "larger than"
    got = read_bounded(path)
    assert isinstance(got, ConfigError), got
    assert str(path) in str(got) and words in str(got)


def test_the_checks_use_the_opened_file_not_the_name(tmp_path: Path) -> None:
    # a file of exactly the limit is fine: the bound is not off by one
    path = tmp_path / "agent.toml"
    path.write_bytes(b"#" * MAX_CONFIG_BYTES)
    path.chmod(0o600)
    assert len(read_text(path) or "") == MAX_CONFIG_BYTES


def test_agent_and_store_configs_both_get_the_checks(tmp_path: Path) -> None:
    agent = _file(tmp_path, mode=0o666)
    with pytest.raises(ConfigError, match="world-writable"):
        agent_config.load(agent)
    store = tmp_path / "store.toml"
    store.write_text('[clients.px1]\nrepo = "/srv/backups"\n')
    store.chmod(0o646)
    with pytest.raises(ConfigError, match="world-writable"):
        store_config.client_for("px1", path=str(store))
    fifo = tmp_path / "store-fifo.toml"
    os.mkfifo(fifo)
    outcome: list[ConfigError] = []

    def run() -> None:
        try:
            store_config.client_for("px1", path=str(fifo))
        except ConfigError as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("store serve's config read hung on a FIFO")
    assert outcome and "not a regular file" in str(outcome[0])
    assert stat.S_ISFIFO(fifo.stat().st_mode)
