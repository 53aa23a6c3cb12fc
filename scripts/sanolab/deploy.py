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
from dataclasses import dataclass
from typing import Any

from sanoceph import Cluster
from sanoffload.runner import Runner
from sanoffload.tools.lio import naa_from_serial

from . import ceph, config, sync, vm

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


def volumes(runner: Runner, *, size: str = "600m", fstype: str = "ext4",
            store: bool = True) -> None:
    """fs1: an LV with a filesystem at /srv/data; bk1 (``store``): the repository's own disk."""
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
    if not store:
        return
    sh(runner, "bk1", f"""set -e
        mkdir -p {REPO}
        if ! mountpoint -q {REPO}; then
            blkid /dev/vdb >/dev/null 2>&1 || mkfs.ext4 -q /dev/vdb
            mount /dev/vdb {REPO}
        fi
        """, timeout=300)


def undeploy_volumes(runner: Runner, *, store: bool = True) -> None:
    """Take the volumes apart again (what a test module leaves must be nothing)."""
    sh(runner, "fs1", f"sanoffload agent cleanup --all >/dev/null 2>&1; umount {DATA}; "
                      f"vgremove -q -f {VG}; pvremove -q /dev/vdb /dev/vdc; "
                      "wipefs -q -a /dev/vdb /dev/vdc; rm -rf /var/lib/sanoffload; true",
       timeout=300)
    if store:
        sh(runner, "bk1", f"umount {REPO}; wipefs -q -a /dev/vdb; true")


def deploy(runner: Runner, hosts: list[str], **options: object) -> None:
    hosts_file(runner, hosts)
    ssh_keys(runner)
    configs(runner, **options)  # type: ignore[arg-type]
    volumes(runner)


# --------------------------------------------------------------------------
# SAN mode: st1 serves fs1's production disks as LUNs
# --------------------------------------------------------------------------
#
#     fs1 --iSCSI (logs in at boot)--> st1: sanvg/fs1db, sanvg/fs1log (LIO block backstores)
#     fs1 --ssh, forced "storage serve --client fs1"--> st1
#
# These are the site's own production objects: their names (VG, LVs, backstores,
# target) are deliberately outside sanoffload's prefixes, so nothing of the product
# may take them for its own.

SAN_VG = "sanvg"
SAN_TARGET = "iqn.2026-11.org.sanoffload.lab:st1.fs1"
SAN_DISKS = ("/dev/vdb", "/dev/vdc")
SAN_PORT = 3260
STORAGE_STATE = "/var/lib/sanoffload/storage"
STORAGE_FORCED = "sanoffload storage serve --stdio --client fs1"


@dataclass(frozen=True)
class SanLun:
    """One production LUN: the LV on st1 behind it, its unit serial, where fs1 mounts it."""

    lv: str
    size: str
    serial: str
    mount: str

    @property
    def identifier(self) -> str:
        """What fs1's udev shows as the disk's wwid (``naa.6001405…``)."""
        return naa_from_serial(self.serial)

    @property
    def by_id(self) -> str:
        """fs1's udev link for the disk (``wwn-0x`` and the identifier's digits)."""
        return f"/dev/disk/by-id/wwn-0x{self.identifier.removeprefix('naa.')}"


# fixed serials: the identifiers must survive a redeploy (storage.toml names them)
SAN_LUNS: dict[str, SanLun] = {
    "db": SanLun(lv="fs1db", size="600m", serial="5a7e0f1d-2b3c-4d5e-8f60-7182a3b4c5d6",
                 mount="/srv/san/db"),
    "log": SanLun(lv="fs1log", size="200m", serial="5a7e0f1d-9c8b-4a7e-b6d5-c4b3a2918070",
                  mount="/srv/san/log"),
}

