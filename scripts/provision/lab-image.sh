#!/bin/sh
# Lab-image-only provisioning, run in the image's chroot after common.sh.
# Each VM boots this one image through its own throw-away overlay and learns
# its identity from the kernel command line (systemd.hostname=, ip=).
set -eu

echo "/dev/vda / ext4 rw,errors=remount-ro,discard 0 1" > /etc/fstab
# Network: systemd-network-generator turns the ip= kernel parameter into a
# .network file; there is no default route and nothing outside the lab.
systemctl enable systemd-networkd.service systemd-network-generator.service
systemctl disable systemd-networkd-wait-online.service 2>/dev/null || true
systemctl enable ssh.service
rm -f /etc/hostname

# Root logs in over ssh with the lab key only (copied in by the build).
passwd -l root
mkdir -p /root/.ssh
chmod 700 /root/.ssh
cat > /etc/ssh/sshd_config.d/sanolab.conf <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
MaxStartups 64:30:128
MaxSessions 64
EOF

# A small initrd that knows the lab's (virtio) hardware boots much faster under
# emulation than one carrying every driver.
printf 'MODULES=list\nCOMPRESS=zstd\n' > /etc/initramfs-tools/conf.d/sanolab.conf
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >> /etc/initramfs-tools/modules
update-initramfs -u -k all
# The emulated CPU advertises SVM; loading kvm there only costs boot time.
printf 'blacklist kvm\nblacklist kvm_amd\nblacklist kvm_intel\n' > /etc/modprobe.d/sanolab.conf

# Quieter, faster boots under emulation.
mkdir -p /etc/systemd/system.conf.d
cat > /etc/systemd/system.conf.d/sanolab.conf <<'EOF'
[Manager]
DefaultTimeoutStartSec=60s
DefaultTimeoutStopSec=10s
EOF
systemctl mask getty@tty1.service 2>/dev/null || true
# journald in memory only: the root disk is an overlay thrown away anyway
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\n' > /etc/systemd/journald.conf.d/sanolab.conf

apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/*

# The README's install, step one, done at build time (natively, not under emulation):
# a venv that sees Debian's click, pyudev, psutil and python3-rtslib-fb; `scripts/lab
# sync` then pip-installs the wheel built from the checkout into it (the VMs have no
# network, so the dependencies are Debian's, seen through --system-site-packages).
python3 -m venv --system-site-packages /opt/sanoffload
