# The lab's single-node Ceph cluster, sourced by tools/lab.sh (ceph-up, ceph-down, ceph-status;
# "up", "down" and "status" include it). No systemd, no cephadm, no ceph-volume:
#
#   one mon "a" on 127.0.0.1 (msgr v2 :3300 and v1 :6789), one mgr "x", one BlueStore OSD whose
#   block device is a sparse file, pool size 1, cephx on, an "rbd" pool, and the client
#   "client.rdmb-lab" (profile rbd) whose key is also a libvirt "ceph" secret (usage name
#   "rdmb-lab-ceph") for test domains with RBD disks.
#
# Everything lives under $CEPH_DIR (config, keyrings 0600, daemon data, pid files, logs); nothing
# goes into /etc/ceph or /var/lib/ceph. Tests find the cluster through $CEPH_DIR/ceph.conf.

CEPH_DIR=/var/lib/rdmb-lab/ceph
CEPH_CONF_FILE=$CEPH_DIR/ceph.conf
CEPH_MON_ADDR='[v2:127.0.0.1:3300,v1:127.0.0.1:6789]'
CEPH_CLIENT=rdmb-lab # client.rdmb-lab: what test domains and the tests use
CEPH_SECRET_USAGE=rdmb-lab-ceph
CEPH_OSD_BLOCK_SIZE=$((16 * 1024 * 1024 * 1024)) # sparse; only written bytes take space
# The OSD's cache target: Ceph's minimum (896 MiB). With the mon (~45 MB) and the mgr (~300 MB)
# the cluster stays under ~1.5 GiB RSS.
CEPH_OSD_MEMORY_TARGET=939524096
CEPH_TIMEOUT=60

ceph_cli() { timeout "$CEPH_TIMEOUT" ceph --conf "$CEPH_CONF_FILE" "$@"; }

ceph_pid() { cat "$CEPH_DIR/run/$1.pid" 2>/dev/null || true; }

# True when every daemon of a finished bootstrap runs and the mon answers.
ceph_running() {
    [ -f "$CEPH_DIR/.complete" ] || return 1
    local d
    for d in mon.a mgr.x osd.0; do pid_alive "$(ceph_pid "$d")" || return 1; done
    ceph_cli health >/dev/null 2>&1
}

ceph_write_conf() {
    local fsid=$1 d=$CEPH_DIR
    cat >"$CEPH_CONF_FILE" <<EOF
[global]
fsid = $fsid
mon_initial_members = a
mon_host = $CEPH_MON_ADDR
public_network = 127.0.0.0/8
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_autoscale_mode = off
mon_data_avail_warn = 10
mgr_stats_period = 1
run_dir = $d/run
pid_file = $d/run/\$name.pid
mon_data = $d/mon/\$cluster-\$id
mgr_data = $d/mgr/\$cluster-\$id
osd_data = $d/osd/\$cluster-\$id
[mon]
log_file = $d/log/\$name.log
mon_cluster_log_file = $d/log/\$cluster.\$channel.log
mgr_initial_modules = iostat
[mgr]
log_file = $d/log/\$name.log
[osd]
log_file = $d/log/\$name.log
osd_objectstore = bluestore
osd_memory_target = $CEPH_OSD_MEMORY_TARGET
# trim removed snapshots' clones at once (the HDD default sleeps 5 s between trims, and a test run
# removes hundreds of snapshots: their clones would outlive it by hours and fill the OSD). A zero
# osd_snap_trim_sleep means "the device type's value", so each of those is zero too.
osd_snap_trim_sleep_hdd = 0
osd_snap_trim_sleep_ssd = 0
osd_snap_trim_sleep_hybrid = 0
bluestore_block_size = $CEPH_OSD_BLOCK_SIZE
bluestore_rocksdb_options = compression=kNoCompression,max_write_buffer_number=2,min_write_buffer_number_to_merge=1,recycle_log_file_num=2,write_buffer_size=33554432,writable_file_max_buffer_size=0,compaction_readahead_size=2097152,max_background_compactions=1,max_total_wal_size=134217728
[client]
keyring = $d/ceph.client.admin.keyring
EOF
}

# Starts the daemons of an existing cluster that are not running (after a reboot, or a crash).
ceph_start_daemons() {
    local d=$CEPH_DIR fsid
    fsid=$(awk '$1 == "fsid" {print $3}' "$CEPH_CONF_FILE")
    [ -n "$fsid" ] || return 1
    ceph_write_conf "$fsid" # this script's current settings
    pid_alive "$(ceph_pid mon.a)" || ceph-mon --conf "$CEPH_CONF_FILE" -i a
    pid_alive "$(ceph_pid mgr.x)" || ceph-mgr --conf "$CEPH_CONF_FILE" -i x
    pid_alive "$(ceph_pid osd.0)" || ceph-osd --conf "$CEPH_CONF_FILE" -i 0 2>>"$d/log/osd.0.stderr"
}

