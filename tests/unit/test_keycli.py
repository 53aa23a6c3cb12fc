"""``sanoffload key``: init, export, import, show; exit codes and never a secret printed."""

from __future__ import annotations

import base64
import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sanoffload import cli
from sanoffload.store import keys as keysmod
from sanoffload.store.keys import MIN_N, RepoKeys, load_key_file, write_raw_key_file

pytestmark = pytest.mark.unit

PASS = "tr0ub4dor&3 and more"


@pytest.fixture(autouse=True)
def setup(monkeypatch: pytest.MonkeyPatch) -> None:
    # registered by the coordinator in cli.LAZY_COMMANDS; set here so the test stands alone
    monkeypatch.setitem(cli.LAZY_COMMANDS, "key", "sanoffload.store.keycli:key")
    monkeypatch.setattr(keysmod, "DEFAULT_N", MIN_N)  # scrypt in milliseconds
    monkeypatch.delenv("SANOFFLOAD_PASSPHRASE", raising=False)
    monkeypatch.delenv("SANOFFLOAD_NEW_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal: nothing may prompt


def pfile(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def secrets_of(keys: RepoKeys) -> list[str]:
    return [s for k in (keys.enc_key, keys.id_key)
            for s in (k.hex(), base64.b64encode(k).decode())]


def one_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("sanoffload: error: "), err
    return err


def test_init_show_export_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = pfile(tmp_path / "pass", PASS)
    key = tmp_path / "repo.key"
    assert cli.run(["key", "init", "--passphrase-file", p, str(key)]) == 0
    keys = load_key_file(key, PASS)
    out = capsys.readouterr().out
    assert keys.repo_id_hex in out and stat.S_IMODE(key.stat().st_mode) == 0o600

    assert cli.run(["key", "show", str(key)]) == 0
    assert cli.run(["key", "show", "--json", "--check", "--passphrase-file", p, str(key)]) == 0
    text, js = capsys.readouterr().out.split("\n{", 1)
    assert keys.repo_id_hex in text and f"scrypt n={MIN_N} r=8 p=1" in text
    data = json.loads("{" + js)
    assert data["repo_id"] == keys.repo_id_hex and data["checked"] is True
    assert data["kdf"] == "scrypt" and data["n"] == MIN_N
    for secret in secrets_of(keys):
        assert secret not in text + js

    usb = tmp_path / "usb.key"
    assert cli.run(["key", "export", "--passphrase-file", p, "--new-passphrase-file",
                    pfile(tmp_path / "new", "offline words"), str(key), str(usb)]) == 0
    assert load_key_file(usb, "offline words") == keys

    raw = tmp_path / "proxy.key"
    assert cli.run(["key", "import", "--raw", "--repo-id", keys.repo_id_hex,
                    "--passphrase-file", str(tmp_path / "new"), str(usb), str(raw)]) == 0
    assert load_key_file(raw) == keys
    assert cli.run(["key", "show", str(raw)]) == 0
    out = capsys.readouterr().out
    assert "(raw)" in out and keys.repo_id_hex in out
    for secret in secrets_of(keys):
        assert secret not in out


def test_passphrase_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SANOFFLOAD_PASSPHRASE", PASS)
    key = tmp_path / "k"
    assert cli.run(["key", "init", str(key)]) == 0
    keys = load_key_file(key, PASS)
    # export keeps the passphrase by default; import with a new one from the environment
    assert cli.run(["key", "export", str(key), str(tmp_path / "copy")]) == 0
    assert load_key_file(tmp_path / "copy", PASS) == keys
    monkeypatch.setenv("SANOFFLOAD_NEW_PASSPHRASE", "second")
    assert cli.run(["key", "import", str(tmp_path / "copy"), str(tmp_path / "inst")]) == 0
    assert load_key_file(tmp_path / "inst", "second") == keys


def test_raw_init_and_export_of_a_raw_key(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw.key"
    assert cli.run(["key", "init", "--raw", str(raw)]) == 0
    keys = load_key_file(raw)
    assert cli.run(["key", "show", str(raw)]) == 0
    assert "raw: no passphrase" in capsys.readouterr().out
    # a raw key has no passphrase to keep: export needs a new one, and no terminal is here
    assert cli.run(["key", "export", str(raw), str(tmp_path / "x")]) == 2
    assert "--new-passphrase-file FILE or set SANOFFLOAD_NEW_PASSPHRASE" in \
        one_error(capsys.readouterr().err)
    assert cli.run(["key", "export", "--new-passphrase-file", pfile(tmp_path / "n", "w"),
                    str(raw), str(tmp_path / "x")]) == 0
    assert load_key_file(tmp_path / "x", "w") == keys


@pytest.mark.hostile("store", "'key init' with no passphrase source and no terminal, or over "
                     "an existing key file", "exit 2, one line; the existing file unchanged")
def test_init_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    assert cli.run(["key", "init", str(key)]) == 2
    assert "SANOFFLOAD_PASSPHRASE" in one_error(capsys.readouterr().err)
    assert not key.exists()
    write_raw_key_file(key, RepoKeys.generate())
    before = key.read_bytes()
    assert cli.run(["key", "init", "--raw", str(key)]) == 2
    assert "not replacing" in one_error(capsys.readouterr().err)
    assert key.read_bytes() == before


@pytest.mark.hostile("store", "a passphrase given on the command line",
                     "refused by the parser (exit 2): there is no such option")
def test_no_passphrase_in_argv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["key", "init", "--passphrase", PASS, str(tmp_path / "k")]) == 2
    assert "No such option" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


@pytest.mark.hostile("store", "'key show --check' or 'key import' with a wrong passphrase or "
                     "another repository's key", "exit 15, one line naming the repository ids")
def test_wrong_passphrase_and_other_repository(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    p = pfile(tmp_path / "pass", PASS)
    key = tmp_path / "repo.key"
    assert cli.run(["key", "init", "--passphrase-file", p, str(key)]) == 0
    keys = load_key_file(key, PASS)
    capsys.readouterr()
    wrong = pfile(tmp_path / "wrong", "not it")
    assert cli.run(["key", "show", "--check", "--passphrase-file", wrong, str(key)]) == 15
    assert f"wrong passphrase for key file {key} (repository {keys.repo_id_hex})" in \
        one_error(capsys.readouterr().err)
    other = RepoKeys.generate().repo_id_hex
    assert cli.run(["key", "import", "--passphrase-file", p, "--repo-id", other, str(key),
                    str(tmp_path / "x")]) == 15
    err = one_error(capsys.readouterr().err)
    assert other in err and keys.repo_id_hex in err
    assert not (tmp_path / "x").exists()


@pytest.mark.hostile("store", "a key file whose 'created' field holds terminal escapes and "
                     "newlines", "'key show' prints them escaped, on one line")
def test_show_escapes_what_the_file_says(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_raw_key_file(tmp_path / "raw.key", RepoKeys.generate())
    doc = json.loads(raw.read_text())
    doc["created"] = "2026\n\x1b]0;pwned\x07"
    forged = tmp_path / "forged.key"
    forged.write_text(json.dumps(doc))
    forged.chmod(0o600)
    assert cli.run(["key", "show", str(forged)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "created     2026\\n\\x1b]0;pwned\\x07\n" in out


def test_without_pyca_cryptography_a_key_command_says_what_to_install() -> None:
    # a fresh interpreter in which the package cannot be imported (a proxy without the s3 extra)
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from sanoffload.cli import run\n"
            "sys.exit(run(['key', 'show', '/nonexistent/repo.key']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 4, res.stderr
    assert "pyca/cryptography" in res.stderr and "sanoffload[s3]" in res.stderr
    assert "Traceback" not in res.stderr
