#!/usr/bin/env bash
# The KVM lab of libvirt-rdm-backup: one script for the Makefile, CI and the Vagrant box.
#
#   tools/lab.sh install   Debian packages + the Python venv at .venv/ (idempotent)
#   tools/lab.sh up        virtlogd + libvirtd, tgtd on 127.0.0.1 only, loop-control, and a
#                          reflink XFS for LUN backing stores at /var/lib/rdmb-lab/reflink (idempotent)
#   tools/lab.sh down      stop what "up" started; remove leftover test domains, targets, loops
#   tools/lab.sh status    what is running
#   tools/lab.sh ceph-up | ceph-down | ceph-status
#                          only the single-node Ceph cluster ("up", "down" and "status" include it)
#
# Everything the lab creates for tests carries the prefix "rdmb" so "down" can find leftovers.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
STATE=/run/rdmb-lab
PORTAL=127.0.0.1:3260
URI=qemu:///system
# A reflink-capable XFS (sparse image, loop-mounted) for LUN backing stores and their snapshots.
REFLINK_IMG=/var/lib/rdmb-lab/reflink.xfs
REFLINK_DIR=/var/lib/rdmb-lab/reflink
REFLINK_SIZE=20G

DEB_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-block-extra
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    tgt libiscsi-bin libiscsi7 fdisk xfsprogs
    python3 python3-venv python3-dev python3-libnbd libnbd-bin
    # Remote agent tests: a private sshd on loopback (tests/lab/sshd.py) and the ssh client.
    openssh-server openssh-client
    gcc make
    # The Vagrant box definition (vagrant/Vagrantfile) is validated by the tests.
    vagrant vagrant-libvirt rsync
    # The peer that the bench (tools/bench/) races on qcow2 disks.
    virtnbdbackup
    # The skewed-clock fault test moves the tool's clock only (LD_PRELOAD).
    faketime
    # The single-node Ceph cluster (tools/lab-ceph.sh) for RBD disks, and tgt's rbd backing store.
    ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados tgt-rbd
)

log() { printf 'lab: %s\n' "$*" >&2; }

# shellcheck source=tools/lab-ceph.sh
. "$ROOT/tools/lab-ceph.sh"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (libvirtd, tgtd and loop devices need it)"
        exit 1
    fi
}

missing_packages() {
    local p
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    local attempt
    for attempt in 1 2 3; do
        if apt-get -o DPkg::Lock::Timeout=300 update -qq &&
            apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null; then
            return 0
        fi
        log "apt-get failed (attempt $attempt of 3)"
        sleep $((attempt * 5))
    done
    log "could not install Debian packages: $*"
    exit 1
}

# A venv is this checkout's own only if its scripts point at its own interpreter: a venv copied
# or cloned from another path still runs, but its pip and pytest would run the other one.
venv_is_ours() {
    [ -x "$VENV/bin/python" ] && [ -f "$VENV/pyvenv.cfg" ] && [ -f "$VENV/bin/pip" ] || return 1
    "$VENV/bin/python" -c 'import sys' 2>/dev/null || return 1
    case "$(head -n 1 "$VENV/bin/pip")" in
        "#!$VENV/bin/python"*) return 0 ;;
        *) return 1 ;;
    esac
}

# The venv imports everything the project and its tests need, and the package from this checkout.
venv_is_complete() {
    local t where
    for t in pytest mypy; do
        [ -x "$VENV/bin/$t" ] || return 1
        case "$(head -n 1 "$VENV/bin/$t")" in "#!$VENV/bin/python"*) ;; *) return 1 ;; esac
    done
    "$VENV/bin/ruff" --version >/dev/null 2>&1 || return 1 # a native binary, no shebang
    where=$(cd / && "$VENV/bin/python" -c \
        'import libvirt, lxml, tenacity, qemu.qmp, nbd, rados, rbd, pytest, xdist, libvirt_rdm_backup as m; print(m.__file__)' \
        2>/dev/null) || return 1
    [ "$where" = "$ROOT/libvirt_rdm_backup/__init__.py" ]
}

