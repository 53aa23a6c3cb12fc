"""sanoffload.agent.config: defaults, validation (file, key, reason), initiator lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanoffload.agent import config
from sanoffload.agent.config import Client, Config
from sanoffload.agent.hooks import Hook
from sanoffload.errors import AuthError, ConfigError

pytestmark = pytest.mark.unit

SRC = "/etc/sanoffload/agent.toml"
MINIMAL = """
[portal]
address = "10.77.0.11"

[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]
roots = ["/srv"]
"""
FULL = """
state_dir = "/var/lib/sano"
run_dir = "/run/sano"
freeze_deadline_s = 2.5
lease_s = 600

[portal]
address = "fd00::11"
port = 3261

[snapshot]
percent = 20
min_mb = 128

[thin]
max_data_percent = 70
max_metadata_percent = 60

[hooks]
pre_freeze = ["/usr/local/sbin/db-flush"]
post_thaw = ["/usr/local/sbin/db-resume", "/usr/local/sbin/notify"]
timeout_s = 15

[clients.px1]
initiators = ["iqn.2026-11.org.sanoffload.lab:px1", "iqn.1993-08.org.debian:01:5ab3c9e1f2"]
roots = ["/srv/lin/", "/srv/thin"]
max_sessions = 3

[clients."px-2.dc"]
initiators = ["iqn.1991-05.com.microsoft:px2.example.com"]
roots = ["/srv/r1"]
"""


def parse(text: str) -> Config:
    return config.parse(text, SRC)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert exc.value.exit_code == 2
    message = str(exc.value)
    assert message.startswith(f"{SRC}: "), message
    return message


def test_minimal_config_gets_the_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.path == SRC
    assert (cfg.state_dir, cfg.run_dir) == ("/var/lib/sanoffload", "/run/sanoffload")
    assert (cfg.freeze_deadline_s, cfg.lease_s) == (10.0, 3600)
    assert (cfg.portal.address, cfg.portal.port) == ("10.77.0.11", 3260)
    assert (cfg.snapshot.percent, cfg.snapshot.min_mb) == (10, 64)
    assert cfg.snapshot.min_bytes == 64 * 1024 * 1024
    assert (cfg.thin.max_data_percent, cfg.thin.max_metadata_percent) == (80, 80)
    assert (cfg.hooks.pre_freeze, cfg.hooks.post_thaw, cfg.hooks.timeout_s) == ((), (), 60.0)
    assert cfg.clients == {"px1": Client("px1", ("iqn.2026-11.org.sanoffload.lab:px1",),
                                         ("/srv",), 1)}


def test_full_config() -> None:
    cfg = parse(FULL)
    assert (cfg.state_dir, cfg.run_dir, cfg.freeze_deadline_s, cfg.lease_s) == (
        "/var/lib/sano", "/run/sano", 2.5, 600)
    assert (cfg.portal.address, cfg.portal.port) == ("fd00::11", 3261)
    assert (cfg.snapshot.percent, cfg.snapshot.min_mb) == (20, 128)
    assert (cfg.thin.max_data_percent, cfg.thin.max_metadata_percent) == (70, 60)
    assert cfg.clients["px1"].roots == ("/srv/lin", "/srv/thin")  # trailing slash dropped
    assert cfg.clients["px1"].max_sessions == 3
    assert cfg.clients["px-2.dc"].initiators == ("iqn.1991-05.com.microsoft:px2.example.com",)
    hooks = cfg.hooks.to_hooks()
    assert hooks.pre_freeze == (Hook("/usr/local/sbin/db-flush", 15.0),)
    assert [h.path for h in hooks.post_thaw] == ["/usr/local/sbin/db-resume",
                                                 "/usr/local/sbin/notify"]


def test_client_for_initiator() -> None:
    cfg = parse(FULL)
    assert cfg.client_for_initiator("iqn.1993-08.org.debian:01:5ab3c9e1f2").name == "px1"
    assert cfg.client_for_initiator("iqn.1991-05.com.microsoft:px2.example.com").name == "px-2.dc"


@pytest.mark.parametrize("iqn", ["iqn.2026-11.org.sanoffload.lab:px9",
                                 "IQN.2026-11.ORG.SANOFFLOAD.LAB:PX1", ""])
def test_unknown_initiator_is_an_auth_error(iqn: str) -> None:
    with pytest.raises(AuthError, match="not allowed") as exc:
        parse(FULL).client_for_initiator(iqn)
    assert exc.value.exit_code == 10


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    cfg = config.load(path)
    assert cfg.path == str(path) and cfg.clients["px1"].roots == ("/srv",)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}/nope.toml: no such file"):
        config.load(tmp_path / "nope.toml")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("lease_s = 0\n" + MINIMAL)
    with pytest.raises(ConfigError, match=f"^{path}: lease_s: must be at least 1, not 0"):
        config.load(path)


def test_not_toml() -> None:
    assert "not valid TOML" in error("[portal\naddress = 1")


def test_portal_address_is_required() -> None:
    no_portal = MINIMAL.replace('[portal]\naddress = "10.77.0.11"\n', "")
    assert "portal.address: required" in error(no_portal)
    assert "portal.address: required" in error(MINIMAL.replace('address = "10.77.0.11"', ""))


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_wildcard_address_refused(address: str) -> None:
    message = error(MINIMAL.replace("10.77.0.11", address))
    assert f"portal.address: {address} listens on every interface" in message


@pytest.mark.parametrize("address", ["fs1.lab", "10.77.0.300", ""])
def test_address_must_be_an_ip(address: str) -> None:
    assert "portal.address: not an IP address" in error(MINIMAL.replace("10.77.0.11", address))


@pytest.mark.parametrize(("line", "key", "reason"), [
    ("port = 0", "portal.port", "between 1 and 65535"),
    ("port = 70000", "portal.port", "between 1 and 65535"),
    ("port = true", "portal.port", "must be an integer"),
    ('port = "3260"', "portal.port", "must be an integer"),
])
def test_portal_port(line: str, key: str, reason: str) -> None:
    message = error(MINIMAL.replace('address = "10.77.0.11"', f'address = "10.77.0.11"\n{line}'))
    assert f"{key}: " in message and reason in message


@pytest.mark.parametrize(("top", "key", "reason"), [
    ("freeze_deadline_s = 0", "freeze_deadline_s", "greater than 0"),
    ("freeze_deadline_s = 301", "freeze_deadline_s", "at most 300"),
    ('freeze_deadline_s = "10"', "freeze_deadline_s", "must be a number"),
    ("lease_s = -1", "lease_s", "at least 1"),
    ("lease_s = 1.5", "lease_s", "must be an integer"),
    ('state_dir = "var/lib/sanoffload"', "state_dir", "absolute"),
    ('run_dir = "/run/../tmp"', "run_dir", "'..'"),
    ("bogus = 1", "bogus", "unknown key"),
])
def test_top_level_keys(top: str, key: str, reason: str) -> None:
    message = error(f"{top}\n{MINIMAL}")
    assert f"{SRC}: {key}: " in message and reason in message


@pytest.mark.parametrize(("table", "key", "reason"), [
    ("[snapshot]\npercent = 0", "snapshot.percent", "between 1 and 100"),
    ("[snapshot]\npercent = 101", "snapshot.percent", "between 1 and 100"),
    ("[snapshot]\nmin_mb = 0", "snapshot.min_mb", "at least 1"),
    ("[snapshot]\nmin_bytes = 5", "snapshot.min_bytes", "unknown key"),
    ("[thin]\nmax_data_percent = 0", "thin.max_data_percent", "between 1 and 100"),
    ("[thin]\nmax_metadata_percent = 120", "thin.max_metadata_percent", "between 1 and 100"),
    ("[thin]\ndata = 80", "thin.data", "unknown key"),
    ('[hooks]\npre_freeze = ["db-flush"]', "hooks.pre_freeze[0]", "absolute"),
    ('[hooks]\npost_thaw = "/x"', "hooks.post_thaw", "must be a list"),
    ('[hooks]\npre_freeze = ["/x", "/x"]', "hooks.pre_freeze[1]", "listed twice"),
    ("[hooks]\ntimeout_s = 0", "hooks.timeout_s", "greater than 0"),
    ("[hooks]\npre_thaw = []", "hooks.pre_thaw", "unknown key"),
    ("[portal2]\nx = 1", "portal2", "unknown key"),
])
def test_tables(table: str, key: str, reason: str) -> None:
    message = error(f"{MINIMAL}\n{table}\n")
    assert f"{SRC}: {key}: " in message and reason in message


def test_unknown_portal_key() -> None:
    message = error(MINIMAL.replace('address = "10.77.0.11"', 'address = "10.77.0.11"\nip = 1'))
    assert "portal.ip: unknown key" in message


def client(body: str, name: str = "px1") -> str:
    return f'[portal]\naddress = "10.77.0.11"\n[clients.{name}]\n{body}\n'


GOOD_BODY = 'initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = ["/srv"]'


@pytest.mark.parametrize(("body", "key", "reason"), [
    (GOOD_BODY + "\nrootz = []", "clients.px1.rootz", "unknown key"),
    (GOOD_BODY + "\nmax_sessions = 0", "clients.px1.max_sessions", "at least 1"),
    ('roots = ["/srv"]', "clients.px1.initiators", "required"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]', "clients.px1.roots", "required"),
    ('initiators = []\nroots = ["/srv"]', "clients.px1.initiators", "at least one"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = []', "clients.px1.roots",
     "at least one"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = ["srv"]',
     "clients.px1.roots[0]", "absolute"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = ["/srv/../etc"]',
     "clients.px1.roots[0]", "'..'"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = ["/"]',
     "clients.px1.roots[0]", "would allow every path"),
    ('initiators = ["iqn.2026-11.org.sanoffload.lab:px1"]\nroots = ["/srv", "/srv/"]',
     "clients.px1.roots[1]", "listed twice"),
])
def test_client_tables(body: str, key: str, reason: str) -> None:
    message = error(client(body))
    assert f"{SRC}: {key}: " in message and reason in message


@pytest.mark.parametrize(("iqn", "reason"), [
    ("iqn.2026-11.org.sanoffload.lab:PX1", "lowercase"),
    ("iqn.2026.org.sanoffload.lab:px1", "not an iSCSI qualified name"),
    ("iqn.2026-13.org.sanoffload.lab:px1", "not an iSCSI qualified name"),
    ("iqn.2026-11.org.sanoffload.lab:", "not an iSCSI qualified name"),
    ("iqn.2026-11.-org.lab", "not an iSCSI qualified name"),
    ("iqn.2026-11.org.lab:has space", "not an iSCSI qualified name"),
    ("eui.02004567a425678d", "not an iSCSI qualified name"),
    ("px1", "not an iSCSI qualified name"),
    ("iqn.2026-11.org.lab:" + "a" * 210, "not an iSCSI qualified name"),
])
def test_initiator_format(iqn: str, reason: str) -> None:
    message = error(client(f'initiators = ["{iqn}"]\nroots = ["/srv"]'))
    assert "clients.px1.initiators[0]: " in message and reason in message


@pytest.mark.parametrize("iqn", ["iqn.2026-11.org.sanoffload.lab:px1",
                                 "iqn.1993-08.org.debian:01:5ab3c9e1f2",
                                 "iqn.2001-04.com.example",
                                 "iqn.2003-01.org.linux-iscsi.px1.x8664:sn.1d2f3a4b5c6d"])
def test_initiator_format_accepted(iqn: str) -> None:
    cfg = parse(client(f'initiators = ["{iqn}"]\nroots = ["/srv"]'))
    assert cfg.client_for_initiator(iqn).name == "px1"


def test_initiator_in_two_clients_is_ambiguous() -> None:
    text = client(GOOD_BODY) + f"[clients.px2]\n{GOOD_BODY}\n"
    message = error(text)
    assert "clients.px2.initiators: " in message and "already listed by client 'px1'" in message


def test_no_clients() -> None:
    assert "clients: no [clients.NAME] table" in error('[portal]\naddress = "10.77.0.11"\n')


def test_clients_must_be_tables() -> None:
    assert "clients.px1: must be a table" in error(
        '[portal]\naddress = "10.77.0.11"\n[clients]\npx1 = 3\n')


def test_bad_client_name() -> None:
    assert "clients.a b: client names are 1-64 of A-Z a-z 0-9" in error(
        client(GOOD_BODY, name='"a b"'))


def test_clients_not_a_table() -> None:
    text = 'clients = ["px1"]\n[portal]\naddress = "10.0.0.1"\n'
    assert "clients: must be a table" in error(text)


def test_freeze_mode_defaults_to_auto_and_is_validated() -> None:
    assert config.parse(MINIMAL, SRC).freeze == "auto"
    assert config.parse('freeze = "fsfreeze"\n' + MINIMAL, SRC).freeze == "fsfreeze"
    with pytest.raises(ConfigError, match="freeze"):
        config.parse('freeze = "sometimes"\n' + MINIMAL, SRC)


def test_holding_hooks_and_their_ready_deadline() -> None:
    cfg = parse(MINIMAL + '\n[hooks]\nhold = ["/etc/sanoffload/hooks/mariadb-hold", '
                          '"/etc/sanoffload/hooks/pg-hold"]\nhold_ready_s = 12\ntimeout_s = 20\n')
    assert cfg.hooks.hold == ("/etc/sanoffload/hooks/mariadb-hold",
                              "/etc/sanoffload/hooks/pg-hold")
    hooks = cfg.hooks.to_hooks()
    assert hooks.hold == (Hook("/etc/sanoffload/hooks/mariadb-hold", 20.0),
                          Hook("/etc/sanoffload/hooks/pg-hold", 20.0))
    assert hooks.hold_ready_s == 12.0
    default = parse(MINIMAL).hooks
    assert (default.hold, default.hold_ready_s) == ((), 30.0)


@pytest.mark.hostile("agent", "agent.toml holding hooks: relative, listed twice, nine of "
                              "them, a READY deadline of 0 or an hour",
                     "ConfigError naming the key")
@pytest.mark.parametrize(("table", "key", "reason"), [
    ('[hooks]\nhold = ["mariadb-hold"]', "hooks.hold[0]", "absolute"),
    ('[hooks]\nhold = "/x"', "hooks.hold", "must be a list"),
    ('[hooks]\nhold = ["/x", "/x"]', "hooks.hold[1]", "listed twice"),
    ("[hooks]\nhold = [" + ", ".join(f'"/h{i}"' for i in range(9)) + "]", "hooks.hold",
     "at most 8"),
    ("[hooks]\nhold_ready_s = 0", "hooks.hold_ready_s", "greater than 0"),
    ("[hooks]\nhold_ready_s = 3600", "hooks.hold_ready_s", "at most 600"),
    ('[hooks]\nhold_ready_s = "30"', "hooks.hold_ready_s", "number of seconds"),
])
def test_bad_holding_hooks(table: str, key: str, reason: str) -> None:
    message = error(f"{MINIMAL}\n{table}\n")
    assert f"{SRC}: {key}: " in message and reason in message


@pytest.mark.hostile("agent", "agent.toml thin_base_max_use of 0, 101, a string, a boolean or 1.5",
                     "config error (2) naming the key")
@pytest.mark.parametrize("value", ["0", "101", '"80"', "true", "1.5"])
def test_thin_base_max_use_is_a_percentage(value: str) -> None:
    message = error(f"thin_base_max_use = {value}\n{MINIMAL}")
    assert f"{SRC}: thin_base_max_use: " in message
    assert parse(f"thin_base_max_use = 50\n{MINIMAL}").thin_base_max_use == 50
