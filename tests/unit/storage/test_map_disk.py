"""map_disk: agent choice, identifiers, errors; RawDiskMapping round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import default_agents, map_disk
from libvirt_rdm_backup.storage.base import Extent, RawDiskMapping, StorageNode
from libvirt_rdm_backup.storage.iscsi import IscsiAgent
from libvirt_rdm_backup.storage.rbd_mapping import RbdAgent
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

from .sysfs_tree import SysfsTree


class FixedAgent:
    """An agent that maps everything to one fixed node."""

    name = "fixed"

    def __init__(self, can: bool) -> None:
        self.can = can

    def can_map(self, disk: RawDisk) -> bool:
        return self.can

    def map(self, disk: RawDisk) -> StorageNode:
        return StorageNode(kind="disk", name=disk.target, size=1)


def test_default_agents_order() -> None:
    agents = default_agents()
    assert [type(agent) for agent in agents] == [RbdAgent, IscsiAgent, SysfsAgent]


def test_first_agent_that_can_map_wins_and_identifiers_are_filled() -> None:
    disk = RawDisk(
        "vdb",
        SourceKind.BLOCK,
        "disk",
        alias="virtio-disk1",
        serial="S1",
        wwn="0x5000c50015ea71ac",
        source_path="/dev/sdx",
    )
    mapping = map_disk(disk, [FixedAgent(False), FixedAgent(True)])
    assert mapping.agent == "fixed"
    assert mapping.disk == "vdb"
    assert mapping.identifiers == {
        "target": "vdb",
        "alias": "virtio-disk1",
        "serial": "S1",
        "wwn": "0x5000c50015ea71ac",
        "source": "/dev/sdx",
        "source_kind": "block",
    }


def test_no_agent_raises_storage_error() -> None:
    disk = RawDisk("vdb", SourceKind.BLOCK, "disk", source_path="/dev/sdx")
    with pytest.raises(
        StorageError, match=r"no storage agent can map disk vdb \(source /dev/sdx\)"
    ):
        map_disk(disk, [FixedAgent(False)])


def test_hostdev_without_block_device_raises(tmp_path: Path) -> None:
    agent = SysfsTree(tmp_path).agent()
    disk = RawDisk("sdb", SourceKind.SCSI_HOSTDEV, "lun", source_path="scsi_host3:0:0:0")
    with pytest.raises(StorageError, match="no storage agent can map disk sdb"):
        map_disk(disk, [agent])


def test_fixture_loop_through_map_disk(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.block("loop5", "7:5", 2048, attrs={"loop/backing_file": str(tmp_path / "f")})
    disk = RawDisk("vdb", SourceKind.BLOCK, "disk", source_path="/dev/loop5")
    iscsi_agent = IscsiAgent(sysfs=tree.agent(), use_local_tgt=False)
    mapping = map_disk(disk, [iscsi_agent, tree.agent()])
    assert mapping.agent == "sysfs"
    assert mapping.root.kind == "loop"


def test_mapping_round_trip_through_json() -> None:
    backing = StorageNode(kind="file", name="lun.img", path="/srv/lun.img", size=8 << 20)
    lun = StorageNode(
        kind="iscsi-lun",
        name="iqn.2026-11.org.rdmb:x/1",
        path="iscsi://127.0.0.1:3260/iqn.2026-11.org.rdmb:x/1",
        size=4 << 20,
        identity={"serial": "beaf11", "designators": [{"type": "naa", "value_hex": "60"}]},
        extents=[Extent(0, 4 << 20, 1 << 20, backing)],
    )
    mapping = RawDiskMapping(disk="sda", agent="iscsi", root=lun, identifiers={"target": "sda"})
    document = json.loads(json.dumps(mapping.to_dict()))
    assert RawDiskMapping.from_dict(document) == mapping
    assert mapping.root.leaves() == [(backing, 1 << 20, 4 << 20)]
