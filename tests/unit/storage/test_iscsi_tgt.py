"""Parsers of iscsi-inq, iscsi-readcapacity16 and tgtadm output (captured from the real tools)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.storage import iscsi, libiscsi, tgt
from libvirt_rdm_backup.storage.iscsi import (
    IscsiAgent,
    is_loopback_host,
    parse_designators,
    parse_readcapacity16,
    parse_standard_inquiry,
    parse_unit_serial,
)
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

FIXTURES = Path(__file__).parent / "fixtures"
IQN = "iqn.2026-11.org.rdmb:explore1"
URL = f"iscsi://127.0.0.1:3260/{IQN}/1"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture(autouse=True)
def without_libiscsi(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests cover the iscsi-inq path: no real libiscsi login to the fixtures' IQN."""
    monkeypatch.setattr(libiscsi, "load", lambda: None)


def test_standard_inquiry() -> None:
    assert parse_standard_inquiry(fixture("iscsi-inq-standard.txt")) == {
        "vendor": "IET",
        "product": "VIRTUAL-DISK",
        "revision": "0001",
        "device_type": "DIRECT_ACCESS",
    }


def test_unit_serial_is_stripped_of_padding() -> None:
    assert parse_unit_serial(fixture("iscsi-inq-vpd80.txt")) == "beaf1001"
    assert parse_unit_serial("nothing here") is None


def test_designators_from_tgtd() -> None:
    first, second, third = parse_designators(fixture("iscsi-inq-vpd83.txt"))
    # iscsi-inq prints binary values as C strings: tgtd's NAA values stop at a zero byte.
    assert (first.type, first.code_set, first.association) == ("naa", 1, 0)
    assert (first.value_hex, first.complete) == ("60", False)
    assert (second.type, second.value_hex, second.complete) == ("naa", "30", False)
    assert third.type == "t10-vendor-id"
    assert (third.value, third.value_hex, third.complete) == ("IET     00640001", None, True)
    assert third.to_dict() == {
        "type": "t10-vendor-id",
        "type_code": 1,
        "code_set": "ascii",
        "association": "logical-unit",
        "piv": False,
        "complete": True,
        "value": "IET     00640001",
    }


def test_complete_binary_designator_with_newline_and_bracket() -> None:
    value = bytes([0x50, 0x01, 0x0A, 0x5D, 0x11, 0x22, 0x33, 0x44]).decode("latin-1")
    text = (
        "Page Code:(0x83) DEVICE_IDENTIFICATION\n"
        "DEVICE DESIGNATOR #0\n"
        "Code Set:(1) BINARY\nPIV:1\nAssociation:(0) LOGICAL_UNIT\n"
        f"Designator Type:(3) NAA\nDesignator:[{value}]\n"
    )
    [designator] = parse_designators(text.encode("latin-1").decode("utf-8", "surrogateescape"))
    assert designator.piv is True
    assert designator.complete is True
    assert designator.value_hex == "50010a5d11223344"


def test_readcapacity16() -> None:
    file_lun = parse_readcapacity16(fixture("iscsi-readcapacity16-file.txt"))
    assert (file_lun.last_lba, file_lun.block_size, file_lun.size) == (131071, 512, 64 << 20)
    assert file_lun.physical_block_size == 4096
    loop_lun = parse_readcapacity16(fixture("iscsi-readcapacity16-loop.txt"))
    assert (loop_lun.size, loop_lun.physical_block_size) == (4 << 20, 512)
    with pytest.raises(ValueError):
        parse_readcapacity16("Login Failed.")


def test_tgtadm_show_with_connected_initiator() -> None:
    target, other = tgt.parse_show_target(fixture("tgtadm-show-target.txt"))
    assert other.initiators == ()
    assert (target.tid, target.iqn) == (100, IQN)
    assert target.initiators == ("iqn.2008-11.org.linux-kvm",)
    assert target.acl == ("ALL",)
    controller, disk = target.luns
    assert (controller.lun, controller.type, controller.backing_store_path) == (
        0,
        "controller",
        None,
    )
    assert disk == tgt.TgtLun(
        lun=1,
        type="disk",
        scsi_id="IET     00640001",
        scsi_sn="beaf1001",
        size_mb=67,
        block_size=512,
        online=True,
        readonly=False,
        backing_store_type="rdwr",
        backing_store_path="/tmp/rdmb-explore/lun.img",
    )


