#!/usr/bin/env bash
# The tiny Linux guest of the lab: a Debian kernel and an initramfs for direct kernel boot.
#
#   tools/build-guest.sh        build (or reuse) the guest; prints the cache directory
#
# Output, in $RDMB_GUEST_DIR (default /var/cache/rdmb-guest):
#   vmlinuz     the kernel of the Debian package that linux-image-amd64 depends on
#   initrd.gz   busybox (from busybox-static), the virtio/SCSI/ext4 modules, qemu-ga with its
#               libraries, and /init (see below)
#   debs/       the downloaded .deb files: a rebuild needs no network once they are here
#   stamp       written last: the build is complete and made by this version of the script
#
# Nothing is installed on the host: the packages are fetched with `apt-get download` and unpacked
# with `dpkg-deb -x` (installing busybox-static would replace Debian's busybox). The build is
# idempotent, serialised by a lock, and skipped while the stamp matches this script. Delete the
# directory to pick up a newer kernel. Needs root (apt-get, ownership in the initramfs).
#
# The guest's /init mounts proc, sysfs and devtmpfs, loads the modules in dependency order,
# links /dev/virtio-ports/<name>, starts `qemu-ga -m virtio-serial` on org.qemu.guest_agent.0,
# and then serves commands on /dev/ttyS1 (the domain's second serial port):
#   host -> guest   one line: "<id> <base64 of a shell script>"
#   guest -> host   "__RDMB_BEGIN__ <id>", the script's stdout+stderr, "__RDMB_DONE__ <id> <rc>"
# The script runs with `sh`, stdin from /dev/null. tools/guestkit.py is the host side.
set -euo pipefail

OUT=${RDMB_GUEST_DIR:-/var/cache/rdmb-guest}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

# Modules /init loads, in this order; each one's own `depends=` are loaded before it.
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk
    scsi_common scsi_mod crct10dif_common crct10dif_generic crc-t10dif crc64
    crc64_rocksoft_generic crc64-rocksoft t10-pi sd_mod virtio_scsi
    virtio_console
    # ext4 (also mounts ext2: CONFIG_EXT4_USE_FOR_EXT2), for guest-fsfreeze; crc32c is a softdep
    crc32c_generic crc16 mbcache jbd2 ext4
)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

want_stamp() { printf 'recipe %s\n' "$(sha256sum "$SELF" | cut -d' ' -f1)"; }

is_complete() {
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.gz" ] && [ -f "$OUT/stamp" ] &&
        [ "$(head -n 1 "$OUT/stamp")" = "$(want_stamp)" ]
}

if is_complete; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$OUT/debs"
chmod 0755 "$OUT"
exec 9>"$OUT/.lock"
flock -w 900 9 || die "timed out waiting for another build ($OUT/.lock)"
if is_complete; then # built by whoever held the lock
    echo "$OUT"
    exit 0
fi

