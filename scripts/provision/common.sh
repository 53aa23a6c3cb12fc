#!/bin/sh
# Guest provisioning shared by the QEMU lab image (run in the image's chroot at
# build time) and the Vagrant boxes (run in each guest). The packages come from
# packages.txt beside this file. Idempotent.
set -eu

# The iSCSI initiator name must differ per host: the image bakes one in, so a
# unit rewrites it from the hostname at every boot, before iscsid reads it.
cat > /usr/local/sbin/sanolab-initiatorname <<'EOF'
#!/bin/sh
set -eu
host=$(hostname -s)
echo "InitiatorName=iqn.2026-11.org.sanoffload.lab:${host}" > /etc/iscsi/initiatorname.iscsi
EOF
chmod 755 /usr/local/sbin/sanolab-initiatorname
cat > /etc/systemd/system/sanolab-initiatorname.service <<'EOF'
[Unit]
Description=Per-host iSCSI initiator name for the sanoffload lab
DefaultDependencies=no
After=local-fs.target systemd-hostnamed.service
Before=iscsid.service iscsid.socket open-iscsi.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sanolab-initiatorname
[Install]
WantedBy=sysinit.target
EOF
systemctl enable sanolab-initiatorname.service

# A saved LIO configuration must not come back at boot: sanoffload's cleanup
# pass decides what of its own objects survive a reboot.
for unit in rtslib-fb-targetctl.service target.service; do
    systemctl disable "$unit" 2>/dev/null || true
done
systemctl enable iscsid.socket 2>/dev/null || true

# Timers that would compete for the emulated CPU during tests.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer man-db.timer \
            fstrim.timer logrotate.timer dpkg-db-backup.timer e2scrub_reap.service; do
    systemctl mask "$unit" 2>/dev/null || true
done

# iSCSI: fail fast in the lab rather than queue I/O for two minutes.
if [ -f /etc/iscsi/iscsid.conf ]; then
    sed -i 's/^node.session.timeo.replacement_timeout = .*/node.session.timeo.replacement_timeout = 15/' \
        /etc/iscsi/iscsid.conf
fi
mkdir -p /etc/sanoffload /run/sanoffload 2>/dev/null || true

# Kernel modules sanoffload uses, loaded at boot so the first export or
# snapshot does not race their initialisation.
cat > /etc/modules-load.d/sanoffload.conf <<'EOF2'
dm_snapshot
dm_thin_pool
dm_mirror
dm_raid
target_core_mod
target_core_iblock
iscsi_target_mod
iscsi_tcp
EOF2
# LIO keeps persistent-reservation and ALUA state here
mkdir -p /etc/target
