#!/usr/bin/env bash
# Build small Debian VM images for the QEMU driver tests.
#
# Usage: build-qemu-image.sh OUTDIR
#
# Produces:
#   OUTDIR/kernel/disk.qcow2    ext4 root filesystem (whole disk, no partition table)
#   OUTDIR/kernel/vmlinuz       Debian kernel, for qemu -kernel
#   OUTDIR/kernel/initrd.img    matching initramfs, for qemu -initrd
#   OUTDIR/kernel/cmdline       one line, for qemu -append
#   OUTDIR/selfboot.qcow2       GPT disk: ESP (systemd-boot + kernel + initrd)
#                               and the same ext4 root fs; boots with OVMF
#   OUTDIR/COMPLETE             marker (format version, build info)
#
# The guest gets an address by DHCP on eth0 (qemu user networking works),
# runs sshd on port 22 and lets root log in with an EMPTY password
# (password auth with "" and also the "none" method).
#
# Needs root, network access to a Debian mirror only, and the packages
# debootstrap e2fsprogs qemu-utils mtools fdisk.  No loop devices, no mounts
# (besides the /proc etc. debootstrap itself mounts inside its chroot).
#
# Idempotent: if OUTDIR already holds a complete image of the current format
# version it exits 0 immediately.  The image is built in a temporary
# directory next to OUTDIR and renamed into place, so an interrupted run never
# leaves a half-built OUTDIR.
#
# Environment overrides:
#   DJINN_IMAGE_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   DJINN_IMAGE_SUITE      Debian suite (default bookworm)
#   DJINN_IMAGE_DEB_CACHE  directory to cache downloaded .debs (default: none)
#   DJINN_IMAGE_FREE_MB    free space to leave in the root fs (default 512)
#   DJINN_IMAGE_FORCE=1    rebuild even if OUTDIR is complete
set -euo pipefail

# Bump when the image contents/layout change, so cached images get rebuilt.
FORMAT_VERSION=1