# LUN numbers follow SAN_LUNS' order: db is LUN 0, log LUN 1
SAN_EXPORT = r"""
import json, sys, warnings
warnings.simplefilter("ignore", UserWarning)  # "Cannot set dbroot": harmless
import rtslib_fb as r
spec = json.loads(sys.argv[1])
root = r.RTSRoot()
objs = {so.name: so for so in root.storage_objects}
stores = []
for lun in spec["luns"]:
    so = objs.get(lun["name"])
    if so is None:
        so = r.BlockStorageObject(lun["name"], dev=lun["dev"], wwn=lun["serial"])
    if so.wwn != lun["serial"] or so.udev_path != lun["dev"]:
        sys.exit("backstore %s exists with another serial or device" % lun["name"])
    stores.append(so)
tgt = r.Target(r.FabricModule("iscsi"), spec["target"])
tpg = r.TPG(tgt, 1)
tpg.set_attribute("authentication", "0")
tpg.set_attribute("generate_node_acls", "0")
if not any(p.ip_address == spec["ip"] and p.port == spec["port"] for p in tpg.network_portals):
    r.NetworkPortal(tpg, spec["ip"], spec["port"])
luns = {l.lun: l for l in tpg.luns}
for n, so in enumerate(stores):
    if n not in luns:
        luns[n] = r.LUN(tpg, n, so)
    elif luns[n].storage_object.name != so.name:
        sys.exit("LUN %d of %s is not %s" % (n, spec["target"], so.name))
acl = r.NodeACL(tpg, spec["initiator"])
mapped = {m.mapped_lun for m in acl.mapped_luns}
for n in range(len(stores)):
    if n not in mapped:
        r.MappedLUN(acl, n, luns[n], write_protect=False)
tpg.enable = True
print(json.dumps({so.name: so.wwn for so in stores}))
"""

SAN_UNEXPORT = r"""
import json, sys, warnings
warnings.simplefilter("ignore", UserWarning)
import rtslib_fb as r
spec = json.loads(sys.argv[1])
root = r.RTSRoot()
for t in list(root.targets):
    if t.wwn == spec["target"]:
        t.delete()
for so in list(root.storage_objects):
    if so.name in spec["backstores"]:
        so.delete()
"""


def _san_spec() -> dict[str, Any]:
    return {"target": SAN_TARGET, "ip": config.HOSTS["st1"].ip, "port": SAN_PORT,
            "initiator": config.HOSTS["fs1"].iqn,
            "backstores": [lun.lv for lun in SAN_LUNS.values()],
            "luns": [{"name": lun.lv, "dev": f"/dev/{SAN_VG}/{lun.lv}", "serial": lun.serial}
                     for lun in SAN_LUNS.values()]}


def _fstab_filter() -> str:
    """A sed script deleting fs1's fstab lines for the SAN mounts (and nothing else)."""
    return "".join(f"\\# {lun.mount} #d;" for lun in SAN_LUNS.values())


def san_volumes(runner: Runner) -> None:
    """st1 exports two LVs to fs1, which logs in (also at boot) and mounts a filesystem on each.

    Idempotent: what exists is kept (a filesystem is made only where blkid finds none).
    """
    disks = " ".join(SAN_DISKS)
    lvs = "\n".join(f"lvs {SAN_VG}/{lun.lv} >/dev/null 2>&1 || "
                    f"lvcreate -q -y --type linear -L {lun.size} -n {lun.lv} {SAN_VG}"
                    for lun in SAN_LUNS.values())
    sh(runner, "st1", f"""set -e
        if ! vgs {SAN_VG} >/dev/null 2>&1; then
            pvcreate -q -y {disks}
            vgcreate -q {SAN_VG} {disks}
        fi
        {lvs}
        udevadm settle --timeout=60
        """, timeout=300)
    spec = shlex.quote(json.dumps(_san_spec()))
    sh(runner, "st1", f"python3 -c {shlex.quote(SAN_EXPORT)} {spec}", timeout=120)
    st1 = f"{config.HOSTS['st1'].ip}:{SAN_PORT},1"
    node = f"iscsiadm -m node -T {SAN_TARGET} -p {st1}"
    # a node record of its own (not a nonpersistent discovery): open-iscsi.service logs
    # in every node.startup=automatic record at boot, and _netdev mounts wait for it
    sh(runner, "fs1", f"""set -e
        {node} >/dev/null 2>&1 || {node} -o new >/dev/null
        {node} -o update -n node.startup -v automatic
        iscsiadm -m session 2>/dev/null | grep -qF ' {SAN_TARGET} ' || {node} --login >/dev/null
        """, timeout=120)
    fstab = []
    for lun in SAN_LUNS.values():
        mount = shlex.quote(lun.mount)
        # udevadm wait: until udev has made the by-id link (no polling of ours)
        uuid = sh(runner, "fs1", f"""set -e
            udevadm wait --timeout=60 {lun.by_id}
            dev=$(readlink -e {lun.by_id})
            if [ -z "$(blkid -p -s TYPE -o value "$dev" || true)" ]; then
                mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
                udevadm settle --timeout=60
            fi
            blkid -p -s UUID -o value "$dev"
            """, timeout=300).strip()
        if not uuid:
            raise RuntimeError(f"fs1: no filesystem UUID on {lun.by_id}")
        fstab.append(f"UUID={uuid} {lun.mount} ext4 _netdev,nofail 0 2\n")
        sh(runner, "fs1", f"mkdir -p {mount} && {{ mountpoint -q {mount} || "
                          f"mount UUID={uuid} {mount}; }}", timeout=120)
    sh(runner, "fs1", f"sed -i {shlex.quote(_fstab_filter())} /etc/fstab && cat >> /etc/fstab && "
                      "systemctl daemon-reload", input="".join(fstab), timeout=120)


