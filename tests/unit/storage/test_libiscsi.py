"""The raw VPD 0x83 page parser, the libiscsi binding's pure parts, and the agent's use of it."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.redact import redact
from libvirt_rdm_backup.storage import iscsi, libiscsi
from libvirt_rdm_backup.storage.iscsi import Designator, IscsiAgent, parse_vpd83_page

FIXTURES = Path(__file__).parent / "fixtures"
IQN = "iqn.2026-11.org.rdmb:explore1"
URL = f"iscsi://127.0.0.1:3260/{IQN}/1"
TGT_NAA3 = "3000000100000001"
TGT_NAA6 = "60000000000000000e00000000010001"


def hex_fixture(name: str) -> bytes:
    """Bytes of a hex fixture: ``#`` lines are comments, whitespace is ignored."""
    lines = (FIXTURES / name).read_text().splitlines()
    return bytes.fromhex("".join(line for line in lines if not line.startswith("#")))


def descriptor(head0: int, head1: int, value: bytes) -> bytes:
    return bytes([head0, head1, 0, len(value)]) + value


def page(*descriptors: bytes) -> bytes:
    body = b"".join(descriptors)
    return bytes([0, 0x83]) + len(body).to_bytes(2, "big") + body


def test_tgtd_page_has_whole_naa_values() -> None:
    t10, naa3, naa6 = parse_vpd83_page(hex_fixture("libiscsi-vpd83-tgt.hex"))
    assert t10 == Designator(1, 2, 0, False, value="IET     00010001")
    # iscsi-inq printed these as "0" and "`": both hold zero bytes.
    assert naa3 == Designator(3, 1, 0, False, value_hex=TGT_NAA3, complete=True)
    assert naa6 == Designator(3, 1, 0, False, value_hex=TGT_NAA6, complete=True)
    assert naa6.to_dict() == {
        "type": "naa",
        "type_code": 3,
        "code_set": "binary",
        "association": "logical-unit",
        "piv": False,
        "complete": True,
        "value_hex": TGT_NAA6,
    }


def test_page_fields_piv_association_utf8_and_eui64() -> None:
    raw = page(
        descriptor(0x51, 0x93, bytes.fromhex("500a0b0c0d0e0f00")),  # iSCSI, PIV, port, NAA 5
        descriptor(0x03, 0xA8, "iqn.x,t,0x1 ünï".encode() + b"\0\0"),  # UTF-8 SCSI name, device
        descriptor(0x01, 0x02, bytes(8)),  # EUI-64 of zeros
    )
    port, name, eui = parse_vpd83_page(raw)
    assert (port.type, port.piv, port.association, port.value_hex) == (
        "naa",
        True,
        1,
        "500a0b0c0d0e0f00",
    )
    assert (name.type, name.code_set, name.association, name.value) == (
        "scsi-name-string",
        3,
        2,
        "iqn.x,t,0x1 ünï",
    )
    assert (eui.type, eui.value_hex, eui.complete) == ("eui-64", "00" * 8, True)


def test_page_cut_short_keeps_partial_descriptor_as_incomplete() -> None:
    raw = page(descriptor(0x01, 0x03, bytes.fromhex(TGT_NAA6)))
    [cut] = parse_vpd83_page(raw[:-6])
    assert (cut.value_hex, cut.complete) == (TGT_NAA6[:-12], False)
    assert parse_vpd83_page(page()) == []
    # Bytes past the page length (allocation padding) are not descriptors.
    assert len(parse_vpd83_page(raw + bytes(32))) == 1


