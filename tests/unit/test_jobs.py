"""sanoffload.proxy.jobs: job files (file, key, reason in every error) and HOST:/PATH locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sanoffload.agent.resolve import DUPLICATE_KINDS
from sanoffload.errors import ConfigError, UsageError
from sanoffload.kinds import DuplicateKind, VerifyMode
from sanoffload.proxy import jobs
from sanoffload.proxy.jobs import (
    DEFAULT_TIMEOUT_S,
    JOBS_DIR,
    Job,
    list_jobs,
    load_job,
    parse_location,
)

pytestmark = pytest.mark.unit

FULL = """
source = "backup@fs1:/srv/data/"
store = "bk1:/srv/backups"
verify = false
kind = "thin-snapshot"
ssh_options = ["-o", "Port=2222", "-i", "/etc/sanoffload/id_ed25519", "-oBatchMode=yes", "-4"]
timeout_s = 3600
"""
MINIMAL = 'source = "fs1:/srv/data"\nstore = "/var/backups/sano"\n'


def write_job(jobs_dir: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = jobs_dir / f"{name}.toml"
    path.write_text(text)
    path.chmod(mode)  # not left to the umask: group-writable files are refused
    return path


# --------------------------------------------------------------------------
# good jobs
# --------------------------------------------------------------------------

def test_full_job(tmp_path: Path) -> None:
    write_job(tmp_path, "db-main", FULL)
    job = load_job("db-main", tmp_path)
    assert job == Job(name="db-main", source_host="backup@fs1", source_path="/srv/data",
                      store_host="bk1", store_path="/srv/backups", verify=VerifyMode.NONE,
                      kind=DuplicateKind.THIN_SNAPSHOT,
                      ssh_options=("-o", "Port=2222", "-i", "/etc/sanoffload/id_ed25519",
                                   "-oBatchMode=yes", "-4"),
                      timeout_s=3600.0)
    assert job.source == "backup@fs1:/srv/data"
    assert job.store == "bk1:/srv/backups"
    assert isinstance(job.timeout_s, float)


def test_minimal_job_defaults_and_a_local_store(tmp_path: Path) -> None:
    write_job(tmp_path, "web.1", MINIMAL)
    job = load_job("web.1", tmp_path)
    assert (job.source_host, job.source_path) == ("fs1", "/srv/data")
    assert job.store_host is None and job.store_path == "/var/backups/sano"
    assert job.store == "/var/backups/sano"
    assert job.verify is VerifyMode.STREAM
    assert job.kind is None
    assert job.ssh_options == ()
    assert job.timeout_s == DEFAULT_TIMEOUT_S == 43200


def test_defaults() -> None:
    assert JOBS_DIR == "/etc/sanoffload/jobs"


@pytest.mark.parametrize("kind", DUPLICATE_KINDS)
def test_every_duplicate_kind_is_accepted(kind: str) -> None:
    parsed = jobs.parse("j", MINIMAL + f'kind = "{kind}"\n').kind
    # past the edge the job holds the member, not the string
    assert parsed is DuplicateKind(kind)


@pytest.mark.parametrize("text,mode", [('"full"', VerifyMode.FULL), ("true", VerifyMode.FULL),
                                       ("false", VerifyMode.NONE), ('"none"', VerifyMode.NONE)])
def test_verify_takes_a_mode_or_an_older_files_boolean(text: str, mode: VerifyMode) -> None:
    assert jobs.parse("j", MINIMAL + f"verify = {text}\n").verify is mode


def test_job_is_frozen() -> None:
    job = jobs.parse("j", MINIMAL)
    with pytest.raises(AttributeError):
        job.verify = VerifyMode.FULL  # type: ignore[misc]


# --------------------------------------------------------------------------
# refusals: each names the file and the key
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text,key,words", [
    ('store = "/b"\n', "source", "required"),
    ('source = "fs1:/a"\n', "store", "required"),
    ('source = "/srv/data"\nstore = "/b"\n', "source", "needs a host"),
    ('source = "fs1:srv/data"\nstore = "/b"\n', "source", "absolute"),
    ('source = "fs1:/srv/../etc"\nstore = "/b"\n', "source", ".."),
    ('source = ":/srv"\nstore = "/b"\n', "source", "empty"),
    ('source = "-oProxyCommand=x:/srv"\nstore = "/b"\n', "source", "not a host name"),
    ('source = 5\nstore = "/b"\n', "source", "HOST:/PATH"),
    ('source = "fs1:/a"\nstore = "backups"\n', "store", "not an absolute path"),
    ('source = "fs1:/a"\nstore = "bk1:backups"\n', "store", "absolute"),
    ('source = "fs1:/a"\nstore = "bk1:/srv/\\n/x"\n', "store", "line breaks"),
    (MINIMAL + 'verfy = false\n', "verfy", "unknown key"),
    (MINIMAL + 'verify = "yes"\n', "verify", "one of: stream, full, none"),
    (MINIMAL + 'kind = "lvm"\n', "kind", "unknown duplicate kind 'lvm' (one of: snapshot"),
    (MINIMAL + 'kind = 1\n', "kind", "one of"),
    (MINIMAL + 'timeout_s = 0\n', "timeout_s", "greater than 0"),
    (MINIMAL + 'timeout_s = -5\n', "timeout_s", "greater than 0"),
    (MINIMAL + 'timeout_s = inf\n', "timeout_s", "greater than 0"),
    (MINIMAL + 'timeout_s = true\n', "timeout_s", "number of seconds"),
    (MINIMAL + 'timeout_s = "12h"\n', "timeout_s", "number of seconds"),
    (MINIMAL + 'ssh_options = "-o Port=22"\n', "ssh_options", "list of strings"),
    (MINIMAL + 'ssh_options = [22]\n', "ssh_options[0]", "non-empty string"),
    (MINIMAL + 'ssh_options = ["-o", "Port=22\\nProxyCommand x"]\n', "ssh_options[1]",
     "line breaks"),
    (MINIMAL + 'ssh_options = ["-o", "Port=22\\u0000"]\n', "ssh_options[1]", "NUL"),
    (MINIMAL + 'ssh_options = ["evil.example"]\n', "ssh_options[0]", "take it for the host"),
    (MINIMAL + 'ssh_options = ["-o", "Port=22", "evil"]\n', "ssh_options[2]", "not an ssh option"),
    (MINIMAL + 'ssh_options = ["-N"]\n', "ssh_options[0]", "not allowed"),
    (MINIMAL + 'ssh_options = ["-4C"]\n', "ssh_options[0]", "not allowed"),
    (MINIMAL + 'ssh_options = ["-o"]\n', "ssh_options[0]", "needs a value"),
    (MINIMAL + 'ssh_options = ["-o", "Port"]\n', "ssh_options[1]", "Key=Value"),
    (MINIMAL + 'ssh_options = ["-oPort"]\n', "ssh_options[0]", "Key=Value"),
])
def test_a_bad_job_names_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write_job(tmp_path, "j", text)
    with pytest.raises(ConfigError) as exc:
        load_job("j", tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, "j", 'source = "fs1:/a\n')
    with pytest.raises(ConfigError, match=f"^{path}: not valid TOML"):
        load_job("j", tmp_path)


def test_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j.toml"
    path.write_bytes(b'source = "fs1:/\xff"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"^{path}: not UTF-8"):
        load_job("j", tmp_path)


def test_missing_job_names_the_file_and_lists_the_jobs(tmp_path: Path) -> None:
    write_job(tmp_path, "db", MINIMAL)
    with pytest.raises(ConfigError) as exc:
        load_job("web", tmp_path)
    assert exc.value.message == f"no such job web ({tmp_path}/web.toml)"
    assert exc.value.hint == "jobs there: db"
    assert exc.value.exit_code == 2


def test_missing_job_in_the_default_dir_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "list_jobs", lambda _d: [])
    with pytest.raises(ConfigError, match=r"^no such job nope-\w+ \(/etc/sanoffload/jobs/"):
        load_job("nope-" + os.urandom(6).hex())


@pytest.mark.parametrize("name", ["", "../a", "a/b", "..", ".hidden", "-x", "a..b", "x" * 65,
                                  "db main", "db\n", "dé"])
def test_bad_job_names_are_refused_before_any_file_is_read(tmp_path: Path, name: str) -> None:
    # etc/../a.toml exists: a name that escapes the directory must not reach it
    (tmp_path / "etc").mkdir()
    write_job(tmp_path, "a", MINIMAL)
    with pytest.raises(UsageError, match="^bad job name") as exc:
        load_job(name, tmp_path / "etc")
    assert repr(name) in str(exc.value)


def test_a_name_with_the_suffix_gets_a_hint(tmp_path: Path) -> None:
    write_job(tmp_path, "db", MINIMAL)
    with pytest.raises(ConfigError, match="no such job db.toml") as exc:
        load_job("db.toml", tmp_path)
    assert exc.value.hint == "name the job without .toml: db"


def test_no_jobs_at_all_says_where_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_job("db", tmp_path)
    assert exc.value.hint == f"create {tmp_path}/db.toml (see the README)"


@pytest.mark.parametrize("name", ["a", "db-main", "web_1.daily", "X" * 64])
def test_good_job_names(tmp_path: Path, name: str) -> None:
    write_job(tmp_path, name, MINIMAL)
    assert load_job(name, tmp_path).name == name


def test_a_group_writable_job_file_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, "j", MINIMAL, mode=0o664)
    with pytest.raises(ConfigError, match="group- or world-writable") as exc:
        load_job("j", tmp_path)
    assert str(path) in str(exc.value)
    assert exc.value.hint == f"chmod go-w {path}"


def test_a_job_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "j.toml").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_job("j", tmp_path)


def test_list_jobs(tmp_path: Path) -> None:
    for name in ("web", "db-main", "a.b"):
        write_job(tmp_path, name, MINIMAL)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.toml").write_text("x")
    (tmp_path / "bad name.toml").write_text("x")
    (tmp_path / "web.toml~").write_text("x")
    (tmp_path / "dir.toml").mkdir()
    assert list_jobs(tmp_path) == ["a.b", "db-main", "web"]
    assert list_jobs(tmp_path / "missing") == []


# --------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("fs1:/srv/data", ("fs1", "/srv/data")),
    ("fs1.example.org:/srv/data/", ("fs1.example.org", "/srv/data")),
    ("backup@fs1:/srv", ("backup@fs1", "/srv")),
    ("10.77.0.11:/srv", ("10.77.0.11", "/srv")),
    ("[fd00::11]:/srv", ("fd00::11", "/srv")),
    ("root@[fd00::11]:/srv/a:b", ("root@fd00::11", "/srv/a:b")),
    ("/srv/backups", (None, "/srv/backups")),
    ("/srv/a:b", (None, "/srv/a:b")),
    ("fs1:/srv/./data//x", ("fs1", "/srv/data/x")),
])
def test_parse_location(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_location(text, "--source") == expected


@pytest.mark.parametrize("text,words", [
    ("", "must be HOST:/PATH"),
    (":/srv", "empty"),
    ("fs1:", "absolute"),
    ("fs1:srv", "absolute"),
    ("srv/data", "not an absolute path"),
    ("fs1:/srv/../etc", ".."),
    ("/srv/..", ".."),
    ("fs1:/srv\0x", "NUL"),
    ("fs1:/srv\nx", "line breaks"),
    ("-oProxyCommand=sh:/srv", "not a host name"),
    ("fs 1:/srv", "not a host name"),
    ("@fs1:/srv", "not a host name"),
    ("fs1:22:/srv", "absolute"),
])
def test_bad_location_is_a_usage_error_naming_the_value(text: str, words: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_location(text, "--store")
    assert not isinstance(exc.value, ConfigError)
    message = str(exc.value)
    assert message.startswith("--store: ")
    assert repr(text) in message
    assert words in message


def test_a_source_location_needs_a_host() -> None:
    assert parse_location("/srv", "--store") == (None, "/srv")
    with pytest.raises(UsageError, match="needs a host"):
        parse_location("/srv", "--source", require_host=True)


def test_location_error_class_can_be_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^f.toml: store: "):
        parse_location("rel", "f.toml: store", error=ConfigError)


@pytest.mark.parametrize("text", ["fs1:/srv/data", "u@[fd00::1]:/x", "/local"])
def test_location_round_trip(text: str) -> None:
    host, path = parse_location(text, "x")
    job = Job("j", "h", "/p", host, path)
    assert job.store == text


# --------------------------------------------------------------------------
# mode: tar (the default) or image
# --------------------------------------------------------------------------

def test_mode_is_tar_by_default_or_image() -> None:
    assert jobs.parse("j", MINIMAL).mode is jobs.BackupMode.TAR
    assert jobs.parse("j", MINIMAL + 'mode = "image"\n').mode is jobs.BackupMode.IMAGE
    assert jobs.parse("j", MINIMAL + 'mode = "tar"\n').mode == "tar"


@pytest.mark.hostile("proxy", "a job's mode that is not tar or image (a typo, a number)",
                     "config error naming the file, the key and the valid modes")
@pytest.mark.parametrize("value", ['"Image"', '"images"', "1", "true", '"tar\\n"'])
def test_a_bad_mode_names_file_key_and_the_modes(tmp_path: Path, value: str) -> None:
    path = write_job(tmp_path, "j", MINIMAL + f"mode = {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_job("j", tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{path}: mode: unknown backup mode "), message
    assert "(one of: tar, image)" in message and "\n" not in message


def test_an_image_job_with_a_group_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, "j", MINIMAL + 'mode = "image"\nwith = ["/srv/log"]\n')
    with pytest.raises(ConfigError, match=f"{path}: with: an image backup reads one volume"):
        load_job("j", tmp_path)


# --------------------------------------------------------------------------
# incremental and full_every (issue 13, file level)
# --------------------------------------------------------------------------

def test_incremental_is_off_by_default_and_full_every_defaults_to_7() -> None:
    job = jobs.parse("j", MINIMAL)
    assert job.incremental is False and job.full_every == jobs.DEFAULT_FULL_EVERY == 7
    job = jobs.parse("j", MINIMAL + "incremental = true\n")
    assert job.incremental is True and job.full_every == 7
    job = jobs.parse("j", MINIMAL + "incremental = true\nfull_every = 1\n")
    assert job.full_every == 1
    job = jobs.parse("j", MINIMAL + f"incremental = true\nfull_every = {jobs.MAX_FULL_EVERY}\n")
    assert job.full_every == jobs.MAX_FULL_EVERY
    assert jobs.parse("j", MINIMAL + 'mode = "tar"\nincremental = false\n').incremental is False


@pytest.mark.hostile("proxy", "a job's incremental that is not a boolean (\"yes\", 1)",
                     "config error naming the file and the key")
@pytest.mark.parametrize("value", ['"yes"', "1", '"true"', "[]"])
def test_a_bad_incremental_names_file_and_key(tmp_path: Path, value: str) -> None:
    path = write_job(tmp_path, "j", MINIMAL + f"incremental = {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_job("j", tmp_path)
    assert str(exc.value).startswith(f"{path}: incremental: must be true or false"), exc.value


@pytest.mark.hostile("proxy", "a job's full_every of 0, -1, 1001, 2.5, true or \"7\"",
                     "config error naming the file, the key and the range")
@pytest.mark.parametrize("value", ["0", "-1", "1001", "2.5", "true", '"7"', "1e3"])
def test_full_every_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    path = write_job(tmp_path, "j", MINIMAL + f"incremental = true\nfull_every = {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_job("j", tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{path}: full_every: must be a whole number of levels from 1 "
                              f"to {jobs.MAX_FULL_EVERY}"), message
    assert "\n" not in message


@pytest.mark.hostile("proxy", "a job's full_every without incremental = true",
                     "config error: full_every needs incremental")
@pytest.mark.parametrize("extra", ["", "incremental = false\n"])
def test_full_every_without_incremental_is_refused(tmp_path: Path, extra: str) -> None:
    path = write_job(tmp_path, "j", MINIMAL + extra + "full_every = 3\n")
    with pytest.raises(ConfigError, match=f"{path}: full_every: needs incremental = true"):
        load_job("j", tmp_path)


@pytest.mark.hostile("proxy", "a job with mode = \"image\" and incremental = true",
                     "config error: incremental is for tar")
def test_an_incremental_image_job_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, "j", MINIMAL + 'mode = "image"\nincremental = true\n')
    with pytest.raises(ConfigError, match=f"{path}: incremental: is for mode = \"tar\""):
        load_job("j", tmp_path)
    # with full_every too: still the mode is what is wrong
    write_job(tmp_path, "k", MINIMAL + 'mode = "image"\nincremental = true\nfull_every = 2\n')
    with pytest.raises(ConfigError, match="incremental: is for mode"):
        load_job("k", tmp_path)
