"""RBD disks on the lab's Ceph cluster: discovery and the raw disk mapping, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tools import cephkit, labkit
from tools.labkit import DiskSpec, rdm_backup

pytestmark = pytest.mark.lab

GiB = 1024**3


@pytest.fixture
def private_secret() -> Iterator[str]:
    """A private libvirt ``ceph`` secret (its value hidden from clients) with the lab key."""
    conn = libvirt.open(labkit.URI)
    secret_id = str(uuid.uuid4())
    secret = conn.secretDefineXML(
        f"<secret ephemeral='yes' private='yes'><uuid>{secret_id}</uuid>"
        f"<usage type='ceph'><name>rdmb-{secret_id[:8]} private</name></usage></secret>")
    try:
        lab = conn.secretLookupByUUIDString(cephkit.secret_uuid())
        secret.setValue(lab.value())
        yield secret_id
    finally:
        secret.undefine()
        conn.close()


def _disks(name: str, env: dict[str, str] | None = None) -> Any:
    """``rdm-backup disks NAME --json``."""
    proc = subprocess.run([*labkit.rdm_backup_argv(), "disks", name, "--json"],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.usefixtures("ceph")
def test_rbd_disk_is_a_raw_disk_with_its_image_mapped(run_token: str) -> None:
    name = f"rdmb-{run_token}-rbd-map"
    with cephkit.rbd_image(GiB) as image, \
            labkit.test_domain(name, [cephkit.rbd_disk("vdb", image)]):
        doc = _disks(name)
        raw = {d["target"]: d for d in doc["raw_disks"]}
        vdb = raw["vdb"]
        assert (vdb["source_kind"], vdb["device"], vdb["source"], vdb["size"]) == (
            "rbd", "disk", f"rbd:{image.spec}", GiB)
        assert vdb["rbd"]["pool"] == "rbd" and vdb["rbd"]["user"] == cephkit.CLIENT
        assert vdb["rbd"]["secret_uuid"] == cephkit.secret_uuid()
        assert vdb["mapping_error"] is None, vdb["mapping_error"]
        root = vdb["mapping"]["storage"]
        with cephkit.cluster() as handle, cephkit.ioctx() as ctx:
            import rbd

            with rbd.Image(ctx, image.name, read_only=True) as img:
                expected = {"cluster_fsid": handle.get_fsid(), "pool": "rbd",
                            "pool_id": handle.pool_lookup("rbd"), "image": image.name,
                            "image_id": img.id(), "size": GiB, "object_size": 4 * 1024**2,
                            "block_name_prefix": img.block_name_prefix(),
                            "features": list(cephkit.DEFAULT_FEATURES)}
        assert root["kind"] == "rbd-image" and root["size"] == GiB
        assert {k: root["identity"][k] for k in expected} == expected
        assert root["identity"]["monitors"] == ["v2:127.0.0.1:3300,v1:127.0.0.1:6789"]
        assert root["identity"]["block_name_prefix"] == f"rbd_data.{root['identity']['image_id']}"
        objects = root["extents"][0]["target"]
        assert objects["kind"] == "rados-objects" and objects["identity"]["objects"] == 256

        proc = rdm_backup("map", name, "--disk", "vdb")
        assert proc.returncode == 0, proc.stderr
        [mapping] = json.loads(proc.stdout)
        assert mapping["agent"] == "rbd" and mapping["storage"] == root
        text = rdm_backup("disks", name).stdout
        assert f"vdb      raw  rbd/disk    1.0 GiB  rbd:{image.spec}" in text, text
        assert f"-> rados-objects {root['identity']['block_name_prefix']}.*" in text, text
        key = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
        secret = key.split("key = ")[1].split()[0]
        assert secret not in proc.stdout + proc.stderr + text


@pytest.mark.usefixtures("ceph")
def test_private_secret_needs_a_keyring_file(run_token: str, private_secret: str,
                                             rdmb_tmp: Path) -> None:
    name = f"rdmb-{run_token}-rbd-priv"
    with cephkit.rbd_image(64 * cephkit.MiB) as image, \
            labkit.test_domain(name, [cephkit.rbd_disk("vdb", image, secret=private_secret)]):
        doc = _disks(name)
        [vdb] = doc["raw_disks"]
        assert vdb["mapping"] is None and vdb["size"] == 64 * cephkit.MiB  # from QEMU
        assert "no cephx key for client.rdmb-lab" in vdb["mapping_error"]
        assert "RDM_BACKUP_CEPH_KEYRING" in vdb["mapping_error"]

        keyring = rdmb_tmp / "client.keyring"
        shutil.copy(cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring", keyring)
        keyring.chmod(0o644)
        env = {**os.environ, "RDM_BACKUP_CEPH_KEYRING": str(keyring)}
        [vdb] = _disks(name, env)["raw_disks"]
        assert "chmod 600" in vdb["mapping_error"]
        keyring.chmod(0o600)
        assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
        [vdb] = _disks(name, env)["raw_disks"]
        assert vdb["mapping_error"] is None
        assert vdb["mapping"]["storage"]["identity"]["image"] == image.name


@pytest.mark.usefixtures("ceph")
def test_rbd_disk_of_a_shut_off_domain(run_token: str) -> None:
    name = f"rdmb-{run_token}-rbd-off"
    with cephkit.rbd_image(32 * cephkit.MiB) as image, \
            labkit.test_domain(name, [cephkit.rbd_disk("vdb", image)], start=False):
        [vdb] = _disks(name)["raw_disks"]
        assert vdb["size"] == 32 * cephkit.MiB  # read through librbd
        assert vdb["mapping"]["storage"]["identity"]["image"] == image.name
        assert vdb["node_name"] is None


def test_disk_spec_is_network_rbd() -> None:
    spec: DiskSpec = cephkit.rbd_disk("vdb", cephkit.RbdImage("rbd", "rdmb-x", 1), secret="s")
    assert "protocol='rbd'" in spec.xml and "<secret type='ceph' uuid=\"s\"/>" in spec.xml


CEPH_TIMEOUT = 5.0  # RDM_BACKUP_CEPH_TIMEOUT of the runs below


@pytest.mark.fault
@pytest.mark.usefixtures("ceph")
def test_unreachable_cluster_is_one_line_and_asked_once(run_token: str, rdmb_tmp: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk whose monitor does not answer: `disks` reports it (one connection timeout,
    not one per question), and a backup of it fails with exit 4 and one error line (after
    the warning that the disk has no mapping)."""
    monkeypatch.setenv("RDM_BACKUP_CEPH_TIMEOUT", str(CEPH_TIMEOUT))
    name = f"rdmb-{run_token}-rbd-gone"
    with cephkit.rbd_image(32 * cephkit.MiB) as image, \
            labkit.test_domain(name, [cephkit.rbd_disk("vdb", image, port=6790)], start=False):
        started = time.monotonic()
        [vdb] = _disks(name)["raw_disks"]
        assert time.monotonic() - started < 2 * CEPH_TIMEOUT - 0.5  # one wait, not two
        assert vdb["size"] is None and vdb["mapping"] is None
        assert "cannot connect to the Ceph cluster: TimedOut" in vdb["mapping_error"]
        proc = rdm_backup("backup", name, "--target", str(rdmb_tmp / "repo"))
        assert proc.returncode == 4, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "disk vdb" in errors[0] and "Ceph" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