def test_tgtadm_show_two_targets_and_find_lun() -> None:
    targets = tgt.parse_show_target(fixture("tgtadm-show-target-two-targets.txt"))
    assert [(t.tid, t.iqn) for t in targets] == [
        (100, IQN),
        (101, "iqn.2026-11.org.rdmb:explore2"),
    ]
    lun = tgt.find_lun("iqn.2026-11.org.rdmb:explore2", 1, targets)
    assert lun is not None and lun.backing_store_path == "/dev/loop1"
    readonly = tgt.find_lun("iqn.2026-11.org.rdmb:explore2", 2, targets)
    assert readonly is not None and readonly.readonly and readonly.size_mb == 10
    assert tgt.find_lun("iqn.2026-11.org.rdmb:explore2", 7, targets) is None
    assert tgt.find_lun("iqn.nope", 1, targets) is None
    assert tgt.parse_show_target("") == []


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("10.0.0.5", False),
        ("array.example", False),
    ],
)
def test_is_loopback_host(host: str, local: bool) -> None:
    assert is_loopback_host(host) is local


class FakeTools:
    """Answers libiscsi tool calls from the captured fixtures."""

    OUTPUT = {
        ("iscsi-inq", URL): "iscsi-inq-standard.txt",
        ("iscsi-inq", "-e", "1", "-c", "128", URL): "iscsi-inq-vpd80.txt",
        ("iscsi-inq", "-e", "1", "-c", "131", URL): "iscsi-inq-vpd83.txt",
        ("iscsi-readcapacity16", URL): "iscsi-readcapacity16-file.txt",
    }

    def __init__(self, failing: Sequence[str] = ()) -> None:
        self.failing = set(failing)

    def __call__(self, argv: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        if self.OUTPUT[tuple(argv)] in self.failing:
            raise CommandError(argv, 5, "SENSE KEY:ILLEGAL_REQUEST(5)")
        return subprocess.CompletedProcess(list(argv), 0, fixture(self.OUTPUT[tuple(argv)]), "")


def iscsi_disk() -> RawDisk:
    return RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=IscsiSource("127.0.0.1", 3260, IQN, 1))


def test_agent_maps_lun_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iscsi, "run", FakeTools())
    agent = IscsiAgent(use_local_tgt=False)
    assert agent.can_map(iscsi_disk())
    assert not agent.can_map(RawDisk("vdb", SourceKind.BLOCK, "disk", source_path="/dev/x"))
    node = agent.map(iscsi_disk())
    assert (node.kind, node.name, node.path, node.size) == ("iscsi-lun", f"{IQN}/1", URL, 64 << 20)
    ident = node.identity
    assert (ident["portal"], ident["iqn"], ident["lun"], ident["url"]) == (
        "127.0.0.1:3260",
        IQN,
        1,
        URL,
    )
    assert (ident["vendor"], ident["product"], ident["revision"]) == ("IET", "VIRTUAL-DISK", "0001")
    assert ident["serial"] == "beaf1001"
    assert ident["t10_vendor_id"] == "IET     00640001"
    assert "naa" not in ident  # only complete NAA values are summarised
    assert [d["type"] for d in ident["designators"]] == ["naa", "naa", "t10-vendor-id"]
    assert (ident["logical_block_size"], ident["physical_block_size"]) == (512, 4096)
    assert node.extents == []


def test_agent_without_vpd_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTools(failing=["iscsi-inq-vpd80.txt", "iscsi-inq-vpd83.txt"])
    monkeypatch.setattr(iscsi, "run", fake)
    node = IscsiAgent(use_local_tgt=False).map(iscsi_disk())
    assert "serial" not in node.identity and "designators" not in node.identity


def test_agent_adds_local_tgt_backing_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"\0" * 4096)
    targets = tgt.parse_show_target(
        fixture("tgtadm-show-target.txt").replace("/tmp/rdmb-explore/lun.img", str(backing))
    )
    monkeypatch.setattr(iscsi, "run", FakeTools())
    monkeypatch.setattr(tgt, "tgtadm_available", lambda: True)
    monkeypatch.setattr(tgt, "show_targets", lambda timeout=0: targets)
    node = IscsiAgent(sysfs=SysfsAgent(str(tmp_path / "sys"), str(tmp_path / "dev"))).map(
        iscsi_disk()
    )
    assert node.identity["tgt"]["scsi_sn"] == node.identity["serial"] == "beaf1001"
    [extent] = node.extents
    assert (extent.start, extent.length, extent.offset) == (0, 64 << 20, 0)
    assert (extent.target.kind, extent.target.path) == ("file", str(backing))
