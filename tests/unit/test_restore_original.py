"""Restore to the original device: the recorded mapping is checked, the device is found by what
the host says, strongest identifier first, and every difference is refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.engine.restore_claims import Claims, claims_of, designators_of
from libvirt_rdm_backup.engine.restore_targets import (
    HostDevices,
    LoopState,
    find_original,
)
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage.base import Extent, RawDiskMapping, StorageNode

GiB = 1 << 30
MiB = 1 << 20
NAA = "6001405abcdef0123456789abcdef012"


def record(root: StorageNode | None, size: int = GiB, disk: str = "vdb") -> DiskRecord:
    raw = RawDisk(target=disk, source_kind=SourceKind.BLOCK, device="disk")
    mapping = RawDiskMapping(disk, "sysfs", root) if root is not None else None
    return DiskRecord(disk=raw, size=size, data_file="x", format="qcow2",
                      digest=Digest("sha256", "0" * 64), level="full", data_path="qemu",
                      bytes_transferred=0, stored_bytes=0, mapping=mapping)


def loop_root(backing: str = "/var/tmp/lun.img", offset: int = 3 * MiB, inode: int = 77,
              st_dev: int = 2049) -> StorageNode:
    leaf = StorageNode("file", "lun.img", backing, GiB + offset,
                       {"exists": True, "inode": inode, "st_dev": st_dev})
    return StorageNode("loop", "loop3", "/dev/loop3", GiB,
                       {"offset": offset, "backing_file": backing},
                       [Extent(0, GiB, offset, leaf)])


def lun_root(designators: list[dict[str, Any]] | None = None, serial: str = "SN1") -> StorageNode:
    identity: dict[str, Any] = {"portal": "127.0.0.1:3260", "iqn": "iqn.2026-11.org.x:t1",
                                "lun": 1, "serial": serial}
    if designators is not None:
        identity["designators"] = designators
    return StorageNode("iscsi-lun", "iqn.2026-11.org.x:t1/1", "iscsi://x", GiB, identity)


def naa(value: str = NAA, association: str = "logical-unit") -> dict[str, Any]:
    return {"type": "naa", "association": association, "complete": True, "value_hex": value}


class FakeHost(HostDevices):
    def __init__(self, disks: tuple[StorageNode, ...] | list[StorageNode] = (),
                 loops: tuple[LoopState, ...] | list[LoopState] = ()) -> None:
        super().__init__("/nonexistent-sys", "/nonexistent-dev")
        self._disks, self._loops = list(disks), list(loops)

    def disks(self) -> list[StorageNode]:
        return self._disks

    def loops(self) -> list[LoopState]:
        return self._loops


def loop_state(path: str = "/dev/loop3", size: int = GiB, backing: str = "/var/tmp/lun.img",
               offset: int = 3 * MiB, inode: int = 77, st_dev: int = 2049) -> LoopState:
    return LoopState(path, 0x703, size, backing, offset, inode, st_dev)


def host_disk(tmp_path: Path, name: str, **identity: Any) -> StorageNode:
    node = tmp_path / name
    node.touch()
    return StorageNode("disk", name, str(node), identity.pop("size", GiB), identity)


# -- the recorded mapping is checked before it is used -------------------------------------

@pytest.mark.parametrize(("root", "words"), [
    pytest.param(None, "recorded no mapping", id="no-mapping"),
    pytest.param(StorageNode("dm-linear", "dm-0", "/dev/dm-0", GiB), "'dm-linear' device",
                 id="unsupported-kind"),
    pytest.param(loop_root(backing="lun.img"), "no absolute backing file", id="relative-backing"),
    pytest.param(loop_root(backing="/var/tmp/../etc/x"), "no absolute backing file",
                 id="dotdot-backing"),
    pytest.param(loop_root(backing="/var/tmp/a\nb"), "not a short printable string",
                 id="newline-backing"),
    pytest.param(loop_root(offset=-1), "offset is not a whole number", id="negative-offset"),
    pytest.param(StorageNode("disk", "sdb", "/dev/sdb", GiB, {"by_id": ["../../sda"]}),
                 "by_id is not a list of link names", id="by-id-traversal"),
    pytest.param(StorageNode("disk", "sdb", "/dev/sdb", GiB, {"by_id": "wwn-0x1"}),
                 "by_id is not a list", id="by-id-not-a-list"),
    pytest.param(StorageNode("iscsi-lun", "x", "x", GiB, {"iqn": "not an iqn", "lun": 1,
                                                          "portal": "127.0.0.1:3260"}),
                 "no iSCSI IQN and LUN", id="bad-iqn"),
    pytest.param(StorageNode("iscsi-lun", "x", "x", GiB, {"iqn": "iqn.2026-11.org.x:t", "lun": 1,
                                                          "portal": "a b:3260"}),
                 "portal is not HOST:PORT", id="bad-portal"),
    pytest.param(lun_root([{**naa(), "value_hex": "zz"}]), "not hex", id="designator-not-hex"),
])
def test_a_bad_or_missing_mapping_is_refused(root: StorageNode | None, words: str) -> None:
    with pytest.raises(UsageError, match=words) as caught:
        claims_of(record(root))
    assert str(caught.value).startswith("vdb: ")


def test_only_complete_designators_of_the_logical_unit_count() -> None:
    found = designators_of([naa(), naa("60014050000000000000000000000001", "target-port"),
                            {**naa("6001"), "complete": False},
                            {"type": "t10-vendor-id", "association": "logical-unit",
                             "complete": True, "value": "IET 00010001"}])
    assert found == (f"naa.{NAA}", "t10.IET 00010001")


# -- loop devices: by the inode and offset the loop driver reports -----------------------

def test_a_loop_device_is_found_by_its_backing_inode_and_offset() -> None:
    host = FakeHost(loops=[loop_state("/dev/loop1", offset=0), loop_state("/dev/loop7")])
    found = find_original(claims_of(record(loop_root())), host)
    assert found.path == "/dev/loop7"
    assert found.matched_on == ("loop backing file /var/tmp/lun.img (inode 77) at offset "
                                f"{3 * MiB}")


def test_a_loop_device_on_another_file_is_refused_naming_what_it_has_now() -> None:
    host = FakeHost(loops=[loop_state(backing="/var/tmp/other.img", inode=78)])
    with pytest.raises(UsageError) as caught:
        find_original(claims_of(record(loop_root())), host)
    assert str(caught.value) == (
        f"vdb: no loop device of this host has /var/tmp/lun.img (inode 77) at offset {3 * MiB}"
        f"; /dev/loop3 now has /var/tmp/other.img at offset {3 * MiB}")


def test_a_replaced_backing_file_at_the_same_path_is_refused() -> None:
    host = FakeHost(loops=[loop_state(inode=99)])
    with pytest.raises(UsageError, match="no loop device of this host has"):
        find_original(claims_of(record(loop_root())), host)


def test_a_smaller_device_is_refused_with_both_sizes() -> None:
    host = FakeHost(loops=[loop_state(size=512 * MiB)])
    with pytest.raises(UsageError) as caught:
        find_original(claims_of(record(loop_root())), host)
    assert str(caught.value) == "vdb: /dev/loop3 is 512 MiB, the disk is 1 GiB"


# -- host disks: WWID, then serial, then /dev/disk/by-id ---------------------------------------

def test_a_disk_is_found_by_its_wwid_wherever_it_is_now(tmp_path: Path) -> None:
    root = StorageNode("disk", "sdb", "/dev/sdb", GiB, {"wwid": f"naa.{NAA}", "serial": "S1"})
    host = FakeHost([host_disk(tmp_path, "sdb", wwid="naa.1"),
                     host_disk(tmp_path, "sdc", wwid=f"naa.{NAA}", serial="S1")])
    found = find_original(claims_of(record(root)), host)
    assert found.path == str(tmp_path / "sdc") and found.matched_on == f"WWID naa.{NAA}"


@pytest.mark.parametrize(("disks", "words"), [
    pytest.param([("sdc", {"wwid": f"naa.{NAA}", "serial": "OTHER"})],
                 "vdb: {tmp}/sdc has serial OTHER, the backup's LUN had S1", id="other-serial"),
    pytest.param([("sdc", {"wwid": "naa.2"})], f"vdb: no device of this host has WWID naa.{NAA}",
                 id="no-such-wwid"),
    pytest.param([("sdc", {"wwid": f"naa.{NAA}"}), ("sdd", {"wwid": f"naa.{NAA}"})],
                 "2 devices of this host have WWID", id="two-paths"),
])
def test_a_disk_that_differs_is_refused(tmp_path: Path, disks: list[tuple[str, dict[str, Any]]],
                                        words: str) -> None:
    root = StorageNode("disk", "sdb", "/dev/sdb", GiB, {"wwid": f"naa.{NAA}", "serial": "S1"})
    host = FakeHost([host_disk(tmp_path, name, **identity) for name, identity in disks])
    with pytest.raises(UsageError) as caught:
        find_original(claims_of(record(root)), host)
    assert words.format(tmp=tmp_path) in str(caught.value)


def test_a_disk_without_wwid_is_found_by_serial(tmp_path: Path) -> None:
    root = StorageNode("disk", "vdc", "/dev/vdc", GiB, {"serial": "S9"})
    host = FakeHost([host_disk(tmp_path, "vdd", serial="S9")])
    assert find_original(claims_of(record(root)), host).matched_on == "serial S9"


# -- iSCSI LUNs: a local target, then the LUN's own designators and serial ------------------

def lun(designators: list[dict[str, Any]], serial: str = "SN1", size: int = GiB
        ) -> StorageNode:
    return StorageNode("iscsi-lun", "x", "iscsi://x", size,
                       {"designators": designators, "serial": serial})


def test_a_lun_without_a_local_target_is_refused() -> None:
    with pytest.raises(UsageError, match="no local target or session on portal 127.0.0.1:3260"):
        find_original(claims_of(record(lun_root([naa()]))), FakeHost(),
                      authority=lambda s: None, asker=lambda s: lun([naa()]))


def test_a_lun_of_a_local_target_is_checked_against_its_designators() -> None:
    asked: list[IscsiSource] = []

    def asker(source: IscsiSource) -> StorageNode:
        asked.append(source)
        return lun([naa()])

    found = find_original(claims_of(record(lun_root([naa()]))), FakeHost(),
                          authority=lambda s: "the local tgtd", asker=asker)
    assert found.path == "iscsi://127.0.0.1:3260/iqn.2026-11.org.x:t1/1"
    assert found.matched_on.startswith(f"VPD 0x83 designators naa.{NAA} of iSCSI")
    assert asked == [IscsiSource("127.0.0.1", 3260, "iqn.2026-11.org.x:t1", 1)]


@pytest.mark.parametrize(("now", "words"), [
    pytest.param(lun([naa("60014050000000000000000000000099")]),
                 "has naa.60014050000000000000000000000099, the backup's LUN had naa.",
                 id="other-designator"),
    pytest.param(lun([naa()], serial="SN2"), "has serial SN2, the backup's LUN had SN1",
                 id="other-serial"),
    pytest.param(lun([naa()], size=GiB // 2), "is 512 MiB, the disk is 1 GiB", id="smaller"),
])
def test_a_lun_that_differs_is_refused(now: StorageNode, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        find_original(claims_of(record(lun_root([naa()]))), FakeHost(),
                      authority=lambda s: "the local tgtd", asker=lambda s: now)


def test_a_lun_attached_to_the_kernel_is_found_by_its_designator(tmp_path: Path) -> None:
    host = FakeHost([host_disk(tmp_path, "sdx", wwid=f"naa.{NAA}", serial="SN1")])
    found = find_original(claims_of(record(lun_root([naa()]))), host,
                          authority=lambda s: None, asker=lambda s: lun([]))
    assert found.path == str(tmp_path / "sdx") and found.iscsi is None


def test_claims_keep_the_recorded_size() -> None:
    claims = claims_of(record(loop_root(), size=5 * MiB))
    assert isinstance(claims, Claims) and claims.size == 5 * MiB


# -- the options combine or are refused (exit 2) ---------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    pytest.param(["--disk", "vdb", "--to", "/x", "--to-original"], "not allowed with",
                 id="to-and-to-original"),
    pytest.param(["--all-disks", "--to-dir", "/x", "--to-original"], "not allowed with",
                 id="to-dir-and-to-original"),
    pytest.param(["--all-disks", "--disk", "vdb", "--to-original"], "not allowed with",
                 id="all-disks-and-disk"),
    pytest.param(["--all-disks", "--to", "/x"], "--to writes one disk", id="to-all-disks"),
    pytest.param(["--disk", "vdb", "--disk", "sda", "--to", "/x"], "--to writes one disk",
                 id="to-two-disks"),
    pytest.param(["--to-original"], "give --disk DEV or --all-disks", id="no-disks"),
    pytest.param(["--disk", "vdb", "--to", "/x", "--dry-run"], "--dry-run works with",
                 id="dry-run-to"),
    pytest.param(["--disk", "vdb", "--to", "/x", "--define", "n"], "--define works with",
                 id="define-to"),
    pytest.param(["--define", "n", "--disk", "vdb", "--to-original"], "leave out --disk",
                 id="define-disk"),
    pytest.param(["--all-disks", "--to-dir", "/x", "--start"], "--start needs --define",
                 id="start-without-define"),
    pytest.param(["--all-disks", "--to-dir", "/x", "--define", "a/b"], "malformed domain name",
                 id="define-bad-name"),
    pytest.param(["--all-disks", "--to-dir", "/x", "--force"], "--force works with",
                 id="force-to-dir"),
    pytest.param(["--disk", "../x", "--to-original"], "malformed disk name", id="disk-dotdot"),
    pytest.param(["--disk", "vdb"], "one of the arguments", id="nowhere"),
])
def test_restore_options_that_do_not_combine(args: list[str], words: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["restore", "vm", "--target", "/nonexistent/repo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error:") and err.count("\n") == 1, err
    assert words in err