STORAGE_TOML = """\
state_dir = "{state_dir}"
grace_s = 5

[ports.p1]
address = "{ip}"
port = {port}

[clients.fs1]
luns = [{luns}]
proxies = ["{px1}"]
max_sessions = 4
"""


def san_config(runner: Runner) -> None:
    """st1's storage.toml; fs1's own ssh key, forced to ``storage serve`` on st1."""
    luns = ", ".join(f'"{lun.identifier}"' for lun in SAN_LUNS.values())
    sh(runner, "st1", "mkdir -p /etc/sanoffload && cat > /etc/sanoffload/storage.toml.new && "
                      "mv /etc/sanoffload/storage.toml.new /etc/sanoffload/storage.toml",
       input=STORAGE_TOML.format(state_dir=STORAGE_STATE, ip=config.HOSTS["st1"].ip,
                                 port=SAN_PORT, luns=luns, px1=config.HOSTS["px1"].iqn))
    pub = sh(runner, "fs1", "mkdir -p -m 700 /root/.ssh; test -f /root/.ssh/id_ed25519 || "
                            "ssh-keygen -q -t ed25519 -N '' -C root@fs1 -f /root/.ssh/id_ed25519;"
                            " cat /root/.ssh/id_ed25519.pub").strip()
    line = f'command="{STORAGE_FORCED}",restrict {pub}'
    sh(runner, "st1", "mkdir -p -m 700 /root/.ssh; touch /root/.ssh/authorized_keys; "
                      f"grep -vF {shlex.quote(pub)} /root/.ssh/authorized_keys > /root/.ssh/ak;"
                      " cat >> /root/.ssh/ak; mv /root/.ssh/ak /root/.ssh/authorized_keys; "
                      "chmod 600 /root/.ssh/authorized_keys", input=line + "\n")
    st1 = config.HOSTS["st1"].ip
    # by name and by address: the agent may be configured with either
    sh(runner, "fs1", "touch /root/.ssh/known_hosts; "
                      f"ssh-keygen -R st1 >/dev/null 2>&1; ssh-keygen -R {st1} >/dev/null 2>&1; "
                      f"keys=$(ssh-keyscan -t ed25519 st1 {st1} 2>/dev/null) && "
                      "[ -n \"$keys\" ] && echo \"$keys\" >> /root/.ssh/known_hosts")


def undeploy_san(runner: Runner) -> None:
    """Take the SAN wiring apart (fs1 first: st1 must not pull disks from under a mount).

    Idempotent: what is already gone is skipped.
    """
    mounts = " ".join(shlex.quote(lun.mount) for lun in SAN_LUNS.values())
    st1 = f"{config.HOSTS['st1'].ip}:{SAN_PORT}"
    sh(runner, "fs1", f"""
        for m in {mounts}; do mountpoint -q "$m" && umount "$m"; done
        sed -i {shlex.quote(_fstab_filter())} /etc/fstab
        systemctl daemon-reload
        iscsiadm -m node -T {SAN_TARGET} -p {st1} --logout >/dev/null 2>&1
        iscsiadm -m node -T {SAN_TARGET} -o delete >/dev/null 2>&1
        rmdir {mounts} /srv/san 2>/dev/null
        true
        """, timeout=120)
    pub = sh(runner, "fs1", "cat /root/.ssh/id_ed25519.pub 2>/dev/null; true").strip()
    disks = " ".join(SAN_DISKS)
    forget_key = (f"grep -vF {shlex.quote(pub)} /root/.ssh/authorized_keys > /root/.ssh/ak; "
                  "mv /root/.ssh/ak /root/.ssh/authorized_keys; "
                  "chmod 600 /root/.ssh/authorized_keys" if pub else "true")
    sh(runner, "st1", "test -f /etc/sanoffload/storage.toml && "
                      "sanoffload storage cleanup --all >/dev/null 2>&1; "
                      f"python3 -c {shlex.quote(SAN_UNEXPORT)} "
                      f"{shlex.quote(json.dumps(_san_spec()))}", timeout=300)
    sh(runner, "st1", f"""
        if vgs {SAN_VG} >/dev/null 2>&1; then
            vgremove -q -f {SAN_VG}
            for d in {disks}; do
                [ -z "$(pvs --noheadings -o vg_name "$d" 2>/dev/null | tr -d ' ')" ] &&
                    pvremove -q "$d" && wipefs -q -a "$d"
            done
        fi
        rm -f /etc/sanoffload/storage.toml
        rm -rf {STORAGE_STATE}
        {forget_key}
        true
        """, timeout=300)


