"""sanoffload.agent.resolve: every refusal, with no side effect, and the happy paths.

The filesystem tree is a fake shaped like the lab's fs1 after record.sh
(``/srv/{lin,thin,r1,m1}/dir``, ``/srv/lin/dir/out-link -> /etc``); findmnt
and lvs answer with the recorded outputs (edited copies for states the
recording does not have, built by the helpers below).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import Iterable

import pytest

from sanoffload.agent.resolve import OsFS, resolve
from sanoffload.errors import RefusedError, UsageError
from sanoffload.testing import FakeRunner
from tests.unit.recorded import feed, load

pytestmark = pytest.mark.unit

MUTATING = ("lvcreate", "lvconvert", "lvremove", "lvchange", "fsfreeze", "dmsetup")


class FakeFS:
    """A tree of paths: directories, files, special files and symlinks."""

    def __init__(self, dirs: Iterable[str] = (), files: Iterable[str] = (),
                 special: dict[str, int] | None = None,
                 links: dict[str, str] | None = None) -> None:
        self.modes: dict[str, int] = {"/": stat.S_IFDIR | 0o755}
        for d in dirs:
            self.modes[d] = stat.S_IFDIR | 0o755
        for f in files:
            self.modes[f] = stat.S_IFREG | 0o644
        self.modes.update(special or {})
        self.links = dict(links or {})

    def _resolve(self, path: str) -> tuple[str, bool]:
        """(resolved path, whether it looped)."""
        pending = [p for p in path.split("/") if p not in ("", ".")]
        resolved, hops = "/", 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                resolved = os.path.dirname(resolved)
                continue
            candidate = os.path.join(resolved, part)
            if candidate in self.links:
                hops += 1
                if hops > 40:
                    return path, True
                target = self.links[candidate]
                if target.startswith("/"):
                    resolved = "/"
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            else:
                resolved = candidate
        return resolved, False

    def realpath(self, path: str) -> str:
        return self._resolve(path)[0]

    def stat(self, path: str) -> os.stat_result:
        real, looped = self._resolve(path)
        if looped:
            raise OSError(errno.ELOOP, "Too many levels of symbolic links", path)
        if real not in self.modes:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return os.stat_result((self.modes[real], 0, 0, 1, 0, 0, 0, 0, 0, 0))


LAB = FakeFS(
    dirs=["/srv", "/etc", "/home", "/run", "/srv/lin", "/srv/lin/dir", "/srv/thin",
          "/srv/thin/dir", "/srv/r1", "/srv/r1/dir", "/srv/m1", "/srv/m1/dir", "/srv/data",
          "/srv/data2", "/srv/data2/x", "/srv/tmp", "/srv/btr", "/srv/plain", "/srv/bound",
          "/srv/snapmnt", "/mnt", "/mnt/b"],
    files=["/srv/lin/dir/f", "/etc/passwd", "/mnt/b/f"],
    special={"/srv/lin/sda": stat.S_IFBLK | 0o660, "/srv/lin/tty": stat.S_IFCHR | 0o620,
             "/srv/lin/sock": stat.S_IFSOCK | 0o755, "/srv/lin/fifo": stat.S_IFIFO | 0o644},
    links={"/srv/lin/dir/out-link": "/etc", "/srv/lin/dir/in-link": "../dir",
           "/srv/lin/loop1": "loop2", "/srv/lin/loop2": "loop1", "/srv/data-link": "/srv/data"})


def mount_json(target: str, source: str, fstype: str, majmin: str,
               options: str = "rw,relatime") -> str:
    """findmnt output for a mount the recording does not have, in its exact shape."""
    return json.dumps({"filesystems": [{"target": target, "source": source, "fstype": fstype,
                                        "options": options, "maj:min": majmin}]}, indent=3)


def lvs_edited(name: str, which: str, **changes: str) -> str:
    """Recorded lvs output ``name`` with the LV ``which`` changed (states not recorded)."""
    data = json.loads(load(name)[0])
    for row in data["report"][0]["lv"]:
        if row["lv_name"] == which:
            row.update(changes)
            return json.dumps(data)
    raise AssertionError(f"{which} not in {name}")


def lab(lvs: str = "lvs_all", mounts: dict[str, str] | None = None) -> FakeRunner:
    """A runner answering findmnt (per path) and lvs like fs1 did."""
    runner = FakeRunner()
    feed(runner, "lvs", lvs)
    on_path(runner, "/", "findmnt_root")
    for path in ("/etc", "/etc/passwd"):
        on_path(runner, path, "findmnt_root")
    for path in ("/srv/lin", "/srv/lin/dir", "/srv/lin/dir/f"):
        on_path(runner, path, "findmnt_lin")
    on_path(runner, "/srv/thin/dir", "findmnt_thin")
    for path, out in {
        "/srv/r1/dir": mount_json("/srv/r1", "/dev/mapper/datavg-r1", "ext4", "253:10"),
        "/srv/m1/dir": mount_json("/srv/m1", "/dev/mapper/datavg-m1", "ext4", "253:13"),
        "/srv/tmp": mount_json("/srv/tmp", "tmpfs", "tmpfs", "0:45"),
        "/srv/btr": mount_json("/srv/btr", "/dev/vdd", "btrfs", "0:47"),
        "/srv/plain": mount_json("/srv/plain", "/dev/vdd1", "ext4", "254:49"),
        "/srv/bound": mount_json("/srv/bound", "/dev/vda[/home]", "ext4", "254:0"),
        "/mnt/b/f": mount_json("/mnt/b", "/dev/mapper/datavg-lin[/dir]", "ext4", "253:0"),
        **(mounts or {}),
    }.items():
        runner.on("findmnt", "--json", "--target", path, stdout=out)
    return runner


def on_path(runner: FakeRunner, path: str, name: str) -> None:
    feed(runner, ("findmnt", "--json", "--target", path), name)


def on_lv(majmin: str) -> dict[str, str]:
    """/srv/snapmnt mounted from the LV with kernel number ``majmin``."""
    return {"/srv/snapmnt": mount_json("/srv/snapmnt", "/dev/mapper/x", "ext4", majmin)}


def refused(runner: FakeRunner, path: str, roots: Iterable[str] = ("/srv",),
            match: str = "", fs: object = LAB, **kwargs: object) -> RefusedError:
    with pytest.raises(RefusedError, match=match) as exc:
        resolve(runner, path, list(roots), fs=fs, **kwargs)  # type: ignore[arg-type]
    assert exc.value.exit_code == 3
    # refusals change nothing: only findmnt and lvs may have run
    assert all(argv[0] in ("findmnt", "lvs") for argv in runner.argvs()), runner.argvs()
    assert not [argv for argv in runner.argvs() if argv[0] in MUTATING]
    return exc.value


# --------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------

def test_directory_on_linear_lv() -> None:
    runner = lab()
    obj = resolve(runner, "/srv/lin/dir", ["/srv"], fs=LAB)
    assert (obj.requested_path, obj.real_path, obj.kind) == ("/srv/lin/dir", "/srv/lin/dir",
                                                            "directory")
    assert obj.mount.target == "/srv/lin" and obj.volume == "datavg/lin" and obj.san is None
    assert obj.path_in_fs == "dir" and obj.duplicate_kind == "snapshot" and obj.root == "/srv"
    assert [argv[0] for argv in runner.argvs()] == ["findmnt", "findmnt", "lvs"]
    assert runner.argvs()[2][-2:] == ["--select", "lv_kernel_major=253 && lv_kernel_minor=0"]


def test_regular_file() -> None:
    obj = resolve(lab(), "/srv/lin/dir/f", ["/srv"], fs=LAB)
    assert (obj.kind, obj.path_in_fs) == ("file", "dir/f")


def test_mount_point_itself_is_dot() -> None:
    assert resolve(lab(), "/srv/lin", ["/srv/lin"], fs=LAB).path_in_fs == "."


def test_thin_lv_suggests_thin_snapshot() -> None:
    obj = resolve(lab(), "/srv/thin/dir", ["/srv"], fs=LAB)
    assert (obj.volume, obj.mount.fstype, obj.duplicate_kind) == ("datavg/thin", "xfs",
                                                                  "thin-snapshot")


def test_raid1_suggests_split_and_accepts_snapshot() -> None:
    assert resolve(lab(), "/srv/r1/dir", ["/srv"], fs=LAB).duplicate_kind == "raid1-split"
    assert resolve(lab(), "/srv/r1/dir", ["/srv"], fs=LAB,
                   duplicate_kind="snapshot").duplicate_kind == "snapshot"


def test_mirror_suggests_mirror_split() -> None:
    obj = resolve(lab(), "/srv/m1/dir", ["/srv"], fs=LAB)
    assert (obj.volume, obj.duplicate_kind) == ("datavg/m1", "mirror-split")


def test_symlink_inside_the_root_is_followed() -> None:
    obj = resolve(lab(), "/srv/lin/dir/in-link/f", ["/srv/lin"], fs=LAB)
    assert (obj.real_path, obj.path_in_fs) == ("/srv/lin/dir/f", "dir/f")


def test_root_given_through_a_symlink() -> None:
    # the allowed root is compared by its real path too
    fs = FakeFS()
    fs.modes, fs.links = dict(LAB.modes), {**LAB.links, "/srv/lin-link": "/srv/lin"}
    obj = resolve(lab(), "/srv/lin/dir", ["/srv/lin-link"], fs=fs)
    assert obj.root == "/srv/lin"


def test_bind_mount_path_is_relative_to_the_filesystem_root() -> None:
    obj = resolve(lab(), "/mnt/b/f", ["/mnt"], fs=LAB)
    assert obj.mount.fsroot == "/dir" and obj.path_in_fs == "dir/f"


# --------------------------------------------------------------------------
# refusals: the path
# --------------------------------------------------------------------------

def test_relative_path() -> None:
    runner = lab()
    refused(runner, "srv/lin/dir", match="srv/lin/dir: not an absolute path")
    assert runner.calls == []


def test_dotdot_refused_even_when_it_stays_inside() -> None:
    runner = lab()
    refused(runner, "/srv/lin/../lin/dir", match=r"contains a '\.\.' segment")
    assert runner.calls == []


def test_nul_byte() -> None:
    runner = lab()
    refused(runner, "/srv/lin\0/dir", match="NUL")
    assert runner.calls == []


def test_does_not_exist() -> None:
    runner = lab()
    refused(runner, "/srv/lin/nope", match="/srv/lin/nope: does not exist")
    assert runner.calls == []


def test_dangling_below_a_file() -> None:
    refused(lab(), "/srv/lin/dir/f/x", match="does not exist")


@pytest.mark.parametrize(("path", "what"), [
    ("/srv/lin/sda", "a block device"), ("/srv/lin/tty", "a character device"),
    ("/srv/lin/sock", "a socket"), ("/srv/lin/fifo", "a fifo")])
def test_not_a_directory_or_regular_file(path: str, what: str) -> None:
    runner = lab()
    refused(runner, path, match=f"{path}: not a directory or regular file: it is {what}")
    assert runner.calls == []


def test_symlink_loop() -> None:
    refused(lab(), "/srv/lin/loop1", match="symlink loop")


def test_outside_every_root() -> None:
    runner = lab()
    refused(runner, "/etc/passwd", ("/srv/lin", "/srv/thin"),
            match=r"/etc/passwd: outside the allowed roots \(/srv/lin, /srv/thin\)")
    assert runner.calls == []


def test_sibling_with_a_common_prefix_is_outside() -> None:
    refused(lab(), "/srv/data2/x", ("/srv/data",), match="outside the allowed roots")


def test_symlink_leading_out_of_the_root() -> None:
    runner = lab()
    err = refused(runner, "/srv/lin/dir/out-link", ("/srv/lin",),
                  match="a symlink in the path leads outside the allowed roots")
    assert "(to /etc)" in err.message
    assert runner.calls == []


def test_file_reached_through_a_symlink_out() -> None:
    # /srv/lin/dir/out-link/passwd is /etc/passwd
    refused(lab(), "/srv/lin/dir/out-link/passwd", ("/srv/lin",), match="symlink")


def test_no_roots() -> None:
    refused(lab(), "/srv/lin/dir", (), match="no allowed roots")


def test_unknown_duplicate_kind() -> None:
    # not a refusal of the path (3) but a bad argument (2), as at every edge (test_kinds.py)
    runner = lab()
    with pytest.raises(UsageError, match="unknown duplicate kind 'clone'") as exc:
        resolve(runner, "/srv/lin/dir", ["/srv"], fs=LAB, duplicate_kind="clone")
    assert exc.value.exit_code == 2
    assert runner.calls == []


# --------------------------------------------------------------------------
# refusals: the filesystem
# --------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "fstype"), [("/srv/tmp", "tmpfs"), ("/srv/btr", "btrfs")])
def test_unsupported_filesystem(path: str, fstype: str) -> None:
    runner = lab()
    refused(runner, path, match=f"filesystem type {fstype} at {path} is not supported")
    assert not runner.called("lvs")


def test_root_filesystem() -> None:
    runner = lab()
    refused(runner, "/etc", ("/etc",), match=r"on the root filesystem \(/\)")
    assert not runner.called("lvs")


def test_root_filesystem_bound_elsewhere() -> None:
    refused(lab(), "/srv/bound", match="is the root filesystem .*also mounted at /")


def test_not_on_lvm() -> None:
    refused(lab(), "/srv/plain", match=r"not on LVM: /srv/plain is mounted from /dev/vdd1 "
                                       r"\(254:49\)")


# --------------------------------------------------------------------------
# refusals: the logical volume
# --------------------------------------------------------------------------

def test_hidden_lv() -> None:
    refused(lab(mounts=on_lv("253:7")), "/srv/snapmnt",
            match="datavg/r1_rimage_0, an LV internal to LVM")


def test_thin_pool() -> None:
    refused(lab(mounts=on_lv("253:3")), "/srv/snapmnt", match="datavg/pool, a thin pool")


def test_sanoffload_snapshot() -> None:
    refused(lab("lvs_overflow", on_lv("253:18")), "/srv/snapmnt",
            match="datavg/sanoffload-snap2, which sanoffload made")


def test_sanoffload_mirror_split_though_untagged() -> None:
    refused(lab("lvs_msplit", on_lv("253:12")), "/srv/snapmnt",
            match="sanoffload-msplit, which sanoffload made")


def test_users_own_classic_snapshot() -> None:
    lvs = lvs_edited("lvs_overflow", "sanoffload-snap2", lv_name="mysnap", lv_tags="")
    runner = lab(mounts=on_lv("253:18"))
    runner.on("lvs", stdout=lvs)
    refused(runner, "/srv/snapmnt", match=r"datavg/mysnap, itself a snapshot \(of lin\)")


def test_users_own_thin_snapshot() -> None:
    lvs = lvs_edited("lvs_overflow", "sanoffload-tsnap", lv_name="mytsnap", lv_tags="")
    runner = lab(mounts=on_lv("253:19"))
    runner.on("lvs", stdout=lvs)
    refused(runner, "/srv/snapmnt", match=r"datavg/mytsnap, itself a snapshot \(of thin\)")


def test_tracked_split_image() -> None:
    refused(lab("lvs_split", on_lv("253:9")), "/srv/snapmnt",
            match="r1_rimage_1, a raid1 image split off with --trackchanges")


def test_origin_being_merged() -> None:
    runner = lab()
    runner.on("lvs", stdout=lvs_edited("lvs_all", "lin", lv_attr="Owi-aos---"))
    refused(runner, "/srv/lin/dir", match="its snapshot is being merged into it")


@pytest.mark.parametrize(("path", "lv_name"), [("/srv/r1/dir", "r1"), ("/srv/m1/dir", "m1")])
def test_raid1_or_mirror_not_in_sync(path: str, lv_name: str) -> None:
    runner = lab()
    runner.on("lvs", stdout=lvs_edited("lvs_all", lv_name, copy_percent="42.00",
                                       sync_percent="42.00"))
    refused(runner, path, match=fr"datavg/{lv_name}, a \w+ LV that is not in sync "
                                r"\(42\.00 % copied\)")


def test_not_in_sync_refused_even_for_a_snapshot() -> None:
    runner = lab()
    runner.on("lvs", stdout=lvs_edited("lvs_all", "r1", copy_percent="99.00"))
    refused(runner, "/srv/r1/dir", match="not in sync", duplicate_kind="snapshot")


def test_unsupported_segment_type() -> None:
    runner = lab()
    runner.on("lvs", stdout=lvs_edited("lvs_all", "lin", segtype="writecache"))
    refused(runner, "/srv/lin/dir", match="segment type writecache, which sanoffload cannot")


@pytest.mark.parametrize(("path", "kind"), [
    ("/srv/lin/dir", "thin-snapshot"), ("/srv/lin/dir", "raid1-split"),
    ("/srv/lin/dir", "mirror-split"), ("/srv/thin/dir", "snapshot"),
    ("/srv/thin/dir", "raid1-split"), ("/srv/r1/dir", "mirror-split"),
    ("/srv/m1/dir", "raid1-split")])
def test_override_that_does_not_fit(path: str, kind: str) -> None:
    refused(lab(), path, match=f"duplicate kind '{kind}' does not fit", duplicate_kind=kind)


# --------------------------------------------------------------------------
# the real filesystem (OsFS) in a temporary tree
# --------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: os.PathLike[str]) -> str:
    base = os.path.realpath(os.fspath(tmp_path))
    os.makedirs(f"{base}/root/dir")
    os.makedirs(f"{base}/outside")
    os.makedirs(f"{base}/root2")
    with open(f"{base}/root/dir/f", "w") as fh:
        fh.write("hi\n")
    os.symlink(f"{base}/outside", f"{base}/root/escape")
    os.symlink("dir", f"{base}/root/alias")
    os.mkfifo(f"{base}/root/fifo")
    return base


def real_lab(base: str) -> FakeRunner:
    runner = lab()
    for path in (f"{base}/root/dir", f"{base}/root/dir/f"):
        runner.on("findmnt", "--json", "--target", path,
                  stdout=mount_json(f"{base}/root", "/dev/mapper/datavg-lin", "ext4", "253:0"))
    return runner


def test_real_tree_resolves(tree: str) -> None:
    obj = resolve(real_lab(tree), f"{tree}/root/alias/f", [f"{tree}/root"])
    assert (obj.real_path, obj.kind, obj.path_in_fs) == (f"{tree}/root/dir/f", "file", "dir/f")


def test_real_tree_symlink_escape(tree: str) -> None:
    refused(real_lab(tree), f"{tree}/root/escape", [f"{tree}/root"], fs=OsFS(),
            match="a symlink in the path leads outside")


def test_real_tree_prefix_sibling(tree: str) -> None:
    refused(real_lab(tree), f"{tree}/root2", [f"{tree}/root"], fs=OsFS(),
            match="outside the allowed roots")


def test_real_tree_fifo_and_socket(tree: str) -> None:
    refused(real_lab(tree), f"{tree}/root/fifo", [f"{tree}/root"], fs=OsFS(), match="a fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(f"{tree}/root/s")
        except OSError:
            pytest.fail(f"cannot bind a unix socket under {tree}")
        refused(real_lab(tree), f"{tree}/root/s", [f"{tree}/root"], fs=OsFS(),
                match="a socket")


def test_real_tree_missing(tree: str) -> None:
    refused(real_lab(tree), f"{tree}/root/nope", [f"{tree}/root"], fs=OsFS(),
            match="does not exist")
