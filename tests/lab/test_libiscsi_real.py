"""The libiscsi binding against real LUNs on the loopback tgtd.

The truth the values are checked against is tgtd itself (usr/spc.c, update_vpd_83,
tgt 1.0.85 of Debian 12): its VPD 0x83 page carries the LUN's SCSI ID (what
``tgtadm --op show`` prints) as a T10 vendor designator, an NAA 3 (locally assigned)
designator holding ``tid << 32 | lun``, and an NAA 6 designator holding the SCSI ID's
hex digits right-aligned in 128 bits (other characters count as 0). ``iscsi-inq``,
which prints binary designators as C strings, must show a prefix of each NAA value.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import libiscsi, map_disk, tgt
from libvirt_rdm_backup.storage.iscsi import parse_designators, parse_vpd83_page
from tools.labkit import RUN_TOKEN, IscsiLun, is_root, iscsi_target, make_file, rdmb_tmpdir

pytestmark = pytest.mark.lab
MiB = 1 << 20


@pytest.fixture
def workdir() -> Iterator[Path]:
    if not is_root():
        pytest.skip("needs root (tgtadm)")
    with rdmb_tmpdir() as path:
        yield path


def tgt_naa3(tid: int, lun: int) -> str:
    """tgtd's NAA 3 designator: ``tid << 32 | lun`` with NAA 3 in the top nibble."""
    value = bytearray(((tid << 32) | lun).to_bytes(8, "big"))
    value[0] |= 0x30
    return value.hex()


def tgt_naa6(scsi_id: str) -> str:
    """tgtd's NAA 6 designator: the SCSI ID's hex digits, right-aligned in 128 bits."""
    number = 0
    for char in scsi_id:
        digit = int(char, 16) if char in string.hexdigits else 0
        number = ((number << 4) | digit) & ((1 << 128) - 1)
    value = bytearray(number.to_bytes(16, "big"))
    value[0] = (value[0] & 0x0F) | 0x60
    return value.hex()


def lun_naa(lun: IscsiLun) -> list[str]:
    """Complete logical-unit NAA values of ``lun`` read twice over libiscsi (must agree)."""
    first = libiscsi.inquiry_vpd(lun.url, 0x83)
    assert libiscsi.inquiry_vpd(lun.url, 0x83) == first, "VPD 0x83 changed between two reads"
    designators = parse_vpd83_page(first)
    naa = [d for d in designators if d.type == "naa"]
    assert naa and all(d.complete and d.association == 0 for d in naa), designators
    return [d.value_hex or "" for d in naa]


def test_two_targets_get_whole_distinct_naa(workdir: Path) -> None:
    assert libiscsi.load() is not None, f"cannot load {libiscsi.library_path()}"
    backing_a = make_file(workdir / f"rdmb-{RUN_TOKEN}-naa-a.img", 4 * MiB)
    backing_b = make_file(workdir / f"rdmb-{RUN_TOKEN}-naa-b.img", 4 * MiB)
    with iscsi_target(backing_a) as lun_a, iscsi_target(backing_b) as lun_b:
        seen: dict[str, list[str]] = {}
        for lun in (lun_a, lun_b):
            naa = lun_naa(lun)
            tgt_lun = tgt.find_lun(lun.iqn, lun.lun)
            assert tgt_lun is not None and tgt_lun.scsi_id
            assert naa == [tgt_naa3(lun.tid, lun.lun), tgt_naa6(tgt_lun.scsi_id)]
            assert all(len(value) in (16, 32) for value in naa)
            assert any(0 in bytes.fromhex(value) for value in naa)  # what iscsi-inq cuts at

            text = run(["iscsi-inq", "-e", "1", "-c", "131", lun.url], timeout=60).stdout
            printed = [d.value_hex or "" for d in parse_designators(text) if d.type == "naa"]
            assert printed and all(any(v.startswith(p) for v in naa) for p in printed)

            mapping = map_disk(RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=lun.source))
            ident = mapping.root.identity
            assert ident["designator_source"] == "libiscsi"
            assert ident["naa"] == naa
            assert ident["t10_vendor_id"] == tgt_lun.scsi_id
            assert all(d["complete"] for d in ident["designators"])
            seen[lun.iqn] = naa
            print(f"tid {lun.tid} {lun.iqn} SCSI ID {tgt_lun.scsi_id!r}: NAA {naa}")
    first, second = seen.values()
    assert not set(first) & set(second), seen


def test_errors_are_one_clear_line(workdir: Path) -> None:
    backing = make_file(workdir / f"rdmb-{RUN_TOKEN}-naa-err.img", 4 * MiB)
    with iscsi_target(backing) as lun:
        with pytest.raises(StorageError) as missing_target:
            libiscsi.inquiry_vpd(lun.url.replace(lun.iqn, f"{lun.iqn}-absent"), 0x83)
        with pytest.raises(StorageError) as bad_page:
            libiscsi.inquiry_vpd(lun.url, 0x99)
        # Credentials in the URL go through iscsi_parse_full_url; an open target ignores them.
        secret = lun.url.replace("iscsi://", "iscsi://rdmb%not-a-secret@")
        assert parse_vpd83_page(libiscsi.inquiry_vpd(secret, 0x83))
    for error in (missing_target.value, bad_page.value):
        assert "\n" not in str(error) and str(error).startswith("libiscsi: ")
    assert "cannot log in" in str(missing_target.value)
    assert "ILLEGAL_REQUEST" in str(bad_page.value)
