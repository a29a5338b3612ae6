"""Storage agents against real loop devices and a real iSCSI LUN on the loopback tgtd."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.storage import map_disk, tgt
from tools.labkit import RUN_TOKEN, is_root, iscsi_target, loop_device, make_file, rdmb_tmpdir

pytestmark = pytest.mark.lab
MiB = 1 << 20


@pytest.fixture
def workdir() -> Iterator[Path]:
    if not is_root():
        pytest.skip("needs root (loop devices, tgtadm)")
    with rdmb_tmpdir() as path:
        yield path


def test_loop_device_with_offset_and_sizelimit(workdir: Path) -> None:
    backing = make_file(workdir / f"rdmb-{RUN_TOKEN}-loop.img", 16 * MiB)
    with loop_device(backing, offset=MiB, sizelimit=8 * MiB) as device:
        disk = RawDisk("vdb", SourceKind.BLOCK, "disk", source_path=device)
        mapping = map_disk(disk)
    assert not os.path.exists(f"/sys/class/block/{Path(device).name}/loop")

    root = mapping.root
    assert (mapping.agent, root.kind, root.path) == ("sysfs", "loop", device)
    assert root.size == 8 * MiB
    assert root.identity["offset"] == MiB
    assert root.identity["sizelimit"] == 8 * MiB
    assert root.identity["backing_file"] == str(backing)
    [extent] = root.extents
    assert (extent.start, extent.length, extent.offset) == (0, 8 * MiB, MiB)
    assert (extent.target.kind, extent.target.path, extent.target.size) == (
        "file",
        str(backing),
        16 * MiB,
    )


def test_iscsi_lun_on_tgtd(workdir: Path) -> None:
    backing = make_file(workdir / f"rdmb-{RUN_TOKEN}-lun.img", 24 * MiB)
    with iscsi_target(backing) as lun:
        assert "rdmb" in lun.iqn and RUN_TOKEN in lun.iqn
        tgt_lun = tgt.find_lun(lun.iqn, lun.lun)
        assert tgt_lun is not None
        disk = RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=lun.source)
        mapping = map_disk(disk)
    assert tgt.find_lun(lun.iqn, lun.lun) is None

    root = mapping.root
    ident = root.identity
    assert (mapping.agent, root.kind, root.size) == ("iscsi", "iscsi-lun", 24 * MiB)
    assert (ident["portal"], ident["iqn"], ident["lun"], ident["url"]) == (
        "127.0.0.1:3260",
        lun.iqn,
        1,
        lun.url,
    )
    assert ident["serial"] == tgt_lun.scsi_sn
    assert ident["t10_vendor_id"] == tgt_lun.scsi_id
    assert any(d["type"] == "naa" for d in ident["designators"])
    assert ident["logical_block_size"] == 512
    assert ident["tgt"]["backing_store_path"] == str(backing)
    [extent] = root.extents
    assert (extent.start, extent.length, extent.offset) == (0, 24 * MiB, 0)
    assert (extent.target.kind, extent.target.path) == ("file", str(backing))


def test_iscsi_lun_backed_by_loop_device(workdir: Path) -> None:
    backing = make_file(workdir / f"rdmb-{RUN_TOKEN}-stack.img", 12 * MiB)
    with loop_device(backing, offset=2 * MiB) as device, iscsi_target(device) as lun:
        mapping = map_disk(RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=lun.source))
    [extent] = mapping.root.extents
    loop = extent.target
    assert (loop.kind, loop.path, loop.size) == ("loop", device, 10 * MiB)
    leaves = [(node.path, offset, length) for node, offset, length in mapping.root.leaves()]
    assert leaves == [(str(backing), 2 * MiB, 10 * MiB)]
