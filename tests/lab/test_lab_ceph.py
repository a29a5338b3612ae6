"""The lab's single-node Ceph cluster: what ``tools/lab.sh ceph-up`` promises, checked."""

from __future__ import annotations

import base64
import configparser
import stat
import subprocess
from pathlib import Path

import libvirt
import pytest

from tools import cephkit

pytestmark = pytest.mark.lab

LAB = Path(__file__).resolve().parents[2] / "tools" / "lab.sh"
DAEMONS = ("mon.a", "mgr.x", "osd.0")
RSS_LIMIT = 2 * 1024**3


def _pids() -> dict[str, int]:
    return {d: int((cephkit.CEPH_DIR / "run" / f"{d}.pid").read_text()) for d in DAEMONS}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.usefixtures("ceph")
def test_cluster_is_single_node_loopback_cephx_and_small() -> None:
    conf = configparser.ConfigParser(strict=False, interpolation=None)
    conf.read(cephkit.CEPH_CONF)
    glob = conf["global"]
    assert glob["mon_host"] == "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"
    assert glob["auth_client_required"] == glob["auth_cluster_required"] == "cephx"
    assert glob["osd_pool_default_size"] == "1" and glob["mon_allow_pool_size_one"] == "true"
    assert int(conf["osd"]["osd_memory_target"]) <= 1024**3
    for keyring in cephkit.CEPH_DIR.rglob("*keyring"):
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600, keyring
    pids = _pids()
    assert sum(_rss(p) for p in pids.values()) < RSS_LIMIT
    with cephkit.cluster() as handle:
        assert "rbd" in handle.list_pools()
        ret, out, _ = handle.mon_command('{"prefix": "health"}', b"")
        assert ret == 0 and out.startswith(b"HEALTH_OK"), out


@pytest.mark.usefixtures("ceph")
def test_ceph_up_again_changes_nothing() -> None:
    before = _pids()
    proc = subprocess.run([str(LAB), "ceph-up"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "creating" not in proc.stderr and "starting" not in proc.stderr, proc.stderr
    assert _pids() == before
    status = subprocess.run([str(LAB), "ceph-status"], capture_output=True, text=True,
                            timeout=120, check=True).stdout
    assert "HEALTH_OK" in status and status.count(": running") == 3, status


@pytest.mark.usefixtures("ceph")
def test_lab_secret_holds_the_client_key() -> None:
    conn = libvirt.open("qemu:///system")
    try:
        secret = conn.secretLookupByUUIDString(cephkit.secret_uuid())
        assert secret.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
        assert secret.usageID().startswith("rdmb-")
        keyring = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
        assert base64.b64encode(secret.value()).decode() in keyring
    finally:
        conn.close()


@pytest.mark.usefixtures("ceph")
def test_test_images_are_made_and_removed(rdmb_tmp: Path) -> None:
    import rbd

    with cephkit.rbd_image(64 * cephkit.MiB, object_size=64 * 1024) as image:
        assert image.name.startswith("rdmb-")
        cephkit.write_pattern(image, 1 * cephkit.MiB, 64 * 1024, 0x5A)
        data = cephkit.export(image, rdmb_tmp / "copy.raw").read_bytes()
        assert data[cephkit.MiB:cephkit.MiB + 65536] == b"\x5a" * 65536
        assert data.count(0) == len(data) - 65536
        with cephkit.ioctx() as ctx, rbd.Image(ctx, image.name, read_only=True) as img:
            assert img.stat()["obj_size"] == 64 * 1024
    with cephkit.ioctx() as ctx:
        assert image.name not in rbd.RBD().list(ctx)