rm -rf "$OUT"/build.* # left by a build that was killed (the lock is ours)
WORK=$(mktemp -d "$OUT/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

APT_UPDATED=
apt_update_once() {
    [ -z "$APT_UPDATED" ] || return 1
    APT_UPDATED=1
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || true
}

# The package linux-image-amd64 depends on (linux-image-6.1.0-NN-amd64).
kernel_package() {
    local name=""
    while :; do
        name=$(apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1) || true
        [ -n "$name" ] && break
        apt_update_once || die "apt-cache does not know linux-image-amd64"
    done
    echo "$name"
}

# Path of PACKAGE's .deb in debs/, downloading it unless one is there already.
deb_of() {
    local package=$1 found
    found=$(find "$OUT/debs" -maxdepth 1 -name "${package}_*.deb" | sort -V | tail -n 1)
    if [ -z "$found" ]; then
        log "downloading $package"
        while ! (cd "$OUT/debs" && apt-get -q -o APT::Sandbox::User=root download "$package" >&2); do
            apt_update_once || die "apt-get download $package failed"
        done
        found=$(find "$OUT/debs" -maxdepth 1 -name "${package}_*.deb" | sort -V | tail -n 1)
        [ -n "$found" ] || die "apt-get download $package left no .deb"
    fi
    echo "$found"
}

# --- packages -------------------------------------------------------------------------------------
KDEB=$(find "$OUT/debs" -maxdepth 1 -name 'linux-image-[0-9]*-amd64_*.deb' | sort -V | tail -n 1)
[ -n "$KDEB" ] || KDEB=$(deb_of "$(kernel_package)")
BBDEB=$(deb_of busybox-static)
QGADEB=$(deb_of qemu-guest-agent)

log "unpacking $(basename "$KDEB") $(basename "$BBDEB") $(basename "$QGADEB")"
mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/qga"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BBDEB" "$WORK/busybox"
dpkg-deb -x "$QGADEB" "$WORK/qga"

KVER=$(basename "$(find "$WORK/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
KMOD="$WORK/kernel/lib/modules/$KVER"
VMLINUZ="$WORK/kernel/boot/vmlinuz-$KVER"
[ -n "$KVER" ] && [ -f "$VMLINUZ" ] || die "no kernel in $(basename "$KDEB")"
BB="$WORK/busybox/bin/busybox"
QGA="$WORK/qga/usr/sbin/qemu-ga"
[ -x "$BB" ] || die "no bin/busybox in $(basename "$BBDEB")"
[ -x "$QGA" ] || die "no usr/sbin/qemu-ga in $(basename "$QGADEB")"

# --- initramfs tree -------------------------------------------------------------------------------
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS"/{bin,dev,etc,lib/modules,lib64,mnt,proc,run,sys,tmp,usr/sbin,var}
ln -s ../run "$ROOTFS/var/run"
# The kernel opens /dev/console for /init before devtmpfs is mounted over /dev.
mknod -m 0600 "$ROOTFS/dev/console" c 5 1
mknod -m 0666 "$ROOTFS/dev/null" c 1 3
chmod 1777 "$ROOTFS/tmp"
cp "$BB" "$ROOTFS/bin/busybox"
for applet in $("$BB" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ROOTFS/bin/$applet"
done
ln -s bin "$ROOTFS/sbin"

# Kernel modules: name (with "_" for "-") -> .ko file; every module also gets its depends=.
declare -A KO=() LOADED=()
while IFS= read -r ko; do
    name=${ko##*/}
    name=${name%.ko}
    KO[${name//-/_}]=$ko
done < <(find "$KMOD/kernel" -name '*.ko')
ORDER=()
add_module() {
    local name=${1//-/_} dep
    [ -z "${LOADED[$name]:-}" ] || return 0
    LOADED[$name]=1
    if [ -z "${KO[$name]:-}" ]; then
        sed 's/-/_/g' "$KMOD/modules.builtin" | grep -q "/$name\.ko$" && return 0
        die "kernel $KVER has no module $name"
    fi
    for dep in $(tr '\0' '\n' <"${KO[$name]}" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '); do
        add_module "$dep"
    done
    ORDER+=("$name")
}
for m in "${MODULES[@]}"; do
    add_module "$m"
done
for m in "${ORDER[@]}"; do
    cp "${KO[$m]}" "$ROOTFS/lib/modules/$m.ko"
done
printf '%s\n' "${ORDER[@]}" >"$ROOTFS/etc/modules"

# qemu-ga and every library it loads (ldd on the unpacked binary; the host has them when QEMU is
# installed, else they come from the Debian packages qemu-guest-agent depends on).
cp "$QGA" "$ROOTFS/usr/sbin/qemu-ga"
if ldd "$QGA" | grep -q 'not found'; then
    log "libraries of qemu-ga missing on the host: unpacking its dependencies"
    mkdir -p "$WORK/libs"
    for p in $(apt-cache depends qemu-guest-agent | sed -n 's/^ *Depends: \(lib[^ ]*\)$/\1/p'); do
        dpkg-deb -x "$(deb_of "$p")" "$WORK/libs"
    done
    export LD_LIBRARY_PATH="$WORK/libs/lib/x86_64-linux-gnu:$WORK/libs/usr/lib/x86_64-linux-gnu"
fi
LIBS=$(ldd "$QGA") || die "ldd $QGA failed"
if grep -q 'not found' <<<"$LIBS"; then
    die "qemu-ga needs libraries nobody has: $(grep 'not found' <<<"$LIBS" | tr -s ' \t\n' ' ')"
fi
mkdir -p "$ROOTFS/lib/x86_64-linux-gnu"
while read -r lib; do
    case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$ROOTFS/lib64/ld-linux-x86-64.so.2" ;;
        /*) cp -L "$lib" "$ROOTFS/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
    esac
done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$LIBS")
[ -f "$ROOTFS/lib64/ld-linux-x86-64.so.2" ] || die "ldd named no dynamic loader for qemu-ga"

cat >"$ROOTFS/init" <<'EOF'
#!/bin/sh
# PID 1 of the rdmb lab guest (written by tools/build-guest.sh).
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "rdmb-guest: insmod $m failed"
done </etc/modules

# No udev: name the virtio-serial ports like udev's rules do (the names arrive asynchronously).
mkdir -p /dev/virtio-ports
i=0
while [ $i -lt 50 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        n=$(cat "$p/name")
        [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
    done
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && break
    i=$((i + 1))
    sleep 0.1
done
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
    qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run \
        </dev/null >/run/qemu-ga.log 2>&1 &
else
    echo "rdmb-guest: no org.qemu.guest_agent.0 port: qemu-ga not started"
fi

# The command loop on the second serial port: raw, no echo, no newline translation.
stty -F /dev/ttyS1 115200 raw -echo clocal
exec 3<>/dev/ttyS1
echo "rdmb-guest: ready"
while :; do
    if ! read -r id payload <&3; then
        sleep 0.2
        continue
    fi
    printf '__RDMB_BEGIN__ %s\n' "$id" >&3
    if echo "$payload" | base64 -d >/run/rdmb-cmd.sh 2>/dev/null; then
        sh /run/rdmb-cmd.sh </dev/null >&3 2>&3 3>&-
        rc=$?
    else
        echo "rdmb-guest: the command line is not base64" >&3
        rc=254
    fi
    printf '__RDMB_DONE__ %s %s\n' "$id" "$rc" >&3
done
EOF
chmod 0755 "$ROOTFS/init"

# --- archive --------------------------------------------------------------------------------------
log "packing the initramfs ($KVER, ${#ORDER[@]} modules)"
(cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -6 >"$WORK/initrd.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
chmod 0644 "$WORK/vmlinuz" "$WORK/initrd.gz"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.gz" "$OUT/initrd.gz"
{
    want_stamp
    printf 'kernel %s\nbusybox %s\nqemu-guest-agent %s\nmodules %s\n' "$(basename "$KDEB")" \
        "$(basename "$BBDEB")" "$(basename "$QGADEB")" "${ORDER[*]}"
} >"$OUT/stamp.new"
mv -f "$OUT/stamp.new" "$OUT/stamp"
log "built $OUT/vmlinuz and $OUT/initrd.gz"
echo "$OUT"
