"""Repository keys and the files that hold them.

A repository has three random secrets (:class:`RepoKeys`): ``enc_key`` seals
objects (:mod:`sanoffload.store.crypt`), ``id_key`` names them, and ``repo_id``
says which repository they belong to (it is also in the repository's
unencrypted config, so a key of another repository is refused by name before
anything is read). They live in a JSON key file, mode 0600, in one of two
kinds::

    {"format": "sanoffload-key", "version": 1, "repo_id": "<32 hex>", "created": "...",
     "kdf": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": b64(16), "nonce": b64(12),
     "data": b64(AES-256-GCM(kek, nonce, secrets JSON, aad=b"sanoffload-key|" + repo_id))}

    {"format": "sanoffload-key", "version": 1, "repo_id": ..., "created": ...,
     "kdf": "none", "enc_key": b64(32), "id_key": b64(32)}

``kek = scrypt(passphrase, salt, n, r, p)``: restic's scheme, with an AEAD so
a wrong passphrase fails the tag (RepositoryKeyError, exit 15) instead of
yielding other keys. The raw kind is for an unattended proxy, which would
otherwise keep a passphrase beside the file anyway; it is refused unless it is
owned by root (or the user running sanoffload) and private to its owner.

Everything in a key file is hostile until checked: the read is size-bounded,
every field's type and length is checked, and scrypt's parameters are bounded
(a crafted ``n = 2**30`` would ask for 128 GiB and minutes of CPU).

A passphrase comes from a file (``--passphrase-file``), the environment
(``SANOFFLOAD_PASSPHRASE``) or a terminal prompt, never from argv (which every
user can read in /proc).
"""

from __future__ import annotations

import base64
import binascii
import errno
import getpass
import hmac
import json
import os
import re
import secrets
import stat
import sys
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..configfile import trusted_owners
from ..durable import fsync_dir, write_temp
from ..errors import ConfigError, RepositoryKeyError, ResourceError, UsageError
from ..text import printable
from .backend_dir import _publish
from .pyca import AESGCM, InvalidTag, Scrypt

FORMAT = "sanoffload-key"
VERSION = 1
KEY_BYTES = 32
REPO_ID_BYTES = 16

KDF_SCRYPT = "scrypt"
KDF_NONE = "none"
#: restic uses 2**15..2**16; 2**17 (128 MiB) costs about a second on a small proxy, once a run
DEFAULT_N = 1 << 17
DEFAULT_R = 8
DEFAULT_P = 1
#: what a key file may ask of scrypt: memory is 128 * n * r bytes (1 GiB at the top), CPU n*r*p;
#: MIN_N is low only so tests stay fast: a file's author could write anything weaker anyway
MIN_N = 1 << 12
MAX_N = 1 << 20
MAX_R = 16
MAX_P = 4
MAX_SCRYPT_MEMORY = 1 << 30
SALT_MIN, SALT_MAX = 16, 64
NONCE_BYTES = 12

#: a key file is a few hundred bytes; anything this big is not one
MAX_KEY_FILE_BYTES = 64 << 10
MAX_PASSPHRASE_BYTES = 4096
PASSPHRASE_ENV = "SANOFFLOAD_PASSPHRASE"
NEW_PASSPHRASE_ENV = "SANOFFLOAD_NEW_PASSPHRASE"

_HEX32 = re.compile(r"[0-9a-f]{32}")
_AAD_PREFIX = b"sanoffload-key|"


@dataclass(frozen=True, repr=False, eq=False)
class RepoKeys:
    """A repository's secrets. ``repr`` shows the repository id only, never a key."""

    enc_key: bytes
    id_key: bytes
    repo_id: bytes

    def __post_init__(self) -> None:
        for field, size in (("enc_key", KEY_BYTES), ("id_key", KEY_BYTES),
                            ("repo_id", REPO_ID_BYTES)):
            value = getattr(self, field)
            if not isinstance(value, bytes) or len(value) != size:
                raise RepositoryKeyError(f"a repository key's {field} must be {size} bytes")

    @classmethod
    def generate(cls) -> RepoKeys:
        """Fresh random keys for a new repository."""
        return cls(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(KEY_BYTES),
                   secrets.token_bytes(REPO_ID_BYTES))

    @property
    def repo_id_hex(self) -> str:
        return self.repo_id.hex()

    def __repr__(self) -> str:
        return f"RepoKeys(repo_id={self.repo_id.hex()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RepoKeys):
            return NotImplemented
        return hmac.compare_digest(self.enc_key + self.id_key + self.repo_id,
                                   other.enc_key + other.id_key + other.repo_id)

    def __hash__(self) -> int:
        return hash(self.repo_id)


