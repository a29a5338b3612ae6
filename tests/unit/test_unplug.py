"""Which disks count as unplugged under a backup job, and what is removed after one."""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, QmpError
from libvirt_rdm_backup.qemu.unplug import release_unplugged, unplug_check, unplugged


class Qemu:
    """Answers query-block from a table of qdev -> node; records blockdev-del."""

    def __init__(self, devices: dict[str, str], in_use: frozenset[str] = frozenset()) -> None:
        self.devices, self.in_use = devices, in_use
        self.deleted: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-block":
            return [{"qdev": qdev, "inserted": {"node-name": node, "image": {}}}
                    for qdev, node in self.devices.items()]
        assert command == "blockdev-del" and arguments is not None
        if arguments["node-name"] in self.in_use:
            raise QmpError(command, "GenericError", "Node is in use")
        self.deleted.append(arguments["node-name"])
        return {}


def disk(target: str, alias: str, node: str) -> RawDisk:
    return RawDisk(target, SourceKind.BLOCK, "disk", alias=alias, node_name=node)


VDB = disk("vdb", "virtio-disk1", "libvirt-2-format")
SDB = disk("sdb", "scsi0-0-0-1", "libvirt-4-format")


def test_a_job_filter_above_the_node_is_not_an_unplug() -> None:
    qemu = Qemu({"/machine/peripheral/virtio-disk1/virtio-backend": "#block150",
                 "scsi0-0-0-1": "rdmb-cbw-sdb-a1b2c3"})
    assert unplugged(qemu, [VDB, SDB]) == []  # type: ignore[arg-type]
    unplug_check(qemu, [VDB, SDB])()  # type: ignore[arg-type]


@pytest.mark.parametrize("devices", [{}, {"scsi0-0-0-1": "libvirt-5-format"}])
def test_a_gone_or_replaced_device_is_an_unplug(devices: dict[str, str]) -> None:
    qemu = Qemu({"/machine/peripheral/virtio-disk1/virtio-backend": "libvirt-2-format",
                 **devices})
    assert unplugged(qemu, [VDB, SDB]) == [SDB]  # type: ignore[arg-type]
    with pytest.raises(OperationError, match="disk sdb was unplugged"):
        unplug_check(qemu, [VDB, SDB])()  # type: ignore[arg-type]


def test_only_unused_nodes_of_unplugged_disks_are_removed() -> None:
    qemu = Qemu({"/machine/peripheral/virtio-disk1/virtio-backend": "libvirt-2-format"})
    release_unplugged(qemu, [VDB, SDB])  # type: ignore[arg-type]
    assert qemu.deleted == ["libvirt-4-format", "libvirt-4-storage"]
    busy = Qemu({}, in_use=frozenset({"libvirt-4-format"}))
    release_unplugged(busy, [SDB])  # type: ignore[arg-type]
    assert busy.deleted == []  # still in use (a job holds it): its storage node stays too
