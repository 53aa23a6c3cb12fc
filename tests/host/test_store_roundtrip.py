"""The store with real GNU tar and zstd, as root: a restore gives back exactly the frozen tree.

The source tree holds every kind of entry a backup must carry: modes (0750,
4755, 2775, 0555), numeric owners, nanosecond mtimes, symlinks (relative,
absolute, dangling), a hard link pair, a 64 MiB sparse file, xattrs (user.*,
and trusted.*/security.* where the filesystem takes them), POSIX ACLs (access
and default), an empty directory, a FIFO, names with spaces, a newline, quotes,
backslashes and non-UTF-8 bytes. It is archived with the proxy's own command
lines (tools/tar.py create | tools/zstd.py compress) into Repository.put,
restored, and the two trees compared entry by entry with os.lstat on bytes paths.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sanoffload import cli
from sanoffload.errors import IntegrityError, RefusedError
from sanoffload.runner import DEFAULT_PATH, Runner
from sanoffload.store.repo import BackupId, Repository
from sanoffload.store.restore import restore, stream_out
from sanoffload.tools import tar, zstd

pytestmark = pytest.mark.host

ENV = {"PATH": DEFAULT_PATH, "LC_ALL": "C"}
MiB = 1 << 20
SPARSE = b"sparse.img"
ACL_FILE = b"acl-file"
ACL_DIR = b"acl-dir"
#: names with everything a name can hold
ODD_NAMES = [b"with space", b"new\nline", b"bad-\xff\xfe-utf8", b"quote\"and\\backslash",
             b"-dash", b"arrow -> name", b"tab\there", b"\xe9t\xe9-latin1", b" lead"]


# --------------------------------------------------------------------------
# the source tree
# --------------------------------------------------------------------------

def _try_xattr(path: bytes, name: str, value: bytes) -> bool:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError:
        return False
    return True


def build_tree(root: bytes) -> dict[str, Any]:
    """Make the source tree under ``root``; return what optional features it got."""
    j = os.path.join
    os.mkdir(root)
    os.makedirs(j(root, b"dir", b"sub"))
    os.mkdir(j(root, b"empty-dir"))
    with open(j(root, b"plain.txt"), "wb") as f:
        f.write(b"hello\n")
    with open(j(root, b"dir", b"sub", b"deep.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    for name in ODD_NAMES:
        with open(j(root, name), "wb") as f:
            f.write(b"odd " + name)
    os.mkdir(j(root, b"dir\nwith newline"))
    with open(j(root, b"dir\nwith newline", b"inner \xff"), "wb") as f:
        f.write(b"inner")
    # modes and owners: chown first, since chown clears set-id bits
    with open(j(root, b"secret"), "wb") as f:
        f.write(b"s")
    os.chown(j(root, b"secret"), 1234, 5678)
    os.chmod(j(root, b"secret"), 0o750)
    with open(j(root, b"setuid"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chown(j(root, b"setuid"), 1234, 0)
    os.chmod(j(root, b"setuid"), 0o4755)
    os.mkdir(j(root, b"setgid-dir"))
    os.chown(j(root, b"setgid-dir"), 1234, 5678)
    os.chmod(j(root, b"setgid-dir"), 0o2775)
    with open(j(root, b"setgid-dir", b"f"), "wb") as f:
        f.write(b"g")
    os.chown(j(root, b"setgid-dir", b"f"), 4321, 5678)
    os.mkdir(j(root, b"readonly-dir"))
    with open(j(root, b"readonly-dir", b"inside"), "wb") as f:
        f.write(b"r")
    os.chmod(j(root, b"readonly-dir", b"inside"), 0o400)
    os.chmod(j(root, b"readonly-dir"), 0o555)
    # links
    os.symlink(b"plain.txt", j(root, b"symlink"))
    os.symlink(b"/etc/hostname", j(root, b"abs-symlink"))
    os.symlink(b"../nowhere", j(root, b"dir", b"dangling"))
    os.symlink(b"dir/sub", j(root, b"dir-symlink"))
    os.lchown(j(root, b"symlink"), 1234, 5678)
    with open(j(root, b"hard-a"), "wb") as f:
        f.write(b"one inode, two names")
    os.link(j(root, b"hard-a"), j(root, b"dir", b"hard-b"))
    os.link(j(root, b"hard-a"), j(root, b"new\nline hard"))
    # 64 MiB with two small islands of data
    with open(j(root, SPARSE), "wb") as f:
        f.write(b"head" * 1024)
        f.seek(32 * MiB)
        f.write(b"middle" * 1000)
        f.truncate(64 * MiB)
    os.mkfifo(j(root, b"fifo"), 0o640)
    # xattrs
    assert _try_xattr(j(root, b"plain.txt"), "user.test", b"value")
    assert _try_xattr(j(root, b"dir"), "user.test", b"\x00binary\xff")
    assert _try_xattr(j(root, b"new\nline"), "user.other", b"")
    assert _try_xattr(root, "user.root", b"on the root itself")
    features = {
        "trusted": _try_xattr(j(root, b"plain.txt"), "trusted.sanoffload", b"t"),
        "security": _try_xattr(j(root, b"plain.txt"), "security.sanoffload", b"s"),
    }
    # POSIX ACLs: an access ACL on a file, access + default on a directory
    with open(j(root, ACL_FILE), "wb") as f:
        f.write(b"acl")
    os.mkdir(j(root, ACL_DIR))
    subprocess.run([b"setfacl", b"-m", b"u:1234:rwx,g:5678:r", j(root, ACL_FILE)], check=True)
    subprocess.run([b"setfacl", b"-m", b"u:1234:rwx", j(root, ACL_DIR)], check=True)
    subprocess.run([b"setfacl", b"-d", b"-m", b"u:1234:rx", j(root, ACL_DIR)], check=True)
    # times last, children before parents, so nothing bumps them afterwards
    os.chown(root, 4321, 8765)
    os.chmod(root, 0o750)
    stamp = 1_700_000_000_123_456_789
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        entries += [os.path.join(dirpath, n) for n in filenames + dirnames]
        entries.append(dirpath)
    for i, p in enumerate(entries):
        t = stamp + i * 1_000_003_007  # distinct, with nanoseconds
        os.utime(p, ns=(t, t), follow_symlinks=False)
    return features


# --------------------------------------------------------------------------
# the comparator
# --------------------------------------------------------------------------

def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _acl(path: bytes) -> str:
    res = subprocess.run([b"getfacl", b"--numeric", b"--omit-header", b"--absolute-names",
                          b"--physical", path], capture_output=True, check=True)
    return res.stdout.decode()


def snapshot(root: bytes) -> dict[bytes, dict[str, Any]]:
    """Everything restore must give back, per relative path (b"." is the root)."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    inodes: dict[tuple[int, int], list[bytes]] = {}
    out: dict[bytes, dict[str, Any]] = {}
    for p in paths:
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        info: dict[str, Any] = {
            "type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
            "xattrs": _xattrs(p),
        }
        if stat.S_ISLNK(st.st_mode):
            info["link"] = os.readlink(p)
        else:
            info["acl"] = _acl(p)
        if stat.S_ISREG(st.st_mode):
            info["size"] = st.st_size
            info["nlink"] = st.st_nlink
            with open(p, "rb") as f:
                info["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        out[rel] = info
    for names in inodes.values():
        for rel in names:
            out[rel]["same_inode_as"] = sorted(names)
    return out


def assert_same_tree(src: bytes, dst: bytes, *, setid: bool = True) -> None:
    """Every entry alike, but the root (the target directory is ours, not the archive's
    ``./``); ``setid`` False: files' set-uid/set-gid bits are expected cleared."""
    a, b = snapshot(src), snapshot(dst)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel == b".":
            assert b[rel]["type"] == stat.S_IFDIR
            continue
        want = dict(a[rel])
        if not setid and want["type"] == stat.S_IFREG:
            want["mode"] = oct(int(want["mode"], 8) & ~0o6000)
        assert want == b[rel], rel


def assert_sparse(path: bytes) -> None:
    st = os.lstat(path)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < 1 * MiB, f"{st.st_blocks * 512} bytes allocated: holes lost"


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(require_root: None) -> Iterator[Path]:
    # /var/tmp: a disk filesystem (xattrs, ACLs, holes), not a tmpfs with fewer features
    path = Path(tempfile.mkdtemp(prefix="sanoffload-store-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def source(workdir: Path) -> tuple[bytes, dict[str, Any]]:
    src = os.fsencode(workdir / "src")
    features = build_tree(src)
    return src, features


@pytest.fixture
def repo(workdir: Path, host_runner: Runner) -> Iterator[Repository]:
    path = Path(tempfile.mkdtemp(prefix="repo-", dir=workdir))
    yield Repository(path, host_runner)
    shutil.rmtree(path)


@pytest.fixture
def place(workdir: Path) -> Iterator[Path]:
    """An empty scratch directory for targets (and things that must stay outside them)."""
    path = Path(tempfile.mkdtemp(prefix="place-", dir=workdir))
    yield path
    shutil.rmtree(path)


def archive_into(repo: Repository, src: bytes, **fields: Any) -> BackupId:
    """``tar --create ... | zstd -T0 -q -c`` streamed into Repository.put, as the proxy does."""
    with tempfile.TemporaryFile() as errors:
        t = subprocess.Popen(tar.create_argv(os.fsdecode(src)), stdout=subprocess.PIPE,
                             stderr=errors, env=ENV)
        z = subprocess.Popen(zstd.compress_argv(), stdin=t.stdout, stdout=subprocess.PIPE,
                             env=ENV)
        assert t.stdout is not None and z.stdout is not None
        t.stdout.close()  # zstd holds the read end; tar sees EPIPE if zstd dies
        try:
            bid = repo.put("fs1", "/srv/data", z.stdout,
                           {"frozen_at": 1795689155.5, "duplicate_kind": "snapshot", **fields})
        finally:
            z.stdout.close()
            z.wait(60)
            t.wait(60)
        errors.seek(0)
        assert t.returncode == 0, errors.read().decode(errors="replace")
        assert z.returncode == 0
    return bid


def compress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True,
                          env=ENV).stdout


def tree_listing(root: Path) -> list[tuple[str, int, bytes]]:
    """Every path under ``root`` with its size and content (to prove nothing changed)."""
    out = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out.append((str(p), st.st_size, data))
    return out


# --------------------------------------------------------------------------
# the round trip
# --------------------------------------------------------------------------

def test_restore_into_an_empty_target_is_exact(source: tuple[bytes, dict[str, Any]],
                                               repo: Repository, place: Path) -> None:
    src, features = source
    bid = archive_into(repo, src)
    backup = repo.get(bid)
    assert backup.manifest.verification is not None and backup.manifest.verification.ok
    assert backup.manifest.member_count == len(snapshot(src))
    # the archive holds the data, not the holes
    assert backup.manifest.archive_bytes < 2 * MiB
    target = place / "restored"
    target.mkdir()
    os.chmod(target, 0o711)
    done = restore(repo, bid, target, setid=True)
    assert done.members == len(snapshot(src)) and done.setid_cleared == 0
    assert_same_tree(src, os.fsencode(target))
    assert_sparse(os.path.join(os.fsencode(target), SPARSE))
    got = snapshot(os.fsencode(target))
    assert "user:1234:rwx" in got[ACL_FILE]["acl"] and "group:5678:r--" in got[ACL_FILE]["acl"]
    assert "default:user:1234:r-x" in got[ACL_DIR]["acl"]
    assert got[b"setuid"]["mode"] == "0o4755" and got[b"setuid"]["uid"] == 1234
    assert got[b"secret"]["mode"] == "0o750" and (got[b"secret"]["uid"],
                                                  got[b"secret"]["gid"]) == (1234, 5678)
    assert got[b"plain.txt"]["xattrs"]["user.test"] == b"value"
    for ns in ("trusted", "security"):
        if features[ns]:
            assert got[b"plain.txt"]["xattrs"][f"{ns}.sanoffload"]
    # the target is ours: the archive's "./" (uid 4321, 0750, an xattr) does not change it
    assert got[b"."]["uid"] == 0 and got[b"."]["mode"] == "0o711"
    assert got[b"."]["xattrs"] == {}
    assert not [n for n in os.listdir(target) if n.startswith(".sanoffload")]
    assert got[b"hard-a"]["same_inode_as"] == sorted([b"hard-a", b"dir/hard-b",
                                                       b"new\nline hard"])
    assert stat.S_ISFIFO(got[b"fifo"]["type"])
    assert got[b"empty-dir"]["type"] == stat.S_IFDIR


def test_restore_into_an_absent_target_and_verify(source: tuple[bytes, dict[str, Any]],
                                                  repo: Repository, place: Path) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    assert repo.verify(bid).manifest.verification.ok  # type: ignore[union-attr]
    target = place / "a" / "b"
    done = restore(repo, bid, target)
    assert_same_tree(src, os.fsencode(target), setid=False)
    assert done.setid_cleared == 1  # "setuid"; "setgid-dir" keeps its set-gid
    assert stat.S_IMODE(target.lstat().st_mode) == 0o700 and target.lstat().st_uid == 0


def test_restore_of_selected_paths(source: tuple[bytes, dict[str, Any]], repo: Repository,
                                   place: Path) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    target = place / "some"
    picked = [b"new\nline", b"dir\nwith newline", b"bad-\xff\xfe-utf8", ACL_DIR, SPARSE]
    done = restore(repo, bid, target, picked)
    assert len(done.selected) == len(picked)
    want, got = snapshot(src), snapshot(os.fsencode(target))
    assert sorted(k for k in got if k != b".") == sorted(
        [b"new\nline", b"dir\nwith newline", b"dir\nwith newline/inner \xff", b"bad-\xff\xfe-utf8",
         ACL_DIR, SPARSE])
    for rel in got:
        if rel != b".":
            got[rel].pop("same_inode_as", None)
            expected = dict(want[rel])
            expected.pop("same_inode_as", None)
            if "nlink" in expected:
                expected["nlink"] = got[rel]["nlink"]  # the other names were not restored
            assert got[rel] == expected, rel
    assert_sparse(os.path.join(os.fsencode(target), SPARSE))


@pytest.mark.parametrize("pick", [b"dir/hard-b", b"new\nline hard", b"hard-a", b"dir"])
def test_restore_of_one_name_of_a_hard_linked_file(source: tuple[bytes, dict[str, Any]],
                                                   repo: Repository, place: Path,
                                                   pick: bytes) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    target = os.fsencode(place / "hl")
    done = restore(repo, bid, target, [pick])
    path = os.path.join(target, pick)
    assert os.path.exists(path)
    group = {b"hard-a", b"dir/hard-b", b"new\nline hard"}
    # whichever name tar archived first holds the data; it comes along if needed
    assert {os.path.normpath(n) for n in done.link_targets} <= group
    got = snapshot(target)
    names = [k for k in got if got[k]["type"] == stat.S_IFREG]
    linked = [k for k in names if k in group]
    assert pick in linked or pick == b"dir"
    assert len({got[k]["same_inode_as"][0] for k in linked}) == 1
    for k in linked:
        assert got[k]["sha256"] == snapshot(src)[k]["sha256"]


def test_streamed_out_archive_extracts_with_the_documented_command(
        source: tuple[bytes, dict[str, Any]], repo: Repository, place: Path) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    out = io.BytesIO()
    stream_out(repo, bid, out)
    target = place / "remote"
    target.mkdir()
    subprocess.run(tar.extract_argv(target), input=out.getvalue(), check=True, env=ENV)
    assert_same_tree(src, os.fsencode(target))
    # and decompressed by a separate zstd, as on another host without tar --zstd
    target2 = place / "remote2"
    target2.mkdir()
    raw = subprocess.run(zstd.decompress_argv(), input=out.getvalue(), capture_output=True,
                         check=True, env=ENV).stdout
    subprocess.run(tar.extract_argv(target2, zstd=False), input=raw, check=True, env=ENV)
    assert_same_tree(src, os.fsencode(target2))


# --------------------------------------------------------------------------
# damage
# --------------------------------------------------------------------------

def test_a_flipped_byte_fails_verify_and_restore_leaves_the_target_untouched(
        source: tuple[bytes, dict[str, Any]], repo: Repository, place: Path) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    path = repo.archive_path(bid)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # root may write the read-only archive
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(IntegrityError, match="sha256"):
        repo.verify(bid)
    assert repo.get(bid).manifest.verification.status == "failed"  # type: ignore[union-attr]
    empty = place / "empty"
    empty.mkdir()
    with pytest.raises(IntegrityError):
        restore(repo, bid, empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(IntegrityError):
        restore(repo, bid, place / "absent")
    assert not (place / "absent").exists()
    with pytest.raises(IntegrityError):
        stream_out(repo, bid, io.BytesIO())
    # the checksum is what caught it; zstd's own frame checksum agrees
    with pytest.raises(IntegrityError):
        repo.test_read(path, timeout=60)


@pytest.mark.parametrize("cut", ["compressed", "tar"])
def test_a_truncated_upload_is_not_stored(source: tuple[bytes, dict[str, Any]], repo: Repository,
                                          cut: str) -> None:
    src, _ = source
    tar_bytes = subprocess.run(tar.create_argv(os.fsdecode(src)), capture_output=True,
                               check=True, env=ENV).stdout
    if cut == "compressed":  # the connection dropped
        data = compress(tar_bytes)[: -100]
    else:  # tar died mid-archive; zstd closed its frame cleanly
        data = compress(tar_bytes[: len(tar_bytes) // 2 + 17])
    with pytest.raises(IntegrityError):
        repo.put("fs1", "/srv/data", io.BytesIO(data))
    assert [p for p in repo.root.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------
# malicious archives
# --------------------------------------------------------------------------

def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def _evil(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return compress(buf.getvalue())


EVIL: dict[str, Callable[[Path], list[tuple[tarfile.TarInfo, bytes | None]]]] = {
    "absolute": lambda out: [_member("./"), _member(str(out / "abs-pwned"))],
    "dotdot": lambda out: [_member("../escape")],
    "dotdot-deep": lambda out: [_member("./a/"), _member("./a/../../b")],
    "symlink-abs-then-write": lambda out: [
        _member("link", tarfile.SYMTYPE, str(out)), _member("link/pwned")],
    "symlink-rel-then-write": lambda out: [
        _member("link", tarfile.SYMTYPE, "../outside"), _member("link/pwned")],
    "symlink-then-dir-then-write": lambda out: [
        _member("d", tarfile.SYMTYPE, str(out)), _member("d/", tarfile.DIRTYPE),
        _member("d/pwned")],
    "hardlink-out": lambda out: [
        _member("hl", tarfile.LNKTYPE, str(out / "precious")), _member("hl", data=b"pwned")],
}


@pytest.mark.parametrize("attack", sorted(EVIL))
def test_malicious_archives_are_refused_and_nothing_is_written(
        repo: Repository, place: Path, attack: str) -> None:
    outside = place / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    before = tree_listing(place)
    bid = repo.put("evil", "/srv/data", io.BytesIO(_evil(EVIL[attack](outside))))
    for target in (place / "target", place / "empty"):
        if target.name == "empty":
            target.mkdir()
            before = tree_listing(place)
        with pytest.raises(RefusedError):
            restore(repo, bid, target)
        assert tree_listing(place) == before
    assert (outside / "precious").read_text() == "keep me"
    assert not (place / "escape").exists() and not (place / "b").exists()
    assert not Path("/escape").exists() and not (repo.root.parent / "escape").exists()


# --------------------------------------------------------------------------
# the CLI, with the real runner
# --------------------------------------------------------------------------

def test_cli_list_verify_restore(source: tuple[bytes, dict[str, Any]], repo: Repository,
                                 place: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = source
    bid = archive_into(repo, src, file_count=42)
    base = ["store", "--repo", str(repo.root)]
    assert cli.run([*base, "list"]) == 0
    assert str(bid) in capsys.readouterr().out
    assert cli.run([*base, "verify", str(bid)]) == 0
    assert capsys.readouterr().out == f"ok {bid}\n"
    target = place / "t"
    assert cli.run([*base, "restore", str(bid), str(target)]) == 0
    assert "restored" in capsys.readouterr().out
    assert_same_tree(src, os.fsencode(target), setid=False)
    # not empty now: refused without --force, one line, exit 3, nothing changed
    (target / "plain.txt").write_bytes(b"changed since")
    assert cli.run([*base, "restore", str(bid), str(target)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert (target / "plain.txt").read_bytes() == b"changed since"
    assert cli.run([*base, "restore", str(bid), str(target), "plain.txt", "--force"]) == 0
    assert (target / "plain.txt").read_bytes() == b"hello\n"
    # a whole restore over it puts the directories' own times back too
    (target / "dir" / "sub" / "deep.bin").write_bytes(b"changed again")
    os.chmod(target / "dir", 0o700)
    assert cli.run([*base, "restore", str(bid), str(target), "--force"]) == 0
    assert_same_tree(src, os.fsencode(target), setid=False)


def test_force_over_a_planted_symlink_does_not_write_through_it(
        source: tuple[bytes, dict[str, Any]], repo: Repository, place: Path) -> None:
    src, _ = source
    bid = archive_into(repo, src)
    outside = place / "outside"
    outside.mkdir()
    target = place / "t"
    target.mkdir()
    (target / "dir").symlink_to(outside)  # where the backup has a directory
    (target / "plain.txt").symlink_to(outside / "plain.txt")  # where it has a file
    restore(repo, bid, target, force=True)
    assert list(outside.iterdir()) == []
    assert not (target / "dir").is_symlink() and (target / "dir" / "sub" / "deep.bin").is_file()
    assert_same_tree(src, os.fsencode(target), setid=False)