@dataclass(frozen=True)
class KeyFileInfo:
    """What a key file says about itself, read without a passphrase (so: unauthenticated)."""

    path: str
    repo_id: str
    kdf: str
    created: str
    n: int | None = None
    r: int | None = None
    p: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "repo_id": self.repo_id, "kdf": self.kdf,
                               "created": self.created}
        if self.kdf == KDF_SCRYPT:
            out.update(n=self.n, r=self.r, p=self.p)
        return out


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------

def parse_repo_id(value: bytes | str) -> bytes:
    """A repository id as 16 bytes, from bytes or 32 lower-case hex digits."""
    if isinstance(value, bytes) and len(value) == REPO_ID_BYTES:
        return value
    if isinstance(value, str) and _HEX32.fullmatch(value):
        return bytes.fromhex(value)
    raise RepositoryKeyError(f"not a repository id: {printable(str(value))[:80]} "
                             "(32 lower-case hex digits)")


def check_repo_id(keys: RepoKeys, expected: bytes | str, *, source: str = "the key") -> None:
    """RepositoryKeyError naming both ids unless ``keys`` belong to repository ``expected``."""
    _same_repo(keys.repo_id, expected, source)


def _same_repo(have: bytes, expected: bytes | str, source: str) -> None:
    want = parse_repo_id(expected)
    if not hmac.compare_digest(have, want):
        raise RepositoryKeyError(
            f"{source} is for repository {have.hex()}, not for this repository "
            f"({want.hex()})", hint="use the key file made for this repository")


def _secret_file_ok(name: str, st: os.stat_result, what: str) -> None:
    """A file holding a secret as is: owned by root or us, private to its owner."""
    owners = trusted_owners()
    if st.st_uid not in owners:
        raise ConfigError(f"{what} {name}: owned by uid {st.st_uid}, must be owned by root "
                          f"or the user running sanoffload", hint=f"chown root: {name}")
    if st.st_mode & 0o077:
        raise ConfigError(f"{what} {name}: readable or writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); it holds a secret",
                          hint=f"chmod 600 {name}")


def _read_small(path: str | os.PathLike[str], limit: int, what: str
                ) -> tuple[bytes, os.stat_result]:
    """At most ``limit`` bytes of a regular file, and the fstat of what was read."""
    name = os.fspath(path)
    try:
        # NOFOLLOW: the checks below are on what is opened; NONBLOCK: a FIFO cannot hang us
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RepositoryKeyError(f"no {what} {printable(name)}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {printable(name)}: is a symbolic link; name the file "
                              "itself") from None
        raise RepositoryKeyError(f"{what} {printable(name)}: cannot read: "
                                 f"{exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {printable(name)}: not a regular file")
        if st.st_size > limit:
            raise RepositoryKeyError(f"{what} {printable(name)}: {st.st_size} bytes, more than "
                                     f"{limit}: not a {what}")
        chunks: list[bytes] = []
        size = 0
        while True:  # bounded even if the file grows after the fstat
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise RepositoryKeyError(f"{what} {printable(name)}: more than {limit} bytes: "
                                         f"not a {what}")
            chunks.append(chunk)
    except OSError as exc:
        raise RepositoryKeyError(f"{what} {printable(name)}: cannot read: "
                                 f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return b"".join(chunks), st


def _b64(doc: Mapping[str, Any], field: str, lo: int, hi: int, bad: Callable[[str], Exception]
         ) -> bytes:
    value = doc.get(field)
    if not isinstance(value, str) or len(value) > 4 * hi:
        raise bad(f"{field} is not base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{field} is not base64 text") from None
    if not lo <= len(raw) <= hi:
        raise bad(f"{field} is {len(raw)} bytes, not {lo}" + ("" if lo == hi else f"..{hi}"))
    return raw


def _int(doc: Mapping[str, Any], field: str, lo: int, hi: int, bad: Callable[[str], Exception]
         ) -> int:
    value = doc.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"{field} must be a whole number in {lo}..{hi}, not "
                  f"{printable(repr(value))[:40]}")
    return value


