"""Discovery from domain XML fixtures: which disks are raw, with which identifiers."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.discovery import inventory_from_xml, parse_iscsi_name
from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine.discover import select_disks
from libvirt_rdm_backup.errors import NotFoundError, NotRawDiskError, UsageError

FIXTURES = Path(__file__).parent / "fixtures"


def volumes(pool: str, volume: str) -> tuple[str, bool] | None:
    return {
        ("lvpool", "data1"): ("/dev/lvpool/data1", True),
        ("dirpool", "img.raw"): ("/var/lib/libvirt/images/img.raw", False),
    }.get((pool, volume))


@pytest.fixture
def inventory(tmp_path: Path):  # type: ignore[no-untyped-def]
    sysfs = tmp_path / "sys"
    (sysfs / "bus/scsi/devices/2:0:1:4/block/sdq").mkdir(parents=True)
    xml = DomainXML.parse((FIXTURES / "domain-mixed.xml").read_text())
    return inventory_from_xml(xml, True, volumes, sysfs_root=str(sysfs))


def test_raw_and_other_disks_are_told_apart(inventory) -> None:  # type: ignore[no-untyped-def]
    assert inventory.domain_name == "mixed"
    assert inventory.domain_uuid == "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"
    assert [d.target for d in inventory.raw] == [
        "vdb", "sda", "sdb", "sdc", "vdd", "vdg", "vdh", "hostdev0"]
    reasons = {d.target: d.reason for d in inventory.other}
    assert set(reasons) == {"vda", "vdc", "vde", "vdf", "vdi", "sdd"}
    assert "image file (qcow2)" in reasons["vda"]
    assert "qcow2 format on block" in reasons["vdc"]
    assert "is not a block device" in reasons["vde"]
    assert "network protocol nbd is not supported" in reasons["vdf"]
    assert "qcow2 format on network" in reasons["vdi"]
    assert "removable" in reasons["sdd"]


def test_identifiers_of_each_raw_disk(inventory) -> None:  # type: ignore[no-untyped-def]
    disks: dict[str, RawDisk] = {d.target: d for d in inventory.raw}
    vdb = disks["vdb"]
    assert (vdb.source_kind, vdb.device, vdb.source_path, vdb.serial, vdb.alias) == (
        SourceKind.BLOCK, "disk", "/dev/mapper/mpatha", "LUN-SERIAL-1", "virtio-disk1")
    assert not vdb.is_passthrough_lun

    sda = disks["sda"]
    assert sda.source_kind is SourceKind.ISCSI and sda.is_passthrough_lun
    assert sda.iscsi is not None
    assert (sda.iscsi.host, sda.iscsi.port, sda.iscsi.iqn, sda.iscsi.lun) == (
        "192.0.2.10", 3261, "iqn.2026-11.org.example:array", 3)
    assert sda.wwn == "5000c50015ea71ac"
    assert sda.source == "iscsi://192.0.2.10:3261/iqn.2026-11.org.example:array/3"

    sdb = disks["sdb"]
    assert sdb.iscsi is not None and (sdb.iscsi.port, sdb.iscsi.lun) == (3260, 0)
    assert not sdb.is_passthrough_lun

    sdc = disks["sdc"]
    assert sdc.device == "lun" and sdc.readonly and sdc.is_passthrough_lun

    vdd = disks["vdd"]
    assert (vdd.source_kind, vdd.source_path, vdd.pool, vdd.volume) == (
        SourceKind.VOLUME, "/dev/lvpool/data1", "lvpool", "data1")

    vdg = disks["vdg"]
    assert (vdg.source_kind, vdg.device, vdg.serial, vdg.alias) == (
        SourceKind.RBD, "disk", "RBD-42", "virtio-disk6")
    assert not vdg.is_passthrough_lun and vdg.rbd is not None
    assert (vdg.rbd.pool, vdg.rbd.namespace, vdg.rbd.image, vdg.rbd.snapshot) == (
        "vms", "ns1", "vm-42-disk-1", None)
    assert vdg.rbd.hosts == (("192.0.2.21", 6789), ("192.0.2.22", None), ("192.0.2.23", 3300))
    assert (vdg.rbd.user, vdg.rbd.secret_uuid, vdg.rbd.secret_usage) == (
        "libvirt", "2a5e3f4e-7d7b-4b8e-9d0a-4f1e0b6c1d22", None)
    assert vdg.source == "rbd:vms/ns1/vm-42-disk-1"

    vdh = disks["vdh"]  # <auth> inside <source>, a snapshot, a config file, a secret by usage
    assert vdh.rbd is not None and vdh.readonly
    assert (vdh.rbd.name, vdh.rbd.snapshot, vdh.rbd.config_file, vdh.rbd.hosts) == (
        "rbd/plain", "gold", "/etc/ceph/other.conf", ())
    assert (vdh.rbd.user, vdh.rbd.secret_usage) == ("admin", "cluster2 admin")
    assert vdh.source == "rbd:rbd/plain@gold"

    hostdev = disks["hostdev0"]
    assert hostdev.source_kind is SourceKind.SCSI_HOSTDEV and hostdev.is_passthrough_lun
    assert hostdev.source_path == "/dev/sdq"


def test_round_trip_of_raw_disk(inventory) -> None:  # type: ignore[no-untyped-def]
    for disk in inventory.raw:
        assert RawDisk.from_dict(disk.to_dict()) == disk


def test_selecting_disks(inventory) -> None:  # type: ignore[no-untyped-def]
    assert [d.target for d in select_disks(inventory, ["sda", "vdb", "sda"])] == ["sda", "vdb"]
    assert len(select_disks(inventory, None)) == len(inventory.raw)
    with pytest.raises(NotRawDiskError) as err:
        select_disks(inventory, ["vda"])
    assert err.value.exit_code == 2 and "qcow2" in str(err.value)
    with pytest.raises(NotFoundError):
        select_disks(inventory, ["vdz"])


def test_domain_without_raw_disks_is_bad_input() -> None:
    xml = DomainXML.parse("<domain type='kvm'><name>x</name><uuid>"
                          "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f</uuid><devices/></domain>")
    with pytest.raises(UsageError):
        select_disks(inventory_from_xml(xml, False), None)


@pytest.mark.parametrize(
    "text", ["", "<domain", "<network/>", "<!DOCTYPE x [<!ENTITY a 'b'>]><x/>"])
def test_malformed_xml_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        DomainXML.parse(text)


@pytest.mark.parametrize("name", ["image", "/image", "pool/", "a/b/c/d", "pool//image"])
def test_malformed_rbd_names_are_refused(name: str) -> None:
    xml = DomainXML.parse(
        "<domain type='kvm'><name>x</name><uuid>0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f</uuid>"
        "<devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        f"<source protocol='rbd' name='{name}'/><target dev='vdb' bus='virtio'/></disk>"
        "</devices></domain>")
    with pytest.raises(UsageError, match="malformed RBD source name"):
        inventory_from_xml(xml, False)


def test_iscsi_names() -> None:
    assert parse_iscsi_name("iqn.x:y/12", "h", None).lun == 12
    assert parse_iscsi_name("iqn.x:y", "h", 3262).port == 3262
    with pytest.raises(UsageError):
        parse_iscsi_name("iqn.x:y/abc", "h", None)