do_install() {
    need_root
    local missing
    missing=$(missing_packages)
    if [ -n "$missing" ]; then
        log "installing Debian packages: $(echo $missing)"
        # shellcheck disable=SC2086
        apt_install $missing
    fi
    # Debian's Python 3.11 with system site-packages: it sees python3-libnbd ("import nbd") and
    # python3-rbd/python3-rados ("import rbd, rados").
    # A .venv that is a link (to another checkout's venv) is replaced by a venv of our own,
    # never cleared through the link.
    if [ -L "$VENV" ]; then
        log "replacing the link $VENV by a venv of this checkout"
        rm -f "$VENV"
    fi
    if ! venv_is_ours; then
        log "creating venv at $VENV"
        rm -f "$VENV/.installed"
        /usr/bin/python3 -m venv --clear --system-site-packages "$VENV"
    fi
    local stamp="$VENV/.installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] ||
        ! venv_is_complete; then
        log "installing the project and its Python dependencies into the venv"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
        local out
        if ! out=$("$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1); then
            printf '%s\n' "$out" >&2
            log "pip install failed"
            exit 1
        fi
        printf '%s\n' "$out" | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
        venv_is_complete || { log "venv is incomplete after pip install"; exit 1; }
        touch "$stamp"
    fi
}

# True for a running process (a zombie that init has not reaped yet is not running).
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$state" != Z ]
}

libvirt_tcp_answers() {
    virsh -c qemu+tcp://127.0.0.1/system version >/dev/null 2>&1
}

start_libvirt() {
    mkdir -p /run/libvirt /var/log/libvirt
    if ! pgrep -x virtlogd >/dev/null; then
        log "starting virtlogd"
        virtlogd -d
    fi
    # libvirtd also listens on TCP 127.0.0.1:16509 without authentication: for the
    # tests of backups driven through a remote URI (qemu+tcp://127.0.0.1/system). Loopback
    # only, and only in this lab; a real host would use qemu+tls:// or qemu+ssh://.
    mkdir -p "$STATE"
    cat >"$STATE/libvirtd.conf" <<CONF
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "16509"
auth_tcp = "none"
CONF
    if pgrep -x libvirtd >/dev/null && ! libvirt_tcp_answers; then
        log "restarting libvirtd with its loopback TCP listener"
        pkill -TERM -x libvirtd || true
        for i in $(seq 1 60); do pgrep -x libvirtd >/dev/null || break; sleep 0.5; done
    fi
    if ! pgrep -x libvirtd >/dev/null; then
        log "starting libvirtd (unix socket, and TCP on 127.0.0.1:16509)"
        libvirtd -d --listen --config "$STATE/libvirtd.conf"
    fi
    local i
    for i in $(seq 1 60); do
        if virsh -c "$URI" version >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    log "libvirtd does not answer on $URI"
    exit 1
}

start_tgtd() {
    if tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; then
        return 0
    fi
    log "starting tgtd on $PORTAL (loopback only)"
    mkdir -p /var/run/tgtd
    tgtd --iscsi portal="$PORTAL"
    local i
    for i in $(seq 1 40); do
        if tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.25
    done
    log "tgtd did not come up"
    exit 1
}

start_reflink_fs() {
    mkdir -p "$REFLINK_DIR"
    if mountpoint -q "$REFLINK_DIR"; then
        return 0
    fi
    if [ ! -f "$REFLINK_IMG" ]; then
        log "creating a reflink XFS in $REFLINK_IMG ($REFLINK_SIZE, sparse)"
        rm -f "$REFLINK_IMG.new"
        truncate -s "$REFLINK_SIZE" "$REFLINK_IMG.new"
        mkfs.xfs -q -m reflink=1 -L rdmb-reflink "$REFLINK_IMG.new"
        mv "$REFLINK_IMG.new" "$REFLINK_IMG"
    fi
    log "mounting $REFLINK_IMG at $REFLINK_DIR"
    mount -o loop "$REFLINK_IMG" "$REFLINK_DIR"
    chmod 0755 "$REFLINK_DIR"
}

stop_reflink_fs() {
    if mountpoint -q "$REFLINK_DIR"; then
        log "unmounting $REFLINK_DIR"
        umount "$REFLINK_DIR" || log "cannot unmount $REFLINK_DIR (still in use?)"
    fi
    if [ -f "$REFLINK_IMG" ] && ! mountpoint -q "$REFLINK_DIR"; then
        losetup -j "$REFLINK_IMG" -n -O NAME 2>/dev/null | while read -r l; do
            losetup -d "$l" || true
        done
    fi
}