# --------------------------------------------------------------------------
# S3 repository: the lab's Ceph RGW (sanolab.ceph) on the bridge address
# --------------------------------------------------------------------------
#
#     px1 --HTTPS, profile px1 (RGW user "proxy": put/get, no delete)--> 10.77.0.1 (RGW)
#     bk1 --HTTPS, profile maint (bucket owner: init-s3, restore, prune)--> 10.77.0.1
#
# Both hold the repository's key (raw, 0600) and the gateway's CA; fs1 holds neither.

S3_BUCKET = "sano-lab"
S3_PREFIX = "site-a"
S3_CONFIG = "/etc/sanoffload/s3.toml"
S3_KEY = "/etc/sanoffload/repo.key"
S3_CA = "/etc/sanoffload/s3-ca.pem"
#: the s3.toml profile each host gets: (profile, RGW user, role)
S3_PROFILES = {"px1": ("px1", "proxy", "proxy"), "bk1": ("maint", "maint", "maint")}

S3_TOML = """\
default = "{profile}"

[profiles.{profile}]
endpoints = {endpoints}
bucket = "{bucket}"
prefix = "{prefix}"
access_key = "{access_key}"
secret_key = "{secret_key}"
ca_file = "{ca}"
key_file = "{key}"
role = "{role}"
part_size = "5MiB"
"""


def s3_store(profile: str) -> str:
    """The ``--store`` of the lab's S3 repository through ``profile``."""
    return f"s3://{S3_BUCKET}/{S3_PREFIX}?profile={profile}"


def s3_configs(runner: Runner, cluster: Cluster) -> None:
    """bk1: a new raw repository key (``sanoffload key init --raw``), the maint profile and
    ``store init-s3`` (bucket, versioning, the proxy user's policy, the config object);
    px1: the same key and the proxy's profile."""
    ca = cluster.ca.read_text()
    for host, (profile, uid, role) in S3_PROFILES.items():
        user = cluster.users[uid]
        text = S3_TOML.format(profile=profile, endpoints=json.dumps(list(cluster.endpoints)),
                              bucket=S3_BUCKET, prefix=S3_PREFIX, access_key=user.access_key,
                              secret_key=user.secret_key, ca=S3_CA, key=S3_KEY, role=role)
        sh(runner, host, f"mkdir -p /etc/sanoffload && umask 077 && cat > {S3_CONFIG}.new && "
                         f"mv {S3_CONFIG}.new {S3_CONFIG}", input=text)
        sh(runner, host, f"umask 022 && cat > {S3_CA}", input=ca)
    sh(runner, "bk1", f"rm -f {S3_KEY} && sanoffload key init --raw {S3_KEY} >/dev/null")
    key = sh(runner, "bk1", f"cat {S3_KEY}")
    sh(runner, "px1", f"umask 077 && cat > {S3_KEY}.new && mv {S3_KEY}.new {S3_KEY}", input=key)
    sh(runner, "bk1", f"sanoffload store init-s3 s3://{S3_BUCKET}/{S3_PREFIX} --profile maint "
                      "--proxy-user proxy >/dev/null", timeout=600)


def s3_site(runner: Runner, release: str) -> Cluster:
    """The lab's Ceph started (:mod:`sanolab.ceph`), the ``s3`` extra on px1 and bk1, and
    :func:`s3_configs`: the running cluster (``ceph.down`` stops it, ``vm.down`` too)."""
    cluster = ceph.up(runner)
    sync.sync_extra(runner, release, list(S3_PROFILES), "s3")
    s3_configs(runner, cluster)
    return cluster


def undeploy_s3(runner: Runner) -> None:
    """Remove the profiles, keys and CA from px1 and bk1 (the cluster goes with its daemons)."""
    for host in S3_PROFILES:
        sh(runner, host, f"rm -f {S3_CONFIG} {S3_KEY} {S3_CA}", check=False)
