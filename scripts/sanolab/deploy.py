"""Deploy sanoffload on the lab's hosts as a sysadmin would on real ones.

Only what a real deployment has: name resolution, the proxy's ssh key in
root's ``authorized_keys`` on the first server and the backup server with a
forced command, the agent's and the store's config files, and a volume to
back up. Used by the lab tests and by ``scripts/demo``.

    px1 (proxy)  --ssh, forced "agent serve"-->  fs1 (first server: LVM, LIO)
                 --ssh, forced "store serve"-->  bk1 (backup server: /srv/backups)
                 <--iSCSI (ACL + CHAP)---------  fs1
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from sanoffload.runner import Runner

from . import config, vm

VG = "datavg"
REPO = "/srv/backups"
DATA = "/srv/data"

AGENT_TOML = """\
state_dir = "/var/lib/sanoffload"
run_dir = "/run/sanoffload"
freeze_deadline_s = 30     # the lab emulates the CPU (TCG): lvcreate alone takes seconds
grace_s = {grace_s}
lease_s = 3600

[portal]
address = "{ip}"

[snapshot]
percent = 10
min_mb = {min_mb}

[clients.px1]
initiators = ["{px1}"]
roots = ["/srv"]
max_sessions = 2
"""

STORE_TOML = """\
[clients.px1]
repo = "{repo}"
hosts = ["fs1"]
"""

FORCED = {
    "fs1": "sanoffload agent serve --stdio --client px1",
    "bk1": f"sanoffload store serve --stdio --repo {REPO} --client px1",
}


def sh(runner: Runner, host: str, script: str, *, timeout: float = 300,
       input: str | None = None, check: bool = True) -> str:
    ok = None if check else dict.fromkeys(range(1, 256), "nonzero")
    return vm.ssh(runner, host, ["sh", "-c", script], timeout=timeout, input=input,
                  ok_codes=ok).stdout


# a stable description of a tree: names (hex), types, modes, owners, sizes,
# mtimes, contents, link targets, hard-link groups, sparseness, xattrs and ACLs
TREE_DIGEST = r"""
import hashlib, json, os, stat, sys
root = os.fsencode(sys.argv[1])
seen, out = {}, {}
for dirpath, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        rel = os.path.relpath(p, root).hex()
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
        if not stat.S_ISDIR(st.st_mode):
            e["mtime"] = st.st_mtime_ns
        else:
            e["mtime"] = st.st_mtime_ns if name != b"ro" else "dir"
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p).hex()
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    h.update(b)
            e.update(size=st.st_size, sha256=h.hexdigest(),
                     sparse=st.st_blocks * 512 < st.st_size)
            if st.st_nlink > 1:
                e["link_group"] = seen.setdefault((st.st_dev, st.st_ino), rel)
        if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
            e["xattrs"] = {k: os.getxattr(p, k).hex() for k in sorted(os.listxattr(p))}
        out[rel] = e
