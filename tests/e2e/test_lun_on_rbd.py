"""A passthrough LUN that tgtd serves from an RBD image (tgt's rbd backing store): mapped to
its image, backed up through RBD snapshots (full, incrementals from diff_iterate, still one
after a VM restart), every point restored byte for byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.engine.backup import BackupResult
from libvirt_rdm_backup.engine.paused_copy import paused_copy_reason
from libvirt_rdm_backup.storage.snapshot_agents import find_snapshot_agent
from libvirt_rdm_backup.storage.tgt_rbd import BSOPTS_ENV
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, qemu_leftovers, same_bytes

pytestmark = pytest.mark.lab

LUN_SIZE = 64 * MiB
CLUSTER = 64 * 1024


def write(dom: object, rng: random.Random, count: int) -> int:
    """``count`` guest writes of 64 KiB to the LUN; the bytes written."""
    for _ in range(count):
        guest_write(dom, "sda", rng.randrange(1, 250),  # type: ignore[arg-type]
                    rng.randrange(0, LUN_SIZE - CLUSTER, CLUSTER), CLUSTER)
    return count * CLUSTER


def check_point(result: BackupResult, image: cephkit.RbdImage, iqn: str, level: str,
                bound: int) -> str:
    """The LUN's record: read from an RBD snapshot of its image, at ``level``; its mapping
    names the LUN and the image. Returns the snapshot's name."""
    record = result.manifest.disk("sda")
    assert record is not None and record.data_path == "snapshot", record
    assert record.disk.device == "lun" and record.level == level, record.reason
    snap = record.storage_snapshot
    assert snap is not None and snap["agent"] == "rbd", snap
    assert (snap["handle"]["pool"], snap["handle"]["image"]) == (image.pool, image.name)
    if level == "incremental":  # only what diff_iterate reports since the kept snapshot
        assert 0 < record.bytes_transferred <= bound, (record.bytes_transferred, bound)
    # the one disk, its image with exclusive-lock: tgtd's librbd carries the snapshot out
    assert result.manifest.consistency == {"method": "storage-snapshot", "paused_ms": 0.0}
    assert record.mapping is not None, record.mapping_error
    lun = record.mapping.root
    assert (lun.kind, lun.identity["iqn"], lun.identity["lun"]) == ("iscsi-lun", iqn, 1)
    assert lun.identity["tgt"]["backing_store_type"] == "rbd"
    assert lun.identity["point_snapshot"]["snap_id"] == snap["handle"]["snap_id"]
    rbd_node = lun.extents[0].target
    assert (rbd_node.kind, rbd_node.identity["image"]) == ("rbd-image", image.name)
    assert rbd_node.identity["image_id"] == snap["handle"]["image_id"]
    assert rbd_node.identity["cluster_fsid"] == snap["handle"]["cluster_fsid"]
    return str(snap["name"])


def test_lun_on_an_rbd_image_gets_rbd_snapshots_and_incrementals(
        ceph: None, run_token: str, rdmb_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full (the guest writing after the point), an incremental, a VM restart and another
    incremental: each from an RBD snapshot of the LUN's image, restored byte for byte; the
    chain's last and last-full snapshots left on the image."""
    bsopts = f"conf={cephkit.client_conf(rdmb_tmp / 'tgt-ceph.conf')};id={cephkit.CLIENT}"
    monkeypatch.setenv(BSOPTS_ENV, bsopts)  # the LUN's bsopts: tgtadm does not show them
    repo, rng = str(rdmb_tmp / "repo"), random.Random(23)
    with cephkit.rbd_image(LUN_SIZE) as image, \
            labkit.iscsi_target(image.spec, bstype="rbd", bsopts=bsopts) as lun, \
            labkit.test_domain(f"rdmb-{run_token}-lun-rbd",
                               [labkit.iscsi_disk("sda", lun.iqn, lun.lun)]) as dom:
        name = str(dom.name())
        [mapping] = api.map_disks(name)
        assert mapping.root.extents[0].target.identity["image"] == image.name
        disk = api.discover(name).find("sda")
        assert isinstance(disk, RawDisk) and disk.size == LUN_SIZE  # checked against the image
        # a client without a key: no RBD snapshots (a paused copy instead), the mapping says why
        monkeypatch.setenv(BSOPTS_ENV, f"{bsopts.partition(';')[0]};id=rdmb-nokey")
        assert find_snapshot_agent(disk) is None and paused_copy_reason(disk) is not None
        [mapping] = api.map_disks(name)
        assert "permission denied" in mapping.root.extents[0].target.identity["error"]
        monkeypatch.setenv(BSOPTS_ENV, bsopts)
        points: list[tuple[BackupResult, Path]] = []
        snaps: list[str] = []
        for index, level in enumerate(["full", "incremental", "incremental"]):
            if index == 2:  # no QEMU bitmap to lose: the image's snapshot still tells
                dom.destroy()
                dom.create()
            written = write(dom, rng, 6 + index)
            dom.suspend()  # for the reference only
            try:
                ref = cephkit.export(image, rdmb_tmp / f"ref-{index}.raw")
            finally:
                dom.resume()
            after: list[int] = []

            def write_after_point(_job: str, _done: int, _total: int,
                                  after: list[int] = after) -> None:
                if not after:
                    after.append(write(dom, rng, 2))

            result = api.backup(name, repo, progress=write_after_point)
            assert after or index > 0  # a full's copy reports progress: written after its point
            bound = written + sum(after) + 2 * CLUSTER  # this and the last point's later writes
            snaps.append(check_point(result, image, lun.iqn, level, bound))
            points.append((result, ref))
        assert cephkit.snapshots(image) == sorted({snaps[0], snaps[-1]})
        for result, ref in points:
            out = rdmb_tmp / f"restore-{result.manifest.backup_id}.raw"
            api.restore(name, repo, "sda", str(out), backup_id=result.manifest.backup_id)
            assert same_bytes(out, ref), f"point {result.manifest.backup_id} differs"
            out.unlink()
        assert qemu_leftovers(dom) == []