def _parse(raw: bytes, name: str) -> dict[str, Any]:
    def bad(why: str) -> RepositoryKeyError:
        return RepositoryKeyError(f"key file {printable(name)}: not a sanoffload key file: {why}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if doc.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    version = doc.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise bad(f"version {printable(repr(version))[:20]} (this sanoffload reads {VERSION})")
    repo_id = doc.get("repo_id")
    if not isinstance(repo_id, str) or not _HEX32.fullmatch(repo_id):
        raise bad("repo_id is not 32 lower-case hex digits")
    created = doc.get("created", "")
    if not isinstance(created, str) or len(created) > 64:
        raise bad("created is not a short text")
    kdf = doc.get("kdf")
    out: dict[str, Any] = {"repo_id": repo_id, "created": created, "kdf": kdf}
    if kdf == KDF_SCRYPT:
        n = _int(doc, "n", MIN_N, MAX_N, bad)
        if n & (n - 1):
            raise bad(f"n = {n} is not a power of two")
        r = _int(doc, "r", 1, MAX_R, bad)
        p = _int(doc, "p", 1, MAX_P, bad)
        if 128 * n * r > MAX_SCRYPT_MEMORY:
            raise bad(f"scrypt n={n} r={r} needs more than {MAX_SCRYPT_MEMORY >> 20} MiB")
        out.update(n=n, r=r, p=p, salt=_b64(doc, "salt", SALT_MIN, SALT_MAX, bad),
                   nonce=_b64(doc, "nonce", NONCE_BYTES, NONCE_BYTES, bad),
                   data=_b64(doc, "data", 16, 1024, bad))
    elif kdf == KDF_NONE:
        out.update(enc_key=_b64(doc, "enc_key", KEY_BYTES, KEY_BYTES, bad),
                   id_key=_b64(doc, "id_key", KEY_BYTES, KEY_BYTES, bad))
    else:
        raise bad(f"kdf {printable(repr(kdf))[:40]} (known: {KDF_SCRYPT}, {KDF_NONE})")
    return out


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> AESGCM:
    # NFC: the same passphrase typed on two systems gives the same bytes
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")
    return AESGCM(Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret))


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_new(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` to ``path`` (0600) atomically and durably; never over an existing file."""
    final = Path(os.path.abspath(path))
    if not final.parent.is_dir():
        raise UsageError(f"{printable(str(final.parent))}: no such directory for the key file")
    if os.path.lexists(final):
        raise UsageError(f"{printable(str(final))} exists: not replacing a key file",
                         hint="move it away first, or name another file")
    payload = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    tmp = write_temp(final.parent, payload, prefix=".tmp-key-")
    try:
        try:
            # never over a key file written meanwhile (its repository's only key, perhaps)
            _publish(tmp, final)
        except ResourceError:
            raise UsageError(f"{printable(str(final))} exists: not replacing a key file") \
                from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final


def _wrapped_doc(keys: RepoKeys, passphrase: str, n: int, r: int, p: int) -> dict[str, Any]:
    if not isinstance(passphrase, str) or not passphrase:
        raise UsageError("an empty passphrase protects nothing")
    if not (MIN_N <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P
            and 128 * n * r <= MAX_SCRYPT_MEMORY):
        raise UsageError(f"scrypt parameters n={n} r={r} p={p} are outside what loading accepts")
    salt = secrets.token_bytes(SALT_MIN)
    nonce = secrets.token_bytes(NONCE_BYTES)
    inner = json.dumps({"enc_key": base64.b64encode(keys.enc_key).decode(),
                        "id_key": base64.b64encode(keys.id_key).decode(),
                        "repo_id": keys.repo_id.hex()}, sort_keys=True).encode()
    data = _kek(passphrase, salt, n, r, p).encrypt(nonce, inner, _AAD_PREFIX + keys.repo_id)
    return {"format": FORMAT, "version": VERSION, "repo_id": keys.repo_id.hex(),
            "created": _now(), "kdf": KDF_SCRYPT, "n": n, "r": r, "p": p,
            "salt": base64.b64encode(salt).decode(), "nonce": base64.b64encode(nonce).decode(),
            "data": base64.b64encode(data).decode()}


def write_key_file(path: str | os.PathLike[str], keys: RepoKeys, passphrase: str, *,
                   n: int | None = None, r: int = DEFAULT_R, p: int = DEFAULT_P) -> Path:
    """Write ``keys`` to a new passphrase-protected key file (0600); never replaces a file.

    ``n`` (scrypt's cost, :data:`DEFAULT_N` when None) lower than the default is for tests;
    the file records it."""
    # None: the module's DEFAULT_N as it is now (tests lower it for speed)
    return _write_new(path, _wrapped_doc(keys, passphrase, DEFAULT_N if n is None else n, r, p))


def create_key_file(path: str | os.PathLike[str], passphrase: str, *,
                    n: int | None = None) -> RepoKeys:
    """New random keys for a new repository, written to ``path`` under ``passphrase``."""
    keys = RepoKeys.generate()
    write_key_file(path, keys, passphrase, n=n)
    return keys


def write_raw_key_file(path: str | os.PathLike[str], keys: RepoKeys) -> Path:
    """Write ``keys`` unwrapped (0600), for an unattended proxy; never replaces a file."""
    return _write_new(path, {"format": FORMAT, "version": VERSION,
                             "repo_id": keys.repo_id.hex(), "created": _now(),
                             "kdf": KDF_NONE,
                             "enc_key": base64.b64encode(keys.enc_key).decode(),
                             "id_key": base64.b64encode(keys.id_key).decode()})


def export_key(keys: RepoKeys, dest: str | os.PathLike[str], passphrase: str, *,
               n: int | None = None) -> Path:
    """A passphrase-protected copy of ``keys`` at ``dest`` (fresh salt), for keeping offline."""
    return write_key_file(dest, keys, passphrase, n=n)


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------

Passphrase = str | Callable[[], str] | None


def key_file_info(path: str | os.PathLike[str]) -> KeyFileInfo:
    """What ``path`` says about itself (checked, but not authenticated: no passphrase needed)."""
    name = os.fspath(path)
    raw, _ = _read_small(name, MAX_KEY_FILE_BYTES, "key file")
    doc = _parse(raw, name)
    return KeyFileInfo(path=name, repo_id=doc["repo_id"], kdf=doc["kdf"],
                       created=doc["created"], n=doc.get("n"), r=doc.get("r"), p=doc.get("p"))


def load_key_file(path: str | os.PathLike[str], passphrase: Passphrase = None, *,
                  expected_repo_id: bytes | str | None = None) -> RepoKeys:
    """The keys in ``path``: RepositoryKeyError (exit 15) for a wrong passphrase, a key of
    another repository than ``expected_repo_id`` (both ids named), or a file that is not a
    key file; ConfigError (exit 2) for a raw key file others could read.

    ``passphrase`` may be a callable, asked only when the file is passphrase-protected (a
    raw key file needs none).
    """
    name = os.fspath(path)
    raw, st = _read_small(name, MAX_KEY_FILE_BYTES, "key file")
    doc = _parse(raw, name)
    shown = printable(name)
    file_repo = bytes.fromhex(doc["repo_id"])
    if expected_repo_id is not None:
        # before the costly scrypt: the id in the file is unauthenticated, but a mismatch is
        # already a refusal (and a forged match still has to pass the tag)
        _same_repo(file_repo, expected_repo_id, f"key file {shown}")
    if doc["kdf"] == KDF_NONE:
        _secret_file_ok(shown, st, "raw key file")
        return RepoKeys(doc["enc_key"], doc["id_key"], file_repo)
    secret = passphrase() if callable(passphrase) else passphrase
    if not secret:
        raise RepositoryKeyError(f"key file {shown} (repository {doc['repo_id']}) needs its "
                                 "passphrase", hint=f"give --passphrase-file or set "
                                 f"{PASSPHRASE_ENV}")
    try:
        inner_raw = _kek(secret, doc["salt"], doc["n"], doc["r"], doc["p"]).decrypt(
            doc["nonce"], doc["data"], _AAD_PREFIX + file_repo)
    except InvalidTag:
        raise RepositoryKeyError(f"wrong passphrase for key file {shown} (repository "
                                 f"{doc['repo_id']})") from None
    # authenticated from here on: only our own writer could have made it, but check anyway
    try:
        inner = json.loads(inner_raw.decode("utf-8"))
        keys = RepoKeys(base64.b64decode(inner["enc_key"], validate=True),
                        base64.b64decode(inner["id_key"], validate=True),
                        bytes.fromhex(inner["repo_id"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        raise RepositoryKeyError(f"key file {shown}: its sealed secrets are malformed") \
            from None
    if keys.repo_id != file_repo:
        raise RepositoryKeyError(f"key file {shown}: sealed for repository {keys.repo_id.hex()} "
                                 f"but labelled {doc['repo_id']}")
    return keys


def import_key(src: str | os.PathLike[str], passphrase: Passphrase,
               dest: str | os.PathLike[str], *, new_passphrase: str | None = None,
               raw: bool = False, expected_repo_id: bytes | str | None = None,
               n: int | None = None) -> RepoKeys:
    """Install the key in ``src`` at ``dest``: passphrase-protected (``new_passphrase``, or the
    source's when None) or, with ``raw``, unwrapped for an unattended proxy."""
    asked: list[str] = []

    def once() -> str:
        # one prompt serves both the source and, by default, the new file
        if not asked:
            asked.append((passphrase() if callable(passphrase) else passphrase) or "")
        return asked[0]

    keys = load_key_file(src, once, expected_repo_id=expected_repo_id)
    if raw:
        write_raw_key_file(dest, keys)
        return keys
    if new_passphrase is None:
        new_passphrase = once()
    if not new_passphrase:
        raise UsageError("a passphrase for the imported key file is needed (the source is a raw "
                         "key file)", hint="give --new-passphrase-file, set "
                         f"{NEW_PASSPHRASE_ENV}, or use --raw")
    write_key_file(dest, keys, new_passphrase, n=n)
    return keys


# --------------------------------------------------------------------------
# passphrases
# --------------------------------------------------------------------------

def read_passphrase_file(path: str | os.PathLike[str]) -> str:
    """The passphrase in ``path`` (one trailing newline dropped); the file must be private."""
    name = os.fspath(path)
    raw, st = _read_small(name, MAX_PASSPHRASE_BYTES, "passphrase file")
    _secret_file_ok(printable(name), st, "passphrase file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"passphrase file {printable(name)}: not UTF-8") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise UsageError(f"passphrase file {printable(name)} is empty")
    return text


def get_passphrase(passphrase_file: str | os.PathLike[str] | None = None, *,
                   env_var: str = PASSPHRASE_ENV, confirm: bool = False,
                   prompt: str = "Passphrase: ", option: str = "--passphrase-file",
                   environ: Mapping[str, str] | None = None,
                   ask: Callable[[str], str] | None = None) -> str:
    """A passphrase from ``passphrase_file``, else ``env_var``, else the terminal.

    ``confirm`` asks twice at the terminal (a new passphrase). UsageError when none of the
    three is there (no terminal: a scheduled run must name a file or set the variable).
    ``option`` names the command's file option in that message; ``environ``/``ask`` are for
    tests.
    """
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    env = os.environ if environ is None else environ
    if env.get(env_var):
        return env[env_var]
    if ask is None:
        if not sys.stdin.isatty():
            raise UsageError(f"no passphrase: give {option} FILE or set {env_var}, or run "
                             "on a terminal")
        ask = getpass.getpass
    first = ask(prompt)
    if not first:
        raise UsageError("an empty passphrase protects nothing")
    if confirm and ask("Again: ") != first:
        raise UsageError("the two passphrases differ")
    return first