# QEMU runs as libvirt-qemu (group kvm). Without udev, /dev/kvm may be 0600 root:root: do what
# Debian's udev rule does (group kvm, mode 0660). Where KVM still cannot be used by that user,
# domains fall back to TCG (type qemu), with a notice.
prepare_kvm() {
    local type=qemu
    if [ -c /dev/kvm ]; then
        if getent group kvm >/dev/null; then
            chgrp kvm /dev/kvm 2>/dev/null || true
            chmod 0660 /dev/kvm 2>/dev/null || true
        fi
        if kvm_usable_by_qemu_user; then
            type=kvm
        else
            log "notice: /dev/kvm is not usable by the QEMU user; domains use TCG (slower)"
        fi
    else
        log "notice: no /dev/kvm; domains use TCG (slower)"
    fi
    echo "$type" >"$STATE/domain-type"
}

# True when the user QEMU runs as (libvirt-qemu, else root) can open /dev/kvm read-write.
kvm_usable_by_qemu_user() {
    local user=libvirt-qemu
    id "$user" >/dev/null 2>&1 || user=root
    [ "$user" = root ] && return 0
    setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
        sh -c ': <>/dev/kvm' 2>/dev/null
}

do_up() {
    need_root
    mkdir -p "$STATE"
    modprobe loop 2>/dev/null || true
    [ -e /dev/loop-control ] || { log "no /dev/loop-control: loop devices unavailable"; exit 1; }
    start_libvirt
    start_tgtd
    start_reflink_fs
    prepare_kvm
    ceph_up
    log "lab is up (libvirt $URI, iSCSI portal $PORTAL, domain type $(cat "$STATE/domain-type")," \
        "reflink XFS at $REFLINK_DIR)"
}

cleanup_leftovers() {
    local d t
    if virsh -c "$URI" version >/dev/null 2>&1; then
        for d in $(virsh -c "$URI" list --all --name 2>/dev/null | grep '^rdmb' || true); do
            log "removing leftover domain $d"
            virsh -c "$URI" destroy "$d" >/dev/null 2>&1 || true
            virsh -c "$URI" undefine "$d" >/dev/null 2>&1 || true
        done
    fi
    if tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; then
        for t in $(tgtadm --lld iscsi --op show --mode target | sed -n 's/^Target \([0-9]*\): .*rdmb.*/\1/p'); do
            log "removing leftover iSCSI target $t"
            tgtadm --lld iscsi --op delete --mode target --tid "$t" --force >/dev/null 2>&1 || true
        done
    fi
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v fs="$REFLINK_IMG" '$2 ~ /rdmb/ && $2 != fs {print $1}' |
        while read -r l; do
            log "detaching leftover loop device $l"
            losetup -d "$l" || true
        done
    ceph_cleanup_leftovers
}

do_down() {
    need_root
    cleanup_leftovers
    ceph_down
    if tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; then
        log "stopping tgtd"
        tgtadm --op delete --mode system >/dev/null 2>&1 || true
    fi
    local p
    for p in libvirtd virtlogd; do
        if pgrep -x "$p" >/dev/null; then
            log "stopping $p"
            pkill -TERM -x "$p" || true
        fi
    done
    stop_reflink_fs
    rm -rf "$STATE"
    log "lab is down"
}

do_status() {
    local p
    for p in virtlogd libvirtd tgtd; do
        if pgrep -x "$p" >/dev/null; then echo "$p: running"; else echo "$p: stopped"; fi
    done
    virsh -c "$URI" list --all 2>/dev/null | sed 's/^/  /' || true
    losetup -l 2>/dev/null | sed 's/^/  /' || true
    if mountpoint -q "$REFLINK_DIR"; then echo "reflink XFS: $REFLINK_DIR"; else echo "reflink XFS: not mounted"; fi
    ceph_status
}

case "${1:-}" in
    install) do_install ;;
    up) do_up ;;
    down) do_down ;;
    clean) need_root; cleanup_leftovers ;;
    status) do_status ;;
    ceph-up) need_root; ceph_up ;;
    ceph-down) need_root; ceph_down ;;
    ceph-status) ceph_status ;;
    *) echo "usage: $0 install|up|down|clean|status|ceph-up|ceph-down|ceph-status" >&2; exit 2 ;;
esac
