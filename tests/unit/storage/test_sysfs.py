"""SysfsAgent against fixture sysfs trees: loop, partition, dm-linear, multipath, md, hostdev."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.devnodes import parse_dm_table

from .sysfs_tree import FixtureSysfsAgent, SysfsTree

MiB = 1024 * 1024
WWID = "naa.600140512345678901234567890abcde"


def block_disk(path: str, kind: SourceKind = SourceKind.BLOCK) -> RawDisk:
    return RawDisk(target="vdb", source_kind=kind, device="disk", source_path=path)


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path)


def scsi_disk(tree: SysfsTree, name: str, devnum: str, hctl: str, serial: str) -> Path:
    return tree.scsi_disk(
        name,
        devnum,
        sectors=204800,
        hctl=hctl,
        device_attrs={
            "wwid": WWID,
            "vendor": "LIO-ORG ",
            "model": "rdmb-lun        ",
            "rev": "4.0 ",
            "serial": serial,
        },
    )


def test_loop_over_file_with_offset_and_sizelimit(tree: SysfsTree, tmp_path: Path) -> None:
    backing = tmp_path / "rdmb-backing.img"
    backing.write_bytes(b"\0" * (10 * MiB))
    tree.block(
        "loop3",
        "7:3",
        sectors=8192,
        attrs={
            "ro": 1,
            "loop/backing_file": str(backing),
            "loop/offset": MiB,
            "loop/sizelimit": 4 * MiB,
            "loop/dio": 1,
        },
    )
    node = tree.agent().map(block_disk("/dev/loop3"))
    assert node.kind == "loop"
    assert node.size == 4 * MiB
    assert node.identity["offset"] == MiB
    assert node.identity["sizelimit"] == 4 * MiB
    assert node.identity["direct_io"] is True
    assert node.identity["read_only"] is True
    assert node.identity["dev"] == "7:3"
    [extent] = node.extents
    assert (extent.start, extent.length, extent.offset) == (0, 4 * MiB, MiB)
    assert extent.target.kind == "file"
    assert extent.target.path == str(backing)
    assert extent.target.name == "rdmb-backing.img"
    assert extent.target.size == 10 * MiB
    assert node.leaves() == [(extent.target, MiB, 4 * MiB)]


def test_loop_with_deleted_backing_file(tree: SysfsTree) -> None:
    tree.block("loop4", "7:4", 2048, attrs={"loop/backing_file": "/nonexistent/x (deleted)"})
    node = tree.agent().map_path("/dev/loop4")
    assert node.identity["backing_file_deleted"] is True
    target = node.extents[0].target
    assert (target.path, target.size, target.identity["exists"]) == ("/nonexistent/x", None, False)


def test_partition_on_scsi_disk_with_identity_and_by_id(tree: SysfsTree) -> None:
    sda = scsi_disk(tree, "sda", "8:0", "0:0:0:1", "SER123")
    tree.partition(sda, 1, "8:1", start=2048, sectors=100000)
    tree.link("disk/by-id/wwn-0x600140512345678901234567890abcde", "sda")
    tree.link("disk/by-id/scsi-3600140512345678901234567890abcde", "sda", absolute=True)
    tree.link("disk/by-id/scsi-3600140512345678901234567890abcde-part1", "sda1")
    agent = tree.agent()

    disk = block_disk("/dev/disk/by-id/scsi-3600140512345678901234567890abcde-part1")
    assert agent.can_map(disk)
    node = agent.map(disk)

    assert node.kind == "partition"
    assert node.name == "sda1"
    assert node.size == 100000 * 512
    assert node.identity["start"] == 2048 * 512
    assert node.identity["partition"] == 1
    assert node.identity["logical_block_size"] == 512  # from the parent disk's queue
    assert node.identity["by_id"] == ["scsi-3600140512345678901234567890abcde-part1"]
    [extent] = node.extents
    assert (extent.start, extent.length, extent.offset) == (0, 100000 * 512, 2048 * 512)
    parent = extent.target
    assert parent.kind == "disk"
    assert parent.name == "sda"
    assert parent.size == 204800 * 512
    assert parent.extents == []
    assert parent.identity["wwid"] == WWID
    assert parent.identity["vendor"] == "LIO-ORG"
    assert parent.identity["model"] == "rdmb-lun"
    assert parent.identity["rev"] == "4.0"
    assert parent.identity["serial"] == "SER123"
    assert parent.identity["rotational"] is True
    assert parent.identity["scsi_address"] == "0:0:0:1"
    assert parent.identity["physical_block_size"] == 4096
    assert parent.identity["by_id"] == [
        "scsi-3600140512345678901234567890abcde",
        "wwn-0x600140512345678901234567890abcde",
    ]


def test_dm_linear_two_segments_over_two_partitions(tree: SysfsTree) -> None:
    sdb = scsi_disk(tree, "sdb", "8:16", "0:0:0:2", "B")
    sdc = scsi_disk(tree, "sdc", "8:32", "0:0:0:3", "C")
    sdb1 = tree.partition(sdb, 1, "8:17", start=2048, sectors=8192)
    sdc1 = tree.partition(sdc, 1, "8:33", start=4096, sectors=8192)
    dm0 = tree.block(
        "dm-0",
        "253:0",
        sectors=6144,
        attrs={
            "dm/name": "vg0-lv0",
            "dm/uuid": "LVM-abcdefABCDEF",
            "dm/table": "0 2048 linear 8:17 2048\n2048 4096 linear 8:33 0\n",
        },
    )
    tree.slaves(dm0, sdb1, sdc1)
    tree.link("mapper/vg0-lv0", "dm-0")

    node = tree.agent().map(block_disk("/dev/mapper/vg0-lv0"))

    assert node.kind == "dm-linear"
    assert node.path is not None and node.path.endswith("/mapper/vg0-lv0")
    assert node.identity["dm_name"] == "vg0-lv0"
    assert node.identity["dm_uuid"] == "LVM-abcdefABCDEF"
    assert node.identity["dm_subsystem"] == "LVM"
    assert node.identity["dm_target_types"] == ["linear"]
    first, second = node.extents
    assert (first.start, first.length, first.offset) == (0, 2048 * 512, 2048 * 512)
    assert (second.start, second.length, second.offset) == (2048 * 512, 4096 * 512, 0)
    assert [first.target.name, second.target.name] == ["sdb1", "sdc1"]
    assert first.target.extents[0].target.name == "sdb"
    leaves = [(leaf.name, offset, length) for leaf, offset, length in node.leaves()]
    assert leaves == [("sdb", 2048 * 512, 8192 * 512), ("sdc", 4096 * 512, 8192 * 512)]


def test_dm_without_table_lists_slaves_with_unknown_segments(tree: SysfsTree) -> None:
    sdb = scsi_disk(tree, "sdb", "8:16", "0:0:0:2", "B")
    dm1 = tree.block("dm-1", "253:1", 4096, attrs={"dm/name": "lv", "dm/uuid": "LVM-x"})
    tree.slaves(dm1, sdb)
    node = tree.agent().map_path("/dev/dm-1")
    assert node.kind == "dm"
    assert node.identity["segments"] == "unknown"
    [extent] = node.extents
    assert (extent.start, extent.length, extent.offset) == (0, 204800 * 512, 0)
    assert extent.target.name == "sdb"


def test_dm_table_reader_is_used_when_sysfs_has_no_table(tree: SysfsTree) -> None:
    sdb = scsi_disk(tree, "sdb", "8:16", "0:0:0:2", "B")
    dm1 = tree.block("dm-1", "253:1", 4096, attrs={"dm/name": "lv", "dm/uuid": "LVM-x"})
    tree.slaves(dm1, sdb)
    asked: list[str] = []

    def table(name: str) -> str:
        asked.append(name)
        return "0 4096 linear 8:16 8\n"

    agent = FixtureSysfsAgent(str(tree.sys), str(tree.dev), dm_table=table)
    node = agent.map_path("/dev/dm-1")
    assert asked == ["lv"]
    assert node.kind == "dm-linear"
    assert node.extents[0].offset == 8 * 512


def test_dm_multipath_over_two_paths(tree: SysfsTree) -> None:
    sdd = scsi_disk(tree, "sdd", "8:48", "1:0:0:0", "SAME")
    sde = scsi_disk(tree, "sde", "8:64", "2:0:0:0", "SAME")
    dm2 = tree.block(
        "dm-2",
        "253:2",
        204800,
        attrs={"dm/name": "mpatha", "dm/uuid": "mpath-3600140512345678901234567890abcde"},
    )
    tree.slaves(dm2, sdd, sde)
    tree.link("disk/by-id/dm-uuid-mpath-3600140512345678901234567890abcde", "dm-2")

    node = tree.agent().map(
        block_disk("/dev/disk/by-id/dm-uuid-mpath-3600140512345678901234567890abcde")
    )

    assert node.kind == "dm-multipath"
    assert node.identity["dm_subsystem"] == "mpath"
    assert node.identity["by_id"] == ["dm-uuid-mpath-3600140512345678901234567890abcde"]
    assert [e.target.name for e in node.extents] == ["sdd", "sde"]
    for extent in node.extents:
        assert (extent.start, extent.length, extent.offset) == (0, 204800 * 512, 0)
        assert extent.target.identity["path"] is True
        assert extent.target.identity["wwid"] == WWID


def test_md_raid1(tree: SysfsTree) -> None:
    sdf = scsi_disk(tree, "sdf", "8:80", "0:0:0:5", "F")
    sdg = scsi_disk(tree, "sdg", "8:96", "0:0:0:6", "G")
    sdf1 = tree.partition(sdf, 1, "8:81", start=2048, sectors=100000)
    sdg1 = tree.partition(sdg, 1, "8:97", start=2048, sectors=100000)
    md0 = tree.block(
        "md0",
        "9:0",
        90000,
        attrs={
            "md/level": "raid1",
            "md/raid_disks": 2,
            "md/uuid": "0f3c2a1b:aa:bb:cc",
            "md/metadata_version": "1.2",
            "md/dev-sdf1/offset": 4096,
            "md/dev-sdg1/offset": 4096,
        },
    )
    tree.slaves(md0, sdf1, sdg1)

    node = tree.agent().map_path("/dev/md0")

    assert node.kind == "md"
    assert node.identity["md_level"] == "raid1"
    assert node.identity["md_raid_disks"] == 2
    assert node.identity["md_metadata_version"] == "1.2"
    assert [e.target.name for e in node.extents] == ["sdf1", "sdg1"]
    for extent in node.extents:
        assert (extent.start, extent.length, extent.offset) == (0, 90000 * 512, 4096 * 512)
        assert extent.target.identity["mirror"] is True


def test_md_raid0_has_unknown_segments(tree: SysfsTree) -> None:
    sdf = scsi_disk(tree, "sdf", "8:80", "0:0:0:5", "F")
    md1 = tree.block("md1", "9:1", 1000, attrs={"md/level": "raid0"})
    tree.slaves(md1, sdf)
    node = tree.agent().map_path("/dev/md1")
    assert node.identity["segments"] == "unknown"


def test_scsi_hostdev_by_sg_and_by_address(tree: SysfsTree) -> None:
    sda = scsi_disk(tree, "sda", "8:0", "0:0:0:1", "SER")
    scsi_dev = (sda / "device").resolve()
    generic = tree.sys / "class/scsi_generic/sg1"
    generic.mkdir(parents=True)
    (generic / "device").symlink_to(scsi_dev)
    (tree.dev / "sg1").write_text("")
    agent = tree.agent()
    by_sg = agent.map(block_disk("/dev/sg1", SourceKind.SCSI_HOSTDEV))
    by_address = agent.map(block_disk("scsi_host0:0:0:1", SourceKind.SCSI_HOSTDEV))
    assert by_sg.name == by_address.name == "sda"
    assert by_sg.identity["serial"] == "SER"


def test_hostdev_without_block_device_cannot_be_mapped(tree: SysfsTree) -> None:
    disk = block_disk("0:0:9:9", SourceKind.SCSI_HOSTDEV)
    agent = tree.agent()
    assert not agent.can_map(disk)
    with pytest.raises(StorageError):
        agent.map(disk)


def test_missing_source_and_iscsi_disks_are_not_mapped(tree: SysfsTree) -> None:
    agent = tree.agent()
    assert not agent.can_map(block_disk("/dev/nonexistent"))
    assert not agent.can_map(RawDisk("sda", SourceKind.ISCSI, "lun"))
    with pytest.raises(StorageError, match="cannot open"):
        agent.map_path("/dev/nonexistent")


def test_missing_sysfs_attributes_leave_keys_out(tree: SysfsTree) -> None:
    tree.block("vdc", "252:32", 100)
    node = tree.agent().map_path("/dev/vdc")
    assert node.kind == "disk"
    for key in ("wwid", "vendor", "model", "serial", "by_id", "rotational"):
        assert key not in node.identity


def test_tree_round_trips_through_dict(tree: SysfsTree) -> None:
    sda = scsi_disk(tree, "sda", "8:0", "0:0:0:1", "SER")
    tree.partition(sda, 1, "8:1", start=2048, sectors=100000)
    node = tree.agent().map_path("/dev/sda1")
    assert StorageNode.from_dict(node.to_dict()) == node


def test_parse_dm_table() -> None:
    text = "0 2048 linear 8:17 2048\n\n2048 4096 linear 8:33 0\n"
    assert parse_dm_table(text) == [
        ["0", "2048", "linear", "8:17", "2048"],
        ["2048", "4096", "linear", "8:33", "0"],
    ]