MIRROR=${DJINN_IMAGE_MIRROR:-http://deb.debian.org/debian}
SUITE=${DJINN_IMAGE_SUITE:-bookworm}
DEB_CACHE=${DJINN_IMAGE_DEB_CACHE:-}
FREE_MB=${DJINN_IMAGE_FREE_MB:-512}
FORCE=${DJINN_IMAGE_FORCE:-0}

PACKAGES=(
    linux-image-amd64
    systemd-sysv
    udev
    openssh-server
    openssh-sftp-server
    systemd-boot-efi
    zstd
    iproute2
)

CMDLINE_COMMON="rw console=ttyS0 net.ifnames=0 fsck.mode=skip quiet"
CMDLINE_KERNEL="root=/dev/vda ${CMDLINE_COMMON}"
CMDLINE_SELFBOOT="root=/dev/vda2 ${CMDLINE_COMMON}"

log() { printf '[build-qemu-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $# -eq 1 && -n $1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }

OUTDIR=$1
case $OUTDIR in /*) ;; *) OUTDIR=$PWD/$OUTDIR ;; esac
OUTDIR=${OUTDIR%/}

is_complete() {
    local d=$1
    [[ -f $d/COMPLETE ]] &&
        grep -qx "format_version=${FORMAT_VERSION}" "$d/COMPLETE" &&
        [[ -s $d/kernel/disk.qcow2 && -s $d/kernel/vmlinuz &&
           -s $d/kernel/initrd.img && -s $d/kernel/cmdline &&
           -s $d/selfboot.qcow2 ]]
}

if [[ $FORCE != 1 ]] && is_complete "$OUTDIR"; then
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, file ownership)"
for tool in debootstrap chroot mkfs.ext4 qemu-img mformat mcopy mmd sfdisk dd truncate flock; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done

PARENT=$(dirname "$OUTDIR")
mkdir -p "$PARENT"

# Serialise concurrent builders of the same OUTDIR.
exec 9>"$OUTDIR.lock"
flock 9
if [[ $FORCE != 1 ]] && is_complete "$OUTDIR"; then
    log "image built concurrently by another process"
    exit 0
fi

START=$(date +%s)
WORK=$(mktemp -d "$PARENT/.$(basename "$OUTDIR").build.XXXXXX")
ROOTFS=$WORK/rootfs
STAGE=$WORK/out

cleanup() {
    local rc=$?
    # debootstrap mounts things inside the chroot; make sure nothing is
    # mounted below WORK before deleting it.
    if [[ -d $WORK ]]; then
        local m
        for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
        rm -rf --one-file-system "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$STAGE/kernel"

# --------------------------------------------------------------------------
log "debootstrap $SUITE (minbase) from $MIRROR"
DB_ARGS=(--variant=minbase "--include=$(IFS=,; echo "${PACKAGES[*]}")")
if [[ -n $DEB_CACHE ]]; then
    mkdir -p "$DEB_CACHE"
    DB_ARGS+=("--cache-dir=$DEB_CACHE")
fi
debootstrap "${DB_ARGS[@]}" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 50 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

# --------------------------------------------------------------------------
log "configuring guest"
R=$ROOTFS

echo djinn-test >"$R/etc/hostname"
cat >"$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	djinn-test
::1		localhost ip6-localhost ip6-loopback
EOF
# Root is mounted rw by the kernel (cmdline "rw"); nothing else to mount.
echo "# root fs is mounted by the kernel (root=... rw)" >"$R/etc/fstab"
# qemu user-mode networking DNS server.
rm -f "$R/etc/resolv.conf"
echo "nameserver 10.0.2.3" >"$R/etc/resolv.conf"

# Fixed machine-id: avoids first-boot logic on every (snapshot=on) boot.
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$R/etc/machine-id"
echo >>"$R/etc/machine-id"

# Root with an empty password.
sed -i 's/^root:[^:]*:/root::/' "$R/etc/shadow"
grep -q '^root::' "$R/etc/shadow" || die "failed to clear root password"

# sshd: root login with empty password.  The drop-in is read first and the
# first value of each keyword wins, so it overrides sshd_config.
cat >"$R/etc/ssh/sshd_config.d/00-djinn-test.conf" <<'EOF'
# djinn-worker test image: root logs in with an empty password.
PermitRootLogin yes
PermitEmptyPasswords yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
EOF
grep -q '^Subsystem[[:space:]]\+sftp' "$R/etc/ssh/sshd_config" ||
    echo "Subsystem sftp /usr/lib/openssh/sftp-server" >>"$R/etc/ssh/sshd_config"
[[ -x $R/usr/lib/openssh/sftp-server ]] || die "sftp-server missing"
ls "$R"/etc/ssh/ssh_host_*_key >/dev/null 2>&1 || die "ssh host keys missing"

# Network: systemd-networkd, DHCP on eth*.
cat >"$R/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=eth* en*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDomains=no
EOF
chroot "$R" systemctl enable systemd-networkd.service >/dev/null 2>&1
# Services/timers not needed in a throw-away test VM (boot speed).
chroot "$R" systemctl mask \
    systemd-networkd-wait-online.service \
    systemd-firstboot.service \
    apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    systemd-tmpfiles-clean.timer \
    getty@tty1.service \
    >/dev/null 2>&1

# Kernel + initrd out of the root fs.
KVER=$(basename "$(ls -d "$R"/lib/modules/* | sort -V | tail -n1)")
[[ -f $R/boot/vmlinuz-$KVER && -f $R/boot/initrd.img-$KVER ]] ||
    die "kernel/initrd for $KVER not found in rootfs /boot"
for mod in virtio_blk virtio_net virtio_pci ext4; do
    if ! grep -q "/$mod.ko" "$R/lib/modules/$KVER/modules.dep" &&
       ! grep -q "/$mod.ko" "$R/lib/modules/$KVER/modules.builtin"; then
        die "kernel module $mod not found"
    fi
done
install -m 0644 "$R/boot/vmlinuz-$KVER" "$STAGE/kernel/vmlinuz"
install -m 0644 "$R/boot/initrd.img-$KVER" "$STAGE/kernel/initrd.img"
echo "$CMDLINE_KERNEL" >"$STAGE/kernel/cmdline"
SDBOOT=$R/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[[ -f $SDBOOT ]] || die "systemd-bootx64.efi missing"
install -m 0644 "$SDBOOT" "$WORK/BOOTX64.EFI"

# --------------------------------------------------------------------------
log "shrinking root fs"
rm -f "$R"/boot/vmlinuz-* "$R"/boot/initrd.img-* "$R"/boot/System.map-* "$R"/boot/config-* \
      "$R"/vmlinuz* "$R"/initrd.img*
# Kernel modules for hardware a qemu test VM never has.
MODDIR=$R/lib/modules/$KVER/kernel
rm -rf "$MODDIR/sound" "$MODDIR/drivers/gpu" "$MODDIR/drivers/media" \
       "$MODDIR/drivers/net/wireless" "$MODDIR/drivers/infiniband" \
       "$MODDIR/drivers/staging" "$MODDIR/drivers/bluetooth" \
       "$MODDIR/drivers/iio" "$MODDIR/drivers/isdn" "$MODDIR/drivers/net/can" \
       "$MODDIR/net/wireless" "$MODDIR/net/mac80211" "$MODDIR/net/bluetooth"
chroot "$R" depmod -a "$KVER"
rm -rf "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/info/* \
       "$R"/usr/share/locale/* "$R"/usr/share/lintian \
       "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin \
       "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/debconf/*-old \
       "$R"/var/log/*.log "$R"/var/log/apt/* "$R"/tmp/* "$R"/var/tmp/*
# Keep future apt installs (if a test ever runs one) from re-adding docs.
cat >"$R/etc/dpkg/dpkg.cfg.d/01-djinn-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
echo "djinn-worker test image, format ${FORMAT_VERSION}, $SUITE, kernel $KVER" >"$R/etc/djinn-test-image"

# --------------------------------------------------------------------------
log "creating ext4 root fs"
USED_KB=$(du -sk --apparent-size "$R" | cut -f1)
ROOT_MB=$(( (USED_KB * 12 / 10) / 1024 + FREE_MB ))
ROOT_MB=$(( (ROOT_MB + 63) / 64 * 64 ))
mkfs.ext4 -q -F -L djinn-root -m 0 -E root_owner=0:0 -d "$R" "$WORK/root.img" "${ROOT_MB}M"

qemu-img convert -O qcow2 "$WORK/root.img" "$STAGE/kernel/disk.qcow2"

# --------------------------------------------------------------------------
log "creating EFI system partition"
ESP_MB=$(( ( $(stat -c %s "$STAGE/kernel/vmlinuz") + $(stat -c %s "$STAGE/kernel/initrd.img") \
             + $(stat -c %s "$WORK/BOOTX64.EFI") ) / 1048576 + 16 ))
(( ESP_MB >= 64 )) || ESP_MB=64
ESP=$WORK/esp.img
truncate -s "${ESP_MB}M" "$ESP"
mformat -i "$ESP" -F -v ESP -T $(( ESP_MB * 2048 )) -h 64 -s 32 ::
mmd -i "$ESP" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$ESP" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$ESP" "$STAGE/kernel/vmlinuz" ::/vmlinuz
mcopy -i "$ESP" "$STAGE/kernel/initrd.img" ::/initrd.img
printf 'timeout 0\ndefault debian.conf\neditor no\n' >"$WORK/loader.conf"
printf 'title Debian (djinn-worker test)\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' \
    "$CMDLINE_SELFBOOT" >"$WORK/debian.conf"
mcopy -i "$ESP" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$ESP" "$WORK/debian.conf" ::/loader/entries/debian.conf

log "assembling GPT disk"
DISK=$WORK/selfboot.raw
ESP_START_MB=1
ROOT_START_MB=$(( ESP_START_MB + ESP_MB ))
DISK_MB=$(( ROOT_START_MB + ROOT_MB + 1 ))   # +1 MiB for the backup GPT
truncate -s "${DISK_MB}M" "$DISK"
sfdisk --quiet --no-reread --no-tell-kernel "$DISK" <<EOF
label: gpt
unit: sectors
start=$(( ESP_START_MB * 2048 )), size=$(( ESP_MB * 2048 )), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"
start=$(( ROOT_START_MB * 2048 )), size=$(( ROOT_MB * 2048 )), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
EOF
dd if="$ESP" of="$DISK" bs=1M seek="$ESP_START_MB" conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$DISK" bs=1M seek="$ROOT_START_MB" conv=notrunc,sparse status=none
qemu-img convert -O qcow2 "$DISK" "$STAGE/selfboot.qcow2"

# --------------------------------------------------------------------------
cat >"$STAGE/COMPLETE" <<EOF
format_version=${FORMAT_VERSION}
suite=${SUITE}
kernel=${KVER}
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(( $(date +%s) - START ))
EOF
chmod 0755 "$STAGE" "$STAGE/kernel"
sync -f "$STAGE/COMPLETE" 2>/dev/null || sync

if [[ -e $OUTDIR ]]; then
    OLD=$WORK/old
    mv -T "$OUTDIR" "$OLD"
fi
mv -T "$STAGE" "$OUTDIR"
log "done: $OUTDIR ($(du -sh "$OUTDIR" | cut -f1) on disk, $(( $(date +%s) - START ))s)"