print(json.dumps(out, sort_keys=True))
"""


def digest(runner: Runner, host: str, root: str) -> dict[str, Any]:
    """:data:`TREE_DIGEST` of ``root`` on ``host``: equal digests, equal trees."""
    tree: dict[str, Any] = json.loads(sh(runner, host, f"python3 -c {shlex.quote(TREE_DIGEST)} "
                                                     f"{shlex.quote(root)}"))
    return tree


WRITER_FLAG = "/run/sanoffload-writer.on"


def start_writer(runner: Runner, path: str) -> None:
    """On fs1, append numbered lines to ``path`` (from 1) until :func:`stop_writer`."""
    sh(runner, "fs1", f"touch {WRITER_FLAG}; nohup sh -c 'i=0; while [ -e {WRITER_FLAG} ]; "
                      f"do i=$((i+1)); echo $i >> {path}; done' >/dev/null 2>&1 &")


def stop_writer(runner: Runner) -> None:
    sh(runner, "fs1", f"rm -f {WRITER_FLAG}; sleep 1; sync", check=False)


def hosts_file(runner: Runner, hosts: list[str]) -> None:
    """Every host knows the others by name (a real site has DNS)."""
    lines = "".join(f"{config.HOSTS[h].ip} {h}\n" for h in config.HOSTS)
    for host in hosts:
        sh(runner, host, "grep -v ' sanolab$' /etc/hosts > /etc/hosts.new; "
                         "cat >> /etc/hosts.new; mv /etc/hosts.new /etc/hosts",
           input="".join(line.rstrip("\n") + " sanolab\n" for line in lines.splitlines()))


def ssh_keys(runner: Runner) -> str:
    """px1's key, forced-command lines on fs1 and bk1, their host keys known on px1."""
    pub = sh(runner, "px1", "test -f /root/.ssh/id_ed25519 || "
                            "ssh-keygen -q -t ed25519 -N '' -C root@px1 -f /root/.ssh/id_ed25519;"
                            " cat /root/.ssh/id_ed25519.pub").strip()
    for host, command in FORCED.items():
        line = f'command="{command}",restrict {pub}'
        sh(runner, host, "mkdir -p -m 700 /root/.ssh; touch /root/.ssh/authorized_keys; "
                         f"grep -vF {shlex.quote(pub)} /root/.ssh/authorized_keys > /root/.ssh/ak;"
                         " cat >> /root/.ssh/ak; mv /root/.ssh/ak /root/.ssh/authorized_keys; "
                         "chmod 600 /root/.ssh/authorized_keys", input=line + "\n")
    sh(runner, "px1", "ssh-keyscan -t ed25519 fs1 bk1 2>/dev/null > /root/.ssh/known_hosts.new && "
                      "mv /root/.ssh/known_hosts.new /root/.ssh/known_hosts")
    return pub


def configs(runner: Runner, *, grace_s: float = 5, min_mb: int = 64) -> None:
    sh(runner, "fs1", "mkdir -p /etc/sanoffload && cat > /etc/sanoffload/agent.toml",
       input=AGENT_TOML.format(ip=config.HOSTS["fs1"].ip, px1=config.HOSTS["px1"].iqn,
                               grace_s=grace_s, min_mb=min_mb))
    sh(runner, "bk1", "mkdir -p /etc/sanoffload && cat > /etc/sanoffload/store.toml",
       input=STORE_TOML.format(repo=REPO))


def volumes(runner: Runner, *, size: str = "600m", fstype: str = "ext4") -> None:
    """fs1: an LV with a filesystem at /srv/data; bk1: the repository's own disk."""
    mkfs = {"ext4": "mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0",
            "xfs": "mkfs.xfs -q -f"}[fstype]
    sh(runner, "fs1", f"""set -e
        if ! vgs {VG} >/dev/null 2>&1; then
            pvcreate -q -y /dev/vdb /dev/vdc
            vgcreate -q {VG} /dev/vdb /dev/vdc
        fi
        lvs {VG}/data >/dev/null 2>&1 || {{ lvcreate -q -y -L {size} -n data {VG} &&
                                           {mkfs} /dev/{VG}/data; }}
        mkdir -p {DATA}
        mountpoint -q {DATA} || mount /dev/{VG}/data {DATA}
        """, timeout=600)
    sh(runner, "bk1", f"""set -e
        mkdir -p {REPO}
        if ! mountpoint -q {REPO}; then
            blkid /dev/vdb >/dev/null 2>&1 || mkfs.ext4 -q /dev/vdb
            mount /dev/vdb {REPO}
        fi
        """, timeout=300)


def undeploy_volumes(runner: Runner) -> None:
    """Take the volumes apart again (what a test module leaves must be nothing)."""
    sh(runner, "fs1", f"sanoffload agent cleanup --all >/dev/null 2>&1; umount {DATA}; "
                      f"vgremove -q -f {VG}; pvremove -q /dev/vdb /dev/vdc; "
                      "wipefs -q -a /dev/vdb /dev/vdc; rm -rf /var/lib/sanoffload; true",
       timeout=300)
    sh(runner, "bk1", f"umount {REPO}; wipefs -q -a /dev/vdb; true")


def deploy(runner: Runner, hosts: list[str], **options: object) -> None:
    hosts_file(runner, hosts)
    ssh_keys(runner)
    configs(runner, **options)  # type: ignore[arg-type]
    volumes(runner)
