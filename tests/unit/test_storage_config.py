"""storage.toml: parsing, every refusal naming the file and the key, and the file checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sanoffload import cli
from sanoffload.errors import AuthError, ConfigError
from sanoffload.storage import config as storage_config

pytestmark = pytest.mark.unit

LUN = "naa.6001405a1b2c3d4e5f60718293a4b5c6"
PX1 = "iqn.2026-11.org.sanoffload.lab:px1"
GOOD = f"""
state_dir = "/var/lib/sanoffload/storage"
lease_s = 7200
grace_s = 10

[ports.p1]
address = "10.77.0.10"
port = 3260
[ports.p2]
address = "10.78.0.10"

[snapshot]
percent = 20
min_mb = 128

[thin]
max_data_percent = 70

[clients.fs1]
luns = ["{LUN}"]
proxies = ["{PX1}"]
max_sessions = 4
"""


def test_the_example_parses() -> None:
    cfg = storage_config.parse(GOOD, "storage.toml")
    assert cfg.ports["p1"].address == "10.77.0.10" and cfg.ports["p2"].port == 3260
    fs1 = cfg.client("fs1")
    assert fs1.luns == (LUN,) and fs1.proxies == (PX1,) and fs1.max_sessions == 4
    assert (cfg.lease_s, cfg.grace_s, cfg.snapshot.percent, cfg.snapshot.min_mb,
            cfg.thin.max_data_percent, cfg.thin.max_metadata_percent) == (7200, 10.0, 20, 128,
                                                                          70, 80)
    with pytest.raises(AuthError, match="'fs9' is not in storage.toml"):
        cfg.client("fs9")


def test_defaults() -> None:
    cfg = storage_config.parse(f"""
[ports.p1]
address = "10.77.0.10"
[clients.fs1]
luns = ["{LUN}"]
proxies = ["{PX1}"]
""")
    assert cfg.state_dir == storage_config.DEFAULT_STATE_DIR
    assert cfg.client("fs1").max_sessions == storage_config.DEFAULT_MAX_SESSIONS


@pytest.mark.hostile("agent", "storage.toml with a typo, a bad identifier, an uppercase or "
                     "invalid IQN, 0.0.0.0, one LUN for two clients, no port, no client",
                     "ConfigError (exit 2) naming the file and the key")
@pytest.mark.parametrize("old,new,key", [
    ("lease_s = 7200", "lease_sec = 7200", "lease_sec: unknown key"),
    ('port = 3260', 'prot = 3260', "ports.p1.prot: unknown key"),
    ("max_sessions = 4", "max_session = 4", "clients.fs1.max_session: unknown key"),
    (f'luns = ["{LUN}"]', 'luns = ["/dev/sdb"]', "clients.fs1.luns[0]: not a LUN identifier"),
    (f'luns = ["{LUN}"]', f'luns = ["{LUN.upper()}"]', "clients.fs1.luns[0]"),
    (f'luns = ["{LUN}"]', "luns = []", "clients.fs1.luns: must list at least one"),
    (f'proxies = ["{PX1}"]', 'proxies = ["IQN.2026-11.ORG.X:PX1"]', "clients.fs1.proxies[0]"),
    (f'proxies = ["{PX1}"]', 'proxies = ["px1"]', "clients.fs1.proxies[0]: not an iSCSI"),
    ('address = "10.77.0.10"', 'address = "0.0.0.0"', "ports.p1.address"),
    ('address = "10.77.0.10"', 'address = "st1"', "ports.p1.address: not an IP address"),
    ("port = 3260", "port = 0", "ports.p1.port: must be between 1 and 65535"),
    ("[ports.p2]", '[ports."p 2"]', "ports.p 2: port IDs are"),
    ("max_sessions = 4", (f'max_sessions = 4\n[clients.fs2]\nluns = ["{LUN}"]\n'
                          f'proxies = ["{PX1}"]'), "clients.fs2.luns: naa.6001405a1b2c3d4e5f6071"),
    ('state_dir = "/var/lib/sanoffload/storage"', 'state_dir = "state"', "state_dir"),
    ("grace_s = 10", "grace_s = true", "grace_s"),
])
def test_bad_values_name_file_and_key(old: str, new: str, key: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        storage_config.parse(GOOD.replace(old, new, 1), "/etc/sanoffload/storage.toml")
    assert info.value.exit_code == 2
    assert info.value.message.startswith("/etc/sanoffload/storage.toml: ")
    assert key in info.value.message


@pytest.mark.parametrize("drop,key", [("[ports.", "ports"), ("[clients.", "clients")])
def test_ports_and_clients_are_required(drop: str, key: str) -> None:
    text = "\n[".join(block for block in GOOD.split("\n[")
                      if not ("[" + block).startswith(drop))
    assert drop not in text
    with pytest.raises(ConfigError, match=f"storage.toml: {key}: no \\[{key}"):
        storage_config.parse(text, "storage.toml")


@pytest.mark.hostile("agent", "storage.toml writable by group or others, or a symlink",
                     "ConfigError naming the file, not read")
def test_the_file_is_checked_like_agent_toml(tmp_path: Path) -> None:
    path = tmp_path / "storage.toml"
    path.write_text(GOOD)
    path.chmod(0o600)
    assert storage_config.load(path).ports["p1"].address == "10.77.0.10"
    path.chmod(0o666)
    with pytest.raises(ConfigError, match=str(path)):
        storage_config.load(path)
    path.chmod(0o600)
    link = tmp_path / "link.toml"
    os.symlink(path, link)
    with pytest.raises(ConfigError, match="symbolic link"):
        storage_config.load(link)
    with pytest.raises(ConfigError, match="no such file"):
        storage_config.load(tmp_path / "absent.toml")


def test_storage_commands_are_registered() -> None:
    assert cli.LAZY_COMMANDS["storage"] == "sanoffload.storage.cli:storage"
    result = CliRunner().invoke(cli.cli, ["storage", "--help"])
    assert result.exit_code == 0 and "serve" in result.output and "cleanup" in result.output


def test_storage_cleanup_cli_runs_on_an_empty_node(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "storage.toml"
    path.write_text(GOOD.replace("/var/lib/sanoffload/storage", str(tmp_path / "state")))
    path.chmod(0o600)
    from sanoffload.testing import FakeRunner
    from tests.unit.recorded import feed

    runner = FakeRunner()
    feed(runner, "lvs", "lvs_all")
    monkeypatch.setattr(cli, "make_runner", lambda: runner)
    # no rtslib in the unit tier: LIO unreadable counts as nothing of ours exported
    code = cli.run(["storage", "--config", str(path), "cleanup", "--json"])
    assert code == 0