ceph_bootstrap() {
    local d=$CEPH_DIR fsid osd_uuid osd_secret id
    fsid=$(uuidgen)
    rm -rf "$d"
    mkdir -p "$d"/{mon/ceph-a,mgr/ceph-x,osd/ceph-0,run,log}
    chmod 0700 "$d"
    ceph_write_conf "$fsid"
    (
        umask 077 # every keyring 0600
        ceph-authtool --create-keyring "$d/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$d/ceph.client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
        ceph-authtool "$d/mon.keyring" --import-keyring "$d/ceph.client.admin.keyring" >/dev/null
        monmaptool --create --fsid "$fsid" --addv a "$CEPH_MON_ADDR" "$d/monmap" >/dev/null
        ceph-mon --conf "$CEPH_CONF_FILE" --mkfs -i a --monmap "$d/monmap" --keyring "$d/mon.keyring"
        ceph-mon --conf "$CEPH_CONF_FILE" -i a
        ceph_cli auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
            -o "$d/mgr/ceph-x/keyring"
        ceph-mgr --conf "$CEPH_CONF_FILE" -i x
        osd_uuid=$(uuidgen)
        osd_secret=$(ceph-authtool --gen-print-key)
        id=$(echo "{\"cephx_secret\": \"$osd_secret\"}" | ceph_cli osd new "$osd_uuid" -i -)
        [ "$id" = 0 ] || { log "ceph: unexpected OSD id '$id'"; exit 1; }
        ceph-authtool --create-keyring "$d/osd/ceph-0/keyring" --name osd.0 --add-key "$osd_secret" >/dev/null
        ceph-osd --conf "$CEPH_CONF_FILE" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$d/log/osd.0.mkfs" 2>&1 || {
            log "ceph: OSD mkfs failed (see $d/log/osd.0.mkfs)"
            exit 1
        }
        ceph-osd --conf "$CEPH_CONF_FILE" -i 0 2>>"$d/log/osd.0.stderr"
        ceph_cli osd pool create rbd 32 >/dev/null 2>&1
        timeout "$CEPH_TIMEOUT" rbd --conf "$CEPH_CONF_FILE" pool init rbd
        ceph_cli auth get-or-create "client.$CEPH_CLIENT" mon 'profile rbd' osd 'profile rbd pool=rbd' \
            mgr 'profile rbd pool=rbd' -o "$d/ceph.client.$CEPH_CLIENT.keyring"
    )
}

# True once the cluster says HEALTH_OK and every PG is active+clean (a PG trimming snapshots or
# scrubbing, active+clean+snaptrim or +scrubbing, serves I/O as well); false after $1 seconds.
ceph_wait_healthy() {
    local i
    for i in $(seq 1 $(($1 * 2))); do
        if ceph_cli pg stat -f json 2>/dev/null | python3 -c '
import json, sys
pgs = json.load(sys.stdin)["pg_summary"]
clean = sum(s["num"] for s in pgs["num_pg_by_state"] if s["name"].startswith("active+clean"))
sys.exit(0 if pgs["num_pgs"] > 0 and clean == pgs["num_pgs"] else 1)' 2>/dev/null &&
            ceph_cli health 2>/dev/null | grep -q HEALTH_OK; then
            return 0
        fi
        sleep 0.5
    done
    log "ceph: not healthy after $1 s: $(ceph_cli health 2>&1 || true); $(ceph_cli pg stat 2>&1 || true)"
    return 1
}

# The libvirt "ceph" secret holding client.rdmb-lab's key (persistent, not private: tests read
# it back as the tool does). Its UUID goes to $CEPH_DIR/secret.uuid.
ceph_define_secret() {
    local uuid_file=$CEPH_DIR/secret.uuid uuid xml key
    virsh -c "$URI" version >/dev/null 2>&1 || {
        log "ceph: libvirtd does not answer; no libvirt secret for client.$CEPH_CLIENT"
        return 0
    }
    uuid=$(virsh -c "$URI" secret-list 2>/dev/null | awk -v u="ceph $CEPH_SECRET_USAGE" \
        'index($0, u) {print $1}' | head -n 1)
    if [ -z "$uuid" ]; then
        uuid=$(uuidgen)
        xml=$(mktemp)
        cat >"$xml" <<EOF
<secret ephemeral='no' private='no'>
  <uuid>$uuid</uuid>
  <usage type='ceph'><name>$CEPH_SECRET_USAGE</name></usage>
</secret>
EOF
        virsh -c "$URI" secret-define "$xml" >/dev/null
        rm -f "$xml"
    fi
    key=$(umask 077 && mktemp)
    ceph_cli auth get-key "client.$CEPH_CLIENT" >"$key"
    virsh -c "$URI" secret-set-value "$uuid" --file "$key" >/dev/null
    rm -f "$key"
    echo "$uuid" >"$uuid_file"
}

