#!/bin/bash
# Builds the local Vagrant box the lab's Vagrantfile boots with the libvirt
# provider, from Debian packages only (these machines cannot download boxes
# from Vagrant Cloud): Debian bookworm (debootstrap) with the
# bookworm-backports kernel (6.12: the data plane needs 6.6), Docker and
# docker-compose from Debian, OpenSSH with the Vagrant insecure key for the
# user `vagrant`, ifupdown for Vagrant's network setup.
#
# The disk is one ext4 filesystem (no partition table, no boot loader): the
# VMs boot its kernel directly (libvirt's kernel/initrd/cmdline), so the
# kernel and initrd are written beside the box.
#
# Usage: vagrant/build-box.sh [OUT_DIR]   (default vagrant/.box; needs root,
# debootstrap, qemu-utils, e2fsprogs). Writes OUT_DIR/mesh.box,
# OUT_DIR/vmlinuz and OUT_DIR/initrd.img; then
#   vagrant box add --force --name mesh-local OUT_DIR/mesh.box
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:-$here/.box}")
mirror=${MESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
size=${MESH_BOX_SIZE:-4G}
pubkey=${VAGRANT_PUBKEY:-$( (find /usr/share/rubygems-integration /usr/share/vagrant /opt/vagrant -name vagrant.pub -path '*keys*' 2>/dev/null || true) | head -1)}
[ -n "$pubkey" ] || { echo "build-box: the Vagrant insecure public key was not found (apt install vagrant)" >&2; exit 1; }

root=$out/rootfs
rm -rf "$root" && mkdir -p "$root"
# The root tree (about 1.3 GB) and then its disk image are on this disk at
# once: say so plainly rather than fail in the middle of apt.
need_kb=$((3 * 1024 * 1024))
free_kb=$(df -Pk "$out" | awk 'NR == 2 { print $4 }')
if [ "$free_kb" -lt "$need_kb" ]; then
    echo "build-box: needs 3 GB free in $out, has $((free_kb / 1024)) MB" >&2
    exit 1
fi
cleanup() {
    for m in dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
}
trap cleanup EXIT

start=$(date +%s)
echo "build-box: debootstrap bookworm into $root"
debootstrap --variant=minbase \
    --include=systemd-sysv,udev,kmod,dbus,openssh-server,sudo,iproute2,ifupdown,isc-dhcp-client,iputils-ping,curl,ca-certificates,procps,less \
    bookworm "$root" "$mirror" > "$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log" >&2; exit 1; }

mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
cat > "$root/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror bookworm-backports main
SRC
echo "build-box: the backports kernel, Docker, docker-compose"
chroot "$root" /bin/sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends -t bookworm-backports linux-image-amd64 initramfs-tools
    apt-get install -y -q --no-install-recommends docker.io docker-compose iptables
    apt-get clean
' > "$out/packages.log" 2>&1 || { tail -30 "$out/packages.log" >&2; exit 1; }
rm -f "$root/usr/sbin/policy-rc.d"

echo "build-box: configuration"
cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 defaults,discard 0 1
FSTAB
cat > "$root/etc/network/interfaces" <<'NET'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
NET
echo mesh-box > "$root/etc/hostname"
chroot "$root" /bin/sh -ec '
    useradd -m -s /bin/bash -G sudo vagrant
    echo "vagrant:vagrant" | chpasswd
    echo "root:vagrant" | chpasswd
    echo "vagrant ALL=(ALL) NOPASSWD: ALL" > /etc/sudoers.d/vagrant
    chmod 440 /etc/sudoers.d/vagrant
    systemctl enable docker ssh networking > /dev/null 2>&1
    systemctl mask apt-daily.timer apt-daily-upgrade.timer > /dev/null 2>&1 || true
'
install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
echo "UseDNS no" > "$root/etc/ssh/sshd_config.d/vagrant.conf"
# The VMs have no way out but the host's NAT: nothing to fetch at boot.
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/ssh-keygen.service" <<'UNIT'
[Unit]
Description=SSH host keys
Before=ssh.service
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable ssh-keygen.service > /dev/null 2>&1

cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
kernel=$(basename "$root"/boot/vmlinuz-* | sed 's/^vmlinuz-//')
cleanup
trap - EXIT

echo "build-box: disk image (ext4, $size)"
rm -f "$out/disk.raw" "$out/box.img"
truncate -s "$size" "$out/disk.raw"
mkfs.ext4 -q -F -L root -d "$root" "$out/disk.raw"
rm -rf "$root"
qemu-img convert -O qcow2 "$out/disk.raw" "$out/box.img"
rm -f "$out/disk.raw"
virtual=$(qemu-img info --output=json "$out/box.img" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -1)
cat > "$out/metadata.json" <<META
{"provider": "libvirt", "format": "qcow2", "virtual_size": $(( virtual / 1024 / 1024 / 1024 ))}
META
cat > "$out/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
  end
end
VF
tar -C "$out" -cf "$out/mesh.box" metadata.json Vagrantfile box.img
rm -f "$out/box.img"
echo "build-box: $out/mesh.box ($(du -h "$out/mesh.box" | cut -f1)), kernel $kernel, in $(( $(date +%s) - start )) s"
