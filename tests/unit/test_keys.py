"""Repository keys and key files (sanoffload.store.keys).

Real scrypt and AES-GCM; files in tmp_path. scrypt runs at n = MIN_N (4 MiB, a
few ms) so the suite stays fast; the file records n and loading bounds it, as
the hostile cases check.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sanoffload.errors import ConfigError, RepositoryKeyError, UsageError
from sanoffload.store import keys as keysmod
from sanoffload.store.keys import (
    MAX_KEY_FILE_BYTES,
    MIN_N,
    PASSPHRASE_ENV,
    RepoKeys,
    check_repo_id,
    create_key_file,
    export_key,
    get_passphrase,
    import_key,
    key_file_info,
    load_key_file,
    read_passphrase_file,
    write_key_file,
    write_raw_key_file,
)

pytestmark = pytest.mark.unit

PASS = "correct horse battery staple"


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def keyfile(tmp_path: Path) -> tuple[Path, RepoKeys]:
    path = tmp_path / "repo.key"
    return path, create_key_file(path, PASS, n=MIN_N)


def doc_of(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def write_doc(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# keys and key files
# --------------------------------------------------------------------------

def test_repr_never_shows_a_secret() -> None:
    keys = RepoKeys.generate()
    text = repr(keys) + str(keys)
    assert keys.repo_id.hex() in text
    for secret in (keys.enc_key, keys.id_key):
        assert secret.hex() not in text and repr(secret) not in text
        assert base64.b64encode(secret).decode() not in text
    with pytest.raises(RepositoryKeyError):
        RepoKeys(b"short", keys.id_key, keys.repo_id)


def test_create_and_load_round_trip(keyfile: tuple[Path, RepoKeys]) -> None:
    path, keys = keyfile
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path, PASS) == keys
    assert load_key_file(path, lambda: PASS, expected_repo_id=keys.repo_id_hex) == keys
    doc = doc_of(path)
    assert doc["kdf"] == "scrypt" and doc["n"] == MIN_N and doc["r"] == 8 and doc["p"] == 1
    assert doc["repo_id"] == keys.repo_id_hex
    raw = path.read_text()
    for secret in (keys.enc_key, keys.id_key):
        assert base64.b64encode(secret).decode() not in raw and secret.hex() not in raw
    info = key_file_info(path)
    assert (info.repo_id, info.kdf, info.n) == (keys.repo_id_hex, "scrypt", MIN_N)
    assert [p.name for p in path.parent.iterdir()] == ["repo.key"]  # no temporary left


def test_default_cost_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert keysmod.DEFAULT_N == 1 << 17  # the production cost (research doc 4.2)
    monkeypatch.setattr(keysmod, "DEFAULT_N", 1 << 13)  # read at call time, not import time
    create_key_file(tmp_path / "k", PASS)
    assert doc_of(tmp_path / "k")["n"] == 1 << 13


def test_create_never_replaces_a_file(keyfile: tuple[Path, RepoKeys]) -> None:
    path, keys = keyfile
    before = path.read_bytes()
    with pytest.raises(UsageError, match="not replacing"):
        create_key_file(path, PASS, n=MIN_N)
    with pytest.raises(UsageError, match="not replacing"):
        write_raw_key_file(path, keys)
    assert path.read_bytes() == before
    with pytest.raises(UsageError, match="no such directory"):
        create_key_file(path.parent / "missing" / "k", PASS, n=MIN_N)
    with pytest.raises(UsageError, match="empty passphrase"):
        create_key_file(path.parent / "k2", "", n=MIN_N)
    with pytest.raises(UsageError, match="scrypt parameters"):
        create_key_file(path.parent / "k3", PASS, n=1 << 30)
    assert sorted(p.name for p in path.parent.iterdir()) == ["repo.key"]


@pytest.mark.hostile("store", "a key file opened with the wrong passphrase",
                     "RepositoryKeyError (exit 15): wrong passphrase, naming file and repository")
def test_wrong_passphrase(keyfile: tuple[Path, RepoKeys]) -> None:
    path, keys = keyfile
    with pytest.raises(RepositoryKeyError) as err:
        load_key_file(path, "Correct horse battery staple")
    assert err.value.exit_code == 15
    assert str(err.value) == (f"wrong passphrase for key file {path} (repository "
                              f"{keys.repo_id_hex})")
    with pytest.raises(RepositoryKeyError, match="needs its passphrase"):
        load_key_file(path, None)


@pytest.mark.hostile("store", "a key file of another repository", "RepositoryKeyError (exit 15) "
                     "naming both repository ids, before scrypt runs")
def test_key_of_another_repository(keyfile: tuple[Path, RepoKeys],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, keys = keyfile
    other = RepoKeys.generate()
    asked: list[int] = []

    def passphrase() -> str:
        asked.append(1)
        return PASS

    with pytest.raises(RepositoryKeyError) as err:
        load_key_file(path, passphrase, expected_repo_id=other.repo_id)
    assert keys.repo_id_hex in str(err.value) and other.repo_id_hex in str(err.value)
    assert asked == []  # refused from the label, no passphrase asked, no scrypt
    with pytest.raises(RepositoryKeyError, match=other.repo_id_hex):
        check_repo_id(keys, other.repo_id_hex)
    check_repo_id(keys, keys.repo_id_hex)
    with pytest.raises(RepositoryKeyError, match="not a repository id"):
        check_repo_id(keys, "XYZ")


@pytest.mark.hostile("store", "a key file relabelled with another repository's id",
                     "RepositoryKeyError: the id is bound to the sealed secrets")
def test_relabelled_key_file_is_refused(keyfile: tuple[Path, RepoKeys]) -> None:
    path, _ = keyfile
    other = RepoKeys.generate()
    doc = doc_of(path)
    doc["repo_id"] = other.repo_id_hex
    forged = write_doc(path.parent / "forged.key", doc)
    with pytest.raises(RepositoryKeyError, match="wrong passphrase"):
        load_key_file(forged, PASS, expected_repo_id=other.repo_id_hex)


def _huge(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB claimed, nothing written


def _deep(path: Path) -> None:
    path.write_text("[" * 30_000 + "]" * 30_000)


HOSTILE_DOCS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "n 2**30": (lambda d: {**d, "n": 1 << 30}, "n must be a whole number in"),
    "n 2**21": (lambda d: {**d, "n": 1 << 21}, "n must be"),
    "n not a power of two": (lambda d: {**d, "n": (1 << 14) + 1}, "power of two"),
    "n as text": (lambda d: {**d, "n": "131072"}, "n must be"),
    "n as bool": (lambda d: {**d, "n": True}, "n must be"),
    "n as float": (lambda d: {**d, "n": 131072.0}, "n must be"),
    "n below the floor": (lambda d: {**d, "n": 2}, "n must be"),
    "r huge": (lambda d: {**d, "r": 1 << 20}, "r must be"),
    "r and n over 1 GiB": (lambda d: {**d, "n": 1 << 20, "r": 16}, "needs more than"),
    "p huge": (lambda d: {**d, "p": 1 << 30}, "p must be"),
    "salt short": (lambda d: {**d, "salt": base64.b64encode(b"x").decode()}, "salt is 1 bytes"),
    "salt a number": (lambda d: {**d, "salt": 5}, "salt is not base64"),
    "nonce bad base64": (lambda d: {**d, "nonce": "!!!!"}, "nonce is not base64"),
    "data huge": (lambda d: {**d, "data": "A" * 40000}, "data is not base64"),
    "repo_id upper case": (lambda d: {**d, "repo_id": d["repo_id"].upper()}, "repo_id"),
    "repo_id a list": (lambda d: {**d, "repo_id": [1]}, "repo_id"),
    "version 2": (lambda d: {**d, "version": 2}, "version 2"),
    "version true": (lambda d: {**d, "version": True}, "version True"),
    "kdf argon9": (lambda d: {**d, "kdf": "argon9"}, "kdf 'argon9'"),
    "no format": (lambda d: {k: v for k, v in d.items() if k != "format"}, "format"),
    "created huge": (lambda d: {**d, "created": "x" * 1000}, "created"),
    "a list": (lambda d: [d], "not a JSON object"),
    "huge integer": (lambda d: d, "not JSON"),
}


@pytest.mark.hostile("store", "a crafted key file: scrypt n=2**30 or r/p huge, wrong types, bad "
                     "base64, unknown kdf/version, not JSON, 1 GiB, nested 30,000 deep",
                     "RepositoryKeyError (exit 15) at once; no scrypt run, no big allocation")
@pytest.mark.parametrize("case", [*HOSTILE_DOCS, "1 GiB file", "deep nesting", "binary"])
def test_hostile_key_files(keyfile: tuple[Path, RepoKeys], case: str) -> None:
    path, _ = keyfile
    bad = path.parent / "bad.key"
    if case == "1 GiB file":
        _huge(bad)
        match = f"more than {MAX_KEY_FILE_BYTES}"
    elif case == "deep nesting":
        _deep(bad)
        match = "not JSON"
    elif case == "binary":
        bad.write_bytes(b"\xff\xfe\x00{")
        match = "not JSON"
    elif case == "huge integer":
        text = path.read_text().replace(f'"n": {MIN_N}', '"n": ' + "9" * 5000)
        assert text != path.read_text()
        bad.write_text(text)
        match = "not JSON"
    else:
        change, match = HOSTILE_DOCS[case]
        write_doc(bad, change(doc_of(path)))
    started = time.monotonic()
    with pytest.raises(RepositoryKeyError, match=match) as err:
        load_key_file(bad, PASS)
    assert time.monotonic() - started < 5  # a 2**30 scrypt would take minutes and 128 GiB
    assert err.value.exit_code == 15 and "bad.key" in str(err.value)
    with pytest.raises(RepositoryKeyError):
        key_file_info(bad)


@pytest.mark.hostile("store", "a key file that is a symlink, a FIFO, a directory, or missing",
                     "refused at once with the reason (a FIFO does not hang the read)")
def test_key_file_kinds(tmp_path: Path, keyfile: tuple[Path, RepoKeys]) -> None:
    path, _ = keyfile
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symbolic link"):
        load_key_file(link, PASS)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key_file(fifo, PASS)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key_file(tmp_path, PASS)
    with pytest.raises(RepositoryKeyError, match="no key file"):
        load_key_file(tmp_path / "missing.key", PASS)


# --------------------------------------------------------------------------
# raw key files, passphrase files: secrets as files
# --------------------------------------------------------------------------

def test_raw_key_file_round_trip(tmp_path: Path) -> None:
    keys = RepoKeys.generate()
    path = write_raw_key_file(tmp_path / "raw.key", keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path) == keys  # no passphrase needed
    assert key_file_info(path).kdf == "none"
    with pytest.raises(RepositoryKeyError, match="not for this repository"):
        load_key_file(path, expected_repo_id=RepoKeys.generate().repo_id)


@pytest.mark.hostile("store", "a raw (unwrapped) key file readable by group/others, or owned by "
                     "another user", "refused (exit 2) naming the mode or owner and the fix")
def test_raw_key_file_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = RepoKeys.generate()
    path = write_raw_key_file(tmp_path / "raw.key", keys)
    for mode in (0o640, 0o604, 0o660, 0o606):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=f"mode {mode:04o}") as err:
            load_key_file(path)
        assert err.value.exit_code == 2 and "chmod 600" in str(err.value)
    path.chmod(0o400)
    assert load_key_file(path) == keys
    # owned by someone we do not trust (without root: make our own uid untrusted)
    monkeypatch.setattr(keysmod, "trusted_owners", lambda: frozenset({os.geteuid() + 4242}))
    with pytest.raises(ConfigError, match=f"owned by uid {os.geteuid()}"):
        load_key_file(path)


def test_passphrase_file(tmp_path: Path) -> None:
    assert read_passphrase_file(secret_file(tmp_path / "p", PASS + "\n")) == PASS
    assert read_passphrase_file(secret_file(tmp_path / "q", PASS + "\r\n")) == PASS
    assert read_passphrase_file(secret_file(tmp_path / "r", " spaced \n\n")) == " spaced \n"
    with pytest.raises(UsageError, match="empty"):
        read_passphrase_file(secret_file(tmp_path / "e", "\n"))


@pytest.mark.hostile("store", "a passphrase file readable by others, huge, or a symlink",
                     "refused with the reason; the passphrase is not used")
def test_hostile_passphrase_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode 0644"):
        read_passphrase_file(secret_file(tmp_path / "p", PASS, 0o644))
    big = tmp_path / "big"
    _huge(big)
    big.chmod(0o600)
    with pytest.raises(RepositoryKeyError, match="more than 4096"):
        read_passphrase_file(big)
    (tmp_path / "l").symlink_to(secret_file(tmp_path / "ok", PASS))
    with pytest.raises(ConfigError, match="symbolic link"):
        read_passphrase_file(tmp_path / "l")


def test_passphrase_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pfile = secret_file(tmp_path / "p", "from-file\n")
    env = {PASSPHRASE_ENV: "from-env"}
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return "from-tty"

    assert get_passphrase(pfile, environ=env, ask=ask) == "from-file"
    assert get_passphrase(None, environ=env, ask=ask) == "from-env"
    assert get_passphrase(None, environ={PASSPHRASE_ENV: ""}, ask=ask) == "from-tty"
    assert get_passphrase(None, environ={}, ask=ask, confirm=True) == "from-tty"
    assert prompts == ["Passphrase: ", "Passphrase: ", "Again: "]
    answers = iter(["one", "two"])
    with pytest.raises(UsageError, match="differ"):
        get_passphrase(None, environ={}, ask=lambda _: next(answers), confirm=True)
    with pytest.raises(UsageError, match="empty"):
        get_passphrase(None, environ={}, ask=lambda _: "")


def test_no_terminal_no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(UsageError, match="--passphrase-file") as err:
        get_passphrase(None, environ={})
    assert PASSPHRASE_ENV in str(err.value)


# --------------------------------------------------------------------------
# export and import
# --------------------------------------------------------------------------

def test_export_with_a_new_passphrase(keyfile: tuple[Path, RepoKeys], tmp_path: Path) -> None:
    path, keys = keyfile
    out = export_key(load_key_file(path, PASS), tmp_path / "usb.key", "other words", n=MIN_N)
    assert load_key_file(out, "other words") == keys
    assert doc_of(out)["salt"] != doc_of(path)["salt"]
    with pytest.raises(RepositoryKeyError, match="wrong passphrase"):
        load_key_file(out, PASS)
    with pytest.raises(UsageError, match="not replacing"):
        export_key(keys, out, "x", n=MIN_N)


def test_import_raw_and_wrapped(keyfile: tuple[Path, RepoKeys], tmp_path: Path) -> None:
    path, keys = keyfile
    asked: list[int] = []

    def once() -> str:
        asked.append(1)
        return PASS

    assert import_key(path, once, tmp_path / "same.key", n=MIN_N) == keys
    assert asked == [1]  # one prompt opens the source and protects the copy
    assert load_key_file(tmp_path / "same.key", PASS) == keys
    assert import_key(path, PASS, tmp_path / "raw.key", raw=True) == keys
    assert load_key_file(tmp_path / "raw.key") == keys
    assert import_key(tmp_path / "raw.key", None, tmp_path / "new.key", new_passphrase="n2",
                      n=MIN_N) == keys
    assert load_key_file(tmp_path / "new.key", "n2") == keys
    with pytest.raises(UsageError, match="passphrase for the imported key"):
        import_key(tmp_path / "raw.key", None, tmp_path / "nopass.key", n=MIN_N)
    other = RepoKeys.generate()
    with pytest.raises(RepositoryKeyError, match=other.repo_id_hex):
        import_key(path, PASS, tmp_path / "x.key", expected_repo_id=other.repo_id_hex)
    assert not (tmp_path / "x.key").exists() and not (tmp_path / "nopass.key").exists()


def test_write_key_file_keeps_given_keys(tmp_path: Path) -> None:
    keys = RepoKeys.generate()
    write_key_file(tmp_path / "k", keys, PASS, n=MIN_N)
    assert load_key_file(tmp_path / "k", PASS) == keys