def test_not_a_vpd83_page() -> None:
    with pytest.raises(ValueError, match="not a VPD 0x83 page"):
        parse_vpd83_page(bytes.fromhex("00800004") + b"beaf")
    with pytest.raises(ValueError):
        parse_vpd83_page(b"\0")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, URL),
        (
            f"iscsi://alice%s3cr%40t@127.0.0.1:3260/{IQN}/1",
            f"iscsi://alice%***@127.0.0.1:3260/{IQN}/1",
        ),
        (f"iscsi://alice@127.0.0.1/{IQN}/1", f"iscsi://alice@127.0.0.1/{IQN}/1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_library_without_a_function_is_rejected() -> None:
    class Partial:
        _name = "libfake.so"
        iscsi_create_context = staticmethod(lambda *args: None)

    with pytest.raises(StorageError, match="libfake.so lacks iscsi_destroy_context"):
        libiscsi.Libiscsi(Partial())  # type: ignore[arg-type]


class FakeLibiscsi:
    """Stands in for the loaded library: answers VPD 0x83 with a fixture or fails."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.calls: list[tuple[str, int, float]] = []

    def inquiry_vpd(self, url: str, page: int, timeout: float = 60.0) -> bytes:
        self.calls.append((url, page, timeout))
        if self.data is None:
            raise StorageError("libiscsi: cannot log in to x: Target not found(515)")
        return self.data


class FakeTools:
    """iscsi-inq and iscsi-readcapacity16 answers from the captured fixtures."""

    OUTPUT = {
        ("iscsi-inq", URL): "iscsi-inq-standard.txt",
        ("iscsi-inq", "-e", "1", "-c", "128", URL): "iscsi-inq-vpd80.txt",
        ("iscsi-inq", "-e", "1", "-c", "131", URL): "iscsi-inq-vpd83.txt",
        ("iscsi-readcapacity16", URL): "iscsi-readcapacity16-file.txt",
    }

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(tuple(argv))
        text = (FIXTURES / self.OUTPUT[tuple(argv)]).read_text()
        return subprocess.CompletedProcess(list(argv), 0, text, "")


def iscsi_disk() -> RawDisk:
    return RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=IscsiSource("127.0.0.1", 3260, IQN, 1))


def test_agent_takes_designators_from_libiscsi(monkeypatch: pytest.MonkeyPatch) -> None:
    tools, library = FakeTools(), FakeLibiscsi(hex_fixture("libiscsi-vpd83-tgt.hex"))
    monkeypatch.setattr(iscsi, "run", tools)
    monkeypatch.setattr(libiscsi, "load", lambda: library)
    ident = IscsiAgent(use_local_tgt=False, timeout=9.0).map(iscsi_disk()).identity
    assert library.calls == [(URL, 0x83, 9.0)]
    assert ("iscsi-inq", "-e", "1", "-c", "131", URL) not in tools.calls
    assert ident["designator_source"] == "libiscsi"
    assert ident["naa"] == [TGT_NAA3, TGT_NAA6]
    assert ident["t10_vendor_id"] == "IET     00010001"
    assert all(d["complete"] for d in ident["designators"])
    assert ident["serial"] == "beaf1001"


def test_agent_falls_back_to_iscsi_inq(monkeypatch: pytest.MonkeyPatch) -> None:
    tools = FakeTools()
    monkeypatch.setattr(iscsi, "run", tools)
    monkeypatch.setattr(libiscsi, "load", lambda: FakeLibiscsi(None))
    ident = IscsiAgent(use_local_tgt=False).map(iscsi_disk()).identity
    assert ("iscsi-inq", "-e", "1", "-c", "131", URL) in tools.calls
    assert ident["designator_source"] == "iscsi-inq"
    assert "naa" not in ident  # iscsi-inq cut both NAA values at a zero byte
    assert ident["t10_vendor_id"] == "IET     00640001"


def test_agent_without_library_or_with_libiscsi_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iscsi, "run", FakeTools())
    library = FakeLibiscsi(hex_fixture("libiscsi-vpd83-tgt.hex"))
    monkeypatch.setattr(libiscsi, "load", lambda: library)
    off = IscsiAgent(use_local_tgt=False, use_libiscsi=False).map(iscsi_disk()).identity
    assert (off["designator_source"], library.calls) == ("iscsi-inq", [])
    monkeypatch.setattr(libiscsi, "load", lambda: None)
    absent = IscsiAgent(use_local_tgt=False).map(iscsi_disk()).identity
    assert absent["designator_source"] == "iscsi-inq"


def test_module_inquiry_without_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libiscsi, "load", lambda: None)
    with pytest.raises(StorageError, match="libiscsi7"):
        libiscsi.inquiry_vpd(URL, 0x83)