ceph_undefine_secret() {
    local uuid
    virsh -c "$URI" version >/dev/null 2>&1 || return 0
    virsh -c "$URI" secret-list 2>/dev/null | awk -v u="ceph $CEPH_SECRET_USAGE" \
        'index($0, u) {print $1}' | while read -r uuid; do
        virsh -c "$URI" secret-undefine "$uuid" >/dev/null 2>&1 || true
    done
}

ceph_up() {
    command -v ceph-mon >/dev/null || { log "ceph: not installed (tools/lab.sh install)"; exit 1; }
    export MALLOC_ARENA_MAX=2 # Debian's ceph uses glibc malloc: keep its arenas few
    if ceph_running; then
        ceph_define_secret
        return 0
    fi
    local t0 t1
    t0=$(date +%s.%N)
    if [ -f "$CEPH_DIR/.complete" ]; then
        log "ceph: starting the daemons of the cluster in $CEPH_DIR"
        if ! { ceph_start_daemons && ceph_wait_healthy 60; }; then
            # a lab cluster holds nothing to keep: one that does not come back is made anew
            log "ceph: the cluster in $CEPH_DIR did not come back; creating it anew"
            ceph_stop_daemons
            rm -f "$CEPH_DIR/.complete"
        fi
    fi
    if [ ! -f "$CEPH_DIR/.complete" ]; then
        log "ceph: creating a single-node cluster in $CEPH_DIR"
        ceph_bootstrap
        touch "$CEPH_DIR/.complete"
        ceph_wait_healthy 120 || exit 1
    fi
    ceph_define_secret
    t1=$(date +%s.%N)
    log "ceph: HEALTH_OK in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s" \
        "(mon $CEPH_MON_ADDR, conf $CEPH_CONF_FILE)"
}

# Waits up to 30 s for the processes to exit, then kills them.
ceph_stop_pids() {
    local p i
    [ $# -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    for i in $(seq 1 300); do
        for p in "$@"; do pid_alive "$p" && break; p=; done
        [ -z "$p" ] && return 0
        sleep 0.1
    done
    kill -9 "$@" 2>/dev/null || true
}

ceph_daemon_pid() {
    local pid
    pid=$(ceph_pid "$1")
    # only a ceph daemon of this cluster (a stale pid file may name another process by now)
    pid_alive "$pid" && grep -q "$CEPH_CONF_FILE" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
    return 0
}

ceph_down() {
    ceph_undefine_secret
    [ -d "$CEPH_DIR" ] || return 0
    log "ceph: stopping the cluster and removing $CEPH_DIR"
    ceph_stop_daemons
    rm -rf "$CEPH_DIR"
}

ceph_stop_daemons() {
    # the OSD first (it tells the mon it goes down), then mgr and mon
    # shellcheck disable=SC2046
    ceph_stop_pids $(ceph_daemon_pid osd.0)
    # shellcheck disable=SC2046
    ceph_stop_pids $(ceph_daemon_pid mgr.x) $(ceph_daemon_pid mon.a)
}

# Test images (rdmb*) that tests left behind.
ceph_cleanup_leftovers() {
    local img
    ceph_running || return 0
    for img in $(timeout "$CEPH_TIMEOUT" rbd --conf "$CEPH_CONF_FILE" ls rbd 2>/dev/null | grep '^rdmb' || true); do
        log "removing leftover RBD image rbd/$img"
        timeout "$CEPH_TIMEOUT" rbd --conf "$CEPH_CONF_FILE" snap purge "rbd/$img" >/dev/null 2>&1 || true
        timeout "$CEPH_TIMEOUT" rbd --conf "$CEPH_CONF_FILE" rm --no-progress "rbd/$img" >/dev/null 2>&1 || true
    done
}

ceph_status() {
    local d pid
    if [ ! -f "$CEPH_DIR/.complete" ]; then
        echo "ceph: not set up"
        return 0
    fi
    for d in mon.a mgr.x osd.0; do
        pid=$(ceph_pid "$d")
        if pid_alive "$pid"; then
            echo "ceph $d: running (pid $pid, rss $(($(awk '/^VmRSS/ {print $2}' "/proc/$pid/status") / 1024)) MiB)"
        else
            echo "ceph $d: stopped"
        fi
    done
    echo "ceph: $(ceph_cli health 2>&1 || true) (conf $CEPH_CONF_FILE)"
}
